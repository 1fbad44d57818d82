//! Connection identity, per-connection state and the registry of live connections.
//!
//! Each WebSocket connection owns a bounded outbound queue. Other parts of the server hold an
//! [`Arc<ConnectionHandle>`] and push [`OutboundMessage`]s into it; the connection's task
//! drains the queue onto the socket. A full queue means the client is not keeping up: callers
//! choose between dropping ([`ConnectionHandle::try_send`]) and waiting
//! ([`ConnectionHandle::send_timeout`]), so one slow client never stalls the others.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{Notify, RwLock};
use topgun_core::{Principal, Timestamp};

use super::close::{self, CloseRequest};
use super::config::ConnectionConfig;
use super::queue::{OutboundMessage, OutboundQueue, Refused, TryRecvError};

/// Process-unique identifier of one connection; never reused while the registry lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionKind {
    /// An application client (browser, TypeScript client, service).
    Client,
    /// Another server node of the cluster.
    ClusterPeer,
}

impl ConnectionKind {
    /// Every kind, in [`index`](Self::index) order.
    pub(crate) const ALL: [Self; 2] = [Self::Client, Self::ClusterPeer];

    /// Position in [`ALL`](Self::ALL), for per-kind arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Client => 0,
            Self::ClusterPeer => 1,
        }
    }

    /// The lowercase name used in logs and metric labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::ClusterPeer => "cluster_peer",
        }
    }
}

/// Why a WebSocket connection ended; the `reason` label of `topgun_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The client closed the connection or went away.
    ClientClose,
    /// Nothing arrived for `idle_timeout`.
    IdleTimeout,
    /// The client did not keep up: queue overflow or a blocked socket write.
    SlowConsumer,
    /// The client broke a limit: message size, text frames.
    Limit,
    /// The server shut down.
    Shutdown,
    /// The application closed it (`OutboundMessage::Close` or `close_with`).
    Application,
    /// A read or write failed, or the handler panicked.
    Error,
    /// Not authenticated within `auth_timeout`.
    AuthTimeout,
}

impl DisconnectReason {
    pub(crate) const ALL: [Self; 8] = [
        Self::ClientClose,
        Self::IdleTimeout,
        Self::SlowConsumer,
        Self::Limit,
        Self::Shutdown,
        Self::Application,
        Self::Error,
        Self::AuthTimeout,
    ];

    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClose => "client_close",
            Self::IdleTimeout => "idle_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Limit => "limit",
            Self::Shutdown => "shutdown",
            Self::Application => "application",
            Self::Error => "error",
            Self::AuthTimeout => "auth_timeout",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The queue stayed full for the whole timeout.
    #[error("timed out waiting for space in the connection's outbound queue")]
    Timeout,
    /// The connection is closed; nothing will read the queue again.
    #[error("connection is closed")]
    Disconnected,
    /// The queue is full right now.
    #[error("connection's outbound queue is full")]
    Full,
    /// The message is larger than the connection accepts
    /// ([`ConnectionConfig::max_outbound_message_size`]); it is refused, not sent.
    #[error("outbound message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The message's size in bytes.
        size: usize,
        /// The connection's `max_outbound_message_size`.
        limit: usize,
    },
}

/// Mutable, application-level state of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionMetadata {
    /// Whether the connection has authenticated. Starts `false`.
    pub authenticated: bool,
    /// The identity the connection authenticated as.
    pub principal: Option<Principal>,
    /// Query subscriptions held by the connection.
    pub subscriptions: HashSet<String>,
    /// Pub/sub topics the connection listens to.
    pub topics: HashSet<String>,
    /// When the connection last showed signs of life.
    pub last_heartbeat: Instant,
    /// The newest hybrid-logical-clock timestamp seen from the connection.
    pub last_hlc: Option<Timestamp>,
    /// For cluster peers: the remote node's id.
    pub peer_node_id: Option<String>,
}

impl Default for ConnectionMetadata {
    fn default() -> Self {
        Self {
            authenticated: false,
            principal: None,
            subscriptions: HashSet::new(),
            topics: HashSet::new(),
            last_heartbeat: Instant::now(),
            last_hlc: None,
            peer_node_id: None,
        }
    }
}

/// A live connection as the rest of the server sees it: an id, an outbound queue and metadata.
///
/// ```
/// use topgun_server::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry, OutboundMessage};
///
/// let registry = ConnectionRegistry::new();
/// let (handle, mut outbound) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
/// assert!(handle.try_send(OutboundMessage::Binary(vec![1, 2, 3].into())));
/// assert_eq!(outbound.try_recv().unwrap(), OutboundMessage::Binary(vec![1, 2, 3].into()));
/// ```
#[derive(Debug)]
pub struct ConnectionHandle {
    /// The connection's id.
    pub id: ConnectionId,
    /// Application-level state; an async lock because handlers hold it across awaits.
    pub metadata: Arc<RwLock<ConnectionMetadata>>,
    /// When the connection was registered.
    pub connected_at: Instant,
    /// Client or cluster peer.
    pub kind: ConnectionKind,
    control: ConnectionControl,
}

/// Transport-internal per-connection state, kept out of the metadata lock because the read and
/// write paths touch it on every frame.
#[derive(Debug)]
struct ConnectionControl {
    /// The bounded outbound queue and priority lane. Not public: sending through it directly
    /// would skip drop counting, the slow-consumer close and the size limit; use
    /// [`try_send`](ConnectionHandle::try_send), [`try_enqueue`](ConnectionHandle::try_enqueue)
    /// or [`send_timeout`](ConnectionHandle::send_timeout).
    queue: OutboundQueue,
    close_request: OnceLock<CloseRequest>,
    max_outbound_message_size: usize,
    /// Broadcasts reach the connection only once this is set: for connections the transport
    /// accepts, after the handler's `on_connect` has returned.
    accepting_broadcasts: AtomicBool,
    /// Mirrors `metadata.authenticated` for readers that must not wait for the lock.
    authenticated: AtomicBool,
    /// An inbound handler call for this connection is running: its silence meanwhile is the
    /// server's doing, not the client's.
    handler_busy: AtomicBool,
    /// Milliseconds after `connected_at` of the last inbound frame.
    last_activity_ms: AtomicU64,
    dropped: AtomicU64,
    /// The registry-wide drop count, shared by every connection of one registry.
    registry_dropped: Arc<AtomicU64>,
    consecutive_drops: AtomicU32,
    max_consecutive_drops: u32,
    /// Still behind after a `broadcast_cooperative` waited its longest for it: later
    /// broadcasts do not wait for this connection again until it has caught up.
    slow_for_broadcasts: AtomicBool,
    disconnect_reason: OnceLock<DisconnectReason>,
}

impl ConnectionHandle {
    /// Queues `msg` without waiting. Returns `false` if the queue is full or the connection is
    /// closed; the message is then dropped.
    pub fn try_send(&self, msg: OutboundMessage) -> bool {
        self.try_enqueue(msg).is_ok()
    }

    /// Like [`try_send`](Self::try_send), but says why a message was not queued.
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] when the queue is full, [`SendError::Disconnected`] when the
    /// connection is closed.
    ///
    /// A full queue counts as a dropped message ([`dropped_messages`](Self::dropped_messages)).
    /// After `max_consecutive_drops` drops in a row the connection is closed with 1013, so the
    /// client reconnects and resynchronises instead of silently missing data.
    /// A message over [`ConnectionConfig::max_outbound_message_size`] is refused with
    /// [`SendError::TooLarge`] and counted as dropped; it does not count towards the 1013 close.
    pub fn try_enqueue(&self, msg: OutboundMessage) -> Result<(), SendError> {
        if let OutboundMessage::Binary(payload) = &msg {
            self.check_size(payload)?;
        }
        let queued = self.control.queue.push(msg);
        if queued.is_ok() {
            // Read first: the common case (no drops) then never writes the shared line.
            if self.control.consecutive_drops.load(Ordering::Relaxed) != 0 {
                self.control.consecutive_drops.store(0, Ordering::Relaxed);
            }
        }
        self.settle(queued)
    }

    /// Counts a refused message: a drop (towards the 1013 close) when the queue was full,
    /// undelivered when the connection was closed.
    fn settle(&self, queued: Result<(), Refused>) -> Result<(), SendError> {
        match queued {
            Ok(()) => Ok(()),
            Err(Refused::Full) => {
                self.record_drop();
                Err(SendError::Full)
            }
            Err(Refused::Closed) => {
                self.record_undelivered(1);
                Err(SendError::Disconnected)
            }
        }
    }

    /// Queues `payload` to go out as a frame of its own, never coalesced into a `BATCH`, ahead
    /// of the `Binary` messages already queued (it waits at most for the frame being written).
    ///
    /// Which TopGun messages need it:
    ///
    /// | message | why |
    /// |---|---|
    /// | `PONG` | TopGun's client counts a `PONG` only when it is the top-level message of a frame; inside a `BATCH` it is missed and the client reconnects after 15 s |
    /// | handshake replies: `AUTH_REQUIRED`, `AUTH_ACK`, `AUTH_FAIL`, `DEVICE_ACK` | the client waits for them (a 500 ms grace timer for `AUTH_REQUIRED`); they must not queue behind a backlog |
    ///
    /// Everything else goes through [`try_send`](Self::try_send): coalescing is what keeps a
    /// busy connection to a few frames.
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] when [`PRIORITY_CAPACITY`](Self::PRIORITY_CAPACITY) messages are
    /// already waiting (counted as a drop, like a full outbound queue),
    /// [`SendError::Disconnected`] when the connection is closed, [`SendError::TooLarge`] over
    /// [`ConnectionConfig::max_outbound_message_size`].
    pub fn try_send_priority(&self, payload: impl Into<Bytes>) -> Result<(), SendError> {
        let payload = payload.into();
        self.check_size(&payload)?;
        self.enqueue_priority(payload)
    }

    /// Most [`try_send_priority`](Self::try_send_priority) messages waiting at once for one
    /// connection.
    pub const PRIORITY_CAPACITY: usize = 16;

    fn check_size(&self, payload: &Bytes) -> Result<(), SendError> {
        let limit = self.control.max_outbound_message_size;
        if payload.len() <= limit {
            return Ok(());
        }
        self.record_undelivered(1);
        tracing::warn!(conn_id = %self.id, size = payload.len(), limit, "outbound message over the limit refused");
        Err(SendError::TooLarge { size: payload.len(), limit })
    }

    fn enqueue_priority(&self, payload: Bytes) -> Result<(), SendError> {
        self.settle(self.control.queue.push_priority(payload))
    }

    /// The connection's queue, for the engine and the [`OutboundReceiver`].
    pub(crate) fn queue(&self) -> &OutboundQueue {
        &self.control.queue
    }

    /// Closes the queue (later sends fail) and counts what it still held as undelivered.
    pub(crate) fn close_queue(&self) {
        let undelivered = self.control.queue.close();
        if undelivered > 0 {
            tracing::debug!(conn_id = %self.id, undelivered, "messages still queued at close");
            self.record_undelivered(undelivered);
        }
    }

    /// Marks the connection authenticated as `principal`: sets
    /// [`ConnectionMetadata::authenticated`] and [`ConnectionMetadata::principal`], lets
    /// broadcasts filtered on [`is_authenticated`](Self::is_authenticated) reach it, and
    /// disarms the `auth_timeout` close. Call this rather than writing the metadata fields
    /// yourself: the transport reads the flag without taking the metadata lock.
    pub async fn authenticate(&self, principal: Principal) {
        let mut metadata = self.metadata.write().await;
        metadata.authenticated = true;
        metadata.principal = Some(principal);
        self.control.authenticated.store(true, Ordering::Release);
    }

    /// Whether [`authenticate`](Self::authenticate) has been called; never waits.
    pub fn is_authenticated(&self) -> bool {
        self.control.authenticated.load(Ordering::Acquire)
    }

    /// Whether broadcasts reach this connection yet (after its `on_connect`).
    pub(crate) fn accepts_broadcasts(&self) -> bool {
        self.control.accepting_broadcasts.load(Ordering::Acquire)
    }

    /// Lets broadcasts reach this connection from now on.
    pub(crate) fn accept_broadcasts(&self) {
        self.control.accepting_broadcasts.store(true, Ordering::Release);
    }

    pub(crate) fn set_handler_busy(&self, busy: bool) {
        self.control.handler_busy.store(busy, Ordering::Relaxed);
    }

    /// Whether an inbound handler call for this connection is running.
    pub(crate) fn handler_busy(&self) -> bool {
        self.control.handler_busy.load(Ordering::Relaxed)
    }

    /// Counts messages that were handed to this connection but will never reach the client
    /// (queued when it closed, or offered after it closed).
    pub(crate) fn record_undelivered(&self, count: u64) {
        self.control.dropped.fetch_add(count, Ordering::Relaxed);
        self.control.registry_dropped.fetch_add(count, Ordering::Relaxed);
    }

    fn record_drop(&self) {
        let control = &self.control;
        self.record_undelivered(1);
        let in_a_row = control.consecutive_drops.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= control.max_consecutive_drops && control.close_request.get().is_none() {
            tracing::info!(conn_id = %self.id, dropped = in_a_row, "closing slow consumer");
            self.close_because(
                DisconnectReason::SlowConsumer,
                close::TRY_AGAIN_LATER,
                format!("slow consumer: {in_a_row} messages dropped; reconnect and resync"),
            );
        }
    }

    /// Closes the connection with `code` and `reason` now, ahead of anything still queued
    /// (unlike [`OutboundMessage::Close`], which is sent after the queue). The first request
    /// wins; later ones are ignored. Counted as an `application` close in the metrics,
    /// whatever the code.
    pub fn close_with(&self, code: u16, reason: impl Into<String>) {
        self.close_because(DisconnectReason::Application, code, reason);
    }

    /// The transport's own closes: like [`close_with`](Self::close_with), with the reason the
    /// metrics record.
    pub(crate) fn close_because(
        &self,
        why: DisconnectReason,
        code: u16,
        reason: impl Into<String>,
    ) {
        let request = CloseRequest { code, reason: reason.into() };
        if self.control.close_request.set(request).is_ok() {
            self.note_disconnect(why);
            self.control.queue.wake_consumer();
        }
    }

    /// Records why the connection is ending; the first reason recorded wins.
    pub(crate) fn note_disconnect(&self, reason: DisconnectReason) {
        let _ = self.control.disconnect_reason.set(reason);
    }

    /// Why the connection ended: the first reason recorded, or the client leaving.
    pub(crate) fn disconnect_reason(&self) -> DisconnectReason {
        self.control.disconnect_reason.get().copied().unwrap_or(DisconnectReason::ClientClose)
    }

    /// Messages handed to this connection that never reached the client: dropped on a full
    /// queue, still queued when it closed, or offered after it closed.
    pub fn dropped_messages(&self) -> u64 {
        self.control.dropped.load(Ordering::Relaxed)
    }

    /// When the last frame (of any kind, pongs included) arrived from the client.
    pub fn last_activity(&self) -> Instant {
        self.connected_at
            + Duration::from_millis(self.control.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Records inbound activity; called for every frame read.
    pub(crate) fn touch(&self) {
        let elapsed = u64::try_from(self.connected_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.control.last_activity_ms.store(elapsed, Ordering::Relaxed);
    }

    /// Messages waiting in the outbound queue (not counting priority messages); 0 once the
    /// connection's writer has gone.
    pub fn queued(&self) -> usize {
        self.control.queue.len()
    }

    pub(crate) fn close_request(&self) -> Option<&CloseRequest> {
        self.control.close_request.get()
    }

    /// Queues `msg`, waiting up to `timeout` for space.
    ///
    /// # Errors
    ///
    /// [`SendError::Timeout`] if the queue stayed full, [`SendError::Disconnected`] if the
    /// connection closed, [`SendError::TooLarge`] for a message over the outbound limit.
    pub async fn send_timeout(
        &self,
        msg: OutboundMessage,
        timeout: Duration,
    ) -> Result<(), SendError> {
        if let OutboundMessage::Binary(payload) = &msg {
            self.check_size(payload)?;
        }
        match tokio::time::timeout(timeout, self.control.queue.push_waiting(msg)).await {
            Ok(queued) => self.settle(queued),
            Err(_) => Err(SendError::Timeout),
        }
    }

    /// Whether the connection's writer is still reading the queue.
    pub fn is_connected(&self) -> bool {
        !self.control.queue.is_closed()
    }
}

/// The receiving end of a connection's outbound queue, for code that writes a connection's
/// messages itself; [`ConnectionRegistry::register`](crate::network::ConnectionRegistry::register)
/// returns it. Shaped like a tokio `mpsc::Receiver`: [`recv`](Self::recv),
/// [`try_recv`](Self::try_recv), [`close`](Self::close), [`len`](Self::len).
///
/// Priority messages ([`ConnectionHandle::try_send_priority`]) come out first, as
/// [`OutboundMessage::Binary`]. Dropping the receiver closes the queue: later sends fail with
/// [`SendError::Disconnected`](crate::network::SendError::Disconnected), and whatever was still
/// queued counts as dropped.
///
/// ```
/// use topgun_server::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry, OutboundMessage};
///
/// let registry = ConnectionRegistry::new();
/// let (conn, mut outbound) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
/// conn.try_send(OutboundMessage::Binary(vec![1].into()));
/// conn.try_send_priority(vec![2]).unwrap();
/// assert_eq!(outbound.try_recv(), Ok(OutboundMessage::Binary(vec![2].into())), "priority first");
/// assert_eq!(outbound.try_recv(), Ok(OutboundMessage::Binary(vec![1].into())));
/// drop(outbound);
/// assert!(!conn.is_connected());
/// ```
#[derive(Debug)]
pub struct OutboundReceiver {
    conn: Arc<ConnectionHandle>,
}

impl OutboundReceiver {
    pub(crate) fn new(conn: Arc<ConnectionHandle>) -> Self {
        Self { conn }
    }

    /// The next message, waiting for one; `None` once the queue is closed and empty.
    pub async fn recv(&mut self) -> Option<OutboundMessage> {
        std::future::poll_fn(|cx| self.conn.queue().poll_next(cx)).await
    }

    /// The next message if one is queued.
    ///
    /// # Errors
    ///
    /// [`TryRecvError::Empty`] when nothing is queued, [`TryRecvError::Disconnected`] when
    /// the queue is closed.
    pub fn try_recv(&mut self) -> Result<OutboundMessage, TryRecvError> {
        let queue = self.conn.queue();
        match queue.try_next() {
            Some(message) => Ok(message),
            None if queue.is_closed() => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Closes the queue: later sends fail, and what is still queued counts as dropped.
    pub fn close(&mut self) {
        self.conn.close_queue();
    }

    /// Messages queued (priority messages not counted).
    #[must_use]
    pub fn len(&self) -> usize {
        self.conn.queue().len()
    }

    /// Whether no message is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        self.conn.close_queue();
    }
}

/// What [`ConnectionRegistry::broadcast`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BroadcastOutcome {
    /// Connections the message was queued on.
    pub queued: usize,
    /// Connections whose queue was full or closed; they did not get the message.
    pub dropped: usize,
}

/// All live connections, shared by every part of the server.
///
/// Lock-sharded ([`DashMap`]) so registering, removing and looking up connections scale across
/// cores; per-kind counts are kept alongside so [`count_by_kind`](Self::count_by_kind) is O(1).
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    connections: DashMap<ConnectionId, Arc<ConnectionHandle>>,
    next_id: AtomicU64,
    counts_by_kind: [AtomicUsize; ConnectionKind::ALL.len()],
    emptied: Notify,
    dropped_total: Arc<AtomicU64>,
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
        let handle = self.register_pending(kind, config);
        handle.accept_broadcasts();
        (Arc::clone(&handle), OutboundReceiver::new(handle))
    }

    /// Like [`register`](Self::register), but broadcasts skip the connection until
    /// [`ConnectionHandle::accept_broadcasts`] is called, so the handler's first messages
    /// (`on_connect`) are the first the client receives.
    pub(crate) fn register_pending(
        &self,
        kind: ConnectionKind,
        config: &ConnectionConfig,
    ) -> Arc<ConnectionHandle> {
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let handle = Arc::new(ConnectionHandle {
            id,
            metadata: Arc::new(RwLock::new(ConnectionMetadata::default())),
            connected_at: Instant::now(),
            kind,
            control: ConnectionControl {
                queue: OutboundQueue::new(
                    config.outbound_channel_capacity,
                    ConnectionHandle::PRIORITY_CAPACITY,
                ),
                close_request: OnceLock::new(),
                max_outbound_message_size: config.max_outbound_message_size,
                accepting_broadcasts: AtomicBool::new(false),
                authenticated: AtomicBool::new(false),
                handler_busy: AtomicBool::new(false),
                last_activity_ms: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                registry_dropped: Arc::clone(&self.dropped_total),
                consecutive_drops: AtomicU32::new(0),
                max_consecutive_drops: config.max_consecutive_drops.max(1),
                slow_for_broadcasts: AtomicBool::new(false),
                disconnect_reason: OnceLock::new(),
            },
        });
        self.counts_by_kind[kind.index()].fetch_add(1, Ordering::Relaxed);
        self.connections.insert(id, Arc::clone(&handle));
        handle
    }

    /// Removes a connection. Returns its handle the first time, `None` afterwards.
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
    pub fn broadcast(&self, msg_bytes: impl Into<Bytes>, kind: ConnectionKind) -> BroadcastOutcome {
        self.broadcast_to(msg_bytes, |conn| conn.kind == kind)
    }

    /// Like [`broadcast`](Self::broadcast), to the connections `recipients` picks: for
    /// example only authenticated clients, or the subscribers of a topic.
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
        recipients: impl FnMut(&ConnectionHandle) -> bool,
    ) -> BroadcastOutcome {
        self.broadcast_inspecting(&msg_bytes.into(), recipients, |_| {})
    }

    /// Queues `payload` on every connection `recipients` picks among those that accept
    /// broadcasts, calling `queued` with each connection that took it.
    fn broadcast_inspecting(
        &self,
        payload: &Bytes,
        mut recipients: impl FnMut(&ConnectionHandle) -> bool,
        mut queued: impl FnMut(&Arc<ConnectionHandle>),
    ) -> BroadcastOutcome {
        let mut outcome = BroadcastOutcome::default();
        for entry in &self.connections {
            let handle = entry.value();
            if !handle.accepts_broadcasts() || !recipients(handle) {
                continue;
            }
            if handle.try_send(OutboundMessage::Binary(payload.clone())) {
                outcome.queued += 1;
                queued(handle);
            } else {
                outcome.dropped += 1;
            }
        }
        if outcome.dropped > 0 {
            tracing::debug!(
                dropped = outcome.dropped,
                queued = outcome.queued,
                "broadcast skipped full queues"
            );
        }
        outcome
    }

    /// Wakes every connection's task, to look at the shutdown state.
    pub(crate) fn wake_all(&self) {
        for entry in &self.connections {
            entry.value().queue().wake_consumer();
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
        recipients: impl FnMut(&ConnectionHandle) -> bool + Send,
    ) -> BroadcastOutcome {
        let mut lagging = Vec::new();
        let outcome = self.broadcast_inspecting(&msg_bytes.into(), recipients, |handle| {
            let slow = &handle.control.slow_for_broadcasts;
            if handle.queued() <= Self::COOPERATIVE_BACKLOG {
                // Read first: the common case then never writes the shared line.
                if slow.load(Ordering::Relaxed) {
                    slow.store(false, Ordering::Relaxed);
                }
            } else if !slow.load(Ordering::Relaxed) {
                lagging.push(Arc::clone(handle));
            }
        });
        tokio::task::yield_now().await;
        let tolerated = outcome.queued / 100 + 1;
        let deadline = tokio::time::Instant::now() + Self::COOPERATIVE_MAX_WAIT;
        // Soon at first, then less often: every look walks the lagging queues.
        let mut recheck = Duration::from_millis(1);
        while lagging.len() > tolerated {
            if tokio::time::Instant::now() >= deadline {
                for handle in &lagging {
                    handle.control.slow_for_broadcasts.store(true, Ordering::Relaxed);
                }
                break;
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + recheck)).await;
            recheck = (recheck * 2).min(Self::COOPERATIVE_RECHECK_MAX);
            lagging.retain(|handle| handle.queued() > Self::COOPERATIVE_BACKLOG);
        }
        outcome
    }

    /// Queued messages beyond which [`broadcast_cooperative`](Self::broadcast_cooperative)
    /// counts a recipient as lagging.
    pub const COOPERATIVE_BACKLOG: usize = 12;
    /// Longest [`broadcast_cooperative`](Self::broadcast_cooperative) waits for lagging
    /// recipients before it returns anyway.
    pub const COOPERATIVE_MAX_WAIT: Duration = Duration::from_millis(250);
    /// The longest a waiting [`broadcast_cooperative`](Self::broadcast_cooperative) goes
    /// without looking at the lagging queues again (it starts at 1 ms and doubles).
    const COOPERATIVE_RECHECK_MAX: Duration = Duration::from_millis(8);

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

    fn config_with_capacity(capacity: usize) -> ConnectionConfig {
        ConnectionConfig { outbound_channel_capacity: capacity, ..Default::default() }
    }

    fn binary(byte: u8) -> OutboundMessage {
        OutboundMessage::Binary(Bytes::from(vec![byte]))
    }

    #[test]
    fn ac02_register_creates_a_bounded_channel_of_the_configured_capacity() {
        let registry = ConnectionRegistry::new();
        let (handle, _rx) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        assert_eq!(handle.queue().capacity(), 256);
        let (custom, _rx) = registry.register(ConnectionKind::Client, &config_with_capacity(8));
        assert_eq!(custom.queue().capacity(), 8);
        assert_ne!(handle.id, custom.id);
    }

    #[test]
    fn ac03_ot4_try_send_returns_false_when_the_channel_is_full() {
        let registry = ConnectionRegistry::new();
        let (handle, mut rx) =
            registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        for i in 0..256 {
            assert!(
                handle.try_send(binary(u8::try_from(i % 251).unwrap())),
                "message {i} must fit"
            );
        }
        assert!(!handle.try_send(binary(0)), "the 257th message must be refused");
        assert_eq!(handle.try_enqueue(binary(0)), Err(SendError::Full));
        rx.try_recv().unwrap();
        assert!(handle.try_send(binary(1)), "space freed by the reader is usable again");
    }

    #[test]
    fn consecutive_drops_past_the_limit_request_a_1013_close() {
        let registry = ConnectionRegistry::new();
        let config = ConnectionConfig { max_consecutive_drops: 3, ..config_with_capacity(1) };
        let (handle, mut rx) = registry.register(ConnectionKind::Client, &config);
        assert!(handle.try_send(binary(0)));
        assert!(!handle.try_send(binary(1)));
        assert!(!handle.try_send(binary(2)));
        rx.try_recv().unwrap();
        assert!(handle.try_send(binary(3)), "a delivered message resets the streak");
        for _ in 0..2 {
            assert!(!handle.try_send(binary(4)));
        }
        assert!(handle.close_request().is_none(), "two in a row is under the limit");
        assert!(!handle.try_send(binary(5)));
        assert_eq!(handle.dropped_messages(), 5);
        let request = handle.close_request().expect("close requested");
        assert_eq!(request.code, 1013);
        assert!(request.reason.contains("3 messages dropped"), "{}", request.reason);
        assert!(handle.close_request().is_some());
    }

    #[test]
    fn the_first_close_request_wins() {
        let registry = ConnectionRegistry::new();
        let (handle, _rx) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        handle.close_with(1003, "first");
        handle.close_with(1011, "second");
        assert_eq!(
            handle.close_request().map(|r| (r.code, r.reason.as_str())),
            Some((1003, "first"))
        );
    }

    #[test]
    fn try_send_reports_a_closed_connection() {
        let registry = ConnectionRegistry::new();
        let (handle, rx) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        assert!(handle.is_connected());
        drop(rx);
        assert!(!handle.is_connected());
        assert_eq!(handle.try_enqueue(binary(1)), Err(SendError::Disconnected));
    }

    #[tokio::test]
    async fn send_timeout_waits_then_times_out_or_reports_disconnect() {
        let registry = ConnectionRegistry::new();
        let (handle, mut rx) = registry.register(ConnectionKind::Client, &config_with_capacity(1));
        handle.send_timeout(binary(1), Duration::from_millis(50)).await.unwrap();
        let err = handle.send_timeout(binary(2), Duration::from_millis(20)).await.unwrap_err();
        assert_eq!(err, SendError::Timeout);
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            drop(rx);
            first
        });
        assert_eq!(reader.await.unwrap(), Some(binary(1)));
        let err = handle.send_timeout(binary(3), Duration::from_millis(20)).await.unwrap_err();
        assert_eq!(err, SendError::Disconnected);
    }

    #[test]
    fn ac04_count_tracks_register_and_remove() {
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
    fn ac15_broadcast_reaches_one_kind_and_skips_full_channels_without_blocking() {
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

    #[test]
    fn a_queue_slot_is_no_larger_than_its_payload() {
        // Each connection's queue allocates its slots up front (32 at a time), idle or not.
        assert_eq!(std::mem::size_of::<OutboundMessage>(), std::mem::size_of::<Bytes>());
    }

    #[tokio::test]
    async fn the_receiver_hands_out_messages_and_its_drop_counts_what_it_still_held() {
        let registry = ConnectionRegistry::new();
        let (handle, mut rx) =
            registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        for byte in 1..=3 {
            assert!(handle.try_send(binary(byte)));
        }
        assert_eq!(rx.len(), 3);
        assert_eq!(rx.recv().await, Some(binary(1)));
        drop(rx);
        assert!(!handle.is_connected());
        assert_eq!(handle.dropped_messages(), 2, "the two messages never read");
        assert_eq!(handle.try_enqueue(binary(4)), Err(SendError::Disconnected));
        assert_eq!(registry.dropped_messages_total(), 3);
    }

    #[test]
    fn metadata_starts_unauthenticated() {
        let registry = ConnectionRegistry::new();
        let (handle, _rx) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let meta = handle.metadata.try_read().unwrap();
        assert!(!meta.authenticated && meta.principal.is_none() && meta.subscriptions.is_empty());
    }
}
