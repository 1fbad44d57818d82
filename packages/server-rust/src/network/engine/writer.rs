//! registry → queue → writer → socket: drains a connection's outbound queue onto its socket.
//!
//! Priority messages go first, each as a frame of its own; queued `Binary` messages are taken
//! off the queue in one step and coalesced into `BATCH` frames ([`FrameBuilder`]), then
//! flushed once. The writer also pings the client, closes idle and (with `auth_timeout`)
//! unauthenticated connections, and sends the close frame however a connection ends:
//! application close, shutdown, limits. A socket that takes no frame for `send_timeout` while
//! the writer has some for it ends the connection.
//!
//! It is polled, not spawned: [`Writer::poll_write`] does what the socket accepts now and
//! returns; [`Writer::publish_deadline`] tells the registry's clock (`clock.rs`) when to wake
//! it for the next ping, and [`Writer::precise_deadline`] the connection's own timer when a
//! send or close deadline is pending.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use tokio::time::Instant;

use super::Shared;
use super::socket::Socket;
use crate::network::close::{self, CloseRequest};
use crate::network::connection::{ConnectionKind, DisconnectReason};
use crate::network::connections::handle::ConnectionHandle;
use crate::network::connections::queue::{OutboundMessage, undelivered};
use crate::network::engine::batch::{Frame, FrameBuilder, Next};

pub(super) struct Writer<'a> {
    conn: &'a Arc<ConnectionHandle>,
    state: &'a Shared,
    frames: FrameBuilder,
    /// Messages taken off the queue and not yet framed.
    burst: VecDeque<OutboundMessage>,
    /// The next frame, waiting for the socket to take it, with the messages it carries.
    waiting: Option<(Message, u64)>,
    /// Frames handed to the socket since its last flush.
    unflushed: bool,
    /// Since when the socket has not taken what the writer has for it.
    blocked_since: Option<Instant>,
    next_ping: Instant,
    auth_deadline: Option<Instant>,
    phase: Phase,
    /// The close frame that ends [`Phase::Draining`] when it is not the shutdown's 1001
    /// (boxed: rare).
    drained_close: Option<Box<CloseFrame>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Writing whatever is queued.
    Open,
    /// Writing what was queued when draining started, then the close frame: 1001 when the
    /// server shuts down, or the one a close after the queue asked for.
    Draining,
    /// The close frame is out (or on its way); the client has until this instant to answer.
    CloseSent(Instant),
    /// Nothing more to write.
    Done,
}

impl<'a> Writer<'a> {
    /// A writer for `conn`; `compresses_from` is [`Socket::compresses_from`] of its socket.
    pub(super) fn new(
        conn: &'a Arc<ConnectionHandle>,
        state: &'a Shared,
        compresses_from: Option<usize>,
    ) -> Self {
        let config = &state.config.connection;
        let now = Instant::now();
        let auth_deadline = match config.auth_timeout {
            Some(timeout) if conn.kind == ConnectionKind::Client => Some(now + timeout),
            _ => None,
        };
        Self {
            conn,
            state,
            frames: compresses_from
                .map_or(FrameBuilder::new(config), |len| FrameBuilder::new(config).alone_from(len)),
            burst: VecDeque::new(),
            waiting: None,
            unflushed: false,
            blocked_since: None,
            next_ping: now + config.ping_interval,
            auth_deadline,
            phase: Phase::Open,
            drained_close: None,
        }
    }

    /// Registers the connection's task to be woken by its queue.
    pub(super) fn register(&self, cx: &Context<'_>) {
        self.conn.queue().register_consumer(cx);
    }

    /// Takes the socket back from the queue's senders for this poll, with the end of a frame
    /// a sender could not finish; `false` while a sender is writing (it wakes the task then).
    pub(super) fn take_socket<S: Socket>(&mut self, socket: &mut S) -> bool {
        let queue = self.conn.queue();
        if !queue.acquire_socket() {
            return false;
        }
        if let Some(rest) = queue.take_unsent() {
            socket.push_unsent(rest);
            self.unflushed = true;
        }
        true
    }

    /// Lends the socket to the queue's senders until the next poll, if the writer holds
    /// nothing for it and the connection is open.
    pub(super) fn lend_socket<S: Socket>(&self, socket: &S) {
        if self.phase == Phase::Open
            && self.waiting.is_none()
            && self.burst.is_empty()
            && !self.unflushed
            && socket.holds_nothing()
        {
            self.conn.queue().release_socket();
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub(super) fn force_closed(&self) -> bool {
        self.state.shutdown.forcing_close()
    }

    /// Tells the registry's clock when the writer next has a periodic check to make (a ping,
    /// the authentication deadline); a tick late does no harm.
    pub(super) fn publish_deadline(&self) {
        let periodic = match self.phase {
            Phase::Open | Phase::Draining => Some(match self.auth_deadline {
                Some(auth) => auth.min(self.next_ping),
                None => self.next_ping,
            }),
            Phase::CloseSent(_) | Phase::Done => None,
        };
        self.conn.wake_at(periodic);
    }

    /// When the writer next has something to check that must not wait for the clock: the send
    /// deadline of a blocked socket, the end of the close handshake.
    pub(super) fn precise_deadline(&self) -> Option<Instant> {
        let blocked = self.blocked_since.map(|since| since + self.config().send_timeout);
        let closing = match self.phase {
            Phase::CloseSent(until) => Some(until),
            _ => None,
        };
        match (blocked, closing) {
            (Some(blocked), Some(closing)) => Some(blocked.min(closing)),
            (blocked, closing) => blocked.or(closing),
        }
    }

    /// Writes what the socket takes now. Ready once the writer is finished: the close
    /// handshake is over (or timed out), the client is gone, or the socket failed.
    pub(super) fn poll_write<S: Socket>(
        &mut self,
        socket: &mut S,
        cx: &mut Context<'_>,
        reader_done: bool,
    ) -> Poll<()> {
        if self.phase == Phase::Done {
            return Poll::Ready(());
        }
        let now = Instant::now();
        if self.blocked_since.is_some_and(|since| now >= since + self.config().send_timeout) {
            tracing::info!(timeout = ?self.config().send_timeout, "closing slow consumer: socket write blocked");
            return self.fail(DisconnectReason::SlowConsumer);
        }
        if !matches!(self.phase, Phase::CloseSent(_)) {
            self.decide(now, reader_done);
            if self.phase == Phase::Done {
                return Poll::Ready(());
            }
        }
        let Ok(accepted) = self.write(socket, cx) else {
            return self.fail(DisconnectReason::Error);
        };
        if self.flush(socket, cx).is_err() {
            return self.fail(DisconnectReason::Error);
        }
        let written = self.waiting.is_none() && !self.unflushed;
        if written {
            self.blocked_since = None;
        } else if accepted {
            // Still behind, but the socket is taking frames: the deadline counts from here.
            self.blocked_since = Some(now);
        } else {
            self.blocked_since.get_or_insert(now);
        }
        if let Phase::CloseSent(until) = self.phase {
            // Over once the client has answered the close frame (the reader saw the end of
            // the stream) or the close timeout passed.
            if written && reader_done {
                return self.finish();
            }
            if now >= until {
                tracing::debug!("client did not acknowledge close in time");
                return self.finish();
            }
        }
        Poll::Pending
    }

    fn config(&self) -> &crate::network::ConnectionConfig {
        &self.state.config.connection
    }

    /// Before writing: whether the connection should close now, and how.
    fn decide(&mut self, now: Instant, reader_done: bool) {
        if let Some(request) = self.conn.close_request() {
            if !request.after_queue {
                // Ahead of anything still queued.
                self.close_now(close_frame_for(request));
            } else if self.phase == Phase::Open {
                // What is queued now still goes out, then the close frame.
                self.take_queue();
                self.phase = Phase::Draining;
                self.drained_close = Some(Box::new(close_frame_for(request)));
            }
            return;
        }
        if reader_done {
            // The client is gone; nobody would read a close frame.
            self.discard_burst();
            self.phase = Phase::Done;
            return;
        }
        if self.phase == Phase::Open && self.state.shutdown.closing_connections() {
            self.conn.note_disconnect(DisconnectReason::Shutdown);
            // What is queued now still goes out, then 1001.
            self.take_queue();
            self.phase = Phase::Draining;
        }
        if let Some(auth) = self.auth_deadline
            && now >= auth
        {
            self.auth_deadline = None;
            if !self.conn.is_authenticated() {
                tracing::debug!("closing connection: not authenticated in time");
                self.conn.note_disconnect(DisconnectReason::AuthTimeout);
                self.close_now(close_frame(close::POLICY_VIOLATION, close::AUTH_TIMEOUT_REASON));
                return;
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + self.config().ping_interval;
            // A handler busy with this client's message is the server's delay, not the
            // client's silence.
            let idle = self.conn.last_activity().elapsed();
            let servers_doing = self.conn.handler_busy() || self.conn.throttled();
            if !servers_doing && idle >= self.config().idle_timeout {
                tracing::debug!(?idle, "closing idle connection");
                self.conn.note_disconnect(DisconnectReason::IdleTimeout);
                self.close_now(close_frame(close::GOING_AWAY, close::IDLE_REASON));
                return;
            }
            self.sync_heartbeat();
            if self.waiting.is_none() {
                self.waiting = Some((Message::Ping(Bytes::new()), 0));
            }
        }
    }

    /// Hands frames to the socket until it stops taking them or nothing is left; `true` when
    /// it took at least one.
    fn write<S: Socket>(
        &mut self,
        socket: &mut S,
        cx: &mut Context<'_>,
    ) -> Result<bool, axum::Error> {
        let mut accepted = false;
        loop {
            if let Some((message, messages)) = self.waiting.take() {
                match Pin::new(&mut *socket).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(err)) => {
                        self.record_undelivered(messages);
                        return Err(err);
                    }
                    Poll::Pending => {
                        self.waiting = Some((message, messages));
                        return Ok(accepted);
                    }
                }
                let bytes = match &message {
                    Message::Binary(bytes) => bytes.len() as u64,
                    _ => 0,
                };
                let closing = matches!(message, Message::Close(_));
                if let Err(err) = Pin::new(&mut *socket).start_send(message) {
                    self.record_undelivered(messages);
                    return Err(err);
                }
                self.unflushed = true;
                accepted = true;
                if messages > 0 {
                    self.state.metrics.frame_sent(messages, bytes);
                }
                if closing {
                    return Ok(accepted);
                }
            }
            if let Phase::CloseSent(_) = self.phase {
                return Ok(accepted);
            }
            // Priority messages go ahead of the next frame.
            if let Some(payload) = self.conn.queue().take_priority() {
                self.waiting = Some((Message::Binary(payload), 1));
                continue;
            }
            if self.burst.is_empty() && self.phase == Phase::Open {
                self.take_queue();
            }
            match self.frames.next(&mut self.burst) {
                Next::Frame(Frame { bytes, messages }) => {
                    self.waiting = Some((Message::Binary(bytes), messages as u64));
                }
                Next::Text(text) => {
                    self.waiting = Some((Message::Text(text), 1));
                }
                Next::Close(reason) => {
                    self.conn.note_disconnect(DisconnectReason::Application);
                    self.close_now(normal_close(reason.as_deref()));
                }
                Next::Empty if self.phase == Phase::Draining => {
                    let frame = self.drained_close.take().map_or_else(
                        || close_frame(close::GOING_AWAY, close::SHUTDOWN_REASON),
                        |frame| *frame,
                    );
                    self.close_now(frame);
                }
                Next::Empty => return Ok(accepted),
            }
        }
    }

    fn flush<S: Socket>(
        &mut self,
        socket: &mut S,
        cx: &mut Context<'_>,
    ) -> Result<(), axum::Error> {
        if self.unflushed && Pin::new(&mut *socket).poll_flush(cx)?.is_ready() {
            self.unflushed = false;
        }
        Ok(())
    }

    /// Everything queued now becomes the writer's burst.
    fn take_queue(&mut self) {
        let taken = self.conn.queue().take_all();
        if taken.is_empty() {
            return;
        }
        self.state.metrics.queue_taken(taken.len());
        if self.burst.is_empty() {
            // The queue's own buffer, not a copy of it.
            self.burst = taken;
        } else {
            self.burst.extend(taken);
        }
    }

    /// Sends `frame` next, ahead of whatever the writer still holds, and nothing after it.
    fn close_now(&mut self, frame: CloseFrame) {
        self.drop_held();
        self.waiting = Some((Message::Close(Some(frame)), 0));
        self.phase = Phase::CloseSent(Instant::now() + self.config().close_timeout);
    }

    /// The connection is over for the writer (force close): what it holds is undelivered.
    pub(super) fn abandon(&mut self) {
        self.drop_held();
        self.phase = Phase::Done;
    }

    fn fail(&mut self, why: DisconnectReason) -> Poll<()> {
        self.conn.note_disconnect(why);
        self.finish()
    }

    fn finish(&mut self) -> Poll<()> {
        self.abandon();
        Poll::Ready(())
    }

    /// Drops what the writer holds (its burst and the frame waiting for the socket), counted
    /// as undelivered.
    fn drop_held(&mut self) {
        self.discard_burst();
        if let Some((_, messages)) = self.waiting.take() {
            self.record_undelivered(messages);
        }
    }

    fn discard_burst(&mut self) {
        // Keep a quiet connection free of the buffer.
        let burst = std::mem::take(&mut self.burst);
        self.record_undelivered(undelivered(&burst));
    }

    fn record_undelivered(&self, messages: u64) {
        if messages > 0 {
            tracing::debug!(undelivered = messages, "messages not written");
            self.conn.record_undelivered(messages);
        }
    }

    /// Copies the activity clock into the metadata handlers read, once per ping interval
    /// rather than per frame; skipped if a handler holds the lock.
    fn sync_heartbeat(&self) {
        if let Ok(mut metadata) = self.conn.metadata.try_write() {
            metadata.last_heartbeat = self.conn.last_activity();
        }
    }
}

fn normal_close(reason: Option<&str>) -> CloseFrame {
    close_frame(close::NORMAL, reason.unwrap_or(""))
}

fn close_frame_for(request: &CloseRequest) -> CloseFrame {
    close_frame(request.code, &request.reason)
}

/// A close frame whose reason is cut to the protocol's 123-byte limit on a character boundary.
pub(super) fn close_frame(code: u16, reason: &str) -> CloseFrame {
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

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close_frame(close::GOING_AWAY, &reason);
        assert_eq!(frame.reason.len(), 122);
        assert_eq!(close_frame(close::GOING_AWAY, "short").reason.as_str(), "short");
    }
}
