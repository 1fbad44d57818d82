use std::panic::AssertUnwindSafe;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use http::header::CONTENT_TYPE;

use super::AppState;
use crate::network::inbound::SyncError;

/// The content type of MsgPack responses.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// `POST /sync`: hands the body to the installed
/// [`InboundHandler::on_http_sync`](crate::network::InboundHandler::on_http_sync) and answers
/// its MsgPack result with `content-type: application/msgpack`, or its error as a JSON body
/// with the matching status. The call counts as in-flight work.
pub async fn http_sync_handler(State(state): State<AppState>, body: Bytes) -> Response {
    let _in_flight = state.shutdown.in_flight_guard();
    // A panicking handler must cost this request, not the connection or the server.
    let result = AssertUnwindSafe(state.handler.on_http_sync(body))
        .catch_unwind()
        .await;
    match result {
        Ok(Ok(response)) => ([(CONTENT_TYPE, MSGPACK_CONTENT_TYPE)], response).into_response(),
        Ok(Err(err)) => err.into_response(),
        Err(_) => {
            tracing::error!("sync handler panicked");
            SyncError::Internal("the sync handler failed".into()).into_response()
        }
    }
}
