//! A server that TopGun's TypeScript client talks to as it would to a real one, built only
//! from the library's extension points. The end-to-end suite in
//! `packages/interop/topgun-client/` runs against it.
//!
//! - [`Heartbeat`] answers the client's `PING`s with top-level `PONG`s.
//! - Handshake: `DEVICE_HELLO` is answered with `DEVICE_ACK`, `AUTH` with `AUTH_ACK`, both as
//!   priority messages (`try_send_priority`); either marks the connection authenticated.
//! - `--ticks-per-second N` broadcasts `{type: "TICK", seq}` to authenticated clients only, in
//!   bursts of `--tick-burst` messages (so they reach the client coalesced into `BATCH`
//!   frames), through `broadcast_cooperative_to`.
//! - `{type: "BIG", bytes: n}` is answered with a message of exactly `n` bytes
//!   (`{type: "BIG", data: <bin>}`), to show large outbound messages arrive.
//! - Topics, as TopGun's client speaks them: `TOPIC_SUB` / `TOPIC_UNSUB` subscribe and
//!   unsubscribe the connection through the registry's [`Topics`], and `TOPIC_PUB` is relayed
//!   as `TOPIC_MESSAGE {topic, data, publisherId, timestamp}` to every other subscriber
//!   (`publish_cooperative_except`: the publisher does not hear itself, and a burst of
//!   publishes waits for the subscribers' writers). A subscription past the connection's
//!   topic limit is answered `{type: "ERROR", payload: {code: 429, message}}`.
//! - `POST /sync` decodes the client's request (`clientId`, `clientHlc` with `millis` as the
//!   client's float64) and answers `{serverHlc, seen: {...}}`, where `seen` repeats what the
//!   handler was given: the bearer token, content type, request id, peer, client id and HLC.
//!
//!
//! [`Topics`]: topgun_server::network::Topics
//!
//! ```sh
//! cargo run -p topgun-server --example handshake_server -- --port 8080 --ticks-per-second 1000
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use serde::{Deserialize, Serialize};
use topgun_core::{HybridClock, Principal, Timestamp};
use topgun_server::network::{
    ConnectionHandle, ConnectionKind, ConnectionRegistry, DeflateConfig, Heartbeat, InboundHandler,
    NetworkConfig, NetworkModule, OutboundMessage, SyncError, SyncRequest, shutdown_signal,
};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Messages per second broadcast to authenticated clients (0: none).
    #[arg(long, default_value_t = 0)]
    ticks_per_second: u32,
    /// Messages queued together per broadcast round.
    #[arg(long, default_value_t = 10)]
    tick_burst: u32,
    /// Offer permessage-deflate to clients that ask for it (as the binary's flag).
    #[arg(long, env = "TOPGUN_PERMESSAGE_DEFLATE")]
    permessage_deflate: bool,
    /// Messages shorter than this go uncompressed under --permessage-deflate.
    #[arg(long, env = "TOPGUN_DEFLATE_THRESHOLD", default_value_t = DeflateConfig::default().threshold)]
    deflate_threshold: usize,
}

#[derive(Deserialize)]
struct Request {
    #[serde(rename = "type")]
    kind: String,
    bytes: Option<usize>,
    payload: Option<TopicRequest>,
}

/// The payload of `TOPIC_SUB`, `TOPIC_UNSUB` and `TOPIC_PUB`.
#[derive(Deserialize)]
struct TopicRequest {
    topic: String,
    /// Any MsgPack value; relayed as it came (nil when absent).
    #[serde(default = "nil")]
    data: rmpv::Value,
}

fn nil() -> rmpv::Value {
    rmpv::Value::Nil
}

#[derive(Serialize)]
struct TopicMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    payload: TopicDelivery<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TopicDelivery<'a> {
    topic: &'a str,
    data: &'a rmpv::Value,
    publisher_id: String,
    timestamp: u64,
}

#[derive(Serialize)]
struct ErrorMessage {
    #[serde(rename = "type")]
    kind: &'static str,
    payload: ErrorPayload,
}

#[derive(Serialize)]
struct ErrorPayload {
    code: u16,
    message: String,
}

#[derive(Serialize)]
struct Ack {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "deviceId", skip_serializing_if = "Option::is_none")]
    device_id: Option<String>,
    #[serde(rename = "userId", skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
}

#[derive(Serialize)]
struct Big<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

/// The part of the client's `POST /sync` body this server reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncBody {
    client_id: String,
    client_hlc: Timestamp,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SyncAnswer {
    server_hlc: Timestamp,
    seen: Seen,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Seen {
    bearer_token: Option<String>,
    content_type: Option<String>,
    request_id: Option<String>,
    peer_ip: Option<String>,
    client_id: String,
    client_hlc: Timestamp,
}

/// `{type: "BIG", data: <bin32>}` costs this many bytes besides the data.
const BIG_OVERHEAD: usize = 1 + 5 + 4 + 5 + 5;

struct Handshake {
    clock: HybridClock,
    registry: Arc<ConnectionRegistry>,
}

/// The name the handshake gives a connection, and its `publisherId`.
fn device_name(conn: &ConnectionHandle) -> String {
    format!("device-{}", conn.id)
}

impl Handshake {
    /// `TOPIC_SUB`, `TOPIC_UNSUB` and `TOPIC_PUB`, through the registry's topics.
    async fn topic(&self, conn: &Arc<ConnectionHandle>, kind: &str, request: TopicRequest) {
        let topics = self.registry.topics();
        match kind {
            "TOPIC_SUB" => {
                if let Err(err) = topics.subscribe(conn, &request.topic).await {
                    tracing::warn!(conn_id = %conn.id, %err, "subscription refused");
                    let refusal = ErrorMessage {
                        kind: "ERROR",
                        payload: ErrorPayload { code: 429, message: err.to_string() },
                    };
                    let refusal = rmp_serde::to_vec_named(&refusal).expect("encodes");
                    conn.try_send(OutboundMessage::Binary(refusal.into()));
                }
            }
            "TOPIC_UNSUB" => {
                topics.unsubscribe(conn, &request.topic).await;
            }
            _ => {
                let timestamp = u64::try_from(
                    std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap_or_default().as_millis(),
                )
                .unwrap_or(u64::MAX);
                let message = TopicMessage {
                    kind: "TOPIC_MESSAGE",
                    payload: TopicDelivery {
                        topic: &request.topic,
                        data: &request.data,
                        publisher_id: device_name(conn),
                        timestamp,
                    },
                };
                let message = rmp_serde::to_vec_named(&message).expect("encodes");
                topics.publish_cooperative_except(&request.topic, message, conn.id).await;
            }
        }
    }

    async fn acknowledge(conn: &ConnectionHandle, kind: &'static str) {
        let name = device_name(conn);
        conn.authenticate(Principal::new(name.clone(), Vec::<String>::new())).await;
        let ack = match kind {
            "AUTH_ACK" => Ack { kind, device_id: None, user_id: Some(name) },
            _ => Ack { kind, device_id: Some(name), user_id: None },
        };
        let ack = rmp_serde::to_vec_named(&ack).expect("an ack encodes");
        let _ = conn.try_send_priority(ack);
    }
}

#[async_trait::async_trait]
impl InboundHandler for Handshake {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        let Ok(request) = rmp_serde::from_slice::<Request>(&payload) else { return };
        match (request.kind.as_str(), request.bytes) {
            (kind @ ("TOPIC_SUB" | "TOPIC_UNSUB" | "TOPIC_PUB"), _) if conn.is_authenticated() => {
                if let Some(topic) = request.payload {
                    self.topic(conn, kind, topic).await;
                }
            }
            ("DEVICE_HELLO", _) => Self::acknowledge(conn, "DEVICE_ACK").await,
            ("AUTH", _) => Self::acknowledge(conn, "AUTH_ACK").await,
            ("BIG", Some(bytes)) if bytes >= BIG_OVERHEAD => {
                let data = vec![0x5a; bytes - BIG_OVERHEAD];
                let big =
                    rmp_serde::to_vec_named(&Big { kind: "BIG", data: &data }).expect("encodes");
                debug_assert_eq!(big.len(), bytes);
                if let Err(err) = conn.try_enqueue(OutboundMessage::Binary(big.into())) {
                    tracing::warn!(%err, "BIG answer refused");
                }
            }
            _ => {}
        }
    }

    async fn on_http_sync_request(&self, request: SyncRequest) -> Result<Bytes, SyncError> {
        let body: SyncBody = rmp_serde::from_slice(&request.body)
            .map_err(|err| SyncError::BadRequest(format!("not a TopGun sync request: {err}")))?;
        let header = |name: http::header::HeaderName| {
            request.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        let answer = SyncAnswer {
            server_hlc: self.clock.now(),
            seen: Seen {
                bearer_token: request.bearer_token().map(str::to_owned),
                content_type: header(http::header::CONTENT_TYPE),
                request_id: request.request_id.clone(),
                peer_ip: request.peer.map(|peer| peer.ip().to_string()),
                client_id: body.client_id,
                client_hlc: body.client_hlc,
            },
        };
        rmp_serde::to_vec_named(&answer)
            .map(Bytes::from)
            .map_err(|err| SyncError::Internal(err.to_string()))
    }
}

/// Broadcasts `{type: "TICK", seq}` to authenticated clients, `burst` at a time: all but the
/// last of a burst queued at once, the last through the cooperative broadcast, which lets the
/// writers catch up before the next burst.
async fn tick(registry: Arc<ConnectionRegistry>, per_second: u32, burst: u32) {
    #[derive(Serialize)]
    struct Tick {
        #[serde(rename = "type")]
        kind: &'static str,
        seq: u64,
    }
    let authenticated_client =
        |conn: &ConnectionHandle| conn.kind == ConnectionKind::Client && conn.is_authenticated();
    let burst = burst.clamp(1, per_second);
    let mut every = tokio::time::interval(Duration::from_secs(1) * burst / per_second);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0;
    loop {
        every.tick().await;
        for last in (0..burst).map(|i| i + 1 == burst) {
            let tick = rmp_serde::to_vec_named(&Tick { kind: "TICK", seq }).expect("encodes");
            seq += 1;
            if last {
                registry.broadcast_cooperative_to(tick, authenticated_client).await;
            } else {
                registry.broadcast_to(tick, authenticated_client);
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").with_ansi(false).init();
    let args = Args::parse();
    let stop = shutdown_signal()?;
    let mut config = NetworkConfig { host: args.host, port: args.port, ..NetworkConfig::default() };
    let threshold = args.deflate_threshold;
    config.connection.permessage_deflate =
        args.permessage_deflate.then(|| DeflateConfig { threshold, ..DeflateConfig::default() });
    let module = NetworkModule::new(config);
    let registry = module.registry();
    let handler =
        Handshake { clock: HybridClock::new("handshake-server"), registry: Arc::clone(&registry) };
    let mut module = module.with_handler(Heartbeat::new(handler));
    let port = module.start().await?;
    tracing::info!(addr = %format!("{}:{port}", module.config().host), "handshake server listening");
    if args.ticks_per_second > 0 {
        tokio::spawn(tick(registry, args.ticks_per_second, args.tick_burst));
    }
    module.serve(stop).await
}
