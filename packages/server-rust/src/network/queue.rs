//! registry → **queue** → writer: one connection's outbound queue.
//!
//! A bounded FIFO of [`OutboundMessage`]s plus the small priority lane of
//! [`ConnectionHandle::try_send_priority`](crate::network::ConnectionHandle::try_send_priority),
//! behind one uncontended lock. It holds no allocation while it is empty: an idle connection
//! pays for the lock, a waker and a counter, not for a block of slots. The connection's task
//! takes everything queued in one step ([`OutboundQueue::take_all`]) and writes it without the
//! lock held, so producers (a broadcast reaching thousands of queues) never wait for a socket.
//!
//! [`OutboundReceiver`](crate::network::OutboundReceiver) is the same queue's receiving end
//! for code that drives a connection itself rather than through the transport's engine.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

/// Why a message was not queued (before the handle's policy turns it into a
/// [`SendError`](crate::network::SendError)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Full,
    Closed,
}

#[derive(Debug, Default)]
struct Lanes {
    messages: VecDeque<OutboundMessage>,
    priority: VecDeque<Bytes>,
}

/// What dropping `messages` loses: the binary messages among them (close requests do not count).
pub(crate) fn undelivered(messages: &VecDeque<OutboundMessage>) -> u64 {
    messages.iter().filter(|m| matches!(m, OutboundMessage::Binary(_))).count() as u64
}

/// The queue itself; owned by the connection's handle.
#[derive(Debug)]
pub(crate) struct OutboundQueue {
    lanes: Mutex<Lanes>,
    /// Set once, under the lock; read without it by `is_connected`.
    closed: AtomicBool,
    /// `lanes.messages.len()`, kept under the lock and read without it: waiting broadcasts
    /// look at thousands of queues.
    queued: AtomicUsize,
    /// The task that drains the queue: woken for every message, priority message and close.
    consumer: AtomicWaker,
    /// Senders waiting for space (`send_timeout`); notified when a full queue is drained.
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

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn push(&self, message: OutboundMessage) -> Result<(), Refused> {
        self.offer(message).map_err(|(refused, _)| refused)
    }

    /// Like [`push`](Self::push), handing a refused message back.
    fn offer(&self, message: OutboundMessage) -> Result<(), (Refused, OutboundMessage)> {
        {
            let mut lanes = self.lock();
            if self.is_closed() {
                return Err((Refused::Closed, message));
            }
            if lanes.messages.len() >= self.capacity {
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
        }
        self.consumer.wake();
        Ok(())
    }

    /// Queues `message`, waiting for space while the queue is full.
    pub(crate) async fn push_waiting(&self, mut message: OutboundMessage) -> Result<(), Refused> {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            // Interested before looking, so a drain in between still wakes us.
            space.as_mut().enable();
            match self.offer(message) {
                Ok(()) => return Ok(()),
                Err((Refused::Closed, _)) => return Err(Refused::Closed),
                Err((Refused::Full, refused)) => message = refused,
            }
            space.await;
        }
    }

    /// Everything queued, in order, leaving the queue empty (and unallocated).
    pub(crate) fn take_all(&self) -> VecDeque<OutboundMessage> {
        // Without the lock when there is nothing: a message pushed meanwhile wakes the consumer,
        // which looks again.
        if self.len() == 0 {
            return VecDeque::new();
        }
        let taken = {
            let mut lanes = self.lock();
            self.queued.store(0, Ordering::Relaxed);
            std::mem::take(&mut lanes.messages)
        };
        if taken.len() >= self.capacity {
            self.space.notify_waiters();
        }
        taken
    }

    /// The oldest waiting priority message.
    pub(crate) fn take_priority(&self) -> Option<Bytes> {
        let mut lanes = self.lock();
        let next = lanes.priority.pop_front();
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

    /// Refuses every later message and empties the queue; returns how many messages (priority
    /// messages included, close requests not) will never be delivered.
    pub(crate) fn close(&self) -> u64 {
        let left = {
            let mut lanes = self.lock();
            self.closed.store(true, Ordering::Release);
            let left = lanes.priority.len() as u64 + undelivered(&lanes.messages);
            *lanes = Lanes::default();
            self.queued.store(0, Ordering::Relaxed);
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

    /// The next message for an [`OutboundReceiver`]: priority messages first.
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
            return Some(OutboundMessage::Binary(payload));
        }
        let was_full = lanes.messages.len() >= self.capacity;
        let next = lanes.messages.pop_front();
        self.queued.store(lanes.messages.len(), Ordering::Relaxed);
        drop(lanes);
        if was_full {
            self.space.notify_waiters();
        }
        next
    }
}

/// Why [`OutboundReceiver::try_recv`](crate::network::OutboundReceiver::try_recv) returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TryRecvError {
    /// Nothing is queued right now.
    #[error("the outbound queue is empty")]
    Empty,
    /// The queue is closed and empty; nothing will arrive again.
    #[error("the outbound queue is closed")]
    Disconnected,
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
            queue.push(binary(byte)).unwrap();
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
        queue.push(binary(1)).unwrap();
        queue.push(OutboundMessage::Close(None)).unwrap();
        queue.push_priority(Bytes::from_static(b"p")).unwrap();
        assert_eq!(queue.push_priority(Bytes::from_static(b"q")), Err(Refused::Full));
        assert_eq!(
            queue.close(),
            2,
            "one message and one priority message; the close request is not one"
        );
        assert_eq!(queue.push(binary(2)), Err(Refused::Closed));
        assert_eq!(queue.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_sender_gets_in_once_the_queue_is_drained() {
        let queue = std::sync::Arc::new(OutboundQueue::new(1, 1));
        queue.push(binary(1)).unwrap();
        let waiting = tokio::spawn({
            let queue = std::sync::Arc::clone(&queue);
            async move { queue.push_waiting(binary(2)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the queue is full");
        assert_eq!(queue.take_all().len(), 1);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(queue.take_all(), [binary(2)]);
    }
}
