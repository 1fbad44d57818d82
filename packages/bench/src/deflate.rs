//! `topgun-bench deflate`: what permessage-deflate costs and saves, each figure without and
//! with it in one run.
//!
//! - idle: server memory per connection and handshakes/s at `--connections`, the server
//!   offering compression to clients that do not ask for it (off) and that do (on);
//! - context takeover, which the server does not offer: the memory one connection would hold
//!   for it (a compressor and a decompressor kept after a message), measured in this process;
//! - paced fan-out of TopGun-shaped messages (a MsgPack batch of map events): bytes on the
//!   wire per message, server CPU, latency, everything delivered;
//! - a burst of small ones, which reach each connection coalesced into `BATCH` frames that are
//!   compressed per connection.
//!
//! The receiving clients are raw sockets for both runs, so the client side is the same code
//! with and without compression: they count the bytes the kernel hands them, inflate what
//! arrives compressed (with a fresh window per message, as agreed) and take each message's
//! send time from its first eight bytes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::bail;
use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::{
    Received, Row, SOURCE_ADDRESSES, Server, connect_one, now_nanos, per_second, percentile,
};

/// How the deflate scenario runs.
#[derive(Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) connections: usize,
    pub(crate) fanout_connections: usize,
    pub(crate) broadcasts: u32,
    pub(crate) size: usize,
    pub(crate) interval_ms: u64,
}

pub(crate) async fn deflate(settings: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for on in [false, true] {
        rows.push(idle(settings.connections, on).await?);
    }
    rows.push(context_takeover(settings.connections.min(2_000), settings.size)?);
    for on in [false, true] {
        rows.push(fanout(settings, on).await?);
    }
    // A burst of one-event messages, each under the threshold: they reach every connection in
    // `BATCH` frames of its own, compressed per connection (the expensive case).
    let burst = Settings {
        fanout_connections: settings.fanout_connections.min(2_000),
        broadcasts: settings.broadcasts.saturating_mul(20),
        size: 64,
        interval_ms: 0,
        ..*settings
    };
    for on in [false, true] {
        rows.push(fanout(&burst, on).await?);
    }
    Ok(rows)
}

fn label(scenario: &str, on: bool) -> String {
    format!("{scenario} permessage-deflate {}", if on { "on" } else { "off" })
}

async fn deflate_server() -> anyhow::Result<Server> {
    Server::spawn(vec!["--permessage-deflate".into()]).await
}

/// A raw client's socket, past the handshake (which checked the server agreed to deflate
/// exactly when it was offered).
struct RawSocket {
    stream: TcpStream,
    /// Bytes read past the handshake's end.
    leftover: Vec<u8>,
}

const OFFER: &str = "sec-websocket-extensions: permessage-deflate; client_max_window_bits\r\n";

async fn connect_raw(port: u16, index: usize, offer: bool) -> anyhow::Result<RawSocket> {
    let octet = 2 + u8::try_from(index % usize::from(SOURCE_ADDRESSES)).unwrap_or(0);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, octet), 0)))?;
    let mut stream = socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let request = format!(
        "GET /ws HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n{}\r\n",
        if offer { OFFER } else { "" }
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0_u8; 512];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            bail!("server closed during the handshake");
        }
        head.extend_from_slice(&chunk[..read]);
    };
    let response = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    if !response.starts_with("http/1.1 101") {
        bail!("upgrade refused: {response}");
    }
    let compressed = response.contains("sec-websocket-extensions: permessage-deflate");
    if compressed != offer {
        bail!(
            "permessage-deflate {} though {}offered",
            compressed,
            if offer { "" } else { "not " }
        );
    }
    Ok(RawSocket { stream, leftover: head[end..].to_vec() })
}

/// Opens `count` raw connections, 256 handshakes in flight.
async fn connect_raw_many(
    port: u16,
    count: usize,
    offer: bool,
) -> anyhow::Result<(Vec<RawSocket>, Duration)> {
    let started = Instant::now();
    let lanes = 256.min(count.max(1));
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            tokio::spawn(async move {
                let mut opened = Vec::new();
                for index in (lane..count).step_by(lanes) {
                    opened.push(connect_raw(port, index, offer).await?);
                }
                anyhow::Ok(opened)
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(count);
    for task in tasks {
        sockets.extend(task.await??);
    }
    Ok((sockets, started.elapsed()))
}

async fn idle(connections: usize, on: bool) -> anyhow::Result<Row> {
    let server = deflate_server().await?;
    let (before, _) = server.memory()?;
    let (sockets, took) = connect_raw_many(server.port, connections, on).await?;
    crate::wait_for_connections(server.port, connections).await?;
    let (after, _) = server.memory()?;
    drop(sockets);
    server.stop().await?;
    Ok(Row::new(label("idle", on))
        .with("connections", connections)
        .with("server_rss_per_connection_bytes", after.saturating_sub(before) / connections as u64)
        .with("handshakes_per_sec", per_second(connections, took)))
}

/// What context takeover would hold per connection: a compressor and a decompressor, each
/// after one message, kept; measured as this process's memory growth over `connections`.
fn context_takeover(connections: usize, size: usize) -> anyhow::Result<Row> {
    use flate2::{Compress, Compression, FlushCompress};
    let message: Vec<u8> = b"{\"mapName\":\"todos\",\"key\":\"todo-1\"}".repeat(size / 34 + 1);
    let before = topgun_test_support::resident_bytes("VmRSS");
    let mut kept = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut compressor = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(message.len() + 64);
        compressor.compress_vec(&message, &mut out, FlushCompress::Sync)?;
        let mut decompressor = Decompress::new(false);
        let mut plain = Vec::with_capacity(message.len() + 64);
        decompressor.decompress_vec(&out, &mut plain, FlushDecompress::Sync)?;
        kept.push((compressor, decompressor));
    }
    let grown = topgun_test_support::resident_bytes("VmRSS").saturating_sub(before);
    drop(kept);
    Ok(Row::new("context takeover (not offered): kept per connection")
        .with("connections", connections)
        .with("rss_per_connection_bytes", grown / connections as u64))
}

/// What one receiving connection saw.
#[derive(Default)]
struct Seen {
    received: Received,
    compressed_frames: usize,
    wire_bytes: usize,
}

/// Reads until `expected` messages arrived or `quiet` passed in silence.
async fn receive(mut socket: RawSocket, expected: usize, quiet: Duration) -> (Seen, RawSocket) {
    let mut seen = Seen::default();
    seen.received.latencies_us.reserve(expected);
    let mut buffer = std::mem::take(&mut socket.leftover);
    seen.wire_bytes += buffer.len();
    let mut inflater = Decompress::new(false);
    while seen.received.messages < expected {
        while let Some((first, payload, used)) = next_frame(&buffer) {
            if first & 0x0f == 0x2 {
                let arrived = now_nanos();
                let frame = if first & 0x40 != 0 {
                    seen.compressed_frames += 1;
                    // Only as much as the timestamp needs, unless it is a BATCH frame: the
                    // client's work must not stand in for the server's in the latencies.
                    let head = inflate(&mut inflater, payload, Some(64));
                    if head.starts_with(BATCH_START) {
                        inflate(&mut inflater, payload, None)
                    } else {
                        head
                    }
                } else {
                    payload.to_vec()
                };
                seen.received.count_frame(&frame.into(), arrived);
            }
            buffer.drain(..used);
        }
        if seen.received.messages >= expected {
            break;
        }
        buffer.reserve(64 * 1024);
        match tokio::time::timeout(quiet, socket.stream.read_buf(&mut buffer)).await {
            Ok(Ok(read)) if read > 0 => seen.wire_bytes += read,
            _ => break,
        }
    }
    (seen, socket)
}

/// The first byte, payload and length of the server frame at the start of `bytes`.
fn next_frame(bytes: &[u8]) -> Option<(u8, &[u8], usize)> {
    let (first, second) = (*bytes.first()?, *bytes.get(1)?);
    let (len, header) = match second & 0x7f {
        126 => (usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])), 4),
        127 => (usize::try_from(u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)).ok()?, 10),
        len => (usize::from(len), 2),
    };
    Some((first, bytes.get(header..header + len)?, header + len))
}

/// How a `BATCH` frame starts: a MsgPack map of three whose first key is `type`.
const BATCH_START: &[u8] = b"\x83\xa4type";

/// Inflates a message, or only its first `prefix` bytes.
fn inflate(inflater: &mut Decompress, payload: &[u8], prefix: Option<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.unwrap_or(payload.len() * 8 + 64));
    if prefix.is_some() {
        // The tail only ends the message: a prefix does not need it.
        let _ = inflater.decompress_vec(payload, &mut out, FlushDecompress::Sync);
        inflater.reset(false);
        return out;
    }
    for input in [payload, &[0, 0, 0xff, 0xff][..]] {
        let start = inflater.total_in();
        loop {
            let consumed = usize::try_from(inflater.total_in() - start).unwrap_or(0);
            if inflater.decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync).is_err()
            {
                break;
            }
            let done = usize::try_from(inflater.total_in() - start).unwrap_or(0) >= input.len();
            if done && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.len().max(64));
        }
    }
    inflater.reset(false);
    out
}

async fn fanout(settings: &Settings, on: bool) -> anyhow::Result<Row> {
    let server = deflate_server().await?;
    let connections = settings.fanout_connections;
    let (sockets, _) = connect_raw_many(server.port, connections, on).await?;
    crate::wait_for_connections(server.port, connections).await?;
    let mut control = connect_one(server.port, connections).await?;
    crate::wait_for_connections(server.port, connections + 1).await?;
    let expected = usize::try_from(settings.broadcasts)?;
    let quiet = Duration::from_secs(5) + Duration::from_millis(settings.interval_ms * 2);
    let receivers: Vec<_> =
        sockets.into_iter().map(|socket| tokio::spawn(receive(socket, expected, quiet))).collect();
    let request = serde_json::json!({
        "type": "BROADCAST",
        "count": settings.broadcasts,
        "size": settings.size,
        "interval_ms": settings.interval_ms,
        "cooperative": true,
        "topgun": true,
    });
    let cpu_before = (server.cpu()?, crate::own_cpu()?);
    futures_util::SinkExt::send(
        &mut control,
        tokio_tungstenite::tungstenite::Message::Binary(rmp_serde::to_vec_named(&request)?.into()),
    )
    .await?;
    let mut total = Seen::default();
    let mut finished = Vec::with_capacity(receivers.len());
    for receiver in receivers {
        let (seen, socket) = receiver.await?;
        finished.push(socket);
        total.received.add(seen.received);
        total.compressed_frames += seen.compressed_frames;
        total.wire_bytes += seen.wire_bytes;
    }
    let server_cpu = server.cpu()?.saturating_sub(cpu_before.0);
    let client_cpu = crate::own_cpu()?.saturating_sub(cpu_before.1);
    let (_, peak) = server.memory()?;
    drop(finished);
    server.stop().await?;
    total.received.latencies_us.sort_unstable();
    let wanted = connections * expected;
    #[allow(clippy::cast_precision_loss)]
    let delivered = total.received.messages as f64 / wanted as f64;
    let pace = match settings.interval_ms {
        0 => "burst".to_owned(),
        ms => format!("fanout paced {}/s", 1000 / ms),
    };
    Ok(Row::new(label(&format!("{pace} TopGun events"), on))
        .with("connections", connections)
        .with("broadcasts", settings.broadcasts)
        .with("message_bytes", settings.size)
        .with("delivered_ratio", (delivered * 10_000.0).round() / 10_000.0)
        .with("wire_bytes_per_message", total.wire_bytes / total.received.messages.max(1))
        .with("compressed_frames", total.compressed_frames)
        .with("p50_ms", percentile(&total.received.latencies_us, 0.50))
        .with("p99_ms", percentile(&total.received.latencies_us, 0.99))
        .with("server_cpu_ms", u64::try_from(server_cpu.as_millis()).unwrap_or(0))
        .with("client_cpu_ms", u64::try_from(client_cpu.as_millis()).unwrap_or(0))
        .with("server_peak_rss_mib", peak / (1 << 20)))
}
