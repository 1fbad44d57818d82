//! Graceful shutdown: health transitions, connection draining and deadlines.

use topgun_test_support as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestServer, connect_ws, eventually, expect_close, http, next_messages, test_config};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use topgun_server::network::{
    ConnectionHandle, HealthReport, HealthState, InboundHandler, NetworkConfig, NetworkModule,
    OutboundMessage, ShutdownConfig, SyncError,
};

fn config_with(shutdown: ShutdownConfig) -> NetworkConfig {
    NetworkConfig { shutdown, ..test_config() }
}

#[tokio::test]
async fn ac12_ot6_trigger_shutdown_closes_every_websocket_with_1001_and_stops() {
    let server = TestServer::start(test_config()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.ws().await);
    }
    let controller = Arc::clone(&server.controller);
    let registry = Arc::clone(&server.registry);

    controller.trigger_shutdown();
    for client in &mut clients {
        let close = expect_close(client).await;
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "server shutting down");
    }
    server.join().await.unwrap();
    assert_eq!(controller.health_state(), HealthState::Stopped);
    assert_eq!(registry.count(), 0);
}

#[tokio::test]
async fn graceful_shutdown_over_plain_tcp() {
    let config =
        config_with(ShutdownConfig { grace_period: Duration::from_secs(2), ..Default::default() });
    common::graceful_shutdown_scenario(TestServer::start(config).await).await;
}

#[tokio::test]
async fn ot6_health_reads_draining_during_the_grace_period_then_stopped() {
    let server = TestServer::start(config_with(ShutdownConfig {
        grace_period: Duration::from_secs(2),
        ..Default::default()
    }))
    .await;
    let controller = Arc::clone(&server.controller);
    let ready = http().get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    controller.trigger_shutdown();
    // The listener still answers during the grace period, reporting the drain.
    let ready = http().get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let report: HealthReport =
        http().get(server.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(report.state, "draining");
    let url = server.url("/health/live");

    server.join().await.unwrap();
    assert_eq!(controller.health_state(), HealthState::Stopped);
    assert!(http().get(url).send().await.is_err(), "the listener is closed once stopped");
}

#[tokio::test]
async fn completing_the_serve_future_starts_the_same_shutdown() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.ws().await;
    let controller = Arc::clone(&server.controller);
    let stopping = tokio::spawn(server.stop());
    let close = expect_close(&mut client).await;
    assert_eq!(close.code, CloseCode::Away);
    stopping.await.unwrap().unwrap();
    assert_eq!(controller.health_state(), HealthState::Stopped);
}

#[tokio::test]
async fn a_thousand_clients_receive_their_fifty_queued_messages_then_1001() {
    let server = TestServer::start(test_config()).await;
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(common::connect_ws(&server.ws_url()).await);
    }
    let registry = Arc::clone(&server.registry);
    server.until_connections(1000, "all registered").await;
    let expected: Vec<Bytes> = (0..50_u8).map(|i| Bytes::from(vec![0xcc, i])).collect();
    // Single-threaded runtime: all messages are queued before any writer runs.
    for conn in server.registry.iter() {
        for message in &expected {
            assert!(conn.try_send(OutboundMessage::Binary(message.clone())));
        }
    }
    server.controller.trigger_shutdown();
    for client in &mut clients {
        let (received, _) = next_messages(client, expected.len()).await;
        assert_eq!(received, expected);
        assert_eq!(expect_close(client).await.code, CloseCode::Away);
    }
    server.join().await.unwrap();
    assert_eq!(registry.count(), 0);
}

/// `/sync` waits for a permit, so a request can be held open across the shutdown.
struct SlowSync(Arc<Semaphore>);

#[async_trait::async_trait]
impl InboundHandler for SlowSync {
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {}

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        self.0.acquire().await.unwrap().forget();
        Ok(body)
    }
}

#[tokio::test]
async fn an_in_flight_sync_request_completes_during_shutdown() {
    let gate = Arc::new(Semaphore::new(0));
    let server = TestServer::with_handler(test_config(), SlowSync(Arc::clone(&gate))).await;
    let controller = Arc::clone(&server.controller);
    let request = tokio::spawn(common::post_sync(&http(), server.url("/sync"), &"pending").send());
    eventually("request in flight", || controller.in_flight_count() == 1).await;

    controller.trigger_shutdown();
    let serving = tokio::spawn(server.join());
    eventually("draining", || controller.health_state() == HealthState::Draining).await;
    assert!(!serving.is_finished(), "serve() waits for the request");
    gate.add_permits(1);

    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), common::msgpack(&"pending"));
    serving.await.unwrap().unwrap();
    assert_eq!(controller.health_state(), HealthState::Stopped);
}

#[tokio::test]
async fn clients_that_never_acknowledge_the_close_do_not_outlast_the_drain_timeout() {
    let mut module = NetworkModule::new(config_with(ShutdownConfig {
        drain_timeout: Duration::from_millis(300),
        ..Default::default()
    }));
    module.start().await.unwrap();
    let server = TestServer::from_module(module).await;
    // Never polled again: this client cannot acknowledge the server's close frame.
    let silent = connect_ws(&server.ws_url()).await;
    let registry = Arc::clone(&server.registry);
    server.until_connections(1, "connection registered").await;

    let started = Instant::now();
    server.controller.trigger_shutdown();
    let controller = Arc::clone(&server.controller);
    server.join().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "serve() took {took:?}, beyond drain timeout + force-close wait"
    );
    assert_eq!(controller.health_state(), HealthState::Stopped);
    assert_eq!(registry.count(), 0);
    drop(silent);
}
