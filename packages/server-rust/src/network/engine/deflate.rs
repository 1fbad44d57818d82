//! permessage-deflate (RFC 7692): what the server agrees to, and how it compresses and
//! inflates messages without holding a compressor or a window per connection.
//!
//! Off unless [`ConnectionConfig::permessage_deflate`] is set. When it is, an upgrade whose
//! `Sec-WebSocket-Extensions` offers permessage-deflate with parameters the server can honour
//! is answered with
//!
//! ```text
//! Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover
//! ```
//!
//! (plus `server_max_window_bits=N` when the client asked for a smaller window). Both sides
//! start every message from an empty window, which is what keeps an idle connection free of
//! deflate state: compressors and decompressors belong to the worker thread, are taken only
//! while a message is being compressed or inflated, and are reset after it. A client that
//! keeps its context anyway would send data the server cannot inflate, so the server always
//! asks for `client_no_context_takeover` (the RFC lets a server ask for it unasked). Offers the
//! server cannot honour (unknown or repeated parameters, `server_max_window_bits=8`, which
//! zlib cannot produce) are skipped; if none is left, the connection opens uncompressed.
//!
//! Without context takeover a compressed message depends on nothing but itself, so a
//! broadcast is compressed once and the same bytes are framed for every recipient that
//! negotiated the same window ([`compress`] keeps the last few shared payloads it compressed).
//! Messages below [`DeflateConfig::threshold`] go uncompressed, as do those that deflate would
//! not make smaller: the RFC lets every message choose.
//!
//! Inflating is bounded: it stops with [`InflateError::TooBig`] as soon as the output passes
//! the connection's `max_message_size`, having allocated at most that much, so a small frame
//! that would inflate to gigabytes (a decompression bomb) costs nothing but its own bytes.
//!
//! [`ConnectionConfig::permessage_deflate`]: crate::network::ConnectionConfig::permessage_deflate

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use http::{HeaderMap, HeaderValue, header::SEC_WEBSOCKET_EXTENSIONS};

/// permessage-deflate settings; see
/// [`ConnectionConfig::permessage_deflate`](crate::network::ConnectionConfig::permessage_deflate).
///
/// ```
/// use topgun_server::network::{ConnectionConfig, DeflateConfig};
///
/// let config = ConnectionConfig {
///     permessage_deflate: Some(DeflateConfig { threshold: 512, ..DeflateConfig::default() }),
///     ..ConnectionConfig::default()
/// };
/// assert_eq!(config.permessage_deflate.unwrap().level, 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Outbound messages shorter than this many bytes are sent uncompressed (a `BATCH` frame
    /// counts as one message). Default: 256.
    pub threshold: usize,
    /// zlib compression level, 0 (none) to 9 (smallest, slowest). Default: 1, the fastest:
    /// on TopGun's map events it already sends about a quarter of the bytes, and a `BATCH`
    /// frame is compressed for each connection it goes to, where level 6 cost more than twice
    /// the CPU for about 15 % fewer bytes (docs/PERFORMANCE.md).
    pub level: u32,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self { threshold: 256, level: 1 }
    }
}

/// What was agreed with one client: the window the server compresses with (the client's
/// `server_max_window_bits`, 15 when it set none). Both sides reset their context after every
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed {
    pub(crate) window_bits: u8,
}

/// The first offer in `headers` the server can honour, and the response header that accepts it.
pub(crate) fn negotiate(headers: &HeaderMap) -> Option<(Agreed, HeaderValue)> {
    let agreed = headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(accept_offer)?;
    let both = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    let response = if agreed.window_bits < 15 {
        format!("{both}; server_max_window_bits={}", agreed.window_bits)
    } else {
        both.to_owned()
    };
    let value = HeaderValue::from_str(&response).expect("ASCII header value");
    Some((agreed, value))
}

/// One extension offer (`name; param; param=value`): `Some` when it is permessage-deflate with
/// parameters the server can honour.
fn accept_offer(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = [false; 4];
    let mut window_bits = 15;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let index = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                // zlib cannot deflate with a 256-byte window.
                window_bits = value.and_then(window_bits_value).filter(|bits| *bits >= 9)?;
                2
            }
            "client_max_window_bits" => {
                // The client's own window: any size inflates with the server's 15 bits.
                if value.is_some_and(|value| window_bits_value(value).is_none()) {
                    return None;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    Some(Agreed { window_bits })
}

/// A window size as the RFC spells it: 8 to 15, decimal, no leading zero.
fn window_bits_value(value: &str) -> Option<u8> {
    if value.starts_with('0') || value.len() > 2 {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// Why a compressed message could not be inflated by [`inflate_message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InflateError {
    /// It inflates past the limit; nothing past the limit was allocated.
    #[error("message inflates past {limit} bytes")]
    TooBig {
        /// The limit it passed.
        limit: usize,
    },
    /// It is not a valid deflate stream.
    #[error("invalid compressed data")]
    Invalid,
}

/// The four bytes a sender strips from the end of every compressed message, and the receiver
/// puts back before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    /// Idle compressors by window and level; one in use is out of the pool.
    static DEFLATERS: RefCell<Vec<(u8, u32, Compress)>> = const { RefCell::new(Vec::new()) };
}

/// Inflates one permessage-deflate message (the payloads of its frames, joined, as the peer
/// sent them: without the `00 00 ff ff` tail) the way the server inflates what clients send:
/// with an empty window, failing as soon as the output passes `limit` bytes and allocating no
/// more than `limit + 1` bytes for it.
///
/// ```
/// use topgun_server::network::{InflateError, inflate_message};
///
/// // "Hello" as RFC 7692 compresses it: raw deflate, sync flush, tail removed.
/// let compressed = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
/// assert_eq!(inflate_message(&compressed, 1024).unwrap(), "Hello");
/// assert_eq!(inflate_message(&compressed, 4), Err(InflateError::TooBig { limit: 4 }));
/// assert_eq!(inflate_message(b"\xff\xff", 1024), Err(InflateError::Invalid));
/// ```
///
/// # Errors
///
/// [`InflateError::TooBig`] past `limit`, [`InflateError::Invalid`] for data that is not a
/// deflate stream.
pub fn inflate_message(compressed: &[u8], limit: usize) -> Result<Bytes, InflateError> {
    // Taken out of the thread's slot while in use: if inflating fails or unwinds, the
    // decompressor is dropped with it and the next message gets a new one, never one left
    // in a state nobody knows.
    let mut inflater =
        INFLATER.with(|cell| cell.borrow_mut().take()).unwrap_or_else(|| Decompress::new(false));
    let result = inflate_with(&mut inflater, compressed, limit);
    if result.is_ok() {
        // The next message starts from an empty window.
        inflater.reset(false);
        INFLATER.with(|cell| *cell.borrow_mut() = Some(inflater));
    }
    result
}

fn inflate_with(
    inflater: &mut Decompress,
    compressed: &[u8],
    limit: usize,
) -> Result<Bytes, InflateError> {
    let bound = limit.saturating_add(1);
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).max(64).min(bound));
    for input in [compressed, &TAIL[..]] {
        let mut consumed = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() > limit {
                    return Err(InflateError::TooBig { limit });
                }
                // Grow geometrically, never past one byte over the limit.
                out.reserve_exact(out.len().max(64).min(bound - out.len()));
            }
            let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
            let status = inflater
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            #[allow(clippy::cast_possible_truncation)] // bounded by the input's length
            let read = (inflater.total_in() - before_in) as usize;
            consumed += read;
            if out.len() > limit {
                return Err(InflateError::TooBig { limit });
            }
            let wrote = inflater.total_out() != before_out;
            if status == Status::StreamEnd {
                return Ok(out.into());
            }
            // Done with this input once it is all read and the output was not cut short.
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if read == 0 && !wrote && out.len() < out.capacity() {
                break;
            }
        }
    }
    Ok(out.into())
}

/// Compresses `payload` with `window_bits` and `level`, or `None` when that would not make
/// it smaller. A payload other recipients share (a broadcast) is compressed once: the result
/// is kept with it for the next recipient with the same window.
pub(crate) fn compress(payload: &Bytes, window_bits: u8, level: u32) -> Option<Bytes> {
    if payload.is_unique() || payload.len() > SharedCompressed::MAX_PAYLOAD {
        return deflate(payload, window_bits, level);
    }
    let key = Key { ptr: payload.as_ptr() as usize, len: payload.len(), window_bits, level };
    if let Some(found) = SHARED.lookup(&key) {
        return found;
    }
    let compressed = deflate(payload, window_bits, level);
    SHARED.insert(key, payload.clone(), compressed.clone());
    compressed
}

fn deflate(payload: &[u8], window_bits: u8, level: u32) -> Option<Bytes> {
    // Taken out of the thread's pool while in use and given back only once it has finished
    // a message and been reset: a compressor that failed or unwound is dropped, never reused.
    let taken = DEFLATERS.with(|cell| {
        let mut pool = cell.borrow_mut();
        let found = pool.iter().position(|(b, l, _)| (*b, *l) == (window_bits, level))?;
        Some(pool.swap_remove(found).2)
    });
    let mut compressor = taken.unwrap_or_else(|| {
        Compress::new_with_window_bits(Compression::new(level), false, window_bits)
    });
    // A compressor bug must cost one message its compression, not the connection: the
    // message then goes out as it is.
    let outcome =
        std::panic::catch_unwind(AssertUnwindSafe(|| deflate_with(&mut compressor, payload)));
    match outcome {
        Ok(Some(out)) => {
            compressor.reset();
            DEFLATERS.with(|cell| cell.borrow_mut().push((window_bits, level, compressor)));
            // Only worth sending if it came out smaller.
            (out.len() < payload.len()).then(|| out.into())
        }
        Ok(None) => None,
        Err(_) => {
            tracing::error!(
                bytes = payload.len(),
                "compressor panicked; message sent uncompressed"
            );
            None
        }
    }
}

/// Compresses the whole of `payload` as one sync-flushed message, tail stripped: the stream
/// is always finished, however little the data shrinks, so the compressor can be reset and
/// reused. `None` when zlib reports an error (the compressor is then not reused).
fn deflate_with(compressor: &mut Compress, payload: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() + TAIL.len());
    let mut consumed = 0;
    loop {
        if out.len() == out.capacity() {
            // Incompressible data grows a little (stored or fixed-Huffman blocks): make room
            // for the rest of the stream rather than abandoning it halfway.
            out.reserve(payload.len() / 8 + 64);
        }
        let before = compressor.total_in();
        compressor.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync).ok()?;
        #[allow(clippy::cast_possible_truncation)] // bounded by the payload's length
        let read = (compressor.total_in() - before) as usize;
        consumed += read;
        // Done once the input is in and the flush fitted: zlib leaves room to spare only
        // when it has nothing more to write.
        if consumed == payload.len() && out.len() < out.capacity() {
            break;
        }
    }
    if !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    Some(out)
}

/// A shared payload is known by where its bytes are: the entry holds a clone of it, so those
/// bytes can be neither freed nor reused for another payload while the entry lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    ptr: usize,
    len: usize,
    window_bits: u8,
    level: u32,
}

/// The last few shared payloads compressed, with their compressed form.
struct SharedCompressed {
    entries: Mutex<VecDeque<(Key, Bytes, Option<Bytes>)>>,
}

impl SharedCompressed {
    /// Payloads kept at once; a broadcast is compressed for all its recipients within a few
    /// milliseconds, so only the latest ones matter.
    const ENTRIES: usize = 32;
    /// Larger payloads are compressed per recipient rather than kept.
    const MAX_PAYLOAD: usize = 256 * 1024;

    /// The compressed form kept for `key`: `Some(None)` when it was found not worth compressing.
    #[allow(clippy::option_option)]
    fn lookup(&self, key: &Key) -> Option<Option<Bytes>> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.iter().rev().find(|(k, ..)| k == key).map(|(_, _, compressed)| compressed.clone())
    }

    fn insert(&self, key: Key, payload: Bytes, compressed: Option<Bytes>) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.iter().any(|(k, ..)| *k == key) {
            return;
        }
        if entries.len() == Self::ENTRIES {
            entries.pop_front();
        }
        entries.push_back((key, payload, compressed));
    }
}

static SHARED: SharedCompressed = SharedCompressed { entries: Mutex::new(VecDeque::new()) };

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(value: &str) -> Option<(Agreed, HeaderValue)> {
        let mut headers = HeaderMap::new();
        headers.insert(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(value).unwrap());
        negotiate(&headers)
    }

    #[test]
    fn accepts_what_browsers_node_and_python_offer() {
        let both = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        // Chromium and Node `ws`.
        let (agreed, value) = offer("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(agreed.window_bits, 15);
        assert_eq!(value, both);
        // Python `websockets`.
        let (agreed, value) =
            offer("permessage-deflate; server_max_window_bits=12; client_max_window_bits=12")
                .unwrap();
        assert_eq!(agreed.window_bits, 12);
        assert_eq!(value.to_str().unwrap(), format!("{both}; server_max_window_bits=12"));
        // Firefox.
        assert!(offer("permessage-deflate").is_some());
        assert!(offer("PerMessage-Deflate; CLIENT_NO_CONTEXT_TAKEOVER").is_some());
        assert!(offer("permessage-deflate; server_max_window_bits=\"10\"").is_some());
    }

    #[test]
    fn declines_what_it_cannot_honour_and_takes_the_next_offer() {
        for declined in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
        ] {
            assert!(offer(declined).is_none(), "{declined:?} was accepted");
        }
        let (agreed, _) = offer(
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9",
        )
        .unwrap();
        assert_eq!(agreed.window_bits, 9);
    }

    #[test]
    fn round_trips_at_every_window() {
        let payload = Bytes::from(b"{\"type\":\"OP\",\"mapName\":\"todos\"}".repeat(40));
        for bits in 9..=15 {
            let compressed = deflate(&payload, bits, 6).unwrap();
            assert!(compressed.len() * 3 < payload.len());
            assert_eq!(inflate_message(&compressed, payload.len()).unwrap(), payload);
        }
        // What does not shrink is not compressed.
        assert!(deflate(b"\x01\x02\x03", 15, 6).is_none());
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = deflate(&vec![0u8; 16 << 20], 15, 9).unwrap();
        assert!(bomb.len() < 20_000, "{} bytes", bomb.len());
        assert_eq!(inflate_message(&bomb, 1 << 20), Err(InflateError::TooBig { limit: 1 << 20 }));
        assert_eq!(inflate_message(&bomb, 16 << 20).unwrap().len(), 16 << 20);
        assert_eq!(inflate_message(b"\xff\xff\xff", 100), Err(InflateError::Invalid));
    }

    /// Noise over an alphabet of `symbols` byte values, reproducibly: at 200 and up deflate
    /// cannot shrink it, and level 1 grows it a little.
    fn noise(len: usize, symbols: u64, state: &mut u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                u8::try_from(*state % symbols).unwrap()
            })
            .collect()
    }

    #[test]
    fn incompressible_messages_go_uncompressed_and_leave_the_compressor_working() {
        // Near-incompressible 256-byte messages broke zlib-rs's level-1 compressor within a
        // few hundred messages when a stream was abandoned halfway and the compressor reused.
        let text = b"{\"type\":\"OP\",\"mapName\":\"todos\"}".repeat(40);
        let mut state = 7;
        for (len, count) in [(256, 600), (1024, 100), (64 * 1024, 4)] {
            for symbols in [200, 256] {
                for _ in 0..count {
                    let data = noise(len, symbols, &mut state);
                    assert!(deflate(&data, 15, 1).is_none(), "{len} bytes of {symbols} symbols");
                }
                for level in [1, 6] {
                    let compressed = deflate(&text, 15, level).expect("compressible");
                    assert_eq!(inflate_message(&compressed, text.len()).unwrap(), &text[..]);
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 64,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// Whatever the server is given to send, at any level and window, one message after
        /// another on the thread's compressors: it goes out compressed and smaller, and
        /// inflates back to itself, or goes out as it is. Never a panic.
        #[test]
        fn any_message_compresses_to_itself_or_goes_plain(
            messages in proptest::collection::vec(
                (1_u64..=256, 0_usize..3000, proptest::num::u64::ANY),
                1..24,
            ),
            level in 0_u32..=9,
            window_bits in 9_u8..=15,
        ) {
            for (symbols, len, seed) in messages {
                let mut state = seed | 1;
                let payload = noise(len, symbols, &mut state);
                if let Some(compressed) = deflate(&payload, window_bits, level) {
                    proptest::prop_assert!(compressed.len() < payload.len());
                    let inflated = inflate_message(&compressed, payload.len()).unwrap();
                    proptest::prop_assert_eq!(&inflated[..], &payload[..]);
                }
            }
        }
    }

    #[test]
    fn a_shared_payload_is_compressed_once() {
        let payload = Bytes::from(b"shared broadcast payload ".repeat(20));
        let other = payload.clone();
        let first = compress(&payload, 15, 6).unwrap();
        let second = compress(&other, 15, 6).unwrap();
        // The same bytes, not an equal copy.
        assert_eq!(first.as_ptr(), second.as_ptr());
        let third = compress(&other, 10, 6).unwrap();
        assert_ne!(first.as_ptr(), third.as_ptr());
    }
}
