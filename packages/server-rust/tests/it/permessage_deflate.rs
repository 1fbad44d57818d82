//! permessage-deflate (RFC 7692): what is negotiated, what goes compressed, and that a
//! compressed message cannot cost more than the limit.

use topgun_test_support as common;

use bytes::Bytes;
use common::{RawClient, TestServer, test_config};
use topgun_server::network::{
    ConnectionConfig, ConnectionKind, DeflateConfig, NetworkConfig, OutboundMessage,
};

use crate::rfc6455::{BINARY, CONTINUATION, Echo, FIN, PING, RSV1, config, deflate, inflate};

const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A MsgPack-like payload with the same keys over and over, as TopGun's batches are.
fn repetitive(len: usize) -> Vec<u8> {
    b"\x83\xa4type\xa8CLIENT_OP\xa7mapName\xa5todos\xa3key\xa6item-1"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

#[tokio::test]
async fn off_by_default_no_extension_is_answered() {
    let server = TestServer::with_handler(test_config(), Echo).await;
    let client = RawClient::connect(server.addr, Some(BROWSER_OFFER)).await;
    assert_eq!(client.extensions(), None, "{}", client.response);
}

#[tokio::test]
async fn offers_are_negotiated_and_unsupported_ones_declined() {
    let server = TestServer::with_handler(config(1 << 20), Echo).await;
    for (offer, answer) in [
        (BROWSER_OFFER, Some(AGREED.to_owned())),
        (
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12",
            Some(format!("{AGREED}; server_max_window_bits=12")),
        ),
        ("permessage-deflate; server_max_window_bits=8", None),
        ("permessage-deflate; mystery_parameter", None),
        ("x-webkit-deflate-frame", None),
    ] {
        let client = RawClient::connect(server.addr, Some(offer)).await;
        assert_eq!(client.extensions().map(str::to_owned), answer, "{offer}");
    }
}

#[tokio::test]
async fn large_messages_go_compressed_small_ones_plain() {
    let server = TestServer::with_handler(config(1 << 20), Echo).await;
    let mut client = RawClient::connect(server.addr, Some(BROWSER_OFFER)).await;
    // Compressed across two fragments, RSV1 on the first only.
    let payload = repetitive(4096);
    let compressed = deflate(&payload);
    let (head, tail) = compressed.split_at(compressed.len() / 2);
    client.send_frame(RSV1 | BINARY, head, true).await;
    client.send_frame(FIN | CONTINUATION, tail, true).await;
    let echo = next_data(&mut client).await;
    assert!(echo.rsv1, "a 4 KiB message goes compressed");
    assert!(echo.payload.len() * 3 < payload.len(), "{} bytes", echo.payload.len());
    assert_eq!(inflate(&echo.payload), payload);
    // Under the threshold: plain, though the client sent it compressed.
    let small = repetitive(100);
    client.send_frame(FIN | RSV1 | BINARY, &deflate(&small), true).await;
    let echo = next_data(&mut client).await;
    assert!(!echo.rsv1);
    assert_eq!(echo.payload, small);
    // An uncompressed message from the client is fine too.
    client.send_frame(FIN | BINARY, &payload, true).await;
    assert_eq!(inflate(&next_data(&mut client).await.payload), payload);
    // Operators see what was compressed: the two 4 KiB echoes, not the small one.
    let metrics = server.http().get(server.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert_eq!(common::sample(&metrics, "topgun_websocket_compressed_frames_total", &[]), "2");
    let bytes: usize =
        common::sample(&metrics, "topgun_websocket_compressed_bytes_total", &[]).parse().unwrap();
    assert!(bytes > 0 && bytes * 3 < 2 * payload.len(), "{bytes} compressed bytes");
}

#[tokio::test]
async fn a_decompression_bomb_closes_with_1009_without_inflating_it() {
    let limit = 1 << 20;
    let server = TestServer::with_handler(config(limit), Echo).await;
    let mut client = RawClient::connect(server.addr, Some(BROWSER_OFFER)).await;
    // 64 MiB of zeros in about 64 KiB: under every frame limit, 64 times the message limit.
    let bomb = deflate(&vec![0; 64 << 20]);
    assert!(bomb.len() < limit / 8, "{} bytes", bomb.len());
    let before = common::resident_bytes("VmRSS");
    client.send_frame(FIN | RSV1 | BINARY, &bomb, true).await;
    let close = client.read_close().await;
    assert_eq!(close.close_code(), Some(1009));
    let grown = common::resident_bytes("VmRSS").saturating_sub(before);
    assert!(grown < 16 << 20, "the server grew by {grown} bytes");
}

#[tokio::test]
async fn data_that_does_not_inflate_closes_with_1007() {
    let server = TestServer::with_handler(config(1 << 20), Echo).await;
    let mut client = RawClient::connect(server.addr, Some(BROWSER_OFFER)).await;
    client.send_frame(FIN | RSV1 | BINARY, b"\xff\xff\xff\xff not deflate", true).await;
    let close = client.read_close().await;
    assert_eq!(close.close_code(), Some(1007));
}

#[tokio::test]
async fn a_broadcast_is_compressed_once_for_every_compressing_recipient() {
    let server = TestServer::with_handler(config(1 << 20), Echo).await;
    let mut compressing = Vec::new();
    for _ in 0..3 {
        compressing.push(RawClient::connect(server.addr, Some(BROWSER_OFFER)).await);
    }
    let mut plain = RawClient::connect(server.addr, None).await;
    server.until_connections(4, "all connected").await;
    let payload = Bytes::from(repetitive(2048));
    server.registry.broadcast(payload.clone(), ConnectionKind::Client);
    assert_eq!(inflate(&same_compressed_frame(&mut compressing).await), payload);
    let frame = next_data(&mut plain).await;
    assert_eq!((frame.rsv1, frame.payload.as_slice()), (false, &payload[..]));

    // A topic's publish takes the same path: one shared payload, compressed once.
    let topics = server.registry.topics();
    for conn in server.registry.iter() {
        topics.subscribe(&conn, "t").await.unwrap();
    }
    let published = Bytes::from(repetitive(3000));
    assert_eq!(topics.publish("t", published.clone()).queued, 4);
    assert_eq!(inflate(&same_compressed_frame(&mut compressing).await), published);
    assert_eq!(next_data(&mut plain).await.payload, published);
}

#[tokio::test]
async fn a_batch_frame_is_compressed_as_one_message() {
    let config = NetworkConfig {
        connection: ConnectionConfig {
            permessage_deflate: Some(DeflateConfig::default()),
            ..ConnectionConfig::default()
        },
        ..test_config()
    };
    let server = TestServer::with_handler(config, Echo).await;
    let mut client = RawClient::connect(server.addr, Some(BROWSER_OFFER)).await;
    server.until_connections(1, "connected").await;
    let conn = server.registry.iter().next().expect("a connection");
    let messages: Vec<Bytes> =
        (0..50).map(|i| Bytes::from(format!("{i}:{}", "op ".repeat(10)))).collect();
    // Queued in one go, before the writer runs: one BATCH frame.
    for message in &messages {
        assert!(conn.try_send(OutboundMessage::Binary(message.clone())));
    }
    let mut received = Vec::new();
    while received.len() < messages.len() {
        let frame = next_data(&mut client).await;
        let payload = if frame.rsv1 { inflate(&frame.payload) } else { frame.payload };
        received.extend(topgun_server::network::decode_frame(&payload).unwrap());
    }
    assert_eq!(received, messages);
}

/// The next data frame of each client, compressed, and (without context takeover) the same
/// bytes for every one of them.
async fn same_compressed_frame(clients: &mut [RawClient]) -> Vec<u8> {
    let mut compressed = Vec::new();
    for client in clients {
        let frame = next_data(client).await;
        assert!(frame.rsv1);
        compressed.push(frame.payload);
    }
    assert!(compressed.windows(2).all(|pair| pair[0] == pair[1]));
    compressed.swap_remove(0)
}

async fn next_data(client: &mut RawClient) -> common::RawFrame {
    loop {
        let frame = client.read_frame().await.expect("a frame");
        if frame.opcode != PING {
            return frame;
        }
    }
}

/// Bytes deflate cannot shrink (200 byte values, xorshift), reproducibly.
fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            u8::try_from(state % 200).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn incompressible_messages_go_out_plain_and_compression_keeps_working() {
    // What once broke the thread's compressor: bitmaps and random data of every size, then
    // a compressible message on the same connection and on a second one.
    let server = TestServer::with_handler(config(1 << 20), Echo).await;
    let mut client = RawClient::connect(server.addr, Some(BROWSER_OFFER)).await;
    let mut seed = 1;
    for (len, count) in [(256, 600), (1024, 100), (64 * 1024, 4)] {
        for _ in 0..count {
            seed += 1;
            let noise = incompressible(len, seed);
            client.send_frame(FIN | BINARY, &noise, true).await;
            let echo = next_data(&mut client).await;
            assert!(!echo.rsv1, "{len} bytes that do not shrink go uncompressed");
            assert_eq!(echo.payload, noise);
        }
    }
    let mut other = RawClient::connect(server.addr, Some(BROWSER_OFFER)).await;
    for client in [&mut client, &mut other] {
        let payload = repetitive(4096);
        client.send_frame(FIN | BINARY, &payload, true).await;
        let echo = next_data(client).await;
        assert!(echo.rsv1, "compression still works");
        assert_eq!(inflate(&echo.payload), payload);
    }
    let metrics = server.http().get(server.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    for source in ["handler", "transport"] {
        assert_eq!(common::sample(&metrics, "topgun_panics_total", &[("source", source)]), "0");
    }
}
