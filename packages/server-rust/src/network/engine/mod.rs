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
//! for the handler. Nothing else is allocated per connection: no second task, no channel
//! block, no per-connection cancellation token. Everything that should make the connection
//! act (a queued message, a close request, a shutdown) wakes it through the one waker of its
//! [`OutboundQueue`](crate::network::queue::OutboundQueue); the task then looks at atomics.
//!
//! [`run`] is the connection's lifecycle, in the order a handler relies on:
//! register (invisible to broadcasts) → `on_connect` (while its call runs, what it queues is
//! already written and the client's messages wait for it) → broadcasts reach it → read and
//! write until the client leaves or the server closes it → removed from the registry →
//! `on_disconnect`, exactly once.

mod reader;
pub(crate) mod socket;
mod writer;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use super::admission::{Admission, Admitted};
use super::config::NetworkConfig;
use super::connection::{ConnectionKind, DisconnectReason};
use super::handle::ConnectionHandle;
use super::inbound::{InboundHandler, call_guarded};
use super::metrics::TransportMetrics;
use super::registry::ConnectionRegistry;
use super::shutdown::ShutdownController;
use reader::Reader;
use socket::Socket;
use writer::Writer;

/// What the engine uses of the server, the same for every connection (all shared pointers).
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) registry: Arc<ConnectionRegistry>,
    pub(crate) shutdown: Arc<ShutdownController>,
    pub(crate) config: Arc<NetworkConfig>,
    pub(crate) handler: Arc<dyn InboundHandler>,
    pub(crate) metrics: Arc<TransportMetrics>,
    pub(crate) admission: Arc<Admission>,
}

/// Registers an upgraded socket and returns the future that serves it to its end, holding
/// `slot` (its places under `max_connections` and `max_connections_per_ip`) until then.
///
/// Every open connection is this future, so what it owns is moved in once, here, and used in
/// place: the socket is not moved again once the future runs.
pub(crate) fn run<S: Socket + 'static>(
    shared: Shared,
    socket: S,
    slot: Admitted,
    peer: Option<SocketAddr>,
) -> impl Future<Output = ()> + Send {
    let conn =
        shared.registry.register_pending(ConnectionKind::Client, &shared.config.connection, peer);
    shared.metrics.connection_opened(conn.kind);
    let span = tracing::info_span!("conn", id = %conn.id, peer = peer.map(tracing::field::display));
    serve(shared, conn, socket, slot).instrument(span)
}

/// The connection's lifecycle; see the module docs.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep a second copy of each argument
fn serve<S: Socket>(
    state: Shared,
    conn: Arc<ConnectionHandle>,
    mut socket: S,
    slot: Admitted,
) -> impl Future<Output = ()> + Send {
    async move {
        tracing::debug!("connected");
        state.shutdown.serve_registry(&state.registry);
        {
            let compresses_from = socket.compresses_from();
            let mut connection = Connection {
                socket: &mut socket,
                reader: Reader::new(&conn, &state),
                writer: Writer::new(&conn, &state, compresses_from),
            };
            let mut timer = pin!(tokio::time::sleep_until(connection.writer.deadline()));
            poll_fn(|cx| connection.poll_run(cx, timer.as_mut())).await;
        }
        drop(socket);

        // Nothing reads the queue any more: later sends fail, leftovers count as undelivered.
        conn.close_queue();
        if state.shutdown.forcing_close() {
            conn.note_disconnect(DisconnectReason::Shutdown);
        }
        let reason = conn.disconnect_reason();
        if state.registry.remove(conn.id).is_some() {
            state.metrics.connection_closed(conn.kind, reason);
            let _in_flight = state.shutdown.in_flight_guard();
            call_guarded("on_disconnect", state.handler.on_disconnect(&conn)).await;
        }
        tracing::debug!(
            reason = reason.as_str(),
            dropped = conn.dropped_messages(),
            "disconnected"
        );
        drop(slot);
    }
}

/// One connection's socket and its two halves.
struct Connection<'a, S> {
    socket: &'a mut S,
    reader: Reader<'a>,
    writer: Writer<'a>,
}

impl<S: Socket> Connection<'_, S> {
    /// Makes whatever progress the socket, the handler and the queue allow; ready once the
    /// reader and the writer are both finished.
    fn poll_run(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<()> {
        // Registered before anything is looked at, so a message, close request or shutdown
        // that lands meanwhile wakes the task again.
        self.writer.register(cx);
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
            let deadline =
                self.writer.deadline().min(self.reader.resume_at().unwrap_or(far_future()));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                // A deadline is due: let the writer act on it in a fresh poll.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}

/// The instant after which nothing is due: the timer's resting deadline.
fn far_future() -> Instant {
    // About 30 years, as tokio's own `Instant::far_future`.
    Instant::now() + std::time::Duration::from_secs(86_400 * 365 * 30)
}
