//! The soak: a TLS server under every kind of traffic for a bounded time, then checks that it
//! gave back what it took. With `--plain`, the same over plain TCP (no certificate reloads),
//! where senders write to idle connections' sockets themselves (`direct.rs`).
//!
//! For `minutes` (default 10), against `bench-server --tls-cert --tls-key`:
//! - 100 steady clients stay connected and read every broadcast;
//! - one control connection asks for 10 cooperative broadcasts of 256 B every second;
//! - 8 churning clients connect, echo 5 messages, close, and start again;
//! - a `POST /sync` every 20 ms;
//! - every 15 s a slow client that sends 3 MiB of echo requests and reads nothing (the server
//!   drops it after its send timeout), every 5 s a client that vanishes without a close;
//! - every minute a new certificate is written and the server gets SIGHUP.
//!
//! Then every client leaves, and the run fails unless: the server's open files return to what
//! they were before the first client (exactly), its RSS is within 10 % of its level after the
//! warm-up (the first tenth of the run; the level is the highest sample over the next tenth:
//! the second minute of a 10-minute run), every steady client received every broadcast, no
//! request, reload or reconnect failed, and every message the handler offered is either sent
//! or counted as dropped (`OFFERED` = `topgun_websocket_messages_sent_total` +
//! `topgun_outbound_dropped_messages_total`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use topgun_server::network::decode_frame_shared;
use topgun_test_support::certs::TestCa;
use topgun_test_support::{WsClient, connect_wss};

use super::{Row, Server};

const STEADY_CLIENTS: usize = 100;
const CHURNERS: usize = 8;
const BROADCASTS_PER_SECOND: u64 = 10;

/// What the traffic tasks count.
#[derive(Default)]
struct Counts {
    broadcasts_requested: AtomicU64,
    churn_cycles: AtomicU64,
    sync_ok: AtomicU64,
    slow_clients: AtomicU64,
    vanished: AtomicU64,
    reloads: AtomicU64,
    failures: AtomicU64,
}

struct Soak {
    port: u16,
    /// `None` for a plain-TCP server.
    tls: Option<Arc<rustls::ClientConfig>>,
    http: reqwest::Client,
    counts: Counts,
    stop: AtomicBool,
}

impl Soak {
    fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://localhost:{}{path}", self.port)
    }

    async fn ws(&self) -> anyhow::Result<WsClient> {
        if let Some(tls) = &self.tls {
            let url = format!("wss://localhost:{}/ws", self.port);
            return Ok(connect_wss(&url, Arc::clone(tls)).await?);
        }
        let url = format!("ws://127.0.0.1:{}/ws", self.port);
        let connect = tokio_tungstenite::connect_async(url);
        Ok(tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .context("connect in time")??
            .0)
    }

    /// An HTTP client for the server, TLS or not.
    fn http_client(tls: Option<&Arc<rustls::ClientConfig>>) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        match tls {
            Some(tls) => builder.use_preconfigured_tls((**tls).clone()),
            None => builder,
        }
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, err: &dyn std::fmt::Display) {
        eprintln!("soak: {what} failed: {err}");
        self.counts.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Sleeps `period`, or less when the soak is stopping; `false` once it is.
    async fn every(&self, period: Duration) -> bool {
        let until = Instant::now() + period;
        while self.running() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50).min(until - Instant::now())).await;
        }
        self.running()
    }
}

/// Reads a steady client's frames until the soak stops, counting broadcast messages.
async fn steady(soak: Arc<Soak>, received: Arc<AtomicU64>) -> anyhow::Result<WsClient> {
    let mut ws = soak.ws().await?;
    while soak.running() {
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(Message::Binary(frame)))) => {
                let messages = decode_frame_shared(&frame).map_err(anyhow::Error::msg)?;
                received.fetch_add(messages.len() as u64, Ordering::Relaxed);
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(other) => bail!("steady client lost its connection: {other:?}"),
        }
    }
    Ok(ws)
}

/// Reads `ws` until `done` says the expected number of messages arrived, or 30 s pass.
async fn read_rest(mut ws: WsClient, received: &AtomicU64, expected: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Binary(frame)))) =
            tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        {
            let messages = decode_frame_shared(&frame).map_err(anyhow::Error::msg)?;
            received.fetch_add(messages.len() as u64, Ordering::Relaxed);
        }
    }
    ws.close(None).await.ok();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    Ok(())
}

async fn broadcaster(soak: Arc<Soak>) -> anyhow::Result<()> {
    let ws = soak.ws().await?;
    let (mut sink, mut stream) = ws.split();
    // The control connection receives the broadcasts too: drain them.
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    while soak.every(Duration::from_secs(1)).await {
        let request = serde_json::json!({
            "type": "BROADCAST", "count": BROADCASTS_PER_SECOND, "size": 256,
            "interval_ms": 1000 / BROADCASTS_PER_SECOND / 2, "cooperative": true,
        });
        sink.send(Message::Binary(rmp_serde::to_vec_named(&request)?.into())).await?;
        soak.counts.broadcasts_requested.fetch_add(BROADCASTS_PER_SECOND, Ordering::Relaxed);
    }
    // Let the last request finish before this connection (and the drain) goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sink.close().await.ok();
    tokio::time::timeout(Duration::from_secs(10), drain).await.ok();
    Ok(())
}

async fn churn(soak: Arc<Soak>) {
    while soak.running() {
        if let Err(err) = churn_once(&soak).await {
            soak.failed("churn cycle", &err);
        }
    }
}

async fn churn_once(soak: &Soak) -> anyhow::Result<()> {
    let mut ws = soak.ws().await?;
    for i in 0..5_u8 {
        ws.send(Message::Binary(vec![b'e', b'c', b'h', b'o', i].into())).await?;
    }
    let mut echoes = 0;
    while echoes < 5 {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("echo in time")?
            .context("connection open")??;
        if let Message::Binary(frame) = message {
            let messages = decode_frame_shared(&frame).map_err(anyhow::Error::msg)?;
            echoes += messages.iter().filter(|m| m.starts_with(b"echo")).count();
        }
    }
    ws.close(None).await?;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    soak.counts.churn_cycles.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn sync_traffic(soak: Arc<Soak>) {
    let body = rmp_serde::to_vec_named(&serde_json::json!({
        "clientId": "soak", "clientHlc": {"millis": 1_796_023_824_376_u64, "counter": 0, "nodeId": "soak"},
    }))
    .expect("encodes");
    while soak.every(Duration::from_millis(20)).await {
        let sent = soak
            .http
            .post(soak.url("/sync"))
            .header("content-type", "application/x-msgpack")
            .header("authorization", "Bearer soak")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status() == 200 => {
                soak.counts.sync_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(response) => soak.failed("POST /sync", &response.status()),
            Err(err) => soak.failed("POST /sync", &err),
        }
    }
}

/// Every 15 s a client that asks for 3 MiB of echoes and reads none of them.
async fn slow_clients(soak: Arc<Soak>) {
    let mut held = Vec::new();
    while soak.every(Duration::from_secs(15)).await {
        match soak.ws().await {
            Ok(mut ws) => {
                for _ in 0..48 {
                    if ws.send(Message::Binary(vec![0x5a; 64 * 1024].into())).await.is_err() {
                        break;
                    }
                }
                soak.counts.slow_clients.fetch_add(1, Ordering::Relaxed);
                held.push(ws);
                if held.len() > 2 {
                    held.remove(0);
                }
            }
            Err(err) => soak.failed("slow client connect", &err),
        }
    }
}

/// Every 5 s a client that sends one message and disappears without a close.
async fn vanishing_clients(soak: Arc<Soak>) {
    while soak.every(Duration::from_secs(5)).await {
        match soak.ws().await {
            Ok(mut ws) => {
                ws.send(Message::Binary(b"echo-and-vanish".to_vec().into())).await.ok();
                drop(ws);
                soak.counts.vanished.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => soak.failed("vanishing client connect", &err),
        }
    }
}

/// Every minute: a new certificate on disk, then SIGHUP.
async fn reloads(
    soak: Arc<Soak>,
    ca: Arc<TestCa>,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    pid: u32,
) {
    let mut serial = 1;
    while soak.every(Duration::from_secs(60)).await {
        serial += 1;
        let issued = ca.server_cert(serial);
        let written = std::fs::write(&key, &issued.key_pem)
            .and_then(|()| std::fs::write(&cert, &issued.cert_pem));
        let signalled =
            std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status();
        match (written, signalled) {
            (Ok(()), Ok(status)) if status.success() => {
                soak.counts.reloads.fetch_add(1, Ordering::Relaxed);
            }
            (written, signalled) => soak.failed("reload", &format!("{written:?} {signalled:?}")),
        }
    }
}

fn open_files(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn scraped(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
pub(super) async fn soak(minutes: u64, plain: bool) -> anyhow::Result<Row> {
    topgun_test_support::install_crypto_provider();
    let ca = Arc::new(TestCa::new("soak CA"));
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let first = ca.server_cert(1);
    std::fs::write(&cert, &first.cert_pem)?;
    std::fs::write(&key, &first.key_pem)?;
    let tls_args =
        vec![format!("--tls-cert={}", cert.display()), format!("--tls-key={}", key.display())];
    let mut server = Server::spawn(if plain { Vec::new() } else { tls_args }).await?;
    let pid = server.child.id().context("server running")?;
    let tls = (!plain).then(|| ca.client_config(None));
    // Keep-alive for the `/sync` loop, with idle connections closed soon after it stops.
    let http = Soak::http_client(tls.as_ref()).pool_idle_timeout(Duration::from_secs(1)).build()?;
    let soak = Arc::new(Soak {
        port: server.port,
        tls,
        http,
        counts: Counts::default(),
        stop: AtomicBool::new(false),
    });
    let files_before = open_files(pid)?;
    let duration = Duration::from_secs(minutes * 60);
    let warm_up = (duration / 10).max(Duration::from_secs(30)).min(duration);
    // The level after warm-up is the highest sample over as long again: RSS moves by several
    // MiB from one sample to the next while the allocator gives memory back, and a single
    // sample that fell in such a dip made an unchanged level look like growth.
    let settled = (warm_up * 2).min(duration);
    let started = Instant::now();

    let received: Vec<Arc<AtomicU64>> = (0..STEADY_CLIENTS).map(|_| Arc::default()).collect();
    let mut steady_tasks = JoinSet::new();
    for counter in &received {
        steady_tasks.spawn(steady(Arc::clone(&soak), Arc::clone(counter)));
    }
    // Broadcasts start once every steady client is connected, so each must get all of them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut traffic = JoinSet::new();
    traffic.spawn({
        let soak = Arc::clone(&soak);
        async move {
            if let Err(err) = broadcaster(Arc::clone(&soak)).await {
                soak.failed("broadcaster", &err);
            }
        }
    });
    for _ in 0..CHURNERS {
        traffic.spawn(churn(Arc::clone(&soak)));
    }
    traffic.spawn(sync_traffic(Arc::clone(&soak)));
    traffic.spawn(slow_clients(Arc::clone(&soak)));
    traffic.spawn(vanishing_clients(Arc::clone(&soak)));
    if !plain {
        traffic.spawn(reloads(Arc::clone(&soak), Arc::clone(&ca), cert.clone(), key.clone(), pid));
    }

    let mut rss_warm = None;
    let mut rss_peak = 0;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(5).min(duration.saturating_sub(started.elapsed())))
            .await;
        let (rss, _) = server.memory()?;
        rss_peak = rss_peak.max(rss);
        let elapsed = started.elapsed();
        if elapsed >= warm_up && (elapsed < settled || rss_warm.is_none()) {
            rss_warm = Some(rss_warm.unwrap_or(0).max(rss));
        }
        eprintln!(
            "soak: {:>4} s, RSS {} MiB, {} open files, {} broadcast, {} churn cycles, {} syncs, {} failures",
            started.elapsed().as_secs(),
            rss >> 20,
            open_files(pid)?,
            soak.counts.broadcasts_requested.load(Ordering::Relaxed),
            soak.counts.churn_cycles.load(Ordering::Relaxed),
            soak.counts.sync_ok.load(Ordering::Relaxed),
            soak.counts.failures.load(Ordering::Relaxed),
        );
    }
    soak.stop.store(true, Ordering::Relaxed);
    while traffic.join_next().await.is_some() {}
    let expected = soak.counts.broadcasts_requested.load(Ordering::Relaxed);
    let mut finishing = JoinSet::new();
    while let Some(joined) = steady_tasks.join_next().await {
        let ws = joined??;
        finishing.spawn(async move { ws });
    }
    // Each steady client reads what is still on its way, then closes.
    let mut index = 0;
    while let Some(ws) = finishing.join_next().await {
        read_rest(ws?, &received[index], expected).await?;
        index += 1;
    }

    // Everyone has left: the server must give back its files, and its memory settle. These
    // requests keep no connection open, so nothing of the harness's own is counted.
    let probe = Soak::http_client(soak.tls.as_ref()).pool_max_idle_per_host(0).build()?;
    let health = soak.url("/health");
    let deadline = Instant::now() + Duration::from_secs(60);
    let files_after = loop {
        let report: serde_json::Value = probe.get(&health).send().await?.json().await?;
        let files = open_files(pid)?;
        if report["connections"] == 0 && report["in_flight"] == 0 && files == files_before {
            break files;
        }
        if Instant::now() > deadline {
            bail!(
                "server did not settle: {report} with {files} open files (before: {files_before})"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (rss_end, _) = server.memory()?;
    let metrics = probe.get(soak.url("/metrics")).send().await?.text().await?;
    let sent = scraped(&metrics, "topgun_websocket_messages_sent_total");
    let dropped = scraped(&metrics, "topgun_outbound_dropped_messages_total");
    server.terminate()?;
    let offered = server.read_offered().await?;
    server.child.wait().await?;

    let rss_warm = rss_warm.context("the run ended before its warm-up")?;
    #[allow(clippy::cast_precision_loss)]
    let rss_ratio = rss_end as f64 / rss_warm as f64;
    let delivered_min = received.iter().map(|r| r.load(Ordering::Relaxed)).min().unwrap_or(0);
    let counts = &soak.counts;
    let failures = counts.failures.load(Ordering::Relaxed);
    let row = Row::new(if plain { "soak (plain TCP)" } else { "soak" })
        .with("minutes", minutes)
        .with("broadcasts", expected)
        .with("steady_clients", STEADY_CLIENTS)
        .with("steady_delivered_min", delivered_min)
        .with("churn_cycles", counts.churn_cycles.load(Ordering::Relaxed))
        .with("sync_ok", counts.sync_ok.load(Ordering::Relaxed))
        .with("slow_clients", counts.slow_clients.load(Ordering::Relaxed))
        .with("vanished_clients", counts.vanished.load(Ordering::Relaxed))
        .with("tls_reloads", counts.reloads.load(Ordering::Relaxed))
        .with("failures", failures)
        .with("rss_after_warm_up_mib", rss_warm >> 20)
        .with("rss_peak_mib", rss_peak >> 20)
        .with("rss_end_mib", rss_end >> 20)
        .with("rss_end_over_warm_up", (rss_ratio * 1000.0).round() / 1000.0)
        .with("open_files_before", files_before)
        .with("open_files_after", files_after)
        .with("offered", offered)
        .with("sent", sent)
        .with("counted_dropped", dropped);
    let mut problems = Vec::new();
    if failures > 0 {
        problems.push(format!("{failures} failures"));
    }
    if delivered_min != expected {
        problems.push(format!("a steady client got {delivered_min} of {expected} broadcasts"));
    }
    if rss_ratio > 1.1 {
        problems.push(format!("RSS {rss_end} is {rss_ratio:.2}x its warm-up level {rss_warm}"));
    }
    if offered != sent + dropped {
        problems.push(format!("offered {offered} != sent {sent} + counted dropped {dropped}"));
    }
    if !problems.is_empty() {
        row.print();
        bail!("soak failed: {}", problems.join("; "));
    }
    Ok(row)
}
