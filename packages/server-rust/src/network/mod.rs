//! The HTTP + WebSocket transport. Every public item is re-exported here, its one path;
//! `docs/ARCHITECTURE.md` in the repository follows a message, a broadcast and a shutdown
//! through these files.
//!
//! | file | concern |
//! |---|---|
//! | `config` | [`NetworkConfig`] and its parts, with defaults and validation |
//! | `connection` | [`ConnectionId`], [`ConnectionKind`], [`ConnectionMetadata`], [`SendError`], [`DisconnectReason`] |
//! | `handle` | [`ConnectionHandle`]: one live connection as the rest of the server sees it |
//! | `channel` | [`OutboundSender`] (`handle.tx`) and [`OutboundReceiver`]: the queue's ends, tokio-shaped, with drop accounting |
//! | `queue` | one connection's bounded outbound queue, [`OutboundMessage`]; who may write to the socket |
//! | `direct` | the accepted TCP stream shared with the queue's senders, which write to an idle connection themselves |
//! | `registry` | [`ConnectionRegistry`]: every live connection, broadcasts |
//! | `shutdown` | [`HealthState`] and [`ShutdownController`] |
//! | `inbound` | [`InboundHandler`]: where decoded traffic leaves the transport |
//! | `heartbeat` | [`Heartbeat`]: answers TopGun's application-level `PING` in front of a handler |
//! | `engine` | one WebSocket connection's lifecycle: `reader` (socket → handler), `writer` (queue → socket) |
//! | `deflate` | permessage-deflate: negotiation, pooled compression, bounded inflation ([`DeflateConfig`]) |
//! | `batch` | the `BATCH` frame envelope and the writer's frame builder |
//! | [`close`] | the WebSocket close codes the server sends |
//! | `client_addr` | [`ClientAddr`]: the client behind trusted proxies (`X-Forwarded-For`, `Forwarded`) |
//! | `admission` | who may open a WebSocket: origin, per-address cap; the throttled refusal log |
//! | `proxy_protocol` | PROXY protocol v1/v2: the client a TCP balancer names before the first byte |
//! | `rate_limit` | the per-address token bucket over HTTP requests and upgrades |
//! | `handlers` | one axum handler per route, and [`AppState`] |
//! | `middleware` | the HTTP middleware stack |
//! | `metrics` | Prometheus metrics and `GET /metrics` |
//! | `http_metrics` | the layer counting and timing HTTP requests |
//! | `tls` | loading and reloading certificates |
//! | `module` | [`NetworkModule`]: router, bind, serve, shutdown |

pub mod close;
mod config;
mod connection;
mod connections;
mod edge;
mod engine;
mod handlers;
mod inbound;
mod metrics;
mod middleware;
mod module;
mod routes;
mod shutdown;

/// A text message's payload, UTF-8 checked ([`InboundHandler::on_text`],
/// [`OutboundMessage::Text`]): axum's own.
pub use axum::extract::ws::Utf8Bytes;
pub use config::{
    ConfigError, ConnectionConfig, ForwardedHeader, MetricsConfig, NetworkConfig, RateLimitConfig,
    ShutdownConfig, TlsConfig,
};
pub use connection::{
    ConnectionId, ConnectionKind, ConnectionMetadata, DisconnectReason, SendError,
};
pub use connections::channel::{OutboundPermit, OutboundReceiver, OutboundSender};
pub use connections::events::DisconnectListener;
pub use connections::fanout::BroadcastOutcome;
pub use connections::handle::ConnectionHandle;
pub use connections::queue::OutboundMessage;
pub use connections::registry::ConnectionRegistry;
pub use connections::topics::{TopicError, Topics};
pub use edge::client_addr::{ClientAddr, ClientAddrLayer, ClientAddrService, resolve_client_ip};
pub use edge::proxy_protocol::read_proxy_header;
pub use edge::tls::{TlsError, TlsReloader};
pub use engine::batch::{
    BATCH_TYPE, BatchDecodeError, decode_frame, decode_frame_shared, encode_batch,
};
pub use engine::deflate::{DeflateConfig, InflateError, inflate_message};
pub use handlers::{
    ACCEPTED_SYNC_CONTENT_TYPES, AppState, HealthReport, MSGPACK_CONTENT_TYPE, UpgradeOffer,
    handle_socket, health_handler, http_sync_handler, liveness_handler, metrics_handler,
    readiness_handler, root_handler, ws_upgrade_handler,
};
pub use inbound::heartbeat::Heartbeat;
pub use inbound::{
    InboundHandler, READ_AHEAD_BYTES, READ_AHEAD_MESSAGES, StubHandler, SyncError, SyncRequest,
};
/// A network prefix in CIDR notation, for [`NetworkConfig::trusted_proxies`].
pub use ipnet::IpNet;
pub use metrics::TransportMetrics;
pub use middleware::{
    CompressWhen, CrossOriginLayer, HttpLayers, MIN_COMPRESSED_SIZE, REQUEST_ID_HEADER,
    build_http_layers,
};
pub use module::NetworkModule;
pub use shutdown::{HealthState, InFlightGuard, ShutdownController, shutdown_signal};
/// What [`OutboundReceiver::try_recv`] returns when nothing is received: tokio's own.
pub use tokio::sync::mpsc::error::TryRecvError;
