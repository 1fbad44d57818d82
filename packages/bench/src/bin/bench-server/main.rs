//! The server side of the load harness: the TopGun transport with a handler that echoes and,
//! on request, broadcasts timestamped messages. `--bare` serves a plain axum router answering
//! `GET /health` with the same JSON shape and no middleware, as the HTTP baseline (with
//! `--with-layers`, inside the transport's HTTP middleware stack and nothing else); `--floor`
//! serves the fan-out floor (see `floor.rs`).

mod floor;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use serde::Deserialize;
use topgun_server::network::{
    ConnectionHandle, ConnectionKind, ConnectionRegistry, DeflateConfig, HealthReport, Heartbeat,
    InboundHandler, NetworkConfig, NetworkModule, OutboundMessage, RateLimitConfig, SyncError,
    TlsConfig, build_http_layers,
};

#[derive(Debug, Parser)]
#[allow(clippy::struct_excessive_bools)] // command-line switches
struct Args {
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Serve a bare axum router (no middleware) instead of the transport.
    #[arg(long)]
    bare: bool,
    /// With `--bare`: wrap the bare router in the transport's HTTP middleware stack
    /// (`build_http_layers`) and nothing else, to tell the layers' cost from the server's.
    #[arg(long, requires = "bare")]
    with_layers: bool,
    /// Offer permessage-deflate (`ConnectionConfig::permessage_deflate`, default settings).
    #[arg(long)]
    permessage_deflate: bool,
    /// Override `ConnectionConfig::ws_read_buffer_size` (to compare against the default).
    #[arg(long)]
    read_buffer: Option<usize>,
    /// Override `ConnectionConfig::max_batch_messages`; 1 turns coalescing off.
    #[arg(long)]
    max_batch_messages: Option<usize>,
    /// Override `NetworkConfig::listen_backlog` (128 is what `TcpListener::bind` uses).
    #[arg(long)]
    listen_backlog: Option<u32>,
    /// Leave Nagle's algorithm on for accepted sockets (`NetworkConfig::tcp_nodelay = false`).
    #[arg(long)]
    no_tcp_nodelay: bool,
    /// Serve the fan-out floor instead of the transport: accept this many receivers and a
    /// control connection, then send `--broadcasts` frames with plain blocking writes.
    #[arg(long)]
    floor: Option<usize>,
    #[arg(long, default_value_t = 50)]
    broadcasts: u32,
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Serve TLS with this certificate (and `--tls-key`); SIGHUP reloads both.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CPU time the handler spends on each message, in microseconds, as an operation pipeline
    /// would; with it, messages are worked on instead of echoed. TopGun `PING`s are answered
    /// before the handler either way.
    #[arg(long, default_value_t = 0)]
    work_us: u64,
    /// `NetworkConfig::max_connections`.
    #[arg(long)]
    max_connections: Option<usize>,
    /// `NetworkConfig::max_connections_per_ip`.
    #[arg(long, default_value_t = 0)]
    max_connections_per_ip: usize,
    /// `NetworkConfig::rate_limit` (requests/s per address; burst the same unless given).
    #[arg(long)]
    rate_limit_per_ip: Option<NonZeroU32>,
    #[arg(long, requires = "rate_limit_per_ip")]
    rate_limit_burst: Option<NonZeroU32>,
    /// `ConnectionConfig::inbound_rate` (messages/s per connection; burst the same unless given).
    #[arg(long)]
    max_messages_per_sec: Option<NonZeroU32>,
    #[arg(long, requires = "max_messages_per_sec")]
    message_burst: Option<NonZeroU32>,
}

/// Messages the handler offered to connections (queued, or refused and counted as dropped):
/// printed as `OFFERED n` on exit, for the soak's accounting against the server's metrics.
static OFFERED: AtomicU64 = AtomicU64::new(0);

/// `{"type": "BROADCAST", "count", "size", "interval_ms", "cooperative", "topgun"}` starts a
/// broadcast; `cooperative` selects `broadcast_cooperative` over the synchronous `broadcast`,
/// `topgun` fills each message with a batch of TopGun map events instead of zeros.
#[derive(Deserialize)]
struct Broadcast {
    #[serde(rename = "type")]
    kind: String,
    count: u32,
    size: usize,
    interval_ms: u64,
    cooperative: bool,
    #[serde(default)]
    topgun: bool,
}

/// At least `size` bytes of what a TopGun server sends its clients: a MsgPack batch of map
/// events, keys repeated in every event, values and timestamps varying.
fn topgun_events(size: usize, seq: u32) -> Vec<u8> {
    let mut events = Vec::new();
    let mut encoded = Vec::new();
    let mut n = 0_u32;
    while encoded.len() < size {
        let id = seq.wrapping_mul(7919).wrapping_add(n);
        events.push(serde_json::json!({
            "mapName": "todos",
            "eventType": if id % 3 == 0 { "PUT" } else { "UPDATE" },
            "key": format!("todo-{id:06}"),
            "record": {
                "value": { "title": format!("Task {id}: review the sync batch"), "done": id % 2 == 0, "priority": id % 5, "assignee": format!("user-{}", id % 17) },
                "timestamp": { "millis": 1_796_023_824_376_u64 + u64::from(id), "counter": id % 4, "nodeId": "node-1" },
            },
        }));
        n += 1;
        let batch =
            serde_json::json!({ "type": "SERVER_BATCH_EVENT", "payload": { "events": events } });
        encoded = rmp_serde::to_vec_named(&batch).expect("encodes");
    }
    encoded
}

/// `{"type": "SUBSCRIBE", "topic"}` subscribes the connection (answered with the request, as
/// an acknowledgement); `{"type": "COMPARE_TOPIC", "topic", "count", "size", "interval_ms"}`
/// reaches the topic's subscribers `count` times through the topic and `count` times through
/// `broadcast_to` with a predicate, alternated, and answers the time each call took.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
enum TopicControl {
    Subscribe { topic: String },
    CompareTopic(CompareTopic),
}

#[derive(Deserialize)]
struct CompareTopic {
    topic: String,
    count: u32,
    size: usize,
    interval_ms: u64,
}

/// What `COMPARE_TOPIC` answers: nanoseconds per call of each path, and the recipients each
/// call queued the message for.
#[derive(serde::Serialize)]
struct TopicTimings {
    #[serde(rename = "type")]
    kind: &'static str,
    publish_ns: Vec<u64>,
    scan_ns: Vec<u64>,
    publish_queued: usize,
    scan_queued: usize,
    connections: usize,
}

/// Both ways of reaching a topic's subscribers, alternated: `Topics::publish`, which holds the
/// subscribers, and `broadcast_to` with the cheapest predicate there is (a set of their ids),
/// which still looks at every connection. Each message: send time (u64 LE), sequence (u32 LE),
/// then 0 for the topic's path and 1 for the scan.
async fn compare_topic(
    registry: Arc<ConnectionRegistry>,
    conn: Arc<ConnectionHandle>,
    plan: CompareTopic,
) {
    let subscribers: std::collections::HashSet<_> =
        registry.topics().subscribers(&plan.topic).into_iter().collect();
    let mut timings = TopicTimings {
        kind: "TIMINGS",
        publish_ns: Vec::new(),
        scan_ns: Vec::new(),
        publish_queued: 0,
        scan_queued: 0,
        connections: registry.count(),
    };
    for seq in 0..plan.count {
        for scan in [false, true] {
            let mut payload = vec![0_u8; plan.size.max(13)];
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            payload[..8].copy_from_slice(&u64::try_from(now.as_nanos()).unwrap_or(0).to_le_bytes());
            payload[8..12].copy_from_slice(&seq.to_le_bytes());
            payload[12] = u8::from(scan);
            let started = std::time::Instant::now();
            let outcome = if scan {
                registry.broadcast_to(payload, |c| subscribers.contains(&c.id))
            } else {
                registry.topics().publish(&plan.topic, payload)
            };
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if scan {
                timings.scan_ns.push(took);
                timings.scan_queued += outcome.queued;
            } else {
                timings.publish_ns.push(took);
                timings.publish_queued += outcome.queued;
            }
            tokio::time::sleep(Duration::from_millis(plan.interval_ms)).await;
        }
    }
    let answer = rmp_serde::to_vec_named(&timings).expect("encodes");
    let _ = conn.send_timeout(OutboundMessage::Binary(answer.into()), Duration::from_secs(5)).await;
}

struct BenchHandler {
    registry: Arc<ConnectionRegistry>,
    work: Duration,
}

#[async_trait::async_trait]
impl InboundHandler for BenchHandler {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        if !self.work.is_zero() {
            // Busy, not asleep: an operation pipeline spends CPU on each message.
            let started = std::time::Instant::now();
            while started.elapsed() < self.work {
                std::hint::spin_loop();
            }
            return;
        }
        match rmp_serde::from_slice::<Broadcast>(&payload) {
            Ok(request) if request.kind == "BROADCAST" => {
                tokio::spawn(broadcast(Arc::clone(&self.registry), request));
            }
            _ => match rmp_serde::from_slice::<TopicControl>(&payload) {
                Ok(TopicControl::Subscribe { topic }) => {
                    if let Err(err) = self.registry.topics().subscribe(conn, &topic).await {
                        eprintln!("subscription refused: {err}");
                    }
                    conn.try_send(OutboundMessage::Binary(payload));
                }
                Ok(TopicControl::CompareTopic(plan)) => {
                    tokio::spawn(compare_topic(Arc::clone(&self.registry), Arc::clone(conn), plan));
                }
                Err(_) => self.echo(conn, payload).await,
            },
        }
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        Ok(body)
    }
}

impl BenchHandler {
    async fn echo(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        // Queued, or refused and counted as dropped (a full queue after the wait, a closed
        // connection): offered either way.
        let _ = conn.send_timeout(OutboundMessage::Binary(payload), Duration::from_secs(5)).await;
        OFFERED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Broadcasts `count` messages of `size` bytes; each starts with its send time (nanoseconds
/// since the epoch, u64 LE) and sequence number (u32 LE).
async fn broadcast(registry: Arc<ConnectionRegistry>, request: Broadcast) {
    let mut dropped = 0;
    for seq in 0..request.count {
        let mut payload = vec![0_u8; 12];
        if request.topgun {
            payload.extend(topgun_events(request.size.saturating_sub(12), seq));
        } else {
            payload.resize(request.size.max(12), 0);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        payload[..8].copy_from_slice(&nanos.to_le_bytes());
        payload[8..12].copy_from_slice(&seq.to_le_bytes());
        let outcome = if request.cooperative {
            registry.broadcast_cooperative(payload, ConnectionKind::Client).await
        } else {
            registry.broadcast(payload, ConnectionKind::Client)
        };
        OFFERED.fetch_add((outcome.queued + outcome.dropped) as u64, Ordering::Relaxed);
        dropped += outcome.dropped;
        if request.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(request.interval_ms)).await;
        }
    }
    eprintln!("broadcast done: {} messages, {dropped} dropped", request.count);
}

async fn terminate() {
    let mut signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    signal.recv().await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(receivers) = args.floor {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(([127, 0, 0, 1], args.port).into())?;
        let listener = socket.listen(4096)?.into_std()?;
        listener.set_nonblocking(false)?;
        println!("LISTENING {}", listener.local_addr()?.port());
        let plan = floor::Plan {
            receivers,
            broadcasts: args.broadcasts,
            size: args.size,
            interval: Duration::from_millis(args.interval_ms),
        };
        return tokio::task::spawn_blocking(move || floor::run(&listener, &plan)).await?;
    }
    if args.bare {
        let started = std::time::Instant::now();
        let router = axum::Router::new().route(
            "/health",
            axum::routing::get(move || async move {
                axum::Json(HealthReport {
                    state: "ready".into(),
                    connections: 0,
                    in_flight: 0,
                    uptime_secs: started.elapsed().as_secs(),
                })
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
        println!("LISTENING {}", listener.local_addr()?.port());
        if args.with_layers {
            // Around the router as a whole, as `NetworkModule` applies them.
            let app = tower::ServiceBuilder::new()
                .map_response(axum::response::IntoResponse::into_response)
                .layer(build_http_layers(&NetworkConfig::default()))
                .service(router);
            axum::serve(listener, axum::ServiceExt::into_make_service(app))
                .with_graceful_shutdown(terminate())
                .await?;
        } else {
            axum::serve(listener, router).with_graceful_shutdown(terminate()).await?;
        }
        return Ok(());
    }
    let mut config =
        NetworkConfig { host: "127.0.0.1".into(), port: args.port, ..NetworkConfig::default() };
    if let Some(size) = args.read_buffer {
        config.connection.ws_read_buffer_size = size;
    }
    if args.permessage_deflate {
        config.connection.permessage_deflate = Some(DeflateConfig::default());
    }
    if let Some(max) = args.max_batch_messages {
        config.connection.max_batch_messages = max;
    }
    if let Some(backlog) = args.listen_backlog {
        config.listen_backlog = backlog;
    }
    config.tcp_nodelay = !args.no_tcp_nodelay;
    if let Some(max) = args.max_connections {
        config.max_connections = max;
    }
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.rate_limit = args.rate_limit_per_ip.map(|per_second| RateLimitConfig {
        per_second,
        burst: args.rate_limit_burst.unwrap_or(per_second),
    });
    config.connection.inbound_rate = args.max_messages_per_sec.map(|per_second| RateLimitConfig {
        per_second,
        burst: args.message_burst.unwrap_or(per_second),
    });
    if let (Some(cert_path), Some(key_path)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(TlsConfig { cert_path, key_path, ca_cert_path: None });
    }
    let module = NetworkModule::new(config);
    let registry = module.registry();
    let work = Duration::from_micros(args.work_us);
    let mut module = module.with_handler(Heartbeat::new(BenchHandler { registry, work }));
    let port = module.start().await?;
    if let Some(reloader) = module.tls_reloader() {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match reloader.reload() {
                    Ok(()) => eprintln!("TLS reloaded"),
                    Err(err) => eprintln!("TLS reload failed: {err}"),
                }
            }
        });
    }
    println!("LISTENING {port}");
    let served = module.serve(terminate()).await;
    println!("OFFERED {}", OFFERED.load(Ordering::Relaxed));
    served
}
