//! The `topgun-server` binary: the network module with the stub handler behind TopGun's
//! heartbeat (so TopGun's client stays connected), configured from flags and `TOPGUN_*`
//! environment variables.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use topgun_server::network::{
    ConnectionConfig, DeflateConfig, ForwardedHeader, Heartbeat, IpNet, MetricsConfig,
    NetworkConfig, NetworkModule, RateLimitConfig, ShutdownConfig, StubHandler, TlsConfig,
    TlsReloader, shutdown_signal,
};
use tracing_subscriber::EnvFilter;

/// TopGun server: HTTP + WebSocket transport for TopGun clients and cluster peers.
#[derive(Debug, Parser)]
#[command(name = "topgun-server", version, about)]
struct Args {
    /// Interface to listen on.
    #[arg(long, env = "TOPGUN_HOST", default_value_t = NetworkConfig::default().host)]
    host: String,
    /// Port to listen on (0 picks a free one). Unlike the library, whose default lets the OS
    /// pick, the binary listens on a well-known port.
    #[arg(long, env = "TOPGUN_PORT", default_value_t = 8080)]
    port: u16,
    /// PEM certificate chain; serving HTTPS/WSS needs it with --tls-key.
    #[arg(long, env = "TOPGUN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "TOPGUN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle; requires clients to present a certificate it signed (mutual TLS).
    #[arg(long, env = "TOPGUN_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Comma-separated origins allowed by CORS; `*` allows any.
    #[arg(long, env = "TOPGUN_CORS_ORIGINS", value_delimiter = ',', default_values_t = NetworkConfig::default().cors_origins)]
    cors_origins: Vec<String>,
    /// Time limit per HTTP request, e.g. `30s` or `500ms`.
    #[arg(long, env = "TOPGUN_REQUEST_TIMEOUT", default_value_t = NetworkConfig::default().request_timeout.into())]
    request_timeout: humantime::Duration,
    /// Time spent reporting `draining` before the listener closes on shutdown.
    #[arg(long, env = "TOPGUN_SHUTDOWN_GRACE", default_value_t = ShutdownConfig::default().grace_period.into())]
    shutdown_grace: humantime::Duration,
    /// Longest wait for connections and in-flight work once the listener has closed.
    #[arg(long, env = "TOPGUN_DRAIN_TIMEOUT", default_value_t = ShutdownConfig::default().drain_timeout.into())]
    drain_timeout: humantime::Duration,
    /// Most WebSocket connections at once; further upgrades get 503.
    #[arg(long, env = "TOPGUN_MAX_CONNECTIONS", default_value_t = NetworkConfig::default().max_connections)]
    max_connections: usize,
    /// Largest `POST /sync` body in bytes.
    #[arg(long, env = "TOPGUN_MAX_SYNC_BODY", default_value_t = NetworkConfig::default().max_sync_body_bytes)]
    max_sync_body: usize,
    /// Time a client has to send a complete request head.
    #[arg(long, env = "TOPGUN_HEADER_READ_TIMEOUT", default_value_t = NetworkConfig::default().header_read_timeout.into())]
    header_read_timeout: humantime::Duration,
    /// Time a client has to complete the TLS handshake.
    #[arg(long, env = "TOPGUN_TLS_HANDSHAKE_TIMEOUT", default_value_t = NetworkConfig::default().tls_handshake_timeout.into())]
    tls_handshake_timeout: humantime::Duration,
    /// Connections the kernel queues before they are accepted (capped by `net.core.somaxconn`).
    #[arg(long, env = "TOPGUN_LISTEN_BACKLOG", default_value_t = NetworkConfig::default().listen_backlog)]
    listen_backlog: u32,
    /// Close a WebSocket from which nothing arrived for this long.
    #[arg(long, env = "TOPGUN_IDLE_TIMEOUT", default_value_t = ConnectionConfig::default().idle_timeout.into())]
    idle_timeout: humantime::Duration,
    /// How often to ping each WebSocket client.
    #[arg(long, env = "TOPGUN_PING_INTERVAL", default_value_t = ConnectionConfig::default().ping_interval.into())]
    ping_interval: humantime::Duration,
    /// Largest inbound WebSocket message in bytes.
    #[arg(long, env = "TOPGUN_MAX_MESSAGE_SIZE", default_value_t = ConnectionConfig::default().max_message_size)]
    max_message_size: usize,
    /// Serve `/metrics` on this separate address (e.g. `127.0.0.1:9090`) instead of the main port.
    #[arg(long, env = "TOPGUN_METRICS_LISTEN", conflicts_with = "no_metrics")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Do not serve `/metrics` at all.
    #[arg(long, env = "TOPGUN_NO_METRICS")]
    no_metrics: bool,
    /// Comma-separated proxies (CIDRs or addresses) whose forwarded header names the client,
    /// e.g. `10.0.0.0/8,127.0.0.1`. Off by default: the TCP peer is the client.
    #[arg(long, env = "TOPGUN_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy)]
    trusted_proxies: Vec<IpNet>,
    /// The header the trusted proxies write.
    #[arg(long, env = "TOPGUN_FORWARDED_HEADER", value_enum, default_value_t = HeaderArg::XForwardedFor)]
    forwarded_header: HeaderArg,
    /// Most WebSocket connections from one client address (0: no cap); more get 429.
    #[arg(long, env = "TOPGUN_MAX_CONNECTIONS_PER_IP", default_value_t = NetworkConfig::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// Requests per second one client address may make on average (HTTP requests and upgrade
    /// attempts; health routes exempt); over it, 429. Off by default.
    #[arg(long, env = "TOPGUN_RATE_LIMIT_PER_IP")]
    rate_limit_per_ip: Option<NonZeroU32>,
    /// Requests one address may make at once under --rate-limit-per-ip (default: one second's worth).
    #[arg(long, env = "TOPGUN_RATE_LIMIT_BURST", requires = "rate_limit_per_ip")]
    rate_limit_burst: Option<NonZeroU32>,
    /// Every connection must start with a PROXY protocol header (v1 or v2, `HAProxy`
    /// `send-proxy-v2`) naming the client; connections without one are closed.
    #[arg(long, env = "TOPGUN_PROXY_PROTOCOL")]
    proxy_protocol: bool,
    /// Binary messages per second one WebSocket may send on average; over it the server stops
    /// reading that socket until the budget refills. Off by default.
    #[arg(long, env = "TOPGUN_MAX_MESSAGES_PER_SEC")]
    max_messages_per_sec: Option<NonZeroU32>,
    /// Messages one WebSocket may send at once under --max-messages-per-sec (default: one second's worth).
    #[arg(long, env = "TOPGUN_MESSAGE_BURST", requires = "max_messages_per_sec")]
    message_burst: Option<NonZeroU32>,
    /// Close a WebSocket that has not authenticated this long after connecting (1008). Off by default.
    #[arg(long, env = "TOPGUN_AUTH_TIMEOUT")]
    auth_timeout: Option<humantime::Duration>,
    /// Offer permessage-deflate (RFC 7692, no context takeover) to clients that ask for it.
    /// Off by default.
    #[arg(long, env = "TOPGUN_PERMESSAGE_DEFLATE")]
    permessage_deflate: bool,
    /// Send messages shorter than this uncompressed under --permessage-deflate.
    #[arg(long, env = "TOPGUN_DEFLATE_THRESHOLD", default_value_t = DeflateConfig::default().threshold)]
    deflate_threshold: usize,
    /// Log line format; filter with `RUST_LOG` (default `info`).
    #[arg(long, env = "TOPGUN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum HeaderArg {
    /// `X-Forwarded-For` (nginx, `HAProxy` `option forwardfor`).
    XForwardedFor,
    /// `Forwarded` (RFC 7239).
    Forwarded,
}

/// A CIDR, or a lone address as its own /32 or /128.
fn parse_proxy(value: &str) -> Result<IpNet, String> {
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("not an address or CIDR: {value:?}"))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl Args {
    fn network_config(&self) -> NetworkConfig {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert_path: cert.clone(),
                key_path: key.clone(),
                ca_cert_path: self.tls_ca.clone(),
            }),
            _ => None,
        };
        NetworkConfig {
            host: self.host.clone(),
            port: self.port,
            tls,
            cors_origins: self.cors_origins.clone(),
            request_timeout: self.request_timeout.into(),
            shutdown: ShutdownConfig {
                grace_period: self.shutdown_grace.into(),
                drain_timeout: self.drain_timeout.into(),
            },
            max_connections: self.max_connections,
            max_sync_body_bytes: self.max_sync_body,
            header_read_timeout: self.header_read_timeout.into(),
            tls_handshake_timeout: self.tls_handshake_timeout.into(),
            listen_backlog: self.listen_backlog,
            tcp_nodelay: NetworkConfig::default().tcp_nodelay,
            metrics: MetricsConfig { enabled: !self.no_metrics, listen: self.metrics_listen },
            trusted_proxies: self.trusted_proxies.clone(),
            forwarded_header: match self.forwarded_header {
                HeaderArg::XForwardedFor => ForwardedHeader::XForwardedFor,
                HeaderArg::Forwarded => ForwardedHeader::Forwarded,
            },
            max_connections_per_ip: self.max_connections_per_ip,
            proxy_protocol: self.proxy_protocol,
            rate_limit: self.rate_limit_per_ip.map(|per_second| RateLimitConfig {
                per_second,
                burst: self.rate_limit_burst.unwrap_or(per_second),
            }),
            connection: ConnectionConfig {
                auth_timeout: self.auth_timeout.map(Into::into),
                permessage_deflate: self.permessage_deflate.then(|| DeflateConfig {
                    threshold: self.deflate_threshold,
                    ..DeflateConfig::default()
                }),
                inbound_rate: self.max_messages_per_sec.map(|per_second| RateLimitConfig {
                    per_second,
                    burst: self.message_burst.unwrap_or(per_second),
                }),
                idle_timeout: self.idle_timeout.into(),
                ping_interval: self.ping_interval.into(),
                max_message_size: self.max_message_size,
                max_frame_size: self.max_message_size,
                ..ConnectionConfig::default()
            },
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    // Signal handlers are installed before the server reports itself listening, so a signal
    // sent right after that line is handled gracefully rather than killing the process.
    let shutdown = shutdown_signal().context("cannot install signal handlers")?;
    let mut module =
        NetworkModule::new(args.network_config()).with_handler(Heartbeat::new(StubHandler));
    module.start().await.context("cannot start topgun-server")?;
    reload_on_sighup(module.tls_reloader()).context("cannot install the SIGHUP handler")?;
    if let Some(addr) = module.local_addr() {
        tracing::info!(%addr, tls = args.tls_cert.is_some(), "topgun-server listening");
    }
    module.serve(shutdown).await
}

/// Registers SIGHUP now, in every mode: operators and tools send it expecting a reload, and
/// its default action would kill the process. Each one reloads the TLS certificate and key
/// from disk where TLS is configured, and is logged and otherwise ignored where it is not.
#[cfg(unix)]
fn reload_on_sighup(reloader: Option<TlsReloader>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(reloader) = &reloader else {
                tracing::info!("SIGHUP received; nothing to reload without TLS");
                continue;
            };
            if let Err(err) = reloader.reload() {
                tracing::error!("TLS reload failed, keeping the current certificate: {err}");
            }
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn reload_on_sighup(_reloader: Option<TlsReloader>) -> std::io::Result<()> {
    Ok(())
}
