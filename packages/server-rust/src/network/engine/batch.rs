//! TopGun's `BATCH` envelope: several binary messages carried in one WebSocket frame, and the
//! frame builder the connection writer coalesces its queue with.
//!
//! A batch frame is a MsgPack map `{ "type": "BATCH", "count": n, "data": <bin> }`. `data` holds
//! a u32 little-endian message count, then for each message a u32 little-endian length followed
//! by the message bytes. TopGun's TypeScript client unpacks this shape; a frame that is not a
//! batch is a single message.
//!
//! ```
//! use bytes::Bytes;
//! use topgun_server::network::{decode_frame, encode_batch};
//!
//! let messages = [Bytes::from_static(b"\x81\xa1a\x01"), Bytes::from_static(b"\xc0")];
//! let frame = encode_batch(&messages);
//! assert_eq!(decode_frame(&frame).unwrap(), messages);
//! ```

use std::collections::VecDeque;
use std::ops::Range;

use axum::extract::ws::Utf8Bytes;
use bytes::{BufMut, Bytes, BytesMut};

use crate::network::config::ConnectionConfig;
use crate::network::connections::queue::OutboundMessage;

/// The `type` value that marks a batch frame.
pub const BATCH_TYPE: &str = "BATCH";

/// A frame announced itself as a batch but its contents do not add up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed BATCH frame: {0}")]
pub struct BatchDecodeError(&'static str);

/// Writes into a growable buffer cannot fail.
const IN_MEMORY: &str = "writing to memory cannot fail";

/// Encodes `messages` into one `BATCH` frame.
///
/// # Panics
///
/// If there are more than `u32::MAX` messages or one is longer than `u32::MAX` bytes; the
/// outbound writer bounds batches far below that.
#[must_use]
pub fn encode_batch(messages: &[Bytes]) -> Bytes {
    encode_batch_of(messages.iter())
}

/// [`encode_batch`] over any re-iterable sequence of messages (the writer's queue, in place).
fn encode_batch_of<'m>(messages: impl ExactSizeIterator<Item = &'m Bytes> + Clone) -> Bytes {
    let count = u32::try_from(messages.len()).expect("batch message count fits in u32");
    let data_len = 4 + messages.clone().map(|m| 4 + m.len()).sum::<usize>();
    let data_len_u32 = u32::try_from(data_len).expect("batch payload fits in u32");
    // fixmap(3) + "type" + "BATCH" + "count" + u32 + "data" + bin32 header, at most 32 bytes.
    let mut frame = BytesMut::with_capacity(32 + data_len).writer();
    rmp::encode::write_map_len(&mut frame, 3).expect(IN_MEMORY);
    rmp::encode::write_str(&mut frame, "type").expect(IN_MEMORY);
    rmp::encode::write_str(&mut frame, BATCH_TYPE).expect(IN_MEMORY);
    rmp::encode::write_str(&mut frame, "count").expect(IN_MEMORY);
    rmp::encode::write_uint(&mut frame, u64::from(count)).expect(IN_MEMORY);
    rmp::encode::write_str(&mut frame, "data").expect(IN_MEMORY);
    rmp::encode::write_bin_len(&mut frame, data_len_u32).expect(IN_MEMORY);
    let mut frame = frame.into_inner();
    frame.put_u32_le(count);
    for message in messages {
        frame.put_u32_le(u32::try_from(message.len()).expect("message length fits in u32"));
        frame.put_slice(message);
    }
    frame.freeze()
}

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    data: &'a serde_bytes::Bytes,
}

/// Splits a received frame into its messages: the contents of a `BATCH` frame, or the frame
/// itself when it is not one. The messages are copied out; see [`decode_frame_shared`] to
/// share the frame's buffer instead.
///
/// # Errors
///
/// [`BatchDecodeError`] when a frame typed `BATCH` has a truncated or inconsistent payload.
pub fn decode_frame(frame: &[u8]) -> Result<Vec<Bytes>, BatchDecodeError> {
    Ok(match message_ranges(frame)? {
        Some(ranges) => ranges.into_iter().map(|r| Bytes::copy_from_slice(&frame[r])).collect(),
        None => vec![Bytes::copy_from_slice(frame)],
    })
}

/// Like [`decode_frame`], but every message is a slice of `frame`'s buffer: no copies, which
/// matters to a reader receiving many small messages per frame.
///
/// # Errors
///
/// [`BatchDecodeError`] when a frame typed `BATCH` has a truncated or inconsistent payload.
pub fn decode_frame_shared(frame: &Bytes) -> Result<Vec<Bytes>, BatchDecodeError> {
    Ok(match message_ranges(frame)? {
        Some(ranges) => ranges.into_iter().map(|r| frame.slice(r)).collect(),
        None => vec![frame.clone()],
    })
}

/// Where each message of a `BATCH` frame lies in `frame`; `None` when it is not a batch.
fn message_ranges(frame: &[u8]) -> Result<Option<Vec<Range<usize>>>, BatchDecodeError> {
    let envelope = match rmp_serde::from_slice::<Envelope<'_>>(frame) {
        Ok(envelope) if envelope.kind == BATCH_TYPE => envelope,
        _ => return Ok(None),
    };
    let data: &[u8] = envelope.data;
    // `data` borrows from `frame`, so its offset there is the distance between the two.
    let mut offset = data.as_ptr().addr() - frame.as_ptr().addr();
    let mut rest = data;
    let count = take_u32(&mut rest).ok_or(BatchDecodeError("missing message count"))?;
    offset += 4;
    let mut ranges = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(rest.len() / 4));
    for _ in 0..count {
        let len = take_u32(&mut rest).ok_or(BatchDecodeError("missing message length"))?;
        let len = usize::try_from(len).map_err(|_| BatchDecodeError("message length overflows"))?;
        if rest.len() < len {
            return Err(BatchDecodeError("message runs past the end of the batch"));
        }
        offset += 4;
        ranges.push(offset..offset + len);
        offset += len;
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(BatchDecodeError("trailing bytes after the last message"));
    }
    Ok(Some(ranges))
}

fn take_u32(buf: &mut &[u8]) -> Option<u32> {
    let (head, tail) = buf.split_first_chunk::<4>()?;
    *buf = tail;
    Some(u32::from_le_bytes(*head))
}

/// One outbound data frame: a lone message or a `BATCH` of several.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) bytes: Bytes,
    pub(crate) messages: usize,
}

/// What [`FrameBuilder::next`] took off the front of a burst.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// The next data frame.
    Frame(Frame),
    /// An [`OutboundMessage::Close`] was next; everything before it has been framed.
    Close(Option<String>),
    /// An [`OutboundMessage::Text`] was next: a text frame of its own.
    Text(Utf8Bytes),
    /// The burst is empty.
    Empty,
}

/// Groups ready messages into frames: one message alone goes out as itself, several as a
/// `BATCH` frame bounded by `max_batch_messages` and `max_batch_bytes`. Frames are built
/// straight from the writer's queue: no list of payloads is allocated per frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameBuilder {
    max_messages: usize,
    max_bytes: usize,
    /// Messages this long or longer go out alone (on a connection that compresses them, so
    /// a broadcast's compressed bytes are shared with every other recipient instead of
    /// being compressed again inside this connection's own `BATCH`).
    alone_from: usize,
}

impl Frame {
    /// A message that goes out alone.
    pub(crate) fn single(bytes: Bytes) -> Self {
        Self { bytes, messages: 1 }
    }
}

impl FrameBuilder {
    pub(crate) fn new(config: &ConnectionConfig) -> Self {
        Self {
            max_messages: config.max_batch_messages.max(1),
            max_bytes: config.max_batch_bytes,
            alone_from: usize::MAX,
        }
    }

    /// Frames every message of `len` bytes or more alone.
    pub(crate) fn alone_from(self, len: usize) -> Self {
        Self { alone_from: len, ..self }
    }

    /// Takes the next frame's messages off the front of `burst`: as many `Binary` messages
    /// as fit one frame, stopping at a `Close` or a `Text` (each goes on its own). A message
    /// larger than `max_batch_bytes` goes out alone.
    pub(crate) fn next(self, burst: &mut VecDeque<OutboundMessage>) -> Next {
        let (mut count, mut bytes) = (0, 0);
        for message in &*burst {
            let OutboundMessage::Binary(payload) = message else { break };
            let alone = payload.len() >= self.alone_from;
            if count > 0
                && (alone || count >= self.max_messages || bytes + payload.len() > self.max_bytes)
            {
                break;
            }
            count += 1;
            bytes += payload.len();
            if alone {
                break;
            }
        }
        match count {
            0 => match burst.pop_front() {
                Some(OutboundMessage::Close(reason)) => Next::Close(reason),
                Some(OutboundMessage::Text(text)) => Next::Text(text),
                Some(OutboundMessage::Binary(_)) => unreachable!("a binary message is counted"),
                None => Next::Empty,
            },
            1 => match burst.pop_front() {
                Some(OutboundMessage::Binary(payload)) => Next::Frame(Frame::single(payload)),
                _ => unreachable!("the first message was counted as binary"),
            },
            _ => {
                let payloads = burst.range(..count).map(|message| match message {
                    OutboundMessage::Binary(payload) => payload,
                    OutboundMessage::Close(_) | OutboundMessage::Text(_) => {
                        unreachable!("only binary messages are counted")
                    }
                });
                let frame = Frame { bytes: encode_batch_of(payloads), messages: count };
                burst.drain(..count);
                Next::Frame(frame)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Header {
        #[serde(rename = "type")]
        kind: String,
        count: u32,
    }

    #[test]
    fn batch_is_a_msgpack_map_with_type_count_and_data() {
        let frame = encode_batch(&[Bytes::from_static(b"ab"), Bytes::from_static(b"c")]);
        let header: Header = rmp_serde::from_slice(&frame).unwrap();
        assert_eq!(header, Header { kind: "BATCH".into(), count: 2 });
        // data = count (2 LE) + len 2 + "ab" + len 1 + "c"
        let expected_data = [2, 0, 0, 0, 2, 0, 0, 0, b'a', b'b', 1, 0, 0, 0, b'c'];
        assert!(frame.ends_with(&expected_data));
    }

    #[test]
    fn a_frame_that_is_not_a_batch_is_one_message() {
        let single = rmp_serde::to_vec_named(&Header { kind: "OP".into(), count: 1 }).unwrap();
        assert_eq!(decode_frame(&single).unwrap(), vec![Bytes::from(single)]);
        assert_eq!(decode_frame(b"\x01\x02").unwrap(), vec![Bytes::from_static(b"\x01\x02")]);
    }

    #[test]
    fn truncated_batches_are_reported() {
        let frame = encode_batch(&[Bytes::from_static(b"hello")]);
        let mut broken = frame.to_vec();
        // Claim a longer message than the payload holds.
        let len_at = broken.len() - 5 - 4;
        broken[len_at] = 50;
        assert_eq!(
            decode_frame(&broken).unwrap_err(),
            BatchDecodeError("message runs past the end of the batch")
        );
    }

    #[test]
    fn empty_and_large_messages_round_trip() {
        let messages =
            vec![Bytes::new(), Bytes::from(vec![0xAB; 70_000]), Bytes::from_static(b"z")];
        assert_eq!(decode_frame(&encode_batch(&messages)).unwrap(), messages);
    }

    #[test]
    fn shared_decoding_slices_the_frame_without_copying() {
        let messages = vec![Bytes::from_static(b"first"), Bytes::from_static(b"second")];
        let frame = encode_batch(&messages);
        let shared = decode_frame_shared(&frame).unwrap();
        assert_eq!(shared, messages);
        let frame_range = frame.as_ptr_range();
        assert!(shared.iter().all(|m| frame_range.contains(&m.as_ptr())), "slices of the frame");
        let single = Bytes::from_static(b"\xc0");
        assert_eq!(decode_frame_shared(&single).unwrap(), vec![single.clone()]);
    }

    fn config(max_messages: usize, max_bytes: usize) -> ConnectionConfig {
        ConnectionConfig {
            max_batch_messages: max_messages,
            max_batch_bytes: max_bytes,
            ..Default::default()
        }
    }

    fn frame_messages(frame: &Frame) -> Vec<Bytes> {
        let messages = decode_frame(&frame.bytes).unwrap();
        assert_eq!(messages.len(), frame.messages);
        messages
    }

    fn burst(lengths: &[usize]) -> VecDeque<OutboundMessage> {
        lengths.iter().map(|&len| OutboundMessage::Binary(Bytes::from(vec![7; len]))).collect()
    }

    /// Every frame `builder` makes of `burst`, as the message lengths in each.
    fn frames(builder: FrameBuilder, burst: &mut VecDeque<OutboundMessage>) -> Vec<Vec<usize>> {
        let mut frames = Vec::new();
        while let Next::Frame(frame) = builder.next(burst) {
            frames.push(frame_messages(&frame).iter().map(Bytes::len).collect());
        }
        frames
    }

    #[test]
    fn a_lone_message_goes_out_unwrapped() {
        let builder = FrameBuilder::new(&config(10, 1024));
        let mut solo: VecDeque<_> = [OutboundMessage::Binary(Bytes::from_static(b"solo"))].into();
        assert_eq!(
            builder.next(&mut solo),
            Next::Frame(Frame { bytes: Bytes::from_static(b"solo"), messages: 1 })
        );
        assert_eq!(builder.next(&mut solo), Next::Empty);
    }

    #[test]
    fn batches_split_at_the_message_limit() {
        let builder = FrameBuilder::new(&config(2, 1024));
        assert_eq!(frames(builder, &mut burst(&[1; 5])), [vec![1, 1], vec![1, 1], vec![1]]);
    }

    #[test]
    fn batches_split_at_the_byte_limit_and_oversized_messages_go_alone() {
        let builder = FrameBuilder::new(&config(100, 10));
        assert_eq!(
            frames(builder, &mut burst(&[4, 4, 4, 50, 1])),
            [vec![4, 4], vec![4], vec![50], vec![1]]
        );
    }

    #[test]
    fn messages_over_the_alone_length_go_alone_and_the_small_ones_batch_around_them() {
        let builder = FrameBuilder::new(&config(100, 1024)).alone_from(10);
        assert_eq!(
            frames(builder, &mut burst(&[3, 3, 12, 10, 3, 9])),
            [vec![3, 3], vec![12], vec![10], vec![3, 9]]
        );
    }

    #[test]
    fn a_close_ends_the_frame_before_it_and_is_returned_in_order() {
        let builder = FrameBuilder::new(&config(100, 1024));
        let mut queue = burst(&[3, 3]);
        queue.push_back(OutboundMessage::Close(Some("bye".into())));
        queue.extend(burst(&[5]));
        let Next::Frame(first) = builder.next(&mut queue) else { panic!("a frame first") };
        assert_eq!(frame_messages(&first).len(), 2);
        assert_eq!(builder.next(&mut queue), Next::Close(Some("bye".into())));
        assert_eq!(frames(builder, &mut queue), [vec![5]], "what follows stays queued");
    }
}
