//! The WebSocket routes, `GET /ws` and `GET /`: admission (draining, origin, per-address and
//! server-wide connection limits; see `admission.rs`) and the upgrade. What happens on the connection afterwards is the engine's (`network/engine/`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{
    CONNECTION, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY,
    UPGRADE,
};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::AppState;
use crate::network::connections::queue::DirectWrite;
use crate::network::edge::admission::{Admitted, AtCap, Refusal};
use crate::network::edge::client_addr::ClientAddr;
use crate::network::edge::rate_limit::too_many_requests;
use crate::network::engine::deflate::{self, Agreed};
use crate::network::engine::direct::DirectSocket;
use crate::network::engine::socket::{Deflating, FrameSocket};
use crate::network::engine::{self, Shared};
use crate::network::metrics::RefusedUpgrade;

/// `GET /ws`: upgrades to a WebSocket configured from
/// [`ConnectionConfig`](crate::network::ConnectionConfig) and serves it with the engine
/// [`handle_socket`] runs: over HTTP/1.1 with the transport's own framing (permessage-deflate
/// when it is on and the client offers it, see [`UpgradeOffer`]), over HTTP/2 with axum's.
///
/// Refused with `503` and `Retry-After` while the server is draining (so clients reconnect to
/// a node that is staying up) and when `max_connections` are open; with `403` when
/// `cors_origins` is a list and the request's `Origin` is not in it; with `429` and
/// `Retry-After` when its client address holds `max_connections_per_ip` already. Requests that
/// are not valid upgrades get axum's `400`/`405`/`426` answers.
pub async fn ws_upgrade_handler(
    State(state): State<AppState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    offer: UpgradeOffer,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(&state, client.map(|Extension(client)| client), &headers, offer, ws)
}

/// `GET /`: the same WebSocket endpoint as `/ws` for clients given the server's bare URL, as
/// TopGun's client is (`serverUrl: 'ws://host:8080'` opens its socket at `/`). A request that
/// is not an upgrade attempt gets a short JSON description of the server's routes instead.
pub async fn root_handler(
    State(state): State<AppState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    offer: UpgradeOffer,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => upgrade(&state, client.map(|Extension(client)| client), &headers, offer, ws),
        // An attempt that went wrong gets axum's answer, as at `/ws`.
        Err(rejection) if headers.contains_key(UPGRADE) => rejection.into_response(),
        Err(_) => Json(serde_json::json!({
            "service": "topgun-server",
            "websocket": ["/", "/ws"],
            "sync": "POST /sync",
            "health": ["/health", "/health/live", "/health/ready"],
        }))
        .into_response(),
    }
}

/// Admits and upgrades one WebSocket; shared by both routes so limits and metrics are one.
fn upgrade(
    state: &AppState,
    client: Option<ClientAddr>,
    headers: &HeaderMap,
    offer: UpgradeOffer,
    ws: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_shutting_down() {
        state.metrics.upgrade_refused(RefusedUpgrade::Draining);
        return unavailable("server is shutting down");
    }
    let admission = &state.admission;
    let ip = client.map(|client| client.ip);
    if !admission.origin_allowed(headers) {
        state.metrics.upgrade_refused(RefusedUpgrade::Origin);
        if let Some(ip) = ip {
            admission.log.refused(Refusal::Origin, ip);
        }
        return (StatusCode::FORBIDDEN, "websocket origin not allowed\n").into_response();
    }
    let per_ip = match ip.map_or(Ok(None), |ip| admission.acquire(ip)) {
        Ok(slot) => slot,
        Err(AtCap(ip)) => {
            state.metrics.upgrade_refused(RefusedUpgrade::PerIpLimit);
            admission.log.refused(Refusal::PerIpConnections, ip);
            return too_many_requests(1, "per-address connection limit reached");
        }
    };
    let Ok(slot) = Arc::clone(&state.connection_slots).try_acquire_owned() else {
        state.metrics.upgrade_refused(RefusedUpgrade::ConnectionLimit);
        tracing::info!(
            limit = state.config.max_connections,
            "connection limit reached; upgrade refused"
        );
        return unavailable("connection limit reached");
    };
    let admitted = Admitted { server_wide: Some(slot), per_ip };
    let peer = client.map(|client| client.socket_addr());
    if let UpgradeOffer(Some(handover)) = offer {
        // HTTP/1.1: answer the handshake here and serve the connection with the engine's own
        // framing, which holds no buffer while the connection is idle and speaks
        // permessage-deflate; axum's (tungstenite) is left for HTTP/2.
        drop(ws);
        return handover.upgrade(state.engine(), admitted, peer);
    }
    let config = &state.config.connection;
    let ws = ws
        .read_buffer_size(config.ws_read_buffer_size)
        .write_buffer_size(config.ws_write_buffer_size)
        .max_write_buffer_size(config.write_buffer_limit())
        .max_message_size(config.max_message_size)
        .max_frame_size(config.max_frame_size)
        .on_failed_upgrade(|err| tracing::debug!(%err, "websocket upgrade failed"));
    let shared = state.engine();
    // The slots are released when the connection's future completes.
    ws.on_upgrade(move |socket| engine::run(shared, socket, admitted, peer, None))
}

fn unavailable(reason: &'static str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [(RETRY_AFTER, "1")], format!("{reason}\n")).into_response()
}

/// Runs one upgraded connection to its end: registers it, then hands it to the engine, which
/// reads and writes until the client leaves or the server closes it, and removes it from the
/// registry exactly once.
///
/// For a router of one's own built on axum's `WebSocketUpgrade` (tungstenite framing, no
/// compression, no per-address slot); the server's own routes hand the engine the transport's
/// framing instead.
///
/// Every open connection holds this future (one task per connection), so it is kept small.
#[allow(clippy::needless_pass_by_value)] // the specification's signature
pub fn handle_socket(socket: WebSocket, state: AppState) -> impl Future<Output = ()> + Send {
    let admitted = Admitted { server_wide: None, per_ip: None };
    engine::run(state.engine(), socket, admitted, None, None)
}

/// What the transport needs to take an HTTP/1.1 WebSocket upgrade over with its own framing
/// (`network/engine/socket.rs`): the request's key and hyper's upgrade handle, and the
/// permessage-deflate offer it accepts when
/// [`ConnectionConfig::permessage_deflate`] is on. Never rejects; an HTTP/2 upgrade (extended
/// CONNECT) yields nothing here and is served by axum's WebSocket.
///
/// It reads the request before [`WebSocketUpgrade`] takes it, so it comes first among a
/// handler's arguments; [`ws_upgrade_handler`] and [`root_handler`] take it.
///
/// [`ConnectionConfig::permessage_deflate`]: crate::network::ConnectionConfig::permessage_deflate
#[derive(Debug)]
pub struct UpgradeOffer(Option<Handover>);

impl UpgradeOffer {
    /// Whether the upgrade will be answered with permessage-deflate.
    pub fn compresses(&self) -> bool {
        self.0.as_ref().is_some_and(|handover| handover.deflate.is_some())
    }
}

/// What answering the upgrade ourselves takes of the request.
#[derive(Debug)]
struct Handover {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The accepted permessage-deflate offer and the response header that accepts it.
    deflate: Option<(Agreed, HeaderValue)>,
    /// The connection's TCP stream, for senders to write to directly (plain TCP only).
    direct: Option<DirectSocket>,
}

impl FromRequestParts<AppState> for UpgradeOffer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if parts.version != Version::HTTP_11 {
            return Ok(Self(None));
        }
        let handover = (|| {
            let key = parts.headers.get(SEC_WEBSOCKET_KEY)?.clone();
            // A clone: `WebSocketUpgrade` still validates the request and takes its own.
            let on_upgrade = parts.extensions.get::<OnUpgrade>()?.clone();
            let deflate = state
                .config
                .connection
                .permessage_deflate
                .and_then(|_| deflate::negotiate(&parts.headers));
            let direct = parts.extensions.get::<DirectSocket>().cloned();
            Some(Handover { key, on_upgrade, deflate, direct })
        })();
        Ok(Self(handover))
    }
}

impl Handover {
    /// The `101 Switching Protocols` answer, with the connection served once hyper hands it over.
    fn upgrade(
        self,
        shared: Arc<Shared>,
        admitted: Admitted,
        peer: Option<std::net::SocketAddr>,
    ) -> Response {
        let Self { key, on_upgrade, deflate, direct } = self;
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let (agreed, extension) = deflate.unzip();
        // A compressed frame is made by the connection's socket, so only an uncompressed
        // connection lets senders write to it directly.
        let direct = direct
            .filter(|_| agreed.is_none())
            .map(|DirectSocket(link)| link as Arc<dyn DirectWrite>);
        let deflating = agreed.map(|agreed| Deflating {
            agreed,
            frames: shared.metrics.compressed_frames.clone(),
            bytes: shared.metrics.compressed_bytes.clone(),
        });
        // `then`, not an `async` block: the block would keep its captures beside the
        // connection's future for the connection's whole life; here they make way for it.
        tokio::spawn(on_upgrade.then(move |upgraded| match upgraded {
            Ok(upgraded) => {
                let limits = Arc::clone(&shared.socket_limits);
                let socket = FrameSocket::new(TokioIo::new(upgraded), deflating, limits);
                Either::Left(engine::run(shared, socket, admitted, peer, direct))
            }
            Err(err) => {
                tracing::debug!(%err, "websocket upgrade failed");
                Either::Right(std::future::ready(()))
            }
        }));
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "websocket")
            .header(SEC_WEBSOCKET_ACCEPT, accept);
        if let Some(extension) = extension {
            response = response.header(SEC_WEBSOCKET_EXTENSIONS, extension);
        }
        response.body(Body::empty()).expect("valid upgrade response")
    }
}
