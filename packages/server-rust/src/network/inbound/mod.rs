//! The bridge between the transport and whatever processes messages.
//!
//! The transport decodes nothing: it hands every inbound binary WebSocket message and every
//! `POST /sync` body to an [`InboundHandler`], together with connection lifecycle events. The
//! operation pipeline, cluster and storage crates plug in by implementing this trait; until one
//! is installed, [`StubHandler`] logs messages and answers `/sync` with an empty MsgPack array.

pub(crate) mod heartbeat;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use axum::Json;
use axum::extract::ws::Utf8Bytes;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::CatchUnwind;
use http::header::AUTHORIZATION;
use http::{HeaderMap, StatusCode};

use crate::network::close;
use crate::network::connection::DisconnectReason;
use crate::network::connections::handle::ConnectionHandle;

/// Receives everything that arrives on the transport.
///
/// Calls for one connection are made in order, one at a time: `on_message` is not called again
/// for a connection until its previous call has returned, which gives per-connection ordering.
/// A server whose messages may be handled out of order (a slow query should not hold up the
/// same client's next messages) can let up to
/// [`ConnectionConfig::max_concurrent_messages`](crate::network::ConnectionConfig::max_concurrent_messages)
/// calls of one connection run at once; they start in the order the messages arrived.
/// `on_connect` always returns before the first `on_message` starts, and `on_disconnect` is
/// called once every call has returned. Every call counts as in-flight work, so a graceful
/// shutdown waits for it.
///
/// **A busy handler does not make its client look dead.** While `on_message` runs, the
/// connection's reader goes on reading up to [`READ_AHEAD_MESSAGES`] further messages (or
/// [`READ_AHEAD_BYTES`]), offering each to [`answer_inline`](Self::answer_inline) at once, so a
/// heartbeat behind a slow message is still answered (see
/// [`Heartbeat`](crate::network::Heartbeat)); the rest wait, in order, for `on_message`. Past
/// that bound the reader stops reading and TCP backpressure reaches the client. The server's
/// own idle timeout does not run while a handler call is in progress.
///
/// The handler's futures are polled by the connection's own task, beside its reading and
/// writing: while a call awaits, messages queued for the connection keep going out. A call
/// that blocks its thread instead of awaiting holds up that one connection entirely; move
/// blocking work to `tokio::task::spawn_blocking`.
///
/// ```
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use topgun_server::network::{ConnectionHandle, InboundHandler, OutboundMessage, SyncError};
///
/// /// Sends every message straight back.
/// struct Echo;
///
/// #[async_trait::async_trait]
/// impl InboundHandler for Echo {
///     async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
///         conn.try_send(OutboundMessage::Binary(payload));
///     }
///
///     async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
///         Ok(body)
///     }
/// }
/// ```
#[async_trait]
pub trait InboundHandler: Send + Sync + 'static {
    /// A WebSocket connection was registered. Its outbound queue is already being written.
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        let _ = conn;
    }

    /// A binary WebSocket message arrived on `conn`.
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes);

    /// A text WebSocket message arrived on `conn`, in its order among the binary messages
    /// (handled like them: one call at a time, or side by side with
    /// `max_concurrent_messages`).
    ///
    /// TopGun's clients send binary MsgPack only, so by default a text message is refused:
    /// the connection closes with `1003` and
    /// [`TEXT_FRAME_REASON`](crate::network::close::TEXT_FRAME_REASON). Implement it to accept
    /// text; answer with [`OutboundMessage::Text`](crate::network::OutboundMessage::Text).
    /// Text is UTF-8 by the time it arrives here: a message that is not closes the connection
    /// with `1007` as soon as the fragment that breaks it is read.
    async fn on_text(&self, conn: &Arc<ConnectionHandle>, text: Utf8Bytes) {
        let _ = text;
        tracing::debug!("text frame on a binary-only protocol");
        conn.close_because(
            DisconnectReason::Limit,
            close::UNSUPPORTED_DATA,
            close::TEXT_FRAME_REASON,
        );
    }

    /// Offered every binary message as soon as it is read, before it is queued for
    /// [`on_message`](Self::on_message), even while an earlier `on_message` call for the
    /// same connection is still running. Return `true` when the message was fully handled
    /// here; `on_message` then never sees it.
    ///
    /// For messages that must be answered whatever the handler is doing, such as a
    /// heartbeat. It runs on the connection's reader: keep it short and non-blocking (no
    /// locks that `on_message` may hold, no waiting). The default handles nothing.
    fn answer_inline(&self, conn: &Arc<ConnectionHandle>, payload: &Bytes) -> bool {
        let _ = (conn, payload);
        false
    }

    /// `conn` has closed and left the registry. Called exactly once per connection.
    async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>) {
        let _ = conn;
    }

    /// A `POST /sync` request arrived; returns the MsgPack response body.
    ///
    /// The default answers `501 Not Implemented`. Implement
    /// [`on_http_sync_request`](Self::on_http_sync_request) instead to see the request's
    /// headers (the client's `Authorization`), peer address and request id.
    ///
    /// # Errors
    ///
    /// A [`SyncError`], which becomes the HTTP status and a JSON error body.
    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        let _ = body;
        Err(SyncError::NotImplemented("this server does not handle HTTP sync".into()))
    }

    /// A `POST /sync` request arrived, with its context; returns the MsgPack response body.
    /// The transport calls this one; the default passes the body to
    /// [`on_http_sync`](Self::on_http_sync).
    ///
    /// # Errors
    ///
    /// A [`SyncError`], which becomes the HTTP status and a JSON error body.
    async fn on_http_sync_request(&self, request: SyncRequest) -> Result<Bytes, SyncError> {
        self.on_http_sync(request.body).await
    }
}

/// Most messages a connection's reader reads ahead while the handler is busy with an earlier
/// one (see [`InboundHandler`]).
pub const READ_AHEAD_MESSAGES: usize = 64;
/// Most payload bytes a connection's reader holds read ahead while the handler is busy; the
/// message that crosses the bound is still taken.
pub const READ_AHEAD_BYTES: usize = 1024 * 1024;

/// A `POST /sync` request as the handler sees it: the body, already checked to be one
/// well-formed MsgPack value, and where it came from.
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
/// use topgun_server::network::SyncRequest;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
/// let request = SyncRequest::new(Bytes::from_static(&[0x90])).with_headers(headers);
/// assert_eq!(request.bearer_token(), Some("abc"));
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SyncRequest {
    /// The MsgPack request body.
    pub body: Bytes,
    /// The request's headers, `Authorization` included.
    pub headers: HeaderMap,
    /// The client's address: the TCP peer's, or behind a trusted proxy the address it
    /// forwarded (with port 0, which proxies do not forward; see
    /// [`ClientAddr`](crate::network::ClientAddr)). `None` when the router is served without
    /// connect info.
    pub peer: Option<SocketAddr>,
    /// The request's `X-Request-Id`, as echoed in the response and logged.
    pub request_id: Option<String>,
}

impl SyncRequest {
    /// A request with `body` and nothing else, for tests and for handlers that call each other.
    #[must_use]
    pub fn new(body: Bytes) -> Self {
        Self { body, ..Self::default() }
    }

    /// Sets the headers.
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the peer address.
    #[must_use]
    pub fn with_peer(mut self, peer: SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// Sets the request id.
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// The token of an `Authorization: Bearer <token>` header; `None` without one or when the
    /// token is empty (TopGun's client sends `Bearer ` when it has no token).
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }
}

/// A shared handler is a handler: lets callers keep an `Arc` to the handler they install.
#[async_trait]
impl<H: InboundHandler> InboundHandler for Arc<H> {
    async fn on_connect(&self, conn: &Arc<ConnectionHandle>) {
        (**self).on_connect(conn).await;
    }

    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        (**self).on_message(conn, payload).await;
    }

    async fn on_text(&self, conn: &Arc<ConnectionHandle>, text: Utf8Bytes) {
        (**self).on_text(conn, text).await;
    }

    fn answer_inline(&self, conn: &Arc<ConnectionHandle>, payload: &Bytes) -> bool {
        (**self).answer_inline(conn, payload)
    }

    async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>) {
        (**self).on_disconnect(conn).await;
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        (**self).on_http_sync(body).await
    }

    async fn on_http_sync_request(&self, request: SyncRequest) -> Result<Bytes, SyncError> {
        (**self).on_http_sync_request(request).await
    }
}

/// Why a `POST /sync` request failed; each variant maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// `400`: the request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// `401`: the request carries no valid credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// `403`: the credentials do not allow this request.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// `415`: the body is not sent as MsgPack (raised by the transport, before the handler).
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// `501`: the installed handler does not support HTTP sync.
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// `503`: the server cannot take the request now; the client should retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// `500`: the request failed on the server.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SyncError {
    /// The HTTP status this error is answered with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for SyncError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "sync request failed");
        } else {
            tracing::debug!(%status, error = %self, "sync request refused");
        }
        json_error(status, &self.to_string())
    }
}

/// The JSON error body of the refusals this server writes itself: `{"error": "..."}` (those
/// axum and tower-http answer before a handler runs keep their own plain-text bodies).
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Awaits a call into the installed handler, turning a panic into an error log and `None`:
/// a handler bug costs that one call, never the connection task or the server.
pub(crate) async fn call_guarded<T>(call: &'static str, fut: impl Future<Output = T>) -> Option<T> {
    report_panic(call, guarded(fut).await)
}

/// A handler call that resolves to `Err` instead of unwinding when the handler panics.
pub(crate) fn guarded<F: Future>(fut: F) -> CatchUnwind<AssertUnwindSafe<F>> {
    AssertUnwindSafe(fut).catch_unwind()
}

/// Logs a guarded call's panic; `None` if it panicked.
pub(crate) fn report_panic<T, P>(call: &'static str, result: Result<T, P>) -> Option<T> {
    if result.is_err() {
        tracing::error!(call, "inbound handler panicked");
    }
    result.ok()
}

/// The handler used until a real one is installed: logs each binary message at debug level and
/// answers `POST /sync` with an empty MsgPack array.
#[derive(Debug, Clone, Copy, Default)]
pub struct StubHandler;

/// `[]` in MsgPack: a fixarray of length zero.
const EMPTY_MSGPACK_ARRAY: &[u8] = &[0x90];

#[async_trait]
impl InboundHandler for StubHandler {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        tracing::debug!(conn_id = %conn.id, bytes = payload.len(), "binary message received");
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        tracing::debug!(bytes = body.len(), "sync request received");
        Ok(Bytes::from_static(EMPTY_MSGPACK_ARRAY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_answer_is_an_empty_msgpack_array() {
        assert_eq!(EMPTY_MSGPACK_ARRAY, rmp_serde::to_vec_named(&Vec::<()>::new()).unwrap());
    }

    #[test]
    fn bearer_tokens_are_read_as_the_client_sends_them() {
        let token = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value.parse().unwrap());
            SyncRequest::new(Bytes::new()).with_headers(headers).bearer_token().map(str::to_owned)
        };
        assert_eq!(token("Bearer abc.def"), Some("abc.def".into()));
        assert_eq!(token("bearer  xyz "), Some("xyz".into()));
        assert_eq!(token("Bearer"), None, "no token: the client's 'Bearer ' arrives trimmed");
        assert_eq!(token("Basic dXNlcg=="), None);
        assert_eq!(SyncRequest::new(Bytes::new()).bearer_token(), None);
    }

    #[test]
    fn every_sync_error_maps_to_its_status() {
        let cases = [
            (SyncError::BadRequest(String::new()), 400),
            (SyncError::Unauthorized(String::new()), 401),
            (SyncError::Forbidden(String::new()), 403),
            (SyncError::UnsupportedMediaType(String::new()), 415),
            (SyncError::NotImplemented(String::new()), 501),
            (SyncError::Unavailable(String::new()), 503),
            (SyncError::Internal(String::new()), 500),
        ];
        for (err, status) in cases {
            assert_eq!(err.into_response().status().as_u16(), status);
        }
    }
}
