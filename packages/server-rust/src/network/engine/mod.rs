//! The WebSocket engine: what happens to one upgraded connection, from registration to removal.
//!
//! ```text
//! inbound:   socket → reader.rs → InboundHandler (answer_inline at once, on_message in order)
//! outbound:  ConnectionHandle / ConnectionRegistry → queue → writer.rs → socket
//!            (priority lane first; the rest coalesced into BATCH frames by batch.rs)
//! shutdown:  ShutdownController (wakes every connection of its registry) → writer.rs
//!            (queued messages, then Close) → reader.rs
//! ```
//!
//! One connection is one task and one future, [`Connection`]: it owns the socket unsplit and
//! polls its two halves side by side, so the reader never waits for the writer nor the writer
//! for the handler. While the writer holds nothing for the socket, it lends the socket to the
//! queue's senders, which then write a message themselves without waking the task (`queue.rs`;
//! a plain-TCP HTTP/1.1 connection served by [`NetworkModule`](crate::network::NetworkModule)).
//! Nothing else is allocated per connection: no second task, no channel block, no
//! per-connection cancellation token, no timer while it is idle. Everything that should make
//! the connection act (a queued message, a close request, a shutdown, the registry's clock
//! when a ping is due) wakes it through the one waker of its
//! [`OutboundQueue`](crate::network::connections::queue::OutboundQueue); the task then looks at atomics.
//!
//! [`run`] is the connection's lifecycle, in the order a handler relies on:
//! register (invisible to broadcasts) → `on_connect` (while its call runs, what it queues is
//! already written and the client's messages wait for it) → broadcasts reach it → read and
//! write until the client leaves or the server closes it → removed from the registry and its
//! topics → `on_disconnect`, exactly once → each disconnect listener, in the order added →
//! extensions dropped.

pub(crate) mod batch;
mod clock;
pub(crate) mod deflate;
pub(crate) mod direct;
mod reader;
pub(crate) mod socket;
mod writer;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ws::Message;
use futures_util::SinkExt;
use tokio::time::Sleep;
use tracing::Instrument;

use crate::network::close;
use crate::network::config::NetworkConfig;
use crate::network::connection::{ConnectionKind, DisconnectReason};
use crate::network::connections::handle::ConnectionHandle;
use crate::network::connections::queue::DirectWrite;
use crate::network::connections::registry::ConnectionRegistry;
use crate::network::edge::admission::{Admission, Admitted};
use crate::network::inbound::{InboundHandler, call_guarded};
use crate::network::metrics::PanicSource;
use crate::network::metrics::TransportMetrics;
use crate::network::shutdown::ShutdownController;
use reader::Reader;
use socket::Socket;
use writer::Writer;

/// What the engine uses of the server, the same for every connection: one pointer per
/// connection, not one per part.
pub(crate) struct Shared {
    pub(crate) registry: Arc<ConnectionRegistry>,
    pub(crate) shutdown: Arc<ShutdownController>,
    pub(crate) config: Arc<NetworkConfig>,
    pub(crate) handler: Arc<dyn InboundHandler>,
    pub(crate) metrics: Arc<TransportMetrics>,
    pub(crate) admission: Arc<Admission>,
    /// What the transport's own framing reads of `config`, worked out once.
    pub(crate) socket_limits: Arc<socket::Limits>,
    /// How often the registry's clock looks for connections that are due.
    pub(crate) clock_tick: std::time::Duration,
}

impl Shared {
    pub(crate) fn new(
        registry: &Arc<ConnectionRegistry>,
        shutdown: &Arc<ShutdownController>,
        config: &Arc<NetworkConfig>,
        handler: &Arc<dyn InboundHandler>,
        metrics: &Arc<TransportMetrics>,
        admission: &Arc<Admission>,
    ) -> Self {
        Self {
            registry: Arc::clone(registry),
            shutdown: Arc::clone(shutdown),
            config: Arc::clone(config),
            handler: Arc::clone(handler),
            metrics: Arc::clone(metrics),
            admission: Arc::clone(admission),
            socket_limits: Arc::new(socket::Limits::new(&config.connection)),
            clock_tick: clock::tick(&config.connection),
        }
    }
}

/// Registers an upgraded socket and returns the future that serves it to its end, holding
/// `slot` (its places under `max_connections` and `max_connections_per_ip`) until then.
///
/// Every open connection is this future, so what it owns is moved in once, here, and used in
/// place: the socket is not moved again once the future runs.
///
/// With `direct`, the socket's TCP stream, the queue's senders write to it themselves while the
/// writer holds nothing for it.
pub(crate) fn run<S: Socket + 'static>(
    shared: Arc<Shared>,
    socket: S,
    slot: Admitted,
    peer: Option<SocketAddr>,
    direct: Option<Arc<dyn DirectWrite>>,
) -> impl Future<Output = ()> + Send {
    let conn =
        shared.registry.register_pending(ConnectionKind::Client, &shared.config.connection, peer);
    if let Some(direct) = direct {
        conn.queue().attach_direct(direct);
    }
    shared.metrics.connection_opened(conn.kind);
    let span = tracing::info_span!("conn", id = %conn.id, peer = peer.map(tracing::field::display));
    serve(shared, conn, socket, slot).instrument(span)
}

/// The connection's lifecycle; see the module docs.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep a second copy of each argument
fn serve<S: Socket>(
    state: Arc<Shared>,
    conn: Arc<ConnectionHandle>,
    mut socket: S,
    slot: Admitted,
) -> impl Future<Output = ()> + Send {
    async move {
        tracing::debug!("connected");
        state.shutdown.serve_registry(&state.registry);
        clock::ensure_running(&state);
        {
            let compresses_from = socket.compresses_from();
            let mut connection = Connection {
                socket: &mut socket,
                reader: Reader::new(&conn, &state),
                writer: Writer::new(&conn, &state, compresses_from),
                timer: None,
            };
            let ran =
                poll_fn(|cx| match catch_unwind(AssertUnwindSafe(|| connection.poll_run(cx))) {
                    Ok(poll) => poll.map(Ok),
                    Err(panic) => Poll::Ready(Err(panic)),
                })
                .await;
            if ran.is_err() {
                transport_failed(&state, &conn);
                // The halves may be mid-frame: a close frame goes out only on a socket that
                // holds nothing half-written, and only for as long as a close may take.
                if connection.socket.holds_nothing() {
                    let close = Message::Close(Some(writer::close_frame(
                        close::INTERNAL_ERROR,
                        close::HANDLER_FAILED_REASON,
                    )));
                    let timeout = state.config.connection.close_timeout;
                    let _ = tokio::time::timeout(timeout, connection.socket.send(close)).await;
                }
            }
        }
        conn.wake_at(None);
        drop(socket);

        // Nothing reads the queue any more: later sends fail, leftovers count as undelivered.
        conn.close_queue();
        if state.shutdown.forcing_close() {
            conn.note_disconnect(DisconnectReason::Shutdown);
        }
        let reason = conn.disconnect_reason();
        let removed = state.registry.remove(conn.id).is_some();
        // Out of its topics before anyone is told: a publish no longer counts it.
        state.registry.topics().unsubscribe_all(&conn).await;
        if removed {
            state.metrics.connection_closed(conn.kind, reason);
            let _in_flight = state.shutdown.in_flight_guard();
            if call_guarded("on_disconnect", state.handler.on_disconnect(&conn)).await.is_none() {
                state.metrics.panicked(PanicSource::Handler);
            }
            for listener in state.registry.disconnect_listeners().all().iter() {
                let told = listener.on_disconnect(&conn, reason);
                if call_guarded("disconnect listener", told).await.is_none() {
                    state.metrics.panicked(PanicSource::Handler);
                }
            }
        }
        conn.clear_extensions();
        tracing::debug!(
            reason = reason.as_str(),
            dropped = conn.dropped_messages(),
            "disconnected"
        );
        drop(slot);
    }
}

/// The connection's own code panicked: whatever it was doing is abandoned, the connection is
/// counted and logged (in its span) and closes with 1011; the thread and every other
/// connection go on.
fn transport_failed(state: &Shared, conn: &ConnectionHandle) {
    state.metrics.panicked(PanicSource::Transport);
    tracing::error!("connection task panicked; closing the connection with 1011");
    conn.note_disconnect(DisconnectReason::Error);
}

/// One connection's socket and its two halves.
struct Connection<'a, S> {
    socket: &'a mut S,
    reader: Reader<'a>,
    writer: Writer<'a>,
    /// The connection's own timer, only while a deadline that must be met to the millisecond
    /// is pending (see `clock.rs`).
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S: Socket> Connection<'_, S> {
    /// Makes whatever progress the socket, the handler and the queue allow; ready once the
    /// reader and the writer are both finished.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before anything is looked at, so a message, close request or shutdown
        // that lands meanwhile wakes the task again.
        self.writer.register(cx);
        if !self.writer.take_socket(self.socket) {
            // A sender is writing to the socket; it wakes the task when it is done.
            return Poll::Pending;
        }
        if self.writer.force_closed() && !self.writer.is_done() {
            // The drain deadline passed: nothing more is read or written.
            self.reader.stop();
            self.writer.abandon();
        }
        let mut reader_done = self.reader.poll_read(self.socket, cx).is_ready();
        let writer_done = self.writer.poll_write(self.socket, cx, reader_done).is_ready();
        if writer_done && !reader_done {
            // The writer has closed the connection or given up on it: finish the handler
            // call in progress, read and handle nothing more.
            self.reader.stop();
            reader_done = self.reader.poll_read(self.socket, cx).is_ready();
        }
        if reader_done && writer_done {
            return Poll::Ready(());
        }
        if !writer_done {
            self.writer.publish_deadline();
            self.poll_timer(cx);
            self.writer.lend_socket(self.socket);
        }
        Poll::Pending
    }

    /// Arms the connection's own timer for its precise deadlines, if it has any now.
    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        let precise = match (self.writer.precise_deadline(), self.reader.resume_at()) {
            (Some(writer), Some(reader)) => Some(writer.min(reader)),
            (writer, reader) => writer.or(reader),
        };
        let Some(deadline) = precise else {
            self.timer = None;
            return;
        };
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            // A deadline is due: let the writer act on it in a fresh poll.
            cx.waker().wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

    use super::*;
    use crate::network::{ConnectionConfig, NetworkConfig, NetworkModule, OutboundMessage};

    /// An upgraded stream whose reads panic once the client has sent anything: a bug in the
    /// transport's own code, below the handler.
    struct PanicsOnRead(DuplexStream);

    impl AsyncRead for PanicsOnRead {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let polled = Pin::new(&mut self.0).poll_read(cx, buf);
            assert_eq!(buf.filled().len(), before, "a bug in the connection's own code");
            polled
        }
    }

    impl AsyncWrite for PanicsOnRead {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_panic_in_the_connections_own_code_closes_only_that_connection_with_1011() {
        let module = NetworkModule::new(NetworkConfig::default());
        let state = module.app_state();
        let shared = Arc::clone(&state.engine);
        let (server_io, mut client) = tokio::io::duplex(4096);
        let socket = socket::FrameSocket::new(
            PanicsOnRead(server_io),
            None,
            Arc::clone(&shared.socket_limits),
        );
        let slot = Admitted { server_wide: None, per_ip: None };
        let served = tokio::spawn(run(Arc::clone(&shared), socket, slot, None, None));
        let (bystander, mut bystander_queue) =
            state.registry.register(ConnectionKind::Client, &ConnectionConfig::default());

        // A masked, empty binary frame: reading it panics.
        client.write_all(&[0x82, 0x80, 1, 2, 3, 4]).await.unwrap();
        let mut close = [0_u8; 4];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut close))
            .await
            .expect("a close frame")
            .unwrap();
        assert_eq!(close[0], 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), close::INTERNAL_ERROR);
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection's task ends")
            .expect("without unwinding out of it");

        assert_eq!(state.registry.count(), 1, "only the bystander is left");
        let rendered = state.metrics.render(&state.registry, &state.shutdown, state.start_time);
        assert!(rendered.contains("topgun_panics_total{source=\"transport\"} 1"), "{rendered}");
        assert!(
            rendered
                .contains("topgun_connections_closed_total{kind=\"client\",reason=\"error\"} 1")
        );
        assert!(bystander.try_send(OutboundMessage::Binary(vec![1].into())));
        assert_eq!(bystander_queue.try_recv().unwrap(), OutboundMessage::Binary(vec![1].into()));
    }
}
