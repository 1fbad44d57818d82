//! An echo server: every binary WebSocket message comes straight back to its sender, and
//! `POST /sync` answers with the request body.
//!
//! ```sh
//! cargo run -p topgun-server --example echo -- 127.0.0.1:8080
//! ```

use std::sync::Arc;

use bytes::Bytes;
use topgun_server::network::{
    ConnectionHandle, InboundHandler, NetworkConfig, NetworkModule, OutboundMessage, SyncError,
    shutdown_signal,
};

/// Sends each message back on the connection it came from.
struct Echo;

#[async_trait::async_trait]
impl InboundHandler for Echo {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        // Waiting for queue space applies backpressure to this client's reads only.
        let timeout = std::time::Duration::from_secs(5);
        if let Err(err) = conn.send_timeout(OutboundMessage::Binary(payload), timeout).await {
            tracing::debug!(conn_id = %conn.id, %err, "echo dropped");
        }
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        Ok(body)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let (host, port) =
        addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("expected HOST:PORT"))?;
    let config = NetworkConfig { host: host.to_owned(), port: port.parse()?, ..Default::default() };
    let stop = shutdown_signal()?;
    let mut module = NetworkModule::new(config).with_handler(Echo);
    let port = module.start().await?;
    println!("echo server on ws://{host}:{port}/ws");
    module.serve(stop).await
}
