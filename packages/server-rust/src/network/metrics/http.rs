//! The tower layer that counts and times every HTTP request for
//! [`TransportMetrics`](crate::network::TransportMetrics).
//!
//! A dedicated layer rather than `axum::middleware::from_fn`: it adds no boxed future and no
//! clone of the inner stack per request, and it sits outside every other layer, so CORS
//! preflights, timeouts and `404`s are counted too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::network::metrics::TransportMetrics;
use crate::network::routes::Route;

/// Marks a response as served by a route of the embedder's own, for its `route` label.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmbedderRoute;

/// Records `topgun_http_requests_total` and `topgun_http_request_duration_seconds`.
#[derive(Clone)]
pub(crate) struct HttpMetricsLayer {
    metrics: Arc<TransportMetrics>,
}

impl HttpMetricsLayer {
    pub(crate) fn new(metrics: Arc<TransportMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics { inner, metrics: Arc::clone(&self.metrics) }
    }
}

/// The service built by [`HttpMetricsLayer`].
#[derive(Clone)]
pub(crate) struct HttpMetrics<S> {
    inner: S,
    metrics: Arc<TransportMetrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture {
            route: Route::slot(request.uri().path()),
            started: Instant::now(),
            inner: self.inner.call(request),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

pin_project! {
    /// Records the response's status and the time taken once the inner future completes.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        route: usize,
        started: Instant,
        metrics: Arc<TransportMetrics>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let route = if response.extensions().get::<EmbedderRoute>().is_some() {
                Route::EMBEDDER_SLOT
            } else {
                *this.route
            };
            this.metrics.http_request(route, response.status().as_u16(), this.started.elapsed());
        }
        Poll::Ready(result)
    }
}
