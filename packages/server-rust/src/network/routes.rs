//! Every route the server answers, in one table: the router is built from it and the HTTP
//! metrics label requests from it, so a route cannot be served without being counted under
//! its own name (any other path is `unmatched`, which keeps scanners from creating labels).

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use http::StatusCode;

use super::config::NetworkConfig;
use super::handlers::{
    AppState, health_handler, http_sync_handler, liveness_handler, metrics_handler,
    readiness_handler, root_handler, ws_upgrade_handler,
};
use super::inbound::json_error;

/// One route of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Root,
    Health,
    Live,
    Ready,
    WebSocket,
    Sync,
    Metrics,
}

impl Route {
    /// Every route, in the order of their metric slots.
    pub(crate) const ALL: [Self; 7] = [
        Self::Root,
        Self::Health,
        Self::Live,
        Self::Ready,
        Self::WebSocket,
        Self::Sync,
        Self::Metrics,
    ];

    /// The label of requests that matched no route.
    pub(crate) const UNMATCHED: &'static str = "unmatched";

    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Root => "/",
            Self::Health => "/health",
            Self::Live => "/health/live",
            Self::Ready => "/health/ready",
            Self::WebSocket => "/ws",
            Self::Sync => "/sync",
            Self::Metrics => "/metrics",
        }
    }

    fn handler(self, config: &NetworkConfig) -> MethodRouter<AppState> {
        match self {
            Self::Root => get(root_handler),
            Self::Health => get(health_handler),
            Self::Live => get(liveness_handler),
            Self::Ready => get(readiness_handler),
            Self::WebSocket => get(ws_upgrade_handler),
            Self::Sync => {
                post(http_sync_handler).layer(DefaultBodyLimit::max(config.max_sync_body_bytes))
            }
            Self::Metrics => get(metrics_handler),
        }
    }

    /// The metric slot of a request path: its route's position in [`ALL`](Self::ALL), or
    /// `ALL.len()` for a path no route matches.
    pub(crate) fn slot(path: &str) -> usize {
        Self::ALL.iter().position(|route| route.path() == path).unwrap_or(Self::ALL.len())
    }

    /// The label of a metric slot.
    pub(crate) fn slot_name(slot: usize) -> &'static str {
        Self::ALL.get(slot).map_or(Self::UNMATCHED, |route| route.path())
    }
}

/// The routes served on the main port (`/metrics` only when it is served there), with a JSON
/// `404` for anything else.
pub(crate) fn main_routes(config: &NetworkConfig) -> Router<AppState> {
    let metrics_here = config.metrics.enabled && config.metrics.listen.is_none();
    routes(config, Route::ALL.into_iter().filter(|r| *r != Route::Metrics || metrics_here))
}

/// The routes of the separate metrics listener.
pub(crate) fn metrics_routes(config: &NetworkConfig) -> Router<AppState> {
    routes(config, [Route::Metrics].into_iter())
}

fn routes(config: &NetworkConfig, which: impl Iterator<Item = Route>) -> Router<AppState> {
    which
        .fold(Router::new(), |router, route| router.route(route.path(), route.handler(config)))
        .fallback(not_found)
}

/// Unknown routes get a JSON body, like every other error this server returns itself.
async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_its_own_slot_and_others_share_unmatched() {
        for (slot, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(Route::slot(route.path()), slot);
            assert_eq!(Route::slot_name(slot), route.path());
        }
        assert_eq!(Route::slot_name(Route::slot("/wp-admin")), "unmatched");
    }
}
