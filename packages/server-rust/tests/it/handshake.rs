//! What TopGun's client relies on besides plain message flow: the application-level
//! heartbeat, priority frames, the order of a connection's first messages, authentication
//! gating, and a busy handler not making its client look dead.

use topgun_test_support as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{
    TestServer, eventually, expect_close, http, next_frame, next_messages, raw_close_code,
    raw_send_binary, raw_ws_client, read_until_eof, sample, send_binary, test_config,
};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use topgun_core::Principal;
use topgun_server::network::{
    ConnectionConfig, ConnectionHandle, ConnectionKind, Heartbeat, InboundHandler, NetworkConfig,
    OutboundMessage, StubHandler, close,
};

/// `{type:'PING', timestamp: 1796023824376}` exactly as TopGun's client serializer writes it.
pub(crate) const CLIENT_PING: &[u8] =
    b"\xde\x00\x02\xa4type\xa4PING\xa9timestamp\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00";

#[derive(Debug, Deserialize)]
struct Pong {
    #[serde(rename = "type")]
    kind: String,
    timestamp: u64,
    #[serde(rename = "serverTime")]
    server_time: u64,
}

fn assert_pong(frame: &[u8]) {
    let pong: Pong = rmp_serde::from_slice(frame).expect("a top-level PONG map");
    assert_eq!(pong.kind, "PONG");
    assert_eq!(pong.timestamp, 1_796_023_824_376, "the PING's timestamp, echoed");
    assert!(pong.server_time > 1_700_000_000_000, "serverTime in ms since the epoch");
}

#[tokio::test]
async fn the_clients_ping_gets_a_top_level_pong() {
    let server = TestServer::with_handler(test_config(), Heartbeat::new(StubHandler)).await;
    let mut client = server.ws().await;
    for _ in 0..3 {
        send_binary(&mut client, CLIENT_PING).await;
        assert_pong(&next_frame(&mut client).await);
    }
    drop(client);
    server.stop().await.unwrap();
}

/// Queues a backlog of `Binary` messages, then one priority message, all before the writer
/// can run (the test runtime has one thread and this code does not yield).
struct BacklogThenPriority;

#[async_trait::async_trait]
impl InboundHandler for BacklogThenPriority {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, _payload: Bytes) {
        for i in 0..200_u16 {
            assert!(conn.try_send(OutboundMessage::Binary(Bytes::from(i.to_be_bytes().to_vec()))));
        }
        conn.try_send_priority(Bytes::from_static(b"urgent")).unwrap();
    }
}

#[tokio::test]
async fn a_priority_message_goes_out_alone_ahead_of_the_backlog() {
    let server = TestServer::with_handler(test_config(), BacklogThenPriority).await;
    let mut client = server.ws().await;
    send_binary(&mut client, &b"go"[..]).await;
    assert_eq!(next_frame(&mut client).await, Bytes::from_static(b"urgent"), "first, unbatched");
    let (messages, frames) = next_messages(&mut client, 200).await;
    let expected: Vec<Bytes> =
        (0..200_u16).map(|i| Bytes::from(i.to_be_bytes().to_vec())).collect();
    assert_eq!(messages, expected, "the backlog follows, in order");
    assert!(frames < 200, "the backlog is still coalesced ({frames} frames)");
    drop(client);
    server.stop().await.unwrap();
}

/// Blocks `on_message` for `"slow"` until released, records the order of the messages it
/// handles, and answers each with `"done:<message>"`.
#[derive(Default)]
struct Gated {
    release: Notify,
    busy: AtomicBool,
    handled: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl InboundHandler for Gated {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        let text = String::from_utf8_lossy(&payload).into_owned();
        if text == "slow" {
            self.busy.store(true, Ordering::SeqCst);
            self.release.notified().await;
            self.busy.store(false, Ordering::SeqCst);
        }
        self.handled.lock().unwrap().push(text.clone());
        conn.try_send(OutboundMessage::Binary(format!("done:{text}").into()));
    }
}

#[tokio::test]
async fn a_ping_behind_a_slow_message_is_answered_while_the_handler_works() {
    let gated = Arc::new(Gated::default());
    let server = TestServer::with_handler(test_config(), Heartbeat::new(Arc::clone(&gated))).await;
    let mut client = server.ws().await;
    send_binary(&mut client, &b"slow"[..]).await;
    send_binary(&mut client, CLIENT_PING).await;
    send_binary(&mut client, &b"second"[..]).await;

    assert_pong(&next_frame(&mut client).await);
    assert!(gated.busy.load(Ordering::SeqCst), "answered while the handler was still busy");
    gated.release.notify_one();
    let (messages, _) = next_messages(&mut client, 2).await;
    assert_eq!(messages, [Bytes::from_static(b"done:slow"), Bytes::from_static(b"done:second")]);
    assert_eq!(*gated.handled.lock().unwrap(), ["slow", "second"], "order kept; no PING");
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_idle_timeout_does_not_run_while_the_handler_is_busy() {
    let config = NetworkConfig {
        connection: ConnectionConfig {
            ping_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(500),
            close_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        ..test_config()
    };
    let gated = Arc::new(Gated::default());
    let server = TestServer::with_handler(config, Arc::clone(&gated)).await;
    // A client that never answers pings and sends one message that keeps the handler busy.
    let mut silent = raw_ws_client(server.addr, None).await;
    raw_send_binary(&mut silent, b"slow").await;
    eventually("the handler is busy", || gated.busy.load(Ordering::SeqCst)).await;
    // Twelve pings span 1.2 s, over twice the idle timeout: unanswered, yet not closed.
    let mut pings = [0_u8; 24];
    tokio::time::timeout(common::DEADLINE, silent.read_exact(&mut pings)).await.unwrap().unwrap();
    assert!(pings.chunks(2).all(|ping| ping == [0x89, 0x00]), "only pings: {pings:02x?}");
    assert_eq!(server.registry.count(), 1, "still connected");

    gated.release.notify_one();
    // Once the handler is done, the client's silence counts again.
    let rest = read_until_eof(&mut silent).await;
    assert_eq!(raw_close_code(&rest), Some(1001));
    assert!(rest.windows(12).any(|w| w == b"idle timeout"));
    server.stop().await.unwrap();
}

/// Holds `on_connect` until released, then greets the client.
#[derive(Default)]
struct SlowGreeting {
    entered: Notify,
    release: Notify,
}

#[async_trait::async_trait]
impl InboundHandler for SlowGreeting {
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        self.entered.notify_one();
        self.release.notified().await;
        conn.try_send(OutboundMessage::Binary(Bytes::from_static(b"AUTH_REQUIRED")));
    }

    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {}
}

#[tokio::test]
async fn no_broadcast_reaches_a_connection_before_on_connect_has_run() {
    let greeting = Arc::new(SlowGreeting::default());
    let server = TestServer::with_handler(test_config(), Arc::clone(&greeting)).await;
    let mut client = server.ws().await;
    greeting.entered.notified().await;
    let early = server.registry.broadcast(&b"early"[..], ConnectionKind::Client);
    assert_eq!(early.queued, 0, "skipped while on_connect runs");
    greeting.release.notify_one();
    assert_eq!(next_frame(&mut client).await, Bytes::from_static(b"AUTH_REQUIRED"));
    let late = server.registry.broadcast(&b"late"[..], ConnectionKind::Client);
    assert_eq!(late.queued, 1);
    assert_eq!(next_frame(&mut client).await, Bytes::from_static(b"late"));
    drop(client);
    server.stop().await.unwrap();
}

/// `"AUTH"` authenticates the connection and is acknowledged (as a priority message).
struct Authenticator;

#[async_trait::async_trait]
impl InboundHandler for Authenticator {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        if payload == b"AUTH"[..] {
            conn.authenticate(Principal::new(format!("user-{}", conn.id), ["reader"])).await;
            conn.try_send_priority(Bytes::from_static(b"AUTH_ACK")).unwrap();
        }
    }
}

#[tokio::test]
async fn broadcasts_can_target_authenticated_connections_only() {
    let server = TestServer::with_handler(test_config(), Authenticator).await;
    let mut member = server.ws().await;
    let mut guest = server.ws().await;
    send_binary(&mut member, &b"AUTH"[..]).await;
    assert_eq!(next_frame(&mut member).await, Bytes::from_static(b"AUTH_ACK"));

    let outcome = server.registry.broadcast_to(&b"members"[..], |conn| {
        conn.kind == ConnectionKind::Client && conn.is_authenticated()
    });
    assert_eq!((outcome.queued, outcome.dropped), (1, 0));
    let everyone = server.registry.broadcast(&b"everyone"[..], ConnectionKind::Client);
    assert_eq!(everyone.queued, 2);
    let (to_member, _) = next_messages(&mut member, 2).await;
    assert_eq!(to_member, [Bytes::from_static(b"members"), Bytes::from_static(b"everyone")]);
    assert_eq!(next_frame(&mut guest).await, Bytes::from_static(b"everyone"), "nothing before");

    let authenticated: Vec<_> =
        server.registry.iter().filter(|conn| conn.is_authenticated()).collect();
    assert_eq!(authenticated.len(), 1);
    let metadata = authenticated[0].metadata.read().await;
    assert!(metadata.authenticated);
    assert_eq!(metadata.principal.as_ref().map(|p| p.roles.clone()), Some(vec!["reader".into()]));
    drop(metadata);
    drop((member, guest));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn auth_timeout_closes_connections_that_did_not_authenticate_in_time() {
    let config = NetworkConfig {
        connection: ConnectionConfig {
            auth_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        },
        ..test_config()
    };
    let server = TestServer::with_handler(config, Authenticator).await;
    let mut member = server.ws().await;
    send_binary(&mut member, &b"AUTH"[..]).await;
    assert_eq!(next_frame(&mut member).await, Bytes::from_static(b"AUTH_ACK"));
    // Connected after the member, so its deadline passes after the member's.
    let mut guest = server.ws().await;
    let frame = expect_close(&mut guest).await;
    assert_eq!(u16::from(frame.code), close::POLICY_VIOLATION);
    assert_eq!(frame.reason.as_str(), close::AUTH_TIMEOUT_REASON);
    server.until_connections(1, "the guest removed").await;
    assert!(server.registry.iter().all(|conn| conn.is_authenticated()), "the member stays");

    let metrics = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let closed = [("kind", "client"), ("reason", "auth_timeout")];
    assert_eq!(sample(&metrics, "topgun_connections_closed_total", &closed), "1");
    drop((member, guest));
    server.stop().await.unwrap();
}
