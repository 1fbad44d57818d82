//! The client side of the load harness. Each scenario starts its own `bench-server` process,
//! drives it over loopback from this process (connections spread over several 127.0.0.x source
//! addresses), and prints a table row plus a JSON line. Every run is bounded in count and time.
//!
//! ```sh
//! cargo build --release -p topgun-bench
//! target/release/topgun-bench all
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use topgun_server::network::decode_frame_shared;

mod abuse;
mod deflate;
mod soak;
mod topics;

/// Longest any one scenario may run before it gives up.
const SCENARIO_LIMIT: Duration = Duration::from_secs(120);
/// Source addresses connections are spread over.
const SOURCE_ADDRESSES: u8 = 8;

type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, Parser)]
#[command(about = "Load harness for the TopGun transport")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Extra arguments for every `bench-server` started, e.g. `--server-arg=--read-buffer=131072`.
    #[arg(long = "server-arg", global = true)]
    passed_to_server: Vec<String>,
    /// Which server the WebSocket scenarios drive: the transport, or the Node.js `ws` server
    /// of `packages/bench/node` (run `npm ci` there first).
    #[arg(long, global = true, value_enum, default_value_t = Peer::Transport)]
    server: Peer,
    /// Server under test on core 0, this load client on core 1 (`taskset`): no figure then
    /// depends on which side got the cores, the server's CPU per delivered message is its own,
    /// and a run whose client core was saturated is marked `valid=false` (its rate is the
    /// client's, not the server's). The transport's runtime then has one worker thread (tokio
    /// sizes it to the cores it may use).
    #[arg(long, global = true)]
    pin: bool,
}

/// Set in the environment of the re-executed, pinned client.
const PINNED_ENV: &str = "TOPGUN_BENCH_PINNED";

/// Whether this run pins the server under test to core 0 (and this client to core 1).
static PINNED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn pinned() -> bool {
    PINNED.get().copied().unwrap_or(false)
}

/// With `--pin`, runs this same command again on core 1 and exits with its status.
fn pin_self_to_core_1() -> anyhow::Result<()> {
    if std::env::var_os(PINNED_ENV).is_some() {
        return Ok(());
    }
    let status = std::process::Command::new("taskset")
        .arg("-c")
        .arg("1")
        .arg(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(PINNED_ENV, "1")
        .status()
        .context("--pin needs taskset (util-linux)")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// A server the WebSocket scenarios can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Peer {
    /// `bench-server`: the TopGun transport.
    Transport,
    /// `node/ws-server.mjs`: Node.js with the `ws` package, the same behaviour.
    Node,
    /// `bun/bun-server.mjs`: Bun, whose WebSocket server is uWebSockets, the same behaviour
    /// (run `npm ci` in `packages/bench/bun` first).
    Bun,
}

#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// (a) Hold idle connections: server memory per connection, handshakes per second.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// (b) Broadcast to every connection: delivery, throughput, latency, frames, peak memory.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        broadcasts: u32,
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Milliseconds between broadcasts; 0 fires them back to back.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Fire with the synchronous `broadcast` instead of `broadcast_cooperative`.
        #[arg(long)]
        sync: bool,
        /// Fire from the floor server (one blocking write per connection, no transport), to
        /// see what the kernel and the client alone cost on this machine.
        #[arg(long, conflicts_with = "sync")]
        floor: bool,
    },
    /// (c) More broadcasts than a queue holds, fired at once to healthy clients.
    Burst {
        #[arg(long, default_value_t = 2_000)]
        connections: usize,
        #[arg(long, default_value_t = 1_000)]
        broadcasts: u32,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Fire with the synchronous `broadcast` instead of `broadcast_cooperative`.
        #[arg(long)]
        sync: bool,
    },
    /// (d) Echo round trips through the handler.
    Echo {
        #[arg(long, default_value_t = 1_000)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        round_trips: usize,
    },
    /// (e) `GET /health` with the full middleware stack, and with the middleware stack alone,
    /// against a bare axum router (needs wrk).
    Http {
        /// Seconds of load per wrk run.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Rounds of full-stack, layers-only and bare runs, alternated; the ratios reported are
        /// the medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// (f) Time from SIGTERM to every connection closed with 1001 and the server exited.
    Drain {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// A topic's subscribers reached through `Topics::publish` and through `broadcast_to`
    /// with a predicate, the server timing each call: alone, then with `--others` idle
    /// connections open beside them (see `topics.rs`).
    Topics {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 15_000)]
        others: usize,
        /// Calls of each path per measurement.
        #[arg(long, default_value_t = 300)]
        publishes: u32,
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// Every scenario with its defaults, plus the paced fan-out from the transport and from
    /// the floor server.
    All,
    /// The transport against Node.js `ws` in one run: idle memory and handshakes at 10 000
    /// connections, and the paced fan-out (10 broadcasts/s × 256 B to 10 000) from
    /// `broadcast_cooperative`, the synchronous `broadcast`, Node `ws` and the floor; then
    /// the ratios. Needs `npm ci` in `packages/bench/node`.
    VersusNode {
        /// Rounds of every measurement, alternated; each row is printed, the ratios use the
        /// medians.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Hostile clients against the open-internet limits, honest clients measured alongside
    /// (see `abuse.rs`). Not part of `all`.
    Abuse,
    /// The transport against Bun (uWebSockets) and Node.js `ws` in one run: idle memory and
    /// handshakes at 10 000, the unpaced fan-out (10 000 × 200 × 256 B), the burst
    /// (2 000 × 1 000 × 64 B) and the paced fan-out (10/s to 10 000), every one with the
    /// README's `broadcast_cooperative`; then the ratios to Bun. Needs `npm ci` in
    /// `packages/bench/bun` and `packages/bench/node`.
    VersusBun {
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// permessage-deflate off and on, one after the other: idle memory and handshakes, what
    /// context takeover would hold, and a paced fan-out of TopGun-shaped messages (bytes on
    /// the wire, server CPU, latency). Not part of `all`.
    Deflate {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 10_000)]
        fanout_connections: usize,
        #[arg(long, default_value_t = 50)]
        broadcasts: u32,
        /// Bytes of each message: a MsgPack batch of map events at least this long.
        #[arg(long, default_value_t = 2_048)]
        size: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// A TLS server under churn, broadcasts, `/sync`, slow and vanishing clients and
    /// certificate reloads; fails unless memory, open files and every message are accounted
    /// for at the end (see `soak.rs`). Not part of `all`.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Plain TCP instead of TLS (no certificate reloads): senders then write to idle
        /// connections themselves
        #[arg(long)]
        plain: bool,
    },
}

impl Scenario {
    /// `broadcasts` × 256 B to 10 000 connections, from the transport or the floor server.
    fn fanout(broadcasts: u32, interval_ms: u64, floor: bool) -> Self {
        Self::Fanout { connections: 10_000, broadcasts, size: 256, interval_ms, sync: false, floor }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.pin {
        pin_self_to_core_1()?;
    }
    PINNED.set(args.pin).ok();
    SERVER_ARGS.set(args.passed_to_server.clone()).ok();
    let peer = args.server;
    let scenarios = match args.scenario {
        Scenario::All => vec![
            Scenario::Idle { connections: 10_000 },
            Scenario::fanout(200, 0, false),
            Scenario::fanout(50, 100, false),
            Scenario::fanout(50, 100, true),
            Scenario::Burst { connections: 2_000, broadcasts: 1_000, size: 64, sync: false },
            Scenario::Burst { connections: 2_000, broadcasts: 1_000, size: 64, sync: true },
            Scenario::Echo { connections: 1_000, round_trips: 100 },
            Scenario::Http { seconds: 3, rounds: 3 },
            Scenario::Drain { connections: 10_000 },
        ],
        one => vec![one],
    };
    for scenario in scenarios {
        let limit = match scenario {
            Scenario::Soak { minutes, .. } => Duration::from_secs(minutes * 60) + SCENARIO_LIMIT,
            _ => SCENARIO_LIMIT,
        };
        let limit = match scenario {
            Scenario::VersusNode { rounds } => limit * u32::try_from(rounds.max(1) * 6)?,
            Scenario::Abuse | Scenario::Deflate { .. } => limit * 3,
            Scenario::VersusBun { rounds } => limit * u32::try_from(rounds.max(1) * 12)?,
            _ => limit,
        };
        let rows = tokio::time::timeout(limit, run(scenario.clone(), peer))
            .await
            .with_context(|| format!("{scenario:?} did not finish in {limit:?}"))??;
        for row in rows {
            row.print();
        }
    }
    Ok(())
}

async fn run(scenario: Scenario, peer: Peer) -> anyhow::Result<Vec<Row>> {
    let row = match scenario {
        Scenario::Idle { connections } => idle(peer, connections).await,
        Scenario::Fanout { connections, broadcasts, size, interval_ms, sync, floor } => {
            let sender = match (floor, sync, peer) {
                (true, _, _) => Sender::Floor,
                (false, _, Peer::Node) => Sender::Node,
                (false, _, Peer::Bun) => Sender::Bun,
                (false, true, Peer::Transport) => Sender::Sync,
                (false, false, Peer::Transport) => Sender::Cooperative,
            };
            fanout("fanout", connections, Firing { broadcasts, size, interval_ms, sender }).await
        }
        Scenario::Burst { connections, broadcasts, size, sync } => {
            let sender = match (sync, peer) {
                (_, Peer::Node) => Sender::Node,
                (_, Peer::Bun) => Sender::Bun,
                (true, Peer::Transport) => Sender::Sync,
                (false, Peer::Transport) => Sender::Cooperative,
            };
            fanout("burst", connections, Firing { broadcasts, size, interval_ms: 0, sender }).await
        }
        Scenario::Echo { connections, round_trips } => echo(peer, connections, round_trips).await,
        Scenario::Http { seconds, rounds } => http(seconds, rounds).await,
        Scenario::Drain { connections } => drain(peer, connections).await,
        Scenario::Soak { minutes, plain } => soak::soak(minutes, plain).await,
        Scenario::VersusNode { rounds } => return versus_node(rounds).await,
        Scenario::Abuse => return abuse::abuse().await,
        Scenario::Deflate { connections, fanout_connections, broadcasts, size, interval_ms } => {
            let settings = deflate::Settings {
                connections,
                fanout_connections,
                broadcasts,
                size,
                interval_ms,
            };
            return deflate::deflate(&settings).await;
        }
        Scenario::VersusBun { rounds } => return versus_bun(rounds).await,
        Scenario::Topics { subscribers, others, publishes, size } => {
            let plan = topics::Plan { subscribers, others, publishes, size };
            return topics::topics(&plan).await;
        }
        Scenario::All => unreachable!("expanded in main"),
    };
    Ok(vec![row?])
}

/// Idle memory, handshakes and the paced fan-out from the transport and from Node.js `ws`,
/// alternated `rounds` times in one run; every measurement's row, then the ratios of the
/// medians to Node `ws` and to the floor.
async fn versus_node(rounds: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut figures = Medians::default();
    let mut keep = |key: String, row: &Row, figure: &str| figures.keep(key, row, figure);
    for _ in 0..rounds.max(1) {
        for peer in [Peer::Transport, Peer::Node] {
            let row = idle(peer, 10_000).await?;
            let name = if peer == Peer::Node { "node" } else { "transport" };
            keep(format!("{name}_idle"), &row, "server_rss_per_connection_bytes");
            keep(format!("{name}_handshakes"), &row, "handshakes_per_sec");
            rows.push(row);
        }
        for (sender, name) in [
            (Sender::Cooperative, "cooperative"),
            (Sender::Sync, "sync"),
            (Sender::Node, "node"),
            (Sender::Floor, "floor"),
        ] {
            let firing = Firing { broadcasts: 50, size: 256, interval_ms: 100, sender };
            let row = fanout("fanout", 10_000, firing).await?;
            keep(format!("{name}_p50"), &row, "p50_ms");
            keep(format!("{name}_p99"), &row, "p99_ms");
            keep(format!("{name}_delivered"), &row, "delivered_ratio");
            rows.push(row);
        }
    }
    let median = |key: &str| figures.median(key);
    let ratio = |a: &str, b: &str| figures.ratio(a, b);
    rows.push(
        Row::new("versus node (medians)")
            .with("rounds", rounds.max(1))
            .with("idle_bytes_per_connection", median("transport_idle"))
            .with("node_idle_bytes_per_connection", median("node_idle"))
            .with("idle_ratio_to_node", ratio("transport_idle", "node_idle"))
            .with("handshakes_ratio_to_node", ratio("transport_handshakes", "node_handshakes"))
            .with("cooperative_p50_ms", median("cooperative_p50"))
            .with("cooperative_p99_ms", median("cooperative_p99"))
            .with("node_p50_ms", median("node_p50"))
            .with("node_p99_ms", median("node_p99"))
            .with("floor_p50_ms", median("floor_p50"))
            .with("floor_p99_ms", median("floor_p99"))
            .with("p50_ratio_to_node", ratio("cooperative_p50", "node_p50"))
            .with("p99_ratio_to_node", ratio("cooperative_p99", "node_p99"))
            .with("sync_p50_ratio_to_node", ratio("sync_p50", "node_p50"))
            .with("sync_p99_ratio_to_node", ratio("sync_p99", "node_p99"))
            .with("p50_ratio_to_floor", ratio("cooperative_p50", "floor_p50"))
            .with("p99_ratio_to_floor", ratio("cooperative_p99", "floor_p99"))
            .with("node_p99_ratio_to_floor", ratio("node_p99", "floor_p99")),
    );
    Ok(rows)
}

/// The transport, Bun and Node.js `ws` on the figures the issue on leading uWebSockets names,
/// alternated `rounds` times; every row, then the medians and their ratios to Bun.
async fn versus_bun(rounds: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut figures = Medians::default();
    let mut keep = |key: String, row: &Row, figure: &str| figures.keep(key, row, figure);
    let peers = [
        (Peer::Transport, Sender::Cooperative, "transport"),
        (Peer::Bun, Sender::Bun, "bun"),
        (Peer::Node, Sender::Node, "node"),
    ];
    for _ in 0..rounds.max(1) {
        for (peer, sender, name) in peers {
            let row = idle(peer, 10_000).await?;
            keep(format!("{name}_idle"), &row, "server_rss_per_connection_bytes");
            keep(format!("{name}_handshakes"), &row, "handshakes_per_sec");
            rows.push(row);
            let shapes = [
                ("unpaced", 10_000, Firing { broadcasts: 200, size: 256, interval_ms: 0, sender }),
                ("burst", 2_000, Firing { broadcasts: 1_000, size: 64, interval_ms: 0, sender }),
                ("paced", 10_000, Firing { broadcasts: 50, size: 256, interval_ms: 100, sender }),
            ];
            for (shape, connections, firing) in shapes {
                let label = if shape == "burst" { "burst" } else { "fanout" };
                let row = fanout(label, connections, firing).await?;
                for figure in
                    ["msgs_per_sec", "p50_ms", "p99_ms", "server_peak_rss_mib", "delivered_ratio"]
                {
                    keep(format!("{name}_{shape}_{figure}"), &row, figure);
                }
                rows.push(row);
            }
        }
    }
    let median = |key: &str| figures.median(key);
    let ratio = |a: &str| figures.ratio(&format!("transport_{a}"), &format!("bun_{a}"));
    let mut summary =
        Row::new("versus bun (medians; ratio = transport / bun)").with("rounds", rounds.max(1));
    for (key, name) in [
        ("idle", "idle_bytes"),
        ("handshakes", "handshakes_per_sec"),
        ("unpaced_msgs_per_sec", "unpaced_msgs_per_sec"),
        ("unpaced_p99_ms", "unpaced_p99_ms"),
        ("unpaced_server_peak_rss_mib", "unpaced_peak_rss_mib"),
        ("burst_msgs_per_sec", "burst_msgs_per_sec"),
        ("burst_p99_ms", "burst_p99_ms"),
        ("paced_p50_ms", "paced_p50_ms"),
        ("paced_p99_ms", "paced_p99_ms"),
    ] {
        summary = summary
            .with(name, median(&format!("transport_{key}")))
            .with(format!("bun_{name}"), median(&format!("bun_{key}")))
            .with(format!("node_{name}"), median(&format!("node_{key}")))
            .with(format!("{name}_ratio"), ratio(key));
    }
    rows.push(summary);
    Ok(rows)
}

/// Figures collected over rounds, by key.
#[derive(Default)]
struct Medians(std::collections::BTreeMap<String, Vec<f64>>);

impl Medians {
    /// Keeps `row`'s `figure` under `key`.
    fn keep(&mut self, key: String, row: &Row, figure: &str) {
        if let Some(value) = row.figure(figure) {
            self.0.entry(key).or_default().push(value);
        }
    }

    fn median(&self, key: &str) -> f64 {
        let mut values = self.0.get(key).cloned().unwrap_or_default();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// `a`'s median over `b`'s, to three places.
    fn ratio(&self, a: &str, b: &str) -> f64 {
        (self.median(a) / self.median(b) * 1000.0).round() / 1000.0
    }
}

/// One result line: a table row for people and a JSON object for tools.
struct Row {
    scenario: String,
    figures: Vec<(std::borrow::Cow<'static, str>, serde_json::Value)>,
}

impl Row {
    fn new(scenario: impl Into<String>) -> Self {
        Self { scenario: scenario.into(), figures: Vec::new() }
    }

    fn with(
        mut self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.figures.push((name.into(), value.into()));
        self
    }

    /// The row named after the server that produced it (`idle (node ws)`).
    fn labelled(mut self, peer: Peer) -> Self {
        match peer {
            Peer::Transport => {}
            Peer::Node => self.scenario.push_str(" (node ws)"),
            Peer::Bun => self.scenario.push_str(" (bun)"),
        }
        self
    }

    /// A numeric figure of the row.
    fn figure(&self, name: &str) -> Option<f64> {
        self.figures.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_f64())
    }

    fn print(&self) {
        let cells: Vec<String> = self.figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("| {} | {} |", self.scenario, cells.join(" | "));
        let mut json = serde_json::Map::new();
        json.insert("scenario".into(), self.scenario.clone().into());
        for (k, v) in &self.figures {
            json.insert(k.to_string(), v.clone());
        }
        println!("{}", serde_json::Value::Object(json));
    }
}

/// Extra arguments passed to every server this run starts.
static SERVER_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// A `bench-server` child process.
struct Server {
    child: Child,
    port: u16,
    /// Kept open: the server prints to it again when it exits.
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Server {
    /// The transport, with the extra arguments of this run.
    async fn transport() -> anyhow::Result<Self> {
        Self::spawn(SERVER_ARGS.get().cloned().unwrap_or_default()).await
    }

    /// The server the WebSocket scenarios drive.
    async fn under_test(peer: Peer) -> anyhow::Result<Self> {
        match peer {
            Peer::Transport => Self::transport().await,
            Peer::Node => Self::node().await,
            Peer::Bun => Self::bun().await,
        }
    }

    /// Bun (`packages/bench/bun`), with the binary the npm registry ships.
    async fn bun() -> anyhow::Result<Self> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bun");
        let bun = dir.join("node_modules/@oven/bun-linux-x64/bin/bun");
        if !bun.is_file() {
            bail!("the Bun peer needs its packages: npm ci --prefix {}", dir.display());
        }
        let mut command = Command::new(bun);
        command.arg(dir.join("bun-server.mjs"));
        Self::start(command).await
    }

    /// Node.js with the `ws` package (`packages/bench/node`).
    async fn node() -> anyhow::Result<Self> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
        if !dir.join("node_modules/ws").is_dir() {
            bail!("the Node.js peer needs its packages: npm ci --prefix {}", dir.display());
        }
        let mut command = Command::new("node");
        command.arg(dir.join("ws-server.mjs"));
        Self::start(command).await.context("the Node.js peer needs `node` on the PATH")
    }

    /// A bare axum router, the HTTP baseline.
    async fn bare() -> anyhow::Result<Self> {
        Self::spawn(vec!["--bare".into()]).await
    }

    /// The bare router inside the transport's HTTP middleware stack and nothing else.
    async fn bare_with_layers() -> anyhow::Result<Self> {
        Self::spawn(vec!["--bare".into(), "--with-layers".into()]).await
    }

    /// The fan-out floor: hand-made handshakes and one blocking write per connection.
    async fn floor(receivers: usize, firing: &Firing) -> anyhow::Result<Self> {
        Self::spawn(vec![
            format!("--floor={receivers}"),
            format!("--broadcasts={}", firing.broadcasts),
            format!("--size={}", firing.size),
            format!("--interval-ms={}", firing.interval_ms),
        ])
        .await
    }

    async fn spawn(args: Vec<String>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe.with_file_name("bench-server"));
        command.args(args);
        Self::start(command).await
    }

    /// Starts a server that prints `LISTENING <port>` first (on core 0 with `--pin`).
    async fn start(command: Command) -> anyhow::Result<Self> {
        let mut command = if pinned() {
            // taskset execs the server: the child's pid, and its CPU time, are the server's.
            let std = command.as_std();
            let mut on_core_0 = Command::new("taskset");
            on_core_0.arg("-c").arg("0").arg(std.get_program()).args(std.get_args());
            on_core_0
        } else {
            command
        };
        let mut child = command
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.as_std().get_program()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = stdout.next_line().await?.context("server exited before listening")?;
        let port = line.strip_prefix("LISTENING ").context("unexpected first line")?.parse()?;
        Ok(Self { child, port, stdout })
    }

    /// The `OFFERED n` line the server prints when it exits.
    async fn read_offered(&mut self) -> anyhow::Result<u64> {
        while let Some(line) = self.stdout.next_line().await? {
            if let Some(offered) = line.strip_prefix("OFFERED ") {
                return Ok(offered.parse()?);
            }
        }
        bail!("the server exited without its OFFERED line")
    }

    /// CPU time (user + system) the server process has used so far.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let pid = self.child.id().context("server exited")?;
        cpu_time(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
    }

    /// Current and peak resident memory of the server process, in bytes.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.child.id().context("server exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).context("no such field")?;
            let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse()?;
            Ok(kib * 1024)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("server exited")?.to_string();
        let status = std::process::Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            bail!("kill failed");
        }
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.terminate()?;
        }
        self.child.wait().await?;
        Ok(())
    }
}

async fn connect_one(port: u16, index: usize) -> anyhow::Result<Ws> {
    let octet = 2 + u8::try_from(index % usize::from(SOURCE_ADDRESSES)).unwrap_or(0);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, octet), 0)))?;
    let stream = socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    Ok(ws)
}

/// Handshakes in flight while connections are opened.
const HANDSHAKES_IN_FLIGHT: usize = 256;

/// Waits (a minute at most) until loopback holds fewer sockets in TIME-WAIT than `count`: the
/// connections of earlier scenarios linger there for a minute after they close, and a new
/// connection whose address pair collides with one of them waits a SYN retransmission (a
/// second or more), which would show up as a handshake rate ten times too low.
async fn wait_for_time_wait(count: usize) {
    let in_time_wait = || -> Option<usize> {
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        let tcp = sockstat.lines().find(|line| line.starts_with("TCP:"))?;
        let mut fields = tcp.split_whitespace();
        fields.find(|field| *field == "tw")?;
        fields.next()?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(65);
    while in_time_wait().is_some_and(|tw| tw >= count) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Opens `count` connections with [`HANDSHAKES_IN_FLIGHT`] handshakes in flight: as many
/// tasks, each opening its share one after another, so no spawn or wake-up per connection
/// goes through the main thread. Returns them (in order) and the time it took.
async fn connect_many(port: u16, count: usize) -> anyhow::Result<(Vec<Ws>, Duration)> {
    let started = Instant::now();
    let lanes = HANDSHAKES_IN_FLIGHT.min(count.max(1));
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            tokio::spawn(async move {
                let mut opened = Vec::with_capacity(count / lanes + 1);
                for index in (lane..count).step_by(lanes) {
                    opened.push(connect_one(port, index).await?);
                }
                anyhow::Ok(opened)
            })
        })
        .collect();
    let mut lanes_opened = Vec::with_capacity(lanes);
    for task in tasks {
        lanes_opened.push(task.await??.into_iter());
    }
    let elapsed = started.elapsed();
    // Interleave the lanes back into index order.
    let mut connections = Vec::with_capacity(count);
    'merge: loop {
        for lane in &mut lanes_opened {
            match lane.next() {
                Some(ws) => connections.push(ws),
                None => break 'merge,
            }
        }
    }
    Ok((connections, elapsed))
}

/// The body of `GET path` on the server (a raw HTTP/1.1 request; no client library needed).
async fn get_body(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes()).await?;
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response).await?;
    Ok(response.split("\r\n\r\n").nth(1).context("no body")?.to_owned())
}

/// What the server counted as undelivered (`topgun_outbound_dropped_messages_total`).
async fn server_dropped(port: u16) -> anyhow::Result<u64> {
    let metrics = get_body(port, "/metrics").await?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("topgun_outbound_dropped_messages_total "))
        .context("no dropped-messages metric")?;
    Ok(line.rsplit(' ').next().unwrap_or("0").parse()?)
}

async fn server_connections(port: u16) -> anyhow::Result<usize> {
    let body = get_body(port, "/health").await?;
    let json: serde_json::Value = serde_json::from_str(&body)?;
    json["connections"]
        .as_u64()
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        .context("no count")
}

async fn wait_for_connections(port: u16, expected: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while server_connections(port).await? != expected {
        if Instant::now() > deadline {
            bail!("server never reported {expected} connections");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Microseconds of `cpu` per one of `count` operations, to a tenth.
#[allow(clippy::cast_precision_loss)] // figures for display
fn micros_each(cpu: Duration, count: usize) -> f64 {
    (cpu.as_secs_f64() * 1e7 / count as f64).round() / 10.0
}

/// A pinned client's core busier than this (CPU time over wall time) was the limit: the run's
/// rate and latency are the client's, not the server's.
const CLIENT_SATURATED: f64 = 0.9;

/// Microseconds of `cpu` per one of `count`, to a hundredth.
#[allow(clippy::cast_precision_loss)] // figures for display
fn us_per(cpu: Duration, count: usize) -> f64 {
    (cpu.as_secs_f64() * 1e8 / count.max(1) as f64).round() / 100.0
}

/// `cpu` over `elapsed`: the share of one core that was busy, to a hundredth.
fn core_busy(cpu: Duration, elapsed: Duration) -> f64 {
    (cpu.as_secs_f64() / elapsed.as_secs_f64().max(1e-9) * 100.0).round() / 100.0
}

#[allow(clippy::cast_precision_loss)] // figures for display
fn per_second(count: usize, elapsed: Duration) -> f64 {
    (count as f64 / elapsed.as_secs_f64()).round()
}

async fn idle(peer: Peer, connections: usize) -> anyhow::Result<Row> {
    let server = Server::under_test(peer).await?;
    let (before, _) = server.memory()?;
    // The handshake rate is this scenario's figure: measured without an earlier scenario's
    // closed connections in the way.
    wait_for_time_wait(connections).await;
    let (server_cpu, client_cpu) = (server.cpu()?, own_cpu()?);
    let (clients, took) = connect_many(server.port, connections).await?;
    let server_cpu = server.cpu()?.saturating_sub(server_cpu);
    let client_cpu = own_cpu()?.saturating_sub(client_cpu);
    wait_for_connections(server.port, connections).await?;
    let (after, _) = server.memory()?;
    let per_connection = after.saturating_sub(before) / connections as u64;
    drop(clients);
    server.stop().await?;
    // CPU per handshake, to the 10 ms resolution of /proc: both sides share the cores, so
    // what the server spends is what its clients cannot.
    Ok(Row::new("idle")
        .labelled(peer)
        .with("connections", connections)
        .with("server_rss_per_connection_bytes", per_connection)
        .with("server_rss_mib", after / (1 << 20))
        .with("handshakes_per_sec", per_second(connections, took))
        .with("server_cpu_us_per_handshake", micros_each(server_cpu, connections))
        .with("client_cpu_us_per_handshake", micros_each(client_cpu, connections)))
}

/// User plus system CPU time from a `/proc/<pid>/stat` line (clock ticks of 10 ms).
fn cpu_time(stat: &str) -> anyhow::Result<Duration> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<u64> {
        Ok(fields.get(index).context("stat field")?.parse()?)
    };
    // utime and stime are the 14th and 15th fields, the 12th and 13th after the name.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// CPU time this process (the clients) has used so far.
fn own_cpu() -> anyhow::Result<Duration> {
    cpu_time(&std::fs::read_to_string("/proc/self/stat")?)
}

fn now_nanos() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)
}

/// What one receiving connection saw.
#[derive(Default)]
struct Received {
    messages: usize,
    frames: usize,
    latencies_us: Vec<u32>,
}

impl Received {
    /// Counts a frame that `arrived` (nanoseconds since the epoch): its messages (a `BATCH`
    /// or one) and each one's latency from the send time in its first eight bytes.
    fn count_frame(&mut self, frame: &bytes::Bytes, arrived: u64) {
        self.frames += 1;
        for message in decode_frame_shared(frame).unwrap_or_default() {
            self.messages += 1;
            if let Some(sent) = message.get(..8) {
                let sent = u64::from_le_bytes(sent.try_into().unwrap_or_default());
                let micros = arrived.saturating_sub(sent) / 1_000;
                self.latencies_us.push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
        }
    }

    /// Adds another connection's counts to these.
    fn add(&mut self, other: Received) {
        self.messages += other.messages;
        self.frames += other.frames;
        self.latencies_us.extend(other.latencies_us);
    }
}

/// Reads until `expected` messages arrived, the server closed, or `quiet` passed in silence.
/// Hands the connection back rather than closing it: clients that finish first must not load
/// the server with their closes while it still delivers to the others.
async fn receive(mut ws: Ws, expected: usize, quiet: Duration) -> (Received, Ws) {
    let mut seen = Received { latencies_us: Vec::with_capacity(expected), ..Received::default() };
    // One timer for the whole run, looked at only when it fires: a timer armed per frame costs
    // more than reading the frame when a server sends one frame per message.
    let silence = tokio::time::sleep(quiet);
    tokio::pin!(silence);
    let mut last_frame = tokio::time::Instant::now();
    while seen.messages < expected {
        let message = tokio::select! {
            biased;
            next = ws.next() => match next {
                Some(Ok(message)) => message,
                _ => break,
            },
            () = &mut silence => {
                if last_frame.elapsed() >= quiet {
                    break;
                }
                silence.as_mut().reset(last_frame + quiet);
                continue;
            }
        };
        last_frame = tokio::time::Instant::now();
        let Message::Binary(frame) = message else {
            continue;
        };
        seen.count_frame(&frame, now_nanos());
    }
    (seen, ws)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index]) / 1_000.0
}

/// How the server fires its broadcasts.
struct Firing {
    broadcasts: u32,
    size: usize,
    interval_ms: u64,
    sender: Sender,
}

/// Which server sends the broadcasts, and how.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sender {
    /// The transport's `broadcast_cooperative`.
    Cooperative,
    /// The transport's synchronous `broadcast` in a tight loop.
    Sync,
    /// The floor server: one blocking write per connection, nothing else.
    Floor,
    /// Node.js `ws`: one `send` per connection.
    Node,
    /// Bun: `server.publish` to every subscriber.
    Bun,
}

async fn fanout(label: &str, connections: usize, firing: Firing) -> anyhow::Result<Row> {
    let floor = firing.sender == Sender::Floor;
    let server = match firing.sender {
        Sender::Floor => Server::floor(connections, &firing).await?,
        Sender::Node => Server::node().await?,
        Sender::Bun => Server::bun().await?,
        Sender::Cooperative | Sender::Sync => Server::transport().await?,
    };
    let counts_drops = matches!(firing.sender, Sender::Cooperative | Sender::Sync);
    let Firing { broadcasts, size, interval_ms, sender } = firing;
    let (clients, _) = connect_many(server.port, connections).await?;
    if !floor {
        wait_for_connections(server.port, connections).await?;
    }
    let mut control = connect_one(server.port, connections).await?;
    if !floor {
        wait_for_connections(server.port, connections + 1).await?;
    }
    let expected = usize::try_from(broadcasts)?;
    let quiet = Duration::from_secs(5) + Duration::from_millis(interval_ms * 2);
    let receivers: Vec<_> =
        clients.into_iter().map(|ws| tokio::spawn(receive(ws, expected, quiet))).collect();

    let request = serde_json::json!({
        "type": "BROADCAST",
        "count": broadcasts,
        "size": size,
        "interval_ms": interval_ms,
        "cooperative": sender == Sender::Cooperative,
    });
    let started = Instant::now();
    let cpu_before = (server.cpu().unwrap_or_default(), own_cpu()?);
    control.send(Message::Binary(rmp_serde::to_vec_named(&request)?.into())).await?;
    let mut total = Received::default();
    let mut finished = Vec::with_capacity(receivers.len());
    for receiver in receivers {
        let (seen, ws) = receiver.await?;
        finished.push(ws);
        total.add(seen);
    }
    let elapsed = started.elapsed();
    drop(finished);
    // The floor server may have exited already (it sends, then leaves): no figure then.
    let server_cpu = server.cpu().ok().map(|cpu| cpu.saturating_sub(cpu_before.0));
    let client_cpu = own_cpu()?.saturating_sub(cpu_before.1);
    // The floor server exits once it has sent everything and counts nothing.
    let peak = server.memory().ok().map(|(_, peak)| peak / (1 << 20));
    let counted = if counts_drops {
        // Let closing connections finish (their leftover queues are counted as they close).
        drop(control);
        wait_for_connections(server.port, 0).await?;
        Some(server_dropped(server.port).await?)
    } else {
        None
    };
    server.stop().await?;
    total.latencies_us.sort_unstable();
    let wanted = connections * expected;
    let mut name = 1000_u64
        .checked_div(interval_ms)
        .map_or_else(|| label.to_owned(), |rate| format!("{label} paced {rate}/s"));
    match sender {
        Sender::Cooperative => {}
        Sender::Sync => name.push_str(" (sync broadcast)"),
        Sender::Floor => name.push_str(" (floor: blocking writes)"),
        Sender::Node => name.push_str(" (node ws)"),
        Sender::Bun => name.push_str(" (bun)"),
    }
    #[allow(clippy::cast_precision_loss)]
    let delivered = total.messages as f64 / wanted as f64;
    #[allow(clippy::cast_precision_loss)]
    let frames_per_message = total.frames as f64 / total.messages.max(1) as f64;
    Ok(Row::new(name)
        .with("connections", connections)
        .with("broadcasts", broadcasts)
        .with("bytes", size)
        .with("delivered_ratio", (delivered * 10_000.0).round() / 10_000.0)
        .with("undelivered", wanted - total.messages.min(wanted))
        .with("counted_by_server", counted)
        .with("msgs_per_sec", per_second(total.messages, elapsed))
        .with("p50_ms", percentile(&total.latencies_us, 0.50))
        .with("p99_ms", percentile(&total.latencies_us, 0.99))
        .with("max_ms", percentile(&total.latencies_us, 1.0))
        .with("frames_per_message", (frames_per_message * 1000.0).round() / 1000.0)
        .with("server_cpu_ms", server_cpu.map(|cpu| u64::try_from(cpu.as_millis()).unwrap_or(0)))
        .with("server_us_per_msg", server_cpu.map(|cpu| us_per(cpu, total.messages)))
        .with("client_cpu_ms", u64::try_from(client_cpu.as_millis()).unwrap_or(0))
        .with("pinned", pinned())
        .with("client_core_busy", core_busy(client_cpu, elapsed))
        .with("valid", !pinned() || core_busy(client_cpu, elapsed) < CLIENT_SATURATED)
        .with("server_peak_rss_mib", peak))
}

async fn echo(peer: Peer, connections: usize, round_trips: usize) -> anyhow::Result<Row> {
    let server = Server::under_test(peer).await?;
    let (clients, _) = connect_many(server.port, connections).await?;
    let started = Instant::now();
    let sessions: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut rtts = Vec::with_capacity(round_trips);
                for seq in 0..round_trips {
                    let sent = Instant::now();
                    let payload = bytes::Bytes::from(seq.to_le_bytes().to_vec());
                    ws.send(Message::Binary(payload.clone())).await?;
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Binary(frame))) if frame == payload => break,
                            Some(Ok(_)) => {}
                            _ => bail!("connection ended mid-echo"),
                        }
                    }
                    rtts.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                anyhow::Ok(rtts)
            })
        })
        .collect();
    let mut rtts = Vec::new();
    for session in sessions {
        rtts.extend(session.await??);
    }
    let elapsed = started.elapsed();
    server.stop().await?;
    rtts.sort_unstable();
    Ok(Row::new("echo")
        .labelled(peer)
        .with("connections", connections)
        .with("round_trips", rtts.len())
        .with("round_trips_per_sec", per_second(rtts.len(), elapsed))
        .with("p50_ms", percentile(&rtts, 0.50))
        .with("p99_ms", percentile(&rtts, 0.99))
        .with("max_ms", percentile(&rtts, 1.0)))
}

async fn wrk(port: u16, seconds: u64) -> anyhow::Result<f64> {
    let output = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{seconds}s"), &format!("http://127.0.0.1:{port}/health")])
        .output()
        .await
        .context("wrk is needed for the HTTP scenario: apt-get install wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line =
        text.lines().find(|l| l.starts_with("Requests/sec:")).context("no Requests/sec line")?;
    Ok(line["Requests/sec:".len()..].trim().parse()?)
}

/// Runs wrk against the full stack, the bare router inside the middleware stack alone, and the
/// bare router in turn, `rounds` times, so drift in the machine's load affects all three alike;
/// reports the run with the median full-stack ratio, and the median ratio of the layers alone.
async fn http(seconds: u64, rounds: usize) -> anyhow::Result<Row> {
    let full = Server::transport().await?;
    let layers = Server::bare_with_layers().await?;
    let bare = Server::bare().await?;
    let mut runs = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let full_rps = wrk(full.port, seconds).await?;
        let layers_rps = wrk(layers.port, seconds).await?;
        let bare_rps = wrk(bare.port, seconds).await?;
        runs.push((full_rps / bare_rps, full_rps, bare_rps, layers_rps / bare_rps));
    }
    full.stop().await?;
    layers.stop().await?;
    bare.stop().await?;
    let rounded = |ratio: f64| (ratio * 1000.0).round() / 1000.0;
    let mut layers_ratios: Vec<f64> = runs.iter().map(|run| rounded(run.3)).collect();
    layers_ratios.sort_by(f64::total_cmp);
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let ratios: Vec<f64> = runs.iter().map(|run| rounded(run.0)).collect();
    let (ratio, full_rps, bare_rps, _) = runs[runs.len() / 2];
    Ok(Row::new("http /health")
        .with("full_stack_req_per_sec", full_rps.round())
        .with("bare_axum_req_per_sec", bare_rps.round())
        .with("ratio", rounded(ratio))
        .with("ratios_of_all_rounds", ratios)
        .with("layers_only_ratio", layers_ratios[layers_ratios.len() / 2])
        .with("layers_only_ratios", layers_ratios))
}

async fn drain(peer: Peer, connections: usize) -> anyhow::Result<Row> {
    let mut server = Server::under_test(peer).await?;
    let (clients, _) = connect_many(server.port, connections).await?;
    wait_for_connections(server.port, connections).await?;
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Close(Some(frame)) = message {
                        // Keep reading so the acknowledgement goes out, as a real client's does.
                        while let Some(Ok(_)) = ws.next().await {}
                        return Some(u16::from(frame.code));
                    }
                }
                None
            })
        })
        .collect();
    let started = Instant::now();
    server.terminate()?;
    let mut closed_1001 = 0;
    for watcher in watchers {
        if watcher.await? == Some(1001) {
            closed_1001 += 1;
        }
    }
    let all_closed = started.elapsed();
    server.child.wait().await?;
    let exited = started.elapsed();
    Ok(Row::new("drain")
        .labelled(peer)
        .with("connections", connections)
        .with("closed_with_1001", closed_1001)
        .with("all_closed_ms", u64::try_from(all_closed.as_millis()).unwrap_or(u64::MAX))
        .with("server_exited_ms", u64::try_from(exited.as_millis()).unwrap_or(u64::MAX)))
}
