//! socket → reader → handler: reads frames, offers each binary message to
//! [`InboundHandler::answer_inline`](crate::network::InboundHandler::answer_inline) at once and
//! hands the rest to `on_message` in order, one call at a time.
//!
//! While an `on_message` call runs, the reader keeps reading, up to
//! [`READ_AHEAD_MESSAGES`] messages or [`READ_AHEAD_BYTES`] held for the handler: a heartbeat
//! that arrives behind a slow message is still answered, and the client's pongs and pings are
//! still seen. Past that bound it stops reading, so TCP backpressure reaches the client.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, CatchUnwind};
use futures_util::stream::SplitStream;
use tokio_util::sync::CancellationToken;

use crate::network::close;
use crate::network::connection::{ConnectionHandle, DisconnectReason};
use crate::network::inbound::{READ_AHEAD_BYTES, READ_AHEAD_MESSAGES, guarded, report_panic};
use crate::network::shutdown::InFlightGuard;

use super::Shared;

pub(super) struct Reader<'a> {
    pub(super) conn: &'a Arc<ConnectionHandle>,
    pub(super) state: &'a Shared,
    pub(super) force_close: &'a CancellationToken,
}

/// The `on_message` call in progress: the handler's own boxed future (no allocation of ours),
/// counted as in-flight work while it lives.
struct Dispatch<'a> {
    call: CatchUnwind<AssertUnwindSafe<BoxFuture<'a, ()>>>,
    _in_flight: InFlightGuard,
}

/// Messages read but not yet handed to `on_message`.
#[derive(Default)]
struct ReadAhead {
    messages: VecDeque<Bytes>,
    bytes: usize,
}

impl ReadAhead {
    fn has_room(&self) -> bool {
        self.messages.len() < READ_AHEAD_MESSAGES && self.bytes < READ_AHEAD_BYTES
    }

    fn push(&mut self, payload: Bytes) {
        self.bytes += payload.len();
        self.messages.push_back(payload);
    }

    fn pop(&mut self) -> Option<Bytes> {
        let payload = self.messages.pop_front()?;
        self.bytes -= payload.len();
        Some(payload)
    }
}

impl Reader<'_> {
    /// Reads until the client leaves, the read fails or the connection is force-closed, then
    /// finishes the handler call in progress (and, unless force-closed, the messages already
    /// read) before returning.
    pub(super) async fn run(self, mut stream: SplitStream<WebSocket>) {
        let mut current: Option<Dispatch<'_>> = None;
        let mut ahead = ReadAhead::default();
        let mut reading = true;
        loop {
            let busy = current.is_some();
            if !busy {
                if let Some(next) = ahead.pop() {
                    current = Some(self.dispatch(next));
                    continue;
                }
                if !reading {
                    return;
                }
            }
            tokio::select! {
                biased;
                () = self.force_close.cancelled(), if reading => {
                    reading = false;
                    if !ahead.messages.is_empty() {
                        tracing::debug!(dropped = ahead.messages.len(), "inbound messages not handled: connection force-closed");
                        ahead = ReadAhead::default();
                    }
                }
                result = async { (&mut current.as_mut().expect("busy").call).await }, if busy => {
                    current = None;
                    // The client's silence while the handler worked was not the client's doing.
                    self.conn.touch();
                    self.conn.set_handler_busy(false);
                    if report_panic("on_message", result).is_none() {
                        self.conn.close_because(DisconnectReason::Error, close::INTERNAL_ERROR, close::HANDLER_FAILED_REASON);
                    }
                }
                next = stream.next(), if reading && ahead.has_room() => {
                    let Some(Ok(message)) = next else {
                        if let Some(Err(err)) = next {
                            self.read_failed(&err);
                        }
                        reading = false;
                        continue;
                    };
                    let Some(payload) = self.accept(message) else { continue };
                    if busy {
                        ahead.push(payload);
                    } else {
                        current = Some(self.dispatch(payload));
                    }
                }
            }
        }
    }

    /// Looks at one frame: returns a binary message that still needs `on_message`, handles
    /// everything else here.
    fn accept(&self, message: Message) -> Option<Bytes> {
        self.conn.touch();
        // Once a close is under way, data is discarded; reading goes on only so the
        // client's close acknowledgement is seen.
        let closing = self.conn.close_requested().is_cancelled()
            || self.state.shutdown.close_connections_token().is_cancelled();
        match message {
            Message::Binary(payload) if !closing => {
                self.state.metrics.messages_received.increment(1);
                self.state.metrics.bytes_received.increment(payload.len() as u64);
                self.answer_inline(&payload).is_none().then_some(payload)
            }
            Message::Text(_) if !closing => {
                tracing::debug!("text frame on a binary-only protocol");
                self.conn.close_because(
                    DisconnectReason::Limit,
                    close::UNSUPPORTED_DATA,
                    close::TEXT_FRAME_REASON,
                );
                None
            }
            Message::Close(frame) => {
                tracing::debug!(code = frame.as_ref().map(|f| f.code), "client sent close");
                None
            }
            // tungstenite answers pings itself; pongs only count as activity.
            _ => None,
        }
    }

    /// Offers `payload` to the handler's inline answer; `Some` when it was handled there
    /// (or the handler panicked, which closes the connection with 1011).
    fn answer_inline(&self, payload: &Bytes) -> Option<()> {
        let handler = &self.state.handler;
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            handler.answer_inline(self.conn, payload)
        })) {
            Ok(true) => Some(()),
            Ok(false) => None,
            Err(_) => {
                tracing::error!(call = "answer_inline", "inbound handler panicked");
                self.conn.close_because(
                    DisconnectReason::Error,
                    close::INTERNAL_ERROR,
                    close::HANDLER_FAILED_REASON,
                );
                Some(())
            }
        }
    }

    /// Starts one `on_message` call, counted as in-flight work.
    fn dispatch(&self, payload: Bytes) -> Dispatch<'_> {
        self.conn.set_handler_busy(true);
        Dispatch {
            _in_flight: self.state.shutdown.in_flight_guard(),
            call: guarded(self.state.handler.on_message(self.conn, payload)),
        }
    }

    /// A read error ends the connection; an over-limit message is answered with 1009 first.
    fn read_failed(&self, err: &axum::Error) {
        let inner =
            std::error::Error::source(err).and_then(|e| e.downcast_ref::<tungstenite::Error>());
        if let Some(tungstenite::Error::Capacity(capacity)) = inner {
            tracing::debug!(%capacity, "inbound message over the limit");
            let config = &self.state.config.connection;
            self.conn.close_because(
                DisconnectReason::Limit,
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
