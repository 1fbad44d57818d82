//! [`NetworkModule`]: builds the router, binds the port and runs the server through its whole
//! lifecycle, from `Starting` to `Stopped`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::{MethodFilter, any, on};
use axum::{Router, ServiceExt as _};
use axum_server::accept::DefaultAcceptor;
use tokio::net::{TcpListener, TcpSocket, ToSocketAddrs};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tower::{Service, ServiceBuilder};

use crate::network::config::NetworkConfig;
use crate::network::connections::registry::ConnectionRegistry;
use crate::network::edge::admission::Admission;
use crate::network::edge::proxy_protocol::{ProxyProtocol, ProxyProtocolAcceptor};
use crate::network::edge::rate_limit::RateLimitLayer;
use crate::network::edge::tls::{TlsAcceptor, TlsReloader};
use crate::network::engine::Shared;
use crate::network::engine::direct::LinkAcceptor;
use crate::network::handlers::{AppState, main_paths, main_routes, metrics_routes};
use crate::network::inbound::{InboundHandler, StubHandler};
use crate::network::metrics::TransportMetrics;
use crate::network::metrics::http::{EmbedderRoute, HttpMetricsLayer};
use crate::network::middleware::build_http_layers;
use crate::network::shutdown::ShutdownController;

/// How long force-closed connections get to unwind before `serve()` returns regardless.
const FORCE_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How often recorded histogram samples are folded into buckets when nobody scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The HTTP + WebSocket server.
///
/// Construction, binding and serving are separate steps, so the caller learns the bound port
/// (and can wire the registry into other modules) before any traffic arrives:
///
/// ```no_run
/// use topgun_server::network::{NetworkConfig, NetworkModule};
///
/// # #[tokio::main]
/// # async fn main() -> anyhow::Result<()> {
/// let mut module = NetworkModule::new(NetworkConfig { port: 8080, ..Default::default() });
/// let port = module.start().await?;
/// println!("listening on {port}");
/// module.serve(async { tokio::signal::ctrl_c().await.ok(); }).await
/// # }
/// ```
pub struct NetworkModule {
    config: NetworkConfig,
    listener: Option<TcpListener>,
    registry: Arc<ConnectionRegistry>,
    shutdown: Arc<ShutdownController>,
    handler: Arc<dyn InboundHandler>,
    tls: Option<TlsReloader>,
    start_time: Instant,
    metrics: Arc<TransportMetrics>,
    metrics_listener: Option<TcpListener>,
    connection_slots: Arc<Semaphore>,
    admission: Arc<Admission>,
    /// Routes of the embedder's own, served beside the built-in ones.
    own_routes: Vec<Router>,
}

impl std::fmt::Debug for NetworkModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkModule")
            .field("config", &self.config)
            .field("local_addr", &self.local_addr())
            .field("health", &self.shutdown.health_state())
            .finish_non_exhaustive()
    }
}

impl NetworkModule {
    /// A module with the [`StubHandler`]. Binds nothing yet.
    #[must_use]
    pub fn new(config: NetworkConfig) -> Self {
        Self {
            listener: None,
            registry: Arc::new(ConnectionRegistry::new()),
            shutdown: Arc::new(ShutdownController::new()),
            handler: Arc::new(StubHandler),
            tls: None,
            start_time: Instant::now(),
            metrics: Arc::new(TransportMetrics::new()),
            metrics_listener: None,
            // Capped so that an invalid setting is reported by `start()` instead of a panic here.
            connection_slots: Arc::new(Semaphore::new(
                config.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            admission: Arc::new(Admission::new(&config)),
            own_routes: Vec::new(),
            config,
        }
    }

    /// Serves `routes` beside the transport's own, behind the same middleware (request id,
    /// trace, CORS, timeout, client address, rate limit, HTTP metrics under the `route` label
    /// `embedder`) and with the same lifecycle (TLS, PROXY protocol, drain). Give the router
    /// its state first (`with_state`); call this again to add more.
    ///
    /// A path the transport serves itself (`/`, `/ws`, `/sync`, `/health`, `/health/live`,
    /// `/health/ready`, `/metrics` unless it has its own listener) cannot be taken:
    /// [`start`](Self::start) fails naming it, whatever the method. Unmatched paths keep the
    /// transport's JSON `404`, so the routes must not set a fallback of their own (also an
    /// error from `start`).
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use topgun_server::network::{NetworkConfig, NetworkModule};
    ///
    /// async fn login() -> &'static str {
    ///     "token"
    /// }
    ///
    /// let module = NetworkModule::new(NetworkConfig::default())
    ///     .with_routes(Router::new().route("/api/auth/login", post(login)));
    /// ```
    #[must_use]
    pub fn with_routes(mut self, routes: Router) -> Self {
        self.own_routes.push(routes);
        self
    }

    /// Installs the handler that receives inbound messages, connection events and `/sync`
    /// bodies. Take [`registry`](Self::registry) first if the handler needs to reach other
    /// connections:
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use bytes::Bytes;
    /// use topgun_server::network::*;
    ///
    /// struct Fanout(Arc<ConnectionRegistry>);
    ///
    /// #[async_trait::async_trait]
    /// impl InboundHandler for Fanout {
    ///     async fn on_message(&self, _conn: &Arc<ConnectionHandle>, payload: Bytes) {
    ///         self.0.broadcast(payload, ConnectionKind::Client);
    ///     }
    /// }
    ///
    /// let module = NetworkModule::new(NetworkConfig::default());
    /// let module = { let registry = module.registry(); module.with_handler(Fanout(registry)) };
    /// ```
    #[must_use]
    pub fn with_handler(mut self, handler: impl InboundHandler) -> Self {
        self.handler = Arc::new(handler);
        self
    }

    /// The registry of live connections, shared with every handler.
    pub fn registry(&self) -> Arc<ConnectionRegistry> {
        Arc::clone(&self.registry)
    }

    /// The shutdown controller; call
    /// [`trigger_shutdown`](ShutdownController::trigger_shutdown) on it to stop
    /// [`serve`](Self::serve) from anywhere.
    pub fn shutdown_controller(&self) -> Arc<ShutdownController> {
        Arc::clone(&self.shutdown)
    }

    /// The transport's metrics, for rendering them on a route of your own.
    pub fn metrics(&self) -> Arc<TransportMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Where `/metrics` is served when it has its own listener, once [`start`](Self::start)
    /// has bound it.
    pub fn metrics_local_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The configuration this module was built with.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The bound address, once [`start`](Self::start) has succeeded.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Reloads the TLS certificate of a running server; `None` unless TLS is configured and
    /// [`start`](Self::start) has loaded it.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.tls.clone()
    }

    /// Assembles every route, the embedder's own included, behind the HTTP middleware stack.
    ///
    /// Serve it yourself to embed the transport in a larger router; [`serve`](Self::serve)
    /// additionally runs the shutdown sequence.
    ///
    /// The stack wraps the routes once, as a whole: `Router::layer` would wrap every route
    /// separately, and each request would then clone the stack once per layer.
    ///
    /// # Panics
    ///
    /// When routes given to [`with_routes`](Self::with_routes) take a path the transport
    /// serves or set a fallback, as `Router::merge` would; [`start`](Self::start) reports the
    /// same as an error.
    pub fn build_router(&self) -> Router {
        let routes = self.main_router().unwrap_or_else(|err| panic!("{err}"));
        Router::new().fallback_service(self.behind_middleware(routes))
    }

    /// The routes of the main port, the embedder's own merged with the built-in ones; an
    /// error naming the conflict when they clash.
    fn main_router(&self) -> anyhow::Result<Router> {
        let builtin = main_routes(&self.config).with_state(self.app_state());
        if self.own_routes.is_empty() {
            return Ok(builtin);
        }
        let own = without_panic("the routes given to with_routes", || {
            let mut own = Router::new();
            for routes in &self.own_routes {
                own = own.merge(routes.clone());
            }
            own
        })?;
        for path in main_paths(&self.config) {
            // Whatever takes `path` (a method, `any`, a service) refuses one more route there
            // for every method, or one more `any`.
            let every_method = || on(EVERY_METHOD, || async {});
            let clash = without_panic(path, || own.clone().route(path, every_method())).is_err()
                || without_panic(path, || own.clone().route(path, any(|| async {}))).is_err();
            if clash {
                anyhow::bail!("with_routes: {path} is served by the transport");
            }
        }
        let own = if own.has_routes() {
            own.route_layer(axum::middleware::map_response(mark_embedder_route))
        } else {
            own
        };
        without_panic("with_routes", || builtin.merge(own))
            .context("with_routes: routes of your own may not set a fallback")
    }

    /// `routes` behind the middleware stack and the HTTP metrics layer, as a service that
    /// [`serve`](Self::serve) runs without wrapping it in another router. Every listener of
    /// the server goes through it, so all follow the same conventions (request ids, JSON
    /// `404`s, metrics).
    fn behind_middleware(
        &self,
        routes: Router,
    ) -> impl Service<
        Request<Body>,
        Response = Response,
        Error = Infallible,
        Future = impl Future<Output = Result<Response, Infallible>> + Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let rate_limit = self.config.rate_limit.map(|limit| {
            RateLimitLayer::new(limit, Arc::clone(&self.metrics), Arc::clone(&self.admission.log))
        });
        ServiceBuilder::new()
            .map_response(IntoResponse::into_response)
            .layer(HttpMetricsLayer::new(Arc::clone(&self.metrics)))
            .layer(build_http_layers(&self.config))
            // Innermost: it reads the client address and its 429 gets every layer's headers.
            .option_layer(rate_limit)
            .service(routes)
    }

    /// The state every handler of this module's router receives, for embedders who mount the
    /// handlers (`health_handler`, `ws_upgrade_handler`, …) on a router of their own.
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use topgun_server::network::{NetworkConfig, NetworkModule, health_handler};
    ///
    /// let module = NetworkModule::new(NetworkConfig::default());
    /// let router: Router = Router::new()
    ///     .route("/status", get(health_handler))
    ///     .with_state(module.app_state());
    /// ```
    pub fn app_state(&self) -> AppState {
        let config = Arc::new(self.config.clone());
        let engine = Arc::new(Shared::new(
            &self.registry,
            &self.shutdown,
            &config,
            &self.handler,
            &self.metrics,
            &self.admission,
        ));
        AppState {
            registry: Arc::clone(&self.registry),
            shutdown: Arc::clone(&self.shutdown),
            config,
            start_time: self.start_time,
            handler: Arc::clone(&self.handler),
            connection_slots: Arc::clone(&self.connection_slots),
            metrics: Arc::clone(&self.metrics),
            admission: Arc::clone(&self.admission),
            engine,
        }
    }

    /// The router of the separate metrics listener: `/metrics` only, behind the same
    /// middleware as the main port.
    fn metrics_router(&self) -> Router {
        let routes = metrics_routes(&self.config).with_state(self.app_state());
        Router::new().fallback_service(self.behind_middleware(routes))
    }

    /// Validates the configuration, loads TLS certificates if configured, and binds the port.
    /// Returns the bound port (the OS-chosen one when the configured port is `0`).
    ///
    /// # Errors
    ///
    /// An invalid configuration, routes of your own that clash with the transport's
    /// ([`with_routes`](Self::with_routes)), unreadable or mismatched TLS files, or a port
    /// that cannot be bound; each message names what failed.
    pub async fn start(&mut self) -> anyhow::Result<u16> {
        self.config.validate()?;
        // Built here only to report clashing routes before anything is bound.
        let _routes = self.main_router()?;
        if let Some(tls) = &self.config.tls {
            self.tls = Some(TlsReloader::load(tls)?);
        }
        let listener = bind((self.config.host.as_str(), self.config.port), &self.config)
            .await
            .with_context(|| format!("cannot bind {}:{}", self.config.host, self.config.port))?;
        let port = listener.local_addr()?.port();
        if let (true, Some(addr)) = (self.config.metrics.enabled, self.config.metrics.listen) {
            let metrics = bind(addr, &self.config)
                .await
                .with_context(|| format!("cannot bind the metrics listener {addr}"))?;
            self.metrics_listener = Some(metrics);
        }
        self.listener = Some(listener);
        Ok(port)
    }

    /// Serves until `shutdown` completes or
    /// [`ShutdownController::trigger_shutdown`] is called, then shuts down gracefully and
    /// returns with the health state at `Stopped`.
    ///
    /// The sequence, driven by [`ShutdownConfig`](crate::network::ShutdownConfig): `Draining`
    /// for the grace period while still accepting; stop accepting; every WebSocket receives
    /// what is queued for it and Close 1001; wait for close acknowledgements, open HTTP
    /// requests and in-flight handler calls until the drain timeout; drop the rest. Plain and
    /// TLS serving share this path.
    ///
    /// # Errors
    ///
    /// Called before [`start`](Self::start), or the listener fails.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let listener = self.listener.take().context(
            "NetworkModule::serve() called before start(): call start() to bind the port",
        )?;
        let local_addr = listener.local_addr()?;
        let listener = listener.into_std()?;
        let app = ServiceBuilder::new()
            .map_request(|request: Request<hyper::body::Incoming>| request.map(Body::new))
            .service(self.behind_middleware(self.main_router()?))
            .into_make_service_with_connect_info::<SocketAddr>();
        let handle = axum_server::Handle::new();
        // Read before anything else, TLS included: the balancer writes the header ahead of the
        // client's first byte.
        let proxy_protocol = self.config.proxy_protocol.then(|| ProxyProtocol {
            timeout: self.config.header_read_timeout,
            listener_closed: self.shutdown.close_connections_token().clone(),
            refused: self.metrics.proxy_protocol_refused.clone(),
            log: Arc::clone(&self.admission.log),
        });
        let mut server: JoinHandle<std::io::Result<()>> = match &self.tls {
            None => {
                // Each stream shared, so WebSocket senders can write to it (`direct.rs`).
                let link = LinkAcceptor::new(Arc::clone(&self.metrics));
                let proxy = ProxyProtocolAcceptor::new(link, proxy_protocol);
                let mut server =
                    axum_server::from_tcp(listener).acceptor(proxy).handle(handle.clone());
                self.configure_http(server.http_builder());
                tokio::spawn(server.serve(app))
            }
            Some(tls) => {
                let proxy = ProxyProtocolAcceptor::new(DefaultAcceptor::new(), proxy_protocol);
                let failures = self.metrics.tls_handshake_failures.clone();
                let mut server = axum_server::from_tcp_rustls(listener, tls.rustls_config())
                    .map(|inner| TlsAcceptor {
                        inner: inner
                            .handshake_timeout(self.config.tls_handshake_timeout)
                            .acceptor(proxy),
                        failures,
                        listener_closed: self.shutdown.close_connections_token().clone(),
                    })
                    .handle(handle.clone());
                self.configure_http(server.http_builder());
                tokio::spawn(server.serve(app))
            }
        };
        let background = self.spawn_background()?;
        self.shutdown.set_ready();
        tracing::info!(%local_addr, tls = self.tls.is_some(), "serving");

        let stopped_by_itself = tokio::select! {
            () = shutdown => None,
            () = self.shutdown.shutdown_requested() => None,
            result = &mut server => Some(result),
        };
        let outcome = match stopped_by_itself {
            None => {
                self.drain(&handle, server).await;
                Ok(())
            }
            Some(result) => {
                self.shutdown.trigger_shutdown();
                self.shutdown.set_stopped();
                match result {
                    Ok(Ok(())) => Err(anyhow::anyhow!("server stopped without a shutdown request")),
                    Ok(Err(err)) => Err(err).context("server failed"),
                    Err(err) => Err(err).context("server task failed"),
                }
            }
        };
        for task in background {
            task.abort();
        }
        outcome
    }

    /// The metrics listener (if configured) and the histogram upkeep, which keeps recorded
    /// samples from accumulating between scrapes.
    fn spawn_background(&mut self) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let mut tasks = Vec::new();
        if let Some(listener) = self.metrics_listener.take() {
            let addr = listener.local_addr()?;
            let router = self.metrics_router();
            tracing::info!(%addr, "serving metrics");
            tasks.push(tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, router).await {
                    tracing::error!(%err, "metrics listener failed");
                }
            }));
        }
        let metrics = Arc::clone(&self.metrics);
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        }));
        Ok(tasks)
    }

    /// Completes once every WebSocket this server accepted has ended, i.e. every connection
    /// slot is back. Connections other modules registered themselves are theirs to close.
    async fn websockets_closed(&self) {
        let all = u32::try_from(self.config.max_connections).unwrap_or(u32::MAX);
        // The semaphore is never closed, so acquiring can only wait, not fail.
        let _ = self.connection_slots.acquire_many(all).await;
    }

    /// Gives hyper a timer so the header read timeout is enforced: a client that dribbles its
    /// request head (slowloris) is disconnected instead of holding a connection forever.
    fn configure_http(
        &self,
        builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    ) {
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout);
    }

    async fn drain(
        &self,
        handle: &axum_server::Handle,
        mut server: JoinHandle<std::io::Result<()>>,
    ) {
        let controller = &self.shutdown;
        let settings = &self.config.shutdown;
        controller.trigger_shutdown();
        tracing::info!(grace_period = ?settings.grace_period, "draining");
        tokio::time::sleep(settings.grace_period).await;

        handle.graceful_shutdown(None);
        controller.close_connections();
        let deadline = tokio::time::Instant::now() + settings.drain_timeout;
        let drained = tokio::time::timeout_at(deadline, async {
            let _ = (&mut server).await;
            self.websockets_closed().await;
            controller
                .wait_for_drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await
        })
        .await
        .unwrap_or(false);

        if !drained {
            tracing::warn!(
                connections = self.registry.count(),
                in_flight = controller.in_flight_count(),
                "drain timeout passed; closing the remaining connections"
            );
            controller.force_close_connections();
            handle.shutdown();
            let _ = tokio::time::timeout(FORCE_CLOSE_WAIT, self.websockets_closed()).await;
            server.abort();
        }
        controller.set_stopped();
        tracing::info!("stopped");
    }
}

/// Every method a route can be given.
const EVERY_METHOD: MethodFilter = MethodFilter::GET
    .or(MethodFilter::POST)
    .or(MethodFilter::PUT)
    .or(MethodFilter::PATCH)
    .or(MethodFilter::DELETE)
    .or(MethodFilter::HEAD)
    .or(MethodFilter::OPTIONS)
    .or(MethodFilter::TRACE)
    .or(MethodFilter::CONNECT);

/// Runs `build`, which may panic the way `Router::merge` and `Router::route` do on clashing
/// routes, and turns such a panic into an error naming `what`.
fn without_panic<T>(what: &str, build: impl FnOnce() -> T) -> anyhow::Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(build)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("conflicting routes");
        anyhow::anyhow!("{what}: {message}")
    })
}

/// Marks the response of a route of the embedder's own, for the HTTP metrics.
async fn mark_embedder_route(mut response: Response) -> Response {
    response.extensions_mut().insert(EmbedderRoute);
    response
}

/// Binds the first address `addr` resolves to that can be bound, with the configured
/// listen backlog (`TcpListener::bind` would use a fixed one).
async fn bind(addr: impl ToSocketAddrs, config: &NetworkConfig) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // Rebinding right after a restart must not fail on connections in TIME_WAIT. (On
        // Windows the option would let another process take the port, as std and tokio know.)
        if cfg!(unix) {
            socket.set_reuseaddr(true)?;
        }
        socket.set_nodelay(config.tcp_nodelay)?;
        match socket.bind(addr).and_then(|()| socket.listen(config.listen_backlog)) {
            Ok(listener) => return Ok(listener),
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolved to nothing")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accepted_nodelay(tcp_nodelay: bool) -> bool {
        let config = NetworkConfig { tcp_nodelay, ..NetworkConfig::default() };
        let listener = bind(("127.0.0.1", 0), &config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        accepted.nodelay().unwrap()
    }

    #[tokio::test]
    async fn accepted_sockets_follow_the_tcp_nodelay_setting() {
        assert!(accepted_nodelay(true).await);
        assert!(!accepted_nodelay(false).await);
    }
}
