//! `--floor`: the least work a fan-out can do on this machine, as a baseline for the
//! transport's figures. It completes WebSocket handshakes by hand, then sends every broadcast
//! as one pre-built frame with one blocking `write` per connection from two threads (one per
//! core): no runtime, no queues, no coalescing, no per-connection state. Whatever latency it
//! shows is the kernel's and the client's, which no server on this machine can avoid.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// What the floor server sends once the control connection speaks.
pub struct Plan {
    /// Receiving connections to accept before the control connection.
    pub receivers: usize,
    pub broadcasts: u32,
    pub size: usize,
    pub interval: Duration,
}

/// Accepts `plan.receivers` WebSocket clients and one control client, waits for any data on
/// the control connection, sends the broadcasts and returns.
pub fn run(listener: &TcpListener, plan: &Plan) -> anyhow::Result<()> {
    let mut receivers = Vec::with_capacity(plan.receivers);
    while receivers.len() < plan.receivers {
        receivers.push(accept_websocket(listener)?);
    }
    let mut control = accept_websocket(listener)?;
    control.read(&mut [0_u8; 256]).context("control connection")?;

    let halves: Vec<&[TcpStream]> = receivers.chunks(receivers.len().div_ceil(2).max(1)).collect();
    for seq in 0..plan.broadcasts {
        let frame = frame(seq, plan.size);
        std::thread::scope(|scope| {
            for half in &halves {
                let frame = &frame;
                scope.spawn(move || {
                    for mut stream in *half {
                        // A receiver that went away only loses its own messages.
                        let _ = stream.write_all(frame);
                    }
                });
            }
        });
        std::thread::sleep(plan.interval);
    }
    Ok(())
}

/// An unmasked binary frame whose payload starts with the send time (nanoseconds since the
/// epoch, u64 LE) and the sequence number (u32 LE), as the transport's bench handler sends.
fn frame(seq: u32, size: usize) -> Vec<u8> {
    let size = size.max(12);
    let mut frame = Vec::with_capacity(size + 10);
    frame.push(0x82);
    match u16::try_from(size) {
        Ok(small) if small < 126 => frame.push(u8::try_from(small).unwrap_or(0)),
        Ok(medium) => {
            frame.push(126);
            frame.extend_from_slice(&medium.to_be_bytes());
        }
        Err(_) => {
            frame.push(127);
            frame.extend_from_slice(&(size as u64).to_be_bytes());
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    frame.extend_from_slice(&u64::try_from(now.as_nanos()).unwrap_or(u64::MAX).to_le_bytes());
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.resize(frame.len() + size - 12, 0);
    frame
}

/// Accepts one connection and answers its WebSocket upgrade request.
fn accept_websocket(listener: &TcpListener) -> anyhow::Result<TcpStream> {
    let (mut stream, _) = listener.accept()?;
    stream.set_nodelay(true)?;
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0_u8; 512];
    while !request.ends_with(b"\r\n\r\n") {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            bail!("client left during the handshake");
        }
        request.extend_from_slice(&chunk[..read]);
    }
    let request = String::from_utf8_lossy(&request);
    let key = request
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key").then(|| value.trim().to_owned())
        })
        .context("no Sec-WebSocket-Key")?;
    write!(
        stream,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )?;
    Ok(stream)
}
