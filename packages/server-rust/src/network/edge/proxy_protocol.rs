//! The PROXY protocol (v1 text, v2 binary): a load balancer that forwards raw TCP (`HAProxy`'s
//! `send-proxy-v2`, AWS NLB, TLS passthrough) names the client in a header it writes before
//! the connection's first byte.
//!
//! With [`NetworkConfig::proxy_protocol`] on, every accepted connection must start with a valid
//! header, read within [`NetworkConfig::header_read_timeout`] and before TLS; a connection
//! without one is closed (counted in `topgun_proxy_protocol_refused_total`, logged at `info`
//! once per address and interval). The header's source address becomes the connection's peer
//! for [`ClientAddr`](crate::network::ClientAddr): the request span, the WebSocket's span,
//! `SyncRequest::peer` and every per-address limit see the client, not the balancer. A v2
//! `LOCAL` header (the balancer's own health check) or a v1 `UNKNOWN` one leaves the TCP peer
//! as it is.
//!
//! Only turn it on when the port is reachable through the balancer alone: whoever can connect
//! directly can write any source address into the header.
//!
//! [`NetworkConfig::proxy_protocol`]: crate::network::NetworkConfig::proxy_protocol
//! [`NetworkConfig::header_read_timeout`]: crate::network::NetworkConfig::header_read_timeout

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::accept::Accept;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::util::Either;
use tower_http::add_extension::AddExtension;

use crate::network::edge::admission::{Refusal, RefusalLog};

/// The v2 header's first twelve bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included (the specification's limit).
const V1_MAX_LEN: usize = 107;

/// The source address a PROXY header named; a request extension that
/// [`ClientAddrLayer`](crate::network::ClientAddrLayer) takes as the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProxiedPeer(pub(crate) SocketAddr);

/// Settings of an acceptor that reads PROXY headers.
#[derive(Debug, Clone)]
pub(crate) struct ProxyProtocol {
    pub(crate) timeout: Duration,
    /// Cancelled when the server stops accepting: headers still awaited are abandoned.
    pub(crate) listener_closed: CancellationToken,
    pub(crate) refused: metrics::Counter,
    pub(crate) log: Arc<RefusalLog>,
}

/// Reads the PROXY header of every connection before handing it to `inner` (plain or TLS);
/// passes connections straight through when built without [`ProxyProtocol`] settings.
#[derive(Debug, Clone)]
pub(crate) struct ProxyProtocolAcceptor<A> {
    inner: A,
    settings: Option<ProxyProtocol>,
}

impl<A> ProxyProtocolAcceptor<A> {
    pub(crate) fn new(inner: A, settings: Option<ProxyProtocol>) -> Self {
        Self { inner, settings }
    }
}

/// The service a connection gets: with the proxied peer added to every request, or as it was.
type MaybeProxied<S> = Either<AddExtension<S, ProxiedPeer>, S>;

impl<A, S> Accept<TcpStream, S> for ProxyProtocolAcceptor<A>
where
    A: Accept<TcpStream, MaybeProxied<S>> + Clone + Send + Sync + 'static,
    A::Future: Send + 'static,
    S: Send + 'static,
{
    type Stream = A::Stream;
    type Service = A::Service;
    /// Without the PROXY protocol, the inner acceptor's own future: no allocation per
    /// connection for a feature that is off.
    type Future = futures_util::future::Either<
        A::Future,
        BoxFuture<'static, io::Result<(A::Stream, A::Service)>>,
    >;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Some(settings) = self.settings.clone() else {
            let accepted = self.inner.accept(stream, Either::Right(service));
            return futures_util::future::Either::Left(accepted);
        };
        let inner = self.inner.clone();
        futures_util::future::Either::Right(Box::pin(async move {
            let mut stream = stream;
            let peer = stream.peer_addr()?;
            let read = tokio::time::timeout(settings.timeout, read_proxy_header(&mut stream));
            let header = tokio::select! {
                read = read => read.unwrap_or_else(|_| Err(invalid("no PROXY header in time"))),
                () = settings.listener_closed.cancelled() => {
                    return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "shutting down"));
                }
            };
            let source = match header {
                Ok(source) => source.unwrap_or(peer),
                Err(err) => {
                    settings.refused.increment(1);
                    settings.log.refused(Refusal::ProxyHeader, peer.ip());
                    tracing::debug!(%peer, %err, "connection without a valid PROXY header closed");
                    return Err(err);
                }
            };
            inner
                .accept(stream, Either::Left(AddExtension::new(service, ProxiedPeer(source))))
                .await
        }))
    }
}

fn invalid(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.to_owned())
}

/// Reads exactly one PROXY protocol header (v1 or v2) from `stream`, leaving every byte after
/// it unread, and returns the client it names: `Ok(None)` for a header that names none (v2
/// `LOCAL`, v1 `UNKNOWN`, non-IP families). The server does this itself with
/// [`NetworkConfig::proxy_protocol`](crate::network::NetworkConfig::proxy_protocol); this is for listeners of your own (a cluster port).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use topgun_server::network::read_proxy_header;
///
/// let mut stream: &[u8] = b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
/// let client = read_proxy_header(&mut stream).await.unwrap();
/// assert_eq!(client, Some("203.0.113.9:56324".parse().unwrap()));
/// assert_eq!(stream, b"GET / HTTP/1.1\r\n");
/// # });
/// ```
///
/// # Errors
///
/// `InvalidData` for anything that is not a well-formed header; the stream's own errors
/// (`UnexpectedEof` when it ends inside the header).
pub async fn read_proxy_header(
    stream: &mut (impl AsyncRead + Unpin),
) -> io::Result<Option<SocketAddr>> {
    let mut start = [0_u8; 5];
    stream.read_exact(&mut start).await?;
    if &start == b"PROXY" {
        read_v1(stream, &start).await
    } else if start == V2_SIGNATURE[..5] {
        read_v2(stream, &start).await
    } else {
        Err(invalid("the connection does not start with a PROXY protocol header"))
    }
}

/// The rest of a v1 line, one byte at a time: a read past `\r\n` would take the client's bytes.
async fn read_v1(
    stream: &mut (impl AsyncRead + Unpin),
    start: &[u8],
) -> io::Result<Option<SocketAddr>> {
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX_LEN {
            return Err(invalid("PROXY v1 header longer than 107 bytes"));
        }
        line.push(stream.read_u8().await?);
    }
    let header = ppp::v1::Header::try_from(line.as_slice())
        .map_err(|err| invalid(&format!("malformed PROXY v1 header: {err}")))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

async fn read_v2(
    stream: &mut (impl AsyncRead + Unpin),
    start: &[u8],
) -> io::Result<Option<SocketAddr>> {
    let mut header = vec![0_u8; 16];
    header[..start.len()].copy_from_slice(start);
    stream.read_exact(&mut header[start.len()..]).await?;
    if header[..12] != V2_SIGNATURE {
        return Err(invalid("malformed PROXY v2 signature"));
    }
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    header.resize(16 + length, 0);
    stream.read_exact(&mut header[16..]).await?;
    let parsed = ppp::v2::Header::try_from(header.as_slice())
        .map_err(|err| invalid(&format!("malformed PROXY v2 header: {err}")))?;
    if parsed.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> (io::Result<Option<SocketAddr>>, usize) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut rest = bytes;
        let result = runtime.block_on(read_proxy_header(&mut rest));
        (result, bytes.len() - rest.len())
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([command, family]);
        header.extend(u16::try_from(addresses.len()).unwrap().to_be_bytes());
        header.extend(addresses);
        header
    }

    #[test]
    fn v1_names_the_source_and_leaves_the_request_unread() {
        let input = b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        let (source, consumed) = read(input);
        assert_eq!(source.unwrap(), Some("203.0.113.9:56324".parse().unwrap()));
        assert_eq!(&input[consumed..], b"GET / HTTP/1.1\r\n");
        let (source, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n");
        assert_eq!(source.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(read(b"PROXY UNKNOWN\r\n").0.unwrap(), None);
    }

    #[test]
    fn v2_names_the_source_local_names_nobody() {
        let ipv4 = [203, 0, 113, 9, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb];
        let mut input = v2(0x21, 0x11, &ipv4);
        input.extend(b"\x16\x03\x01");
        let (source, consumed) = read(&input);
        assert_eq!(source.unwrap(), Some("203.0.113.9:56324".parse().unwrap()));
        assert_eq!(&input[consumed..], b"\x16\x03\x01", "the TLS hello is left for TLS");
        assert_eq!(read(&v2(0x20, 0x00, &[])).0.unwrap(), None, "LOCAL");
    }

    #[test]
    fn anything_else_is_refused() {
        for input in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n",
            &[b'P'; 200][..],
            b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443 and then it goes on for a very long time without ever ending the line......",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x02\x00\x00",
        ] {
            assert!(read(input).0.is_err(), "{:?}", String::from_utf8_lossy(input));
        }
    }
}
