//! The HTTP middleware stack every route runs behind.
//!
//! Outermost first:
//!
//! 1. **Set request id**: a UUID v4 `X-Request-Id` on each request that lacks one.
//! 2. **Propagate request id**: copies it onto the response. Sitting outside CORS and the
//!    timeout, it also stamps the responses those layers produce themselves (preflights, `408`s)
//!    and `404`s.
//! 3. **Client address**: the [`ClientAddr`] behind trusted proxies (see
//!    [`ClientAddrLayer`]).
//! 4. **Trace**: one span per request carrying method, path, request id and client address.
//! 5. **CORS**: origins from [`NetworkConfig::cors_origins`], for requests that carry an
//!    `Origin` header (see [`CrossOriginLayer`]).
//! 6. **Compression**: gzip when the client accepts it, for responses of at least
//!    [`MIN_COMPRESSED_SIZE`] bytes. Inside CORS, so it never scans the `Vary` values CORS adds.
//! 7. **Timeout**: `408 Request Timeout` after [`NetworkConfig::request_timeout`].
//!
//! Apply the stack once, around the whole router, as
//! [`NetworkModule`](crate::network::NetworkModule) does: `Router::layer` would wrap every
//! route separately, so each request would clone the stack once per layer.
//!
//! ```
//! use axum::{Router, routing::get};
//! use tower::Layer;
//! use topgun_server::network::{NetworkConfig, build_http_layers};
//!
//! let routes: Router = Router::new().route("/", get(|| async { "hi" }));
//! let app = build_http_layers(&NetworkConfig::default()).layer(routes);
//! # let _ = app;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use http::header::{AUTHORIZATION, CONTENT_TYPE, ORIGIN, VARY};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{And, NotForContentType, Predicate as _, SizeAbove};
use tower_http::cors::{AllowOrigin, CorsLayer, ResponseFuture as CorsResponseFuture};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::network::config::NetworkConfig;
use crate::network::edge::client_addr::{ClientAddr, ClientAddrLayer};

/// The header carrying each request's id.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

type MakeSpan = fn(&Request<Body>) -> Span;

/// Smallest response body that is gzip-compressed. Below it, gzip's framing and CPU cost more
/// than they save; health answers and error bodies all stay under it.
pub const MIN_COMPRESSED_SIZE: u16 = 1024;

/// The predicate deciding which responses are compressed (tower-http's default exclusions
/// with a larger minimum size, checked first).
pub type CompressWhen =
    And<And<And<SizeAbove, NotForContentType>, NotForContentType>, NotForContentType>;

/// The layer stack built by [`build_http_layers`], named so it can be stored or returned.
pub type HttpLayers = ServiceBuilder<
    Stack<
        TimeoutLayer,
        Stack<
            CompressionLayer<CompressWhen>,
            Stack<
                CrossOriginLayer,
                Stack<
                    TraceLayer<SharedClassifier<ServerErrorsAsFailures>, MakeSpan>,
                    Stack<
                        ClientAddrLayer,
                        Stack<
                            PropagateRequestIdLayer,
                            Stack<SetRequestIdLayer<MakeRequestUuid>, Identity>,
                        >,
                    >,
                >,
            >,
        >,
    >,
>;

/// Builds the HTTP middleware stack for `config`; apply it once around the router (see the
/// module documentation).
pub fn build_http_layers(config: &NetworkConfig) -> HttpLayers {
    ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(ClientAddrLayer::new(&config.trusted_proxies, config.forwarded_header))
        .layer(TraceLayer::new_for_http().make_span_with(request_span as MakeSpan))
        .layer(CrossOriginLayer::new(cors_layer(&config.cors_origins)))
        .layer(
            CompressionLayer::new().compress_when(
                SizeAbove::new(MIN_COMPRESSED_SIZE)
                    .and(NotForContentType::GRPC)
                    .and(NotForContentType::IMAGES)
                    .and(NotForContentType::SSE),
            ),
        )
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, config.request_timeout))
}

fn request_span(request: &Request<Body>) -> Span {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("");
    let client = request.extensions().get::<ClientAddr>().map(|client| client.ip);
    tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
        client = client.map(tracing::field::display),
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

/// The `Vary` value tower-http's CORS layer sets, which the responses it skips carry too.
const CORS_VARY: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

/// Applies a [`CorsLayer`] to the requests that carry an `Origin` header: browsers send it on
/// every cross-origin request, and the CORS response headers mean nothing to anyone else.
///
/// Requests without `Origin` (other nodes, TopGun's non-browser clients, health probes) skip
/// the CORS work, which costs more per request than any other layer here, and their responses
/// still carry the `Vary` header CORS would have set, so a cache never hands such a response
/// to a browser.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_http::cors::CorsLayer;
/// use topgun_server::network::CrossOriginLayer;
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hi" }))
///     .layer(CrossOriginLayer::new(CorsLayer::permissive()));
/// ```
#[derive(Clone, Debug)]
pub struct CrossOriginLayer {
    cors: Arc<CorsLayer>,
}

impl CrossOriginLayer {
    /// Wraps `cors`, to run only for requests with an `Origin` header.
    pub fn new(cors: CorsLayer) -> Self {
        Self { cors: Arc::new(cors) }
    }
}

impl<S> Layer<S> for CrossOriginLayer {
    type Service = CrossOrigin<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CrossOrigin { inner, cors: Arc::clone(&self.cors) }
    }
}

/// The service built by [`CrossOriginLayer`].
#[derive(Clone, Debug)]
pub struct CrossOrigin<S> {
    inner: S,
    /// Shared, not cloned per request: only requests with an `Origin` header build a CORS
    /// service from it.
    cors: Arc<CorsLayer>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CrossOrigin<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = CrossOriginFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if request.headers().contains_key(ORIGIN) {
            // The CORS service takes the instance `poll_ready` prepared.
            let fresh = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, fresh);
            CrossOriginFuture { kind: Kind::Cors { future: self.cors.layer(ready).call(request) } }
        } else {
            CrossOriginFuture { kind: Kind::SameOrigin { future: self.inner.call(request) } }
        }
    }
}

pin_project! {
    /// The response future of [`CrossOrigin`].
    pub struct CrossOriginFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        // A request with an `Origin` header, answered through CORS.
        Cors { #[pin] future: CorsResponseFuture<F> },
        // A request without one.
        SameOrigin { #[pin] future: F },
    }
}

impl<F, ResBody, E> Future for CrossOriginFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Cors { future } => future.poll(cx),
            KindProj::SameOrigin { future } => {
                let mut response = ready!(future.poll(cx))?;
                response.headers_mut().append(VARY, CORS_VARY);
                Poll::Ready(Ok(response))
            }
        }
    }
}
