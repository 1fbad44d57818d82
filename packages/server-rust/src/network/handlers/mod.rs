//! The axum handlers behind each route, and the state they share.
//!
//! | route | handler |
//! |---|---|
//! | `GET /health` | [`health_handler`] |
//! | `GET /health/live` | [`liveness_handler`] |
//! | `GET /health/ready` | [`readiness_handler`] |
//! | `GET /` | [`root_handler`]: the WebSocket endpoint again, or a description of the routes |
//! | `GET /ws` | [`ws_upgrade_handler`] |
//! | `POST /sync` | [`http_sync_handler`] |
//! | `GET /metrics` | [`metrics_handler`] |

mod health;
mod http_sync;
mod metrics;
mod websocket;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

pub use health::{HealthReport, health_handler, liveness_handler, readiness_handler};
pub use http_sync::{ACCEPTED_SYNC_CONTENT_TYPES, MSGPACK_CONTENT_TYPE, http_sync_handler};
pub use metrics::metrics_handler;
pub use websocket::{UpgradeOffer, handle_socket, root_handler, ws_upgrade_handler};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use http::StatusCode;

use crate::network::config::NetworkConfig;
use crate::network::connections::registry::ConnectionRegistry;
use crate::network::engine::Shared;
use crate::network::inbound::{InboundHandler, json_error};
use crate::network::routes::Route;
use crate::network::shutdown::ShutdownController;

/// State shared by every handler (cheap to clone: all fields are shared pointers).
#[derive(Clone)]
pub struct AppState {
    /// Live connections.
    pub registry: Arc<ConnectionRegistry>,
    /// Health state, shutdown signal and in-flight work.
    pub shutdown: Arc<ShutdownController>,
    /// The configuration the server was built with.
    pub config: Arc<NetworkConfig>,
    /// When the server was built; `/health` reports uptime from it.
    pub start_time: Instant,
    /// Receives inbound messages, connection events and `/sync` bodies.
    pub handler: Arc<dyn InboundHandler>,
    /// One permit per allowed WebSocket connection (`max_connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// The transport's Prometheus metrics.
    pub metrics: Arc<crate::network::metrics::TransportMetrics>,
    /// Upgrade checks: origin, per-address cap, refusal log.
    pub(crate) admission: Arc<crate::network::edge::admission::Admission>,
    /// The parts above as the engine holds them, one pointer per connection.
    pub(crate) engine: Arc<Shared>,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("connections", &self.registry.count())
            .field("health", &self.shutdown.health_state())
            .field("config", &self.config)
            .field("start_time", &self.start_time)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The engine's view of this state: the one built with it, shared, unless a public field
    /// was replaced since (a router's state an embedder changed).
    pub(crate) fn engine(&self) -> Arc<Shared> {
        if self.engine_is_current() {
            return Arc::clone(&self.engine);
        }
        Arc::new(Shared::new(
            &self.registry,
            &self.shutdown,
            &self.config,
            &self.handler,
            &self.metrics,
            &self.admission,
        ))
    }

    /// Whether the engine view built with this state still holds its parts.
    fn engine_is_current(&self) -> bool {
        let engine = &self.engine;
        Arc::ptr_eq(&engine.registry, &self.registry)
            && Arc::ptr_eq(&engine.shutdown, &self.shutdown)
            && Arc::ptr_eq(&engine.config, &self.config)
            && Arc::ptr_eq(&engine.handler, &self.handler)
            && Arc::ptr_eq(&engine.metrics, &self.metrics)
            && Arc::ptr_eq(&engine.admission, &self.admission)
    }
}

/// The routes served on the main port (`/metrics` only when it is served there), with a JSON
/// `404` for anything else.
pub(crate) fn main_routes(config: &NetworkConfig) -> Router<AppState> {
    routes(config, main_port_routes(config))
}

/// The paths served on the main port.
pub(crate) fn main_paths(config: &NetworkConfig) -> impl Iterator<Item = &'static str> {
    main_port_routes(config).map(Route::path)
}

fn main_port_routes(config: &NetworkConfig) -> impl Iterator<Item = Route> {
    let metrics_here = config.metrics.enabled && config.metrics.listen.is_none();
    Route::ALL.into_iter().filter(move |r| *r != Route::Metrics || metrics_here)
}

/// The routes of the separate metrics listener.
pub(crate) fn metrics_routes(config: &NetworkConfig) -> Router<AppState> {
    routes(config, [Route::Metrics].into_iter())
}

fn routes(config: &NetworkConfig, which: impl Iterator<Item = Route>) -> Router<AppState> {
    which
        .fold(Router::new(), |router, route| router.route(route.path(), handler(route, config)))
        .fallback(not_found)
}

/// Unknown routes get a JSON body, like the other refusals this server writes itself.
async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not found")
}

/// The handler of `route`.
fn handler(route: Route, config: &NetworkConfig) -> MethodRouter<AppState> {
    match route {
        Route::Root => get(root_handler),
        Route::Health => get(health_handler),
        Route::Live => get(liveness_handler),
        Route::Ready => get(readiness_handler),
        Route::WebSocket => get(ws_upgrade_handler),
        Route::Sync => {
            post(http_sync_handler).layer(DefaultBodyLimit::max(config.max_sync_body_bytes))
        }
        Route::Metrics => get(metrics_handler),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{NetworkModule, StubHandler};

    #[test]
    fn the_engine_shares_the_servers_parts_unless_the_state_was_changed() {
        let module = NetworkModule::new(NetworkConfig::default());
        let state = module.app_state();
        assert!(Arc::ptr_eq(&state.engine(), &state.engine), "one view, shared");
        let mut replaced = state.clone();
        replaced.handler = Arc::new(StubHandler);
        let shared = replaced.engine();
        assert!(!Arc::ptr_eq(&shared, &state.engine));
        assert!(Arc::ptr_eq(&shared.handler, &replaced.handler), "the handler put in the state");
    }
}
