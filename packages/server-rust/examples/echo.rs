//! An echo server: every WebSocket message, binary or text, comes straight back to its sender
//! as it came, and `POST /sync` answers with the request body. Reads the binary's
//! permessage-deflate and message-size variables (see `support/mod.rs`); the Autobahn
//! conformance run in `.ci/run` drives it.
//!
//! ```sh
//! cargo run -p topgun-server --example echo -- 127.0.0.1:8080
//! TOPGUN_PERMESSAGE_DEFLATE=true cargo run -p topgun-server --example echo -- 127.0.0.1:8080
//! ```

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;

use bytes::Bytes;
use topgun_server::network::{
    ConnectionHandle, InboundHandler, NetworkModule, OutboundMessage, SyncError, Utf8Bytes,
    shutdown_signal,
};

/// Sends each message back on the connection it came from.
struct Echo;

#[async_trait::async_trait]
impl InboundHandler for Echo {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        echo(conn, OutboundMessage::Binary(payload)).await;
    }

    async fn on_text(&self, conn: &Arc<ConnectionHandle>, text: Utf8Bytes) {
        echo(conn, OutboundMessage::Text(text)).await;
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        Ok(body)
    }
}

async fn echo(conn: &ConnectionHandle, message: OutboundMessage) {
    // Waiting for queue space applies backpressure to this client's reads only.
    let timeout = std::time::Duration::from_secs(5);
    if let Err(err) = conn.send_timeout(message, timeout).await {
        tracing::debug!(conn_id = %conn.id, %err, "echo dropped");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let config = support::config_from_args()?;
    let host = config.host.clone();
    let stop = shutdown_signal()?;
    let mut module = NetworkModule::new(config).with_handler(Echo);
    let port = module.start().await?;
    println!("echo server on ws://{host}:{port}/ws");
    module.serve(stop).await
}
