//! On the open internet: the client address behind trusted proxies, and the limits that keep
//! one hostile address from locking anyone else out (per-address connection cap, per-address
//! rate limit, WebSocket origin check), each counted in `/metrics`. Every limit is off by
//! default; the other modules run with the defaults.

use topgun_test_support as common;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{TestServer, eventually, http, sample, test_config, upgrade_refusal, ws_from};
use topgun_server::network::{
    ConnectionConfig, ConnectionHandle, InboundHandler, NetworkConfig, RateLimitConfig, SyncError,
    SyncRequest,
};

fn rate(per_second: u32, burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        per_second: NonZeroU32::new(per_second).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// An HTTP client whose requests come from `source` (any of 127.0.0.0/8).
fn client_from(source: &str) -> reqwest::Client {
    common::install_crypto_provider();
    reqwest::Client::builder().local_address(ip(source)).build().unwrap()
}

/// Records the `peer` of every `/sync` request.
#[derive(Default, Clone)]
struct PeerRecorder(Arc<Mutex<Vec<Option<SocketAddr>>>>);

#[async_trait::async_trait]
impl InboundHandler for PeerRecorder {
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {}

    async fn on_http_sync_request(&self, request: SyncRequest) -> Result<Bytes, SyncError> {
        self.0.lock().unwrap().push(request.peer);
        Ok(Bytes::from_static(b"\x90"))
    }
}

/// The peer `/sync` reported for a request from `source` with `X-Forwarded-For: forwarded`.
async fn sync_peer(
    server: &TestServer,
    recorder: &PeerRecorder,
    source: &str,
    forwarded: &str,
) -> IpAddr {
    let client = client_from(source);
    let response = client
        .post(server.url("/sync"))
        .header("content-type", "application/msgpack")
        .header("x-forwarded-for", forwarded)
        .body(vec![0x90])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    recorder.0.lock().unwrap().pop().flatten().expect("a peer").ip()
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies_and_never_the_spoofed_leftmost() {
    let recorder = PeerRecorder::default();
    let config = NetworkConfig {
        trusted_proxies: vec!["127.0.0.1/32".parse().unwrap(), "10.0.0.0/8".parse().unwrap()],
        ..test_config()
    };
    let server = TestServer::with_handler(config, recorder.clone()).await;
    // From the trusted proxy: the rightmost address no trusted proxy vouches for.
    let forwarded = "6.6.6.6, 203.0.113.9, 10.1.1.1";
    assert_eq!(sync_peer(&server, &recorder, "127.0.0.1", forwarded).await, ip("203.0.113.9"));
    // From an untrusted peer: the header is ignored.
    assert_eq!(sync_peer(&server, &recorder, "127.0.0.2", forwarded).await, ip("127.0.0.2"));
    server.stop().await.unwrap();

    // Without trusted proxies (the default) nobody's header counts.
    let recorder = PeerRecorder::default();
    let server = TestServer::with_handler(test_config(), recorder.clone()).await;
    assert_eq!(sync_peer(&server, &recorder, "127.0.0.1", "203.0.113.9").await, ip("127.0.0.1"));
    server.stop().await.unwrap();
}

async fn refusals(server: &TestServer, reason: &str) -> String {
    let exposition = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    sample(&exposition, "topgun_websocket_upgrades_refused_total", &[("reason", reason)])
}

#[tokio::test]
async fn one_address_at_its_connection_cap_gets_429_and_others_are_unaffected() {
    let config = NetworkConfig { max_connections_per_ip: 2, ..test_config() };
    let server = TestServer::start(config).await;
    let (hostile, honest) = (ip("127.0.0.2"), ip("127.0.0.3"));
    let first = ws_from(server.addr, hostile, "/ws", &[]).await.unwrap();
    let _second = ws_from(server.addr, hostile, "/", &[]).await.unwrap();
    let (status, retry_after) = upgrade_refusal(ws_from(server.addr, hostile, "/ws", &[]).await);
    assert_eq!(status, 429);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(upgrade_refusal(ws_from(server.addr, hostile, "/", &[]).await).0, 429, "at / too");
    let _other = ws_from(server.addr, honest, "/ws", &[]).await.expect("another address connects");
    assert_eq!(refusals(&server, "per_ip_limit").await, "2");

    // A slot is free again once its connection has ended.
    drop(first);
    server.until_connections(2, "the closed connection gone").await;
    ws_from(server.addr, hostile, "/ws", &[]).await.expect("the freed slot");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_cap_counts_the_forwarded_address_behind_a_trusted_proxy() {
    let config = NetworkConfig {
        max_connections_per_ip: 1,
        trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let proxy = ip("127.0.0.1");
    let client_a = [("x-forwarded-for", "203.0.113.1")];
    let _a = ws_from(server.addr, proxy, "/ws", &client_a).await.unwrap();
    assert_eq!(upgrade_refusal(ws_from(server.addr, proxy, "/ws", &client_a).await).0, 429);
    let client_b = [("x-forwarded-for", "203.0.113.2")];
    let _b = ws_from(server.addr, proxy, "/ws", &client_b).await.expect("another client");
    let mut peers: Vec<String> =
        server.registry.iter().filter_map(|conn| conn.peer()).map(|p| p.to_string()).collect();
    peers.sort();
    assert_eq!(peers, ["203.0.113.1:0", "203.0.113.2:0"], "each connection knows its client");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_rate_limit_refuses_an_address_over_its_bucket_but_not_health_or_others() {
    let rate_limit = rate(1, 3);
    let server =
        TestServer::start(NetworkConfig { rate_limit: Some(rate_limit), ..test_config() }).await;
    let hostile = client_from("127.0.0.2");
    for n in 0..3 {
        let status = hostile.get(server.url("/")).send().await.unwrap().status();
        assert_eq!(status, 200, "request {n} is inside the burst");
    }
    let refused = hostile.post(server.url("/sync")).body(vec![0x90]).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(refused.headers().contains_key("x-request-id"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate limit exceeded");
    assert_eq!(
        upgrade_refusal(ws_from(server.addr, ip("127.0.0.2"), "/ws", &[]).await).0,
        429,
        "upgrade attempts draw from the same bucket"
    );
    for path in ["/health", "/health/live", "/health/ready"] {
        assert_eq!(hostile.get(server.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let honest = client_from("127.0.0.3");
    assert_eq!(honest.get(server.url("/")).send().await.unwrap().status(), 200);
    let metrics = honest.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&metrics, "topgun_rate_limited_requests_total", &[]), "2");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_upgrade_from_a_foreign_origin_is_refused_when_origins_are_listed() {
    let config =
        NetworkConfig { cors_origins: vec!["https://app.example".into()], ..test_config() };
    let server = TestServer::start(config).await;
    let local = ip("127.0.0.1");
    for path in ["/ws", "/"] {
        let evil = [("origin", "https://evil.example")];
        assert_eq!(
            upgrade_refusal(ws_from(server.addr, local, path, &evil).await).0,
            403,
            "{path}"
        );
        let app = [("origin", "https://app.example")];
        ws_from(server.addr, local, path, &app).await.expect("the listed origin");
        ws_from(server.addr, local, path, &[]).await.expect("no Origin: not a browser");
    }
    assert_eq!(refusals(&server, "origin").await, "2");
    server.stop().await.unwrap();

    // `*` (the default) lets every origin in, as before.
    let server = TestServer::start(test_config()).await;
    let evil = [("origin", "https://evil.example")];
    ws_from(server.addr, local, "/ws", &evil).await.expect("any origin");
    eventually("registered", || server.registry.count() == 1).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn with_the_proxy_protocol_the_header_names_the_client_and_a_bare_connection_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let recorder = PeerRecorder::default();
    let config = NetworkConfig { proxy_protocol: true, ..test_config() };
    let server = TestServer::with_handler(config, recorder.clone()).await;
    let client: SocketAddr = "203.0.113.9:51000".parse().unwrap();
    for header in [common::proxy_v1(client, server.addr), common::proxy_v2(client, server.addr)] {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(&header).await.unwrap();
        stream
            .write_all(
                b"POST /sync HTTP/1.1\r\nhost: x\r\ncontent-type: application/msgpack\r\n\
                  content-length: 1\r\nconnection: close\r\n\r\n\x90",
            )
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        assert!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response));
        let peer = recorder.0.lock().unwrap().pop().flatten();
        assert_eq!(peer, Some(client), "the header's source, port included");
    }
    common::ws_after(server.addr, &common::proxy_v2(client, server.addr), "/ws")
        .await
        .expect("a WebSocket through the balancer");

    let mut bare = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    bare.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    assert!(common::read_until_eof(&mut bare).await.is_empty(), "closed without an answer");
    let metrics = {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(&common::proxy_v1(client, server.addr)).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8(common::read_until_eof(&mut stream).await).unwrap()
    };
    assert!(metrics.contains("topgun_proxy_protocol_refused_total 1"), "{metrics}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_over_its_message_budget_is_slowed_not_dropped_and_others_go_on() {
    let server =
        echo_server(ConnectionConfig { inbound_rate: Some(rate(50, 5)), ..Default::default() })
            .await;
    let mut flooder = server.ws().await;
    let started = std::time::Instant::now();
    for n in 0..30_u8 {
        common::send_binary(&mut flooder, vec![n]).await;
    }
    // Another client is served while the flooder waits on its budget.
    let mut other = server.ws().await;
    until_throttled(&server).await;
    common::send_binary(&mut other, vec![0xaa]).await;
    assert_eq!(common::next_messages(&mut other, 1).await.0, [Bytes::from_static(&[0xaa])]);

    let (echoed, _) = common::next_messages(&mut flooder, 30).await;
    let expected: Vec<Bytes> = (0..30_u8).map(|n| Bytes::from(vec![n])).collect();
    assert_eq!(echoed, expected, "every message, in order");
    // 5 at once, then 25 at 50/s: at least half a second.
    assert!(started.elapsed() >= std::time::Duration::from_millis(450), "{:?}", started.elapsed());
    server.stop().await.unwrap();
}

/// An echo server with `connection` settings.
async fn echo_server(connection: ConnectionConfig) -> TestServer {
    TestServer::with_handler(NetworkConfig { connection, ..test_config() }, common::EchoHandler)
        .await
}

/// Waits until `server`'s metrics show a connection throttled; panics at the deadline.
async fn until_throttled(server: &TestServer) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let exposition =
            http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if sample(&exposition, "topgun_inbound_throttled_total", &[]) != "0" {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no connection was throttled");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn time_spent_throttled_is_not_idleness() {
    let server = echo_server(ConnectionConfig {
        inbound_rate: Some(rate(2, 1)),
        idle_timeout: std::time::Duration::from_millis(300),
        ping_interval: std::time::Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let mut client = server.ws().await;
    for n in 0..4_u8 {
        common::send_binary(&mut client, vec![n]).await;
    }
    // Paused for about 1.5 s, five idle timeouts; every message still comes back.
    let (echoed, _) = common::next_messages(&mut client, 4).await;
    assert_eq!(echoed.len(), 4);
    assert_eq!(server.registry.count(), 1, "not closed as idle");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_that_sends_no_proxy_header_is_closed_after_the_header_read_timeout() {
    let config = NetworkConfig {
        proxy_protocol: true,
        header_read_timeout: std::time::Duration::from_millis(200),
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Nothing sent: the server gives up on the header and closes.
    assert!(common::read_until_eof(&mut silent).await.is_empty());
    server.stop().await.unwrap();
}
