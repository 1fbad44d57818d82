//! Configuration for the HTTP/WebSocket transport.
//!
//! Every struct implements [`Default`] with production-sensible values, so callers override only
//! what they need:
//!
//! ```
//! use std::time::Duration;
//! use topgun_server::network::{ConnectionConfig, NetworkConfig};
//!
//! let config = NetworkConfig {
//!     port: 8080,
//!     request_timeout: Duration::from_secs(10),
//!     connection: ConnectionConfig { outbound_channel_capacity: 1024, ..Default::default() },
//!     ..Default::default()
//! };
//! config.validate().expect("valid configuration");
//! ```

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// A configuration value that cannot work; returned by [`NetworkConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network configuration: {0}")]
pub struct ConfigError(String);

/// Top-level transport configuration.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Interface to bind. Default: `"0.0.0.0"` (all IPv4 interfaces).
    pub host: String,
    /// Port to bind. Default: `0`, which lets the OS pick a free port; read the bound port from
    /// [`NetworkModule::start`](crate::network::NetworkModule::start).
    pub port: u16,
    /// Serve HTTPS/WSS instead of plain HTTP/WS. Default: `None`.
    pub tls: Option<TlsConfig>,
    /// Per-connection WebSocket settings.
    pub connection: ConnectionConfig,
    /// Origins allowed by CORS. `"*"` allows any origin. Default: `["*"]`.
    pub cors_origins: Vec<String>,
    /// Time limit for one HTTP request; a slower request is answered `408`. Default: 30 s.
    pub request_timeout: Duration,
    /// How the server stops.
    pub shutdown: ShutdownConfig,
    /// Most WebSocket connections at once; further upgrades get `503` with `Retry-After`.
    /// Default: 16 384.
    pub max_connections: usize,
    /// Largest `POST /sync` body; larger ones get `413`. Default: 4 MiB.
    pub max_sync_body_bytes: usize,
    /// Time a client has to send a complete request head; a slower one (slowloris) is
    /// disconnected. Default: 10 s.
    pub header_read_timeout: Duration,
    /// Connections the kernel queues before the server accepts them. A node that restarts
    /// is hit by every client reconnecting at once; with a short queue the overflow's SYNs
    /// are dropped and those clients wait for a retransmission (a second or more). Linux
    /// caps it at `net.core.somaxconn`. Default: 4 096.
    pub listen_backlog: u32,
    /// Time a client has to complete the TLS handshake; a slower one (the TLS form of
    /// slowloris) is disconnected. Handshakes still pending when the listener closes are
    /// dropped at once. Default: 10 s.
    pub tls_handshake_timeout: Duration,
    /// Sets `TCP_NODELAY` on accepted sockets, so small frames leave at once instead of
    /// waiting for the acknowledgement of earlier ones (Nagle's algorithm). Default: `true`.
    pub tcp_nodelay: bool,
    /// Where Prometheus metrics are served.
    pub metrics: MetricsConfig,
    /// Proxies (CIDRs) whose forwarded header names the client: only when the TCP peer is in
    /// this list is the client address read from [`forwarded_header`](Self::forwarded_header),
    /// taking the rightmost address that is not itself a trusted proxy. Default: empty (the
    /// TCP peer is the client; forwarded headers are ignored).
    pub trusted_proxies: Vec<IpNet>,
    /// Which header the trusted proxies write. Read only that one: the other is whatever the
    /// client put there. Default: [`ForwardedHeader::XForwardedFor`].
    pub forwarded_header: ForwardedHeader,
    /// Most WebSocket connections from one client address; the next upgrade gets `429` with
    /// `Retry-After`. `0` turns the cap off. Default: `0` (many users may share one address
    /// behind carrier-grade NAT).
    pub max_connections_per_ip: usize,
    /// A token bucket per client address over HTTP requests and upgrade attempts (the health
    /// routes are exempt); over it, `429` with `Retry-After`. Default: `None` (off).
    pub rate_limit: Option<RateLimitConfig>,
    /// Every accepted connection must start with a PROXY protocol header (v1 or v2, as
    /// `HAProxy`'s `send-proxy-v2` writes), whose source address is then the client's; a
    /// connection without one is closed. Only for a port that nothing but the balancer can
    /// reach. Default: `false`.
    pub proxy_protocol: bool,
}

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, ...` (nginx `$proxy_add_x_forwarded_for`, `HAProxy`
    /// `option forwardfor`).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

/// A per-address token bucket: `per_second` requests refill it, `burst` is its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Requests per second an address may make on average.
    pub per_second: NonZeroU32,
    /// Requests an address may make at once after a quiet spell.
    pub burst: NonZeroU32,
}

/// Where `GET /metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` at all. Default: `true`.
    pub enabled: bool,
    /// Serve it on this separate address (plain HTTP) instead of the main port, for operators
    /// who keep metrics off the public listener. Default: `None` (main port).
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, listen: None }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".to_owned(),
            port: 0,
            tls: None,
            connection: ConnectionConfig::default(),
            cors_origins: vec!["*".to_owned()],
            request_timeout: Duration::from_secs(30),
            shutdown: ShutdownConfig::default(),
            max_connections: 16_384,
            max_sync_body_bytes: 4 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            listen_backlog: 4096,
            tls_handshake_timeout: Duration::from_secs(10),
            tcp_nodelay: true,
            metrics: MetricsConfig::default(),
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            max_connections_per_ip: 0,
            rate_limit: None,
            proxy_protocol: false,
        }
    }
}

impl NetworkConfig {
    /// Checks the settings that would otherwise fail later, inside a connection.
    ///
    /// [`NetworkModule::start`](crate::network::NetworkModule::start) calls this, so a bad value
    /// is reported before the port is bound rather than as a failed WebSocket upgrade.
    ///
    /// # Errors
    ///
    /// Returns a [`ConfigError`] naming the first setting that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.connection;
        if c.outbound_channel_capacity == 0 {
            return Err(ConfigError(
                "connection.outbound_channel_capacity must be at least 1".into(),
            ));
        }
        if c.ws_max_write_buffer_size <= c.ws_write_buffer_size {
            return Err(ConfigError(format!(
                "connection.ws_max_write_buffer_size ({}) must be greater than \
                 connection.ws_write_buffer_size ({})",
                c.ws_max_write_buffer_size, c.ws_write_buffer_size
            )));
        }
        if c.ws_write_buffer_size.saturating_add(c.max_batch_bytes) > c.ws_max_write_buffer_size {
            return Err(ConfigError(format!(
                "connection.ws_write_buffer_size + connection.max_batch_bytes ({}) must not exceed \
                 connection.ws_max_write_buffer_size ({}), or a full batch could never be written",
                c.ws_write_buffer_size.saturating_add(c.max_batch_bytes),
                c.ws_max_write_buffer_size
            )));
        }
        if c.ws_read_buffer_size == 0 {
            return Err(ConfigError("connection.ws_read_buffer_size must be at least 1".into()));
        }
        if c.max_batch_messages == 0 {
            return Err(ConfigError("connection.max_batch_messages must be at least 1".into()));
        }
        if c.ping_interval.is_zero() || c.ping_interval >= c.idle_timeout {
            return Err(ConfigError(format!(
                "connection.ping_interval ({:?}) must be non-zero and shorter than \
                 connection.idle_timeout ({:?})",
                c.ping_interval, c.idle_timeout
            )));
        }
        if c.max_frame_size == 0 || c.max_message_size == 0 {
            return Err(ConfigError(
                "connection.max_frame_size and max_message_size must be non-zero".into(),
            ));
        }
        if c.max_outbound_message_size == 0 {
            return Err(ConfigError(
                "connection.max_outbound_message_size must be non-zero".into(),
            ));
        }
        if c.auth_timeout.is_some_and(|timeout| timeout.is_zero()) {
            return Err(ConfigError(
                "connection.auth_timeout must be greater than zero (or None to turn it off)".into(),
            ));
        }
        if c.max_concurrent_messages == 0 {
            return Err(ConfigError(
                "connection.max_concurrent_messages must be at least 1 (1: one after another)"
                    .into(),
            ));
        }
        if u32::try_from(c.max_topics_per_connection).is_err() {
            return Err(ConfigError(format!(
                "connection.max_topics_per_connection ({}) must be at most {}",
                c.max_topics_per_connection,
                u32::MAX
            )));
        }
        if self.max_connections == 0 || u32::try_from(self.max_connections).is_err() {
            return Err(ConfigError(format!(
                "max_connections ({}) must be between 1 and {}",
                self.max_connections,
                u32::MAX
            )));
        }
        if self.tls_handshake_timeout.is_zero() {
            return Err(ConfigError("tls_handshake_timeout must be greater than zero".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError("request_timeout must be greater than zero".into()));
        }
        if self.cors_origins.iter().any(|o| o != "*" && http::HeaderValue::from_str(o).is_err()) {
            return Err(ConfigError(format!(
                "cors_origins contains a value that is not a valid origin: {:?}",
                self.cors_origins
            )));
        }
        Ok(())
    }
}

/// Certificate files for HTTPS/WSS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain, leaf first.
    pub cert_path: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
    /// PEM file with the CA that signs client certificates. When set, clients must present a
    /// certificate signed by it (mutual TLS).
    pub ca_cert_path: Option<PathBuf>,
}

/// Per-connection WebSocket settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// Messages queued for one connection before [`try_send`] reports it full. This bounds the
    /// memory a slow client can hold. Default: 256.
    ///
    /// [`try_send`]: crate::network::ConnectionHandle::try_send
    pub outbound_channel_capacity: usize,
    /// Longest a socket write may stay blocked: a client that stops reading for this long is
    /// a slow consumer and its TCP connection is dropped (no close frame can get through).
    /// Also bounds sending a close frame. It is not a default for
    /// [`ConnectionHandle::send_timeout`](crate::network::ConnectionHandle::send_timeout),
    /// whose callers pass their own wait. Default: 5 s.
    pub send_timeout: Duration,
    /// A connection from which nothing arrived for this long is closed with 1001 `idle timeout`;
    /// time during which the inbound handler is busy with one of its messages does not count.
    /// Default: 60 s.
    pub idle_timeout: Duration,
    /// How often the server pings each connection; any frame the client sends, pongs
    /// included, counts as activity. Must be shorter than `idle_timeout`. Default: 20 s.
    pub ping_interval: Duration,
    /// How much is read from a WebSocket in one system call while no frame is under way (a
    /// frame announced larger is read in chunks of up to 64 KiB). The engine's own framing,
    /// which serves the WebSocket routes, reads between frames into a buffer its thread shares
    /// with every connection and holds one of its own only while a frame is partly read, so an
    /// idle connection holds none; tungstenite (behind
    /// [`handle_socket`](crate::network::handle_socket) and HTTP/2) keeps one of this size per
    /// connection. Default: 1 KiB (tungstenite's own default is 128 KiB).
    pub ws_read_buffer_size: usize,
    /// Frames waiting for the kernel beyond which the writer waits too (its high-water mark);
    /// the buffer is freed once the kernel has taken everything. Default: 128 KiB.
    pub ws_write_buffer_size: usize,
    /// Upper bound of tungstenite's write buffer (behind `handle_socket` and HTTP/2) while it
    /// holds batched traffic; must exceed `ws_write_buffer_size` by at least
    /// `max_batch_bytes`. A single message larger than this still goes out: the bound is
    /// raised to hold one message of `max_outbound_message_size` (see
    /// [`write_buffer_limit`](Self::write_buffer_limit)). The engine's own framing never holds
    /// more than `ws_write_buffer_size` plus one frame. Default: 512 KiB.
    pub ws_max_write_buffer_size: usize,
    /// Most messages coalesced into one outbound `BATCH` frame. Default: 256.
    pub max_batch_messages: usize,
    /// Most payload bytes coalesced into one outbound `BATCH` frame; a single larger message is
    /// still sent, alone. Default: 64 KiB.
    pub max_batch_bytes: usize,
    /// How long the server waits for the client to answer its Close frame before dropping the
    /// socket. Default: 5 s.
    pub close_timeout: Duration,
    /// Largest inbound message (all its frames together); a larger one closes the connection
    /// with 1009. Default: 8 MiB.
    pub max_message_size: usize,
    /// Largest inbound frame; a larger one closes the connection with 1009. Default: 8 MiB.
    pub max_frame_size: usize,
    /// Messages dropped in a row because the outbound queue was full before the connection
    /// is closed with 1013 so the client reconnects and resynchronises. Default: 32.
    pub max_consecutive_drops: u32,
    /// Largest outbound message. Every message up to this size is delivered whole; a larger
    /// one is refused when it is queued ([`SendError::TooLarge`]) and counted as dropped, so an
    /// oversized message never costs the connection. A connection keeps a write buffer as
    /// large as the largest message it was sent. Default: 8 MiB (the inbound
    /// `max_message_size`).
    ///
    /// [`SendError::TooLarge`]: crate::network::SendError::TooLarge
    pub max_outbound_message_size: usize,
    /// Close a client connection that has not been
    /// [authenticated](crate::network::ConnectionHandle::authenticate) this long after it
    /// opened, with `1008` and reason `authentication timeout` (metrics reason
    /// `auth_timeout`). For handlers that gate clients behind a handshake; `None` turns it
    /// off. Default: `None`.
    pub auth_timeout: Option<Duration>,
    /// A message budget per connection: `per_second` binary messages on average, `burst` at
    /// once. Over it the server stops reading the socket until the budget refills, so TCP
    /// pushes back on the client: nothing is dropped or reordered, other connections are not
    /// slowed, and time spent throttled never counts as idleness. Default: `None` (off).
    pub inbound_rate: Option<RateLimitConfig>,
    /// permessage-deflate (RFC 7692) for clients that offer it, without context takeover so an
    /// idle connection holds no compressor; see [`DeflateConfig`](crate::network::DeflateConfig).
    /// `None` answers no extension, and frames are plain. Default: `None` (off).
    pub permessage_deflate: Option<crate::network::DeflateConfig>,
    /// Most topics one connection may be subscribed to at once
    /// ([`Topics::subscribe`](crate::network::Topics::subscribe) refuses more with
    /// [`TopicError::LimitReached`](crate::network::TopicError::LimitReached)). Default: 1024.
    pub max_topics_per_connection: usize,
    /// Most `on_message` calls of one connection running at once. At 1 (the default) they run
    /// one after another, in the order the messages arrived. Above 1 the reader starts the
    /// next message while earlier ones are still running (a slow query does not hold up the
    /// same client's next messages): calls may then finish in any order, and the bytes of the
    /// messages in flight are bounded by [`READ_AHEAD_BYTES`](crate::network::READ_AHEAD_BYTES).
    pub max_concurrent_messages: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            outbound_channel_capacity: 256,
            send_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            ws_read_buffer_size: 1024,
            ws_write_buffer_size: 131_072,
            ws_max_write_buffer_size: 524_288,
            max_batch_messages: 256,
            max_batch_bytes: 65_536,
            close_timeout: Duration::from_secs(5),
            max_message_size: 8 * 1024 * 1024,
            max_frame_size: 8 * 1024 * 1024,
            max_consecutive_drops: 32,
            max_outbound_message_size: 8 * 1024 * 1024,
            auth_timeout: None,
            inbound_rate: None,
            permessage_deflate: None,
            max_topics_per_connection: 1024,
            max_concurrent_messages: 1,
        }
    }
}

impl ConnectionConfig {
    /// The write buffer bound handed to the WebSocket: `ws_max_write_buffer_size`, raised so
    /// that one message of `max_outbound_message_size` fits behind a full
    /// `ws_write_buffer_size` (a frame header is at most 14 bytes).
    pub fn write_buffer_limit(&self) -> usize {
        const FRAME_HEADER: usize = 14;
        self.ws_max_write_buffer_size.max(
            self.ws_write_buffer_size
                .saturating_add(self.max_outbound_message_size)
                .saturating_add(FRAME_HEADER),
        )
    }
}

/// How [`NetworkModule::serve`](crate::network::NetworkModule::serve) stops.
///
/// The sequence is: health turns `draining` (readiness answers `503`) for `grace_period` while
/// the listener still accepts, so a load balancer can take the node out of rotation; then the
/// listener closes and every WebSocket receives what is queued for it followed by Close 1001;
/// then the server waits up to `drain_timeout` for close acknowledgements, open HTTP requests and
/// in-flight handler calls before dropping what is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// Time spent `draining` before the listener stops accepting. Default: 0 s.
    pub grace_period: Duration,
    /// Longest wait for connections and in-flight work after the listener closes. Default: 30 s.
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period: Duration::ZERO, drain_timeout: Duration::from_secs(30) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ac14_defaults_match_the_specification() {
        let config = NetworkConfig::default();
        assert_eq!(config.host, "0.0.0.0");
        assert_eq!(config.port, 0);
        assert!(config.tls.is_none());
        assert_eq!(config.cors_origins, vec!["*".to_owned()]);
        assert_eq!(config.request_timeout, Duration::from_secs(30));
        let conn = ConnectionConfig::default();
        assert_eq!(config.connection, conn);
        assert_eq!(conn.outbound_channel_capacity, 256);
        assert_eq!(conn.send_timeout, Duration::from_secs(5));
        assert_eq!(conn.idle_timeout, Duration::from_secs(60));
        assert_eq!(conn.ws_write_buffer_size, 131_072);
        assert_eq!(conn.ws_max_write_buffer_size, 524_288);
        assert_eq!(conn.max_outbound_message_size, conn.max_message_size);
        assert_eq!(conn.auth_timeout, None);
        config.validate().expect("defaults are valid");
    }

    #[test]
    fn validate_rejects_a_write_buffer_limit_below_the_buffer() {
        let config = NetworkConfig {
            connection: ConnectionConfig {
                ws_write_buffer_size: 1024,
                ws_max_write_buffer_size: 1024,
                ..Default::default()
            },
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("ws_max_write_buffer_size (1024) must be greater"), "{err}");
    }

    #[test]
    fn validate_rejects_a_batch_that_cannot_fit_the_write_buffer() {
        let config = NetworkConfig {
            connection: ConnectionConfig { max_batch_bytes: 1 << 20, ..Default::default() },
            ..Default::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("max_batch_bytes"));
    }

    #[test]
    fn the_write_buffer_holds_the_largest_outbound_message() {
        let conn = ConnectionConfig::default();
        assert_eq!(conn.write_buffer_limit(), 131_072 + 8 * 1024 * 1024 + 14);
        let small = ConnectionConfig { max_outbound_message_size: 1024, ..Default::default() };
        assert_eq!(small.write_buffer_limit(), 524_288, "never below the configured bound");
    }

    #[test]
    fn validate_rejects_zero_capacity_and_bad_origins() {
        let zero = NetworkConfig {
            connection: ConnectionConfig { outbound_channel_capacity: 0, ..Default::default() },
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        let origin =
            NetworkConfig { cors_origins: vec!["bad\norigin".into()], ..Default::default() };
        assert!(origin.validate().unwrap_err().to_string().contains("cors_origins"));
    }
}
