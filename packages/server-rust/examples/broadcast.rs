//! A chat-style fan-out: every binary message a client sends is broadcast to all connected
//! clients, and a ticker broadcasts the connection count every second.
//!
//! ```sh
//! cargo run -p topgun-server --example broadcast -- 127.0.0.1:8080
//! ```

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use topgun_server::network::{
    ConnectionHandle, ConnectionKind, ConnectionRegistry, InboundHandler, NetworkModule,
    shutdown_signal,
};

/// Relays each message to every client through the shared registry.
struct Relay {
    registry: Arc<ConnectionRegistry>,
}

#[async_trait::async_trait]
impl InboundHandler for Relay {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        // One allocation shared by all recipients; full queues skip the message, never block.
        let outcome = self.registry.broadcast(payload, ConnectionKind::Client);
        if outcome.dropped > 0 {
            tracing::info!(from = %conn.id, dropped = outcome.dropped, "slow clients missed a message");
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let config = support::config_from_args()?;
    let host = config.host.clone();
    let stop = shutdown_signal()?;
    let module = NetworkModule::new(config);
    let registry = module.registry();
    let mut module = module.with_handler(Relay { registry: Arc::clone(&registry) });
    let port = module.start().await?;
    println!("broadcast server on ws://{host}:{port}/ws");

    let ticker = tokio::spawn(async move {
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        loop {
            every_second.tick().await;
            let count = u64::try_from(registry.count()).unwrap_or(u64::MAX);
            // MsgPack map {"type": "CLIENTS", "count": n}, as a TopGun client would decode it.
            let message =
                rmp_serde::to_vec_named(&serde_json::json!({ "type": "CLIENTS", "count": count }))
                    .expect("a JSON value always encodes");
            registry.broadcast(message, ConnectionKind::Client);
        }
    });
    let result = module.serve(stop).await;
    ticker.abort();
    result
}
