//! `GET /ws`: one reader loop and one writer task per WebSocket connection.
//!
//! The reader hands binary messages to the [`InboundHandler`](crate::network::InboundHandler) in
//! order. The writer owns the socket's sending half and drains the connection's outbound queue,
//! coalescing whatever is ready into `BATCH` frames and flushing once per burst; it also pings
//! and closes idle connections. Two cancellation tokens tie the pair together: `reader_done`
//! tells the writer the client is gone, and `force_close` (a child of the server's force-close
//! token) stops both at once. Close requests from anywhere ([`ConnectionHandle::close_with`])
//! reach the writer through the connection itself.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};

use http::StatusCode;
use http::header::RETRY_AFTER;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AppState;
use crate::network::batch::encode_batch;
use crate::network::close::{self, CloseRequest};
use crate::network::config::{ConnectionConfig, NetworkConfig};
use crate::network::connection::{ConnectionHandle, ConnectionKind, OutboundMessage};
use crate::network::inbound::call_guarded;
use crate::network::metrics::{DisconnectReason, RefusedUpgrade, TransportMetrics};

/// `GET /ws`: upgrades to a WebSocket configured from
/// [`ConnectionConfig`](crate::network::ConnectionConfig) and runs [`handle_socket`] on it.
///
/// Refused with `503` and `Retry-After` while the server is draining (so clients reconnect to
/// a node that is staying up) and when `max_connections` are open. Requests that are not valid
/// upgrades get axum's `400`/`405`/`426` answers.
pub async fn ws_upgrade_handler(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ws: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_shutting_down() {
        state.metrics.upgrade_refused(RefusedUpgrade::Draining);
        return unavailable("server is shutting down");
    }
    let Ok(slot) = Arc::clone(&state.connection_slots).try_acquire_owned() else {
        state.metrics.upgrade_refused(RefusedUpgrade::ConnectionLimit);
        tracing::info!(
            limit = state.config.max_connections,
            "connection limit reached; upgrade refused"
        );
        return unavailable("connection limit reached");
    };
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr);
    let span = tracing::info_span!("ws", peer = peer.map(tracing::field::display));
    let config = &state.config.connection;
    ws.read_buffer_size(config.ws_read_buffer_size)
        .write_buffer_size(config.ws_write_buffer_size)
        .max_write_buffer_size(config.ws_max_write_buffer_size)
        .max_message_size(config.max_message_size)
        .max_frame_size(config.max_frame_size)
        .on_failed_upgrade(|err| tracing::debug!(%err, "websocket upgrade failed"))
        // The slot is released when the connection's future completes.
        .on_upgrade(move |socket| {
            handle_socket(socket, state).inspect(move |()| drop(slot)).instrument(span)
        })
}

fn unavailable(reason: &'static str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [(RETRY_AFTER, "1")], format!("{reason}\n")).into_response()
}

/// Runs one upgraded connection to its end: registers it, spawns the writer, reads until the
/// client leaves or the server closes it, then removes it from the registry exactly once.
///
/// Every open connection holds this future and its writer's, so both are kept small: the
/// socket is split before the future is built, and rarely taken paths are boxed.
pub fn handle_socket(socket: WebSocket, state: AppState) -> impl Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    async move {
        let (conn, outbound) =
            state.registry.register(ConnectionKind::Client, &state.config.connection);
        let span = tracing::info_span!("conn", id = %conn.id);
        state.metrics.connection_opened(conn.kind);
        serve_connection(&state, &conn, sink, stream, outbound).instrument(span).await;
    }
}

async fn serve_connection(
    state: &AppState,
    conn: &Arc<ConnectionHandle>,
    sink: Sink,
    stream: SplitStream<WebSocket>,
    outbound: mpsc::Receiver<OutboundMessage>,
) {
    tracing::debug!("connected");
    let force_close = state.shutdown.force_close_token().child_token();
    let reader_done = CancellationToken::new();
    let writer = tokio::spawn(
        Writer {
            conn: Arc::clone(conn),
            config: Arc::clone(&state.config),
            force_close: force_close.clone(),
            reader_done: reader_done.clone(),
            server_closing: state.shutdown.close_connections_token().clone(),
            metrics: Arc::clone(&state.metrics),
        }
        .run(sink, outbound)
        .in_current_span(),
    );

    {
        let _in_flight = state.shutdown.in_flight_guard();
        call_guarded("on_connect", state.handler.on_connect(conn)).await;
    }
    Reader { conn, state, force_close: &force_close }.run(stream).await;
    reader_done.cancel();

    // The writer ends promptly once the reader is done: it only finishes a close frame,
    // itself bounded by `send_timeout`.
    if let Err(err) = writer.await {
        tracing::error!(%err, "websocket writer task failed");
    }
    if state.shutdown.force_close_token().is_cancelled() {
        conn.note_disconnect(DisconnectReason::Shutdown);
    }
    let reason = conn.disconnect_reason();
    if state.registry.remove(conn.id).is_some() {
        state.metrics.connection_closed(conn.kind, reason);
        let _in_flight = state.shutdown.in_flight_guard();
        call_guarded("on_disconnect", state.handler.on_disconnect(conn)).await;
    }
    tracing::debug!(reason = reason.as_str(), dropped = conn.dropped_messages(), "disconnected");
}

struct Reader<'a> {
    conn: &'a Arc<ConnectionHandle>,
    state: &'a AppState,
    force_close: &'a CancellationToken,
}

impl Reader<'_> {
    async fn run(self, mut stream: SplitStream<WebSocket>) {
        loop {
            let next = tokio::select! {
                biased;
                () = self.force_close.cancelled() => return,
                next = stream.next() => next,
            };
            self.conn.touch();
            // Once a close is under way, data is discarded; reading goes on only so the
            // client's close acknowledgement is seen.
            let closing = self.conn.close_requested().is_cancelled()
                || self.state.shutdown.close_connections_token().is_cancelled();
            match next {
                None => return,
                Some(Err(err)) => {
                    self.read_failed(&err);
                    return;
                }
                Some(Ok(Message::Binary(payload))) if !closing => {
                    self.state.metrics.messages_received.increment(1);
                    self.state.metrics.bytes_received.increment(payload.len() as u64);
                    if !self.dispatch(payload).await {
                        self.conn.close_with(close::INTERNAL_ERROR, close::HANDLER_FAILED_REASON);
                    }
                }
                Some(Ok(Message::Text(_))) if !closing => {
                    tracing::debug!("text frame on a binary-only protocol");
                    self.conn.close_with(close::UNSUPPORTED_DATA, close::TEXT_FRAME_REASON);
                }
                Some(Ok(Message::Close(frame))) => {
                    tracing::debug!(code = frame.as_ref().map(|f| f.code), "client sent close");
                }
                // tungstenite answers pings itself; pongs only count as activity.
                Some(Ok(_)) => {}
            }
        }
    }

    async fn dispatch(&self, payload: Bytes) -> bool {
        let _in_flight = self.state.shutdown.in_flight_guard();
        call_guarded("on_message", self.state.handler.on_message(self.conn, payload))
            .await
            .is_some()
    }

    /// A read error ends the connection; an over-limit message is answered with 1009 first.
    fn read_failed(&self, err: &axum::Error) {
        let inner =
            std::error::Error::source(err).and_then(|e| e.downcast_ref::<tungstenite::Error>());
        if let Some(tungstenite::Error::Capacity(capacity)) = inner {
            tracing::debug!(%capacity, "inbound message over the limit");
            let config = &self.state.config.connection;
            self.conn.close_with(
                close::MESSAGE_TOO_BIG,
                format!(
                    "message too big: limit is {} bytes per message, {} per frame",
                    config.max_message_size, config.max_frame_size
                ),
            );
        } else {
            tracing::debug!(%err, "websocket read failed");
            self.conn.note_disconnect(DisconnectReason::Error);
        }
    }
}

struct Writer {
    conn: Arc<ConnectionHandle>,
    /// Shared rather than cloned: every open connection's writer holds this.
    config: Arc<NetworkConfig>,
    /// Drop everything now (drain deadline passed).
    force_close: CancellationToken,
    /// The reader has finished: the client is gone or will not acknowledge anything more.
    reader_done: CancellationToken,
    /// Graceful shutdown: send what is queued, then 1001.
    server_closing: CancellationToken,
    metrics: Arc<TransportMetrics>,
}

/// How a burst of queued messages ended.
enum Burst {
    /// The queue had no more ready messages.
    Drained,
    /// An [`OutboundMessage::Close`] was dequeued; everything before it was written.
    CloseRequested(Option<String>),
}

type Sink = SplitSink<WebSocket, Message>;

impl Writer {
    /// Drains the outbound queue onto the socket, pings, and closes the connection when asked.
    ///
    /// A plain `fn` returning an `async move` block: the block uses its captures in place,
    /// where an `async fn` would also keep a second copy of each argument in its state.
    #[allow(clippy::manual_async_fn)]
    fn run(
        self,
        mut sink: Sink,
        mut queue: mpsc::Receiver<OutboundMessage>,
    ) -> impl Future<Output = ()> + Send {
        async move { self.write_then_count_leftovers(&mut sink, &mut queue).await }
    }

    async fn write_then_count_leftovers(
        &self,
        sink: &mut Sink,
        queue: &mut mpsc::Receiver<OutboundMessage>,
    ) {
        self.write_and_close(sink, queue).await;
        // Whatever is still queued will never be delivered: count it rather than lose it
        // silently. Closing first makes later sends fail (and count) instead of queueing.
        queue.close();
        let mut undelivered = 0;
        while let Ok(message) = queue.try_recv() {
            undelivered += u64::from(matches!(message, OutboundMessage::Binary(_)));
        }
        if undelivered > 0 {
            tracing::debug!(undelivered, "messages still queued at close");
            self.conn.record_undelivered(undelivered);
        }
    }

    async fn write_and_close(&self, sink: &mut Sink, queue: &mut mpsc::Receiver<OutboundMessage>) {
        let Some(close) = self.write_until_close(sink, queue).await else {
            // The socket failed or stopped draining: stop the reader too.
            self.force_close.cancel();
            return;
        };
        let sent = tokio::time::timeout(
            self.config.connection.send_timeout,
            sink.send(Message::Close(Some(close))),
        );
        if sent.await.is_ok_and(|result| result.is_ok()) {
            // The reader finishes once the client acknowledges the close.
            let acknowledged = tokio::time::timeout(self.config.connection.close_timeout, async {
                tokio::select! {
                    () = self.reader_done.cancelled() => {}
                    () = self.force_close.cancelled() => {}
                }
            });
            if acknowledged.await.is_err() {
                tracing::debug!("client did not acknowledge close in time");
            }
        }
        // Whatever happened, the reader must not outlive the writer's decision to close.
        self.force_close.cancel();
    }

    /// Writes until a close frame should be sent (returned) or the connection is over (`None`).
    async fn write_until_close(
        &self,
        sink: &mut Sink,
        queue: &mut mpsc::Receiver<OutboundMessage>,
    ) -> Option<CloseFrame> {
        let mut ping = tokio::time::interval_at(
            Instant::now() + self.config.connection.ping_interval,
            self.config.connection.ping_interval,
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let written = tokio::select! {
                biased;
                () = self.force_close.cancelled() => return None,
                () = self.reader_done.cancelled() => {
                    // The client left; a close requested by the reader (1009) still goes out.
                    return self.conn.close_request().map(close_frame_for);
                }
                () = self.conn.close_requested().cancelled() => {
                    return self.conn.close_request().map(close_frame_for);
                }
                () = self.server_closing.cancelled() => {
                    self.conn.note_disconnect(DisconnectReason::Shutdown);
                    return match Box::pin(self.write_with_deadline(sink, queue, None)).await? {
                        Burst::CloseRequested(reason) => Some(normal_close(reason.as_deref())),
                        Burst::Drained => Some(close_frame(close::GOING_AWAY, close::SHUTDOWN_REASON)),
                    };
                }
                _ = ping.tick() => {
                    if self.conn.last_activity().elapsed() >= self.config.connection.idle_timeout {
                        tracing::debug!(idle = ?self.conn.last_activity().elapsed(), "closing idle connection");
                        self.conn.note_disconnect(DisconnectReason::IdleTimeout);
                        return Some(close_frame(close::GOING_AWAY, close::IDLE_REASON));
                    }
                    self.sync_heartbeat();
                    self.send_with_deadline(sink, Message::Ping(Bytes::new())).await?;
                    Burst::Drained
                }
                message = queue.recv() => match message {
                    // Boxed: a burst's state is large and only exists while writing, so it
                    // should not sit in every idle connection's future.
                    Some(first) => Box::pin(self.write_with_deadline(sink, queue, Some(first))).await?,
                    // Every sender is gone: nobody can queue anything for this connection again.
                    None => Burst::CloseRequested(None),
                },
            };
            if let Burst::CloseRequested(reason) = written {
                self.conn.note_disconnect(DisconnectReason::Application);
                return Some(normal_close(reason.as_deref()));
            }
        }
    }

    /// Copies the activity clock into the metadata handlers read, once per ping interval
    /// rather than per frame; skipped if a handler holds the lock.
    fn sync_heartbeat(&self) {
        if let Ok(mut metadata) = self.conn.metadata.try_write() {
            metadata.last_heartbeat = self.conn.last_activity();
        }
    }

    async fn send_with_deadline(&self, sink: &mut Sink, message: Message) -> Option<()> {
        let send = tokio::time::timeout(self.config.connection.send_timeout, sink.send(message));
        self.finish_write(send.await)
    }

    /// Writes one burst, giving up (and ending the connection) if the socket stays blocked
    /// for longer than `send_timeout` or the connection is force-closed. `None` means the
    /// connection is finished.
    async fn write_with_deadline(
        &self,
        sink: &mut Sink,
        queue: &mut mpsc::Receiver<OutboundMessage>,
        first: Option<OutboundMessage>,
    ) -> Option<Burst> {
        let burst = write_burst(sink, queue, first, &self.config.connection, &self.metrics);
        let result = tokio::select! {
            biased;
            () = self.force_close.cancelled() => return None,
            result = tokio::time::timeout(self.config.connection.send_timeout, burst) => result,
        };
        self.finish_write(result)
    }

    fn finish_write<T>(
        &self,
        result: Result<Result<T, axum::Error>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        match result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                tracing::debug!(%err, "websocket write failed");
                self.conn.note_disconnect(DisconnectReason::Error);
                None
            }
            Err(_) => {
                tracing::info!(timeout = ?self.config.connection.send_timeout, "closing slow consumer: socket write blocked");
                self.conn.note_disconnect(DisconnectReason::SlowConsumer);
                None
            }
        }
    }
}

/// Writes `first` and every message already queued behind it (at most one queue's worth),
/// coalescing them into frames, then flushes once.
async fn write_burst(
    sink: &mut Sink,
    queue: &mut mpsc::Receiver<OutboundMessage>,
    first: Option<OutboundMessage>,
    config: &ConnectionConfig,
    metrics: &TransportMetrics,
) -> Result<Burst, axum::Error> {
    let mut frames = FrameBuilder::new(config);
    let mut next = first.or_else(|| queue.try_recv().ok());
    if next.is_some() {
        #[allow(clippy::cast_precision_loss)] // bounded by the queue capacity
        metrics.queue_depth.record((queue.len() + 1) as f64);
    }
    let mut taken = 0;
    let mut end = Burst::Drained;
    while let Some(message) = next {
        match message {
            OutboundMessage::Binary(payload) => {
                if let Some(frame) = frames.push(payload) {
                    feed(sink, frame, metrics).await?;
                }
            }
            OutboundMessage::Close(reason) => {
                end = Burst::CloseRequested(reason);
                break;
            }
        }
        taken += 1;
        next = if taken < config.outbound_channel_capacity { queue.try_recv().ok() } else { None };
    }
    if let Some(frame) = frames.finish() {
        feed(sink, frame, metrics).await?;
    }
    sink.flush().await?;
    Ok(end)
}

/// Queues one frame on the socket (without flushing) and counts it.
async fn feed(
    sink: &mut Sink,
    frame: Frame,
    metrics: &TransportMetrics,
) -> Result<(), axum::Error> {
    metrics.frames_sent.increment(1);
    metrics.messages_sent.increment(frame.messages as u64);
    metrics.bytes_sent.increment(frame.bytes.len() as u64);
    #[allow(clippy::cast_precision_loss)] // bounded by max_batch_messages
    metrics.batch_messages.record(frame.messages as f64);
    sink.feed(Message::Binary(frame.bytes)).await
}

/// One outbound data frame: a lone message or a `BATCH` of several.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    bytes: Bytes,
    messages: usize,
}

/// Groups ready messages into frames: one message alone goes out as itself, several as a
/// `BATCH` frame bounded by `max_batch_messages` and `max_batch_bytes`.
struct FrameBuilder {
    pending: Vec<Bytes>,
    pending_bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl FrameBuilder {
    fn new(config: &ConnectionConfig) -> Self {
        Self {
            pending: Vec::new(),
            pending_bytes: 0,
            max_messages: config.max_batch_messages,
            max_bytes: config.max_batch_bytes,
        }
    }

    /// Adds a message; returns a finished frame when the message did not fit the current one.
    fn push(&mut self, payload: Bytes) -> Option<Frame> {
        let full = !self.pending.is_empty()
            && (self.pending.len() >= self.max_messages
                || self.pending_bytes + payload.len() > self.max_bytes);
        let finished = if full { self.finish() } else { None };
        self.pending_bytes += payload.len();
        self.pending.push(payload);
        finished
    }

    fn finish(&mut self) -> Option<Frame> {
        self.pending_bytes = 0;
        let messages = self.pending.len();
        let bytes = match messages {
            0 => return None,
            1 => self.pending.pop()?,
            _ => {
                let batch = encode_batch(&self.pending);
                self.pending.clear();
                batch
            }
        };
        Some(Frame { bytes, messages })
    }
}

fn normal_close(reason: Option<&str>) -> CloseFrame {
    close_frame(close::NORMAL, reason.unwrap_or(""))
}

fn close_frame_for(request: &CloseRequest) -> CloseFrame {
    close_frame(request.code, &request.reason)
}

/// A close frame whose reason is cut to the protocol's 123-byte limit on a character boundary.
fn close_frame(code: u16, reason: &str) -> CloseFrame {
    const MAX_REASON: usize = 123;
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame { code, reason: Utf8Bytes::from(&reason[..end]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::batch::decode_frame;

    fn config(max_messages: usize, max_bytes: usize) -> ConnectionConfig {
        ConnectionConfig {
            max_batch_messages: max_messages,
            max_batch_bytes: max_bytes,
            ..Default::default()
        }
    }

    fn frame_messages(frame: &Frame) -> Vec<Bytes> {
        let messages = decode_frame(&frame.bytes).unwrap();
        assert_eq!(messages.len(), frame.messages);
        messages
    }

    #[test]
    fn a_lone_message_goes_out_unwrapped() {
        let mut builder = FrameBuilder::new(&config(10, 1024));
        assert!(builder.push(Bytes::from_static(b"solo")).is_none());
        assert_eq!(
            builder.finish(),
            Some(Frame { bytes: Bytes::from_static(b"solo"), messages: 1 })
        );
        assert!(builder.finish().is_none());
    }

    #[test]
    fn batches_split_at_the_message_limit() {
        let mut builder = FrameBuilder::new(&config(2, 1024));
        let msgs: Vec<Bytes> = (0..5_u8).map(|i| Bytes::from(vec![i])).collect();
        let mut frames: Vec<Frame> = msgs.iter().filter_map(|m| builder.push(m.clone())).collect();
        frames.extend(builder.finish());
        let sizes: Vec<usize> = frames.into_iter().map(|f| frame_messages(&f).len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
    }

    #[test]
    fn batches_split_at_the_byte_limit_and_oversized_messages_go_alone() {
        let mut builder = FrameBuilder::new(&config(100, 10));
        let mut frames = Vec::new();
        for len in [4, 4, 4, 50, 1] {
            frames.extend(builder.push(Bytes::from(vec![7; len])));
        }
        frames.extend(builder.finish());
        let sizes: Vec<Vec<usize>> = frames
            .into_iter()
            .map(|f| frame_messages(&f).iter().map(Bytes::len).collect())
            .collect();
        assert_eq!(sizes, [vec![4, 4], vec![4], vec![50], vec![1]]);
    }

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close_frame(close::GOING_AWAY, &reason);
        assert_eq!(frame.reason.len(), 122);
        assert_eq!(close_frame(close::GOING_AWAY, "short").reason.as_str(), "short");
    }
}
