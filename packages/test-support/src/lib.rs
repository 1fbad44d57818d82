//! Helpers shared by the TopGun server's integration tests (the library's and the binary's): a
//! server on an OS-chosen loopback port, WebSocket and HTTP clients, raw-socket clients for
//! misbehaving peers, certificates, and polling with a deadline instead of sleeping.
//!
//! Every helper fails the calling test with a message when something does not happen in time,
//! which is why none of them returns an error.
#![allow(clippy::missing_panics_doc)] // failing the test is each helper's purpose

pub mod certs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use topgun_server::network::{
    ConnectionHandle, ConnectionRegistry, InboundHandler, NetworkConfig, NetworkModule,
    ShutdownController, StubHandler, SyncError, decode_frame,
};

/// Upper bound for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A WebSocket client connection, plain or TLS.
pub type WsClient = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A config bound to an OS-chosen loopback port.
pub fn test_config() -> NetworkConfig {
    NetworkConfig { host: "127.0.0.1".into(), port: 0, ..Default::default() }
}

/// A running `NetworkModule::serve`, stopped by dropping or by [`TestServer::stop`].
pub struct TestServer {
    /// Where the server listens (loopback).
    pub addr: SocketAddr,
    /// The server's connection registry.
    pub registry: Arc<ConnectionRegistry>,
    /// The server's shutdown controller.
    pub controller: Arc<ShutdownController>,
    scheme: &'static str,
    client_tls: Option<Arc<rustls::ClientConfig>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with `config` and the stub handler.
    pub async fn start(config: NetworkConfig) -> Self {
        Self::with_handler(config, StubHandler).await
    }

    /// Starts a server with `config` and `handler`.
    pub async fn with_handler(config: NetworkConfig, handler: impl InboundHandler) -> Self {
        Self::from_module(NetworkModule::new(config).with_handler(handler)).await
    }

    /// Starts `module` and serves it until [`stop`](Self::stop) or a trigger on its controller.
    pub async fn from_module(module: NetworkModule) -> Self {
        Self::from_module_with_client_tls(module, None).await
    }

    /// Like [`from_module`](Self::from_module) for a TLS server; `client_tls` is what this
    /// helper's HTTP and WebSocket clients connect with.
    pub async fn from_module_with_client_tls(
        mut module: NetworkModule,
        client_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let scheme = if module.config().tls.is_some() { "https" } else { "http" };
        let port = match module.local_addr() {
            Some(addr) => addr.port(),
            None => module.start().await.expect("server starts"),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let registry = module.registry();
        let controller = module.shutdown_controller();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(module.serve(async {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            registry,
            controller,
            scheme,
            client_tls,
            stop: Some(stop),
            task: Some(task),
        };
        let ready = Arc::clone(&server.controller);
        eventually("server ready", || {
            ready.health_state() == topgun_server::network::HealthState::Ready
        })
        .await;
        server
    }

    /// The server URL of `path`, with the scheme the server speaks.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// The server's `/ws` URL, `ws://` or `wss://`.
    pub fn ws_url(&self) -> String {
        let scheme = if self.scheme == "https" { "wss" } else { "ws" };
        format!("{scheme}://{}/ws", self.addr)
    }

    /// An HTTP client that trusts this server (plain HTTP or its TLS certificate).
    pub fn http(&self) -> reqwest::Client {
        install_crypto_provider();
        let builder = reqwest::Client::builder().timeout(DEADLINE);
        let builder = match &self.client_tls {
            Some(tls) => builder.use_preconfigured_tls((**tls).clone()),
            None => builder,
        };
        builder.build().expect("http client")
    }

    /// Opens a WebSocket and waits until the server has registered it.
    pub async fn ws(&self) -> WsClient {
        let before = self.registry.count();
        let client = match &self.client_tls {
            Some(tls) => connect_wss(&self.ws_url(), Arc::clone(tls)).await.expect("wss connects"),
            None => connect_ws(&self.ws_url()).await,
        };
        let registry = Arc::clone(&self.registry);
        eventually("connection registered", move || registry.count() > before).await;
        client
    }

    /// Waits until the registry holds exactly `count` connections; panics with `what` at the
    /// deadline.
    pub async fn until_connections(&self, count: usize, what: &str) {
        eventually(what, || self.registry.count() == count).await;
    }

    /// Completes the serve future and waits for `serve()` to return.
    ///
    /// # Errors
    ///
    /// What `serve()` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join().await
    }

    /// Waits for `serve()` to return (after a trigger elsewhere).
    ///
    /// # Errors
    ///
    /// What `serve()` returned.
    pub async fn join(mut self) -> anyhow::Result<()> {
        let task = self.task.take().expect("joined once");
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("serve() returns in time")
            .expect("serve task")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Attempts a WebSocket upgrade to `server` from the local address `source` (any of
/// 127.0.0.0/8 on Linux), with extra request headers; the server's answer on success, the
/// refusal's status and headers otherwise.
///
/// # Errors
///
/// The upgrade was refused or failed.
pub async fn ws_from(
    server: SocketAddr,
    source: std::net::IpAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind the source address");
    let stream = tokio::time::timeout(DEADLINE, socket.connect(server))
        .await
        .expect("connect in time")
        .expect("tcp connects");
    let mut request = format!("ws://{server}{path}").into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                .expect("header name"),
            tokio_tungstenite::tungstenite::http::HeaderValue::from_str(value)
                .expect("header value"),
        );
    }
    let handshake = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream));
    let (client, _) = tokio::time::timeout(DEADLINE, handshake).await.expect("upgrade in time")?;
    Ok(client)
}

/// The status and `Retry-After` of a refused upgrade.
///
/// # Panics
///
/// The upgrade was accepted, or failed otherwise than with an HTTP answer.
pub fn upgrade_refusal(
    result: Result<WsClient, tokio_tungstenite::tungstenite::Error>,
) -> (u16, Option<String>) {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_owned()),
        ),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

/// A PROXY protocol v1 header naming `source` (IPv4) as the client.
pub fn proxy_v1(source: SocketAddr, server: SocketAddr) -> Vec<u8> {
    format!("PROXY TCP4 {} {} {} {}\r\n", source.ip(), server.ip(), source.port(), server.port())
        .into_bytes()
}

/// A PROXY protocol v2 header (`PROXY` command, TCP over IPv4) naming `source` as the client,
/// as `HAProxy`'s `send-proxy-v2` writes it.
///
/// # Panics
///
/// Either address is not IPv4.
pub fn proxy_v2(source: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(server)) = (source, server) else {
        panic!("IPv4 only")
    };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend(source.ip().octets());
    header.extend(server.ip().octets());
    header.extend(source.port().to_be_bytes());
    header.extend(server.port().to_be_bytes());
    header
}

/// Connects to `server`, writes `preamble` (a PROXY header), then upgrades to a WebSocket at
/// `path`.
///
/// # Errors
///
/// The upgrade was refused or failed.
pub async fn ws_after(
    server: SocketAddr,
    preamble: &[u8],
    path: &str,
) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(server).await.expect("tcp connects");
    stream.write_all(preamble).await.expect("preamble written");
    let handshake = tokio_tungstenite::client_async(
        format!("ws://{server}{path}"),
        MaybeTlsStream::Plain(stream),
    );
    let (client, _) = tokio::time::timeout(DEADLINE, handshake).await.expect("upgrade in time")?;
    Ok(client)
}

/// Opens a plain WebSocket to `url`.
pub async fn connect_ws(url: &str) -> WsClient {
    install_crypto_provider();
    let (client, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
        .await
        .expect("websocket connect in time")
        .expect("websocket connects");
    client
}

/// Opens a `wss://` connection with the given client TLS configuration.
///
/// # Errors
///
/// The handshake failed (a refused certificate, for example).
pub async fn connect_wss(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    let connect =
        tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector));
    let (client, _) =
        tokio::time::timeout(DEADLINE, connect).await.expect("wss connect in time")?;
    Ok(client)
}

/// Polls `condition` every few milliseconds until it holds; panics with `what` at the deadline.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The next data frame's bytes, skipping control frames; panics on close or at the deadline.
pub async fn next_frame(ws: &mut WsClient) -> Bytes {
    loop {
        let message = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("frame in time")
            .expect("stream open")
            .expect("frame read");
        match message {
            Message::Binary(bytes) => return bytes,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

/// Reads frames until `count` messages have arrived; returns them and the number of frames.
pub async fn next_messages(ws: &mut WsClient, count: usize) -> (Vec<Bytes>, usize) {
    let mut messages = Vec::with_capacity(count);
    let mut frames = 0;
    while messages.len() < count {
        let frame = next_frame(ws).await;
        frames += 1;
        messages.extend(decode_frame(&frame).expect("well-formed frame"));
    }
    (messages, frames)
}

/// Reads until the server's close frame and returns it (skipping data and control frames),
/// then keeps reading so the client's automatic acknowledgement is sent, as a real client's is.
pub async fn expect_close(ws: &mut WsClient) -> CloseFrame {
    loop {
        let message = tokio::time::timeout(DEADLINE, ws.next()).await.expect("close in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                let finish = async { while let Some(Ok(_)) = ws.next().await {} };
                tokio::time::timeout(DEADLINE, finish).await.expect("close handshake completes");
                return frame;
            }
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Sends one binary message.
pub async fn send_binary(ws: &mut WsClient, payload: impl Into<Bytes>) {
    ws.send(Message::Binary(payload.into())).await.expect("send");
}

/// Installs the process-wide rustls crypto provider the test clients use.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `value` encoded as MsgPack (maps with field names, as TopGun's clients send them).
pub fn msgpack(value: &impl serde::Serialize) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("encodes")
}

/// A `POST /sync` request with a MsgPack content type and `body` encoded as MsgPack.
pub fn post_sync(
    client: &reqwest::Client,
    url: String,
    body: &impl serde::Serialize,
) -> reqwest::RequestBuilder {
    client.post(url).header("content-type", "application/msgpack").body(msgpack(body))
}

/// An HTTP client with the test deadline.
pub fn http() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder().timeout(DEADLINE).build().expect("http client")
}

/// Echoes WebSocket messages and `/sync` bodies.
pub struct EchoHandler;

#[async_trait::async_trait]
impl InboundHandler for EchoHandler {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        let _ = conn
            .send_timeout(topgun_server::network::OutboundMessage::Binary(payload), DEADLINE)
            .await;
    }

    async fn on_http_sync(&self, body: Bytes) -> Result<Bytes, SyncError> {
        Ok(body)
    }
}

/// The graceful shutdown as a client sees it, over whichever transport `server` speaks. The
/// server must be configured with a grace period long enough for two health requests (two
/// seconds leaves a loaded machine plenty of room).
///
/// Readiness turns `503` and `/health` reads `draining` while the listener still answers; every
/// WebSocket receives the messages queued for it, in order, then Close 1001; `serve()` returns
/// with the state `Stopped` and no connection left.
pub async fn graceful_shutdown_scenario(server: TestServer) {
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.ws().await);
    }
    let expected: Vec<Bytes> = (0..20_u8).map(|i| Bytes::from(vec![0xa1, i])).collect();
    for conn in server.registry.iter() {
        for message in &expected {
            assert!(
                conn.try_send(topgun_server::network::OutboundMessage::Binary(message.clone()))
            );
        }
    }
    let controller = Arc::clone(&server.controller);
    let registry = Arc::clone(&server.registry);
    let client = server.http();

    controller.trigger_shutdown();
    let ready = client.get(server.url("/health/ready")).send().await.expect("readiness answers");
    assert_eq!(ready.status(), 503);
    let health: serde_json::Value = client
        .get(server.url("/health"))
        .send()
        .await
        .expect("health answers")
        .json()
        .await
        .unwrap();
    assert_eq!(health["state"], "draining");

    for ws in &mut clients {
        let (received, _) = next_messages(ws, expected.len()).await;
        assert_eq!(received, expected);
        let close = expect_close(ws).await;
        assert_eq!(u16::from(close.code), 1001);
        assert_eq!(close.reason.as_str(), "server shutting down");
    }
    server.join().await.expect("serve() returns Ok");
    assert_eq!(controller.health_state(), topgun_server::network::HealthState::Stopped);
    assert_eq!(registry.count(), 0);
}

/// A WebSocket client that completes the handshake over raw TCP and then does nothing on its
/// own: it never answers pings, never acknowledges a close and, with a small receive buffer,
/// stops draining the server's writes as soon as the kernel buffers fill.
pub async fn raw_ws_client(addr: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let mut stream = socket.connect(addr).await.expect("connect");
    let request = format!(
        "GET /ws HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send handshake");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .expect("handshake in time");
        assert_eq!(read.expect("read handshake"), 1, "server closed during the handshake");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
}

/// Writes one masked binary frame (under 126 bytes) on a raw client stream.
pub async fn raw_send_binary(stream: &mut TcpStream, payload: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let len = u8::try_from(payload.len()).ok().filter(|len| *len < 126).expect("a short frame");
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x82, 0x80 | len];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key));
    stream.write_all(&frame).await.expect("send a raw frame");
}

/// Reads a raw stream until the server closes it; returns everything received.
pub async fn read_until_eof(stream: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut received))
        .await
        .expect("server closes in time")
        .ok();
    received
}

/// The close code in the first close frame (opcode 0x8) of a raw server-to-client byte stream.
pub fn raw_close_code(bytes: &[u8]) -> Option<u16> {
    let mut rest = bytes;
    while rest.len() >= 2 {
        let opcode = rest[0] & 0x0f;
        let (len, header) = match rest[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => (usize::try_from(u64::from_be_bytes(rest[2..10].try_into().ok()?)).ok()?, 10),
            len => (usize::from(len), 2),
        };
        let payload = rest.get(header..header + len)?;
        if opcode == 0x8 {
            return payload.get(..2).map(|code| u16::from_be_bytes([code[0], code[1]]));
        }
        rest = &rest[header + len..];
    }
    None
}

/// This process's resident memory in bytes (Linux): `VmRSS` now, or `VmHWM`, the peak so far.
pub fn resident_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("memory line");
    kib * 1024
}

/// The value of one sample, as rendered, in a Prometheus text exposition; `labels` must match
/// exactly.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> String {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, found) = match series.split_once('{') {
            Some((metric, rest)) => {
                let mut found: Vec<String> =
                    rest.trim_end_matches('}').split(',').map(str::to_owned).collect();
                found.sort();
                (metric, found)
            }
            None => (series, Vec::new()),
        };
        if metric == name && found == wanted {
            return value.to_owned();
        }
    }
    panic!("no sample {name}{labels:?} in:\n{exposition}");
}

/// A raw WebSocket client for protocol tests: it writes whatever frames a test builds (any
/// bits, masked or not, compressed or not) and reads the server's frames one at a time.
pub struct RawClient {
    stream: TcpStream,
    buffered: Vec<u8>,
    /// The server's handshake response, head only.
    pub response: String,
}

/// One frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// RSV1: the frame's message is compressed (permessage-deflate).
    pub rsv1: bool,
    /// Opcode (0x1 text, 0x2 binary, 0x8 close, 0x9 ping, 0xA pong, 0x0 continuation).
    pub opcode: u8,
    /// Payload as sent (still compressed when `rsv1`).
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawClient {
    /// Completes the handshake at `/ws`, offering `extensions` as `Sec-WebSocket-Extensions`.
    pub async fn connect(addr: SocketAddr, extensions: Option<&str>) -> Self {
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let offer =
            extensions.map(|e| format!("sec-websocket-extensions: {e}\r\n")).unwrap_or_default();
        let request = format!(
            "GET /ws HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n{offer}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("send handshake");
        let mut client = Self { stream, buffered: Vec::new(), response: String::new() };
        let end = loop {
            if let Some(end) = client.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(client.fill().await, "server closed during the handshake");
        };
        client.response = String::from_utf8_lossy(&client.buffered[..end]).into_owned();
        client.buffered.drain(..end);
        assert!(client.response.starts_with("HTTP/1.1 101"), "{}", client.response);
        client
    }

    /// The `Sec-WebSocket-Extensions` the server answered with, if any.
    pub fn extensions(&self) -> Option<&str> {
        self.response.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions").then(|| value.trim())
        })
    }

    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let before = self.buffered.len();
        self.buffered.reserve(16 * 1024);
        let read = tokio::time::timeout(DEADLINE, self.stream.read_buf(&mut self.buffered))
            .await
            .expect("the server answers in time")
            .unwrap_or(0);
        debug_assert_eq!(self.buffered.len(), before + read);
        read > 0
    }

    /// Sends one frame: `first` is the first byte (FIN, RSV bits, opcode), masked unless
    /// `masked` is false.
    pub async fn send_frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        self.send_frames(&[(first, payload, masked)]).await;
    }

    /// Sends `frames` (each as [`send_frame`](Self::send_frame) takes it) in one write, so
    /// the server reads them together.
    pub async fn send_frames(&mut self, frames: &[(u8, &[u8], bool)]) {
        use tokio::io::AsyncWriteExt;
        let mut bytes = Vec::new();
        for &(first, payload, masked) in frames {
            encode_client_frame(&mut bytes, first, payload, masked);
        }
        // The server may already have closed on an earlier frame; the test reads why.
        let _ = self.stream.write_all(&bytes).await;
    }

    /// The server's next frame; `None` once it has closed the connection.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buffered) {
                self.buffered.drain(..used);
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads frames until a close frame, skipping pings; returns it.
    pub async fn read_close(&mut self) -> RawFrame {
        loop {
            let frame = self.read_frame().await.expect("a close frame before the end");
            if frame.opcode == 0x8 {
                return frame;
            }
        }
    }

    /// Whether the server closes the TCP connection (after anything it still sends).
    pub async fn closed_by_server(&mut self) -> bool {
        while self.read_frame().await.is_some() {}
        true
    }
}

fn parse_server_frame(bytes: &[u8]) -> Option<(RawFrame, usize)> {
    let (first, second) = (*bytes.first()?, *bytes.get(1)?);
    assert_eq!(second & 0x80, 0, "the server masked a frame");
    let (len, header) = match second & 0x7f {
        126 => (usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])), 4),
        127 => (usize::try_from(u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)).ok()?, 10),
        len => (usize::from(len), 2),
    };
    let payload = bytes.get(header..header + len)?.to_vec();
    let frame =
        RawFrame { fin: first & 0x80 != 0, rsv1: first & 0x40 != 0, opcode: first & 0x0f, payload };
    Some((frame, header + len))
}

/// Appends a client frame to `out`: `first` is the first byte (FIN, RSV bits, opcode).
fn encode_client_frame(out: &mut Vec<u8>, first: u8, payload: &[u8], masked: bool) {
    out.push(first);
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | u8::try_from(len).expect("short")),
        len @ 126..=0xffff => {
            out.push(mask_bit | 0x7e);
            out.extend_from_slice(&u16::try_from(len).expect("medium").to_be_bytes());
        }
        len => {
            out.push(mask_bit | 0x7f);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key));
    } else {
        out.extend_from_slice(payload);
    }
}
