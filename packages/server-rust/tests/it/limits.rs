//! Liveness, slow consumers and input limits: each misbehaviour gets a clear answer and no
//! other connection notices.

use topgun_test_support as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    DEADLINE, EchoHandler, TestServer, WsClient, eventually, expect_close, http, msgpack,
    next_messages, post_sync, raw_close_code, raw_ws_client, read_until_eof, resident_bytes,
    send_binary, test_config,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use topgun_server::network::{
    ConnectionConfig, ConnectionHandle, ConnectionKind, ConnectionRegistry, InboundHandler,
    NetworkConfig, OutboundMessage, SendError, ShutdownConfig, SyncError,
};

fn with_connection(connection: ConnectionConfig) -> NetworkConfig {
    NetworkConfig { connection, ..test_config() }
}

fn fast_liveness() -> NetworkConfig {
    with_connection(ConnectionConfig {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(800),
        close_timeout: Duration::from_millis(300),
        ..Default::default()
    })
}

// ---- liveness -------------------------------------------------------------------------

#[tokio::test]
async fn idle_timeout_closes_a_client_that_never_answers_pings() {
    let server = TestServer::start(fast_liveness()).await;
    let mut silent = raw_ws_client(server.addr, None).await;
    server.until_connections(1, "registered").await;
    let opened = Instant::now();

    let received = read_until_eof(&mut silent).await;
    assert!(opened.elapsed() >= Duration::from_millis(800), "closed before the idle timeout");
    assert!(received.starts_with(&[0x89, 0x00]), "the server pinged first");
    assert_eq!(raw_close_code(&received), Some(1001));
    assert!(received.windows(12).any(|w| w == b"idle timeout"), "reason is sent");
    server.until_connections(0, "removed").await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_quiet_client_that_answers_pings_is_not_closed() {
    let server = TestServer::start(fast_liveness()).await;
    let mut quiet = server.ws().await;
    let id = server.registry.iter().next().unwrap().id;
    // Sixteen pings span 1.6 s, twice the 800 ms idle timeout; each is answered automatically.
    let mut pings = 0;
    while pings < 16 {
        match tokio::time::timeout(DEADLINE, quiet.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    assert_eq!(server.registry.iter().map(|c| c.id).collect::<Vec<_>>(), [id], "still connected");
    let handle = server.registry.get(id).unwrap();
    assert!(handle.last_activity().elapsed() < Duration::from_millis(800));
    let heartbeat = handle.metadata.read().await.last_heartbeat;
    assert!(
        heartbeat.elapsed() < Duration::from_millis(800),
        "metadata.last_heartbeat follows pongs"
    );
    drop(quiet);
    server.stop().await.unwrap();
}

// ---- slow consumers -------------------------------------------------------------------

#[tokio::test]
async fn a_socket_write_blocked_past_send_timeout_closes_the_connection() {
    let server = TestServer::start(with_connection(ConnectionConfig {
        send_timeout: Duration::from_millis(300),
        ..Default::default()
    }))
    .await;
    let mut stalled = raw_ws_client(server.addr, Some(4096)).await;
    let registry = Arc::clone(&server.registry);
    server.until_connections(1, "registered").await;
    let handle = registry.iter().next().unwrap();
    let chunk = Bytes::from(vec![0x42; 60 * 1024]);
    // 256 x 60 KiB is far more than the kernel buffers of a reader that never reads.
    while handle.try_send(OutboundMessage::Binary(chunk.clone())) {}

    server.until_connections(0, "stalled connection dropped").await;
    assert!(!handle.is_connected());
    read_until_eof(&mut stalled).await;
    server.stop().await.unwrap();
}

fn sequence_payload(seq: u32) -> Bytes {
    sized_sequence_payload(seq, 1024)
}

fn sized_sequence_payload(seq: u32, size: usize) -> Bytes {
    let mut payload = vec![0_u8; size];
    payload[..4].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(payload)
}

/// Reads until `count` messages have arrived, checking as it goes (without keeping them) that
/// they are the sequence 0..count in order.
async fn expect_sequence(mut ws: WsClient, count: u32) {
    let mut expected = 0_u32;
    while expected < count {
        let frame = common::next_frame(&mut ws).await;
        for message in topgun_server::network::decode_frame(&frame).unwrap() {
            assert_eq!(message[..4], expected.to_be_bytes(), "out of order or missing");
            expected += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stalled_client_among_a_hundred_is_closed_and_the_rest_get_everything() {
    const BROADCASTS: u32 = 10_000;
    let server = TestServer::start(with_connection(ConnectionConfig {
        send_timeout: Duration::from_secs(1),
        ..Default::default()
    }))
    .await;
    let _stalled = raw_ws_client(server.addr, Some(4096)).await;
    let registry = Arc::clone(&server.registry);
    server.until_connections(1, "stalled registered").await;
    let stalled_id = registry.iter().next().unwrap().id;
    let mut readers = Vec::new();
    for _ in 0..99 {
        readers.push(tokio::spawn(expect_sequence(server.ws().await, BROADCASTS)));
    }
    let healthy: Vec<Arc<ConnectionHandle>> =
        registry.iter().filter(|c| c.id != stalled_id).collect();
    let rss_before = resident_bytes("VmRSS");

    // A well-behaved producer: bursts of 100, then it lets healthy queues drain. The stalled
    // client's queue never drains, so it overflows.
    for seq in 0..BROADCASTS {
        registry.broadcast(sequence_payload(seq), ConnectionKind::Client);
        if seq % 100 == 99 {
            eventually("healthy queues drained", || healthy.iter().all(|c| c.queued() == 0)).await;
        }
    }
    for reader in readers {
        tokio::time::timeout(DEADLINE, reader).await.expect("readers finish").unwrap();
    }
    eventually("stalled client closed", || registry.get(stalled_id).is_none()).await;
    assert!(healthy.iter().all(|c| c.dropped_messages() == 0), "no healthy client missed anything");
    let growth = resident_bytes("VmHWM").saturating_sub(rss_before);
    eprintln!("peak resident memory growth (server and 99 clients): {} KiB", growth / 1024);
    assert!(growth < 200 * 1024 * 1024, "memory peaked {growth} bytes above the start");
    drop(healthy);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_cost_a_cooperative_broadcaster_one_bounded_wait() {
    const BROADCASTS: u32 = 1_000;
    // Stalled clients that stay connected for the whole test: nothing evicts them.
    let config = with_connection(ConnectionConfig {
        send_timeout: Duration::from_secs(120),
        max_consecutive_drops: u32::MAX,
        ..Default::default()
    });
    let server = TestServer::start(NetworkConfig {
        shutdown: ShutdownConfig {
            drain_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        ..config
    })
    .await;
    // Two stalled among twenty: more than broadcast_cooperative tolerates (1 % plus one).
    let _stalled = [
        raw_ws_client(server.addr, Some(4096)).await,
        raw_ws_client(server.addr, Some(4096)).await,
    ];
    let registry = Arc::clone(&server.registry);
    server.until_connections(2, "stalled pair registered").await;
    let stalled: Vec<_> = registry.iter().map(|c| c.id).collect();
    let mut readers = Vec::new();
    for _ in 0..18 {
        readers.push(tokio::spawn(expect_sequence(server.ws().await, BROADCASTS)));
    }
    server.until_connections(20, "twenty registered").await;

    // 16 MiB in all: far more than the kernel buffers of a client that does not read.
    let started = Instant::now();
    for seq in 0..BROADCASTS {
        let payload = sized_sequence_payload(seq, 16 * 1024);
        registry.broadcast_cooperative(payload, ConnectionKind::Client).await;
    }
    let took = started.elapsed();
    // Waiting the longest for the stalled pair on every broadcast would take 250 s.
    let every_time = ConnectionRegistry::COOPERATIVE_MAX_WAIT * BROADCASTS;
    assert!(took < every_time / 10, "{BROADCASTS} broadcasts took {took:?}");
    for reader in readers {
        tokio::time::timeout(DEADLINE, reader).await.expect("readers finish").unwrap();
    }
    assert!(stalled.iter().all(|id| registry.get(*id).is_some()), "the stalled pair stayed");
    server.stop().await.unwrap();
}

// ---- message size and type ------------------------------------------------------------

#[tokio::test]
async fn an_oversized_message_closes_with_1009_and_names_the_limit() {
    let server = TestServer::with_handler(
        with_connection(ConnectionConfig {
            max_message_size: 1024,
            max_frame_size: 1024,
            ..Default::default()
        }),
        EchoHandler,
    )
    .await;
    let mut offender = server.ws().await;
    let mut bystander = server.ws().await;
    send_binary(&mut offender, vec![0xc4; 2048]).await;
    let close = expect_close(&mut offender).await;
    assert_eq!(u16::from(close.code), 1009);
    assert!(close.reason.contains("1024"), "{}", close.reason);

    send_binary(&mut bystander, vec![0x01; 1000]).await;
    let (echo, _) = next_messages(&mut bystander, 1).await;
    assert_eq!(echo[0].len(), 1000, "a message under the limit is fine, on another connection");
    drop(bystander);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let server = TestServer::start(with_connection(ConnectionConfig {
        max_message_size: 64 * 1024,
        max_frame_size: 512,
        ..Default::default()
    }))
    .await;
    let mut offender = server.ws().await;
    send_binary(&mut offender, vec![0xc4; 600]).await;
    assert_eq!(u16::from(expect_close(&mut offender).await.code), 1009);
    server.stop().await.unwrap();
}

/// Offers a message one byte over the outbound limit, records why it was refused, then
/// sends `"after"`.
#[derive(Default)]
struct Oversender {
    refused: std::sync::Mutex<Option<SendError>>,
}

#[async_trait::async_trait]
impl InboundHandler for Oversender {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, _payload: Bytes) {
        let result = conn.try_enqueue(OutboundMessage::Binary(vec![0xc4; 1025].into()));
        *self.refused.lock().unwrap() = result.err();
        conn.try_send(OutboundMessage::Binary(Bytes::from_static(b"after")));
    }
}

#[tokio::test]
async fn an_outbound_message_over_the_limit_is_refused_and_counted_not_sent() {
    let oversender = Arc::new(Oversender::default());
    let config =
        with_connection(ConnectionConfig { max_outbound_message_size: 1024, ..Default::default() });
    let server = TestServer::with_handler(config, Arc::clone(&oversender)).await;
    let mut client = server.ws().await;
    send_binary(&mut client, &b"go"[..]).await;
    let (messages, _) = next_messages(&mut client, 1).await;
    assert_eq!(messages, [Bytes::from_static(b"after")], "the connection carries on");
    assert_eq!(
        *oversender.refused.lock().unwrap(),
        Some(SendError::TooLarge { size: 1025, limit: 1024 })
    );
    assert_eq!(server.registry.dropped_messages_total(), 1);
    let metrics = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(common::sample(&metrics, "topgun_outbound_dropped_messages_total", &[]), "1");
    drop(client);
    server.stop().await.unwrap();
}

// ---- connection cap -------------------------------------------------------------------

#[tokio::test]
async fn max_connections_refuses_upgrades_with_503_and_retry_after() {
    let config = NetworkConfig { max_connections: 3, ..test_config() };
    let server = TestServer::with_handler(config, EchoHandler).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(server.ws().await);
    }
    let err = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(refused) = err else {
        panic!("expected 503: {err}")
    };
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");

    for ws in &mut open {
        send_binary(ws, b"still served".to_vec()).await;
        assert_eq!(next_messages(ws, 1).await.0[0].as_ref(), b"still served");
    }
    drop(open.pop());
    server.until_connections(2, "slot freed").await;
    let again = server.ws().await;
    drop((open, again));
    server.stop().await.unwrap();
}

// ---- HTTP -----------------------------------------------------------------------------

/// Counts `/sync` calls so a test can show invalid requests never reach the handler.
#[derive(Default)]
struct CountingSync(AtomicUsize);

#[async_trait::async_trait]
impl InboundHandler for CountingSync {
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {}

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        if body.as_ref() == msgpack(&"slow") {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Ok(body)
    }
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn sync_rejects_bad_bodies_before_the_handler_sees_them() {
    let handler = Arc::new(CountingSync::default());
    let config = NetworkConfig {
        max_sync_body_bytes: 1024,
        request_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let server = TestServer::with_handler(config, Arc::clone(&handler)).await;
    let client = http();
    let url = || server.url("/sync");

    let too_big =
        post_sync(&client, url(), &serde_bytes::ByteBuf::from(vec![0; 2048])).send().await.unwrap();
    assert_eq!(too_big.status(), 413);

    let json = client
        .post(url())
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(json).await;
    assert_eq!(status, 415);
    assert!(body.contains("application/json") && body.contains("application/x-msgpack"), "{body}");

    let missing_type = client.post(url()).body(msgpack(&1)).send().await.unwrap();
    assert_eq!(missing_type.status(), 415);

    let malformed = client
        .post(url())
        .header("content-type", "application/msgpack")
        .body(vec![0x92, 0x01])
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(malformed).await;
    assert_eq!(status, 400);
    assert!(body.contains("not valid MsgPack"), "{body}");
    assert_eq!(handler.0.load(Ordering::SeqCst), 0, "the handler never saw invalid input");

    for content_type in [
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack; charset=binary",
        "application/octet-stream",
    ] {
        let ok = client
            .post(url())
            .header("content-type", content_type)
            .body(msgpack(&[1, 2]))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200, "{content_type}");
    }

    let slow = post_sync(&client, url(), &"slow").send().await.unwrap();
    assert_eq!(slow.status(), 408);
    assert!(slow.headers().contains_key("x-request-id"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_slowloris_client_is_dropped_at_the_header_read_timeout() {
    let config = NetworkConfig { header_read_timeout: Duration::from_millis(300), ..test_config() };
    let server = TestServer::start(config).await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n").await.unwrap();
    let started = Instant::now();
    // Dribble one header byte every 50 ms; the server must cut the connection anyway.
    let dropped = async {
        loop {
            if slow.write_all(b"x").await.is_err() {
                return;
            }
            let mut byte = [0_u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(50), slow.read(&mut byte)).await
            {
                return;
            }
        }
    };
    tokio::time::timeout(DEADLINE, dropped).await.expect("slowloris connection dropped");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "dropped after {took:?}"
    );
    let healthy = http().get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(healthy.status(), 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_to_ws_get_4xx_with_a_request_id() {
    let server = TestServer::start(test_config()).await;
    let client = http();
    let plain = client.get(server.url("/ws")).send().await.unwrap();
    let no_key = client
        .get(server.url("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    let wrong_method = client.post(server.url("/ws")).send().await.unwrap();
    for (response, status) in [(&plain, 400), (&no_key, 400), (&wrong_method, 405)] {
        assert_eq!(response.status(), status, "{}", response.url());
        assert!(response.headers().contains_key("x-request-id"));
    }
    let (_, reason) = error_of(plain).await;
    assert!(reason.to_lowercase().contains("upgrade"), "{reason}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_routes_are_404_json_with_a_request_id() {
    let server = TestServer::start(test_config()).await;
    let response = http().get(server.url("/v2/everything")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "error": "not found" }));
    server.stop().await.unwrap();
}

// ---- everything at once ----------------------------------------------------------------

/// One healthy client: sends `count` numbered messages and expects every echo, in order.
async fn healthy_echo_session(mut ws: WsClient, count: u32) {
    for seq in 0..count {
        send_binary(&mut ws, sequence_payload(seq)).await;
    }
    expect_sequence(ws, count).await;
}

/// One misbehaving request of each kind, `round` choosing which.
async fn misbehave(server_addr: std::net::SocketAddr, round: usize) {
    let client = http();
    let url = |path: &str| format!("http://{server_addr}{path}");
    match round % 8 {
        0 => {
            let mut ws = connect_retrying(server_addr).await;
            send_binary(&mut ws, vec![0xc4; 4096]).await;
            assert_eq!(u16::from(expect_close(&mut ws).await.code), 1009);
        }
        1 => {
            let mut ws = connect_retrying(server_addr).await;
            futures_util::SinkExt::send(&mut ws, Message::text("hello?")).await.unwrap();
            assert_eq!(u16::from(expect_close(&mut ws).await.code), 1003);
        }
        2 => {
            let big = post_sync(&client, url("/sync"), &serde_bytes::ByteBuf::from(vec![0; 4096]));
            assert_eq!(big.send().await.unwrap().status(), 413);
        }
        3 => {
            let json =
                client.post(url("/sync")).header("content-type", "application/json").body("[]");
            assert_eq!(json.send().await.unwrap().status(), 415);
        }
        4 => {
            let bad = client
                .post(url("/sync"))
                .header("content-type", "application/msgpack")
                .body(vec![0xc1]);
            assert_eq!(bad.send().await.unwrap().status(), 400);
        }
        5 => {
            let mut slow = tokio::net::TcpStream::connect(server_addr).await.unwrap();
            slow.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n").await.unwrap();
            read_until_eof_raw(&mut slow).await;
        }
        6 => {
            assert_eq!(client.get(url("/ws")).send().await.unwrap().status(), 400);
            assert_eq!(client.get(url("/nowhere")).send().await.unwrap().status(), 404);
        }
        _ => {
            // Over the connection cap or not, depending on timing: a 503 or a working socket.
            match tokio_tungstenite::connect_async(format!("ws://{server_addr}/ws")).await {
                Ok((ws, _)) => drop(ws),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), 503);
                }
                Err(err) => panic!("unexpected upgrade failure: {err}"),
            }
        }
    }
}

/// Connects like a well-behaved client: on 503 it backs off briefly and tries again.
async fn connect_retrying(server_addr: std::net::SocketAddr) -> WsClient {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio_tungstenite::connect_async(format!("ws://{server_addr}/ws")).await {
            Ok((ws, _)) => return ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(response))
                if response.status() == 503 =>
            {
                assert!(tokio::time::Instant::now() < deadline, "never got a connection slot");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("unexpected upgrade failure: {err}"),
        }
    }
}

async fn read_until_eof_raw(stream: &mut tokio::net::TcpStream) {
    let mut sink = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut sink))
        .await
        .expect("closed in time")
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrage_of_bad_input_leaves_healthy_connections_untouched() {
    const MESSAGES: u32 = 200;
    let config = NetworkConfig {
        max_connections: 105,
        max_sync_body_bytes: 1024,
        // Short enough that the slowloris round ends quickly, long enough that a well-formed
        // request is never cut off when the machine is busy (300 ms was, under CPU hogs).
        header_read_timeout: Duration::from_secs(2),
        connection: ConnectionConfig {
            max_message_size: 1024,
            max_frame_size: 1024,
            ..Default::default()
        },
        ..test_config()
    };
    let server = TestServer::with_handler(config, EchoHandler).await;
    let mut healthy = Vec::new();
    for _ in 0..100 {
        healthy.push(server.ws().await);
    }
    let sessions: Vec<_> =
        healthy.into_iter().map(|ws| tokio::spawn(healthy_echo_session(ws, MESSAGES))).collect();
    let barrage: Vec<_> =
        (0..80).map(|round| tokio::spawn(misbehave(server.addr, round))).collect();

    for attack in barrage {
        tokio::time::timeout(DEADLINE, attack)
            .await
            .expect("misbehaviour answered in time")
            .unwrap();
    }
    for session in sessions {
        tokio::time::timeout(DEADLINE, session).await.expect("healthy session completes").unwrap();
    }
    let ready = http().get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(server.controller.health_state(), topgun_server::network::HealthState::Ready);
    server.stop().await.unwrap();
}
