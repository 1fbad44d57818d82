//! handle → **channel** → queue: the two ends of one connection's outbound queue.
//!
//! [`OutboundSender`] (a connection's [`tx`](crate::network::ConnectionHandle::tx)) and
//! [`OutboundReceiver`] (what [`register`](crate::network::ConnectionRegistry::register)
//! returns) are shaped like tokio's `mpsc::Sender` and `mpsc::Receiver`: the same method names,
//! signatures and error types (`tokio::sync::mpsc::error::*`), so code written against a tokio
//! channel compiles against them. They are the crate's own types because every message passes
//! the transport's accounting on its way in, whichever method sends it:
//!
//! - a message over [`ConnectionConfig::max_outbound_message_size`] is refused and counted as
//!   dropped, never queued;
//! - a message that finds the queue full (at once, or after the wait of `send_timeout`) counts
//!   as dropped and towards the `1013` slow-consumer close after `max_consecutive_drops` in a row;
//! - a message offered to a closed connection counts as undelivered.
//!
//! The queue behind them ([`OutboundQueue`]) allocates nothing while it is empty, where tokio's
//! channel holds a block of 32 slots per connection from the start.
//!
//! ```
//! use tokio::sync::mpsc::error::TrySendError;
//! use topgun_server::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry, OutboundMessage};
//!
//! let registry = ConnectionRegistry::new();
//! let config = ConnectionConfig { outbound_channel_capacity: 1, ..Default::default() };
//! let (conn, mut rx) = registry.register(ConnectionKind::Client, &config);
//! assert_eq!(conn.tx.max_capacity(), 1);
//! conn.tx.try_send(OutboundMessage::Binary(vec![1].into())).unwrap();
//! assert!(matches!(
//!     conn.tx.try_send(OutboundMessage::Binary(vec![2].into())),
//!     Err(TrySendError::Full(_))
//! ));
//! assert_eq!(conn.dropped_messages(), 1, "the refused message is counted");
//! assert_eq!(rx.try_recv(), Ok(OutboundMessage::Binary(vec![1].into())));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::error::{
    SendError as ChannelClosed, SendTimeoutError, TryRecvError, TrySendError,
};
use tokio::time::Instant;

use crate::network::close::{self, CloseRequest};
use crate::network::config::ConnectionConfig;
use crate::network::connection::{ConnectionId, DisconnectReason, SendError};
use crate::network::connections::queue::{OutboundMessage, OutboundQueue, Refused};

/// Most priority messages waiting at once for one connection.
pub(crate) const PRIORITY_CAPACITY: usize = 16;

/// One connection's queue with its accounting, shared by its senders and its receiver.
#[derive(Debug)]
pub(crate) struct Outbound {
    id: ConnectionId,
    queue: OutboundQueue,
    /// Live [`OutboundSender`]s; the queue shuts when the last one goes, as a tokio channel does.
    senders: AtomicUsize,
    /// Boxed: set at most once, at the end of a connection's life, and read on every frame.
    close_request: OnceLock<Box<CloseRequest>>,
    disconnect_reason: OnceLock<DisconnectReason>,
    max_message_size: usize,
    dropped: AtomicU64,
    /// The registry-wide drop count, shared by every connection of one registry.
    registry_dropped: Arc<AtomicU64>,
    consecutive_drops: AtomicU32,
    max_consecutive_drops: u32,
}

/// A refused message with the reason, handed back to the caller.
type Refusal = (SendError, OutboundMessage);

impl Outbound {
    pub(crate) fn new(
        id: ConnectionId,
        config: &ConnectionConfig,
        registry_dropped: Arc<AtomicU64>,
    ) -> Self {
        Self {
            id,
            queue: OutboundQueue::new(config.outbound_channel_capacity, PRIORITY_CAPACITY),
            senders: AtomicUsize::new(0),
            close_request: OnceLock::new(),
            disconnect_reason: OnceLock::new(),
            max_message_size: config.max_outbound_message_size,
            dropped: AtomicU64::new(0),
            registry_dropped,
            consecutive_drops: AtomicU32::new(0),
            max_consecutive_drops: config.max_consecutive_drops.max(1),
        }
    }

    pub(crate) fn id(&self) -> ConnectionId {
        self.id
    }

    pub(crate) fn queue(&self) -> &OutboundQueue {
        &self.queue
    }

    /// Reads the fields a send reads first (see [`ConnectionHandle::preload`]).
    ///
    /// [`ConnectionHandle::preload`]: crate::network::connections::handle::ConnectionHandle::preload
    pub(crate) fn preload(&self) {
        std::hint::black_box(self.max_message_size);
        std::hint::black_box(self.consecutive_drops.load(Ordering::Relaxed));
        std::hint::black_box(self.close_request.get().is_some());
        self.queue.preload();
    }

    /// Queues `message` without waiting.
    pub(crate) fn try_enqueue(&self, message: OutboundMessage) -> Result<(), Refusal> {
        self.try_enqueue_as(message, true)
    }

    /// [`try_enqueue`](Self::try_enqueue); with `direct` false, never written to the socket by
    /// the sender (see [`OutboundQueue::push_as`]).
    pub(crate) fn try_enqueue_as(
        &self,
        message: OutboundMessage,
        direct: bool,
    ) -> Result<(), Refusal> {
        let message = self.admit(message)?;
        self.settle(self.queue.push_as(message, direct), SendError::Full)
    }

    /// Queues `message`, waiting for space until `deadline` (for ever without one).
    pub(crate) async fn enqueue_until(
        &self,
        message: OutboundMessage,
        deadline: Option<Instant>,
    ) -> Result<(), Refusal> {
        let message = self.admit(message)?;
        self.settle(self.queue.push_waiting(message, deadline).await, SendError::Timeout)
    }

    /// Queues a priority payload (a frame of its own, ahead of queued messages).
    pub(crate) fn enqueue_priority(&self, payload: Bytes) -> Result<(), SendError> {
        self.check_size(payload.len())?;
        let queued = self.queue.push_priority(payload).map_err(|refused| (refused, ()));
        self.settle(queued, SendError::Full).map_err(|(error, ())| error)
    }

    /// Hands `message` back refused when it is a data message over the outbound limit.
    fn admit(&self, message: OutboundMessage) -> Result<OutboundMessage, Refusal> {
        let size = match &message {
            OutboundMessage::Binary(payload) => payload.len(),
            OutboundMessage::Text(text) => text.len(),
            OutboundMessage::Close(_) => return Ok(message),
        };
        match self.check_size(size) {
            Ok(()) => Ok(message),
            Err(error) => Err((error, message)),
        }
    }

    /// Refuses (and counts) a payload over the outbound limit.
    fn check_size(&self, size: usize) -> Result<(), SendError> {
        let limit = self.max_message_size;
        if size <= limit {
            return Ok(());
        }
        self.record_undelivered(1);
        tracing::warn!(conn_id = %self.id, size, limit, "outbound message over the limit refused");
        Err(SendError::TooLarge { size, limit })
    }

    /// Counts a refused message: a drop (towards the 1013 close) when the queue was full, then
    /// reported as `full`; undelivered when the connection was closed.
    fn settle<T>(
        &self,
        queued: Result<(), (Refused, T)>,
        full: SendError,
    ) -> Result<(), (SendError, T)> {
        match queued {
            Ok(()) => {
                // Read first: the common case (no drops) then never writes the shared line.
                if self.consecutive_drops.load(Ordering::Relaxed) != 0 {
                    self.consecutive_drops.store(0, Ordering::Relaxed);
                }
                Ok(())
            }
            Err((Refused::Full, message)) => {
                self.record_drop();
                Err((full, message))
            }
            Err((Refused::Closed, message)) => {
                self.record_undelivered(1);
                Err((SendError::Disconnected, message))
            }
        }
    }

    fn record_drop(&self) {
        self.record_undelivered(1);
        let in_a_row = self.consecutive_drops.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= self.max_consecutive_drops && self.close_request.get().is_none() {
            tracing::info!(conn_id = %self.id, dropped = in_a_row, "closing slow consumer");
            self.close_because(
                DisconnectReason::SlowConsumer,
                close::TRY_AGAIN_LATER,
                format!("slow consumer: {in_a_row} messages dropped; reconnect and resync"),
            );
        }
    }

    /// Counts messages that were handed to this connection but will never reach the client.
    pub(crate) fn record_undelivered(&self, count: u64) {
        self.dropped.fetch_add(count, Ordering::Relaxed);
        self.registry_dropped.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn close_because(&self, why: DisconnectReason, code: u16, reason: String) {
        self.request_close(why, CloseRequest { code, reason, after_queue: false });
    }

    /// Like [`close_because`](Self::close_because), the close frame going after what is
    /// queued.
    pub(crate) fn close_after_queue(&self, why: DisconnectReason, code: u16, reason: String) {
        self.request_close(why, CloseRequest { code, reason, after_queue: true });
    }

    fn request_close(&self, why: DisconnectReason, request: CloseRequest) {
        if self.close_request.set(Box::new(request)).is_ok() {
            self.note_disconnect(why);
            // Nothing sent from now on may reach the client ahead of the close frame.
            self.queue.stop_direct();
            self.queue.wake_consumer();
        }
    }

    pub(crate) fn close_request(&self) -> Option<&CloseRequest> {
        self.close_request.get().map(|request| &**request)
    }

    pub(crate) fn note_disconnect(&self, reason: DisconnectReason) {
        let _ = self.disconnect_reason.set(reason);
    }

    pub(crate) fn disconnect_reason(&self) -> Option<DisconnectReason> {
        self.disconnect_reason.get().copied()
    }

    /// Closes the queue (later sends fail) and counts what it still held as undelivered.
    pub(crate) fn close(&self) {
        let undelivered = self.queue.close();
        if undelivered > 0 {
            tracing::debug!(conn_id = %self.id, undelivered, "messages still queued at close");
            self.record_undelivered(undelivered);
        }
    }
}

/// The sending end of a connection's outbound queue: [`ConnectionHandle::tx`].
///
/// Offers tokio's `mpsc::Sender<OutboundMessage>` methods with their signatures and error types
/// ([`try_send`](Self::try_send), [`send`](Self::send), [`send_timeout`](Self::send_timeout),
/// [`reserve`](Self::reserve), [`capacity`](Self::capacity),
/// [`max_capacity`](Self::max_capacity), [`is_closed`](Self::is_closed),
/// [`closed`](Self::closed), `Clone`). Every message is counted as
/// [`ConnectionHandle::try_send`](crate::network::ConnectionHandle::try_send) counts it (see
/// the module documentation); a message over the outbound size limit, which no tokio channel
/// has, is refused as `Closed` (it can never be sent on this connection).
///
/// [`ConnectionHandle::tx`]: crate::network::ConnectionHandle::tx
pub struct OutboundSender {
    outbound: Arc<Outbound>,
}

impl OutboundSender {
    pub(crate) fn new(outbound: Arc<Outbound>) -> Self {
        outbound.senders.fetch_add(1, Ordering::Relaxed);
        Self { outbound }
    }

    pub(crate) fn outbound(&self) -> &Arc<Outbound> {
        &self.outbound
    }

    /// Queues `message` without waiting, as tokio's `Sender::try_send`.
    ///
    /// # Errors
    ///
    /// `TrySendError::Full` when the queue is full (a drop, towards the `1013` close),
    /// `TrySendError::Closed` when the connection is closed or the message is over
    /// `max_outbound_message_size`; either way the message is handed back.
    pub fn try_send(&self, message: OutboundMessage) -> Result<(), TrySendError<OutboundMessage>> {
        self.outbound.try_enqueue(message).map_err(|(error, message)| match error {
            SendError::Full => TrySendError::Full(message),
            _ => TrySendError::Closed(message),
        })
    }

    /// Queues `message`, waiting for space as long as it takes, as tokio's `Sender::send`.
    ///
    /// # Errors
    ///
    /// tokio's `SendError` with the message when the connection is closed (or closes while
    /// waiting) or the message is over `max_outbound_message_size`.
    pub async fn send(
        &self,
        message: OutboundMessage,
    ) -> Result<(), ChannelClosed<OutboundMessage>> {
        self.outbound
            .enqueue_until(message, None)
            .await
            .map_err(|(_, message)| ChannelClosed(message))
    }

    /// Queues `message`, waiting up to `timeout` for space, as tokio's `Sender::send_timeout`.
    ///
    /// # Errors
    ///
    /// `SendTimeoutError::Timeout` when the queue stayed full (a drop, towards the `1013`
    /// close), `SendTimeoutError::Closed` when the connection is closed or the message is over
    /// `max_outbound_message_size`; either way the message is handed back.
    pub async fn send_timeout(
        &self,
        message: OutboundMessage,
        timeout: Duration,
    ) -> Result<(), SendTimeoutError<OutboundMessage>> {
        let deadline = Instant::now() + timeout;
        self.outbound.enqueue_until(message, Some(deadline)).await.map_err(|(error, message)| {
            match error {
                SendError::Timeout => SendTimeoutError::Timeout(message),
                _ => SendTimeoutError::Closed(message),
            }
        })
    }

    /// Waits for a free slot and holds it for one message, as tokio's `Sender::reserve`.
    ///
    /// # Errors
    ///
    /// tokio's `SendError(())` when the connection is closed.
    pub async fn reserve(&self) -> Result<OutboundPermit<'_>, ChannelClosed<()>> {
        match self.outbound.queue.reserve_waiting(None).await {
            Ok(()) => Ok(OutboundPermit { outbound: &self.outbound, used: false }),
            Err(_) => Err(ChannelClosed(())),
        }
    }

    /// Slots free right now (the capacity less queued messages and reserved slots).
    pub fn capacity(&self) -> usize {
        self.outbound.queue.available()
    }

    /// The queue's capacity: `ConnectionConfig::outbound_channel_capacity`.
    pub fn max_capacity(&self) -> usize {
        self.outbound.queue.capacity()
    }

    /// Whether the receiving end has closed (the connection ended); later sends fail.
    pub fn is_closed(&self) -> bool {
        self.outbound.queue.is_closed()
    }

    /// Completes once the receiving end has closed.
    pub async fn closed(&self) {
        self.outbound.queue.closed().await;
    }

    /// Whether both senders feed the same connection's queue.
    pub fn same_channel(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.outbound, &other.outbound)
    }
}

impl Clone for OutboundSender {
    fn clone(&self) -> Self {
        Self::new(Arc::clone(&self.outbound))
    }
}

impl Drop for OutboundSender {
    fn drop(&mut self) {
        if self.outbound.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last sender: the receiver drains what is queued, then sees the end.
            self.outbound.queue.shut();
        }
    }
}

impl fmt::Debug for OutboundSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSender")
            .field("conn_id", &self.outbound.id)
            .field("queued", &self.outbound.queue.len())
            .field("max_capacity", &self.max_capacity())
            .finish_non_exhaustive()
    }
}

/// One slot held by [`OutboundSender::reserve`]; dropping it unused gives the slot back.
#[derive(Debug)]
pub struct OutboundPermit<'a> {
    outbound: &'a Outbound,
    used: bool,
}

impl OutboundPermit<'_> {
    /// Queues `message` in the held slot, as tokio's `Permit::send`. A message over
    /// `max_outbound_message_size`, or one sent after the connection closed, is counted as
    /// dropped instead.
    pub fn send(mut self, message: OutboundMessage) {
        self.used = true;
        let outbound = self.outbound;
        match outbound.admit(message) {
            Ok(message) => {
                let _ = outbound.settle(outbound.queue.push_reserved(message), SendError::Full);
            }
            Err(_) => outbound.queue.release_reserved(),
        }
    }
}

impl Drop for OutboundPermit<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.outbound.queue.release_reserved();
        }
    }
}

/// The receiving end of a connection's outbound queue, for code that writes a connection's
/// messages itself; [`ConnectionRegistry::register`](crate::network::ConnectionRegistry::register)
/// returns it.
///
/// Offers tokio's `mpsc::Receiver<OutboundMessage>` methods with their signatures:
/// [`recv`](Self::recv), [`try_recv`](Self::try_recv) (tokio's `TryRecvError`),
/// [`recv_many`](Self::recv_many), [`poll_recv`](Self::poll_recv), [`close`](Self::close),
/// [`len`](Self::len), [`is_empty`](Self::is_empty), [`is_closed`](Self::is_closed),
/// [`capacity`](Self::capacity), [`max_capacity`](Self::max_capacity).
///
/// Priority messages ([`ConnectionHandle::try_send_priority`]) come out first, as
/// [`OutboundMessage::Binary`]. [`close`](Self::close) refuses later sends and leaves what is
/// queued to be received; dropping the receiver closes the queue and counts whatever it still
/// held as dropped. Once every sender is gone (the handle has been dropped everywhere),
/// [`recv`](Self::recv) returns what is left and then `None`.
///
/// [`ConnectionHandle::try_send_priority`]: crate::network::ConnectionHandle::try_send_priority
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
    outbound: Arc<Outbound>,
}

impl OutboundReceiver {
    pub(crate) fn new(outbound: Arc<Outbound>) -> Self {
        Self { outbound }
    }

    /// The next message, waiting for one; `None` once the queue is closed and empty.
    pub async fn recv(&mut self) -> Option<OutboundMessage> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Waits for at least one message, then moves up to `limit` queued messages into
    /// `buffer`; returns how many it moved, `0` once the queue is closed and empty (or for a
    /// `limit` of 0).
    pub async fn recv_many(&mut self, buffer: &mut Vec<OutboundMessage>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let Some(first) = self.recv().await else { return 0 };
        buffer.push(first);
        let mut moved = 1;
        while moved < limit {
            let Some(next) = self.outbound.queue.try_next() else { break };
            buffer.push(next);
            moved += 1;
        }
        moved
    }

    /// Polls for the next message: `Ready(None)` once the queue is closed and empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<OutboundMessage>> {
        self.outbound.queue.poll_next(cx)
    }

    /// The next message if one is queued.
    ///
    /// # Errors
    ///
    /// `TryRecvError::Empty` when nothing is queued, `TryRecvError::Disconnected` when the
    /// queue is closed and empty.
    pub fn try_recv(&mut self) -> Result<OutboundMessage, TryRecvError> {
        let queue = &self.outbound.queue;
        match queue.try_next() {
            Some(message) => Ok(message),
            None if queue.is_closed() => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Refuses later sends; what is already queued can still be received.
    pub fn close(&mut self) {
        self.outbound.queue.shut();
    }

    /// Whether the queue is closed: by [`close`](Self::close), the connection's end, or the
    /// last sender going.
    pub fn is_closed(&self) -> bool {
        self.outbound.queue.is_closed()
    }

    /// Messages queued (priority messages not counted).
    pub fn len(&self) -> usize {
        self.outbound.queue.len()
    }

    /// Whether no message is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots free right now.
    pub fn capacity(&self) -> usize {
        self.outbound.queue.available()
    }

    /// The queue's capacity.
    pub fn max_capacity(&self) -> usize {
        self.outbound.queue.capacity()
    }
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        self.outbound.close();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::network::{ConnectionKind, ConnectionRegistry};

    pub(crate) fn config_with_capacity(capacity: usize) -> ConnectionConfig {
        ConnectionConfig { outbound_channel_capacity: capacity, ..Default::default() }
    }

    pub(crate) fn binary(byte: u8) -> OutboundMessage {
        OutboundMessage::Binary(Bytes::from(vec![byte]))
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
    fn a_queue_slot_is_a_payload_and_a_tag() {
        // A queue allocates its slots 32 at a time while it holds messages: a slot is one
        // shared payload, plus the tag that tells binary from text.
        assert!(std::mem::size_of::<OutboundMessage>() <= std::mem::size_of::<Bytes>() + 8);
    }

    #[test]
    fn metadata_starts_unauthenticated() {
        let registry = ConnectionRegistry::new();
        let (handle, _rx) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let meta = handle.metadata.try_read().unwrap();
        assert!(!meta.authenticated && meta.principal.is_none() && meta.subscriptions.is_empty());
    }

    #[tokio::test]
    async fn every_sender_method_counts_like_try_send() {
        let registry = ConnectionRegistry::new();
        let config = ConnectionConfig {
            max_outbound_message_size: 4,
            max_consecutive_drops: 3,
            ..config_with_capacity(1)
        };
        let (conn, mut rx) = registry.register(ConnectionKind::Client, &config);
        let tx = conn.tx.clone();
        let too_large = OutboundMessage::Binary(Bytes::from_static(b"12345"));
        assert!(
            matches!(tx.try_send(too_large.clone()), Err(TrySendError::Closed(m)) if m == too_large)
        );
        assert!(matches!(tx.send(too_large.clone()).await, Err(ChannelClosed(_))));
        assert_eq!(conn.dropped_messages(), 2, "over the size limit, whichever method");
        assert!(conn.close_request().is_none(), "size refusals do not count towards 1013");

        tx.send(binary(1)).await.unwrap();
        assert!(matches!(tx.try_send(binary(2)), Err(TrySendError::Full(m)) if m == binary(2)));
        let timed_out = tx.send_timeout(binary(3), Duration::from_millis(10)).await;
        assert!(matches!(timed_out, Err(SendTimeoutError::Timeout(m)) if m == binary(3)));
        assert_eq!(conn.dropped_messages(), 4);
        assert!(!conn.try_send(binary(4)));
        assert_eq!(conn.close_request().map(|r| r.code), Some(1013), "three full in a row");

        assert_eq!(rx.try_recv(), Ok(binary(1)));
        drop(rx);
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(binary(5)), Err(TrySendError::Closed(_))));
        assert_eq!(conn.dropped_messages(), 6, "offered after the close");
        assert_eq!(registry.dropped_messages_total(), 6);
    }

    #[tokio::test]
    async fn a_permit_holds_its_slot_and_gives_it_back_unused() {
        let registry = ConnectionRegistry::new();
        let (conn, mut rx) = registry.register(ConnectionKind::Client, &config_with_capacity(2));
        assert_eq!((conn.tx.capacity(), conn.tx.max_capacity()), (2, 2));
        let permit = conn.tx.reserve().await.unwrap();
        assert_eq!(conn.tx.capacity(), 1);
        assert!(conn.try_send(binary(1)));
        assert!(!conn.try_send(binary(2)), "the reserved slot is not free for others");
        permit.send(binary(3));
        assert_eq!((rx.try_recv(), rx.try_recv()), (Ok(binary(1)), Ok(binary(3))));
        drop(conn.tx.reserve().await.unwrap());
        assert_eq!(conn.tx.capacity(), 2, "an unused permit gives its slot back");
    }

    #[tokio::test]
    async fn a_waiting_send_gets_in_when_the_receiver_drains() {
        let registry = ConnectionRegistry::new();
        let (conn, mut rx) = registry.register(ConnectionKind::Client, &config_with_capacity(1));
        conn.tx.send(binary(1)).await.unwrap();
        let tx = conn.tx.clone();
        let waiting = tokio::spawn(async move { tx.send(binary(2)).await });
        let mut buffer = Vec::new();
        assert_eq!(rx.recv_many(&mut buffer, 8).await, 1);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
        assert_eq!(rx.recv_many(&mut buffer, 8).await, 1);
        assert_eq!(buffer, [binary(1), binary(2)]);
        assert_eq!(conn.dropped_messages(), 0);
    }

    #[tokio::test]
    async fn close_refuses_senders_and_leaves_the_queue_to_drain() {
        let registry = ConnectionRegistry::new();
        let (conn, mut rx) = registry.register(ConnectionKind::Client, &config_with_capacity(4));
        assert!(conn.try_send(binary(1)));
        let closed = tokio::spawn({
            let tx = conn.tx.clone();
            async move { tx.closed().await }
        });
        rx.close();
        assert!(rx.is_closed() && conn.tx.is_closed() && !conn.is_connected());
        tokio::time::timeout(Duration::from_secs(5), closed).await.unwrap().unwrap();
        assert!(!conn.try_send(binary(2)));
        assert_eq!(rx.recv().await, Some(binary(1)), "queued before the close");
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(conn.dropped_messages(), 1, "only the message offered after the close");
    }

    #[tokio::test]
    async fn the_receiver_ends_once_every_sender_is_gone() {
        let registry = ConnectionRegistry::new();
        let (conn, mut rx) = registry.register(ConnectionKind::Client, &config_with_capacity(4));
        let extra = conn.tx.clone();
        assert!(extra.same_channel(&conn.tx));
        assert!(conn.try_send(binary(1)));
        registry.remove(conn.id);
        drop(conn);
        assert_eq!(rx.try_recv(), Ok(binary(1)));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty), "a clone still sends");
        drop(extra);
        let next = std::future::poll_fn(|cx| Poll::Ready(rx.poll_recv(cx))).await;
        assert_eq!(next, Poll::Ready(None));
    }
}
