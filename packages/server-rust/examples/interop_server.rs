//! The server the interoperability scripts in `packages/interop/` run against: an echo server
//! that also answers a burst request, so real clients can be shown unpacking `BATCH` frames.
//!
//! - A binary message that decodes as the MsgPack map `{"type": "BURST", "count": n}` is answered
//!   with `n` messages `{"type": "ITEM", "seq": i}` queued at once; they reach the client
//!   coalesced into `BATCH` frames.
//! - Any other binary message is echoed back unchanged.
//! - `POST /sync` echoes its MsgPack body.
//!
//! It runs on a single-threaded runtime, so a burst is always fully queued before the
//! connection's writer runs: the coalescing the scripts check is then deterministic.
//!
//! ```sh
//! cargo run -p topgun-server --example interop_server -- --port 8080
//! ```

use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use serde::{Deserialize, Serialize};
use topgun_server::network::{
    ConnectionHandle, DeflateConfig, InboundHandler, NetworkConfig, NetworkModule, OutboundMessage,
    ShutdownConfig, SyncError, shutdown_signal,
};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Seconds spent draining before the listener closes on SIGTERM.
    #[arg(long, default_value_t = 0)]
    shutdown_grace_secs: u64,
    /// Offer permessage-deflate to clients that ask for it (as the binary's flag).
    #[arg(long, env = "TOPGUN_PERMESSAGE_DEFLATE")]
    permessage_deflate: bool,
    /// Messages shorter than this go uncompressed under --permessage-deflate.
    #[arg(long, env = "TOPGUN_DEFLATE_THRESHOLD", default_value_t = DeflateConfig::default().threshold)]
    deflate_threshold: usize,
}

#[derive(Deserialize)]
struct Command {
    #[serde(rename = "type")]
    kind: String,
    count: Option<u32>,
}

#[derive(Serialize)]
struct Item {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u32,
}

struct Interop;

#[async_trait::async_trait]
impl InboundHandler for Interop {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        match rmp_serde::from_slice::<Command>(&payload) {
            Ok(Command { kind, count: Some(count) }) if kind == "BURST" => {
                for seq in 0..count {
                    let item =
                        rmp_serde::to_vec_named(&Item { kind: "ITEM", seq }).expect("encodes");
                    conn.try_send(OutboundMessage::Binary(item.into()));
                }
            }
            _ => {
                conn.try_send(OutboundMessage::Binary(payload));
            }
        }
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        Ok(body)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args = Args::parse();
    let mut config = NetworkConfig {
        host: args.host,
        port: args.port,
        shutdown: ShutdownConfig {
            grace_period: std::time::Duration::from_secs(args.shutdown_grace_secs),
            ..ShutdownConfig::default()
        },
        ..NetworkConfig::default()
    };
    let threshold = args.deflate_threshold;
    config.connection.permessage_deflate =
        args.permessage_deflate.then(|| DeflateConfig { threshold, ..DeflateConfig::default() });
    let mut module = NetworkModule::new(config).with_handler(Interop);
    let stop = shutdown_signal()?;
    let port = module.start().await?;
    println!("interop server listening on port {port}");
    module.serve(stop).await
}
