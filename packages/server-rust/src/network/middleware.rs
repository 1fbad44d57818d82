//! The HTTP middleware stack every route runs behind.
//!
//! Outermost first:
//!
//! 1. **Set request id**: a UUID v4 `X-Request-Id` on each request that lacks one.
//! 2. **Propagate request id**: copies it onto the response. Sitting outside CORS and the
//!    timeout, it also stamps the responses those layers produce themselves (preflights, `408`s)
//!    and `404`s.
//! 3. **Trace**: one span per request carrying method, path and request id.
//! 4. **Compression**: gzip when the client accepts it.
//! 5. **CORS**: origins from [`NetworkConfig::cors_origins`].
//! 6. **Timeout**: `408 Request Timeout` after [`NetworkConfig::request_timeout`].
//!
//! ```
//! use axum::{Router, routing::get};
//! use topgun_server::network::{NetworkConfig, build_http_layers};
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hi" }))
//!     .layer(build_http_layers(&NetworkConfig::default()));
//! ```

use std::time::Duration;

use axum::body::Body;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;

use super::config::NetworkConfig;

/// The header carrying each request's id.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

type MakeSpan = fn(&Request<Body>) -> Span;

/// The layer stack built by [`build_http_layers`], named so it can be stored or returned.
pub type HttpLayers = ServiceBuilder<
    Stack<
        TimeoutLayer,
        Stack<
            CorsLayer,
            Stack<
                CompressionLayer,
                Stack<
                    TraceLayer<SharedClassifier<ServerErrorsAsFailures>, MakeSpan>,
                    Stack<
                        PropagateRequestIdLayer,
                        Stack<SetRequestIdLayer<MakeRequestUuid>, Identity>,
                    >,
                >,
            >,
        >,
    >,
>;

/// Builds the HTTP middleware stack for `config`; apply it with `Router::layer`.
pub fn build_http_layers(config: &NetworkConfig) -> HttpLayers {
    ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(TraceLayer::new_for_http().make_span_with(request_span as MakeSpan))
        .layer(CompressionLayer::new())
        .layer(cors_layer(&config.cors_origins))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, config.request_timeout))
}

fn request_span(request: &Request<Body>) -> Span {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
    )
}

/// CORS for browser clients: `"*"` anywhere in `origins` allows every origin, otherwise only
/// the listed ones. Invalid origins are rejected earlier by
/// [`NetworkConfig::validate`](crate::network::NetworkConfig::validate) and skipped here.
fn cors_layer(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([CONTENT_TYPE, AUTHORIZATION, REQUEST_ID_HEADER])
        .expose_headers([REQUEST_ID_HEADER])
        .max_age(Duration::from_secs(3600))
}
