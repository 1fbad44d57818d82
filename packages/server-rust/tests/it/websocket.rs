//! `GET /ws`: registration, message flow, coalescing, close handling and cleanup.

use topgun_test_support as common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{
    EchoHandler, TestServer, connect_ws, eventually, expect_close, next_frame, next_messages,
    send_binary, test_config,
};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use topgun_server::network::{
    ConnectionHandle, ConnectionId, ConnectionKind, InboundHandler, OutboundMessage, decode_frame,
};

fn only_connection(server: &TestServer) -> Arc<ConnectionHandle> {
    let mut all: Vec<_> = server.registry.iter().collect();
    assert_eq!(all.len(), 1, "exactly one connection expected");
    all.pop().unwrap()
}

#[tokio::test]
async fn ac08_ot3_ws_upgrade_registers_a_client_connection() {
    let server = TestServer::start(test_config()).await;
    assert_eq!(server.registry.count(), 0);
    let first = server.ws().await;
    let second = server.ws().await;
    assert_eq!(server.registry.count(), 2);
    assert_eq!(server.registry.count_by_kind(ConnectionKind::Client), 2);
    let ids: std::collections::HashSet<ConnectionId> =
        server.registry.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), 2, "each connection has its own id");
    drop((first, second));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac09_client_initiated_close_removes_the_connection() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.ws().await;
    let handle = only_connection(&server);
    client.close(None).await.unwrap();
    server.until_connections(0, "connection removed").await;
    assert!(!handle.is_connected(), "the handle reports the closed connection");
    assert!(!handle.try_send(OutboundMessage::Binary(Bytes::from_static(b"late"))));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_dropped_tcp_connection_is_removed_too() {
    let server = TestServer::start(test_config()).await;
    let client = server.ws().await;
    drop(client);
    server.until_connections(0, "connection removed").await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn binary_messages_reach_the_handler_and_echo_back_in_order() {
    let server = TestServer::with_handler(test_config(), EchoHandler).await;
    let mut client = server.ws().await;
    let sent: Vec<Bytes> = (0..20_u8).map(|i| Bytes::from(vec![0x91, i])).collect();
    for message in &sent {
        send_binary(&mut client, message.clone()).await;
    }
    let (received, _frames) = next_messages(&mut client, sent.len()).await;
    assert_eq!(received, sent);
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_lone_message_arrives_unwrapped() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.ws().await;
    only_connection(&server)
        .try_send(OutboundMessage::Binary(Bytes::from_static(b"\x81\xa1k\x01")));
    assert_eq!(next_frame(&mut client).await.as_ref(), b"\x81\xa1k\x01");
    drop(client);
    server.stop().await.unwrap();
}

/// The fixed fields of a `BATCH` frame.
#[derive(serde::Deserialize)]
struct BatchHeader {
    #[serde(rename = "type")]
    kind: String,
    count: u64,
}

/// Answers a one-byte request `n` with `n` numbered messages, sent from the connection's own
/// task: nothing reaches the socket before the handler returns, so the writer finds them all
/// queued, as it does whenever messages pile up faster than it writes.
struct Numbered;

#[async_trait::async_trait]
impl InboundHandler for Numbered {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        for i in 0..u32::from(payload[0]) {
            assert!(conn.try_send(OutboundMessage::Binary(Bytes::from(i.to_be_bytes().to_vec()))));
        }
    }
}

#[tokio::test]
async fn queued_messages_are_coalesced_into_batch_frames_in_order() {
    let server = TestServer::with_handler(test_config(), Numbered).await;
    let mut client = server.ws().await;
    let sent: Vec<Bytes> = (0..100_u32).map(|i| Bytes::from(i.to_be_bytes().to_vec())).collect();
    send_binary(&mut client, Bytes::from_static(&[100])).await;

    let (received, frames) = next_messages(&mut client, sent.len()).await;
    assert_eq!(received, sent, "complete and in order");
    assert!(frames < sent.len(), "{frames} frames for {} messages", sent.len());

    // The frame itself follows TopGun's envelope: a MsgPack map typed BATCH with a count.
    send_binary(&mut client, Bytes::from_static(&[3])).await;
    let frame = next_frame(&mut client).await;
    let header: BatchHeader = rmp_serde::from_slice(&frame).unwrap();
    assert_eq!((header.kind.as_str(), header.count), ("BATCH", 3));
    assert_eq!(decode_frame(&frame).unwrap(), sent[..3]);
    drop(client);
    server.stop().await.unwrap();
}

/// The server's one connection, once its task has written a first message and let the socket go
/// (the socket is the task's until then).
async fn idle_connection(server: &TestServer) -> (common::WsClient, Arc<ConnectionHandle>) {
    let mut client = server.ws().await;
    let handle = only_connection(server);
    assert!(handle.try_send(OutboundMessage::Binary(Bytes::from_static(b"first"))));
    assert_eq!(next_frame(&mut client).await.as_ref(), b"first");
    (client, handle)
}

// The test runtime is single-threaded: between `try_send` and the check of the queue, the
// connection's task cannot run, so a message not queued was written by `try_send` itself.
#[tokio::test]
async fn a_message_to_an_idle_connection_is_written_by_its_sender() {
    let server = TestServer::start(test_config()).await;
    let (mut client, handle) = idle_connection(&server).await;
    for i in 0..5_u8 {
        assert!(handle.try_send(OutboundMessage::Binary(Bytes::from(vec![i]))));
        assert_eq!(handle.queued(), 0, "written at once, not queued");
        assert_eq!(next_frame(&mut client).await.as_ref(), [i], "each message in its own frame");
    }
    drop(client);
    server.stop().await.unwrap();
}

// A message larger than the kernel takes at once: its sender writes the start, the task the
// rest, and what is sent meanwhile waits behind it.
#[tokio::test]
async fn a_message_the_kernel_takes_in_part_is_finished_before_the_next() {
    let server = TestServer::start(test_config()).await;
    let (mut client, handle) = idle_connection(&server).await;
    let large: Bytes =
        (0..8 * 1024 * 1024_u32).map(|i| u8::try_from(i % 251).unwrap()).collect::<Vec<_>>().into();
    assert!(handle.try_send(OutboundMessage::Binary(large.clone())));
    assert!(handle.queued() > 0, "the rest of the frame is left to the task");
    for i in 0..3_u8 {
        assert!(handle.try_send(OutboundMessage::Binary(Bytes::from(vec![i]))));
    }
    let (received, _frames) = next_messages(&mut client, 4).await;
    assert_eq!(received.len(), 4);
    assert!(received[0] == large, "the large message arrives whole");
    assert_eq!(received[1..], [Bytes::from(vec![0]), Bytes::from(vec![1]), Bytes::from(vec![2])]);
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn outbound_close_sends_a_close_frame_with_the_reason_after_queued_messages() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.ws().await;
    let handle = only_connection(&server);
    handle.try_send(OutboundMessage::Binary(Bytes::from_static(b"last words")));
    handle.try_send(OutboundMessage::Close(Some("session revoked".into())));

    assert_eq!(next_frame(&mut client).await.as_ref(), b"last words");
    let close = expect_close(&mut client).await;
    assert_eq!(close.code, CloseCode::Normal);
    assert_eq!(close.reason.as_str(), "session revoked");
    server.until_connections(0, "connection removed").await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn text_frames_are_refused_with_close_1003() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.ws().await;
    let mut bystander = server.ws().await;
    client.send(Message::text("{\"json\":true}")).await.unwrap();
    let close = expect_close(&mut client).await;
    assert_eq!(close.code, CloseCode::Unsupported);
    assert!(close.reason.contains("binary"), "{}", close.reason);
    server.until_connections(1, "offender removed").await;

    server.registry.broadcast(vec![7_u8], ConnectionKind::Client);
    assert_eq!(next_frame(&mut bystander).await.as_ref(), [7], "other clients are untouched");
    drop(bystander);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac15_broadcast_reaches_every_websocket_client() {
    let server = TestServer::start(test_config()).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(server.ws().await);
    }
    let outcome = server.registry.broadcast(b"news".to_vec(), ConnectionKind::Client);
    assert_eq!((outcome.queued, outcome.dropped), (5, 0));
    for client in &mut clients {
        assert_eq!(next_frame(client).await.as_ref(), b"news");
    }
    drop(clients);
    server.stop().await.unwrap();
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl InboundHandler for Recorder {
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        self.events.lock().unwrap().push(format!("connect {}", conn.id));
    }
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        self.events.lock().unwrap().push(format!("message {} {payload:?}", conn.id));
        assert!(payload.as_ref() != b"boom", "handler bug");
    }
    async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>) {
        self.events.lock().unwrap().push(format!("disconnect {}", conn.id));
    }
}

#[tokio::test]
async fn the_handler_sees_connect_messages_and_one_disconnect() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::with_handler(test_config(), Arc::clone(&recorder)).await;
    let mut client = server.ws().await;
    let id = only_connection(&server).id;
    send_binary(&mut client, b"hi".to_vec()).await;
    client.close(None).await.unwrap();
    server.until_connections(0, "connection removed").await;
    eventually("disconnect recorded", || recorder.events.lock().unwrap().len() == 3).await;
    assert_eq!(
        *recorder.events.lock().unwrap(),
        [format!("connect {id}"), format!("message {id} b\"hi\""), format!("disconnect {id}")]
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_panicking_message_handler_closes_only_that_connection_with_1011() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::with_handler(test_config(), Arc::clone(&recorder)).await;
    let mut victim = server.ws().await;
    let mut bystander = server.ws().await;
    send_binary(&mut victim, b"boom".to_vec()).await;
    let close = expect_close(&mut victim).await;
    assert_eq!(close.code, CloseCode::Error);
    server.until_connections(1, "victim removed").await;
    assert_eq!(server.controller.in_flight_count(), 0);
    server.registry.broadcast(b"still here".to_vec(), ConnectionKind::Client);
    assert_eq!(next_frame(&mut bystander).await.as_ref(), b"still here");
    assert_eq!(panics(&server, "handler").await, "1", "counted once");
    assert_eq!(panics(&server, "transport").await, "0");
    drop(bystander);
    server.stop().await.unwrap();
}

/// `topgun_panics_total` for `source`, as `/metrics` shows it.
async fn panics(server: &TestServer, source: &str) -> String {
    let metrics = server.http().get(server.url("/metrics")).send().await.unwrap();
    common::sample(&metrics.text().await.unwrap(), "topgun_panics_total", &[("source", source)])
}

/// Panics in `on_connect` for every second connection.
struct PanicsOnEveryOtherConnect;

#[async_trait::async_trait]
impl InboundHandler for PanicsOnEveryOtherConnect {
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        assert!(conn.id.0 % 2 == 1, "handler bug");
    }
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        conn.try_send(OutboundMessage::Binary(payload));
    }
}

#[tokio::test]
async fn a_panicking_connect_handler_closes_that_connection_with_1011() {
    let server = TestServer::with_handler(test_config(), PanicsOnEveryOtherConnect).await;
    let mut bystander = server.ws().await;
    let mut victim = server.ws().await;
    assert_eq!(expect_close(&mut victim).await.code, CloseCode::Error);
    server.until_connections(1, "victim removed").await;
    assert_eq!(panics(&server, "handler").await, "1");
    send_binary(&mut bystander, b"echo".to_vec()).await;
    assert_eq!(next_frame(&mut bystander).await.as_ref(), b"echo");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connect_disconnect_cycles_leave_no_connection_and_no_task() {
    let server = TestServer::start(test_config()).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let url = server.ws_url();
    let workers: Vec<_> = (0..10)
        .map(|worker| {
            let url = url.clone();
            tokio::spawn(async move {
                for cycle in 0..100 {
                    let mut client = connect_ws(&url).await;
                    // Half close politely, half just vanish.
                    if (worker + cycle) % 2 == 0 {
                        client.close(None).await.unwrap();
                        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut client).await {}
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    server.until_connections(0, "every connection removed").await;
    eventually("every connection task ended", || metrics.num_alive_tasks() <= baseline).await;
    assert_eq!(server.registry.count_by_kind(ConnectionKind::Client), 0);
    server.stop().await.unwrap();
}

/// Holds `on_message` until released.
#[derive(Default)]
struct Stalled {
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl InboundHandler for Stalled {
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {
        self.release.notified().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_is_one_task_and_a_busy_handler_does_not_hold_back_its_messages() {
    let stalled = Arc::new(Stalled::default());
    let server = TestServer::with_handler(test_config(), Arc::clone(&stalled)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(server.ws().await);
    }
    // At most one task each, and the server's one clock that wakes them for pings (a reader
    // and a writer task per connection would be ten).
    eventually("one task per connection, nothing else left running", || {
        metrics.num_alive_tasks() <= baseline + 5 + 1
    })
    .await;

    // The handler is stuck on this client's message; what the server sends it still arrives.
    send_binary(&mut clients[0], &b"hold"[..]).await;
    let outcome = server.registry.broadcast(&b"news"[..], ConnectionKind::Client);
    assert_eq!(outcome.queued, 5);
    for client in &mut clients {
        assert_eq!(next_frame(client).await, Bytes::from_static(b"news"));
    }
    stalled.release.notify_one();
    drop(clients);
    server.until_connections(0, "all gone").await;
    // With no connection left, the clock stops too.
    eventually("no task left once the connections are gone", || {
        metrics.num_alive_tasks() <= baseline
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn upgrades_are_refused_with_503_while_draining() {
    let config = topgun_server::network::NetworkConfig {
        shutdown: topgun_server::network::ShutdownConfig {
            grace_period: std::time::Duration::from_secs(5),
            ..Default::default()
        },
        ..test_config()
    };
    let server = TestServer::start(config).await;
    server.controller.trigger_shutdown();
    let err = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err}");
    };
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn the_root_path_is_the_websocket_endpoint_too() {
    let server = TestServer::with_handler(test_config(), EchoHandler).await;
    // TopGun's documented serverUrl is the bare `ws://host:port`.
    let mut client = connect_ws(&format!("ws://{}", server.addr)).await;
    server.until_connections(1, "registered").await;
    send_binary(&mut client, &b"\x81\xa4type\xa2OP"[..]).await;
    assert_eq!(next_frame(&mut client).await, Bytes::from_static(b"\x81\xa4type\xa2OP"));

    // A plain GET / (a person, a probe) is told where things are.
    let response = common::http().get(server.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["websocket"], serde_json::json!(["/", "/ws"]));
    // An upgrade attempt gone wrong gets axum's answer, as at /ws.
    let broken = common::http()
        .get(server.url("/"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status(), 400, "no Sec-WebSocket-Key");

    let metrics = common::http().get(server.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    let upgrades = [("route", "/"), ("status", "101")];
    assert_eq!(common::sample(&metrics, "topgun_http_requests_total", &upgrades), "1");
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn messages_up_to_the_size_limit_arrive_in_both_directions() {
    let server = TestServer::with_handler(test_config(), EchoHandler).await;
    let mut client = server.ws().await;
    let limit = topgun_server::network::ConnectionConfig::default().max_message_size;
    for size in [600 * 1024, 1024 * 1024, 2 * 1024 * 1024, limit] {
        let payload =
            Bytes::from((0..size).map(|i| u8::try_from(i % 251).unwrap()).collect::<Vec<_>>());
        send_binary(&mut client, payload.clone()).await;
        let echoed = next_frame(&mut client).await;
        assert!(echoed == payload, "{size} bytes came back changed ({} bytes)", echoed.len());
    }
    assert_eq!(server.registry.count(), 1, "still connected");
    drop(client);
    server.stop().await.unwrap();
}

/// Echoes binary and text, each as it came.
struct TextEcho;

#[async_trait::async_trait]
impl InboundHandler for TextEcho {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        conn.try_send(OutboundMessage::Binary(payload));
    }

    async fn on_text(&self, conn: &Arc<ConnectionHandle>, text: topgun_server::network::Utf8Bytes) {
        conn.try_send(OutboundMessage::Text(text));
    }
}

#[tokio::test]
async fn a_handler_that_takes_text_receives_it_in_order_and_answers_in_text() {
    let server = TestServer::with_handler(test_config(), TextEcho).await;
    let mut client = server.ws().await;
    client.send(Message::Binary(Bytes::from_static(b"first"))).await.unwrap();
    client.send(Message::Text("h\u{e9}llo, \u{4e16}\u{754c}".into())).await.unwrap();
    client.send(Message::Binary(Bytes::from_static(b"last"))).await.unwrap();
    let mut received = Vec::new();
    while received.len() < 3 {
        let message =
            tokio::time::timeout(common::DEADLINE, futures_util::StreamExt::next(&mut client))
                .await
                .expect("in time")
                .expect("open")
                .expect("read");
        match message {
            Message::Binary(frame) => {
                received
                    .extend(decode_frame(&frame).unwrap().into_iter().map(|m| format!("{m:?}")));
            }
            Message::Text(text) => received.push(text.to_string()),
            _ => {}
        }
    }
    assert_eq!(received, ["b\"first\"", "h\u{e9}llo, \u{4e16}\u{754c}", "b\"last\""]);
    drop(client);
    server.stop().await.unwrap();
}
