//! registry → queue → writer → socket: drains a connection's outbound queue onto its socket.
//!
//! Priority messages go first, each as a frame of its own; queued `Binary` messages are
//! coalesced into `BATCH` frames ([`FrameBuilder`]) and flushed once per burst. The writer
//! also pings the client, closes idle and (with `auth_timeout`) unauthenticated connections,
//! and sends the close frame however a connection ends: application close, shutdown, limits.
//! A socket write blocked for longer than `send_timeout` ends the connection.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Sink;
use crate::network::batch::{Frame, FrameBuilder};
use crate::network::close::{self, CloseRequest};
use crate::network::config::{ConnectionConfig, NetworkConfig};
use crate::network::connection::{
    ConnectionHandle, ConnectionKind, DisconnectReason, OutboundMessage,
};
use crate::network::metrics::TransportMetrics;

pub(super) struct Writer {
    pub(super) conn: Arc<ConnectionHandle>,
    /// Shared rather than cloned: every open connection's writer holds this.
    pub(super) config: Arc<NetworkConfig>,
    /// Drop everything now (drain deadline passed).
    pub(super) force_close: CancellationToken,
    /// The reader has finished: the client is gone or will not acknowledge anything more.
    pub(super) reader_done: CancellationToken,
    /// Graceful shutdown: send what is queued, then 1001.
    pub(super) server_closing: CancellationToken,
    pub(super) metrics: Arc<TransportMetrics>,
}

/// How a burst of queued messages ended.
enum Burst {
    /// The queue had no more ready messages.
    Drained,
    /// An [`OutboundMessage::Close`] was dequeued; everything before it was written.
    CloseRequested(Option<String>),
}

impl Writer {
    /// Drains the outbound queue onto the socket, pings, and closes the connection when asked.
    ///
    /// A plain `fn` returning an `async move` block: the block uses its captures in place,
    /// where an `async fn` would also keep a second copy of each argument in its state.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run(
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
        let mut undelivered = self.conn.discard_priority();
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
        // Boxed, and only when configured: most servers never set it, and every idle
        // connection's writer would carry the timer.
        let mut auth_deadline = match self.config.connection.auth_timeout {
            Some(timeout) if self.conn.kind == ConnectionKind::Client => {
                Some(Box::pin(tokio::time::sleep(timeout)))
            }
            _ => None,
        };
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
                () = self.conn.priority_queued() => {
                    Box::pin(self.write_with_deadline(sink, queue, None)).await?
                }
                () = async { if let Some(deadline) = auth_deadline.as_mut() { deadline.await } }, if auth_deadline.is_some() => {
                    auth_deadline = None;
                    if !self.conn.is_authenticated() {
                        tracing::debug!("closing connection: not authenticated in time");
                        self.conn.note_disconnect(DisconnectReason::AuthTimeout);
                        return Some(close_frame(close::POLICY_VIOLATION, close::AUTH_TIMEOUT_REASON));
                    }
                    Burst::Drained
                }
                _ = ping.tick() => {
                    // A handler busy with this client's message is the server's delay, not
                    // the client's silence.
                    if !self.conn.handler_busy()
                        && self.conn.last_activity().elapsed() >= self.config.connection.idle_timeout
                    {
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
        let burst =
            write_burst(sink, queue, first, &self.conn, &self.config.connection, &self.metrics);
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

/// Writes the waiting priority messages, then `first` and every message already queued behind
/// it (at most one queue's worth), coalescing them into frames, then flushes once. Priority
/// messages that arrive meanwhile go out before the next frame.
async fn write_burst(
    sink: &mut Sink,
    queue: &mut mpsc::Receiver<OutboundMessage>,
    first: Option<OutboundMessage>,
    conn: &ConnectionHandle,
    config: &ConnectionConfig,
    metrics: &TransportMetrics,
) -> Result<Burst, axum::Error> {
    let mut in_hand = InHand { conn, messages: 0 };
    write_priority(sink, &mut in_hand, metrics).await?;
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
                in_hand.messages += 1;
                if let Some(frame) = frames.push(payload) {
                    write_priority(sink, &mut in_hand, metrics).await?;
                    feed(sink, frame, &mut in_hand, metrics).await?;
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
    write_priority(sink, &mut in_hand, metrics).await?;
    if let Some(frame) = frames.finish() {
        feed(sink, frame, &mut in_hand, metrics).await?;
    }
    sink.flush().await?;
    Ok(end)
}

/// Messages taken off the queue or the priority lane and not yet handed to the socket. A
/// burst that ends early (a failed write, the send deadline, a force close dropping it) counts
/// them as undelivered instead of losing them silently.
struct InHand<'a> {
    conn: &'a ConnectionHandle,
    messages: u64,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if self.messages > 0 {
            self.conn.record_undelivered(self.messages);
        }
    }
}

/// Queues every waiting priority message on the socket, each as a frame of its own.
async fn write_priority(
    sink: &mut Sink,
    in_hand: &mut InHand<'_>,
    metrics: &TransportMetrics,
) -> Result<(), axum::Error> {
    while let Some(payload) = in_hand.conn.take_priority() {
        in_hand.messages += 1;
        feed(sink, Frame::single(payload), in_hand, metrics).await?;
    }
    Ok(())
}

/// Queues one frame on the socket (without flushing); once the socket has taken it, its
/// messages count as sent.
async fn feed(
    sink: &mut Sink,
    frame: Frame,
    in_hand: &mut InHand<'_>,
    metrics: &TransportMetrics,
) -> Result<(), axum::Error> {
    let (messages, bytes) = (frame.messages as u64, frame.bytes.len() as u64);
    sink.feed(Message::Binary(frame.bytes)).await?;
    in_hand.messages -= messages;
    metrics.frames_sent.increment(1);
    metrics.messages_sent.increment(messages);
    metrics.bytes_sent.increment(bytes);
    #[allow(clippy::cast_precision_loss)] // bounded by max_batch_messages
    metrics.batch_messages.record(messages as f64);
    Ok(())
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

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close_frame(close::GOING_AWAY, &reason);
        assert_eq!(frame.reason.len(), 122);
        assert_eq!(close_frame(close::GOING_AWAY, "short").reason.as_str(), "short");
    }
}
