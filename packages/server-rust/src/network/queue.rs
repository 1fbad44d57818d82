//! registry → **queue** → writer: one connection's outbound queue.
//!
//! A bounded FIFO of [`OutboundMessage`]s plus the small priority lane of
//! [`ConnectionHandle::try_send_priority`](crate::network::ConnectionHandle::try_send_priority),
//! behind one uncontended lock. It holds no allocation while it is empty: an idle connection
//! pays for the lock, a waker and a counter, not for a block of slots. The connection's task
//! takes everything queued in one step ([`OutboundQueue::take_all`]) and writes it without the
//! lock held, so producers (a broadcast reaching thousands of queues) never wait for a socket.
//!
//! The queue knows nothing of drop counting or limits: every message reaches it through the
//! connection's [`OutboundSender`](crate::network::OutboundSender) (`channel.rs`), which
//! applies them, and [`OutboundReceiver`](crate::network::OutboundReceiver) is its receiving end
//! for code that drives a connection itself rather than through the transport's engine.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

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
}

/// What dropping `messages` loses: the binary messages among them (close requests do not count).
pub(crate) fn undelivered(messages: &VecDeque<OutboundMessage>) -> u64 {
    messages.iter().filter(|m| matches!(m, OutboundMessage::Binary(_))).count() as u64
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
            consumer: AtomicWaker::new(),
            space: Notify::new(),
            capacity: capacity.max(1),
            priority_capacity,
        }
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

    /// Queues `message`, or hands it back with the reason it was refused.
    pub(crate) fn push(&self, message: OutboundMessage) -> Result<(), (Refused, OutboundMessage)> {
        {
            let mut lanes = self.lock();
            if self.is_closed() {
                return Err((Refused::Closed, message));
            }
            if lanes.messages.len() + lanes.reserved >= self.capacity {
                return Err((Refused::Full, message));
            }
            lanes.messages.push_back(message);
            self.queued.store(lanes.messages.len(), Ordering::Relaxed);
        }
        self.consumer.wake();
        Ok(())
    }

    pub(crate) fn push_priority(&self, payload: Bytes) -> Result<(), Refused> {
        {
            let mut lanes = self.lock();
            if self.is_closed() {
                return Err(Refused::Closed);
            }
            if lanes.priority.len() >= self.priority_capacity {
                return Err(Refused::Full);
            }
            lanes.priority.push_back(payload);
            self.priority_queued.store(lanes.priority.len(), Ordering::Relaxed);
        }
        self.consumer.wake();
        Ok(())
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
            *lanes = Lanes { reserved, ..Lanes::default() };
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
