//! A token bucket per client address over every HTTP request and upgrade attempt.
//!
//! [`NetworkConfig::rate_limit`](crate::network::NetworkConfig::rate_limit) sets the bucket:
//! `per_second` tokens refill it, `burst` is its size. A request that finds its address's bucket
//! empty is answered `429 Too Many Requests` with `Retry-After` (whole seconds until a token is
//! back) and a JSON `{"error": ...}`, counted in `topgun_rate_limited_requests_total` and logged
//! once per address and interval. The health routes are exempt: probes come from the
//! orchestrator's address and must never be refused.
//!
//! The limiter is [`governor`]'s keyed GCRA. Its table holds an entry per address seen; entries
//! whose bucket has refilled completely are indistinguishable from new ones and are evicted
//! once the table passes [`RateLimitLayer::TABLE_SOFT_LIMIT`] (and every that many requests),
//! so a flood from many distinct addresses holds only the addresses still inside their burst
//! window.
//!
//! The layer runs inside the request-id, client-address, trace and CORS layers (the `429` has
//! all their headers) and reads the [`ClientAddr`] the client-address layer resolved; a request
//! without one (no connect info) is not limited.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::Json;
use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready, ready};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use http::header::RETRY_AFTER;
use http::{Request, StatusCode};
use tower::{Layer, Service};

use crate::network::config::RateLimitConfig;
use crate::network::edge::admission::{Refusal, RefusalLog};
use crate::network::edge::client_addr::ClientAddr;
use crate::network::metrics::TransportMetrics;

/// Refuses requests over each client address's token bucket.
#[derive(Debug, Clone)]
pub(crate) struct RateLimitLayer {
    shared: Arc<Limiter>,
}

#[derive(Debug)]
struct Limiter {
    buckets: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicUsize,
    metrics: Arc<TransportMetrics>,
    log: Arc<RefusalLog>,
}

impl RateLimitLayer {
    /// Addresses in the table before idle ones are evicted.
    pub(crate) const TABLE_SOFT_LIMIT: usize = 65_536;

    pub(crate) fn new(
        config: RateLimitConfig,
        metrics: Arc<TransportMetrics>,
        log: Arc<RefusalLog>,
    ) -> Self {
        let quota = Quota::per_second(config.per_second).allow_burst(config.burst);
        let limiter = Limiter {
            buckets: DefaultKeyedRateLimiter::keyed(quota),
            checks: AtomicUsize::new(0),
            metrics,
            log,
        };
        Self { shared: Arc::new(limiter) }
    }
}

impl Limiter {
    /// `Ok` when `ip` may go on; otherwise the seconds until it may try again.
    fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let checked = self.buckets.check_key(&ip);
        let checks = self.checks.fetch_add(1, Ordering::Relaxed) + 1;
        if checks % RateLimitLayer::TABLE_SOFT_LIMIT == 0
            || self.buckets.len() > RateLimitLayer::TABLE_SOFT_LIMIT
        {
            self.evict_idle();
        }
        checked.map_err(|not_until| {
            let wait = not_until.wait_time_from(self.buckets.clock().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    fn evict_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit { inner, shared: Arc::clone(&self.shared) }
    }
}

/// The service built by [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub(crate) struct RateLimit<S> {
    inner: S,
    shared: Arc<Limiter>,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let exempt = request.uri().path().starts_with("/health");
        let client = request.extensions().get::<ClientAddr>().map(|client| client.ip);
        if let (false, Some(ip)) = (exempt, client) {
            if let Err(retry_after) = self.shared.check(ip) {
                self.shared.metrics.rate_limited();
                self.shared.log.refused(Refusal::RateLimit, ip);
                return Either::Left(ready(Ok(too_many_requests(
                    retry_after,
                    "rate limit exceeded",
                ))));
            }
        }
        Either::Right(self.inner.call(request))
    }
}

/// `429` with `Retry-After` and a JSON reason.
pub(crate) fn too_many_requests(retry_after_secs: u64, reason: &str) -> Response {
    let body = Json(serde_json::json!({ "error": reason }));
    (StatusCode::TOO_MANY_REQUESTS, [(RETRY_AFTER, retry_after_secs.max(1).to_string())], body)
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn limiter(per_second: u32, burst: u32) -> Limiter {
        let config = RateLimitConfig {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        };
        let layer = RateLimitLayer::new(config, Arc::default(), Arc::default());
        Arc::into_inner(layer.shared).unwrap()
    }

    #[test]
    fn a_burst_then_refusals_with_a_retry_after() {
        let limiter = limiter(1, 3);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| limiter.check(ip).is_ok()));
        assert_eq!(limiter.check(ip), Err(1));
        assert!(
            limiter.check("127.0.0.3".parse().unwrap()).is_ok(),
            "another address is not limited"
        );
    }

    #[test]
    fn the_table_of_addresses_stays_bounded_under_a_flood_of_distinct_ones() {
        // Buckets refill within a microsecond: every earlier address is idle by the time the
        // table passes its limit.
        let limiter = limiter(1_000_000, 1);
        let mut largest = 0;
        for n in 0..200_000_u32 {
            let ip = IpAddr::from((0x7f00_0000 | (n & 0x00ff_ffff)).to_be_bytes());
            let _ = limiter.check(ip);
            largest = largest.max(limiter.buckets.len());
        }
        assert!(largest <= RateLimitLayer::TABLE_SOFT_LIMIT + 1, "{largest} entries");
    }
}
