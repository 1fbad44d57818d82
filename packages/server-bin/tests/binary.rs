//! The `topgun-server` binary as an operator runs it: flags, signals and failures.

use topgun_test_support as common;

use std::process::Stdio;
use std::time::Duration;

use common::certs::{TestCa, TlsFiles};
use common::{DEADLINE, connect_ws, expect_close, http};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_topgun-server");

/// Starts the binary on an OS-chosen loopback port with JSON logs; returns it and its address.
async fn spawn_server(extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(BINARY)
        .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let event: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if event["message"] == "topgun-server listening" {
                return event["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("listening line in time");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("child running").to_string();
    let status =
        std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap();
    assert!(status.success());
}

async fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    tokio::time::timeout(DEADLINE, child.wait()).await.expect("exits in time").unwrap()
}

#[tokio::test]
async fn sigterm_drains_websockets_with_1001_and_exits_zero() {
    let (child, addr) = spawn_server(&[]).await;
    let health = http().get(format!("http://{addr}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let mut ws = connect_ws(&format!("ws://{addr}/ws")).await;

    signal(&child, "TERM");
    let close = expect_close(&mut ws).await;
    assert_eq!(u16::from(close.code), 1001);
    assert!(wait_exit(child).await.success());
}

#[tokio::test]
async fn the_root_url_answers_topgun_clients_ping_with_a_top_level_pong() {
    let (child, addr) = spawn_server(&[]).await;
    // TopGun's client: serverUrl `ws://host:port`, PING exactly as its serializer writes it.
    let mut ws = connect_ws(&format!("ws://{addr}")).await;
    let client_ping =
        b"\xde\x00\x02\xa4type\xa4PING\xa9timestamp\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00";
    common::send_binary(&mut ws, &client_ping[..]).await;
    let pong: serde_json::Value =
        rmp_serde::from_slice(&common::next_frame(&mut ws).await).unwrap();
    assert_eq!(pong["type"], "PONG");
    assert_eq!(pong["timestamp"], 1_796_023_824_376_u64);
    assert!(pong["serverTime"].as_u64().is_some());
    signal(&child, "TERM");
    assert_eq!(u16::from(expect_close(&mut ws).await.code), 1001);
    assert!(wait_exit(child).await.success());
}

#[tokio::test]
async fn sighup_without_tls_is_logged_and_the_server_carries_on() {
    let (child, addr) = spawn_server(&[]).await;
    let mut ws = connect_ws(&format!("ws://{addr}/ws")).await;
    signal(&child, "HUP");
    // Still serving after the signal has been handled: a request made after it succeeds, and
    // the open WebSocket is closed only by the SIGTERM that follows, gracefully.
    let health = http().get(format!("http://{addr}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    signal(&child, "TERM");
    assert_eq!(u16::from(expect_close(&mut ws).await.code), 1001);
    assert!(wait_exit(child).await.success(), "exit 0, not killed by SIGHUP");
}

#[tokio::test]
async fn sigint_stops_the_server_too() {
    let (child, _addr) = spawn_server(&[]).await;
    signal(&child, "INT");
    assert!(wait_exit(child).await.success());
}

#[tokio::test]
async fn sighup_reloads_the_tls_certificate() {
    let ca = TestCa::new("test CA");
    let files = TlsFiles::write(&ca.server_cert(1), None);
    let cert = files.config.cert_path.to_str().unwrap().to_owned();
    let key = files.config.key_path.to_str().unwrap().to_owned();
    let (child, addr) = spawn_server(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let serial = || async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(ca.client_config(None));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        u64::try_from(parsed.serial.clone()).unwrap()
    };
    assert_eq!(serial().await, 1);

    files.replace(&ca.server_cert(2));
    signal(&child, "HUP");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while serial().await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "certificate not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "TERM");
    assert!(wait_exit(child).await.success());
}

async fn run_to_failure(args: &[&str]) -> (i32, String) {
    let output = tokio::time::timeout(
        DEADLINE,
        Command::new(BINARY).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).output(),
    )
    .await
    .expect("exits in time")
    .unwrap();
    (output.status.code().unwrap(), String::from_utf8(output.stderr).unwrap())
}

#[tokio::test]
async fn a_missing_certificate_fails_fast_with_a_readable_message() {
    let (code, stderr) = run_to_failure(&[
        "--port",
        "0",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read TLS certificate file /nonexistent/cert.pem"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn invalid_flags_are_usage_errors() {
    let (code, stderr) = run_to_failure(&["--port", "eighty"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid value 'eighty'"), "{stderr}");
    let (code, stderr) = run_to_failure(&["--tls-cert", "only-a-cert.pem"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--tls-key"), "{stderr}");
    let (code, stderr) = run_to_failure(&["--request-timeout", "soon"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("soon"), "{stderr}");
}

#[tokio::test]
async fn proxy_protocol_headers_name_the_client_for_the_per_address_cap() {
    use tokio::io::AsyncWriteExt;
    let (child, addr) = spawn_server(&["--proxy-protocol", "--max-connections-per-ip", "1"]).await;
    let server: std::net::SocketAddr = addr.parse().unwrap();
    let client_a: std::net::SocketAddr = "203.0.113.1:40000".parse().unwrap();
    let client_b: std::net::SocketAddr = "203.0.113.2:40000".parse().unwrap();

    // v2 (HAProxy's send-proxy-v2): the cap counts the client the header names.
    let _a = common::ws_after(server, &common::proxy_v2(client_a, server), "/ws").await.unwrap();
    let refused = common::ws_after(server, &common::proxy_v2(client_a, server), "/").await;
    assert_eq!(common::upgrade_refusal(refused).0, 429);
    // v1, another client behind the same balancer.
    common::ws_after(server, &common::proxy_v1(client_b, server), "/ws").await.expect("client b");

    // No header: closed before any HTTP answer.
    let mut bare = tokio::net::TcpStream::connect(server).await.unwrap();
    bare.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    assert!(common::read_until_eof(&mut bare).await.is_empty(), "no answer without a header");

    signal(&child, "TERM");
    assert!(wait_exit(child).await.success());
}

#[tokio::test]
async fn permessage_deflate_is_offered_only_with_its_flag_and_a_ping_is_answered_through_it() {
    let offer = Some("permessage-deflate; client_max_window_bits");
    let (child, addr) = spawn_server(&[]).await;
    let plain = common::RawClient::connect(addr.parse().unwrap(), offer).await;
    assert_eq!(plain.extensions(), None);
    signal(&child, "TERM");
    assert!(wait_exit(child).await.success());

    let (child, addr) = spawn_server(&["--permessage-deflate", "--deflate-threshold", "1"]).await;
    let mut client = common::RawClient::connect(addr.parse().unwrap(), offer).await;
    assert_eq!(
        client.extensions(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    // TopGun's PING; the PONG comes back on the compressing engine (compressed only if deflate
    // makes it smaller, which a 40-byte PONG it does not).
    let client_ping =
        b"\xde\x00\x02\xa4type\xa4PING\xa9timestamp\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00";
    client.send_frame(0x82, client_ping, true).await;
    let pong = loop {
        let frame = client.read_frame().await.expect("a PONG");
        if frame.opcode == 0x2 {
            break frame;
        }
    };
    let pong = if pong.rsv1 {
        let mut input = pong.payload.clone();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1024);
        let mut decompressor = flate2::Decompress::new(false);
        decompressor.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync).unwrap();
        out
    } else {
        pong.payload
    };
    let pong: serde_json::Value = rmp_serde::from_slice(&pong).unwrap();
    assert_eq!(pong["type"], "PONG");
    signal(&child, "TERM");
    assert_eq!(client.read_close().await.close_code(), Some(1001));
    assert!(wait_exit(child).await.success());
}
