//! The WebSocket protocol (RFC 6455) as a client sees it, frame by frame, from a raw client.
//! Every test runs against each framing the transport has: its own (what the WebSocket routes
//! serve), without and with permessage-deflate negotiated, and tungstenite (what
//! `handle_socket` serves on an axum `WebSocketUpgrade` of one's own), so all answer alike.

use topgun_test_support as common;

use std::sync::Arc;

use bytes::Bytes;
use common::{RawClient, RawFrame, TestServer, test_config};
use topgun_server::network::{
    AppState, ConnectionConfig, ConnectionHandle, DeflateConfig, InboundHandler, NetworkConfig,
    NetworkModule, OutboundMessage, handle_socket,
};

/// Sends every binary message back as it came.
pub(crate) struct Echo;

#[async_trait::async_trait]
impl InboundHandler for Echo {
    async fn on_message(&self, conn: &Arc<ConnectionHandle>, payload: Bytes) {
        conn.try_send(OutboundMessage::Binary(payload));
    }
}

pub(crate) const FIN: u8 = 0x80;
pub(crate) const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
pub(crate) const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
pub(crate) const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Which framing serves the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// The engine's own framing, no extension negotiated.
    Frames,
    /// The engine's own framing with permessage-deflate.
    Deflate,
    /// axum's `WebSocketUpgrade` and tungstenite, through `handle_socket`.
    Tungstenite,
}

const ENGINES: [Engine; 3] = [Engine::Frames, Engine::Deflate, Engine::Tungstenite];

/// A server for `engine`: the module's own routes, or for tungstenite a router of one's own
/// that hands axum's socket to `handle_socket`, served until the guard drops.
struct Server {
    addr: std::net::SocketAddr,
    /// The module serving its own routes, stopped when dropped.
    _module: Option<TestServer>,
    /// The task serving a router of one's own.
    router: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.router {
            task.abort();
        }
    }
}

async fn start(engine: Engine, max_message_size: usize) -> Server {
    let config = config(max_message_size);
    if engine != Engine::Tungstenite {
        let server = TestServer::with_handler(config, Echo).await;
        return Server { addr: server.addr, _module: Some(server), router: None };
    }
    let state = NetworkModule::new(config).with_handler(Echo).app_state();
    let (max_message, max_frame) =
        (state.config.connection.max_message_size, state.config.connection.max_frame_size);
    let router = axum::Router::new()
        .route(
            "/ws",
            axum::routing::get(
                move |ws: axum::extract::ws::WebSocketUpgrade,
                      axum::extract::State(state): axum::extract::State<AppState>| async move {
                    ws.max_message_size(max_message)
                        .max_frame_size(max_frame)
                        .on_upgrade(move |socket| handle_socket(socket, state))
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Server { addr, _module: None, router: Some(task) }
}

pub(crate) fn config(max_message_size: usize) -> NetworkConfig {
    NetworkConfig {
        connection: ConnectionConfig {
            permessage_deflate: Some(DeflateConfig::default()),
            max_message_size,
            max_frame_size: max_message_size,
            ..ConnectionConfig::default()
        },
        ..test_config()
    }
}

async fn connect(server: &Server, engine: Engine) -> RawClient {
    let offer = (engine == Engine::Deflate).then_some("permessage-deflate; client_max_window_bits");
    let client = RawClient::connect(server.addr, offer).await;
    assert_eq!(client.extensions().is_some(), engine == Engine::Deflate, "{}", client.response);
    client
}

/// The next frame that is not a ping.
async fn next_data(client: &mut RawClient) -> RawFrame {
    loop {
        let frame = client.read_frame().await.expect("a frame");
        if frame.opcode != PING {
            return frame;
        }
    }
}

/// One frame a test sends: its first byte, its payload, whether it is masked.
type Sent<'a> = (u8, &'a [u8], bool);

/// The close frame the server sends after `frames`, and that it then closes the connection.
async fn close_after(engine: Engine, frames: &[Sent<'_>]) -> (u16, String) {
    let server = start(engine, 1 << 20).await;
    let mut client = connect(&server, engine).await;
    for (first, payload, masked) in frames {
        client.send_frame(*first, payload, *masked).await;
    }
    let close = client.read_close().await;
    assert!(client.closed_by_server().await);
    let code = close.close_code().expect("a close code");
    (code, String::from_utf8_lossy(&close.payload[2..]).into_owned())
}

#[tokio::test]
async fn a_bad_frame_is_answered_with_its_close_after_the_messages_before_it() {
    // One write: a message, then a frame with a reserved bit set, then a ping. The message is
    // still answered, then the connection fails; the ping behind the bad frame is never read.
    for engine in [Engine::Frames, Engine::Deflate] {
        let server = start(engine, 1 << 20).await;
        let mut client = connect(&server, engine).await;
        client
            .send_frames(&[
                (FIN | BINARY, b"before", true),
                (FIN | RSV2 | BINARY, b"bad", true),
                (FIN | PING, b"after", true),
            ])
            .await;
        let echo = client.read_frame().await.expect("the echo");
        assert_eq!((echo.opcode, echo.payload.as_slice()), (BINARY, &b"before"[..]), "{engine:?}");
        let close = client.read_frame().await.expect("the close");
        assert_eq!(close.close_code(), Some(1002), "{engine:?}: {close:?}");
    }
}

#[tokio::test]
async fn a_fragmented_message_arrives_whole_with_control_frames_between_its_fragments() {
    for engine in ENGINES {
        let server = start(engine, 1 << 20).await;
        let mut client = connect(&server, engine).await;
        client.send_frame(BINARY, b"one ", true).await;
        client.send_frame(FIN | PING, b"between", true).await;
        client.send_frame(CONTINUATION, b"two ", true).await;
        client.send_frame(FIN | PONG, b"", true).await;
        client.send_frame(FIN | CONTINUATION, b"three", true).await;
        let pong = next_data(&mut client).await;
        assert_eq!((pong.opcode, pong.payload.as_slice()), (PONG, &b"between"[..]), "{engine:?}");
        let echo = next_data(&mut client).await;
        assert_eq!((echo.opcode, echo.fin), (BINARY, true), "{engine:?}");
        assert_eq!(echo.payload, b"one two three", "{engine:?}");
    }
}

#[tokio::test]
async fn the_close_handshake_echoes_the_code_and_ends_the_connection() {
    for engine in ENGINES {
        let server = start(engine, 1 << 20).await;
        let mut client = connect(&server, engine).await;
        let mut payload = 1000_u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        client.send_frame(FIN | CLOSE, &payload, true).await;
        let close = client.read_close().await;
        assert_eq!(close.close_code(), Some(1000), "{engine:?}");
        assert!(client.closed_by_server().await);
    }
}

#[tokio::test]
async fn frames_breaking_the_framing_rules_get_1002() {
    let long_ping = [0_u8; 126];
    let cases: [(&str, &[Sent<'_>]); 7] = [
        ("unmasked", &[(FIN | BINARY, b"x", false)]),
        ("RSV2 set", &[(FIN | RSV2 | BINARY, b"x", true)]),
        ("continuation of nothing", &[(FIN | CONTINUATION, b"x", true)]),
        (
            "new message inside a fragmented one",
            &[(BINARY, b"a", true), (FIN | BINARY, b"b", true)],
        ),
        ("fragmented ping", &[(PING, b"x", true)]),
        ("ping over 125 bytes", &[(FIN | PING, &long_ping, true)]),
        ("reserved opcode", &[(FIN | 0x3, b"x", true)]),
    ];
    for engine in ENGINES {
        for (what, frames) in cases {
            let (code, reason) = close_after(engine, frames).await;
            assert_eq!(code, 1002, "{engine:?}, {what}: {reason}");
            assert!(reason.starts_with("protocol error"), "{engine:?}, {what}: {reason}");
        }
    }
}

#[tokio::test]
async fn a_bad_close_frame_gets_1002() {
    let cases: [(&str, &[u8]); 3] = [
        ("one byte", &[0x03]),
        ("code 1005, which no peer may send", &1005_u16.to_be_bytes()),
        ("code 999", &999_u16.to_be_bytes()),
    ];
    for engine in ENGINES {
        for (what, payload) in cases {
            let (code, _) = close_after(engine, &[(FIN | CLOSE, payload, true)]).await;
            assert_eq!(code, 1002, "{engine:?}, {what}");
        }
    }
}

#[tokio::test]
async fn text_that_is_not_utf8_gets_1007_and_valid_text_1003() {
    for engine in ENGINES {
        let (code, _) = close_after(engine, &[(FIN | TEXT, b"\xff\xfe", true)]).await;
        assert_eq!(code, 1007, "{engine:?}");
        // Split inside a character: valid once whole.
        let (code, _) =
            close_after(engine, &[(TEXT, b"caf\xc3", true), (FIN | CONTINUATION, b"\xa9", true)])
                .await;
        assert_eq!(code, 1003, "{engine:?}");
    }
}

#[tokio::test]
async fn text_that_breaks_utf8_fails_on_the_fragment_that_breaks_it() {
    for engine in ENGINES {
        let server = start(engine, 1 << 20).await;
        let mut client = connect(&server, engine).await;
        // The rest of the message never comes: the close must not wait for it.
        client.send_frame(TEXT, b"fine so far \xce\xba\xff", true).await;
        let close = client.read_close().await;
        assert_eq!(close.close_code(), Some(1007), "{engine:?}");
        // A continuation that breaks it fails there too.
        let mut client = connect(&server, engine).await;
        client.send_frame(TEXT, b"caf", true).await;
        client.send_frame(CONTINUATION, b"\xc3\x28", true).await;
        let close = client.read_close().await;
        assert_eq!(close.close_code(), Some(1007), "{engine:?}: continuation");
    }
}

#[tokio::test]
async fn a_message_over_the_limit_across_fragments_gets_1009() {
    for engine in ENGINES {
        let server = start(engine, 1024).await;
        let mut client = connect(&server, engine).await;
        client.send_frame(BINARY, &[7; 600], true).await;
        client.send_frame(FIN | CONTINUATION, &[7; 600], true).await;
        let close = client.read_close().await;
        assert_eq!(close.close_code(), Some(1009), "{engine:?}");
    }
}

#[tokio::test]
async fn rsv1_on_a_connection_without_compression_gets_1002() {
    let (code, reason) =
        close_after(Engine::Tungstenite, &[(FIN | RSV1 | BINARY, b"x", true)]).await;
    assert_eq!(code, 1002, "{reason}");
    // With compression: RSV1 belongs on a data message's first frame only.
    let (code, _) = close_after(Engine::Deflate, &[(FIN | RSV1 | PING, b"", true)]).await;
    assert_eq!(code, 1002);
    let compressed = deflate(b"abcabcabc");
    let (code, _) = close_after(
        Engine::Deflate,
        &[(BINARY, b"", true), (FIN | RSV1 | CONTINUATION, &compressed, true)],
    )
    .await;
    assert_eq!(code, 1002);
}

/// `payload` compressed as a permessage-deflate client does: raw deflate, sync flush, the
/// four-byte tail removed.
pub(crate) fn deflate(payload: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut compressor = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    compressor.compress_vec(payload, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A server frame's compressed payload, inflated.
pub(crate) fn inflate(payload: &[u8]) -> Vec<u8> {
    use flate2::{Decompress, FlushDecompress};
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut inflater = Decompress::new(false);
    let mut out = Vec::with_capacity(64 * 1024);
    inflater.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    out
}
