use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;

use super::AppState;

/// `GET /metrics`: the Prometheus text exposition of the server's
/// [`TransportMetrics`](crate::network::TransportMetrics).
pub async fn metrics_handler(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.registry, &state.shutdown, state.start_time);
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}
