use std::io::Cursor;

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use serde::Deserialize;

use super::AppState;
use crate::network::edge::client_addr::ClientAddr;
use crate::network::inbound::{SyncError, SyncRequest, call_guarded};
use crate::network::middleware::REQUEST_ID_HEADER;

/// The content type of MsgPack responses.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// Request content types `POST /sync` accepts, parameters aside: the MsgPack spellings in use
/// (`application/x-msgpack` is what TopGun's TypeScript HTTP client sends) and raw binary.
pub const ACCEPTED_SYNC_CONTENT_TYPES: [&str; 4] = [
    "application/msgpack",
    "application/x-msgpack",
    "application/vnd.msgpack",
    "application/octet-stream",
];

/// `POST /sync`: checks the request, hands it (body, headers, peer address, request id) to the
/// installed
/// [`InboundHandler::on_http_sync_request`](crate::network::InboundHandler::on_http_sync_request)
/// (which passes the body to `on_http_sync` unless overridden) and answers
/// its MsgPack result with `content-type: application/msgpack`, or its error as a JSON body
/// with the matching status. The call counts as in-flight work.
///
/// The handler only ever sees a well-formed MsgPack value: a body over `max_sync_body_bytes`
/// is answered `413`, another content type `415`, and malformed MsgPack `400`.
pub async fn http_sync_handler(
    State(state): State<AppState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = check_content_type(&headers) {
        return refusal.into_response();
    }
    if let Err(problem) = check_msgpack(&body) {
        return SyncError::BadRequest(problem).into_response();
    }
    let request_id =
        headers.get(REQUEST_ID_HEADER).and_then(|id| id.to_str().ok()).map(str::to_owned);
    let request = SyncRequest {
        body,
        headers,
        peer: client.map(|Extension(client)| client.socket_addr()),
        request_id,
    };
    let _in_flight = state.shutdown.in_flight_guard();
    match call_guarded("on_http_sync", state.handler.on_http_sync_request(request)).await {
        Some(Ok(response)) => ([(CONTENT_TYPE, MSGPACK_CONTENT_TYPE)], response).into_response(),
        Some(Err(err)) => err.into_response(),
        None => SyncError::Internal("the sync handler failed".into()).into_response(),
    }
}

/// Accepts the MsgPack and binary content types, parameters and case aside.
fn check_content_type(headers: &HeaderMap) -> Result<(), SyncError> {
    let essence = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or("").trim());
    match essence {
        Some(essence)
            if ACCEPTED_SYNC_CONTENT_TYPES.iter().any(|t| t.eq_ignore_ascii_case(essence)) =>
        {
            Ok(())
        }
        other => Err(SyncError::UnsupportedMediaType(format!(
            "got {}; send {}",
            other.unwrap_or("no content type"),
            ACCEPTED_SYNC_CONTENT_TYPES.join(", ")
        ))),
    }
}

/// Deepest nesting of arrays and maps accepted in a `/sync` body. Checking recurses once per
/// level, so the bound keeps a hostile body from exhausting the stack.
pub const MAX_SYNC_NESTING: usize = 128;

/// Checks that `body` is exactly one well-formed MsgPack value nested at most
/// [`MAX_SYNC_NESTING`] deep, without building it.
fn check_msgpack(body: &[u8]) -> Result<(), String> {
    let mut decoder = rmp_serde::Deserializer::new(Cursor::new(body));
    decoder.set_max_depth(MAX_SYNC_NESTING);
    serde::de::IgnoredAny::deserialize(&mut decoder)
        .map_err(|err| format!("body is not valid MsgPack: {err}"))?;
    let used = usize::try_from(decoder.position()).unwrap_or(usize::MAX);
    if used == body.len() {
        Ok(())
    } else {
        Err(format!(
            "body is not valid MsgPack: {} trailing bytes after the value",
            body.len() - used
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msgpack_check_accepts_one_value_and_rejects_the_rest() {
        let valid =
            rmp_serde::to_vec_named(&serde_json::json!({"type": "OP", "n": [1, 2]})).unwrap();
        assert!(check_msgpack(&valid).is_ok());
        assert!(check_msgpack(&[0x90]).is_ok());
        assert!(check_msgpack(&[]).unwrap_err().contains("not valid MsgPack"));
        assert!(check_msgpack(&valid[..valid.len() - 1]).is_err(), "truncated");
        assert!(check_msgpack(&[0xc1]).is_err(), "0xc1 is never used");
        let mut trailing = valid.clone();
        trailing.push(0x01);
        assert!(check_msgpack(&trailing).unwrap_err().contains("1 trailing bytes"));
        // Deep nesting is refused by the depth limit rather than overflowing the stack.
        let mut nested = vec![0x91; 100_000];
        nested.push(0xc0);
        assert!(check_msgpack(&nested).unwrap_err().contains("depth limit exceeded"));
        let mut shallow = vec![0x91; MAX_SYNC_NESTING - 1];
        shallow.push(0xc0);
        assert!(check_msgpack(&shallow).is_ok());
    }

    #[test]
    fn content_types_match_without_parameters_or_case() {
        let check = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(CONTENT_TYPE, value.parse().unwrap());
            }
            check_content_type(&headers).is_ok()
        };
        assert!(check(Some("application/msgpack")));
        assert!(check(Some("application/x-msgpack; charset=binary")));
        assert!(check(Some("Application/Vnd.MsgPack")));
        assert!(check(Some("application/octet-stream")));
        assert!(!check(Some("application/json")));
        assert!(!check(Some("text/plain")));
        assert!(!check(None));
    }
}
