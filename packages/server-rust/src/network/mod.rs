//! The HTTP + WebSocket transport. Every public item is re-exported here, its one path;
//! `docs/ARCHITECTURE.md` in the repository follows a message, a broadcast and a shutdown
//! through these files.
//!
//! The rooms, in the order data flows through them:
//!
//! | room | concern |
//! |---|---|
//! | `config` | [`NetworkConfig`] and its parts, with defaults and validation |
//! | `connection` | [`ConnectionId`], [`ConnectionKind`], [`ConnectionMetadata`], [`SendError`], [`DisconnectReason`] |
//! | `edge/` | the front door, before a handler: `tls`, `proxy_protocol`, `client_addr` ([`ClientAddr`]), `rate_limit`, `admission` (origin, per-address cap) |
//! | `middleware` | the HTTP middleware stack |
//! | `routes`, `handlers/` | the route table; one axum handler per route, and [`AppState`] |
//! | `engine/` | one WebSocket connection's lifecycle: `socket` (framing) → `reader` → handler; queue → `writer` → socket; `batch` (`BATCH` frames), `deflate` (permessage-deflate, [`DeflateConfig`]), `direct` (senders writing to an idle socket), `clock` |
//! | `inbound/` | [`InboundHandler`]: where decoded traffic leaves the transport; [`Heartbeat`] answers TopGun's `PING` in front of it |
//! | `connections/` | who is connected and how to reach them: [`ConnectionHandle`] (`handle`), its queue (`channel`, `queue`), [`ConnectionRegistry`] (`registry`), [`Topics`] (`topics`), delivery to many (`fanout`), [`DisconnectListener`]s (`events`) |
//! | `shutdown` | [`HealthState`] and [`ShutdownController`] |
//! | `metrics/` | Prometheus metrics, `GET /metrics`, the layer timing HTTP requests |
//! | [`close`] | the WebSocket close codes the server sends |
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
