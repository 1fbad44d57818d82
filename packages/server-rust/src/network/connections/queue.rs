//! registry → **queue** → writer: one connection's outbound queue.
//!
//! A bounded FIFO of [`OutboundMessage`]s plus the small priority lane of
//! [`ConnectionHandle::try_send_priority`](crate::network::ConnectionHandle::try_send_priority),
//! behind one uncontended lock. It holds no allocation while it is empty: an idle connection
//! pays for the lock, a waker and a counter, not for a block of slots. The connection's task
//! takes everything queued in one step ([`OutboundQueue::take_all`]) and writes it without the
//! lock held, so producers (a broadcast reaching thousands of queues) never wait for a socket.
//!
//! When the connection's task holds nothing for its socket, a sender does not queue at all: it
//! writes its message to the socket itself ([`DirectWrite`]), as uWebSockets does, and the task
//! is not woken. The queue decides who may write to the socket at a given moment (the task, or
//! one sender under the queue's lock), so frames never interleave and order is kept: a sender
//! writes only when nothing is queued ahead of it, and whatever the kernel does not take goes
//! to the front of the queue for the task to finish.
//!
//! The queue knows nothing of drop counting or limits: every message reaches it through the
//! connection's [`OutboundSender`](crate::network::OutboundSender) (`channel.rs`), which
//! applies them, and [`OutboundReceiver`](crate::network::OutboundReceiver) is its receiving end
//! for code that drives a connection itself rather than through the transport's engine.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

/// Why a message was not queued (before the sender's policy turns it into a
/// [`SendError`](crate::network::SendError)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No space, and (when waiting) none came before the deadline.
    Full,
    Closed,
}

#[derive(Debug, Default)]
struct Lanes {
    messages: VecDeque<OutboundMessage>,
    priority: VecDeque<Bytes>,
    /// Slots promised to [`OutboundPermit`](crate::network::OutboundPermit)s, not yet used.
    reserved: usize,
    /// The connection's socket, for senders to write to while the task holds nothing for it.
    direct: Option<Arc<dyn DirectWrite>>,
}

/// A socket a sender may write a message to without the connection's task.
pub(crate) trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// Writes `payload` as one binary frame, as much of it as the kernel takes now without
    /// waiting.
    fn try_write_frame(&self, payload: &Bytes) -> Written;
}

/// How much of a frame [`DirectWrite::try_write_frame`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Written {
    /// All of it.
    All,
    /// The start of it; this is the rest, framing included, to be written before anything else.
    Part(Bytes),
    /// Nothing (the kernel's buffer is full, or the socket failed: the task will see why).
    Nothing,
}

/// Who may write to the socket (bits of `OutboundQueue::socket`). With none set, a sender may.
mod owner {
    /// A sender is writing to the socket (under the queue's lock).
    pub(super) const SENDER: u8 = 1;
    /// The connection's task holds the socket: it has something for it, or has not let it go.
    pub(super) const TASK: u8 = 2;
    /// The task found a sender writing and waits to be woken when it is done.
    pub(super) const WANTED: u8 = 4;
    /// The first queued message is the unwritten end of a sender's frame, framing included.
    pub(super) const UNSENT: u8 = 8;
    /// No sender writes to the socket any more (a close is on its way).
    pub(super) const STOPPED: u8 = 16;
}

/// What dropping `messages` loses: the data messages among them (close requests do not count).
pub(crate) fn undelivered(messages: &VecDeque<OutboundMessage>) -> u64 {
    messages.iter().filter(|m| !matches!(m, OutboundMessage::Close(_))).count() as u64
}

/// The queue itself; owned by the connection's sender state.
#[derive(Debug)]
pub(crate) struct OutboundQueue {
    lanes: Mutex<Lanes>,
    /// Set once, under the lock; read without it by `is_connected`.
    closed: AtomicBool,
    /// `lanes.messages.len()`, kept under the lock and read without it: waiting broadcasts
    /// look at thousands of queues.
    queued: AtomicUsize,
    /// `lanes.priority.len()`, likewise: the writer looks for priority messages before every
    /// frame.
    priority_queued: AtomicUsize,
    /// Who may write to the socket now (`owner` bits): the task holds it from the start.
    socket: AtomicU8,
    /// The task that drains the queue: woken for every message, priority message and close.
    consumer: AtomicWaker,
    /// Senders waiting for space (`send`, `send_timeout`, `reserve`) or for the close
    /// (`closed`); notified when a full queue is drained and when it closes.
    space: Notify,
    capacity: usize,
    priority_capacity: usize,
}

impl OutboundQueue {
    pub(crate) fn new(capacity: usize, priority_capacity: usize) -> Self {
        Self {
            lanes: Mutex::new(Lanes::default()),
            closed: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            priority_queued: AtomicUsize::new(0),
            socket: AtomicU8::new(owner::TASK),
            consumer: AtomicWaker::new(),
            space: Notify::new(),
            capacity: capacity.max(1),
            priority_capacity,
        }
    }

    /// Reads the fields a send reads first (see [`ConnectionHandle::preload`]).
    ///
    /// [`ConnectionHandle::preload`]: crate::network::connections::handle::ConnectionHandle::preload
    pub(crate) fn preload(&self) {
        // The lock's poison flag sits beside the lock word and the start of the lanes.
        std::hint::black_box(self.lanes.is_poisoned());
        std::hint::black_box(self.closed.load(Ordering::Relaxed));
        std::hint::black_box(self.socket.load(Ordering::Relaxed));
        std::hint::black_box(self.capacity);
    }

    fn lock(&self) -> MutexGuard<'_, Lanes> {
        // Nothing panics while holding the lock; a poisoned one still holds a valid queue.
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Most messages queued at once.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots free right now: the capacity less what is queued and what permits hold.
    pub(crate) fn available(&self) -> usize {
        let lanes = self.lock();
        self.capacity.saturating_sub(lanes.messages.len() + lanes.reserved)
    }

    /// Queues `message` (or writes it to the socket at once, see the module docs), or hands it
    /// back with the reason it was refused.
    pub(crate) fn push(&self, message: OutboundMessage) -> Result<(), (Refused, OutboundMessage)> {
        self.push_as(message, true)
    }

    /// [`push`](Self::push); with `direct` false, the message is queued even if the socket is
    /// free, for the task to coalesce it with the messages that follow it closely.
    pub(crate) fn push_as(
        &self,
        message: OutboundMessage,
        direct: bool,
    ) -> Result<(), (Refused, OutboundMessage)> {
        let mut lanes = self.lock();
        if self.is_closed() {
            return Err((Refused::Closed, message));
        }
        if lanes.messages.len() + lanes.reserved >= self.capacity {
            return Err((Refused::Full, message));
        }
        let message = match message {
            OutboundMessage::Binary(payload) if direct => {
                match self.write_direct(&mut lanes, payload) {
                    Ok(()) => return Ok(()),
                    Err(payload) => OutboundMessage::Binary(payload),
                }
            }
            other => other,
        };
        lanes.messages.push_back(message);
        self.queued.store(lanes.messages.len(), Ordering::Relaxed);
        drop(lanes);
        self.consumer.wake();
        Ok(())
    }

    pub(crate) fn push_priority(&self, payload: Bytes) -> Result<(), Refused> {
        let mut lanes = self.lock();
        if self.is_closed() {
            return Err(Refused::Closed);
        }
        if lanes.priority.len() >= self.priority_capacity {
            return Err(Refused::Full);
        }
        // Nothing is ahead of a priority message once the socket is free.
        let Err(payload) = self.write_direct(&mut lanes, payload) else {
            return Ok(());
        };
        lanes.priority.push_back(payload);
        self.priority_queued.store(lanes.priority.len(), Ordering::Relaxed);
        drop(lanes);
        self.consumer.wake();
        Ok(())
    }

    /// Writes `payload` to the socket if the task holds nothing for it and nothing is queued;
    /// hands it back to be queued otherwise. Whatever the kernel does not take is queued here,
    /// ahead of everything, and the task holds the socket until it has written it.
    fn write_direct(&self, lanes: &mut Lanes, payload: Bytes) -> Result<(), Bytes> {
        let Some(direct) = &lanes.direct else {
            return Err(payload);
        };
        if !lanes.messages.is_empty()
            || !lanes.priority.is_empty()
            || self
                .socket
                .compare_exchange(0, owner::SENDER, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return Err(payload);
        }
        match direct.try_write_frame(&payload) {
            Written::All => {
                let was =
                    self.socket.fetch_and(!(owner::SENDER | owner::WANTED), Ordering::Release);
                if was & owner::WANTED != 0 {
                    self.consumer.wake();
                }
                Ok(())
            }
            Written::Part(rest) => {
                lanes.messages.push_back(OutboundMessage::Binary(rest));
                self.queued.store(lanes.messages.len(), Ordering::Relaxed);
                self.hand_socket_to_task(owner::UNSENT);
                Ok(())
            }
            Written::Nothing => {
                self.hand_socket_to_task(0);
                Err(payload)
            }
        }
    }

    /// After a sender's write: the task holds the socket (with `also`) and is woken to use it.
    /// (The task may have asked to be woken meanwhile, as it is; `stop_direct` waits for the
    /// queue's lock.)
    fn hand_socket_to_task(&self, also: u8) {
        self.socket.store(owner::TASK | also, Ordering::Release);
        self.consumer.wake();
    }

    /// Lets senders write `direct`'s socket themselves while the task holds nothing for it.
    pub(crate) fn attach_direct(&self, direct: Arc<dyn DirectWrite>) {
        let mut lanes = self.lock();
        if !self.is_closed() {
            lanes.direct = Some(direct);
        }
    }

    /// For the connection's task: whether it may write to the socket now. `false` while a
    /// sender is writing; that sender wakes the task when done.
    pub(crate) fn acquire_socket(&self) -> bool {
        let mut state = self.socket.load(Ordering::Acquire);
        loop {
            let (wanted, holds) = if state & owner::SENDER != 0 {
                (state | owner::WANTED, false)
            } else {
                (state | owner::TASK, true)
            };
            if wanted == state {
                return holds;
            }
            match self.socket.compare_exchange_weak(
                state,
                wanted,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return holds,
                Err(now) => state = now,
            }
        }
    }

    /// For the connection's task, holding nothing for the socket any more: senders may write to
    /// it again (unless something is queued, or no sender may any more).
    pub(crate) fn release_socket(&self) {
        if self.len() == 0 && self.priority_queued.load(Ordering::Relaxed) == 0 {
            // Fails, as it should, if the socket was stopped or something unsent is queued.
            let _ =
                self.socket.compare_exchange(owner::TASK, 0, Ordering::Release, Ordering::Relaxed);
        }
    }

    /// No sender writes to the socket from now on: everything goes through the task (a close
    /// is on its way and must follow what was sent before it, and nothing after).
    pub(crate) fn stop_direct(&self) {
        let _lanes = self.lock();
        self.socket.fetch_or(owner::STOPPED | owner::TASK, Ordering::AcqRel);
    }

    /// For the task holding the socket: the unwritten end of a sender's frame, if one is queued
    /// first. It goes to the socket before anything else.
    pub(crate) fn take_unsent(&self) -> Option<Bytes> {
        if self.socket.load(Ordering::Acquire) & owner::UNSENT == 0 {
            return None;
        }
        let mut lanes = self.lock();
        self.socket.fetch_and(!owner::UNSENT, Ordering::Relaxed);
        match lanes.messages.pop_front() {
            Some(OutboundMessage::Binary(rest)) => {
                self.queued.store(lanes.messages.len(), Ordering::Relaxed);
                Some(rest)
            }
            // Only if the queue was closed since, which empties it.
            other => {
                lanes.messages.extend(other);
                None
            }
        }
    }

    /// Queues `message`, waiting for space while the queue is full, until `deadline` if there
    /// is one (then [`Refused::Full`]).
    pub(crate) async fn push_waiting(
        &self,
        mut message: OutboundMessage,
        deadline: Option<Instant>,
    ) -> Result<(), (Refused, OutboundMessage)> {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            // Interested before looking, so a drain in between still wakes us.
            space.as_mut().enable();
            match self.push(message) {
                Err((Refused::Full, refused)) => message = refused,
                done => return done,
            }
            if !wait(space, deadline).await {
                return Err((Refused::Full, message));
            }
        }
    }

    /// Promises one slot to a later [`push_reserved`](Self::push_reserved), waiting for space
    /// like [`push_waiting`](Self::push_waiting).
    pub(crate) async fn reserve_waiting(&self, deadline: Option<Instant>) -> Result<(), Refused> {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut lanes = self.lock();
                if self.is_closed() {
                    return Err(Refused::Closed);
                }
                if lanes.messages.len() + lanes.reserved < self.capacity {
                    lanes.reserved += 1;
                    return Ok(());
                }
            }
            if !wait(space, deadline).await {
                return Err(Refused::Full);
            }
        }
    }

    /// Queues `message` in a slot [`reserve_waiting`](Self::reserve_waiting) promised.
    pub(crate) fn push_reserved(
        &self,
        message: OutboundMessage,
    ) -> Result<(), (Refused, OutboundMessage)> {
        {
            let mut lanes = self.lock();
            lanes.reserved = lanes.reserved.saturating_sub(1);
            if self.is_closed() {
                return Err((Refused::Closed, message));
            }
            lanes.messages.push_back(message);
            self.queued.store(lanes.messages.len(), Ordering::Relaxed);
        }
        self.consumer.wake();
        Ok(())
    }

    /// Gives back a promised slot that was not used.
    pub(crate) fn release_reserved(&self) {
        let mut lanes = self.lock();
        lanes.reserved = lanes.reserved.saturating_sub(1);
        drop(lanes);
        self.space.notify_waiters();
    }

    /// Completes once the queue is closed.
    pub(crate) async fn closed(&self) {
        loop {
            let change = self.space.notified();
            tokio::pin!(change);
            change.as_mut().enable();
            if self.is_closed() {
                return;
            }
            change.await;
        }
    }

    /// Everything queued, in order, leaving the queue empty (and unallocated).
    pub(crate) fn take_all(&self) -> VecDeque<OutboundMessage> {
        // Without the lock when there is nothing: a message pushed meanwhile wakes the consumer,
        // which looks again.
        if self.len() == 0 {
            return VecDeque::new();
        }
        let (taken, was_full) = {
            let mut lanes = self.lock();
            self.queued.store(0, Ordering::Relaxed);
            let was_full = lanes.messages.len() + lanes.reserved >= self.capacity;
            (std::mem::take(&mut lanes.messages), was_full)
        };
        if was_full {
            self.space.notify_waiters();
        }
        taken
    }

    /// The oldest waiting priority message.
    pub(crate) fn take_priority(&self) -> Option<Bytes> {
        // Without the lock when there is none, as `take_all`.
        if self.priority_queued.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut lanes = self.lock();
        let next = lanes.priority.pop_front();
        self.priority_queued.store(lanes.priority.len(), Ordering::Relaxed);
        if lanes.priority.is_empty() && lanes.priority.capacity() > 0 {
            lanes.priority = VecDeque::new();
        }
        next
    }

    pub(crate) fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Refuses every later message but keeps what is queued, for the consumer to drain.
    pub(crate) fn shut(&self) {
        {
            let _lanes = self.lock();
            self.closed.store(true, Ordering::Release);
        }
        self.space.notify_waiters();
        self.consumer.wake();
    }

    /// Refuses every later message and empties the queue; returns how many messages (priority
    /// messages included, close requests not) will never be delivered.
    pub(crate) fn close(&self) -> u64 {
        let left = {
            let mut lanes = self.lock();
            self.closed.store(true, Ordering::Release);
            let left = lanes.priority.len() as u64 + undelivered(&lanes.messages);
            let reserved = lanes.reserved;
            // Drops the socket senders wrote to: nothing writes to it any more.
            *lanes = Lanes { reserved, ..Lanes::default() };
            self.socket.store(owner::TASK | owner::STOPPED, Ordering::Release);
            self.queued.store(0, Ordering::Relaxed);
            self.priority_queued.store(0, Ordering::Relaxed);
            left
        };
        self.space.notify_waiters();
        self.consumer.wake();
        left
    }

    /// Wakes the consumer without queueing anything (a close request, a shutdown).
    pub(crate) fn wake_consumer(&self) {
        self.consumer.wake();
    }

    /// Registers the consumer's task to be woken by [`push`](Self::push) and co.
    pub(crate) fn register_consumer(&self, cx: &Context<'_>) {
        self.consumer.register(cx.waker());
    }

    /// The next message for an [`OutboundReceiver`](crate::network::OutboundReceiver):
    /// priority messages first; `None` once the queue is closed and empty.
    pub(crate) fn poll_next(&self, cx: &Context<'_>) -> Poll<Option<OutboundMessage>> {
        self.register_consumer(cx);
        match self.try_next() {
            Some(message) => Poll::Ready(Some(message)),
            None if self.is_closed() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    pub(crate) fn try_next(&self) -> Option<OutboundMessage> {
        let mut lanes = self.lock();
        if let Some(payload) = lanes.priority.pop_front() {
            self.priority_queued.store(lanes.priority.len(), Ordering::Relaxed);
            return Some(OutboundMessage::Binary(payload));
        }
        let was_full = lanes.messages.len() + lanes.reserved >= self.capacity;
        let next = lanes.messages.pop_front();
        self.queued.store(lanes.messages.len(), Ordering::Relaxed);
        drop(lanes);
        if was_full && next.is_some() {
            self.space.notify_waiters();
        }
        next
    }
}

/// Waits for `space` until `deadline` (for ever without one); `false` if the deadline came.
async fn wait(space: Pin<&mut Notified<'_>>, deadline: Option<Instant>) -> bool {
    match deadline {
        None => {
            space.await;
            true
        }
        Some(deadline) => tokio::time::timeout_at(deadline, space).await.is_ok(),
    }
}

/// A message queued for delivery to one connection.
///
/// `Binary` holds [`Bytes`] rather than the `Vec<u8>` one might expect: a broadcast queues the
/// same payload on many connections, and cloning `Bytes` only bumps a reference count. Build one
/// from a `Vec<u8>` with `.into()`.
///
/// Messages that must be neither coalesced nor queued behind a backlog go through
/// [`ConnectionHandle::try_send_priority`](crate::network::ConnectionHandle::try_send_priority) instead (see there for which TopGun messages need it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundMessage {
    /// A binary frame (a MsgPack-encoded message). Several queued messages may be coalesced into
    /// one `BATCH` frame on the wire.
    Binary(Bytes),
    /// Close the connection: the client receives Close code 1000 with this reason after every
    /// message queued before it.
    Close(Option<String>),
    /// A text frame, sent alone (never inside a `BATCH`), in its place among the queued
    /// messages. TopGun's clients speak binary MsgPack; this is for servers that also serve
    /// text (the echo example, a JSON side channel).
    Text(Utf8Bytes),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(byte: u8) -> OutboundMessage {
        OutboundMessage::Binary(Bytes::from(vec![byte]))
    }

    #[test]
    fn an_emptied_queue_holds_no_allocation() {
        let queue = OutboundQueue::new(256, 16);
        for byte in 0..100 {
            assert!(queue.push(binary(byte)).is_ok());
        }
        queue.push_priority(Bytes::from_static(b"p")).unwrap();
        assert_eq!(queue.take_all().len(), 100);
        assert_eq!(queue.take_priority(), Some(Bytes::from_static(b"p")));
        let lanes = queue.lock();
        assert_eq!((lanes.messages.capacity(), lanes.priority.capacity()), (0, 0));
    }

    #[test]
    fn a_closed_queue_refuses_and_reports_what_it_held() {
        let queue = OutboundQueue::new(4, 1);
        assert!(queue.push(binary(1)).is_ok());
        assert!(queue.push(OutboundMessage::Close(None)).is_ok());
        queue.push_priority(Bytes::from_static(b"p")).unwrap();
        assert_eq!(queue.push_priority(Bytes::from_static(b"q")), Err(Refused::Full));
        assert_eq!(
            queue.close(),
            2,
            "one message and one priority message; the close request is not one"
        );
        assert_eq!(queue.push(binary(2)), Err((Refused::Closed, binary(2))));
        assert_eq!(queue.len(), 0);
    }

    /// A socket whose writes go as told, recording what it was given and whether the task
    /// could take the socket during a write.
    #[derive(Debug, Default)]
    struct FakeSocket {
        outcomes: Mutex<VecDeque<Written>>,
        wrote: Mutex<Vec<Bytes>>,
        queue: std::sync::OnceLock<std::sync::Weak<OutboundQueue>>,
        task_got_socket_during_write: Mutex<Vec<bool>>,
    }

    impl DirectWrite for FakeSocket {
        fn try_write_frame(&self, payload: &Bytes) -> Written {
            if let Some(queue) = self.queue.get().and_then(std::sync::Weak::upgrade) {
                let got = queue.acquire_socket();
                self.task_got_socket_during_write.lock().unwrap().push(got);
            }
            self.wrote.lock().unwrap().push(payload.clone());
            self.outcomes.lock().unwrap().pop_front().unwrap_or(Written::All)
        }
    }

    fn with_socket(outcomes: Vec<Written>) -> (OutboundQueue, Arc<FakeSocket>) {
        let queue = OutboundQueue::new(16, 4);
        let socket =
            Arc::new(FakeSocket { outcomes: Mutex::new(outcomes.into()), ..FakeSocket::default() });
        queue.attach_direct(Arc::clone(&socket) as Arc<dyn DirectWrite>);
        (queue, socket)
    }

    fn wrote(socket: &FakeSocket) -> Vec<Bytes> {
        socket.wrote.lock().unwrap().clone()
    }

    #[test]
    fn a_sender_writes_only_to_a_socket_the_task_has_let_go() {
        let (queue, socket) = with_socket(vec![]);
        assert!(queue.push(binary(1)).is_ok());
        assert_eq!(queue.len(), 1, "the task holds the socket from the start");
        assert_eq!(queue.take_all(), [binary(1)]);
        queue.release_socket();
        assert!(queue.push(binary(2)).is_ok());
        queue.push_priority(Bytes::from_static(b"p")).unwrap();
        assert_eq!(queue.len(), 0);
        assert_eq!(wrote(&socket), [Bytes::from(vec![2]), Bytes::from_static(b"p")]);
        assert!(queue.acquire_socket());
        assert!(queue.push(binary(3)).is_ok());
        assert_eq!(queue.len(), 1, "queued while the task holds the socket");
        assert!(queue.push_as(binary(4), false).is_ok());
        queue.release_socket();
        assert!(queue.push(binary(5)).is_ok());
        assert_eq!(queue.len(), 3, "nothing jumps ahead of queued messages");
        assert_eq!(wrote(&socket).len(), 2);
    }

    #[test]
    fn the_part_the_kernel_refuses_goes_first_to_the_task() {
        let rest = Bytes::from_static(b"rest of the frame");
        let (queue, socket) = with_socket(vec![Written::Part(rest.clone()), Written::Nothing]);
        queue.release_socket();
        assert!(queue.push(binary(1)).is_ok());
        assert!(queue.push(binary(2)).is_ok());
        assert_eq!(wrote(&socket).len(), 1, "the second waits behind the unfinished frame");
        assert!(queue.acquire_socket());
        assert_eq!(queue.take_unsent(), Some(rest));
        assert_eq!(queue.take_unsent(), None);
        assert_eq!(queue.take_all(), [binary(2)]);
        queue.release_socket();
        assert!(queue.push(binary(3)).is_ok(), "refused by the kernel");
        assert_eq!(queue.take_unsent(), None, "a whole message refused is a message");
        assert_eq!(queue.take_all(), [binary(3)]);
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_task_that_finds_a_sender_writing_is_woken_when_it_is_done() {
        let (queue, socket) = with_socket(vec![]);
        let queue = Arc::new(queue);
        socket.queue.set(Arc::downgrade(&queue)).unwrap();
        let counter = Arc::new(CountingWaker::default());
        let waker = std::task::Waker::from(Arc::clone(&counter));
        queue.register_consumer(&Context::from_waker(&waker));
        queue.release_socket();
        assert!(queue.push(binary(1)).is_ok());
        assert_eq!(*socket.task_got_socket_during_write.lock().unwrap(), [false]);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken once the write was done");
        assert!(queue.acquire_socket());
    }

    #[test]
    fn no_sender_writes_once_a_close_is_on_its_way_or_the_queue_closed() {
        let (queue, socket) = with_socket(vec![]);
        queue.release_socket();
        queue.stop_direct();
        queue.release_socket();
        assert!(queue.push(binary(1)).is_ok());
        assert_eq!(queue.len(), 1);
        assert!(wrote(&socket).is_empty());
        assert_eq!(queue.close(), 1);
        assert_eq!(Arc::strong_count(&socket), 1, "the closed queue let go of the socket");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_sender_gets_in_once_the_queue_is_drained() {
        let queue = std::sync::Arc::new(OutboundQueue::new(1, 1));
        assert!(queue.push(binary(1)).is_ok());
        let waiting = tokio::spawn({
            let queue = std::sync::Arc::clone(&queue);
            async move { queue.push_waiting(binary(2), None).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the queue is full");
        assert_eq!(queue.take_all().len(), 1);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(queue.take_all(), [binary(2)]);
    }
}
