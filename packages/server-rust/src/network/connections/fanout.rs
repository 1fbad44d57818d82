//! registry / topics → **fanout** → queue: one payload to many connections.
//!
//! [`ConnectionRegistry`](crate::network::ConnectionRegistry) (broadcasts, targeted sends) and
//! [`Topics`](crate::network::Topics) (publishes) pick the connections; this room delivers to
//! them, the same way for all three:
//!
//! - one shared [`Bytes`] is queued on each connection (and, on a compressing connection,
//!   compressed once for all of them: `engine/deflate.rs` keeps the compressed form of a
//!   shared payload);
//! - after a pause, a sender writes the message to an idle connection's socket itself (no task
//!   woken); back to back, messages are queued, and each connection's task writes what piled up
//!   as one `BATCH` frame ([`Pace`]);
//! - a full queue is a drop, counted per connection and in the returned
//!   [`BroadcastOutcome`];
//! - the cooperative form waits, within bounds, for the writers to catch up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::multiple::RefMulti;

use crate::network::connection::ConnectionId;
use crate::network::connections::handle::ConnectionHandle;
use crate::network::connections::queue::OutboundMessage;

/// What a broadcast, a publish or a targeted send did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BroadcastOutcome {
    /// Connections the message was queued on (or written to at once, their socket being free).
    pub queued: usize,
    /// Connections that did not get the message: their queue was full or closed (for a
    /// targeted send, also ids no longer registered).
    pub dropped: usize,
}

/// Delivery shared by everything that sends one payload to many connections.
#[derive(Debug, Default)]
pub(crate) struct Fanout {
    pace: Pace,
}

/// Whether deliveries come back to back. After a pause, a delivery writes its message to each
/// idle connection's socket itself: one write per connection, no task woken. Back to back, the
/// messages are queued instead: each connection's task then writes what piled up since it last
/// ran as one frame (`BATCH`), which carries far more messages per write than one each.
#[derive(Debug)]
struct Pace {
    epoch: Instant,
    /// Nanoseconds after `epoch` from which a delivery follows a pause.
    quiet_from: AtomicU64,
}

impl Default for Pace {
    fn default() -> Self {
        Self { epoch: Instant::now(), quiet_from: AtomicU64::new(0) }
    }
}

impl Pace {
    /// How soon after the end of one delivery the next counts as back to back.
    const BACK_TO_BACK: Duration = Duration::from_millis(1);

    /// Nanoseconds since `epoch`.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// At the start of a delivery: whether it follows a pause.
    fn after_pause(&self) -> bool {
        self.after_pause_at(self.now())
    }

    fn after_pause_at(&self, now: u64) -> bool {
        now >= self.quiet_from.load(Ordering::Relaxed)
    }

    /// At the end of a delivery.
    fn ended(&self) {
        self.ended_at(self.now());
    }

    fn ended_at(&self, now: u64) {
        #[allow(clippy::cast_possible_truncation)] // a millisecond
        let back_to_back = Self::BACK_TO_BACK.as_nanos() as u64;
        self.quiet_from.store(now.saturating_add(back_to_back), Ordering::Relaxed);
    }
}

/// The recipients a cooperative delivery waits for: those left with a backlog.
#[derive(Default)]
pub(crate) struct Lagging {
    handles: Vec<Arc<ConnectionHandle>>,
}

impl Lagging {
    /// Looks at a connection that took the message: lagging if its queue holds more than
    /// [`Fanout::COOPERATIVE_BACKLOG`] and it has not already been given up on.
    pub(crate) fn note(&mut self, handle: &Arc<ConnectionHandle>) {
        let slow = &handle.state().slow_for_broadcasts;
        if handle.queued() <= Fanout::COOPERATIVE_BACKLOG {
            // Read first: the common case then never writes the shared line.
            if slow.load(Ordering::Relaxed) {
                slow.store(false, Ordering::Relaxed);
            }
        } else if !slow.load(Ordering::Relaxed) {
            self.handles.push(Arc::clone(handle));
        }
    }
}

impl Fanout {
    /// Queued messages beyond which a cooperative delivery counts a recipient as lagging.
    pub(crate) const COOPERATIVE_BACKLOG: usize = 12;
    /// Longest a cooperative delivery waits for lagging recipients before it returns anyway.
    pub(crate) const COOPERATIVE_MAX_WAIT: Duration = Duration::from_millis(250);
    /// The longest a waiting cooperative delivery goes without looking at the lagging queues
    /// again (it starts at 1 ms and doubles).
    const COOPERATIVE_RECHECK_MAX: Duration = Duration::from_millis(8);

    /// Runs one delivery: `deliver` is told whether it follows a pause (write directly) or
    /// comes back to back (queue).
    pub(crate) fn once(&self, deliver: impl FnOnce(bool) -> BroadcastOutcome) -> BroadcastOutcome {
        let outcome = deliver(self.pace.after_pause());
        self.pace.ended();
        outcome
    }

    /// Runs one delivery, then waits until the connection writers have caught up: until at
    /// most 1 % of the recipients (plus one) still hold more than
    /// [`COOPERATIVE_BACKLOG`](Self::COOPERATIVE_BACKLOG) queued messages, for at most
    /// [`COOPERATIVE_MAX_WAIT`](Self::COOPERATIVE_MAX_WAIT). It yields to the runtime at least
    /// once either way. A connection still behind when a call has waited its longest is not
    /// waited for again until it has caught up.
    ///
    /// `deliver` is told whether to write directly (as for [`once`](Self::once)) and is given
    /// the [`Lagging`] set to [`note`](Lagging::note) every connection that took the message.
    pub(crate) async fn cooperative(
        &self,
        deliver: impl FnOnce(bool, &mut Lagging) -> BroadcastOutcome,
    ) -> BroadcastOutcome {
        let mut lagging = Lagging::default();
        let outcome = deliver(self.pace.after_pause(), &mut lagging);
        let mut lagging = lagging.handles;
        tokio::task::yield_now().await;
        let tolerated = outcome.queued / 100 + 1;
        let deadline = tokio::time::Instant::now() + Self::COOPERATIVE_MAX_WAIT;
        // Soon at first, then less often: every look walks the lagging queues.
        let mut recheck = Duration::from_millis(1);
        while lagging.len() > tolerated {
            if tokio::time::Instant::now() >= deadline {
                for handle in &lagging {
                    handle.state().slow_for_broadcasts.store(true, Ordering::Relaxed);
                }
                break;
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + recheck)).await;
            recheck = (recheck * 2).min(Self::COOPERATIVE_RECHECK_MAX);
            lagging.retain(|handle| handle.queued() > Self::COOPERATIVE_BACKLOG);
        }
        // After the wait: a delivery that had to wait for its recipients is the one a next
        // delivery follows back to back.
        self.pace.ended();
        outcome
    }
}

/// A connection to deliver to, as the caller holds it: the registry's map entry (its shard
/// stays read-locked while the entry lives), a subscriber of a topic, or a handle of its own.
pub(crate) trait Target {
    fn handle(&self) -> &Arc<ConnectionHandle>;
}

impl Target for Arc<ConnectionHandle> {
    fn handle(&self) -> &Arc<ConnectionHandle> {
        self
    }
}

impl Target for &Arc<ConnectionHandle> {
    fn handle(&self) -> &Arc<ConnectionHandle> {
        self
    }
}

impl Target for RefMulti<'_, ConnectionId, Arc<ConnectionHandle>> {
    fn handle(&self) -> &Arc<ConnectionHandle> {
        self.value()
    }
}

/// Queues `payload` on every connection of `targets` that `pick` accepts, calling `took` with
/// each connection that took it; `direct` lets a sender write to an idle socket itself.
///
/// Each connection's handle is read two connections ahead of its send and its queue one
/// ahead (see [`ConnectionHandle::preload`]): with thousands of connections their state is out
/// of cache, and the lines then arrive while the previous connection's send runs.
pub(crate) fn send_each<E: Target>(
    direct: bool,
    payload: &Bytes,
    targets: impl IntoIterator<Item = E>,
    mut pick: impl FnMut(&ConnectionHandle) -> bool,
    mut took: impl FnMut(&Arc<ConnectionHandle>),
) -> BroadcastOutcome {
    let mut outcome = BroadcastOutcome::default();
    let mut visit = |handle: &Arc<ConnectionHandle>| {
        if !pick(handle) {
            return;
        }
        if handle.try_send_as(OutboundMessage::Binary(payload.clone()), direct) {
            outcome.queued += 1;
            took(handle);
        } else {
            outcome.dropped += 1;
        }
    };
    // `next`'s handle has been preloaded; `now`'s handle and queue have.
    let mut next: Option<E> = None;
    let mut now: Option<E> = None;
    for entry in targets {
        entry.handle().preload();
        if let Some(next) = &next {
            next.handle().preload_queue();
        }
        if let Some(now) = now.take() {
            visit(now.handle());
        }
        now = next.replace(entry);
    }
    for entry in now.into_iter().chain(next) {
        visit(entry.handle());
    }
    if outcome.dropped > 0 {
        tracing::debug!(
            dropped = outcome.dropped,
            queued = outcome.queued,
            "delivery skipped full or closed queues"
        );
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_follows_a_pause_unless_it_comes_within_a_millisecond_of_the_last() {
        let pace = Pace::default();
        assert!(pace.after_pause_at(0), "the first delivery");
        pace.ended_at(5_000_000);
        assert!(!pace.after_pause_at(5_000_000), "back to back");
        assert!(!pace.after_pause_at(5_999_999));
        assert!(pace.after_pause_at(6_000_000), "a millisecond later");
    }
}
