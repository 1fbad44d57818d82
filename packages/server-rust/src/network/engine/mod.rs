//! The WebSocket engine: what happens to one upgraded connection, from registration to removal.
//!
//! ```text
//! inbound:   socket → reader.rs → InboundHandler (answer_inline at once, on_message in order)
//! outbound:  ConnectionHandle / ConnectionRegistry → queue → writer.rs → socket
//!            (priority lane first; the rest coalesced into BATCH frames by batch.rs)
//! shutdown:  ShutdownController tokens → writer.rs (queued messages, then Close) → reader.rs
//! ```
//!
//! [`serve_connection`] is the connection's lifecycle, in the order a handler relies on:
//! register (invisible to broadcasts) → writer spawned → `on_connect` → broadcasts reach it →
//! reader until the client leaves or the server closes it → writer finishes → removed from the
//! registry → `on_disconnect`, exactly once. The reader and the writer are tied together by
//! two cancellation tokens: `reader_done` tells the writer the client is gone, and
//! `force_close` (a child of the server's force-close token) stops both at once. Close requests
//! from anywhere ([`ConnectionHandle::close_with`]) reach the writer through the connection.

mod reader;
mod writer;

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::NetworkConfig;
use super::connection::{ConnectionHandle, ConnectionRegistry, DisconnectReason, OutboundMessage};
use super::inbound::{InboundHandler, call_guarded};
use super::metrics::TransportMetrics;
use super::shutdown::ShutdownController;
use reader::Reader;
use writer::Writer;

/// The socket's sending half, owned by the writer.
type Sink = SplitSink<WebSocket, Message>;

/// What the engine uses of the server, the same for every connection (all shared pointers).
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) registry: Arc<ConnectionRegistry>,
    pub(crate) shutdown: Arc<ShutdownController>,
    pub(crate) config: Arc<NetworkConfig>,
    pub(crate) handler: Arc<dyn InboundHandler>,
    pub(crate) metrics: Arc<TransportMetrics>,
}

/// Runs one registered connection to its end.
pub(crate) async fn serve_connection(
    state: &Shared,
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
    // Only now: whatever the handler queued in `on_connect` (an AUTH_REQUIRED, a welcome)
    // is the first thing the client receives.
    conn.accept_broadcasts();
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
