//! The sockets the engine reads and writes: [`FrameSocket`], the transport's own RFC 6455
//! framing, which serves every HTTP/1.1 upgrade on the WebSocket routes (with
//! permessage-deflate when it was negotiated: tungstenite refuses the compressed bit), and
//! axum's [`WebSocket`](axum::extract::ws::WebSocket) (tungstenite), for
//! [`handle_socket`](crate::network::handle_socket) and HTTP/2.
//!
//! Both are a [`Stream`] of received messages and a [`Sink`] of messages to send, with the same
//! message type and errors, so the reader and the writer serve either unchanged.
//!
//! `FrameSocket` holds no buffer while its connection is idle: between frames it reads into a
//! scratch buffer its thread shares with every other connection and keeps only what arrived,
//! the read buffer exists only while a frame is partly read, the write buffer only while the
//! kernel has not taken everything, and (de)compressors belong to the thread, not the
//! connection (`deflate.rs`). That is what an idle connection saves against tungstenite, which
//! keeps both buffers.
//! What it checks of the client, each failing the connection with tungstenite's error for it:
//! frames are masked; reserved bits are clear except RSV1 on the first frame of a compressed
//! message; control frames are final and at most 125 bytes, and may arrive between the
//! fragments of a message; a continuation frame continues something; frame, message and
//! inflated sizes stay within the limits; text and close reasons are UTF-8; close codes are
//! ones a peer may send. Pings are answered, and a close frame is echoed, as tungstenite does.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

use crate::network::config::ConnectionConfig;
use crate::network::engine::deflate::{self, Agreed, InflateError};

/// The most read at once into [`SCRATCH`].
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    /// Where a connection between frames reads, shared by every connection of the thread: a
    /// socket's wake-up may bring nothing, or a frame header, and neither should cost the
    /// connection a buffer of its own while it waits.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

/// What the engine needs of a socket.
pub(crate) trait Socket:
    Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin + Send
{
    /// The length from which this socket compresses a message, if it compresses any: the
    /// writer frames such messages alone, so a broadcast's compressed bytes are shared.
    fn compresses_from(&self) -> Option<usize> {
        None
    }

    /// Whether everything handed to the socket has gone to the kernel and no close frame has
    /// crossed: senders may then write to it directly (see `queue.rs`).
    fn holds_nothing(&self) -> bool {
        true
    }

    /// Writes `rest`, the end of a frame a sender began writing directly, ahead of anything
    /// else. Only a socket senders write to directly, [`FrameSocket`], is ever given one.
    fn push_unsent(&mut self, rest: Bytes) {
        tracing::error!(len = rest.len(), "unsent frame end for a socket senders do not write to");
    }
}

impl Socket for axum::extract::ws::WebSocket {}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send> Socket for FrameSocket<Io> {
    fn compresses_from(&self) -> Option<usize> {
        self.deflate.as_ref().map(|_| self.limits.threshold)
    }

    fn holds_nothing(&self) -> bool {
        // After a close frame, in either direction, no data frame may follow it.
        self.unwritten() == 0 && !self.sent_close && !self.received_close && !self.finished
    }

    fn push_unsent(&mut self, rest: Bytes) {
        // The socket held nothing when senders were let in, so nothing is ahead of it.
        if let Some(out) = self.out.take() {
            out.copy_rest(&mut self.write);
        }
        let ahead = std::mem::take(&mut self.write);
        self.write.reserve(rest.len() + ahead.len());
        self.write.put_slice(&rest);
        self.write.put_slice(&ahead);
    }
}

/// What a compressing connection adds to its socket: the agreed parameters and the counters
/// of what it compressed.
#[derive(Debug)]
pub(crate) struct Deflating {
    pub(crate) agreed: Agreed,
    pub(crate) frames: metrics::Counter,
    pub(crate) bytes: metrics::Counter,
}

/// A received message that fails the connection with 1007: its text or its compressed data is
/// not what it claims to be.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidPayload(&'static str);

/// The limits and settings a `FrameSocket` reads from the connection's config: computed once
/// per server and shared by its connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    max_frame: usize,
    max_message: usize,
    read_chunk: usize,
    write_high_water: usize,
    threshold: usize,
    level: u32,
}

/// A WebSocket over an upgraded connection; compressed when permessage-deflate was agreed.
pub(crate) struct FrameSocket<Io = TokioIo<Upgraded>> {
    io: Io,
    /// permessage-deflate, when agreed (boxed: most connections have none); `None`: nothing is
    /// compressed and RSV1 is a protocol error.
    deflate: Option<Box<Deflating>>,
    limits: Arc<Limits>,
    /// Received bytes not yet parsed into a frame: empty and unallocated between frames.
    read: BytesMut,
    /// The fragmented data message being received: its first frame's kind and the fragments
    /// so far.
    message: Option<Box<Partial>>,
    /// The one frame to go out before anything in `write`, sent from its payload's own bytes.
    out: Option<Outgoing>,
    /// Frames not yet taken by the kernel: empty and unallocated once it took them all.
    write: BytesMut,
    received_close: bool,
    sent_close: bool,
    /// The connection failed or ended: the stream yields nothing more.
    finished: bool,
}

/// A frame on its way out without a copy: its header, and its payload as the sender's bytes.
struct Outgoing {
    header: [u8; 14],
    header_len: u8,
    payload: Bytes,
    /// Bytes of header and payload the kernel has taken.
    sent: usize,
}

impl Outgoing {
    fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }

    fn remaining(&self) -> usize {
        self.header().len() + self.payload.len() - self.sent
    }

    fn is_done(&self) -> bool {
        self.remaining() == 0
    }

    /// What is left to write, as at most two slices.
    fn slices(&self) -> [io::IoSlice<'_>; 2] {
        let header = self.header();
        let in_header = self.sent.min(header.len());
        let in_payload = self.sent - in_header;
        [io::IoSlice::new(&header[in_header..]), io::IoSlice::new(&self.payload[in_payload..])]
    }

    /// Appends what is left to write to `buffer`.
    fn copy_rest(&self, buffer: &mut BytesMut) {
        buffer.reserve(self.remaining());
        for slice in self.slices() {
            buffer.put_slice(&slice);
        }
    }
}

struct Partial {
    text: bool,
    compressed: bool,
    data: BytesMut,
    /// For uncompressed text: how much of `data` is known to be whole UTF-8.
    valid_utf8: usize,
}

impl Partial {
    /// Checks the text received so far as it arrives, so a message that breaks UTF-8 fails
    /// on the fragment that breaks it rather than at its end. A character split between
    /// fragments waits for the rest; compressed text is checked once inflated.
    fn check_text(&mut self) -> Result<(), axum::Error> {
        if !self.text || self.compressed {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.valid_utf8..]) {
            Ok(_) => self.valid_utf8 = self.data.len(),
            Err(err) if err.error_len().is_none() => self.valid_utf8 += err.valid_up_to(),
            Err(_) => return Err(axum::Error::new(InvalidPayload("text message is not UTF-8"))),
        }
        Ok(())
    }
}

impl Limits {
    pub(crate) fn new(config: &ConnectionConfig) -> Self {
        let settings = config.permessage_deflate.unwrap_or_default();
        Self {
            max_frame: config.max_frame_size,
            max_message: config.max_message_size,
            read_chunk: config.ws_read_buffer_size.max(512),
            write_high_water: config.ws_write_buffer_size,
            threshold: settings.threshold.max(1),
            level: settings.level,
        }
    }
}

impl<Io> FrameSocket<Io> {
    pub(crate) fn new(io: Io, deflate: Option<Deflating>, limits: Arc<Limits>) -> Self {
        Self {
            io,
            deflate: deflate.map(Box::new),
            limits,
            read: BytesMut::new(),
            message: None,
            out: None,
            write: BytesMut::new(),
            received_close: false,
            sent_close: false,
            finished: false,
        }
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> FrameSocket<Io> {
    /// Writes what the kernel takes of the outgoing frame and the write buffer; ready once
    /// both are empty.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(out) = &mut self.out {
            while !out.is_done() {
                let written =
                    ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &out.slices()))?;
                if written == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                out.sent += written;
            }
            self.out = None;
        }
        while !self.write.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.write.advance(written);
        }
        // Keep an idle connection free of the buffer.
        self.write = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Bytes handed to the socket and not yet taken by the kernel.
    fn unwritten(&self) -> usize {
        self.write.len() + self.out.as_ref().map_or(0, Outgoing::remaining)
    }

    fn push_frame(&mut self, opcode: OpCode, compressed: bool, payload: &Bytes) {
        let header = FrameHeader { rsv1: compressed, opcode, ..FrameHeader::default() };
        let length = payload.len() as u64;
        if self.out.is_none() && self.write.is_empty() && self.io.is_write_vectored() {
            // Nothing ahead of it: the frame goes out as its header and the payload itself,
            // in one vectored write, without copying the payload into a buffer.
            let (header, header_len) = format_header(&header, length);
            self.out = Some(Outgoing { header, header_len, payload: payload.clone(), sent: 0 });
            return;
        }
        if let Some(out) = self.out.take() {
            // Another frame behind it: what is left of it goes into the buffer first, in order.
            out.copy_rest(&mut self.write);
        }
        self.write.reserve(header.len(length) + payload.len());
        header.format(length, &mut (&mut self.write).writer()).expect("writing to memory");
        self.write.put_slice(payload);
    }

    fn push_close(&mut self, frame: Option<&CloseFrame>) {
        let mut payload = Vec::new();
        if let Some(frame) = frame {
            payload.extend_from_slice(&frame.code.to_be_bytes());
            payload.extend_from_slice(frame.reason.as_bytes());
        }
        self.push_frame(OpCode::Control(Control::Close), false, &Bytes::from(payload));
        self.sent_close = true;
    }

    /// The next complete frame in the read buffer, unmasked.
    fn parse_frame(&mut self) -> Result<Option<(FrameHeader, BytesMut)>, WsError> {
        let mut cursor = Cursor::new(&self.read[..]);
        let Some((header, length)) = FrameHeader::parse(&mut cursor)? else {
            return Ok(None);
        };
        let max = self.limits.max_frame;
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length > max {
            return Err(CapacityError::MessageTooLong { size: length, max_size: max }.into());
        }
        #[allow(clippy::cast_possible_truncation)] // at most 14
        let header_len = cursor.position() as usize;
        let Some(mask) = header.mask else {
            return Err(ProtocolError::UnmaskedFrameFromClient.into());
        };
        let missing = (header_len + length).saturating_sub(self.read.len());
        if missing > 0 {
            // Room for the rest of the frame, a chunk at a time.
            self.read.reserve(missing.min(64 * 1024));
            return Ok(None);
        }
        self.read.advance(header_len);
        let mut payload = self.read.split_to(length);
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
        Ok(Some((header, payload)))
    }

    /// Acts on one frame; `Some` when it completes a message for the reader.
    fn on_frame(
        &mut self,
        header: &FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Message>, axum::Error> {
        let data = matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        let compressed = self.deflate.is_some();
        if header.rsv2 || header.rsv3 || (header.rsv1 && !(data && compressed)) {
            return Err(ws_error(ProtocolError::NonZeroReservedBits));
        }
        if self.received_close {
            // Nothing counts after the client's close frame.
            return Ok(None);
        }
        match header.opcode {
            OpCode::Control(control) => {
                if !header.is_final {
                    return Err(ws_error(ProtocolError::FragmentedControlFrame));
                }
                if payload.len() > 125 {
                    return Err(ws_error(ProtocolError::ControlFrameTooBig));
                }
                self.on_control(control, payload.freeze())
            }
            OpCode::Data(Data::Continue) => {
                let Some(message) = &mut self.message else {
                    return Err(ws_error(ProtocolError::UnexpectedContinueFrame));
                };
                message.data.extend_from_slice(&payload);
                check_size(message.data.len(), self.limits.max_message)?;
                if !header.is_final {
                    message.check_text()?;
                    return Ok(None);
                }
                let message = self.message.take().expect("a message");
                self.finish_message(*message).map(Some)
            }
            OpCode::Data(kind) => {
                if self.message.is_some() {
                    return Err(ws_error(ProtocolError::ExpectedFragment(Data::Continue)));
                }
                check_size(payload.len(), self.limits.max_message)?;
                let mut message = Partial {
                    text: kind == Data::Text,
                    compressed: header.rsv1,
                    data: payload,
                    valid_utf8: 0,
                };
                if header.is_final {
                    return self.finish_message(message).map(Some);
                }
                message.check_text()?;
                // Only a fragmented message is kept between frames (boxed: rare).
                self.message = Some(Box::new(message));
                Ok(None)
            }
        }
    }

    fn on_control(
        &mut self,
        control: Control,
        payload: Bytes,
    ) -> Result<Option<Message>, axum::Error> {
        match control {
            Control::Ping => {
                if !self.sent_close {
                    self.push_frame(OpCode::Control(Control::Pong), false, &payload);
                }
                Ok(Some(Message::Ping(payload)))
            }
            Control::Pong => Ok(Some(Message::Pong(payload))),
            Control::Close => {
                let frame = close_frame(&payload)?;
                self.received_close = true;
                if !self.sent_close {
                    // Echo the client's code, as the RFC asks.
                    let echo = frame
                        .as_ref()
                        .map(|frame| CloseFrame { code: frame.code, reason: Utf8Bytes::default() });
                    self.push_close(echo.as_ref());
                }
                Ok(Some(Message::Close(frame)))
            }
            Control::Reserved(code) => Err(ws_error(ProtocolError::UnknownControlFrameType(code))),
        }
    }

    fn finish_message(&self, message: Partial) -> Result<Message, axum::Error> {
        let Partial { text, compressed, data, .. } = message;
        let data = if compressed {
            deflate::inflate_message(&data, self.limits.max_message).map_err(|err| match err {
                InflateError::TooBig { limit } => {
                    ws_error(CapacityError::MessageTooLong { size: limit + 1, max_size: limit })
                }
                InflateError::Invalid => {
                    axum::Error::new(InvalidPayload("invalid compressed data"))
                }
            })?
        } else {
            data.freeze()
        };
        if text {
            let text = Utf8Bytes::try_from(data)
                .map_err(|_| axum::Error::new(InvalidPayload("text message is not UTF-8")))?;
            Ok(Message::Text(text))
        } else {
            Ok(Message::Binary(data))
        }
    }

    /// Reads more from the socket into the read buffer; ready with `false` at end of stream.
    ///
    /// Between frames it reads into the thread's scratch buffer and keeps only what arrived, so
    /// a connection waiting for its next frame holds no buffer at all; mid-frame it reads
    /// straight into the room reserved for the rest of the frame.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.read.capacity() > self.read.len() || self.limits.read_chunk > SCRATCH_LEN {
            if self.read.capacity() == self.read.len() {
                self.read.reserve(self.limits.read_chunk);
            }
            let read = ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read))?;
            return Poll::Ready(Ok(read > 0));
        }
        let io = &mut self.io;
        let chunk = self.limits.read_chunk;
        let read = SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(&mut scratch[..chunk]);
            ready!(Pin::new(io).poll_read(cx, &mut buf))?;
            self.read.extend_from_slice(buf.filled());
            Poll::Ready(Ok::<_, io::Error>(buf.filled().len()))
        });
        Poll::Ready(Ok(ready!(read)? > 0))
    }
}

/// `header` for a payload of `length` bytes, as bytes: the array and how much of it is used.
fn format_header(header: &FrameHeader, length: u64) -> ([u8; 14], u8) {
    let mut bytes = [0; 14];
    let mut cursor = Cursor::new(&mut bytes[..]);
    header.format(length, &mut cursor).expect("a frame header fits in 14 bytes");
    #[allow(clippy::cast_possible_truncation)] // at most 14
    let len = cursor.position() as u8;
    (bytes, len)
}

/// The header of an uncompressed, final binary frame (a server's: unmasked) of `length` bytes.
pub(crate) fn binary_header(length: usize) -> ([u8; 14], u8) {
    let header = FrameHeader { opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
    format_header(&header, length as u64)
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Stream for FrameSocket<Io> {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            // A pong or close echo queued by an earlier frame goes out as soon as it can.
            match this.poll_write_out(cx) {
                Poll::Ready(Err(err)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(axum::Error::new(err))));
                }
                // Both close frames have crossed and ours is out: the connection is over,
                // and the server, as the RFC asks, is the side that closes the TCP connection.
                Poll::Ready(Ok(())) if this.received_close && this.sent_close => {
                    this.finished = true;
                    return Poll::Ready(None);
                }
                _ => {}
            }
            let parsed = match this.parse_frame() {
                Ok(parsed) => parsed,
                Err(err) => return Poll::Ready(Some(Err(this.fail(err)))),
            };
            if let Some((header, payload)) = parsed {
                match this.on_frame(&header, payload) {
                    Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                    Ok(None) => continue,
                    Err(err) => {
                        this.finished = true;
                        return Poll::Ready(Some(Err(err)));
                    }
                }
            }
            if this.read.is_empty() {
                // Between frames: nothing is held while waiting for the next one.
                this.read = BytesMut::new();
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) if this.received_close => {
                    this.finished = true;
                    return Poll::Ready(None);
                }
                Ok(false) => {
                    return Poll::Ready(Some(Err(
                        this.fail(ProtocolError::ResetWithoutClosingHandshake.into())
                    )));
                }
                Err(err) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(axum::Error::new(err))));
                }
            }
        }
    }
}

impl<Io> FrameSocket<Io> {
    fn fail(&mut self, err: WsError) -> axum::Error {
        self.finished = true;
        axum::Error::new(err)
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Sink<Message> for FrameSocket<Io> {
    type Error = axum::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = &mut *self;
        if this.unwritten() >= this.limits.write_high_water {
            // Over the high-water mark the caller waits for the kernel.
            ready!(this.poll_write_out(cx)).map_err(axum::Error::new)?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
        let this = &mut *self;
        if this.sent_close {
            return Err(ws_error(ProtocolError::SendAfterClosing));
        }
        match message {
            Message::Binary(payload) => this.push_data(Data::Binary, &payload),
            Message::Text(text) => {
                let payload = Bytes::from(text);
                this.push_data(Data::Text, &payload);
            }
            Message::Ping(payload) => {
                this.push_frame(OpCode::Control(Control::Ping), false, &payload);
            }
            Message::Pong(payload) => {
                this.push_frame(OpCode::Control(Control::Pong), false, &payload);
            }
            Message::Close(frame) => this.push_close(frame.as_ref()),
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx)).map_err(axum::Error::new)?;
        Pin::new(&mut this.io).poll_flush(cx).map_err(axum::Error::new)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx).map_err(axum::Error::new)
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> FrameSocket<Io> {
    /// Frames one data message, compressed when it is long enough and deflate shrinks it.
    fn push_data(&mut self, kind: Data, payload: &Bytes) {
        let compressed = self
            .deflate
            .as_ref()
            .filter(|_| payload.len() >= self.limits.threshold)
            .and_then(|deflating| {
                let compressed =
                    deflate::compress(payload, deflating.agreed.window_bits, self.limits.level)?;
                deflating.frames.increment(1);
                deflating.bytes.increment(compressed.len() as u64);
                Some(compressed)
            });
        match compressed {
            Some(compressed) => self.push_frame(OpCode::Data(kind), true, &compressed),
            None => self.push_frame(OpCode::Data(kind), false, payload),
        }
    }
}

/// A message of `size` bytes (so far) against the limit of `max_size`.
fn check_size(size: usize, max_size: usize) -> Result<(), axum::Error> {
    if size > max_size {
        return Err(ws_error(CapacityError::MessageTooLong { size, max_size }));
    }
    Ok(())
}

fn ws_error(error: impl Into<WsError>) -> axum::Error {
    axum::Error::new(error.into())
}

/// A received close frame's payload: no code, or a code a peer may send and a UTF-8 reason.
fn close_frame(payload: &Bytes) -> Result<Option<CloseFrame>, axum::Error> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ws_error(ProtocolError::InvalidCloseSequence)),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                return Err(ws_error(ProtocolError::InvalidCloseSequence));
            }
            let reason = Utf8Bytes::try_from(payload.slice(2..))
                .map_err(|_| axum::Error::new(InvalidPayload("close reason is not UTF-8")))?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outgoing_frame_resumes_where_the_kernel_stopped_and_copies_only_the_rest() {
        let mut out = Outgoing {
            header: [0x82, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            header_len: 2,
            payload: Bytes::from_static(b"hello"),
            sent: 0,
        };
        let joined =
            |out: &Outgoing| out.slices().iter().flat_map(|s| s.to_vec()).collect::<Vec<_>>();
        assert_eq!(joined(&out), b"\x82\x05hello");
        out.sent = 1;
        assert_eq!(joined(&out), b"\x05hello", "inside the header");
        out.sent = 4;
        assert_eq!((joined(&out), out.remaining()), (b"llo".to_vec(), 3), "inside the payload");
        let mut buffer = BytesMut::from(&b"x"[..]);
        out.copy_rest(&mut buffer);
        assert_eq!(&buffer[..], b"xllo");
        out.sent = 7;
        assert!(out.is_done());
    }

    /// A frame queued behind an outgoing one goes after what is left of it, in order.
    #[tokio::test]
    async fn frames_pushed_behind_an_outgoing_one_keep_their_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, (server, _)) =
            tokio::join!(client, async { listener.accept().await.unwrap() });
        let mut client = client.unwrap();
        let limits = Arc::new(Limits::new(&ConnectionConfig::default()));
        let mut socket = FrameSocket::new(server, None, limits);
        socket.push_frame(OpCode::Data(Data::Binary), false, &Bytes::from_static(b"one"));
        assert!(socket.out.is_some(), "the first frame is sent from its own bytes");
        socket.push_frame(OpCode::Data(Data::Binary), false, &Bytes::from_static(b"two"));
        assert!(socket.out.is_none() && socket.unwritten() == 10);
        std::future::poll_fn(|cx| socket.poll_write_out(cx)).await.unwrap();
        let mut received = [0; 10];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut received).await.unwrap();
        assert_eq!(&received, b"\x82\x03one\x82\x03two");
    }
}
