//! The hostile-client scenario: one address or one connection against the limits of
//! `README.md` "On the open internet", with honest clients measured alongside. Three parts,
//! each against its own `bench-server`:
//!
//! 1. **Lockout.** One address (127.0.0.2) opens upgrades as fast as it can for
//!    [`LOCKOUT_SECONDS`] and holds every one it gets, never speaking; meanwhile 1 000 honest
//!    clients (20 other addresses) connect and keep a `PING` → `PONG` going. Without limits,
//!    with `--max-connections-per-ip`, and with the rate limit too, under
//!    `--max-connections 2000`: how many honest clients got in, and their round trips.
//! 2. **Flood.** 1 000 honest clients `PING` every 200 ms; the handler spends 50 µs of CPU on
//!    every other message, as an operation pipeline would. Their `PING` → `PONG` p50/p99 is
//!    measured for [`PHASE_SECONDS`] without a flood, then while one connection sends messages
//!    as fast as it can: without a message budget and with `--max-messages-per-sec`.
//! 3. **Many addresses.** 100 000 requests, each from a distinct address spread over
//!    127.0.0.0/8, against `--rate-limit-per-ip`: the server's RSS before, after and at its
//!    peak (the table of addresses is bounded), and one address over its budget.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use super::{Row, Server, Ws, percentile};

const HONEST: usize = 1_000;
/// Honest clients are spread over this many addresses, 127.0.0.10 and up.
const HONEST_ADDRESSES: usize = 20;
const PING_INTERVAL: Duration = Duration::from_millis(200);
const PHASE_SECONDS: u64 = 5;
const LOCKOUT_SECONDS: u64 = 3;
const HOSTILE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const DISTINCT_ADDRESSES: u32 = 100_000;
const LOCKOUT_RATE_LIMIT: &str = "--rate-limit-per-ip=20";
const LOCKOUT_RATE_BURST: &str = "--rate-limit-burst=100";

pub(super) async fn abuse() -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (cap, rate_limited) in [(None, false), (Some(100), false), (Some(100), true)] {
        rows.push(lockout(cap, rate_limited).await?);
    }
    for budget in [None, Some(100)] {
        rows.push(flood(budget).await?);
    }
    rows.push(many_addresses().await?);
    Ok(rows)
}

fn honest_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + u8::try_from(index % HONEST_ADDRESSES).unwrap_or(0))
}

/// A WebSocket to the server at `port` from `source`.
async fn connect_from(port: u16, source: Ipv4Addr) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

/// TopGun's `PING`, as its client writes it.
fn ping() -> Vec<u8> {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let mut map = serde_json::Map::new();
    map.insert("type".into(), "PING".into());
    map.insert("timestamp".into(), u64::try_from(millis).unwrap_or(0).into());
    rmp_serde::to_vec_named(&map).unwrap_or_default()
}

/// Round trips of honest clients, in microseconds, split at a phase boundary.
#[derive(Default)]
struct RoundTrips {
    phases: std::sync::Mutex<[Vec<u32>; 2]>,
    phase: AtomicU64,
    failures: AtomicU64,
}

impl RoundTrips {
    fn record(&self, micros: u32) {
        let phase = usize::from(self.phase.load(Ordering::Relaxed) > 0);
        if let Ok(mut phases) = self.phases.lock() {
            phases[phase].push(micros);
        }
    }

    /// p50 and p99 of a phase, in milliseconds, and the sample count.
    fn summary(&self, phase: usize) -> (f64, f64, usize) {
        let mut samples = self.phases.lock().map(|p| p[phase].clone()).unwrap_or_default();
        samples.sort_unstable();
        (percentile(&samples, 0.5), percentile(&samples, 0.99), samples.len())
    }
}

/// One honest client: a `PING` every [`PING_INTERVAL`] (staggered by `offset`), each `PONG`
/// timed, until `stop`.
async fn keep_pinging(mut ws: Ws, offset: Duration, trips: Arc<RoundTrips>, stop: Arc<AtomicBool>) {
    tokio::time::sleep(offset).await;
    let mut every = tokio::time::interval(PING_INTERVAL);
    while !stop.load(Ordering::Relaxed) {
        every.tick().await;
        let sent = Instant::now();
        if ws.send(Message::Binary(ping().into())).await.is_err() {
            trips.failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let pong = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(frame) = ws.next().await {
                if matches!(frame, Ok(Message::Binary(_))) {
                    return true;
                }
                if frame.is_err() {
                    return false;
                }
            }
            false
        })
        .await;
        if pong == Ok(true) {
            trips.record(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
        } else {
            trips.failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let _ = ws.close(None).await;
}

/// Connects the honest clients (`HONEST_ADDRESSES` addresses); those refused are counted.
async fn connect_honest(port: u16) -> (Vec<Ws>, usize) {
    let mut lanes = JoinSet::new();
    for lane in 0..64 {
        lanes.spawn(async move {
            let mut opened = Vec::new();
            let mut refused = 0;
            for index in (lane..HONEST).step_by(64) {
                match connect_from(port, honest_address(index)).await {
                    Ok(ws) => opened.push(ws),
                    Err(_) => refused += 1,
                }
            }
            (opened, refused)
        });
    }
    let (mut all, mut refused) = (Vec::new(), 0);
    while let Some(Ok((opened, lane_refused))) = lanes.join_next().await {
        all.extend(opened);
        refused += lane_refused;
    }
    (all, refused)
}

/// Starts pinging on every client; returns the tasks and their stop flag.
fn start_pinging(clients: Vec<Ws>, trips: &Arc<RoundTrips>) -> (JoinSet<()>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    let count = u32::try_from(clients.len().max(1)).unwrap_or(u32::MAX);
    for (index, ws) in clients.into_iter().enumerate() {
        let offset = PING_INTERVAL * u32::try_from(index).unwrap_or(0) / count;
        tasks.spawn(keep_pinging(ws, offset, Arc::clone(trips), Arc::clone(&stop)));
    }
    (tasks, stop)
}

async fn stop_pinging(mut tasks: JoinSet<()>, stop: &AtomicBool) {
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Part 1: one address against the per-address cap (and the rate limit) while honest
/// clients connect.
async fn lockout(cap: Option<usize>, rate_limited: bool) -> anyhow::Result<Row> {
    let mut args = vec!["--max-connections=2000".to_owned()];
    if let Some(cap) = cap {
        args.push(format!("--max-connections-per-ip={cap}"));
    }
    if rate_limited {
        // Room for the 50 honest clients of one address connecting at once.
        args.extend([LOCKOUT_RATE_LIMIT.to_owned(), LOCKOUT_RATE_BURST.to_owned()]);
    }
    let server = Server::spawn(args).await?;
    let port = server.port;
    let (accepted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(LOCKOUT_SECONDS);
    let mut hostile = JoinSet::new();
    for _ in 0..64 {
        let (accepted, refused) = (Arc::clone(&accepted), Arc::clone(&refused));
        hostile.spawn(async move {
            let mut held = Vec::new();
            while Instant::now() < deadline {
                match connect_from(port, HOSTILE).await {
                    Ok(ws) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        held.push(ws);
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            held
        });
    }
    // The flood has a head start of a few hundred milliseconds, as an attacker would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (honest, honest_refused) = connect_honest(port).await;
    let connected = honest.len();
    let trips = Arc::new(RoundTrips::default());
    let (tasks, stop) = start_pinging(honest, &trips);
    let mut held = Vec::new();
    while let Some(Ok(lane)) = hostile.join_next().await {
        held.extend(lane);
    }
    stop_pinging(tasks, &stop).await;
    let (p50, p99, samples) = trips.summary(0);
    drop(held);
    server.stop().await?;
    Ok(Row::new("abuse lockout")
        .with("per_ip_cap", cap.map_or(serde_json::Value::Null, Into::into))
        .with("rate_limit", if rate_limited { "20/s burst 100" } else { "off" })
        .with("max_connections", 2000)
        .with("hostile_accepted", accepted.load(Ordering::Relaxed))
        .with("hostile_refused", refused.load(Ordering::Relaxed))
        .with("honest_connected", connected)
        .with("honest_refused", honest_refused)
        .with("honest_ping_p50_ms", p50)
        .with("honest_ping_p99_ms", p99)
        .with("pongs", samples)
        .with("ping_failures", trips.failures.load(Ordering::Relaxed)))
}

/// Part 2: one connection flooding messages at a handler that works 50 µs on each.
async fn flood(budget: Option<u32>) -> anyhow::Result<Row> {
    let mut args = vec!["--work-us=50".to_owned()];
    if let Some(budget) = budget {
        args.push(format!("--max-messages-per-sec={budget}"));
        args.push(format!("--message-burst={}", budget * 2));
    }
    let server = Server::spawn(args).await?;
    let port = server.port;
    let (honest, refused) = connect_honest(port).await;
    anyhow::ensure!(refused == 0, "{refused} honest clients refused");
    let trips = Arc::new(RoundTrips::default());
    let (tasks, stop) = start_pinging(honest, &trips);
    tokio::time::sleep(Duration::from_secs(PHASE_SECONDS)).await;

    trips.phase.store(1, Ordering::Relaxed);
    let cpu_before = server.cpu()?;
    let flood_until = Instant::now() + Duration::from_secs(PHASE_SECONDS);
    let mut flooder = connect_from(port, FLOODER).await?;
    let sent = tokio::spawn(async move {
        let payload: bytes::Bytes = vec![0x42_u8; 64].into();
        let mut sent = 0_u64;
        while Instant::now() < flood_until {
            // Bounded by the deadline even while the server has stopped reading.
            let batch = async {
                for _ in 0..64 {
                    flooder.feed(Message::Binary(payload.clone())).await?;
                }
                flooder.flush().await
            };
            match tokio::time::timeout_at(flood_until.into(), batch).await {
                Ok(Ok(())) => sent += 64,
                Ok(Err(_)) | Err(_) => break,
            }
        }
        sent
    });
    let sent = sent.await?;
    let server_cpu = server.cpu()?.saturating_sub(cpu_before);
    stop_pinging(tasks, &stop).await;
    let (quiet_p50, quiet_p99, quiet_samples) = trips.summary(0);
    let (flood_p50, flood_p99, flood_samples) = trips.summary(1);
    server.stop().await?;
    #[allow(clippy::cast_precision_loss)] // a count for display
    let flood_rate = (sent as f64 / PHASE_SECONDS as f64).round();
    Ok(Row::new("abuse flood")
        .with("budget_per_sec", budget.map_or(serde_json::Value::Null, Into::into))
        .with("handler_work_us", 50)
        .with("honest_clients", HONEST)
        .with("quiet_p50_ms", quiet_p50)
        .with("quiet_p99_ms", quiet_p99)
        .with("flood_p50_ms", flood_p50)
        .with("flood_p99_ms", flood_p99)
        .with("p99_ratio", (flood_p99 / quiet_p99 * 100.0).round() / 100.0)
        .with("flood_msgs_per_sec_sent", flood_rate)
        .with("server_cpu_ms_during_flood", u64::try_from(server_cpu.as_millis()).unwrap_or(0))
        .with("pongs", quiet_samples + flood_samples)
        .with("ping_failures", trips.failures.load(Ordering::Relaxed)))
}

/// The `n`th distinct source address, over 127.1.0.0 and up.
fn distinct_address(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x7f01_0000 + n)
}

/// One `GET /` from `source`; its status.
async fn get_from(port: u16, source: Ipv4Addr) -> anyhow::Result<u16> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut stream = socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let status = response.get(9..12).and_then(|s| std::str::from_utf8(s).ok());
    Ok(status.and_then(|s| s.parse().ok()).unwrap_or(0))
}

/// Part 3: many distinct addresses against the rate limit.
async fn many_addresses() -> anyhow::Result<Row> {
    let server = Server::spawn(vec![
        "--rate-limit-per-ip=10".to_owned(),
        "--rate-limit-burst=20".to_owned(),
    ])
    .await?;
    let port = server.port;
    let (before, _) = server.memory()?;
    let (ok, limited, failed) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let mut lanes = JoinSet::new();
    let lane_count = 128;
    for lane in 0..lane_count {
        let (ok, limited, failed) = (Arc::clone(&ok), Arc::clone(&limited), Arc::clone(&failed));
        lanes.spawn(async move {
            for n in (lane..DISTINCT_ADDRESSES).step_by(lane_count as usize) {
                match get_from(port, distinct_address(n)).await {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(429) => limited.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while lanes.join_next().await.is_some() {}
    let took = started.elapsed();
    let (after, peak) = server.memory()?;
    // One address over its budget: a burst of 20, then refusals.
    let mut one = (0, 0);
    for _ in 0..100 {
        match get_from(port, HOSTILE).await? {
            200 => one.0 += 1,
            _ => one.1 += 1,
        }
    }
    server.stop().await?;
    Ok(Row::new("abuse many addresses")
        .with("rate_limit", "10/s burst 20")
        .with("distinct_addresses", DISTINCT_ADDRESSES)
        .with("answered_200", ok.load(Ordering::Relaxed))
        .with("answered_429", limited.load(Ordering::Relaxed))
        .with("failed", failed.load(Ordering::Relaxed))
        .with("requests_per_sec", super::per_second(DISTINCT_ADDRESSES as usize, took))
        .with("server_rss_before_mib", before / (1 << 20))
        .with("server_rss_after_mib", after / (1 << 20))
        .with("server_rss_peak_mib", peak / (1 << 20))
        .with("one_address_100_requests_ok", one.0)
        .with("one_address_100_requests_refused", one.1))
}
