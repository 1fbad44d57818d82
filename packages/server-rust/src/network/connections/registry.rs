//! **registry** → fanout → queue → writer: every live connection, broadcasts to them, and
//! sends to the ones named.
//!
//! Topics (`topics.rs`) and disconnect listeners (`events.rs`) are rooms of their own; the
//! registry holds them so that whoever holds the registry reaches them, and the engine can
//! clear a connection out of them when it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::network::config::ConnectionConfig;
use crate::network::connection::{ConnectionId, ConnectionKind};
use crate::network::connections::channel::{Outbound, OutboundReceiver};
use crate::network::connections::events::{DisconnectListener, DisconnectListeners};
use crate::network::connections::fanout::{self, BroadcastOutcome, Fanout};
use crate::network::connections::handle::ConnectionHandle;
use crate::network::connections::topics::Topics;

/// All live connections, shared by every part of the server.
///
/// Lock-sharded ([`DashMap`]) so registering, removing and looking up connections scale across
/// cores; per-kind counts are kept alongside so [`count_by_kind`](Self::count_by_kind) is O(1).
///
/// Besides every connection, it reaches connections by id ([`send_to`](Self::send_to)), by
/// topic ([`topics`](Self::topics)), and tells listeners when one ends
/// ([`listen_disconnects`](Self::listen_disconnects)).
#[derive(Debug)]
pub struct ConnectionRegistry {
    connections: DashMap<ConnectionId, Arc<ConnectionHandle>>,
    /// Whether the engine's clock (which wakes connections due a ping) runs for these
    /// connections.
    pub(crate) clock_running: AtomicBool,
    next_id: AtomicU64,
    counts_by_kind: [AtomicUsize; ConnectionKind::ALL.len()],
    emptied: Notify,
    dropped_total: Arc<AtomicU64>,
    fanout: Arc<Fanout>,
    topics: Topics,
    listeners: DisconnectListeners,
}

impl Default for ConnectionRegistry {
    fn default() -> Self {
        let fanout = Arc::new(Fanout::default());
        Self {
            connections: DashMap::new(),
            clock_running: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            counts_by_kind: Default::default(),
            emptied: Notify::new(),
            dropped_total: Arc::default(),
            topics: Topics::new(Arc::clone(&fanout)),
            fanout,
            listeners: DisconnectListeners::default(),
        }
    }
}

impl ConnectionRegistry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a new connection with an outbound queue of
    /// `config.outbound_channel_capacity` messages and returns both ends of the queue.
    pub fn register(
        &self,
        kind: ConnectionKind,
        config: &ConnectionConfig,
    ) -> (Arc<ConnectionHandle>, OutboundReceiver) {
        let handle = self.register_pending(kind, config, None);
        handle.accept_broadcasts();
        let receiver = OutboundReceiver::new(Arc::clone(handle.tx.outbound()));
        (handle, receiver)
    }

    /// Like [`register`](Self::register), but broadcasts skip the connection until
    /// [`ConnectionHandle::accept_broadcasts`] is called, so the handler's first messages
    /// (`on_connect`) are the first the client receives.
    pub(crate) fn register_pending(
        &self,
        kind: ConnectionKind,
        config: &ConnectionConfig,
        peer: Option<SocketAddr>,
    ) -> Arc<ConnectionHandle> {
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let outbound = Outbound::new(id, config, Arc::clone(&self.dropped_total));
        let max_topics = u32::try_from(config.max_topics_per_connection).unwrap_or(u32::MAX);
        let handle = Arc::new(ConnectionHandle::new(kind, Arc::new(outbound), peer, max_topics));
        self.counts_by_kind[kind.index()].fetch_add(1, Ordering::Relaxed);
        self.connections.insert(id, Arc::clone(&handle));
        handle
    }

    /// Removes a connection. Returns its handle the first time, `None` afterwards.
    ///
    /// The transport removes the connections it serves itself, and clears their topics. A
    /// connection registered with [`register`](Self::register) leaves its topics with
    /// [`topics().unsubscribe_all(&handle)`](Topics::unsubscribe_all) (async: it takes the
    /// metadata lock).
    pub fn remove(&self, id: ConnectionId) -> Option<Arc<ConnectionHandle>> {
        let (_, handle) = self.connections.remove(&id)?;
        self.counts_by_kind[handle.kind.index()].fetch_sub(1, Ordering::Relaxed);
        if self.count() == 0 {
            self.emptied.notify_waiters();
        }
        Some(handle)
    }

    /// Looks up a connection by id.
    pub fn get(&self, id: ConnectionId) -> Option<Arc<ConnectionHandle>> {
        self.connections.get(&id).map(|entry| Arc::clone(entry.value()))
    }

    /// Number of live connections.
    ///
    /// Read from the per-kind counters, so it takes none of the map's shard locks: `/health`
    /// and every removal ask for it.
    pub fn count(&self) -> usize {
        self.counts_by_kind.iter().map(|count| count.load(Ordering::Relaxed)).sum()
    }

    /// Number of live connections of one kind, without scanning the registry.
    pub fn count_by_kind(&self, kind: ConnectionKind) -> usize {
        self.counts_by_kind[kind.index()].load(Ordering::Relaxed)
    }

    /// A snapshot of all live connections.
    ///
    /// The snapshot is taken up front, so the caller may register or remove connections while
    /// iterating without deadlocking on the registry's internal locks.
    pub fn iter(&self) -> impl Iterator<Item = Arc<ConnectionHandle>> + use<> {
        self.connections
            .iter()
            .map(|entry| Arc::clone(entry.value()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// Queues `msg_bytes` as a binary message on every connection of `kind`, never waiting.
    ///
    /// Accepts anything convertible into [`Bytes`] (`Vec<u8>`, `&'static [u8]`, `Bytes`); the
    /// payload is shared, not copied, across connections. Connections whose queue is full miss
    /// the message and are counted in [`BroadcastOutcome::dropped`]. A connection the
    /// transport accepted is reached only once the handler's `on_connect` has returned.
    ///
    /// A broadcast that follows a pause writes the message itself to every connection with
    /// nothing waiting (its task is not woken); one that follows the previous broadcast
    /// closely (within a millisecond of its end) queues it, so each connection's task writes
    /// what piled up as one `BATCH` frame.
    pub fn broadcast(&self, msg_bytes: impl Into<Bytes>, kind: ConnectionKind) -> BroadcastOutcome {
        self.broadcast_to(msg_bytes, |conn| conn.kind == kind)
    }

    /// Like [`broadcast`](Self::broadcast), to the connections `recipients` picks: for
    /// example only authenticated clients, or the subscribers of a topic.
    ///
    /// `recipients` is called while the registry is being walked, so it must not register or
    /// remove connections (that would wait for the walk to end); [`iter`](Self::iter) gives a
    /// snapshot that allows it.
    ///
    /// ```
    /// use topgun_server::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry};
    ///
    /// let registry = ConnectionRegistry::new();
    /// let (_guest, _guest_queue) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
    /// let outcome = registry.broadcast_to(vec![0x90], |conn| {
    ///     conn.kind == ConnectionKind::Client && conn.is_authenticated()
    /// });
    /// assert_eq!(outcome.queued, 0, "nobody has authenticated yet");
    /// ```
    pub fn broadcast_to(
        &self,
        msg_bytes: impl Into<Bytes>,
        mut recipients: impl FnMut(&ConnectionHandle) -> bool,
    ) -> BroadcastOutcome {
        let payload = msg_bytes.into();
        self.fanout.once(|direct| {
            fanout::send_each(
                direct,
                &payload,
                &self.connections,
                |conn| conn.accepts_broadcasts() && recipients(conn),
                |_| {},
            )
        })
    }

    /// Queues `msg_bytes` as a binary message on each connection of `ids`, never waiting:
    /// O(ids), whatever the number of connections. The payload is shared, as for a broadcast,
    /// and each connection named is reached (its `on_connect` may still be running: it was
    /// named). Ids no longer registered, and full or closed queues, count as dropped.
    ///
    /// ```
    /// use topgun_server::network::{BroadcastOutcome, ConnectionConfig, ConnectionKind, ConnectionRegistry};
    ///
    /// let registry = ConnectionRegistry::new();
    /// let config = ConnectionConfig::default();
    /// let (a, mut a_queue) = registry.register(ConnectionKind::Client, &config);
    /// let (_b, mut b_queue) = registry.register(ConnectionKind::Client, &config);
    /// let outcome = registry.send_to([a.id], vec![0x90]);
    /// assert_eq!(outcome, BroadcastOutcome { queued: 1, dropped: 0 });
    /// assert!(a_queue.try_recv().is_ok());
    /// assert!(b_queue.try_recv().is_err(), "not named");
    /// ```
    pub fn send_to(
        &self,
        ids: impl IntoIterator<Item = ConnectionId>,
        msg_bytes: impl Into<Bytes>,
    ) -> BroadcastOutcome {
        let payload = msg_bytes.into();
        self.fanout.once(|direct| {
            let mut missing = 0;
            // Each handle is taken out of the map at once: holding several entries would hold
            // their shards' locks, and two ids in one shard would take it twice.
            let found = ids.into_iter().filter_map(|id| {
                let found = self.get(id);
                missing += usize::from(found.is_none());
                found
            });
            let mut outcome = fanout::send_each(direct, &payload, found, |_| true, |_| {});
            outcome.dropped += missing;
            outcome
        })
    }

    /// The topics connections subscribe to, and publishing to their subscribers.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Adds `listener`, told of every connection the transport ends, after the handler's own
    /// [`on_disconnect`](crate::network::InboundHandler::on_disconnect); listeners are called
    /// one after another, in the order they were added. Several parts of a server (sessions,
    /// locks, subscriptions of their own) can each learn of disconnects this way without
    /// wrapping the handler.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use topgun_server::network::{ConnectionHandle, ConnectionRegistry, DisconnectReason};
    ///
    /// let registry = ConnectionRegistry::new();
    /// let ended = Arc::new(AtomicUsize::new(0));
    /// let counter = Arc::clone(&ended);
    /// registry.listen_disconnects(move |_conn: &Arc<ConnectionHandle>, _why: DisconnectReason| {
    ///     counter.fetch_add(1, Ordering::Relaxed);
    /// });
    /// ```
    pub fn listen_disconnects(&self, listener: impl DisconnectListener) {
        self.listeners.add(&(Arc::new(listener) as Arc<dyn DisconnectListener>));
    }

    /// The disconnect listeners, for the engine.
    pub(crate) fn disconnect_listeners(&self) -> &DisconnectListeners {
        &self.listeners
    }

    /// Wakes every connection's task, to look at the shutdown state.
    pub(crate) fn wake_all(&self) {
        for entry in &self.connections {
            entry.value().queue().wake_consumer();
        }
    }

    /// Wakes the tasks of the connections whose [`wake_at`](ConnectionHandle::wake_at) instant
    /// has come.
    pub(crate) fn wake_due(&self) {
        let now = std::time::Instant::now();
        for entry in &self.connections {
            let conn = entry.value();
            if conn.is_due(now) {
                conn.queue().wake_consumer();
            }
        }
    }

    /// Messages dropped on full queues, over every connection this registry has held.
    pub fn dropped_messages_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Completes once no connection is registered (immediately if none is).
    pub async fn wait_until_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Register interest before checking, so a removal in between still wakes us.
            emptied.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            emptied.await;
        }
    }

    /// [`broadcast`](Self::broadcast), then waits until the connection writers have caught
    /// up: until at most 1 % of the recipients (plus one) still hold more than
    /// [`COOPERATIVE_BACKLOG`](Self::COOPERATIVE_BACKLOG) queued messages, for at most
    /// [`COOPERATIVE_MAX_WAIT`](Self::COOPERATIVE_MAX_WAIT). It yields to the runtime at
    /// least once either way.
    ///
    /// Use it from async code that broadcasts in a loop. A tight loop of the synchronous
    /// `broadcast` fills every queue before the writers run: messages are then dropped even
    /// for clients that read everything promptly, and those that do arrive have waited
    /// behind a full queue. Bounding the backlog keeps the delay of every message to a few
    /// writer rounds and the memory held per connection small, while writers still coalesce
    /// what piles up into `BATCH` frames.
    ///
    /// Slow clients do not set everyone's pace: a connection still behind when a call has
    /// waited its longest is not waited for again until it has caught up. Its queue then fills
    /// like any other slow consumer's (drops, and close `1013` after `max_consecutive_drops`),
    /// and a client that stops reading is closed by its writer after `send_timeout`.
    pub async fn broadcast_cooperative(
        &self,
        msg_bytes: impl Into<Bytes>,
        kind: ConnectionKind,
    ) -> BroadcastOutcome {
        self.broadcast_cooperative_to(msg_bytes, move |conn| conn.kind == kind).await
    }

    /// [`broadcast_cooperative`](Self::broadcast_cooperative) to the connections `recipients`
    /// picks, as [`broadcast_to`](Self::broadcast_to) does.
    pub async fn broadcast_cooperative_to(
        &self,
        msg_bytes: impl Into<Bytes>,
        mut recipients: impl FnMut(&ConnectionHandle) -> bool + Send,
    ) -> BroadcastOutcome {
        let payload = msg_bytes.into();
        self.fanout
            .cooperative(|direct, lagging| {
                fanout::send_each(
                    direct,
                    &payload,
                    &self.connections,
                    |conn| conn.accepts_broadcasts() && recipients(conn),
                    |conn| lagging.note(conn),
                )
            })
            .await
    }

    /// Queued messages beyond which [`broadcast_cooperative`](Self::broadcast_cooperative)
    /// counts a recipient as lagging.
    pub const COOPERATIVE_BACKLOG: usize = Fanout::COOPERATIVE_BACKLOG;
    /// Longest [`broadcast_cooperative`](Self::broadcast_cooperative) waits for lagging
    /// recipients before it returns anyway.
    pub const COOPERATIVE_MAX_WAIT: Duration = Fanout::COOPERATIVE_MAX_WAIT;

    /// Removes and returns every connection, for shutdown.
    ///
    /// Only the registry forgets them: their sockets stay open until their own tasks end,
    /// the handler's `on_disconnect` is **not** called for them (the transport calls it only
    /// for a connection it removes itself) and they are not counted as closed in the metrics.
    /// To close connections gracefully, use
    /// [`ShutdownController::close_connections`](crate::network::ShutdownController::close_connections)
    /// or [`NetworkModule::serve`](crate::network::NetworkModule::serve)'s shutdown.
    pub fn drain_all(&self) -> Vec<Arc<ConnectionHandle>> {
        let ids: Vec<ConnectionId> = self.connections.iter().map(|entry| *entry.key()).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::connections::channel::tests::{binary, config_with_capacity};
    use crate::network::connections::queue::OutboundMessage;

    #[test]
    fn count_tracks_register_and_remove() {
        let registry = ConnectionRegistry::new();
        let (a, _ra) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let (b, _rb) = registry.register(ConnectionKind::ClusterPeer, &ConnectionConfig::default());
        let (_c, _rc) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        assert_eq!(registry.count(), 3);
        assert_eq!(registry.count_by_kind(ConnectionKind::Client), 2);
        assert_eq!(registry.count_by_kind(ConnectionKind::ClusterPeer), 1);
        assert_eq!(registry.remove(a.id).map(|h| h.id), Some(a.id));
        assert!(registry.remove(a.id).is_none(), "a second remove is a no-op");
        assert_eq!(registry.count(), 2);
        assert_eq!(registry.count_by_kind(ConnectionKind::Client), 1);
        assert_eq!(registry.get(b.id).map(|h| h.kind), Some(ConnectionKind::ClusterPeer));
        assert!(registry.get(a.id).is_none());
        assert_eq!(registry.iter().count(), 2);
        let drained = registry.drain_all();
        assert_eq!(drained.len(), 2);
        assert_eq!(registry.count(), 0);
        assert_eq!(registry.count_by_kind(ConnectionKind::Client), 0);
        assert_eq!(registry.count_by_kind(ConnectionKind::ClusterPeer), 0);
    }

    #[test]
    fn broadcast_reaches_one_kind_and_skips_full_channels_without_blocking() {
        let registry = ConnectionRegistry::new();
        let (_c1, mut rx1) = registry.register(ConnectionKind::Client, &config_with_capacity(4));
        let (full, mut rx_full) =
            registry.register(ConnectionKind::Client, &config_with_capacity(1));
        let (_peer, mut rx_peer) =
            registry.register(ConnectionKind::ClusterPeer, &config_with_capacity(4));
        assert!(full.try_send(binary(9)));

        let outcome = registry.broadcast(vec![7_u8, 7], ConnectionKind::Client);

        assert_eq!(outcome, BroadcastOutcome { queued: 1, dropped: 1 });
        assert_eq!(rx1.try_recv().unwrap(), OutboundMessage::Binary(Bytes::from_static(&[7, 7])));
        assert_eq!(rx_full.try_recv().unwrap(), binary(9), "the full queue keeps its own message");
        assert!(rx_full.try_recv().is_err());
        assert!(rx_peer.try_recv().is_err(), "peers are not clients");
    }

    #[test]
    fn a_broadcast_reaches_every_connection_once_however_few_there_are() {
        // The broadcast reads connections ahead of the one it sends to: the last ones, and a
        // registry smaller than that window, must still be reached, each once.
        for count in [0, 1, 2, 3, 4, 40] {
            let registry = ConnectionRegistry::new();
            let mut receivers = backlogged(&registry, count, 0);
            let outcome = registry.broadcast(vec![3_u8], ConnectionKind::Client);
            assert_eq!(
                outcome,
                BroadcastOutcome { queued: count, dropped: 0 },
                "{count} connections"
            );
            for rx in &mut receivers {
                assert_eq!(rx.try_recv().unwrap(), binary(3), "{count} connections");
                assert!(rx.try_recv().is_err(), "{count} connections: reached once");
            }
        }
    }

    #[tokio::test]
    async fn broadcast_cooperative_queues_like_broadcast() {
        let registry = ConnectionRegistry::new();
        let (_a, mut rx) = registry.register(ConnectionKind::Client, &config_with_capacity(1));
        let first = registry.broadcast_cooperative(vec![1_u8], ConnectionKind::Client).await;
        let second = registry.broadcast_cooperative(vec![2_u8], ConnectionKind::Client).await;
        assert_eq!((first.queued, second.dropped), (1, 1));
        assert_eq!(rx.try_recv().unwrap(), binary(1));
    }

    /// Registers `count` connections whose queues already hold `backlog` messages.
    fn backlogged(
        registry: &ConnectionRegistry,
        count: usize,
        backlog: usize,
    ) -> Vec<OutboundReceiver> {
        (0..count)
            .map(|_| {
                let (handle, rx) =
                    registry.register(ConnectionKind::Client, &ConnectionConfig::default());
                for _ in 0..backlog {
                    assert!(handle.try_send(binary(0)));
                }
                rx
            })
            .collect()
    }

    /// One `broadcast_cooperative` of `byte`: what it queued and how long it waited.
    async fn timed_cooperative(registry: &ConnectionRegistry, byte: u8) -> (usize, Duration) {
        let started = tokio::time::Instant::now();
        let outcome = registry.broadcast_cooperative(vec![byte], ConnectionKind::Client).await;
        (outcome.queued, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn broadcast_cooperative_waits_for_lagging_writers_at_most_the_max_wait() {
        let registry = ConnectionRegistry::new();
        let _stalled = backlogged(&registry, 3, ConnectionRegistry::COOPERATIVE_BACKLOG);
        let max_wait = ConnectionRegistry::COOPERATIVE_MAX_WAIT;
        assert_eq!(timed_cooperative(&registry, 1).await, (3, max_wait));
        // Those that stayed behind do not hold the next broadcasts back.
        assert_eq!(timed_cooperative(&registry, 2).await, (3, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_recipient_that_caught_up_is_waited_for_again() {
        let registry = ConnectionRegistry::new();
        let mut receivers = backlogged(&registry, 3, ConnectionRegistry::COOPERATIVE_BACKLOG);
        timed_cooperative(&registry, 1).await;
        for rx in &mut receivers {
            while rx.try_recv().is_ok() {}
        }
        // Caught up: the next broadcast sees it; lagging again: the one after waits.
        timed_cooperative(&registry, 2).await;
        for _ in 0..ConnectionRegistry::COOPERATIVE_BACKLOG {
            registry.broadcast(vec![3_u8], ConnectionKind::Client);
        }
        let (_, waited) = timed_cooperative(&registry, 4).await;
        assert_eq!(waited, ConnectionRegistry::COOPERATIVE_MAX_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn broadcast_cooperative_returns_once_the_writers_catch_up() {
        let registry = ConnectionRegistry::new();
        let receivers = backlogged(&registry, 3, ConnectionRegistry::COOPERATIVE_BACKLOG);
        let writers: Vec<_> = receivers
            .into_iter()
            .map(|mut rx| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    while rx.recv().await.is_some() {}
                })
            })
            .collect();
        let (_, waited) = timed_cooperative(&registry, 1).await;
        assert!(waited >= Duration::from_millis(30), "returned before the writers ran: {waited:?}");
        assert!(
            waited < Duration::from_millis(40),
            "kept waiting after they caught up: {waited:?}"
        );
        drop(writers);
    }

    #[tokio::test(start_paused = true)]
    async fn one_stalled_recipient_does_not_hold_broadcast_cooperative_back() {
        let registry = ConnectionRegistry::new();
        let _stalled = backlogged(&registry, 1, ConnectionRegistry::COOPERATIVE_BACKLOG);
        let _healthy = backlogged(&registry, 2, 0);
        assert_eq!(timed_cooperative(&registry, 1).await, (3, Duration::ZERO));
    }

    #[test]
    fn broadcast_shares_one_payload_allocation() {
        let registry = ConnectionRegistry::new();
        let (_a, mut rx_a) =
            registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let (_b, mut rx_b) =
            registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        registry.broadcast(Bytes::from(vec![1_u8; 64]), ConnectionKind::Client);
        let (OutboundMessage::Binary(a), OutboundMessage::Binary(b)) =
            (rx_a.try_recv().unwrap(), rx_b.try_recv().unwrap())
        else {
            panic!("expected binary messages");
        };
        assert_eq!(a.as_ptr(), b.as_ptr());
    }

    #[tokio::test]
    async fn wait_until_empty_wakes_when_the_last_connection_leaves() {
        let registry = Arc::new(ConnectionRegistry::new());
        let (a, _ra) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let (b, _rb) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let waiter = tokio::spawn({
            let registry = Arc::clone(&registry);
            async move { registry.wait_until_empty().await }
        });
        registry.remove(a.id);
        registry.remove(b.id);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
