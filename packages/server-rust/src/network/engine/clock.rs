//! clock → connections: one task per server wakes the connections whose periodic deadline has
//! come (the next ping, the authentication deadline), so an idle connection holds no timer.
//!
//! A connection publishes when it next needs its task woken
//! ([`ConnectionHandle::wake_at`](crate::network::ConnectionHandle)); the clock looks at every
//! connection once a tick and wakes those that are due. A tick is a sixteenth of the shortest
//! periodic interval (`ping_interval`, `auth_timeout`), from 5 ms to 1 s: with the defaults a
//! ping goes out at most a second after it is due, and ten thousand connections cost ten
//! thousand atomic loads a second. A tokio timer per connection would cost 112 bytes each,
//! whether the connection is busy or not.
//!
//! Deadlines that must be met to the millisecond and concern few connections at any time (a
//! blocked socket's send timeout, the close handshake, a read paused by the message budget)
//! keep a timer of the connection's own while they last.
//!
//! The clock runs while the server has connections: the first connection starts it, and it
//! stops at a tick that finds none.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::Shared;
use crate::network::config::ConnectionConfig;
use crate::network::connections::registry::ConnectionRegistry;

/// The shortest and the longest tick.
const TICK_BOUNDS: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// The tick for connections configured with `config`.
pub(crate) fn tick(config: &ConnectionConfig) -> Duration {
    let shortest =
        config.auth_timeout.map_or(config.ping_interval, |auth| auth.min(config.ping_interval));
    (shortest / 16).clamp(TICK_BOUNDS.0, TICK_BOUNDS.1)
}

/// Starts the clock of `shared`'s registry unless it runs; every connection calls this as it
/// starts, once it is in the registry.
pub(crate) fn ensure_running(shared: &Shared) {
    // The registration before it (counted relaxed) is ordered against the clock's look at the
    // count after it stopped: one of the two sees the other.
    fence(Ordering::SeqCst);
    // One clock per registry, however many routers serve it.
    if !shared.registry.clock_running.swap(true, Ordering::SeqCst) {
        let running = Running { registry: Arc::clone(&shared.registry), stopped: false };
        tokio::spawn(run(running, shared.clock_tick));
    }
}

async fn run(mut running: Running, tick: Duration) {
    let registry = Arc::clone(&running.registry);
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if registry.count() == 0 {
            registry.clock_running.store(false, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            // A connection that registered meanwhile either saw the clock stopped and
            // started another, or finds this one going on.
            if registry.count() == 0 || registry.clock_running.swap(true, Ordering::SeqCst) {
                running.stopped = true;
                return;
            }
        }
        registry.wake_due();
    }
}

/// A running clock's registry, whose flag is cleared if the clock is dropped unfinished (its
/// runtime shut down), so that the registry's next connection starts another.
struct Running {
    registry: Arc<ConnectionRegistry>,
    /// The clock stopped itself, leaving the flag as it found it.
    stopped: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.stopped {
            self.registry.clock_running.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::connection::ConnectionKind;

    #[test]
    fn a_tick_is_a_sixteenth_of_the_shortest_interval_within_bounds() {
        let config = ConnectionConfig::default();
        assert_eq!(tick(&config), Duration::from_secs(1));
        let fast = ConnectionConfig { ping_interval: Duration::from_millis(160), ..config.clone() };
        assert_eq!(tick(&fast), Duration::from_millis(10));
        let faster =
            ConnectionConfig { ping_interval: Duration::from_millis(10), ..config.clone() };
        assert_eq!(tick(&faster), Duration::from_millis(5));
        let auth = ConnectionConfig { auth_timeout: Some(Duration::from_millis(1600)), ..config };
        assert_eq!(tick(&auth), Duration::from_millis(100));
    }

    #[test]
    fn a_connection_is_due_once_its_instant_has_come_and_never_without_one() {
        let registry = ConnectionRegistry::new();
        let conn =
            registry.register_pending(ConnectionKind::Client, &ConnectionConfig::default(), None);
        let start = conn.connected_at;
        let after = |ms| start + Duration::from_millis(ms);
        assert!(!conn.is_due(after(3_600_000)), "nothing published yet");
        conn.wake_at(Some(tokio::time::Instant::from_std(after(1500))));
        assert!(!conn.is_due(after(1499)));
        assert!(conn.is_due(after(1501)));
        conn.wake_at(None);
        assert!(!conn.is_due(after(3_600_000)));
    }

    #[test]
    fn a_clock_dropped_with_its_runtime_is_started_again_by_the_next_connection() {
        let module = crate::network::NetworkModule::new(crate::network::NetworkConfig::default());
        let shared = Arc::clone(&module.app_state().engine);
        let running = || shared.registry.clock_running.load(Ordering::SeqCst);
        let runtime =
            || tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let first = runtime();
        first.block_on(async { ensure_running(&shared) });
        assert!(running());
        drop(first);
        assert!(!running(), "cleared when its runtime dropped it");
        let second = runtime();
        second.block_on(async { ensure_running(&shared) });
        assert!(running());
    }
}
