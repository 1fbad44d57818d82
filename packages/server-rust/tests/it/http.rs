//! `POST /sync` and the HTTP middleware stack (request ids, CORS, compression, timeouts).

use topgun_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{EchoHandler, TestServer, http, post_sync, test_config};
use topgun_server::network::{
    ConnectionHandle, InboundHandler, MIN_COMPRESSED_SIZE, NetworkConfig, SyncError, SyncRequest,
};

#[tokio::test]
async fn ac10_ot7_post_sync_answers_msgpack_with_its_content_type() {
    let server = TestServer::start(test_config()).await;
    let body =
        rmp_serde::to_vec_named(&serde_json::json!({ "type": "SYNC_INIT", "mapName": "todos" }))
            .unwrap();
    let response = http()
        .post(server.url("/sync"))
        .header("content-type", "application/x-msgpack")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/msgpack");
    let decoded: Vec<serde_json::Value> =
        rmp_serde::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert!(decoded.is_empty(), "the stub answers an empty batch");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_custom_handler_answers_sync_requests() {
    let server = TestServer::with_handler(test_config(), EchoHandler).await;
    let response = http()
        .post(server.url("/sync"))
        .header("content-type", "application/octet-stream")
        .body(vec![0x93, 1, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), [0x93, 1, 2, 3]);
    server.stop().await.unwrap();
}

/// Answers `/sync` according to the first body byte: refuse, fail, panic or wait.
struct Picky;

#[async_trait::async_trait]
impl InboundHandler for Picky {
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {}

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        let command: String = rmp_serde::from_slice(&body).unwrap_or_default();
        match command.as_str() {
            "u" => Err(SyncError::Unauthorized("token expired".into())),
            "p" => panic!("handler bug"),
            "s" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(body)
            }
            _ => Ok(body),
        }
    }
}

#[tokio::test]
async fn sync_errors_become_their_status_with_a_json_message() {
    let server = TestServer::with_handler(test_config(), Picky).await;
    let response = post_sync(&http(), server.url("/sync"), &"u").send().await.unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized: token expired");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_panicking_sync_handler_costs_one_request_not_the_server() {
    let server = TestServer::with_handler(test_config(), Picky).await;
    let response = post_sync(&http(), server.url("/sync"), &"p").send().await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(server.controller.in_flight_count(), 0, "the in-flight guard is released");
    let next = post_sync(&http(), server.url("/sync"), &"ok").send().await.unwrap();
    assert_eq!(next.status(), 200);
    server.stop().await.unwrap();
}

fn request_id(response: &reqwest::Response) -> &str {
    response
        .headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{} {} has no x-request-id", response.status(), response.url()))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn ac13_every_response_carries_an_x_request_id() {
    let config = NetworkConfig { request_timeout: Duration::from_millis(200), ..test_config() };
    let server = TestServer::with_handler(config, Picky).await;
    let client = http();

    let ok = client.get(server.url("/health")).send().await.unwrap();
    let not_found = client.get(server.url("/no/such/route")).send().await.unwrap();
    let wrong_method = client.get(server.url("/sync")).send().await.unwrap();
    let preflight = client
        .request(reqwest::Method::OPTIONS, server.url("/sync"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    let timed_out = post_sync(&client, server.url("/sync"), &"s").send().await.unwrap();

    let statuses =
        [&ok, &not_found, &wrong_method, &preflight, &timed_out].map(|r| r.status().as_u16());
    assert_eq!(statuses, [200, 404, 405, 200, 408]);
    let ids = [&ok, &not_found, &wrong_method, &preflight, &timed_out].map(request_id);
    for id in ids {
        uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("{id} is a UUID"));
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "every request gets its own id");
    let body: serde_json::Value = not_found.json().await.unwrap();
    assert_eq!(body["error"], "not found");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_supplied_request_id_is_kept() {
    let server = TestServer::start(test_config()).await;
    let response =
        http().get(server.url("/health")).header("x-request-id", "trace-42").send().await.unwrap();
    assert_eq!(request_id(&response), "trace-42");
    server.stop().await.unwrap();
}

/// `GET /health` as a browser page on `origin` sends it.
async fn health_from_origin(server: &TestServer, origin: &str) -> reqwest::Response {
    http().get(server.url("/health")).header("origin", origin).send().await.unwrap()
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let config = NetworkConfig { cors_origins: vec!["http://app.example".into()], ..test_config() };
    let server = TestServer::start(config).await;
    let preflight = |origin: &'static str| {
        http()
            .request(reqwest::Method::OPTIONS, server.url("/sync"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let allowed = preflight("http://app.example").await.unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], "http://app.example");
    let methods = allowed.headers()["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let refused = preflight("http://evil.example").await.unwrap();
    assert!(refused.headers().get("access-control-allow-origin").is_none());

    let simple = health_from_origin(&server, "http://app.example").await;
    assert_eq!(simple.headers()["access-control-expose-headers"], "x-request-id");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn requests_without_an_origin_skip_cors_but_keep_its_vary_header() {
    let server = TestServer::start(test_config()).await;
    let plain = http().get(server.url("/health")).send().await.unwrap();
    let browser = health_from_origin(&server, "http://app.example").await;
    assert_eq!((plain.status().as_u16(), browser.status().as_u16()), (200, 200));
    assert!(plain.headers().get("access-control-allow-origin").is_none());
    assert_eq!(browser.headers()["access-control-allow-origin"], "*");
    let vary = |response: &reqwest::Response| -> Vec<String> {
        response.headers().get_all("vary").iter().map(|v| v.to_str().unwrap().to_owned()).collect()
    };
    assert_eq!(vary(&plain), vary(&browser), "a cache keys both on the same headers");
    assert!(vary(&plain).join(",").contains("origin"), "{:?}", vary(&plain));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn responses_are_gzip_compressed_for_clients_that_accept_it() {
    let server = TestServer::start(test_config()).await;
    common::install_crypto_provider();
    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let get = |path: &str, gzip: bool| {
        let request = raw.get(server.url(path));
        if gzip { request.header("accept-encoding", "gzip") } else { request }.send()
    };
    let encoding = |response: &reqwest::Response| {
        response.headers().get("content-encoding").map(|v| v.to_str().unwrap().to_owned())
    };

    let metrics = get("/metrics", true).await.unwrap();
    assert_eq!(encoding(&metrics).as_deref(), Some("gzip"));
    let uncompressed = get("/metrics", false).await.unwrap();
    assert_eq!(encoding(&uncompressed), None);
    let size = uncompressed.bytes().await.unwrap().len();
    assert!(size >= usize::from(MIN_COMPRESSED_SIZE), "/metrics is {size} bytes");
    // Small answers are not worth compressing.
    let health = get("/health", true).await.unwrap();
    assert_eq!(encoding(&health), None);

    let decoded = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(decoded.contains("topgun_connections_opened_total"), "{decoded}");
    server.stop().await.unwrap();
}

/// Keeps the last request `on_http_sync_request` was given.
#[derive(Default)]
struct ContextRecorder {
    seen: std::sync::Mutex<Option<SyncRequest>>,
}

#[async_trait::async_trait]
impl InboundHandler for ContextRecorder {
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {}

    async fn on_http_sync_request(&self, request: SyncRequest) -> Result<Bytes, SyncError> {
        *self.seen.lock().unwrap() = Some(request);
        Ok(Bytes::from_static(&[0x90]))
    }
}

#[tokio::test]
async fn the_sync_handler_sees_the_requests_headers_peer_and_id() {
    let recorder = Arc::new(ContextRecorder::default());
    let server = TestServer::with_handler(test_config(), Arc::clone(&recorder)).await;
    // TopGun's HTTP client: x-msgpack, a bearer token, the body shape with float64 millis.
    let body = b"\xde\x00\x01\xa8clientId\xa1c";
    let response = http()
        .post(server.url("/sync"))
        .header("content-type", "application/x-msgpack")
        .header("authorization", "Bearer token-123")
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let seen = recorder.seen.lock().unwrap().take().unwrap();
    assert_eq!(seen.bearer_token(), Some("token-123"));
    assert_eq!(seen.headers["content-type"], "application/x-msgpack");
    assert_eq!(seen.request_id, Some(request_id));
    assert_eq!(seen.peer.map(|p| p.ip().to_string()).as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.body, Bytes::from_static(body));
    server.stop().await.unwrap();
}
