//! Every decoder that reads bytes a client controls, fuzzed with property-based tests (proptest,
//! stable Rust): `BATCH` frames, `POST /sync` bodies, `Timestamp`s and whole numbers, the
//! heartbeat's `PING` recognition, forwarded headers, PROXY headers and compressed
//! (permessage-deflate) messages. Inputs are arbitrary bytes and mutations of real client
//! bytes (from TopGun's client serializer). None may panic; each must answer as documented.
//!
//! `TOPGUN_FUZZ_CASES` sets the cases per target (default 2 000, a few seconds in all); the
//! longer run recorded in docs/RELIABILITY.md used 1 000 000.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde::Deserialize;
use topgun_core::Timestamp;
use topgun_server::network::{
    ConnectionConfig, ConnectionKind, ConnectionRegistry, Heartbeat, InboundHandler, InflateError,
    NetworkConfig, NetworkModule, StubHandler, decode_frame, decode_frame_shared, encode_batch,
};
use tower::ServiceExt;

/// `{type:'PING', timestamp: 1796023824376}` from TopGun's client serializer.
const CLIENT_PING: &[u8] =
    b"\xde\x00\x02\xa4type\xa4PING\xa9timestamp\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00";
/// `{millis: 1796023824376, counter: 0, nodeId: 'n'}` from the same serializer.
const CLIENT_HLC: &[u8] =
    b"\xde\x00\x03\xa6millis\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00\xa7counter\x00\xa6nodeId\xa1n";

/// The client's HTTP sync body and a `CLIENT_OP`, from its serializer (hex).
const CLIENT_SYNC_BODY: &str = "de0003a8636c69656e744964a8636c69656e742d31a9636c69656e74486c63de0003a66d696c6c6973cb427a22b5caff8000a7636f756e74657200a66e6f64654964a8636c69656e742d31a873796e634d61707391de0002a76d61704e616d65a5746f646f73b16c61737453796e6354696d657374616d70de0003a66d696c6c6973cb427a22b5cac10000a7636f756e74657203a66e6f64654964a8636c69656e742d31";
const CLIENT_OP: &str = "de0002a474797065a9434c49454e545f4f50a77061796c6f6164de0003a76d61704e616d65a5746f646f73a36b6579a26b31a67265636f7264de0002a576616c7565de0002a57469746c65a178a4646f6e65c2a974696d657374616d70de0003a66d696c6c6973cb427a22b5caff8000a7636f756e74657201a66e6f64654964a8636c69656e742d31";

fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

/// Real client messages, and the server's own `BATCH` frames carrying them.
fn seeds() -> Vec<Vec<u8>> {
    let messages =
        [CLIENT_PING.to_vec(), CLIENT_HLC.to_vec(), hex(CLIENT_SYNC_BODY), hex(CLIENT_OP)];
    let batch = encode_batch(&messages.iter().cloned().map(Bytes::from).collect::<Vec<_>>());
    let mut seeds = messages.to_vec();
    seeds.push(batch.to_vec());
    seeds.push(encode_batch(&[Bytes::new()]).to_vec());
    seeds
}

fn config() -> Config {
    let cases =
        std::env::var("TOPGUN_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

/// One edit of a seed: overwrite, insert or delete a byte, or truncate.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Insert(at, byte)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: Vec<Edit>) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len();
        match edit {
            Edit::Set(at, byte) if len > 0 => bytes[at % len] = byte,
            Edit::Insert(at, byte) => bytes.insert(at % (len + 1), byte),
            Edit::Delete(at) if len > 0 => {
                bytes.remove(at % len);
            }
            Edit::Truncate(at) => bytes.truncate(at % (len + 1)),
            _ => {}
        }
    }
    bytes
}

/// Arbitrary bytes, or a real client message or frame with a few edits.
fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (prop::sample::select(seeds()), prop::collection::vec(edit(), 1..8))
            .prop_map(|(seed, edits)| apply(seed, edits)),
    ]
}

fn float64(value: f64) -> Vec<u8> {
    let mut bytes = vec![0xcb];
    bytes.extend_from_slice(&value.to_be_bytes());
    bytes
}

#[derive(serde::Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(serde::Deserialize)]
struct Millis(#[serde(deserialize_with = "topgun_core::number::deserialize_u64")] u64);

proptest! {
    #![proptest_config(config())]

    #[test]
    fn batch_frames_decode_or_fail_cleanly(frame in client_bytes()) {
        let copied = decode_frame(&frame);
        let shared = decode_frame_shared(&Bytes::from(frame.clone()));
        prop_assert_eq!(&copied, &shared, "both decoders agree");
        if let Ok(messages) = copied {
            prop_assert!(!messages.is_empty());
            let carried: usize = messages.iter().map(Bytes::len).sum();
            prop_assert!(carried <= frame.len(), "messages are slices of the frame");
        }
    }

    #[test]
    fn batches_round_trip(messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 2..16)) {
        let messages: Vec<Bytes> = messages.into_iter().map(Bytes::from).collect();
        prop_assert_eq!(decode_frame(&encode_batch(&messages)).unwrap(), messages);
    }

    #[test]
    fn timestamps_decode_or_fail_cleanly(bytes in client_bytes()) {
        if let Ok(timestamp) = rmp_serde::from_slice::<Timestamp>(&bytes) {
            let again = rmp_serde::to_vec_named(&timestamp).unwrap();
            prop_assert_eq!(rmp_serde::from_slice::<Timestamp>(&again).unwrap(), timestamp);
        }
    }

    #[test]
    fn a_float_is_a_whole_number_exactly_when_it_should_be(value in any::<f64>()) {
        let decoded = rmp_serde::from_slice::<Millis>(&float64(value)).map(|m| m.0);
        #[allow(clippy::cast_precision_loss)]
        let whole = value.is_finite()
            && value.fract() == 0.0
            && (0.0..=topgun_core::number::MAX_SAFE_INTEGER as f64).contains(&value);
        prop_assert_eq!(decoded.is_ok(), whole, "{}", value);
        if let Ok(millis) = decoded {
            #[allow(clippy::cast_precision_loss)]
            let back = millis as f64;
            prop_assert_eq!(back.to_bits(), value.abs().to_bits(), "exactly the float's value");
        }
    }

    #[test]
    fn only_a_ping_is_answered_inline(payload in client_bytes()) {
        let registry = ConnectionRegistry::new();
        let (conn, _queue) = registry.register(ConnectionKind::Client, &ConnectionConfig::default());
        let answered = Heartbeat::new(StubHandler).answer_inline(&conn, &Bytes::from(payload.clone()));
        let is_ping = rmp_serde::from_slice::<Kind>(&payload).is_ok_and(|k| k.kind == "PING")
            && rmp::decode::read_map_len(&mut payload.as_slice()).is_ok_and(|n| n <= 4);
        prop_assert_eq!(answered, is_ping);
    }
}

/// `POST /sync` bodies, through the whole router and middleware stack (in process): every body
/// is answered `200` (well-formed MsgPack, handed to the handler) or `400`, never `5xx`.
#[test]
fn sync_bodies_are_answered_200_or_400() {
    let module = NetworkModule::new(NetworkConfig::default());
    let router = module.build_router();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let router = Arc::new(router);
    proptest!(config(), |(body in client_bytes())| {
        let request = http::Request::post("/sync")
            .header("content-type", "application/x-msgpack")
            .body(axum::body::Body::from(body.clone()))
            .unwrap();
        let status = runtime.block_on((*router).clone().oneshot(request)).unwrap().status();
        let well_formed = serde::de::IgnoredAny::deserialize(&mut rmp_serde::Deserializer::new(body.as_slice())).is_ok();
        prop_assert!(status == 200 || status == 400, "{status}");
        if status == 200 {
            prop_assert!(well_formed, "accepted a body that is not MsgPack");
        }
    });
}

/// Header values a client controls, built from the pieces forwarded headers are made of.
fn forwarded_value() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[0-9.:a-fA-F\\[\\]]{0,24}",
        Just("for=".to_owned()),
        Just("\"".to_owned()),
        Just(";".to_owned()),
        Just(", ".to_owned()),
        Just("unknown".to_owned()),
        Just("203.0.113.9".to_owned()),
        Just("[2001:db8::1]:80".to_owned()),
        "[ -~]{0,8}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

/// Every address a forwarded header's entries spell (`1.2.3.4`, `for="[::1]:80"`, ...), with
/// IPv4-mapped IPv6 addresses as IPv4.
fn named_addresses(value: &str) -> Vec<std::net::IpAddr> {
    value
        .split([',', ';'])
        .filter_map(|entry| {
            let entry = entry.trim();
            let entry = entry.strip_prefix("for=").unwrap_or(entry).trim_matches('"');
            entry
                .parse::<std::net::IpAddr>()
                .ok()
                .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|addr| addr.ip()))
        })
        .map(|ip| match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            std::net::IpAddr::V4(_) => ip,
        })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn forwarded_headers_resolve_to_the_peer_or_an_address_they_name(
        value in forwarded_value(),
        forwarded in any::<bool>(),
        trusted in any::<bool>(),
    ) {
        use topgun_server::network::{ForwardedHeader, IpNet, resolve_client_ip};
        let header = if forwarded { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
        let name = if forwarded { "forwarded" } else { "x-forwarded-for" };
        let Ok(header_value) = http::HeaderValue::from_str(&value) else { return Ok(()) };
        let mut headers = http::HeaderMap::new();
        headers.insert(name, header_value);
        let peer: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let proxies: Vec<IpNet> = if trusted { vec!["127.0.0.0/8".parse().unwrap()] } else { vec![] };
        let client = resolve_client_ip(peer, &headers, &proxies, header);
        if trusted {
            let named = client == peer || named_addresses(&value).contains(&client);
            prop_assert!(named, "{client} is neither the peer nor in {value:?}");
        } else {
            prop_assert_eq!(client, peer, "an untrusted peer's header is ignored");
        }
    }
}

/// Arbitrary bytes after the start of each kind of PROXY header, and none.
fn proxy_header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let prefix = prop_oneof![
        Just(b"PROXY ".to_vec()),
        Just(b"PROXY TCP4 203.0.113.9 10.0.0.1 ".to_vec()),
        Just(b"\r\n\r\n\0\r\nQUIT\n".to_vec()),
        Just(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec()),
        Just(Vec::new()),
    ];
    (prefix, prop::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(prefix, tail)| [prefix, tail].concat())
}

#[test]
fn proxy_protocol_headers_parse_or_fail_cleanly_and_never_read_past_the_header() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    proptest!(config(), |(input in proxy_header_bytes())| {
        let mut rest = input.as_slice();
        let result = runtime.block_on(topgun_server::network::read_proxy_header(&mut rest));
        let consumed = input.len() - rest.len();
        if result.is_ok() {
            // A v1 line ends at its CRLF; a v2 header is its 16 bytes and declared length.
            let v1_end = input.windows(2).position(|w| w == b"\r\n").map(|at| at + 2);
            let v2_end = (input.len() >= 16)
                .then(|| 16 + usize::from(u16::from_be_bytes([input[14], input[15]])));
            prop_assert!(Some(consumed) == v1_end || Some(consumed) == v2_end, "{consumed}");
        }
    });
}

/// Compressed client messages: real client bytes deflated as a client does, mutated.
fn compressed_message() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
    let seeds: Vec<Vec<u8>> = seeds().iter().map(|seed| seed.repeat(8)).collect();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|bytes| (bytes, None)),
        (prop::sample::select(seeds.clone())).prop_map(|plain| (deflate(&plain), Some(plain))),
        (prop::sample::select(seeds), prop::collection::vec(edit(), 1..4))
            .prop_map(|(plain, edits)| (apply(deflate(&plain), edits), None)),
    ]
}

/// `payload` as a permessage-deflate client compresses it: raw deflate, sync flush, tail cut.
fn deflate(payload: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut compressor = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    compressor.compress_vec(payload, &mut out, FlushCompress::Sync).unwrap();
    out.truncate(out.len() - 4);
    out
}

proptest! {
    #![proptest_config(config())]

    /// Whatever a client compresses, mangles or makes up inflates to at most the limit, or
    /// fails as too big or invalid; a real message comes back exactly, or as too big when it
    /// is over the limit.
    #[test]
    fn compressed_messages_inflate_within_the_limit_or_fail_cleanly(
        (compressed, plain) in compressed_message(),
        limit in 0_usize..2048,
    ) {
        match (topgun_server::network::inflate_message(&compressed, limit), plain) {
            (Ok(inflated), Some(plain)) => prop_assert_eq!(&inflated[..], &plain[..]),
            (Ok(inflated), None) => prop_assert!(inflated.len() <= limit),
            (Err(InflateError::TooBig { limit: reported }), plain) => {
                prop_assert_eq!(reported, limit);
                if let Some(plain) = plain {
                    prop_assert!(plain.len() > limit);
                }
            }
            (Err(err), plain) => prop_assert!(plain.is_none(), "{err}"),
        }
    }
}
