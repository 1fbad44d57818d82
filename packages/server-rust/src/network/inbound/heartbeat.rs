//! TopGun's application-level heartbeat, answered in front of any [`InboundHandler`].
//!
//! TopGun's TypeScript client keeps its connection alive by itself: once connected it sends
//! `{type: 'PING', timestamp}` every 5 s and reconnects when no `PONG` has arrived for 15 s.
//! WebSocket ping/pong control frames play no part in it. It counts a `PONG` only when the
//! `PONG` is the top-level message of a frame, never inside a `BATCH`. [`Heartbeat`] wraps a
//! handler and answers every `PING` with
//! `{type: 'PONG', timestamp: <the PING's timestamp>, serverTime: <ms since the epoch>}` as an
//! priority message ([`ConnectionHandle::try_send_priority`]): a frame of its own, ahead of any
//! backlog. It answers
//! from [`InboundHandler::answer_inline`], so a `PING` is answered while the wrapped handler is
//! still busy with an earlier message. `PING`s never reach the wrapped handler; every other
//! message, event and `/sync` request does, unchanged.
//!
//! ```no_run
//! use topgun_server::network::{Heartbeat, NetworkConfig, NetworkModule, StubHandler};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let mut module = NetworkModule::new(NetworkConfig::default()).with_handler(Heartbeat::new(StubHandler));
//! module.start().await?;
//! module.serve(std::future::pending()).await
//! # }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use topgun_core::{SystemClock, WallClock};

use crate::network::connections::handle::ConnectionHandle;
use crate::network::inbound::{InboundHandler, SyncError, SyncRequest};

/// Answers TopGun's `PING` with a top-level `PONG` and passes everything else to `H`.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat<H> {
    inner: H,
}

impl<H> Heartbeat<H> {
    /// Wraps `inner`.
    pub fn new(inner: H) -> Self {
        Self { inner }
    }

    /// The wrapped handler.
    pub fn inner(&self) -> &H {
        &self.inner
    }
}

/// The largest map a `PING` can be: anything bigger is not looked into.
const MAX_PING_FIELDS: u32 = 4;

#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
}

#[derive(Deserialize)]
struct PingTimestamp {
    #[serde(deserialize_with = "topgun_core::number::deserialize_u64")]
    timestamp: u64,
}

#[derive(Serialize)]
struct Pong {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    #[serde(rename = "serverTime")]
    server_time: u64,
}

/// A `PING` as received.
#[derive(Debug, PartialEq, Eq)]
struct Ping {
    /// `None` when missing or not a whole number of milliseconds.
    timestamp: Option<u64>,
}

/// The `PING` in `payload`, if it is one. Looks only at small maps, so ordinary traffic costs
/// a one-byte check.
fn parse_ping(payload: &[u8]) -> Option<Ping> {
    let mut header = payload;
    let fields = rmp::decode::read_map_len(&mut header).ok()?;
    if fields == 0 || fields > MAX_PING_FIELDS {
        return None;
    }
    let Kind { kind } = rmp_serde::from_slice(payload).ok()?;
    if kind != "PING" {
        return None;
    }
    let timestamp = rmp_serde::from_slice::<PingTimestamp>(payload).ok().map(|p| p.timestamp);
    Some(Ping { timestamp })
}

/// The `PONG` for a `PING` carrying `timestamp`.
fn pong(timestamp: Option<u64>) -> Bytes {
    let pong = Pong { kind: "PONG", timestamp, server_time: SystemClock.now_millis() };
    rmp_serde::to_vec_named(&pong).expect("a PONG always encodes").into()
}

/// Answers `payload` if it is a `PING`; `true` when it was one.
fn answer_ping(conn: &ConnectionHandle, payload: &[u8]) -> bool {
    let Some(ping) = parse_ping(payload) else { return false };
    if conn.try_send_priority(pong(ping.timestamp)).is_err() {
        tracing::debug!(conn_id = %conn.id, "PONG not queued: the connection is closed or its priority queue is full");
    }
    true
}

#[async_trait]
impl<H: InboundHandler> InboundHandler for Heartbeat<H> {
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        self.inner.on_connect(conn).await;
    }

    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        if !answer_ping(conn, &payload) {
            self.inner.on_message(conn, payload).await;
        }
    }

    async fn on_text(&self, conn: &Arc<ConnectionHandle>, text: Utf8Bytes) {
        self.inner.on_text(conn, text).await;
    }

    fn answer_inline(&self, conn: &Arc<ConnectionHandle>, payload: &Bytes) -> bool {
        answer_ping(conn, payload) || self.inner.answer_inline(conn, payload)
    }

    async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>) {
        self.inner.on_disconnect(conn).await;
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        self.inner.on_http_sync(body).await
    }

    async fn on_http_sync_request(&self, request: SyncRequest) -> Result<Bytes, SyncError> {
        self.inner.on_http_sync_request(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry};

    /// `{type:'PING', timestamp: 1796023824376}` exactly as TopGun's client serializer writes it.
    const CLIENT_PING: &[u8] =
        b"\xde\x00\x02\xa4type\xa4PING\xa9timestamp\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00";

    #[derive(Deserialize, Debug, PartialEq)]
    struct DecodedPong {
        #[serde(rename = "type")]
        kind: String,
        timestamp: Option<u64>,
        #[serde(rename = "serverTime")]
        server_time: u64,
    }

    #[test]
    fn the_clients_ping_is_recognised_with_its_timestamp() {
        assert_eq!(parse_ping(CLIENT_PING), Some(Ping { timestamp: Some(1_796_023_824_376) }));
        let fractional =
            rmp_serde::to_vec_named(&serde_json::json!({"type": "PING", "timestamp": 1.5}))
                .unwrap();
        assert_eq!(
            parse_ping(&fractional),
            Some(Ping { timestamp: None }),
            "still a PING, without a usable timestamp"
        );
        let other =
            rmp_serde::to_vec_named(&serde_json::json!({"type": "OP", "timestamp": 1})).unwrap();
        assert_eq!(parse_ping(&other), None);
        assert_eq!(parse_ping(b"\x90"), None, "an array is not a PING");
        assert_eq!(parse_ping(b""), None);
        let big = rmp_serde::to_vec_named(
            &serde_json::json!({"type": "PING", "a": 1, "b": 2, "c": 3, "d": 4}),
        )
        .unwrap();
        assert_eq!(parse_ping(&big), None, "maps over four fields are not looked into");
    }

    #[test]
    fn a_ping_is_answered_with_a_priority_pong_and_not_passed_on() {
        let registry = ConnectionRegistry::new();
        let (conn, queue) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let heartbeat = Heartbeat::new(crate::network::StubHandler);
        assert!(heartbeat.answer_inline(&conn, &Bytes::from_static(CLIENT_PING)));
        assert!(queue.is_empty(), "the PONG does not go through the batched queue");
        let pong = conn.queue().take_priority().expect("a PONG is waiting");
        let pong: DecodedPong = rmp_serde::from_slice(&pong).unwrap();
        assert_eq!(pong.kind, "PONG");
        assert_eq!(pong.timestamp, Some(1_796_023_824_376));
        assert!(pong.server_time > 1_700_000_000_000);
        assert!(!heartbeat.answer_inline(&conn, &Bytes::from_static(b"\x81\xa4type\xa2OP")));
    }
}
