use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::network::shutdown::HealthState;

/// The `GET /health` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// `starting`, `ready`, `draining` or `stopped`.
    pub state: String,
    /// Open WebSocket connections.
    pub connections: usize,
    /// Handler calls and requests in progress.
    pub in_flight: u64,
    /// Whole seconds since the server was built.
    pub uptime_secs: u64,
}

/// `GET /health`: state, connection count, in-flight work and uptime as JSON. Always `200`, so
/// that dashboards can read a draining node; routing decisions belong to `/health/ready`.
pub async fn health_handler(State(state): State<AppState>) -> impl IntoResponse {
    Json(HealthReport {
        state: state.shutdown.health_state().as_str().to_owned(),
        connections: state.registry.count(),
        in_flight: state.shutdown.in_flight_count(),
        uptime_secs: state.start_time.elapsed().as_secs(),
    })
}

/// `GET /health/live`: `200` while the process can answer at all.
pub async fn liveness_handler() -> StatusCode {
    StatusCode::OK
}

/// `GET /health/ready`: `200` when the node should receive traffic, `503` while starting,
/// draining or stopped.
pub async fn readiness_handler(State(state): State<AppState>) -> StatusCode {
    if state.shutdown.health_state() == HealthState::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
