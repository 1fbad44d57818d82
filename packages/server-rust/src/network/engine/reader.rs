//! socket → reader → handler: reads frames, offers each binary message to
//! [`InboundHandler::answer_inline`](crate::network::InboundHandler::answer_inline) at once and
//! hands the rest to `on_message` in order, one call at a time (or, with
//! [`ConnectionConfig::max_concurrent_messages`] above 1, up to that many at once, bounded by
//! [`READ_AHEAD_BYTES`] of messages in flight).
//!
//! While an `on_message` call runs, the reader keeps reading, up to
//! [`READ_AHEAD_MESSAGES`] messages or [`READ_AHEAD_BYTES`] held for the handler: a heartbeat
//! that arrives behind a slow message is still answered, and the client's pongs and pings are
//! still seen. Past that bound it stops reading, so TCP backpressure reaches the client.
//!
//! With a message budget ([`ConnectionConfig::inbound_rate`]) it also stops reading when the
//! client has sent more data messages than the budget allows, until it refills: a flooding
//! client is slowed by TCP, not by dropped messages, and costs the handler no more than its
//! budget.
//!
//! [`ConnectionConfig::inbound_rate`]: crate::network::ConnectionConfig::inbound_rate
//! [`ConnectionConfig::max_concurrent_messages`]: crate::network::ConnectionConfig::max_concurrent_messages

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, CatchUnwind};
use futures_util::stream::FuturesUnordered;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::time::Instant;

use crate::network::close;
use crate::network::config::RateLimitConfig;
use crate::network::connection::DisconnectReason;
use crate::network::connections::handle::ConnectionHandle;
use crate::network::edge::admission::Refusal;
use crate::network::inbound::{READ_AHEAD_BYTES, READ_AHEAD_MESSAGES, guarded, report_panic};
use crate::network::metrics::PanicSource;
use crate::network::shutdown::InFlightGuard;

use super::Shared;
use super::socket::{InvalidPayload, Socket};

/// The socket's reading half and the handler calls it feeds.
pub(super) struct Reader<'a> {
    conn: &'a Arc<ConnectionHandle>,
    state: &'a Shared,
    /// The handler call in progress: `on_connect` first, then one `on_message` at a time.
    call: Option<Call<'a>>,
    /// `on_message` calls in progress when several may run at once (boxed, and only while
    /// some run: most connections never have one).
    running: Option<Box<Running<'a>>>,
    ahead: ReadAhead,
    reading: bool,
    /// The message budget, when one is configured (boxed: most connections have none).
    budget: Option<Box<Budget>>,
    /// The close a frame that broke the protocol or a limit earned, sent once the messages
    /// read before it have been handled (boxed: rare).
    failed: Option<Box<(DisconnectReason, u16, String)>>,
}

/// One connection's inbound message budget.
struct Budget {
    bucket: DefaultDirectRateLimiter,
    /// A message was read past the budget: reading waits until then, and that message is
    /// charged before the next one is read.
    paused_until: Option<Instant>,
}

impl Budget {
    fn new(rate: RateLimitConfig) -> Self {
        let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
        Self { bucket: DefaultDirectRateLimiter::direct(quota), paused_until: None }
    }

    /// Charges one message; `false` (and a pause) when the budget is spent.
    fn charge(&mut self) -> bool {
        match self.bucket.check() {
            Ok(()) => {
                self.paused_until = None;
                true
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.bucket.clock().now());
                self.paused_until = Some(Instant::now() + wait);
                false
            }
        }
    }
}

/// A handler call in progress: the handler's own boxed future (no allocation of ours),
/// counted as in-flight work while it lives.
struct Call<'a> {
    future: CatchUnwind<AssertUnwindSafe<BoxFuture<'a, ()>>>,
    connect: bool,
    /// The message's size, for the bound on bytes in flight.
    bytes: usize,
    _in_flight: InFlightGuard,
}

impl Future for Call<'_> {
    /// Whether it was `on_connect`, the message's size, and how the call ended.
    type Output = (bool, usize, std::thread::Result<()>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(Pin::new(&mut self.future).poll(cx));
        Poll::Ready((self.connect, self.bytes, result))
    }
}

/// `on_message` calls running side by side, and the bytes of their messages.
#[derive(Default)]
struct Running<'a> {
    calls: FuturesUnordered<Call<'a>>,
    bytes: usize,
}

/// A data message read and not handled yet.
enum Inbound {
    Binary(Bytes),
    Text(Utf8Bytes),
}

impl Inbound {
    fn len(&self) -> usize {
        match self {
            Self::Binary(payload) => payload.len(),
            Self::Text(text) => text.len(),
        }
    }
}

/// Messages read but not yet handed to `on_message` (or `on_text`).
#[derive(Default)]
struct ReadAhead {
    messages: VecDeque<Inbound>,
    bytes: usize,
}

impl ReadAhead {
    fn has_room(&self) -> bool {
        self.messages.len() < READ_AHEAD_MESSAGES && self.bytes < READ_AHEAD_BYTES
    }

    fn push(&mut self, message: Inbound) {
        self.bytes += message.len();
        self.messages.push_back(message);
    }

    /// The size of the next message, if any.
    fn peek_len(&self) -> Option<usize> {
        self.messages.front().map(Inbound::len)
    }

    fn pop(&mut self) -> Option<Inbound> {
        let payload = self.messages.pop_front()?;
        self.bytes -= payload.len();
        if self.messages.is_empty() {
            // Keep a quiet connection free of the buffer.
            self.messages = VecDeque::new();
        }
        Some(payload)
    }
}

impl<'a> Reader<'a> {
    /// A reader whose first handler call, `on_connect`, is already under way; broadcasts
    /// reach the connection once it has returned.
    pub(super) fn new(conn: &'a Arc<ConnectionHandle>, state: &'a Shared) -> Self {
        conn.set_handler_busy(true);
        let call = Call {
            future: guarded(state.handler.on_connect(conn)),
            connect: true,
            bytes: 0,
            _in_flight: state.shutdown.in_flight_guard(),
        };
        let budget = state.config.connection.inbound_rate.map(|rate| Box::new(Budget::new(rate)));
        Self {
            conn,
            state,
            call: Some(call),
            running: None,
            ahead: ReadAhead::default(),
            reading: true,
            budget,
            failed: None,
        }
    }

    /// When a paused read resumes.
    pub(super) fn resume_at(&self) -> Option<Instant> {
        self.budget.as_ref().and_then(|budget| budget.paused_until)
    }

    /// Whether the budget lets the reader read now; settles a pause whose time has come.
    fn within_budget(&mut self) -> bool {
        let Some(budget) = &mut self.budget else { return true };
        let Some(until) = budget.paused_until else { return true };
        if Instant::now() < until || !budget.charge() {
            return false;
        }
        // Throttled time is the server's doing: idleness counts from now.
        self.conn.set_throttled(false);
        self.conn.touch();
        true
    }

    /// Charges a data message to the budget, pausing reading when it is spent.
    fn charge(&mut self) {
        let Some(budget) = &mut self.budget else { return };
        if budget.charge() {
            return;
        }
        self.conn.set_throttled(true);
        self.state.metrics.inbound_throttled.increment(1);
        if let Some(peer) = self.conn.peer() {
            self.state.admission.log.refused(Refusal::InboundRate, peer.ip());
        } else {
            tracing::debug!("inbound message budget spent; reading paused");
        }
    }

    /// Reads what the socket has, answers inline what the handler answers inline, and drives
    /// the handler call in progress. Ready once the client has gone (or [`stop`](Self::stop)
    /// was called) and every call has finished.
    pub(super) fn poll_read<S: Socket>(
        &mut self,
        socket: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        loop {
            if let Some(call) = &mut self.call
                && let Poll::Ready((connect, _, result)) = Pin::new(call).poll(cx)
            {
                self.call = None;
                self.finished(connect, result);
            }
            while let Some(running) = &mut self.running
                && let Poll::Ready(Some((_, bytes, result))) = running.calls.poll_next_unpin(cx)
            {
                running.bytes -= bytes;
                if running.calls.is_empty() {
                    self.running = None;
                }
                self.finished(false, result);
            }
            if let Some(next) = self.ahead.peek_len()
                && self.may_start(next)
                && let Some(payload) = self.ahead.pop()
            {
                self.dispatch(payload);
                continue;
            }
            if self.reading && self.ahead.has_room() && self.within_budget() {
                match Pin::new(&mut *socket).poll_next(cx) {
                    Poll::Ready(Some(Ok(message))) => {
                        if matches!(message, Message::Binary(_) | Message::Text(_)) {
                            self.charge();
                        }
                        if let Some(payload) = self.accept(message) {
                            self.ahead.push(payload);
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(err))) => {
                        self.read_failed(&err);
                        self.reading = false;
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.reading = false;
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            break;
        }
        if !self.reading && !self.busy() && self.ahead.messages.is_empty() {
            if let Some(failed) = self.failed.take() {
                // Everything the client sent before the bad frame has been answered: the
                // close goes after those answers.
                let (why, code, reason) = *failed;
                self.conn.close_after_queue(why, code, reason);
            }
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Reads nothing more and drops the messages read but not handled; the call in progress
    /// still finishes.
    pub(super) fn stop(&mut self) {
        self.reading = false;
        if !self.ahead.messages.is_empty() {
            tracing::debug!(
                dropped = self.ahead.messages.len(),
                "inbound messages not handled: connection closed"
            );
            self.ahead = ReadAhead::default();
        }
    }

    /// Whether a handler call is running.
    fn busy(&self) -> bool {
        self.call.is_some() || self.running.is_some()
    }

    /// Whether an `on_message` call for a message of `bytes` may start now: none runs (one at
    /// a time), or fewer than `max_concurrent_messages` run and the bytes in flight leave room
    /// for it (the first always starts).
    fn may_start(&self, bytes: usize) -> bool {
        if self.call.is_some() {
            return false;
        }
        let Some(running) = &self.running else { return true };
        running.calls.len() < self.state.config.connection.max_concurrent_messages
            && running.bytes.saturating_add(bytes) <= READ_AHEAD_BYTES
    }

    fn finished(&self, connect: bool, result: std::thread::Result<()>) {
        // The client's silence while the handler worked was not the client's doing.
        self.conn.touch();
        self.conn.set_handler_busy(self.busy());
        let returned = report_panic(if connect { "on_connect" } else { "on_message" }, result);
        if returned.is_none() {
            self.handler_failed();
        } else if connect {
            // Only now: whatever the handler queued in `on_connect` (an AUTH_REQUIRED, a
            // welcome) is the first thing the client receives.
            self.conn.accept_broadcasts();
        }
    }

    /// A handler call panicked: counted, and the connection closes with 1011.
    fn handler_failed(&self) {
        self.state.metrics.panicked(PanicSource::Handler);
        self.conn.close_because(
            DisconnectReason::Error,
            close::INTERNAL_ERROR,
            close::HANDLER_FAILED_REASON,
        );
    }

    /// Looks at one frame: returns a data message that still needs the handler, handles
    /// everything else here.
    fn accept(&self, message: Message) -> Option<Inbound> {
        self.conn.touch();
        // Once a close is under way, data is discarded; reading goes on only so the
        // client's close acknowledgement is seen.
        let closing =
            self.conn.close_request().is_some() || self.state.shutdown.closing_connections();
        match message {
            Message::Binary(payload) if !closing => {
                self.state.metrics.message_received(payload.len() as u64);
                self.answer_inline(&payload).is_none().then_some(Inbound::Binary(payload))
            }
            // In order with the binary messages: the handler accepts it, or (by default)
            // closes with 1003.
            Message::Text(text) if !closing => Some(Inbound::Text(text)),
            Message::Close(frame) => {
                tracing::debug!(code = frame.as_ref().map(|f| f.code), "client sent close");
                None
            }
            // The socket answers pings itself; pongs only count as activity.
            _ => None,
        }
    }

    /// Offers `payload` to the handler's inline answer; `Some` when it was handled there
    /// (or the handler panicked, which closes the connection with 1011).
    fn answer_inline(&self, payload: &Bytes) -> Option<()> {
        let handler = &self.state.handler;
        let answered = std::panic::catch_unwind(AssertUnwindSafe(|| {
            handler.answer_inline(self.conn, payload)
        }));
        match report_panic("answer_inline", answered) {
            Some(true) => Some(()),
            Some(false) => None,
            None => {
                self.handler_failed();
                Some(())
            }
        }
    }

    /// Starts one `on_message` call, counted as in-flight work: the only one, or beside
    /// others when several may run.
    fn dispatch(&mut self, message: Inbound) {
        self.conn.set_handler_busy(true);
        let bytes = message.len();
        let handler = &self.state.handler;
        let future = match message {
            Inbound::Binary(payload) => handler.on_message(self.conn, payload),
            Inbound::Text(text) => handler.on_text(self.conn, text),
        };
        let call = Call {
            future: guarded(future),
            connect: false,
            bytes,
            _in_flight: self.state.shutdown.in_flight_guard(),
        };
        if self.state.config.connection.max_concurrent_messages == 1 {
            self.call = Some(call);
            return;
        }
        let running = self.running.get_or_insert_with(Box::default);
        running.bytes += bytes;
        running.calls.push(call);
    }

    /// A read error ends the connection. A client that broke the protocol or a limit is told
    /// why (1002, 1007 or 1009) once the messages it sent before the bad frame have been
    /// handled and their answers sent.
    fn read_failed(&mut self, err: &axum::Error) {
        let source = std::error::Error::source(err);
        let config = &self.state.config.connection;
        let (code, reason) = match source.and_then(|e| e.downcast_ref::<tungstenite::Error>()) {
            Some(tungstenite::Error::Capacity(capacity)) => {
                tracing::debug!(%capacity, "inbound message over the limit");
                let reason = format!(
                    "message too big: limit is {} bytes per message, {} per frame",
                    config.max_message_size, config.max_frame_size
                );
                (close::MESSAGE_TOO_BIG, reason)
            }
            Some(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ))
            | None => {
                if let Some(invalid) = source.and_then(|e| e.downcast_ref::<InvalidPayload>()) {
                    tracing::debug!(%invalid, "invalid inbound payload");
                    (close::INVALID_PAYLOAD, invalid.to_string())
                } else {
                    tracing::debug!(%err, "websocket read failed");
                    self.conn.note_disconnect(DisconnectReason::Error);
                    return;
                }
            }
            Some(tungstenite::Error::Protocol(protocol)) => {
                tracing::debug!(%protocol, "websocket protocol error");
                (close::PROTOCOL_ERROR, format!("protocol error: {protocol}"))
            }
            Some(tungstenite::Error::Utf8(_)) => {
                (close::INVALID_PAYLOAD, "text is not UTF-8".to_owned())
            }
            Some(other) => {
                tracing::debug!(%other, "websocket read failed");
                self.conn.note_disconnect(DisconnectReason::Error);
                return;
            }
        };
        let why = if code == close::MESSAGE_TOO_BIG {
            DisconnectReason::Limit
        } else {
            DisconnectReason::Error
        };
        self.failed = Some(Box::new((why, code, reason)));
    }
}
