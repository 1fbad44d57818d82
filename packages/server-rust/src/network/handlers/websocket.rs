//! `GET /ws`: one reader loop and one writer task per WebSocket connection.
//!
//! The reader hands binary messages to the [`InboundHandler`](crate::network::InboundHandler) in
//! order. The writer owns the socket's sending half and drains the connection's outbound queue,
//! coalescing whatever is ready into `BATCH` frames and flushing once per burst. A per-connection
//! cancellation token ties the two together: whichever side ends first stops the other, and the
//! server's force-close token is its parent.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use http::StatusCode;
use http::header::RETRY_AFTER;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AppState;
use crate::network::batch::encode_batch;
use crate::network::config::ConnectionConfig;
use crate::network::connection::{ConnectionHandle, ConnectionKind, OutboundMessage};

/// Close reason sent to every client when the server shuts down.
pub(crate) const SHUTDOWN_REASON: &str = "server shutting down";

/// `GET /ws`: upgrades to a WebSocket configured from
/// [`ConnectionConfig`](crate::network::ConnectionConfig) and runs [`handle_socket`] on it.
///
/// While the server is draining, upgrades are refused with `503` and `Retry-After`, so clients
/// reconnect to a node that is staying up.
pub async fn ws_upgrade_handler(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ws: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(RETRY_AFTER, "1")],
            "server is shutting down\n",
        )
            .into_response();
    }
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr);
    let span = tracing::info_span!("ws", peer = peer.map(tracing::field::display));
    let config = &state.config.connection;
    ws.write_buffer_size(config.ws_write_buffer_size)
        .max_write_buffer_size(config.ws_max_write_buffer_size)
        .on_failed_upgrade(|err| tracing::debug!(%err, "websocket upgrade failed"))
        .on_upgrade(move |socket| handle_socket(socket, state).instrument(span))
}

/// Runs one upgraded connection to its end: registers it, spawns the writer, reads until the
/// client leaves or the server closes it, then removes it from the registry exactly once.
pub async fn handle_socket(socket: WebSocket, state: AppState) {
    let (sink, stream) = socket.split();
    let (conn, outbound) = state
        .registry
        .register(ConnectionKind::Client, &state.config.connection);
    let span = tracing::info_span!("conn", id = %conn.id);
    async {
        tracing::debug!("connected");
        let done = state.shutdown.force_close_token().child_token();
        let (close_tx, close_rx) = mpsc::channel(1);
        let writer = tokio::spawn(
            outbound_task(
                sink,
                outbound,
                Writer {
                    config: state.config.connection.clone(),
                    done: done.clone(),
                    server_closing: state.shutdown.close_connections_token().clone(),
                    close_requests: close_rx,
                },
            )
            .in_current_span(),
        );

        {
            let _in_flight = state.shutdown.in_flight_guard();
            guarded("on_connect", state.handler.on_connect(&conn)).await;
        }
        Reader {
            conn: &conn,
            state: &state,
            done: &done,
            close_tx,
        }
        .run(stream)
        .await;

        done.cancel();
        if let Err(err) = writer.await {
            tracing::error!(%err, "websocket writer task failed");
        }
        if state.registry.remove(conn.id).is_some() {
            let _in_flight = state.shutdown.in_flight_guard();
            guarded("on_disconnect", state.handler.on_disconnect(&conn)).await;
        }
        tracing::debug!("disconnected");
    }
    .instrument(span)
    .await;
}

/// Awaits a handler call, turning a panic into an error log. Returns `false` if it panicked.
async fn guarded(call: &'static str, fut: impl Future<Output = ()>) -> bool {
    let ok = AssertUnwindSafe(fut).catch_unwind().await.is_ok();
    if !ok {
        tracing::error!(call, "inbound handler panicked");
    }
    ok
}

struct Reader<'a> {
    conn: &'a Arc<ConnectionHandle>,
    state: &'a AppState,
    done: &'a CancellationToken,
    close_tx: mpsc::Sender<CloseFrame>,
}

impl Reader<'_> {
    async fn run(self, mut stream: SplitStream<WebSocket>) {
        // After asking the writer to close, keep reading (and discarding) so the client's close
        // acknowledgement is seen and tungstenite can finish the handshake.
        let mut closing = false;
        loop {
            let next = tokio::select! {
                biased;
                () = self.done.cancelled() => return,
                next = stream.next() => next,
            };
            match next {
                None => return,
                Some(Err(err)) => {
                    tracing::debug!(%err, "websocket read failed");
                    return;
                }
                Some(Ok(Message::Binary(payload))) if !closing => {
                    if !self.dispatch(payload).await {
                        closing = self.request_close(close_code::ERROR, "internal server error");
                    }
                }
                Some(Ok(Message::Text(_))) if !closing => {
                    tracing::debug!("text frame on a binary-only protocol");
                    closing = self.request_close(
                        close_code::UNSUPPORTED,
                        "text frames are not supported: send binary MsgPack frames",
                    );
                }
                Some(Ok(Message::Close(frame))) => {
                    tracing::debug!(code = frame.as_ref().map(|f| f.code), "client sent close");
                }
                // tungstenite answers pings itself; data after a close request is discarded.
                Some(Ok(_)) => {}
            }
        }
    }

    async fn dispatch(&self, payload: Bytes) -> bool {
        let _in_flight = self.state.shutdown.in_flight_guard();
        guarded(
            "on_message",
            self.state.handler.on_message(self.conn, payload),
        )
        .await
    }

    fn request_close(&self, code: u16, reason: &'static str) -> bool {
        // Capacity one and sent at most once per `closing` flip, so this cannot be full.
        let _ = self.close_tx.try_send(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        });
        true
    }
}

struct Writer {
    config: ConnectionConfig,
    done: CancellationToken,
    server_closing: CancellationToken,
    close_requests: mpsc::Receiver<CloseFrame>,
}

/// How a burst of queued messages ended.
enum Burst {
    /// The queue had no more ready messages.
    Drained,
    /// An [`OutboundMessage::Close`] was dequeued; everything before it was written.
    CloseRequested(Option<String>),
}

type Sink = SplitSink<WebSocket, Message>;

/// Drains the outbound queue onto the socket until the connection ends.
async fn outbound_task(mut sink: Sink, mut queue: mpsc::Receiver<OutboundMessage>, mut w: Writer) {
    let close = loop {
        let written = tokio::select! {
            biased;
            () = w.done.cancelled() => return,
            Some(frame) = w.close_requests.recv() => break frame,
            () = w.server_closing.cancelled() => {
                match w.write_with_deadline(&mut sink, &mut queue, None).await {
                    Some(Burst::CloseRequested(reason)) => break normal_close(reason),
                    Some(Burst::Drained) => break close_frame(close_code::AWAY, SHUTDOWN_REASON),
                    None => return,
                }
            }
            message = queue.recv() => match message {
                Some(first) => w.write_with_deadline(&mut sink, &mut queue, Some(first)).await,
                // Every sender is gone: nobody can queue anything for this connection again.
                None => Some(Burst::CloseRequested(None)),
            },
        };
        match written {
            Some(Burst::Drained) => {}
            Some(Burst::CloseRequested(reason)) => break normal_close(reason),
            None => return,
        }
    };
    if tokio::time::timeout(
        w.config.send_timeout,
        sink.send(Message::Close(Some(close))),
    )
    .await
    .is_ok()
    {
        // The reader ends (and cancels `done`) once the client acknowledges the close.
        if tokio::time::timeout(w.config.close_timeout, w.done.cancelled())
            .await
            .is_err()
        {
            tracing::debug!("client did not acknowledge close in time");
        }
    }
    w.done.cancel();
}

impl Writer {
    /// Writes one burst, giving up (and ending the connection) if the socket stays blocked for
    /// longer than `send_timeout` or the connection is cancelled. `None` means the connection
    /// is finished.
    async fn write_with_deadline(
        &self,
        sink: &mut Sink,
        queue: &mut mpsc::Receiver<OutboundMessage>,
        first: Option<OutboundMessage>,
    ) -> Option<Burst> {
        let burst = write_burst(sink, queue, first, &self.config);
        let result = tokio::select! {
            biased;
            () = self.done.cancelled() => return None,
            result = tokio::time::timeout(self.config.send_timeout, burst) => result,
        };
        match result {
            Ok(Ok(burst)) => Some(burst),
            Ok(Err(err)) => {
                tracing::debug!(%err, "websocket write failed");
                self.done.cancel();
                None
            }
            Err(_) => {
                tracing::info!(timeout = ?self.config.send_timeout, "closing slow consumer: socket write blocked");
                self.done.cancel();
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
) -> Result<Burst, axum::Error> {
    let mut frames = FrameBuilder::new(config);
    let mut next = first.or_else(|| queue.try_recv().ok());
    let mut taken = 0;
    let mut end = Burst::Drained;
    while let Some(message) = next {
        match message {
            OutboundMessage::Binary(payload) => {
                if let Some(frame) = frames.push(payload) {
                    sink.feed(frame).await?;
                }
            }
            OutboundMessage::Close(reason) => {
                end = Burst::CloseRequested(reason);
                break;
            }
        }
        taken += 1;
        next = if taken < config.outbound_channel_capacity {
            queue.try_recv().ok()
        } else {
            None
        };
    }
    if let Some(frame) = frames.finish() {
        sink.feed(frame).await?;
    }
    sink.flush().await?;
    Ok(end)
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
    fn push(&mut self, payload: Bytes) -> Option<Message> {
        let full = !self.pending.is_empty()
            && (self.pending.len() >= self.max_messages
                || self.pending_bytes + payload.len() > self.max_bytes);
        let finished = if full { self.finish() } else { None };
        self.pending_bytes += payload.len();
        self.pending.push(payload);
        finished
    }

    fn finish(&mut self) -> Option<Message> {
        self.pending_bytes = 0;
        match self.pending.len() {
            0 => None,
            1 => self.pending.pop().map(Message::Binary),
            _ => {
                let frame = encode_batch(&self.pending);
                self.pending.clear();
                Some(Message::Binary(frame))
            }
        }
    }
}

fn normal_close(reason: Option<String>) -> CloseFrame {
    match reason {
        Some(reason) => close_frame(close_code::NORMAL, &reason),
        None => close_frame(close_code::NORMAL, ""),
    }
}

/// A close frame whose reason is cut to the protocol's 123-byte limit on a character boundary.
fn close_frame(code: u16, reason: &str) -> CloseFrame {
    const MAX_REASON: usize = 123;
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }
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

    fn frame_messages(frame: Message) -> Vec<Bytes> {
        let Message::Binary(bytes) = frame else {
            panic!("expected a binary frame")
        };
        decode_frame(&bytes).unwrap()
    }

    #[test]
    fn a_lone_message_goes_out_unwrapped() {
        let mut builder = FrameBuilder::new(&config(10, 1024));
        assert!(builder.push(Bytes::from_static(b"solo")).is_none());
        assert_eq!(
            builder.finish(),
            Some(Message::Binary(Bytes::from_static(b"solo")))
        );
        assert!(builder.finish().is_none());
    }

    #[test]
    fn batches_split_at_the_message_limit() {
        let mut builder = FrameBuilder::new(&config(2, 1024));
        let msgs: Vec<Bytes> = (0..5_u8).map(|i| Bytes::from(vec![i])).collect();
        let mut frames: Vec<Message> = msgs
            .iter()
            .filter_map(|m| builder.push(m.clone()))
            .collect();
        frames.extend(builder.finish());
        let sizes: Vec<usize> = frames
            .into_iter()
            .map(|f| frame_messages(f).len())
            .collect();
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
            .map(|f| frame_messages(f).iter().map(Bytes::len).collect())
            .collect();
        assert_eq!(sizes, [vec![4, 4], vec![4], vec![50], vec![1]]);
    }

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close_frame(close_code::AWAY, &reason);
        assert_eq!(frame.reason.len(), 122);
        assert_eq!(
            close_frame(close_code::AWAY, "short").reason.as_str(),
            "short"
        );
    }
}
