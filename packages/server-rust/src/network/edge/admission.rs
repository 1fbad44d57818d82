//! Who may open a WebSocket: the checks an upgrade passes before it is accepted, and the log
//! of refusals that a flood cannot flood.
//!
//! In order (`handlers/websocket.rs`): draining (`503`), the `Origin` against
//! [`NetworkConfig::cors_origins`] (`403`, cross-site WebSocket hijacking), the per-address
//! cap [`NetworkConfig::max_connections_per_ip`] (`429`), the server-wide
//! [`NetworkConfig::max_connections`] (`503`). The per-address rate limit runs earlier, in the
//! HTTP stack (`rate_limit.rs`).
//!
//! [`NetworkConfig::cors_origins`]: crate::network::NetworkConfig::cors_origins
//! [`NetworkConfig::max_connections_per_ip`]: crate::network::NetworkConfig::max_connections_per_ip
//! [`NetworkConfig::max_connections`]: crate::network::NetworkConfig::max_connections

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::header::ORIGIN;
use http::{HeaderMap, HeaderValue};
use tokio::sync::OwnedSemaphorePermit;

use crate::network::config::NetworkConfig;

/// Why a client was turned away; logged once per address and interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    RateLimit,
    PerIpConnections,
    Origin,
    ProxyHeader,
    InboundRate,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate limit exceeded",
            Self::PerIpConnections => "per-address connection limit reached",
            Self::Origin => "websocket origin not allowed",
            Self::ProxyHeader => "connection without a valid PROXY protocol header closed",
            Self::InboundRate => "connection over its inbound message budget; reading paused",
        }
    }
}

/// Logs a refusal at most once per address, reason and [`RefusalLog::INTERVAL`], with the
/// number of refusals since the last line.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    last: DashMap<(IpAddr, Refusal), (Instant, u64)>,
}

impl RefusalLog {
    /// Least time between two lines for one address and reason.
    pub(crate) const INTERVAL: Duration = Duration::from_secs(10);
    /// Most (address, reason) pairs remembered; past it the memory starts afresh, so a flood
    /// from many addresses costs a bounded table (and at most one line per address).
    const MAX_ENTRIES: usize = 16_384;

    /// Records a refusal; `true` when it was logged.
    pub(crate) fn refused(&self, why: Refusal, ip: IpAddr) -> bool {
        if self.last.len() >= Self::MAX_ENTRIES {
            self.last.clear();
        }
        let now = Instant::now();
        let suppressed = match self.last.entry((ip, why)) {
            Entry::Occupied(mut seen) => {
                let (logged_at, since) = seen.get_mut();
                if now.duration_since(*logged_at) < Self::INTERVAL {
                    *since += 1;
                    return false;
                }
                let suppressed = *since;
                *seen.get_mut() = (now, 0);
                suppressed
            }
            Entry::Vacant(slot) => {
                slot.insert((now, 0));
                0
            }
        };
        tracing::info!(client = %ip, suppressed, "{}", why.as_str());
        true
    }
}

/// The upgrade checks' shared state; one per server.
#[derive(Debug)]
pub(crate) struct Admission {
    per_ip_cap: usize,
    per_ip: DashMap<IpAddr, usize>,
    /// `None` when every origin is allowed (`cors_origins` holds `*`).
    allowed_origins: Option<Vec<HeaderValue>>,
    pub(crate) log: Arc<RefusalLog>,
}

impl Admission {
    pub(crate) fn new(config: &NetworkConfig) -> Self {
        let allowed_origins = if config.cors_origins.iter().any(|o| o == "*") {
            None
        } else {
            Some(config.cors_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect())
        };
        Self {
            per_ip_cap: config.max_connections_per_ip,
            per_ip: DashMap::new(),
            allowed_origins,
            log: Arc::default(),
        }
    }

    /// Whether an upgrade with `headers` may proceed: no `Origin` (a non-browser client), or
    /// one of the configured origins.
    pub(crate) fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        match (&self.allowed_origins, headers.get(ORIGIN)) {
            (None, _) | (_, None) => true,
            (Some(allowed), Some(origin)) => allowed.contains(origin),
        }
    }

    /// Takes one of `ip`'s connection slots: `Ok(None)` when there is no cap (nothing to hold,
    /// nothing allocated), an error when `ip` holds the cap already.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Box<IpSlot>>, AtCap> {
        if self.per_ip_cap == 0 {
            return Ok(None);
        }
        let mut held = self.per_ip.entry(ip).or_insert(0);
        if *held >= self.per_ip_cap {
            return Err(AtCap(ip));
        }
        *held += 1;
        Ok(Some(Box::new(IpSlot { admission: Arc::clone(self), ip })))
    }

    /// Connections `ip` holds (for tests and the bounded-table check).
    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).map_or(0, |held| *held)
    }

    fn release(&self, ip: IpAddr) {
        // The entry goes with the address's last connection: the table holds only addresses
        // with open connections.
        self.per_ip.remove_if_mut(&ip, |_, held| {
            *held -= 1;
            *held == 0
        });
    }
}

/// An address at its connection cap.
#[derive(Debug)]
pub(crate) struct AtCap(pub(crate) IpAddr);

/// One connection's place under the per-address cap, given back when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.admission.release(self.ip);
    }
}

/// What an admitted connection holds until it ends: its places under both caps.
#[derive(Debug)]
#[allow(dead_code)] // held only to be given back when the connection's future drops them
pub(crate) struct Admitted {
    pub(crate) server_wide: Option<OwnedSemaphorePermit>,
    /// Boxed: held only with a per-address cap, and every open connection carries the field.
    pub(crate) per_ip: Option<Box<IpSlot>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_free_again_when_its_connection_ends_and_the_table_forgets_idle_addresses() {
        let config = NetworkConfig { max_connections_per_ip: 2, ..Default::default() };
        let admission = Arc::new(Admission::new(&config));
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let first = admission.acquire(a).unwrap();
        let second = admission.acquire(a).unwrap();
        assert!(admission.acquire(a).is_err(), "a is at its cap");
        assert!(admission.acquire(b).unwrap().is_some(), "b is not a");
        drop(first);
        assert_eq!(admission.held(a), 1);
        let third = admission.acquire(a).expect("a freed slot is usable again");
        assert!(third.is_some());
        drop(third);
        drop(second);
        assert!(admission.per_ip.is_empty(), "no entry for an address without connections");
    }

    #[test]
    fn origins_are_checked_only_against_a_list() {
        let mut headers = HeaderMap::new();
        let any = Admission::new(&NetworkConfig::default());
        headers.insert(ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(any.origin_allowed(&headers));
        let config = NetworkConfig {
            cors_origins: vec!["https://app.example".into()],
            ..Default::default()
        };
        let listed = Admission::new(&config);
        assert!(!listed.origin_allowed(&headers));
        headers.insert(ORIGIN, HeaderValue::from_static("https://app.example"));
        assert!(listed.origin_allowed(&headers));
        assert!(listed.origin_allowed(&HeaderMap::new()), "no Origin: not a browser");
    }

    #[test]
    fn a_flood_of_refusals_is_logged_once_per_address_and_reason() {
        let log = RefusalLog::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let logged = (0..1_000).filter(|_| log.refused(Refusal::RateLimit, a)).count();
        assert_eq!(logged, 1);
        assert!(log.refused(Refusal::Origin, a), "another reason");
        assert!(log.refused(Refusal::RateLimit, b), "another address");
        assert_eq!(log.last.get(&(a, Refusal::RateLimit)).map(|seen| seen.1), Some(999));
    }

    #[test]
    fn the_refusal_log_stays_bounded() {
        let log = RefusalLog::default();
        for n in 0..50_000_u32 {
            log.refused(Refusal::RateLimit, IpAddr::from(n.to_be_bytes()));
        }
        assert!(log.last.len() <= RefusalLog::MAX_ENTRIES);
    }
}
