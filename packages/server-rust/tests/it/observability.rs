//! Prometheus metrics and traceable logs, as an operator sees them.

use topgun_test_support as common;

use std::sync::Arc;

use bytes::Bytes;
use common::{
    EchoHandler, TestServer, eventually, expect_close, http, next_messages, sample, send_binary,
    test_config,
};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use topgun_server::network::{
    ConnectionConfig, ConnectionHandle, ConnectionKind, ConnectionRegistry, MetricsConfig,
    NetworkConfig, NetworkModule, OutboundMessage, OutboundReceiver, close,
};

async fn scrape(url: String) -> String {
    let response = http().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text().await.unwrap()
}

/// Connections opened and closed for known reasons, 2 messages of 10 bytes echoed, one upgrade
/// over the limit, one forced drop (on a cluster-peer queue, returned with its receiver so it
/// stays open: a dropped receiver counts what it still holds as undelivered) and
/// HTTP requests answered 200, 200, 404 and 415.
async fn run_scripted_sequence(
    server: &TestServer,
    registry: &ConnectionRegistry,
) -> (Arc<ConnectionHandle>, OutboundReceiver) {
    let mut a = server.ws().await;
    let mut b = server.ws().await;
    let mut c = server.ws().await;
    let c_handle = registry.iter().max_by_key(|conn| conn.id).unwrap();

    // Two 10-byte messages in, echoed back out.
    send_binary(&mut a, vec![1_u8; 10]).await;
    send_binary(&mut a, vec![2_u8; 10]).await;
    next_messages(&mut a, 2).await;
    // A fourth connection is over the limit.
    assert!(tokio_tungstenite::connect_async(server.ws_url()).await.is_err());
    // Closed for known reasons: client close, a limit (text frame), the application (with the
    // slow-consumer code, which must still count as the application's close).
    a.close(None).await.unwrap();
    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut a).await {}
    b.send(Message::text("not binary")).await.unwrap();
    expect_close(&mut b).await;
    c_handle.close_with(close::TRY_AGAIN_LATER, "come back later");
    assert_eq!(u16::from(expect_close(&mut c).await.code), close::TRY_AGAIN_LATER);
    eventually("all closed", || registry.count_by_kind(ConnectionKind::Client) == 0).await;
    // A forced drop: a peer connection whose one-slot queue is full.
    let (peer, queue) = registry.register(
        ConnectionKind::ClusterPeer,
        &ConnectionConfig { outbound_channel_capacity: 1, ..Default::default() },
    );
    assert!(peer.try_send(OutboundMessage::Binary(Bytes::from_static(b"x"))));
    assert!(!peer.try_send(OutboundMessage::Binary(Bytes::from_static(b"y"))));
    // Requests with known statuses.
    let client = http();
    for _ in 0..2 {
        client.get(server.url("/health")).send().await.unwrap();
    }
    client.get(server.url("/nope")).send().await.unwrap();
    client
        .post(server.url("/sync"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();

    (peer, queue)
}

#[tokio::test]
async fn scraped_metrics_match_a_scripted_sequence() {
    let config = NetworkConfig {
        max_connections: 3,
        connection: ConnectionConfig {
            max_message_size: 1024,
            max_frame_size: 1024,
            ..Default::default()
        },
        ..test_config()
    };
    let module = NetworkModule::new(config).with_handler(EchoHandler);
    let registry = module.registry();
    let server = TestServer::from_module(module).await;
    let (peer, peer_queue) = run_scripted_sequence(&server, &registry).await;

    let text = scrape(server.url("/metrics")).await;
    let value = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(value("topgun_connections_opened_total", &[("kind", "client")]), "3");
    let closed = |reason| {
        value("topgun_connections_closed_total", &[("kind", "client"), ("reason", reason)])
    };
    assert_eq!([closed("client_close"), closed("limit"), closed("application")], ["1", "1", "1"]);
    assert_eq!(
        [closed("idle_timeout"), closed("slow_consumer"), closed("shutdown"), closed("error")],
        ["0"; 4]
    );
    assert_eq!(value("topgun_connections_open", &[("kind", "client")]), "0");
    assert_eq!(value("topgun_connections_open", &[("kind", "cluster_peer")]), "1");
    assert_eq!(
        value("topgun_websocket_upgrades_refused_total", &[("reason", "connection_limit")]),
        "1"
    );
    assert_eq!(value("topgun_websocket_messages_received_total", &[]), "2");
    assert_eq!(value("topgun_websocket_received_bytes_total", &[]), "20");
    assert_eq!(value("topgun_websocket_messages_sent_total", &[]), "2");
    let frames = value("topgun_websocket_frames_sent_total", &[]);
    assert!(frames == "1" || frames == "2", "two echoes in one or two frames: {frames}");
    assert_eq!(value("topgun_websocket_batch_messages_count", &[]), frames);
    assert_eq!(value("topgun_websocket_batch_messages_sum", &[]), "2");
    assert_eq!(value("topgun_outbound_dropped_messages_total", &[]), "1");
    let requests = |route, status| {
        value("topgun_http_requests_total", &[("route", route), ("status", status)])
    };
    assert_eq!(requests("/health", "200"), "2");
    assert_eq!(requests("unmatched", "404"), "1");
    assert_eq!(requests("/sync", "415"), "1");
    assert_eq!(requests("/ws", "101"), "3");
    assert_eq!(requests("/ws", "503"), "1");
    assert_eq!(value("topgun_http_request_duration_seconds_count", &[("route", "/health")]), "2");
    assert_eq!(value("topgun_health_state", &[("state", "ready")]), "1");
    assert_eq!(value("topgun_health_state", &[("state", "draining")]), "0");
    assert_eq!(value("topgun_in_flight_operations", &[]), "0");
    assert!(value("topgun_uptime_seconds", &[]).parse::<f64>().unwrap() >= 0.0);
    drop((peer, peer_queue));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_can_move_to_a_separate_listener_or_be_turned_off() {
    let config = NetworkConfig {
        metrics: MetricsConfig { enabled: true, listen: Some("127.0.0.1:0".parse().unwrap()) },
        ..test_config()
    };
    let mut module = NetworkModule::new(config);
    module.start().await.unwrap();
    let metrics_addr = module.metrics_local_addr().expect("metrics listener bound");
    let server = TestServer::from_module(module).await;
    let main = http().get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(main.status(), 404, "not on the public listener");
    let text = scrape(format!("http://{metrics_addr}/metrics")).await;
    assert_eq!(sample(&text, "topgun_health_state", &[("state", "ready")]), "1");
    // The metrics listener follows the main port's conventions.
    let scraped = http().get(format!("http://{metrics_addr}/metrics")).send().await.unwrap();
    assert!(scraped.headers().contains_key("x-request-id"));
    let unknown = http().get(format!("http://{metrics_addr}/nope")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(unknown.headers().contains_key("x-request-id"));
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "error": "not found" }));
    server.stop().await.unwrap();

    let off =
        NetworkConfig { metrics: MetricsConfig { enabled: false, listen: None }, ..test_config() };
    let server = TestServer::start(off).await;
    assert_eq!(http().get(server.url("/metrics")).send().await.unwrap().status(), 404);
    server.stop().await.unwrap();
}
