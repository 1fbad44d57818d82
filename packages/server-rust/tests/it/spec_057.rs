//! The specification the crates above this one are written against
//! (`SPEC-057-networking.md`): one test per acceptance criterion, each written the way the
//! specification states it, and [`spec_api`], code that names every public item of the
//! specification with its spelling. A change that breaks a caller following the specification
//! fails to compile here; the README's table "Where this crate differs from SPEC-057" lists the
//! few places where such a caller writes something else.

use topgun_test_support as common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ws::WebSocket;
use axum::routing::{get, post};
use common::{TestServer, expect_close, http, test_config};
use http::{Request, StatusCode};
use tokio::sync::{RwLock, mpsc, watch};
use topgun_core::{Principal, Timestamp};
use topgun_server::network::{
    AppState, ConnectionConfig, ConnectionHandle, ConnectionId, ConnectionKind, ConnectionMetadata,
    ConnectionRegistry, HealthState, InFlightGuard, NetworkConfig, NetworkModule, OutboundMessage,
    SendError, ShutdownController, TlsConfig, build_http_layers, handle_socket, health_handler,
    http_sync_handler, liveness_handler, readiness_handler, ws_upgrade_handler,
};
use tower::ServiceExt;

/// Uses every public item the specification names, spelled as it spells them. Compiling is the
/// test; calling it (from AC 1) runs the parts that need no server.
#[allow(clippy::too_many_lines)] // one place for the whole surface
async fn spec_api() {
    // config.rs
    let config = NetworkConfig {
        host: "127.0.0.1".to_owned(),
        port: 0,
        tls: None::<TlsConfig>,
        connection: ConnectionConfig {
            outbound_channel_capacity: 256,
            send_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            ws_write_buffer_size: 131_072,
            ws_max_write_buffer_size: 524_288,
            ..Default::default()
        },
        cors_origins: vec!["*".to_owned()],
        request_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let _tls = TlsConfig {
        cert_path: PathBuf::from("cert.pem"),
        key_path: PathBuf::from("key.pem"),
        ca_cert_path: None,
    };

    // connection.rs
    let registry = ConnectionRegistry::new();
    let (handle, mut rx): (Arc<ConnectionHandle>, _) =
        registry.register(ConnectionKind::Client, &config.connection);
    let ConnectionId(raw_id): ConnectionId = handle.id;
    assert!(raw_id > 0);
    match handle.kind {
        ConnectionKind::Client | ConnectionKind::ClusterPeer => {}
    }
    let _: &Arc<RwLock<ConnectionMetadata>> = &handle.metadata;
    let _: Instant = handle.connected_at;
    let _: ConnectionKind = handle.kind;
    let metadata = handle.metadata.read().await.clone();
    let ConnectionMetadata {
        authenticated,
        principal,
        subscriptions,
        topics,
        last_heartbeat,
        last_hlc,
        peer_node_id,
    } = metadata;
    let _: (bool, Option<Principal>, HashSet<String>, HashSet<String>) =
        (authenticated, principal, subscriptions, topics);
    let _: (Instant, Option<Timestamp>, Option<String>) = (last_heartbeat, last_hlc, peer_node_id);

    let sent: bool = handle.try_send(OutboundMessage::Binary(vec![1_u8].into()));
    assert!(sent);
    let timed: Result<(), SendError> = handle
        .send_timeout(OutboundMessage::Close(Some("bye".to_owned())), Duration::from_secs(1))
        .await;
    assert!(timed.is_ok());
    assert!(handle.is_connected());
    match handle.send_timeout(OutboundMessage::Close(None), Duration::ZERO).await {
        Ok(()) | Err(SendError::Timeout | SendError::Disconnected | SendError::Full) => {}
        Err(_) => unreachable!("only the outbound size limit adds a variant"),
    }

    // The handle's `tx`, with tokio's `mpsc::Sender` methods and error types.
    let tx = handle.tx.clone();
    let tried: Result<(), mpsc::error::TrySendError<OutboundMessage>> =
        tx.try_send(OutboundMessage::Binary(vec![2_u8].into()));
    assert!(tried.is_ok());
    let awaited: Result<(), mpsc::error::SendError<OutboundMessage>> =
        tx.send(OutboundMessage::Binary(vec![3_u8].into())).await;
    assert!(awaited.is_ok());
    let bounded: Result<(), mpsc::error::SendTimeoutError<OutboundMessage>> =
        tx.send_timeout(OutboundMessage::Binary(vec![4_u8].into()), Duration::from_secs(1)).await;
    assert!(bounded.is_ok());
    tx.reserve().await.expect("space").send(OutboundMessage::Binary(vec![5_u8].into()));
    let (capacity, max_capacity): (usize, usize) = (tx.capacity(), tx.max_capacity());
    assert_eq!((capacity, max_capacity), (256 - rx.len(), 256));
    assert!(!tx.is_closed());

    // The receiver `register` returns, with tokio's `mpsc::Receiver` methods.
    let first: Option<OutboundMessage> = rx.recv().await;
    assert_eq!(first, Some(OutboundMessage::Binary(vec![1_u8].into())));
    let second: Result<OutboundMessage, mpsc::error::TryRecvError> = rx.try_recv();
    assert!(second.is_ok());
    let mut buffer = Vec::new();
    let moved: usize = rx.recv_many(&mut buffer, 2).await;
    assert_eq!(moved, 2);
    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(rx.poll_recv(cx))).await;
    assert!(polled.is_ready());
    let (_len, _empty, _closed): (usize, bool, bool) = (rx.len(), rx.is_empty(), rx.is_closed());
    rx.close();
    tx.closed().await;

    let _removed: Option<Arc<ConnectionHandle>> = registry.remove(handle.id);
    let _found: Option<Arc<ConnectionHandle>> = registry.get(handle.id);
    let _: usize = registry.count() + registry.count_by_kind(ConnectionKind::ClusterPeer);
    let _: Vec<Arc<ConnectionHandle>> = registry.iter().collect();
    registry.broadcast(vec![0x90_u8], ConnectionKind::Client);
    let _: Vec<Arc<ConnectionHandle>> = registry.drain_all();

    // shutdown.rs
    let controller = ShutdownController::new();
    controller.set_ready();
    let _: watch::Receiver<bool> = controller.shutdown_receiver();
    let _: HealthState = controller.health_state();
    let _: HealthState = **controller.health_state_handle().load();
    let guard: InFlightGuard = controller.in_flight_guard();
    let _: u64 = controller.in_flight_count();
    drop(guard);
    let drained: bool = controller.wait_for_drain(Duration::from_millis(1)).await;
    assert!(drained);
    controller.trigger_shutdown();
    match controller.health_state() {
        HealthState::Starting
        | HealthState::Ready
        | HealthState::Draining
        | HealthState::Stopped => {}
    }

    // handlers, middleware, module
    let mut module = NetworkModule::new(config.clone());
    let _: Arc<ConnectionRegistry> = module.registry();
    let _: Arc<ShutdownController> = module.shutdown_controller();
    let _router: Router = module.build_router();
    let _layers = build_http_layers(&config);
    let port: u16 = module.start().await.expect("binds port 0");
    assert!(port > 0);
    let served: anyhow::Result<()> = module.serve(std::future::ready(())).await;
    assert!(served.is_ok());

    let state = spec_state();
    let AppState { registry, shutdown, config, start_time, .. } = state.clone();
    let _: (Arc<ConnectionRegistry>, Arc<ShutdownController>) = (registry, shutdown);
    let _: (Arc<NetworkConfig>, Instant) = (config, start_time);
    let _own_router: Router = Router::new()
        .route("/health", get(health_handler))
        .route("/health/live", get(liveness_handler))
        .route("/health/ready", get(readiness_handler))
        .route("/ws", get(ws_upgrade_handler))
        .route("/sync", post(http_sync_handler))
        .with_state(state);
    serves_sockets(handle_socket);
}

/// Takes what the specification's `handle_socket(socket, state)` is.
fn serves_sockets<F: Future<Output = ()> + Send>(_: impl Fn(WebSocket, AppState) -> F) {}

/// An [`AppState`] as the module builds it.
fn spec_state() -> AppState {
    NetworkModule::new(test_config()).app_state()
}

fn spec_binary(byte: u8) -> OutboundMessage {
    OutboundMessage::Binary(vec![byte].into())
}

#[tokio::test]
async fn ac01_the_specification_api_compiles_and_runs() {
    tokio::time::timeout(Duration::from_secs(10), spec_api()).await.expect("bounded");
}

#[test]
fn ac02_register_creates_a_bounded_channel_of_capacity_256_configurable() {
    let registry = ConnectionRegistry::new();
    let (handle, _rx) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
    assert_eq!(handle.tx.max_capacity(), 256);
    let config = ConnectionConfig { outbound_channel_capacity: 8, ..Default::default() };
    let (custom, _rx) = registry.register(ConnectionKind::Client, &config);
    assert_eq!(custom.tx.max_capacity(), 8);
}

#[test]
fn ac03_try_send_returns_false_when_the_channel_is_full() {
    let registry = ConnectionRegistry::new();
    let (handle, _rx) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
    let results: Vec<bool> = (0..257).map(|_| handle.try_send(spec_binary(1))).collect();
    assert!(results[..256].iter().all(|sent| *sent), "the first 256 fit");
    assert!(!results[256], "the 257th is refused");
}

#[test]
fn ac04_count_reflects_register_and_remove() {
    let registry = ConnectionRegistry::new();
    let config = ConnectionConfig::default();
    let (a, _ra) = registry.register(ConnectionKind::Client, &config);
    let (_b, _rb) = registry.register(ConnectionKind::ClusterPeer, &config);
    assert_eq!(registry.count(), 2);
    registry.remove(a.id);
    assert_eq!(registry.count(), 1);
    registry.remove(a.id);
    assert_eq!(registry.count(), 1, "removing twice counts once");
}

#[tokio::test]
async fn ac05_health_state_walks_starting_ready_draining_stopped() {
    let controller = ShutdownController::new();
    assert_eq!(controller.health_state(), HealthState::Starting);
    controller.set_ready();
    assert_eq!(controller.health_state(), HealthState::Ready);
    controller.trigger_shutdown();
    assert_eq!(controller.health_state(), HealthState::Draining);

    let server = TestServer::start(test_config()).await;
    let shutdown = Arc::clone(&server.controller);
    assert_eq!(shutdown.health_state(), HealthState::Ready);
    server.stop().await.unwrap();
    assert_eq!(shutdown.health_state(), HealthState::Stopped, "final Stopped after drain");
}

#[tokio::test]
async fn ac06_get_health_returns_state_connections_in_flight_uptime() {
    let server = TestServer::start(test_config()).await;
    let body: serde_json::Value =
        http().get(server.url("/health")).send().await.unwrap().json().await.unwrap();
    for field in ["state", "connections", "in_flight", "uptime_secs"] {
        assert!(body.get(field).is_some(), "{field} missing from {body}");
    }
    assert_eq!(body["state"], "ready");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac07_live_is_always_200_ready_is_200_only_when_ready() {
    // Before serve(): Starting.
    let module = NetworkModule::new(test_config());
    let router = module.build_router();
    for (path, status) in
        [("/health/live", StatusCode::OK), ("/health/ready", StatusCode::SERVICE_UNAVAILABLE)]
    {
        let request = Request::get(path).body(Body::empty()).unwrap();
        assert_eq!(router.clone().oneshot(request).await.unwrap().status(), status, "{path}");
    }
    let server = TestServer::start(test_config()).await;
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(http().get(server.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac08_get_ws_upgrades_and_the_connection_appears_in_the_registry() {
    let server = TestServer::start(test_config()).await;
    let _ws = server.ws().await;
    server.until_connections(1, "the upgraded connection").await;
    assert_eq!(server.registry.count_by_kind(ConnectionKind::Client), 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac09_client_close_removes_the_connection_from_the_registry() {
    let server = TestServer::start(test_config()).await;
    let mut ws = server.ws().await;
    server.until_connections(1, "the connection").await;
    ws.close(None).await.unwrap();
    server.until_connections(0, "the closed connection removed").await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac10_post_sync_returns_msgpack_with_its_content_type() {
    let server = TestServer::start(test_config()).await;
    let response =
        common::post_sync(&http(), server.url("/sync"), &Vec::<()>::new()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/msgpack");
    let body = response.bytes().await.unwrap();
    assert_eq!(body.as_ref(), rmp_serde::to_vec_named(&Vec::<()>::new()).unwrap());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac11_start_binds_port_0_and_serve_accepts_connections() {
    let mut module = NetworkModule::new(test_config());
    let port = module.start().await.unwrap();
    assert!(port > 0);
    let server = TestServer::from_module(module).await;
    assert_eq!(http().get(server.url("/health/live")).send().await.unwrap().status(), 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac12_trigger_shutdown_makes_serve_drain_connections() {
    let server = TestServer::start(test_config()).await;
    let mut ws = server.ws().await;
    server.until_connections(1, "the connection").await;
    server.controller.trigger_shutdown();
    let close = expect_close(&mut ws).await;
    assert_eq!(u16::from(close.code), 1001);
    server.join().await.unwrap();
}

#[tokio::test]
async fn ac13_every_response_carries_x_request_id() {
    let server = TestServer::start(test_config()).await;
    for path in ["/health", "/health/live", "/health/ready", "/no-such-route", "/metrics"] {
        let response = http().get(server.url(path)).send().await.unwrap();
        assert!(response.headers().contains_key("x-request-id"), "{path}");
    }
    let sync =
        common::post_sync(&http(), server.url("/sync"), &Vec::<()>::new()).send().await.unwrap();
    assert!(sync.headers().contains_key("x-request-id"));
    server.stop().await.unwrap();
}

#[test]
fn ac14_defaults_are_the_specified_values() {
    let network = NetworkConfig::default();
    assert_eq!(network.host, "0.0.0.0");
    assert_eq!(network.port, 0);
    assert!(network.tls.is_none());
    assert_eq!(network.cors_origins, ["*"]);
    assert_eq!(network.request_timeout, Duration::from_secs(30));
    let connection = ConnectionConfig::default();
    assert_eq!(connection.outbound_channel_capacity, 256);
    assert_eq!(connection.send_timeout, Duration::from_secs(5));
    assert_eq!(connection.idle_timeout, Duration::from_secs(60));
    assert_eq!(connection.ws_write_buffer_size, 131_072);
    assert_eq!(connection.ws_max_write_buffer_size, 524_288);
}

#[test]
fn ac15_broadcast_reaches_one_kind_and_skips_full_channels_without_blocking() {
    let registry = ConnectionRegistry::new();
    let roomy = ConnectionConfig::default();
    let tiny = ConnectionConfig { outbound_channel_capacity: 1, ..Default::default() };
    let (_client, mut client_rx) = registry.register(ConnectionKind::Client, &roomy);
    let (full, mut full_rx) = registry.register(ConnectionKind::Client, &tiny);
    let (_peer, mut peer_rx) = registry.register(ConnectionKind::ClusterPeer, &roomy);
    assert!(full.try_send(spec_binary(9)));

    // Synchronous: returning at all, with a full channel among the recipients, is the proof.
    registry.broadcast(vec![7_u8], ConnectionKind::Client);

    assert_eq!(client_rx.try_recv().unwrap(), spec_binary(7));
    assert_eq!(full_rx.try_recv().unwrap(), spec_binary(9), "the full channel keeps its own");
    assert!(full_rx.try_recv().is_err(), "and skipped the broadcast");
    assert!(peer_rx.try_recv().is_err(), "another kind is not reached");
}
