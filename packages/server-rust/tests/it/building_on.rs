//! Building on the transport: what the crates that carry TopGun's services use of it. Topics,
//! targeted sends, routes of one's own, per-connection extensions, concurrent dispatch and
//! disconnect listeners, each as an embedder sees it.

use topgun_test_support as common;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use common::certs::{TestCa, TlsFiles};
use common::{TestServer, eventually, next_frame, send_binary, test_config};
use tokio::sync::Notify;

use crate::handshake::CLIENT_PING;
use topgun_server::network::{
    BroadcastOutcome, ConnectionConfig, ConnectionHandle, ConnectionId, ConnectionKind,
    ConnectionRegistry, DisconnectReason, Heartbeat, InboundHandler, NetworkConfig, NetworkModule,
    OutboundMessage, RateLimitConfig, TopicError,
};

fn binary(bytes: &[u8]) -> OutboundMessage {
    OutboundMessage::Binary(Bytes::copy_from_slice(bytes))
}

/// The only connection the server holds.
fn only_connection(server: &TestServer) -> Arc<ConnectionHandle> {
    let mut all: Vec<_> = server.registry.iter().collect();
    assert_eq!(all.len(), 1, "exactly one connection expected");
    all.pop().unwrap()
}

/// Opens a WebSocket and returns it with the server's handle of it.
async fn connect(server: &TestServer) -> (common::WsClient, Arc<ConnectionHandle>) {
    let known: Vec<ConnectionId> = server.registry.iter().map(|conn| conn.id).collect();
    let client = server.ws().await;
    let conn = server.registry.iter().find(|conn| !known.contains(&conn.id)).unwrap();
    (client, conn)
}

async fn metrics(server: &TestServer) -> String {
    let response = server.http().get(server.url("/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

#[tokio::test]
async fn a_publish_reaches_exactly_the_subscribers_and_leaves_with_a_disconnect() {
    let server = TestServer::start(test_config()).await;
    let (mut alice, alice_conn) = connect(&server).await;
    let (mut bob, bob_conn) = connect(&server).await;
    let (mut carol, _carol_conn) = connect(&server).await;
    let topics = server.registry.topics();
    assert_eq!(topics.subscribe(&alice_conn, "news").await, Ok(true));
    assert_eq!(topics.subscribe(&alice_conn, "news").await, Ok(false), "once is enough");
    assert_eq!(topics.subscribe(&bob_conn, "news").await, Ok(true));
    assert!(alice_conn.metadata.read().await.topics.contains("news"));

    let outcome = topics.publish_except("news", b"from bob".to_vec(), bob_conn.id);
    assert_eq!(outcome, BroadcastOutcome { queued: 1, dropped: 0 });
    assert_eq!(next_frame(&mut alice).await.as_ref(), b"from bob");
    // Carol (not subscribed) and Bob (the publisher) hear nothing: the next thing each
    // receives is a message sent to them afterwards.
    let outcome = topics.publish("news", b"to all".to_vec());
    assert_eq!(outcome.queued, 2);
    assert_eq!(next_frame(&mut bob).await.as_ref(), b"to all");
    server.registry.send_to([server.registry.iter().map(|c| c.id).max().unwrap()], b"x".to_vec());
    assert_eq!(next_frame(&mut carol).await.as_ref(), b"x");
    assert_eq!(next_frame(&mut alice).await.as_ref(), b"to all");

    assert!(topics.unsubscribe(&alice_conn, "news").await);
    assert!(!alice_conn.metadata.read().await.topics.contains("news"));
    assert_eq!(topics.publish("news", b"after".to_vec()).queued, 1, "only bob is left");
    assert_eq!(next_frame(&mut bob).await.as_ref(), b"after");

    let exposition = metrics(&server).await;
    assert_eq!(common::sample(&exposition, "topgun_topics", &[]), "1");
    assert_eq!(common::sample(&exposition, "topgun_topic_subscriptions", &[]), "1");
    assert_eq!(common::sample(&exposition, "topgun_topic_messages_published_total", &[]), "3");

    drop(bob);
    server.until_connections(2, "bob gone").await;
    eventually("bob's subscription gone", || topics.subscription_count() == 0).await;
    assert_eq!(topics.topic_count(), 0);
    assert_eq!(topics.subscribe(&bob_conn, "news").await, Err(TopicError::Disconnected));
    assert_eq!(topics.subscription_count(), 0);
    let exposition = metrics(&server).await;
    assert_eq!(common::sample(&exposition, "topgun_topic_subscriptions", &[]), "0");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_holds_at_most_its_topic_limit_and_names_stay_bounded() {
    let registry = ConnectionRegistry::new();
    let config = ConnectionConfig { max_topics_per_connection: 2, ..ConnectionConfig::default() };
    let (conn, _queue) = registry.register(ConnectionKind::Client, &config);
    let topics = registry.topics();
    assert_eq!(topics.subscribe(&conn, "a").await, Ok(true));
    assert_eq!(topics.subscribe(&conn, "b").await, Ok(true));
    let refused = topics.subscribe(&conn, "c").await.unwrap_err();
    assert_eq!(refused, TopicError::LimitReached { limit: 2 });
    assert!(refused.to_string().contains("2 topics"), "{refused}");
    assert_eq!(topics.subscribe(&conn, "a").await, Ok(false), "a topic it holds is no new one");
    let long = "t".repeat(topgun_server::network::Topics::MAX_NAME_BYTES + 1);
    assert!(matches!(topics.subscribe(&conn, &long).await, Err(TopicError::NameTooLong { .. })));
    assert_eq!(topics.unsubscribe_all(&conn).await, 2);
    assert_eq!(topics.subscribe(&conn, "c").await, Ok(true), "room again");
}

#[tokio::test]
async fn a_publish_reports_full_queues_and_waits_cooperatively() {
    let registry = ConnectionRegistry::new();
    let small = ConnectionConfig { outbound_channel_capacity: 1, ..ConnectionConfig::default() };
    let (full, mut full_queue) = registry.register(ConnectionKind::Client, &small);
    let (open, mut open_queue) =
        registry.register(ConnectionKind::Client, &ConnectionConfig::default());
    for conn in [&full, &open] {
        registry.topics().subscribe(conn, "t").await.unwrap();
    }
    assert!(full.try_send(binary(b"already")));
    let outcome = registry.topics().publish_cooperative("t", b"one".to_vec()).await;
    assert_eq!(outcome, BroadcastOutcome { queued: 1, dropped: 1 });
    assert_eq!(full.dropped_messages(), 1);
    assert_eq!(full_queue.try_recv().unwrap(), binary(b"already"));
    assert_eq!(open_queue.try_recv().unwrap(), binary(b"one"));
    let outcome = registry.topics().publish_cooperative_except("t", b"two".to_vec(), open.id).await;
    assert_eq!(outcome, BroadcastOutcome { queued: 1, dropped: 0 });
    assert_eq!(full_queue.try_recv().unwrap(), binary(b"two"));
    assert!(open_queue.try_recv().is_err());
    assert_eq!(registry.topics().publish("nobody", b"x".to_vec()), BroadcastOutcome::default());
}

#[tokio::test]
async fn a_targeted_send_reaches_the_ids_named_and_counts_the_missing() {
    let registry = ConnectionRegistry::new();
    let config = ConnectionConfig::default();
    let (a, mut a_queue) = registry.register(ConnectionKind::Client, &config);
    let (b, mut b_queue) = registry.register(ConnectionKind::ClusterPeer, &config);
    let (_c, mut c_queue) = registry.register(ConnectionKind::Client, &config);
    let outcome = registry.send_to([a.id, b.id, ConnectionId(999)], b"hi".to_vec());
    assert_eq!(outcome, BroadcastOutcome { queued: 2, dropped: 1 });
    assert_eq!(a_queue.try_recv().unwrap(), binary(b"hi"));
    assert_eq!(b_queue.try_recv().unwrap(), binary(b"hi"));
    assert!(c_queue.try_recv().is_err());
}

async fn hello() -> &'static str {
    "hello from the embedder"
}

#[tokio::test]
async fn routes_of_ones_own_are_served_behind_the_transports_middleware() {
    let routes = Router::new().route("/api/hello", get(hello));
    let server = TestServer::from_module(
        NetworkModule::new(NetworkConfig {
            request_timeout: std::time::Duration::from_secs(5),
            ..test_config()
        })
        .with_routes(routes)
        .with_routes(Router::new().route("/api/other", get(|| async { "other" }))),
    )
    .await;
    let http = server.http();
    let response = http
        .get(server.url("/api/hello"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"), "{:?}", response.headers());
    assert!(response.headers().contains_key("access-control-allow-origin"));
    assert_eq!(response.text().await.unwrap(), "hello from the embedder");
    assert_eq!(http.get(server.url("/api/other")).send().await.unwrap().status(), 200);
    // The built-in routes and the JSON 404 are still the transport's.
    assert_eq!(http.get(server.url("/health/live")).send().await.unwrap().status(), 200);
    let missing = http.get(server.url("/api/missing")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.text().await.unwrap(), r#"{"error":"not found"}"#);
    // The per-address rate limit counts them too.
    let limited = TestServer::from_module(
        NetworkModule::new(NetworkConfig {
            rate_limit: Some(RateLimitConfig {
                per_second: NonZeroU32::new(1).unwrap(),
                burst: NonZeroU32::new(2).unwrap(),
            }),
            ..test_config()
        })
        .with_routes(Router::new().route("/api/hello", get(hello))),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(http.get(limited.url("/api/hello")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    limited.stop().await.unwrap();
    let exposition = metrics(&server).await;
    let embedder_requests = common::sample(
        &exposition,
        "topgun_http_requests_total",
        &[("route", "embedder"), ("status", "200")],
    );
    assert_eq!(embedder_requests, "2");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn routes_of_ones_own_are_served_over_tls_and_time_out_like_the_rest() {
    let ca = TestCa::new("test CA");
    let files = TlsFiles::write(&ca.server_cert(1), None);
    let routes = Router::new().route("/api/hello", get(hello)).route(
        "/api/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        }),
    );
    let config = NetworkConfig {
        tls: Some(files.config.clone()),
        request_timeout: Duration::from_millis(200),
        ..test_config()
    };
    let module = NetworkModule::new(config).with_routes(routes);
    let server =
        TestServer::from_module_with_client_tls(module, Some(ca.client_config(None))).await;
    assert!(server.url("/").starts_with("https://"));
    let http = server.http();
    let hello = http.get(server.url("/api/hello")).send().await.unwrap();
    assert_eq!(hello.status(), 200);
    let slow = http.get(server.url("/api/slow")).send().await.unwrap();
    assert_eq!(slow.status(), 408, "the transport's request timeout");
    assert!(slow.headers().contains_key("x-request-id"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_route_of_ones_own_on_a_transport_path_or_with_a_fallback_fails_start() {
    for (routes, expected) in [
        (Router::new().route("/health", get(hello)), "/health is served by the transport"),
        (
            Router::new().route("/sync", axum::routing::put(hello)),
            "/sync is served by the transport",
        ),
        (Router::new().route_service("/ws", get(hello)), "/ws is served by the transport"),
        (Router::new().route("/", axum::routing::any(hello)), "/ is served by the transport"),
        (Router::new().fallback(hello), "may not set a fallback"),
    ] {
        let mut module = NetworkModule::new(test_config()).with_routes(routes);
        let err = module.start().await.expect_err("a clash is an error").to_string();
        assert!(err.contains(expected), "{err}");
        assert!(module.local_addr().is_none(), "nothing bound");
    }
    // /metrics is free on the main port once metrics have a listener of their own.
    let mut config = test_config();
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let mut module =
        NetworkModule::new(config).with_routes(Router::new().route("/metrics", get(hello)));
    module.start().await.expect("no clash");
}

/// The device a connection said it is, kept with the connection.
#[derive(Clone, Debug, PartialEq)]
struct Device(String);

/// Counts how many of its kind are alive, to see extensions dropped.
#[derive(Clone)]
struct Alive(Arc<AtomicUsize>);

impl Alive {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Names each connection's device in `on_connect` and echoes it back for every message.
struct Devices {
    alive: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl InboundHandler for Devices {
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        conn.insert_extension(Device(format!("device-{}", conn.id)));
        conn.insert_extension(Arc::new(Alive::new(&self.alive)));
    }

    async fn on_message(&self, conn: &Arc<ConnectionHandle>, _payload: Bytes) {
        let device = conn.extension::<Device>().expect("set in on_connect");
        conn.try_send(OutboundMessage::Binary(device.0.into_bytes().into()));
    }
}

#[tokio::test]
async fn extensions_are_read_by_handlers_and_lookups_and_dropped_with_the_connection() {
    let alive = Arc::new(AtomicUsize::new(0));
    let server =
        TestServer::with_handler(test_config(), Devices { alive: Arc::clone(&alive) }).await;
    let mut client = server.ws().await;
    send_binary(&mut client, b"who am I".to_vec()).await;
    let conn = only_connection(&server);
    let expected = format!("device-{}", conn.id);
    assert_eq!(next_frame(&mut client).await.as_ref(), expected.as_bytes());
    let looked_up = server.registry.get(conn.id).unwrap();
    assert_eq!(looked_up.extension::<Device>(), Some(Device(expected)));
    assert_eq!(conn.with_extensions(|extensions| extensions.len()), 2);
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    drop(client);
    server.until_connections(0, "client gone").await;
    // Held here, the handle outlives the connection; its extensions do not.
    eventually("extensions dropped", || alive.load(Ordering::SeqCst) == 0).await;
    assert_eq!(conn.extension::<Device>(), None);
    server.stop().await.unwrap();
}

/// `slow` waits until released; anything else is answered at once. Records the order in
/// which calls end, and the disconnect.
#[derive(Default)]
struct SlowAndFast {
    release: Notify,
    running: AtomicUsize,
    most_running: AtomicUsize,
    events: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl InboundHandler for SlowAndFast {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        if payload.as_ref() == b"slow" {
            self.release.notified().await;
        }
        self.events.lock().unwrap().push(String::from_utf8_lossy(&payload).into_owned());
        self.running.fetch_sub(1, Ordering::SeqCst);
        conn.try_send(OutboundMessage::Binary(payload));
    }

    async fn on_disconnect(&self, _conn: &Arc<ConnectionHandle>) {
        self.events.lock().unwrap().push("disconnect".into());
    }
}

fn concurrent(limit: usize) -> NetworkConfig {
    let mut config = test_config();
    config.connection.max_concurrent_messages = limit;
    config
}

#[tokio::test]
async fn with_concurrent_dispatch_a_slow_message_does_not_hold_up_the_next() {
    let handler = Arc::new(SlowAndFast::default());
    let server =
        TestServer::with_handler(concurrent(4), Heartbeat::new(Arc::clone(&handler))).await;
    let mut client = server.ws().await;
    send_binary(&mut client, b"slow".to_vec()).await;
    send_binary(&mut client, b"slow".to_vec()).await;
    send_binary(&mut client, b"fast".to_vec()).await;
    assert_eq!(next_frame(&mut client).await.as_ref(), b"fast", "not behind the slow ones");
    // The heartbeat is answered while calls are in flight.
    send_binary(&mut client, CLIENT_PING.to_vec()).await;
    let pong = next_frame(&mut client).await;
    assert!(pong.windows(4).any(|w| w == b"PONG"), "{pong:?}");
    assert_eq!(handler.running.load(Ordering::SeqCst), 2);
    handler.release.notify_waiters();
    let (slow, _frames) = common::next_messages(&mut client, 2).await;
    assert_eq!(slow, [&b"slow"[..], b"slow"]);
    assert_eq!(handler.most_running.load(Ordering::SeqCst), 3);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn no_more_calls_run_at_once_than_the_limit() {
    let handler = Arc::new(SlowAndFast::default());
    let server = TestServer::with_handler(concurrent(2), Arc::clone(&handler)).await;
    let mut client = server.ws().await;
    for _ in 0..3 {
        send_binary(&mut client, b"slow".to_vec()).await;
    }
    send_binary(&mut client, b"fast".to_vec()).await;
    eventually("two calls running", || handler.running.load(Ordering::SeqCst) == 2).await;
    // Released two at a time until all four have run: the third and the fast one start
    // only as earlier ones end.
    eventually("every call ran", || {
        handler.release.notify_waiters();
        handler.events.lock().unwrap().len() == 4
    })
    .await;
    let (replies, _frames) = common::next_messages(&mut client, 4).await;
    assert_eq!(replies.len(), 4);
    assert_eq!(handler.most_running.load(Ordering::SeqCst), 2, "never more than the limit");
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn one_at_a_time_stays_the_default() {
    assert_eq!(ConnectionConfig::default().max_concurrent_messages, 1);
    let handler = Arc::new(SlowAndFast::default());
    let server = TestServer::with_handler(test_config(), Arc::clone(&handler)).await;
    let mut client = server.ws().await;
    send_binary(&mut client, b"slow".to_vec()).await;
    send_binary(&mut client, b"fast".to_vec()).await;
    eventually("the slow call runs", || handler.running.load(Ordering::SeqCst) == 1).await;
    handler.release.notify_waiters();
    assert_eq!(next_frame(&mut client).await.as_ref(), b"slow", "in order");
    assert_eq!(next_frame(&mut client).await.as_ref(), b"fast");
    assert_eq!(handler.most_running.load(Ordering::SeqCst), 1);
    server.stop().await.unwrap();
}

/// A server that runs up to 8 calls of a connection at once, and a client whose three slow
/// messages are all in flight.
async fn three_calls_in_flight() -> (Arc<SlowAndFast>, TestServer, common::WsClient) {
    let handler = Arc::new(SlowAndFast::default());
    let server = TestServer::with_handler(concurrent(8), Arc::clone(&handler)).await;
    let mut client = server.ws().await;
    for _ in 0..3 {
        send_binary(&mut client, b"slow".to_vec()).await;
    }
    eventually("three calls in flight", || handler.running.load(Ordering::SeqCst) == 3).await;
    (handler, server, client)
}

#[tokio::test]
async fn calls_in_flight_finish_before_the_disconnect_is_told() {
    let (handler, server, client) = three_calls_in_flight().await;
    drop(client);
    // The client is gone, but its calls are still in flight: the connection waits for them.
    assert_eq!(server.controller.in_flight_count(), 3);
    assert!(handler.events.lock().unwrap().is_empty());
    handler.release.notify_waiters();
    server.until_connections(0, "connection removed").await;
    eventually("disconnect told", || handler.events.lock().unwrap().len() == 4).await;
    assert_eq!(*handler.events.lock().unwrap(), ["slow", "slow", "slow", "disconnect"]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_shutdown_lets_the_calls_in_flight_finish_and_their_answers_go_out() {
    let (handler, server, mut client) = three_calls_in_flight().await;
    server.controller.trigger_shutdown();
    // The shutdown waits for them as in-flight work; once released, each answer reaches the
    // client ahead of the 1001.
    assert_eq!(server.controller.in_flight_count(), 3);
    handler.release.notify_waiters();
    let (answers, _frames) = common::next_messages(&mut client, 3).await;
    assert_eq!(answers, [&b"slow"[..], b"slow", b"slow"]);
    let close = common::expect_close(&mut client).await;
    assert_eq!(u16::from(close.code), 1001);
    server.join().await.unwrap();
}

/// Records what it is told, under a name.
struct Told {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl topgun_server::network::DisconnectListener for Told {
    async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>, reason: DisconnectReason) {
        // Still readable: extensions go after the last listener.
        let device = conn.extension::<Device>().map(|d| d.0).unwrap_or_default();
        self.log.lock().unwrap().push(format!("{} {} {}", self.name, reason.as_str(), device));
    }
}

/// Logs its own disconnect into the same log as the listeners.
struct LoggingHandler(Arc<Mutex<Vec<String>>>);

#[async_trait::async_trait]
impl InboundHandler for LoggingHandler {
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        conn.insert_extension(Device("d".into()));
    }
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, payload: Bytes) {
        self.0.lock().unwrap().push(format!("message {}", String::from_utf8_lossy(&payload)));
    }
    async fn on_disconnect(&self, _conn: &Arc<ConnectionHandle>) {
        self.0.lock().unwrap().push("handler".into());
    }
}

#[tokio::test]
async fn every_disconnect_listener_is_told_once_in_order_after_the_handler() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let module = NetworkModule::new(test_config()).with_handler(LoggingHandler(Arc::clone(&log)));
    let registry = module.registry();
    registry.listen_disconnects(Told { name: "sessions", log: Arc::clone(&log) });
    registry.listen_disconnects(Told { name: "locks", log: Arc::clone(&log) });
    let panicked = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&panicked);
    registry.listen_disconnects(move |_conn: &Arc<ConnectionHandle>, _why: DisconnectReason| {
        count.fetch_add(1, Ordering::SeqCst);
        panic!("a listener's bug");
    });
    registry.listen_disconnects(Told { name: "last", log: Arc::clone(&log) });
    let server = TestServer::from_module(module).await;
    let mut client = server.ws().await;
    send_binary(&mut client, b"bye".to_vec()).await;
    client.close(None).await.unwrap();
    server.until_connections(0, "connection removed").await;
    eventually("every listener told", || log.lock().unwrap().len() == 5).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "message bye",
            "handler",
            "sessions client_close d",
            "locks client_close d",
            "last client_close d"
        ]
    );
    assert_eq!(panicked.load(Ordering::SeqCst), 1);
    server.stop().await.unwrap();
}
