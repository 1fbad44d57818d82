//! On the open internet: the client address behind trusted proxies, and the limits that keep
//! one hostile address from locking anyone else out (per-address connection cap, per-address
//! rate limit, WebSocket origin check), each counted in `/metrics`. Every limit is off by
//! default; the other modules run with the defaults.

use topgun_test_support as common;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{TestServer, eventually, http, sample, test_config, ws_from};
use tokio_tungstenite::tungstenite::Error as WsError;
use topgun_server::network::{
    ConnectionHandle, InboundHandler, NetworkConfig, RateLimitConfig, SyncError, SyncRequest,
};

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

fn refused_status(result: Result<common::WsClient, WsError>) -> (u16, Option<String>) {
    match result {
        Err(WsError::Http(response)) => (
            response.status().as_u16(),
            response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_owned()),
        ),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
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
    let (status, retry_after) = refused_status(ws_from(server.addr, hostile, "/ws", &[]).await);
    assert_eq!(status, 429);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(refused_status(ws_from(server.addr, hostile, "/", &[]).await).0, 429, "at / too");
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
    assert_eq!(refused_status(ws_from(server.addr, proxy, "/ws", &client_a).await).0, 429);
    let client_b = [("x-forwarded-for", "203.0.113.2")];
    ws_from(server.addr, proxy, "/ws", &client_b).await.expect("another client behind the proxy");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_rate_limit_refuses_an_address_over_its_bucket_but_not_health_or_others() {
    let rate_limit = RateLimitConfig {
        per_second: NonZeroU32::new(1).unwrap(),
        burst: NonZeroU32::new(3).unwrap(),
    };
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
        refused_status(ws_from(server.addr, ip("127.0.0.2"), "/ws", &[]).await).0,
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
        assert_eq!(refused_status(ws_from(server.addr, local, path, &evil).await).0, 403, "{path}");
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
