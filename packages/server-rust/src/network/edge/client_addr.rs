//! Who the client is: the address every log line, limit and handler sees.
//!
//! Behind a load balancer the TCP peer is the balancer. [`ClientAddrLayer`] resolves each
//! request's client address once, at the edge of the middleware stack, and stores it as a
//! [`ClientAddr`] request extension: the request span's `client` field, the WebSocket
//! connection's span, [`SyncRequest::peer`](crate::network::SyncRequest::peer), the
//! per-address connection cap and the rate limit all read it.
//!
//! The rule ([`resolve_client_ip`]):
//!
//! - a TCP peer outside [`NetworkConfig::trusted_proxies`] is the client, whatever headers it
//!   sends;
//! - a trusted peer's forwarded header ([`NetworkConfig::forwarded_header`]) is read from the
//!   right: each proxy appends the address it received the request from, so the rightmost
//!   address that is not itself a trusted proxy is the first one no trusted party vouches for.
//!   The leftmost is whatever the client wrote and is never believed on its own;
//! - an unreadable header (or an entry that is not an address, such as RFC 7239's `unknown`)
//!   stops the walk at the last address a trusted proxy reported.
//!
//! ```
//! use std::net::IpAddr;
//! use http::HeaderMap;
//! use topgun_server::network::{ForwardedHeader, resolve_client_ip};
//!
//! let trusted = ["10.0.0.0/8".parse().unwrap()];
//! let mut headers = HeaderMap::new();
//! headers.insert("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.1.2.3".parse().unwrap());
//! let proxy: IpAddr = "10.0.0.1".parse().unwrap();
//! let client = resolve_client_ip(proxy, &headers, &trusted, ForwardedHeader::XForwardedFor);
//! assert_eq!(client, "203.0.113.7".parse::<IpAddr>().unwrap(), "the spoofed 6.6.6.6 is ignored");
//! ```
//!
//! [`NetworkConfig::trusted_proxies`]: crate::network::NetworkConfig::trusted_proxies
//! [`NetworkConfig::forwarded_header`]: crate::network::NetworkConfig::forwarded_header

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ConnectInfo;
use forwarded_header_value::{ForwardedHeaderValue, ForwardedStanza};
use http::header::FORWARDED;
use http::{HeaderMap, HeaderName, Request};
use ipnet::IpNet;
use tower::{Layer, Service};

use crate::network::config::ForwardedHeader;
use crate::network::edge::proxy_protocol::ProxiedPeer;

/// The header nginx and `HAProxy` write by default.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client's address as the server resolved it, a request extension set by
/// [`ClientAddrLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    /// The client's IP address: the TCP peer's, or the one a trusted proxy forwarded.
    pub ip: IpAddr,
    /// The TCP peer (the proxy's address when the request came through one), or the source a
    /// PROXY protocol header named.
    pub peer: SocketAddr,
}

impl ClientAddr {
    /// Whether the address came from a proxy's header rather than the TCP connection.
    pub fn is_forwarded(&self) -> bool {
        self.ip != self.peer.ip()
    }

    /// The client as a socket address: the TCP peer itself, or the forwarded IP with port 0
    /// (proxies forward no client port).
    pub fn socket_addr(&self) -> SocketAddr {
        if self.is_forwarded() { SocketAddr::new(self.ip, 0) } else { self.peer }
    }
}

/// The client address of a request from `peer` with `headers`; see the module documentation.
pub fn resolve_client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted_proxies: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(&canonical(*ip)));
    let peer = canonical(peer);
    if !trusted(&peer) {
        return peer;
    }
    let Some(hops) = forwarded_hops(headers, header) else { return peer };
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        let Some(ip) = hop else { break };
        client = canonical(ip);
        if !trusted(&client) {
            break;
        }
    }
    client
}

/// The addresses a forwarded header lists, leftmost first (`None` for an entry that is not an
/// address); `None` when the header is absent or cannot be read. Several header lines are one
/// list, in order (RFC 9110 section 5.3).
fn forwarded_hops(headers: &HeaderMap, header: ForwardedHeader) -> Option<Vec<Option<IpAddr>>> {
    let name = match header {
        ForwardedHeader::Forwarded => FORWARDED,
        ForwardedHeader::XForwardedFor => X_FORWARDED_FOR,
    };
    let mut lines = headers.get_all(&name).iter().peekable();
    lines.peek()?;
    let joined = lines.map(|line| line.to_str().ok()).collect::<Option<Vec<_>>>()?.join(",");
    match header {
        ForwardedHeader::Forwarded => {
            let value = ForwardedHeaderValue::from_forwarded(&joined).ok()?;
            Some(value.iter().map(ForwardedStanza::forwarded_for_ip).collect())
        }
        ForwardedHeader::XForwardedFor => {
            Some(joined.split(',').map(|entry| parse_x_forwarded_for_entry(entry.trim())).collect())
        }
    }
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5`,
/// `[2001:db8::1]:5`).
fn parse_x_forwarded_for_entry(entry: &str) -> Option<IpAddr> {
    entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 clients) as IPv4, so one
/// client has one key and IPv4 CIDRs match it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Resolves each request's [`ClientAddr`] from its connect info (or the connection's PROXY
/// protocol header) and headers.
///
/// Requests served without connect info (a router driven by `oneshot` in a test) get no
/// extension.
#[derive(Debug, Clone)]
pub struct ClientAddrLayer {
    trusted_proxies: Arc<[IpNet]>,
    header: ForwardedHeader,
}

impl ClientAddrLayer {
    /// Trusts `trusted_proxies` to name the client in `header`.
    pub fn new(trusted_proxies: &[IpNet], header: ForwardedHeader) -> Self {
        Self { trusted_proxies: trusted_proxies.into(), header }
    }
}

impl<S> Layer<S> for ClientAddrLayer {
    type Service = ClientAddrService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientAddrService { inner, layer: self.clone() }
    }
}

/// The service built by [`ClientAddrLayer`].
#[derive(Debug, Clone)]
pub struct ClientAddrService<S> {
    inner: S,
    layer: ClientAddrLayer,
}

impl<S, B> Service<Request<B>> for ClientAddrService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let proxied = extensions.get::<ProxiedPeer>().map(|ProxiedPeer(source)| *source);
        let connected = extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(peer)| *peer);
        if let Some(peer) = proxied.or(connected) {
            let layer = &self.layer;
            let ip = resolve_client_ip(
                peer.ip(),
                request.headers(),
                &layer.trusted_proxies,
                layer.header,
            );
            request.extensions_mut().insert(ClientAddr { ip, peer });
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(peer: &str, trusted: &[&str], header: ForwardedHeader, value: &str) -> IpAddr {
        let trusted: Vec<IpNet> = trusted.iter().map(|net| net.parse().unwrap()).collect();
        let mut headers = HeaderMap::new();
        let name = match header {
            ForwardedHeader::Forwarded => FORWARDED,
            ForwardedHeader::XForwardedFor => X_FORWARDED_FOR,
        };
        headers.insert(name, value.parse().unwrap());
        resolve_client_ip(peer.parse().unwrap(), &headers, &trusted, header)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(resolve("192.0.2.1", &[], XFF, "203.0.113.9"), ip("192.0.2.1"));
        assert_eq!(resolve("192.0.2.1", &["10.0.0.0/8"], XFF, "203.0.113.9"), ip("192.0.2.1"));
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let trusted = ["10.0.0.0/8"];
        assert_eq!(resolve("10.0.0.1", &trusted, XFF, "203.0.113.9"), ip("203.0.113.9"));
        assert_eq!(
            resolve("10.0.0.1", &trusted, XFF, "6.6.6.6, 203.0.113.9, 10.9.9.9"),
            ip("203.0.113.9"),
            "the spoofed leftmost entry and the inner proxy are skipped"
        );
        assert_eq!(resolve("10.0.0.1", &trusted, XFF, "10.1.1.1, 10.2.2.2"), ip("10.1.1.1"));
        assert_eq!(resolve("10.0.0.1", &trusted, XFF, "[2001:db8::7]:443"), ip("2001:db8::7"));
    }

    #[test]
    fn an_unreadable_entry_stops_at_the_last_trusted_report() {
        let trusted = ["10.0.0.0/8"];
        assert_eq!(resolve("10.0.0.1", &trusted, XFF, "203.0.113.9, garbage"), ip("10.0.0.1"));
        assert_eq!(
            resolve("10.0.0.1", &trusted, XFF, "garbage, 10.5.5.5"),
            ip("10.5.5.5"),
            "what a trusted proxy reported stands"
        );
    }

    #[test]
    fn the_forwarded_header_is_read_the_same_way_and_only_when_chosen() {
        let trusted = ["127.0.0.0/8"];
        let forwarded = ForwardedHeader::Forwarded;
        let value = r#"for=6.6.6.6, for="[2001:db8::1]:4711";proto=https, for=127.0.0.5"#;
        assert_eq!(resolve("127.0.0.1", &trusted, forwarded, value), ip("2001:db8::1"));
        assert_eq!(resolve("127.0.0.1", &trusted, forwarded, "for=unknown"), ip("127.0.0.1"));
        assert_eq!(
            resolve("127.0.0.1", &trusted, XFF, "").to_string(),
            "127.0.0.1",
            "an empty header names nobody"
        );
        let mut headers = HeaderMap::new();
        headers.insert(FORWARDED, "for=203.0.113.9".parse().unwrap());
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(
            resolve_client_ip(ip("127.0.0.1"), &headers, &trusted, XFF),
            ip("127.0.0.1"),
            "the header the proxy does not write is ignored"
        );
    }

    #[test]
    fn several_header_lines_are_one_list() {
        let mut headers = HeaderMap::new();
        headers.append(X_FORWARDED_FOR, "6.6.6.6".parse().unwrap());
        headers.append(X_FORWARDED_FOR, "203.0.113.9".parse().unwrap());
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(resolve_client_ip(ip("127.0.0.1"), &headers, &trusted, XFF), ip("203.0.113.9"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        assert_eq!(
            resolve("::ffff:10.0.0.1", &["10.0.0.0/8"], XFF, "::ffff:203.0.113.9"),
            ip("203.0.113.9")
        );
    }
}
