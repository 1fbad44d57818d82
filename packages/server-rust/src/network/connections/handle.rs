//! **handle** → channel → queue: one live connection as the rest of the server sees it.
//!
//! Other parts of the server hold an [`Arc<ConnectionHandle>`] and push [`OutboundMessage`]s
//! into it; the connection's task drains the queue onto the socket. A full queue means the
//! client is not keeping up: callers choose between dropping ([`ConnectionHandle::try_send`])
//! and waiting ([`ConnectionHandle::send_timeout`]), so one slow client never stalls the others.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Extensions;
use tokio::sync::RwLock;
use topgun_core::Principal;

use crate::network::close::CloseRequest;
use crate::network::connection::{
    ConnectionId, ConnectionKind, ConnectionMetadata, DisconnectReason, SendError,
};
use crate::network::connections::channel::{Outbound, OutboundSender, PRIORITY_CAPACITY};
use crate::network::connections::queue::{OutboundMessage, OutboundQueue};

/// A live connection as the rest of the server sees it: an id, an outbound queue and metadata.
///
/// ```
/// use topgun_server::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry, OutboundMessage};
///
/// let registry = ConnectionRegistry::new();
/// let (handle, mut outbound) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
/// assert!(handle.try_send(OutboundMessage::Binary(vec![1, 2, 3].into())));
/// assert_eq!(handle.tx.max_capacity(), 256);
/// assert_eq!(outbound.try_recv().unwrap(), OutboundMessage::Binary(vec![1, 2, 3].into()));
/// ```
#[derive(Debug)]
pub struct ConnectionHandle {
    /// The connection's id.
    pub id: ConnectionId,
    /// The sending end of the connection's bounded outbound queue, with tokio's
    /// `mpsc::Sender` methods ([`OutboundSender`]). Every message sent through it is counted
    /// like one sent with [`try_send`](Self::try_send).
    pub tx: OutboundSender,
    /// Application-level state; an async lock because handlers hold it across awaits.
    pub metadata: Arc<RwLock<ConnectionMetadata>>,
    /// When the connection was registered.
    pub connected_at: Instant,
    /// Client or cluster peer.
    pub kind: ConnectionKind,
    /// The client's address, as `ClientAddr` resolved it.
    peer: Option<SocketAddr>,
    state: ConnectionState,
    /// State of the server's own, by type; see [`insert_extension`](Self::insert_extension).
    extensions: Mutex<Extensions>,
    /// Most topics the connection may be subscribed to (`max_topics_per_connection`).
    max_topics: u32,
}

/// Transport-internal per-connection state, kept out of the metadata lock because the read and
/// write paths touch it on every frame.
#[derive(Debug, Default)]
pub(crate) struct ConnectionState {
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
    /// Still behind after a `broadcast_cooperative` waited its longest for it: later
    /// broadcasts do not wait for this connection again until it has caught up.
    pub(crate) slow_for_broadcasts: AtomicBool,
    /// Reading is paused by the inbound message budget: the silence is the server's doing.
    throttled: AtomicBool,
    /// When the engine's clock should next wake the connection's task: 1 + milliseconds
    /// after `connected_at`, rounded up; 0 when nothing is due.
    wake_at_ms: AtomicU64,
}

impl ConnectionHandle {
    pub(crate) fn new(
        kind: ConnectionKind,
        outbound: Arc<Outbound>,
        peer: Option<SocketAddr>,
        max_topics: u32,
    ) -> Self {
        Self {
            id: outbound.id(),
            tx: OutboundSender::new(outbound),
            metadata: Arc::new(RwLock::new(ConnectionMetadata::default())),
            connected_at: Instant::now(),
            kind,
            peer,
            state: ConnectionState::default(),
            extensions: Mutex::new(Extensions::new()),
            max_topics,
        }
    }

    /// Most topics this connection may be subscribed to at once.
    pub(crate) fn max_topics(&self) -> usize {
        self.max_topics as usize
    }

    /// Stores `value` with the connection, by its type, replacing (and returning) one stored
    /// before: per-connection state of the server's own (a device id, a session, whether its
    /// handshake completed), as [`http::Extensions`] carries it for a request. Readable
    /// wherever the handle is (a handler, a registry lookup, a topic's subscriber); dropped
    /// once the connection has ended, after every disconnect listener has run.
    ///
    /// ```
    /// use topgun_server::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry};
    ///
    /// #[derive(Clone, Debug, PartialEq)]
    /// struct DeviceId(String);
    ///
    /// let registry = ConnectionRegistry::new();
    /// let (conn, _queue) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
    /// conn.insert_extension(DeviceId("phone-7".into()));
    /// let found = registry.get(conn.id).unwrap();
    /// assert_eq!(found.extension::<DeviceId>(), Some(DeviceId("phone-7".into())));
    /// ```
    pub fn insert_extension<T: Clone + Send + Sync + 'static>(&self, value: T) -> Option<T> {
        self.with_extensions(|extensions| extensions.insert(value))
    }

    /// A copy of the value of type `T` stored with [`insert_extension`](Self::insert_extension)
    /// (store an `Arc` to share a large one).
    pub fn extension<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.with_extensions(|extensions| extensions.get::<T>().cloned())
    }

    /// Removes and returns the value of type `T`.
    pub fn remove_extension<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.with_extensions(Extensions::remove::<T>)
    }

    /// Runs `f` on the connection's extensions, to read or change values in place. Keep it
    /// short: the extensions are locked (not across an await) while it runs.
    pub fn with_extensions<R>(&self, f: impl FnOnce(&mut Extensions) -> R) -> R {
        let mut extensions = self.extensions.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut extensions)
    }

    /// Drops every extension: the connection has ended.
    pub(crate) fn clear_extensions(&self) {
        let cleared =
            std::mem::take(&mut *self.extensions.lock().unwrap_or_else(PoisonError::into_inner));
        // Dropped outside the lock: a value's `Drop` may look at the handle again.
        drop(cleared);
    }

    fn outbound(&self) -> &Outbound {
        self.tx.outbound()
    }

    pub(crate) fn state(&self) -> &ConnectionState {
        &self.state
    }

    /// Queues `msg` without waiting. Returns `false` if the queue is full or the connection is
    /// closed; the message is then dropped.
    pub fn try_send(&self, msg: OutboundMessage) -> bool {
        self.try_enqueue(msg).is_ok()
    }

    /// [`try_send`](Self::try_send), for a broadcast: written to the socket by the caller only
    /// if `direct` (see [`OutboundQueue::push_as`]).
    pub(crate) fn try_send_as(&self, msg: OutboundMessage, direct: bool) -> bool {
        self.outbound().try_enqueue_as(msg, direct).is_ok()
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
    ///
    /// [`ConnectionConfig::max_outbound_message_size`]: crate::network::ConnectionConfig::max_outbound_message_size
    pub fn try_enqueue(&self, msg: OutboundMessage) -> Result<(), SendError> {
        self.outbound().try_enqueue(msg).map_err(|(error, _)| error)
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
    /// `ConnectionConfig::max_outbound_message_size`.
    pub fn try_send_priority(&self, payload: impl Into<Bytes>) -> Result<(), SendError> {
        self.outbound().enqueue_priority(payload.into())
    }

    /// Most [`try_send_priority`](Self::try_send_priority) messages waiting at once for one
    /// connection.
    pub const PRIORITY_CAPACITY: usize = PRIORITY_CAPACITY;

    /// Reads what a broadcast reads of the handle first, and discards it: a load started
    /// early, so that the cache line is there when the broadcast reaches this connection.
    /// With thousands of connections their state is out of cache, and a broadcast that waits
    /// for each line in turn stalls several times per connection; touched a connection or two
    /// ahead, the lines arrive while the system call for the connection before is running.
    pub(crate) fn preload(&self) {
        std::hint::black_box(self.kind);
        std::hint::black_box(self.state.accepting_broadcasts.load(Ordering::Relaxed));
    }

    /// [`preload`](Self::preload) for the connection's queue, once the handle is in cache.
    pub(crate) fn preload_queue(&self) {
        self.outbound().preload();
    }

    /// The connection's queue, for the engine.
    pub(crate) fn queue(&self) -> &OutboundQueue {
        self.outbound().queue()
    }

    /// Closes the queue (later sends fail) and counts what it still held as undelivered.
    pub(crate) fn close_queue(&self) {
        self.outbound().close();
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
        self.state.authenticated.store(true, Ordering::Release);
    }

    /// Whether [`authenticate`](Self::authenticate) has been called; never waits.
    pub fn is_authenticated(&self) -> bool {
        self.state.authenticated.load(Ordering::Acquire)
    }

    /// Whether broadcasts reach this connection yet (after its `on_connect`).
    pub(crate) fn accepts_broadcasts(&self) -> bool {
        self.state.accepting_broadcasts.load(Ordering::Acquire)
    }

    /// Lets broadcasts reach this connection from now on.
    pub(crate) fn accept_broadcasts(&self) {
        self.state.accepting_broadcasts.store(true, Ordering::Release);
    }

    pub(crate) fn set_handler_busy(&self, busy: bool) {
        self.state.handler_busy.store(busy, Ordering::Relaxed);
    }

    /// Whether an inbound handler call for this connection is running.
    pub(crate) fn handler_busy(&self) -> bool {
        self.state.handler_busy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_throttled(&self, throttled: bool) {
        self.state.throttled.store(throttled, Ordering::Relaxed);
    }

    /// Whether the inbound message budget has paused reading.
    pub(crate) fn throttled(&self) -> bool {
        self.state.throttled.load(Ordering::Relaxed)
    }

    /// The client's address: the TCP peer, or behind trusted proxies the client they named
    /// (port 0 when a forwarded header named it; see [`ClientAddr`]). `None` for connections
    /// registered without one ([`ConnectionRegistry::register`], `handle_socket`).
    ///
    /// [`ClientAddr`]: crate::network::ClientAddr
    /// [`ConnectionRegistry::register`]: crate::network::ConnectionRegistry::register
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Counts messages that were handed to this connection but will never reach the client
    /// (queued when it closed, or offered after it closed).
    pub(crate) fn record_undelivered(&self, count: u64) {
        self.outbound().record_undelivered(count);
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
        self.outbound().close_because(why, code, reason.into());
    }

    /// Like [`close_because`](Self::close_because), but the close frame goes out after what
    /// is queued, as [`OutboundMessage::Close`] does.
    pub(crate) fn close_after_queue(&self, why: DisconnectReason, code: u16, reason: String) {
        self.outbound().close_after_queue(why, code, reason);
    }

    /// Records why the connection is ending; the first reason recorded wins.
    pub(crate) fn note_disconnect(&self, reason: DisconnectReason) {
        self.outbound().note_disconnect(reason);
    }

    /// Why the connection ended: the first reason recorded, or the client leaving.
    pub(crate) fn disconnect_reason(&self) -> DisconnectReason {
        self.outbound().disconnect_reason().unwrap_or(DisconnectReason::ClientClose)
    }

    /// Messages handed to this connection that never reached the client: dropped on a full
    /// queue, still queued when it closed, or offered after it closed.
    pub fn dropped_messages(&self) -> u64 {
        self.outbound().dropped()
    }

    /// When the last frame (of any kind, pongs included) arrived from the client.
    pub fn last_activity(&self) -> Instant {
        self.connected_at
            + Duration::from_millis(self.state.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Records inbound activity; called for every frame read.
    pub(crate) fn touch(&self) {
        let elapsed = u64::try_from(self.connected_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.state.last_activity_ms.store(elapsed, Ordering::Relaxed);
    }

    /// Asks the engine's clock to wake the connection's task once `at` has come (`None`:
    /// nothing is due).
    pub(crate) fn wake_at(&self, at: Option<tokio::time::Instant>) {
        let encoded = at.map_or(0, |at| {
            let after = at.into_std().saturating_duration_since(self.connected_at);
            u64::try_from(after.as_millis()).unwrap_or(u64::MAX - 1) + 1
        });
        self.state.wake_at_ms.store(encoded, Ordering::Relaxed);
    }

    /// Whether the instant last given to [`wake_at`](Self::wake_at) has come by `now`.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        let encoded = self.state.wake_at_ms.load(Ordering::Relaxed);
        encoded != 0
            && now.saturating_duration_since(self.connected_at).as_millis() >= u128::from(encoded)
    }

    /// Messages waiting in the outbound queue (not counting priority messages); 0 once the
    /// connection's writer has gone.
    pub fn queued(&self) -> usize {
        self.queue().len()
    }

    pub(crate) fn close_request(&self) -> Option<&CloseRequest> {
        self.outbound().close_request()
    }

    /// Queues `msg`, waiting up to `timeout` for space.
    ///
    /// # Errors
    ///
    /// [`SendError::Timeout`] if the queue stayed full (counted as a drop, like a full queue
    /// for [`try_send`](Self::try_send)), [`SendError::Disconnected`] if the connection
    /// closed, [`SendError::TooLarge`] for a message over the outbound limit.
    pub async fn send_timeout(
        &self,
        msg: OutboundMessage,
        timeout: Duration,
    ) -> Result<(), SendError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.outbound().enqueue_until(msg, Some(deadline)).await.map_err(|(error, _)| error)
    }

    /// Whether the connection's writer is still reading the queue.
    pub fn is_connected(&self) -> bool {
        !self.tx.is_closed()
    }
}
