//! The front door: what is decided about a client before a handler sees its request.
//!
//! | file | concern |
//! |---|---|
//! | `tls` | loading and hot-reloading certificates |
//! | `proxy_protocol` | PROXY protocol v1/v2: the client a TCP balancer names before the first byte |
//! | `client_addr` | the client behind trusted proxies (`X-Forwarded-For`, `Forwarded`) |
//! | `rate_limit` | the per-address token bucket over HTTP requests and upgrades |
//! | `admission` | who may open a WebSocket: origin, per-address cap; the throttled refusal log |

pub(crate) mod admission;
pub(crate) mod client_addr;
pub(crate) mod proxy_protocol;
pub(crate) mod rate_limit;
pub(crate) mod tls;
