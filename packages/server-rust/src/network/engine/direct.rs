//! queue → **socket**, without the connection's task: the accepted TCP stream, shared between
//! hyper (and, after the upgrade, the engine) and the senders of the connection's queue.
//!
//! A broadcast to ten thousand idle connections would otherwise queue ten thousand messages and
//! wake ten thousand tasks, each of which takes its one message and writes it. While a
//! connection's writer holds nothing for its socket, a sender writes the frame itself, from its
//! own thread, as far as the kernel takes it without waiting (`queue.rs` decides when it may;
//! this file is how). The task is not woken at all unless the kernel refuses part of the frame.
//!
//! [`LinkAcceptor`] is the innermost acceptor of a plain-TCP listener: it keeps each accepted
//! [`TcpStream`] behind an `Arc` ([`Link`]), gives hyper [`LinkIo`] to serve HTTP on, and adds
//! the `Link` to every upgrade request ([`WithLink`]), where the WebSocket handler finds it and
//! attaches it to the connection's queue. TLS connections do not get one: their bytes are not
//! the frames.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum_server::accept::Accept;
use bytes::{Bytes, BytesMut};
use http::Request;
use http::header::UPGRADE;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::network::connections::queue::{DirectWrite, Written};
use crate::network::engine::socket::binary_header;
use crate::network::metrics::TransportMetrics;

/// One accepted TCP connection, shared by whoever reads and writes it.
#[derive(Debug)]
pub(crate) struct Link {
    tcp: TcpStream,
    metrics: Arc<TransportMetrics>,
}

impl DirectWrite for Link {
    fn try_write_frame(&self, payload: &Bytes) -> Written {
        let (header, header_len) = binary_header(payload.len());
        let header = &header[..usize::from(header_len)];
        let len = header.len() + payload.len();
        let frame = [IoSlice::new(header), IoSlice::new(payload)];
        let written = match send_now(&self.tcp, &frame, len) {
            // Refused or failed: the task writes it, and sees why if it failed.
            Ok(0) | Err(_) => return Written::Nothing,
            Ok(written) => written,
        };
        self.metrics.frame_sent(1, payload.len() as u64);
        if written == len {
            Written::All
        } else {
            Written::Part(rest_of_frame(header, payload, written))
        }
    }
}

/// What is left of the frame `header` + `payload` once `written` bytes of it are out: the
/// payload's own bytes unless the header was cut.
fn rest_of_frame(header: &[u8], payload: &Bytes, written: usize) -> Bytes {
    if written >= header.len() {
        return payload.slice(written - header.len()..);
    }
    let mut rest = BytesMut::with_capacity(header.len() + payload.len() - written);
    rest.extend_from_slice(&header[written..]);
    rest.extend_from_slice(payload);
    rest.freeze()
}

/// `send(2)`'s flags: no `SIGPIPE` for a peer gone (Rust binaries ignore it; a host process
/// embedding the server may not).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: libc::c_int = 0;

/// Writes `bufs` to `tcp` if the kernel takes any of it now, through tokio's readiness: for
/// the task, which waits for the reactor when the kernel's buffer is full.
fn send(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let total: usize = bufs.iter().map(|buf| buf.len()).sum();
    let mut sent = 0;
    let result = tcp.try_io(Interest::WRITABLE, || {
        sent = send_now(tcp, bufs, total)?;
        if sent < total {
            // The kernel's buffer is full: the next write waits for the reactor.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match result {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock && sent > 0 => Ok(sent),
        Err(err) => Err(err),
        Ok(()) => Ok(sent),
    }
}

/// The system call alone, for a sender: it never waits, so tokio's readiness has nothing to
/// tell it, and reading it would cost a cache miss per connection of a broadcast. A refusal
/// (the kernel's buffer full) leaves the readiness stale; the task's next write meets the same
/// refusal and clears it. Socket calls rather than `writev`: they skip the file layer, a
/// measurable part of a small write's cost.
///
/// Up to [`COPY_UP_TO`] bytes in several pieces (a frame's header and payload) are copied into
/// one buffer and sent with `send`: the copy costs less than what `sendmsg` adds for a message
/// in pieces (the kernel copies in and checks the message header and its vector first, about
/// 3 % of a paced broadcast's kernel time). `len` is the pieces' length together, which every
/// caller has already counted.
fn send_now(tcp: &TcpStream, bufs: &[IoSlice<'_>], len: usize) -> io::Result<usize> {
    debug_assert_eq!(len, bufs.iter().map(|buf| buf.len()).sum::<usize>());
    let socket = socket2::SockRef::from(tcp);
    if let [buf] = bufs {
        return socket.send_with_flags(buf, SEND_FLAGS);
    }
    if len > COPY_UP_TO {
        return socket.send_vectored_with_flags(bufs, SEND_FLAGS);
    }
    let mut bytes = [0; COPY_UP_TO];
    let mut end = 0;
    for buf in bufs {
        bytes[end..end + buf.len()].copy_from_slice(buf);
        end += buf.len();
    }
    socket.send_with_flags(&bytes[..end], SEND_FLAGS)
}

/// The most bytes [`send_now`] copies into one piece rather than send in several.
const COPY_UP_TO: usize = 1024;

/// [`Link`] as hyper's (and the upgraded connection's) byte stream.
#[derive(Debug)]
pub(crate) struct LinkIo(Arc<Link>);

impl AsyncRead for LinkIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.0.tcp;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            let room = buf.remaining();
            let mut read = None;
            let result = tcp.try_io(Interest::READABLE, || {
                // tokio's own read (it fills `buf`'s uninitialised room safely) inside the outer
                // `try_io`, whose readiness snapshot, taken before the read, is what a short read
                // clears: a wake-up that arrives after the read is kept.
                let n = tcp.try_read_buf(buf)?;
                read = Some(n);
                if n > 0 && n < room {
                    // A short read drained the socket, as tokio's own stream assumes: the next
                    // read waits for the reactor rather than failing with a wasted call.
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match (read, result) {
                (Some(_), _) => return Poll::Ready(Ok(())),
                (None, Err(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
                (None, result) => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncWrite for LinkIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.0.tcp;
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            match send(tcp, bufs) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.0.tcp).shutdown(std::net::Shutdown::Write))
    }
}

/// The request extension through which an upgrade request carries its connection's [`Link`].
#[derive(Debug, Clone)]
pub(crate) struct DirectSocket(pub(crate) Arc<Link>);

/// The acceptor that shares each accepted stream (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct LinkAcceptor {
    metrics: Arc<TransportMetrics>,
}

impl LinkAcceptor {
    pub(crate) fn new(metrics: Arc<TransportMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Accept<TcpStream, S> for LinkAcceptor {
    type Stream = LinkIo;
    type Service = WithLink<S>;
    type Future = std::future::Ready<io::Result<(LinkIo, WithLink<S>)>>;

    fn accept(&self, tcp: TcpStream, service: S) -> Self::Future {
        let link = Arc::new(Link { tcp, metrics: Arc::clone(&self.metrics) });
        let service = WithLink { inner: service, link: Arc::clone(&link) };
        std::future::ready(Ok((LinkIo(link), service)))
    }
}

/// A connection's service with its [`Link`]: added to upgrade requests only, so other requests
/// pay nothing for it.
#[derive(Debug, Clone)]
pub(crate) struct WithLink<S> {
    inner: S,
    link: Arc<Link>,
}

impl<S, B> tower::Service<Request<B>> for WithLink<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if request.headers().contains_key(UPGRADE) {
            request.extensions_mut().insert(DirectSocket(Arc::clone(&self.link)));
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    /// Reads exactly `len` bytes, within a deadline.
    async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_exact(&mut bytes))
            .await
            .expect("the bytes arrive in time")
            .unwrap();
        bytes
    }

    #[test]
    fn the_rest_of_a_cut_frame_is_exactly_what_was_not_written() {
        let header = [0x82, 5];
        let payload = Bytes::from_static(b"hello");
        for written in 0..7 {
            let mut sent = [&header[..], &payload[..]].concat()[..written].to_vec();
            sent.extend_from_slice(&rest_of_frame(&header, &payload, written));
            assert_eq!(sent, b"\x82\x05hello", "{written} bytes written");
        }
    }

    #[tokio::test]
    async fn a_frame_goes_whole_or_hands_back_exactly_what_is_left() {
        let (server, mut client) = pair().await;
        socket2::SockRef::from(&server).set_send_buffer_size(4096).unwrap();
        server.writable().await.unwrap();
        let link = Link { tcp: server, metrics: Arc::new(TransportMetrics::new()) };

        assert_eq!(link.try_write_frame(&Bytes::from_static(b"hi")), Written::All);
        assert_eq!(read_exactly(&mut client, 4).await, [0x82, 2, b'h', b'i']);

        // More than the kernel takes from a client that does not read.
        let payload = Bytes::from(vec![7; 4 * 1024 * 1024]);
        let Written::Part(rest) = link.try_write_frame(&payload) else {
            panic!("4 MiB do not fit a 4 KiB send buffer");
        };
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        frame.extend_from_slice(&payload);
        let mut received = read_exactly(&mut client, frame.len() - rest.len()).await;
        received.extend_from_slice(&rest);
        assert!(received == frame, "what was written and what is left make the frame");
    }

    #[tokio::test]
    async fn small_frames_go_whole_or_hand_back_exactly_what_is_left() {
        let (server, mut client) = pair().await;
        socket2::SockRef::from(&server).set_send_buffer_size(4096).unwrap();
        socket2::SockRef::from(&client).set_recv_buffer_size(4096).unwrap();
        server.writable().await.unwrap();
        let link = Link { tcp: server, metrics: Arc::new(TransportMetrics::new()) };

        // 300-byte frames (copied into one buffer) to a client that does not read, until the
        // kernel takes no more: each goes whole, or in part with exactly the rest handed back.
        let mut expected = Vec::new();
        let mut refused = false;
        for i in 0..100_000_u32 {
            let payload = Bytes::from(vec![i.to_le_bytes()[0]; 296]);
            let mut frame = vec![0x82, 126, 1, 40];
            frame.extend_from_slice(&payload);
            match link.try_write_frame(&payload) {
                Written::All => expected.extend_from_slice(&frame),
                Written::Part(rest) => {
                    let cut = frame.len() - rest.len();
                    assert_eq!(rest[..], frame[cut..], "the rest of frame {i}");
                    expected.extend_from_slice(&frame[..cut]);
                    refused = true;
                    break;
                }
                Written::Nothing => {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "the kernel took 30 MB from a client that does not read");
        assert!(expected.len() >= 300, "at least one frame went out");
        assert!(read_exactly(&mut client, expected.len()).await == expected, "the frames in order");
    }
}
