//! Health state machine and coordinated, graceful shutdown.
//!
//! ```text
//! Starting --set_ready()--> Ready --trigger_shutdown()--> Draining --set_stopped()--> Stopped
//! ```
//!
//! [`ShutdownController`] is shared (behind an `Arc`) by the health handlers, every connection
//! task and [`NetworkModule::serve`](crate::network::NetworkModule::serve), which walks the
//! whole sequence. Work that must finish before the process exits holds an [`InFlightGuard`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::network::connections::registry::ConnectionRegistry;

/// Lifecycle state reported by the health endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Constructed, not yet serving. Readiness answers `503`.
    Starting,
    /// Serving traffic. Readiness answers `200`.
    Ready,
    /// Shutting down: finishing work, refusing to be routed new traffic. Readiness answers `503`.
    Draining,
    /// Shut down.
    Stopped,
}

impl HealthState {
    /// The lowercase name used in the `/health` JSON body.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Default)]
struct InFlightCounter {
    count: AtomicU64,
    drained: Notify,
}

/// Counts one unit of in-flight work for as long as it lives.
///
/// Obtained from [`ShutdownController::in_flight_guard`]; dropping it ends the unit of work.
#[derive(Debug)]
#[must_use = "the work counts as in flight only while the guard is alive"]
pub struct InFlightGuard {
    counter: Arc<InFlightCounter>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.counter.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counter.drained.notify_waiters();
        }
    }
}

/// Owns the health state, the shutdown signal and the in-flight work counter.
///
/// ```
/// use std::time::Duration;
/// use topgun_server::network::{HealthState, ShutdownController};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let controller = ShutdownController::new();
/// controller.set_ready();
/// let guard = controller.in_flight_guard();
/// controller.trigger_shutdown();
/// assert_eq!(controller.health_state(), HealthState::Draining);
/// assert!(!controller.wait_for_drain(Duration::from_millis(10)).await);
/// drop(guard);
/// assert!(controller.wait_for_drain(Duration::from_millis(10)).await);
/// # }
/// ```
#[derive(Debug)]
pub struct ShutdownController {
    shutdown_signal: watch::Sender<bool>,
    in_flight: Arc<InFlightCounter>,
    health_state: Arc<ArcSwap<HealthState>>,
    /// Cancelled with `close_connections`: the TLS acceptor drops pending handshakes on it.
    close_connections: CancellationToken,
    /// The registry whose connections this controller closes: they look at the shutdown
    /// state only when woken, and [`close_connections`](Self::close_connections) wakes them.
    connections: OnceLock<Weak<ConnectionRegistry>>,
    /// The shutdown state as plain flags: every connection looks at them whenever it is
    /// polled, and a token's own check takes its lock.
    closing: AtomicBool,
    forced: AtomicBool,
}

impl Default for ShutdownController {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownController {
    /// A controller in [`HealthState::Starting`] with no shutdown signalled.
    #[must_use]
    pub fn new() -> Self {
        Self {
            shutdown_signal: watch::Sender::new(false),
            in_flight: Arc::default(),
            health_state: Arc::new(ArcSwap::from_pointee(HealthState::Starting)),
            close_connections: CancellationToken::new(),
            connections: OnceLock::new(),
            closing: AtomicBool::new(false),
            forced: AtomicBool::new(false),
        }
    }

    /// Moves `Starting` to `Ready`. Has no effect once shutdown has begun, so a late
    /// `set_ready` can never put a draining node back into rotation.
    pub fn set_ready(&self) {
        self.transition(|state| (state == HealthState::Starting).then_some(HealthState::Ready));
    }

    /// A receiver that reads `true` once shutdown has been triggered, including when it is
    /// taken after the trigger.
    pub fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.shutdown_signal.subscribe()
    }

    /// Begins the shutdown: health becomes `Draining` and every shutdown receiver is signalled.
    /// Calling it again changes nothing.
    pub fn trigger_shutdown(&self) {
        self.transition(|state| {
            matches!(state, HealthState::Starting | HealthState::Ready)
                .then_some(HealthState::Draining)
        });
        // `send_replace` stores the value even with no receiver alive, so later receivers see it.
        self.shutdown_signal.send_replace(true);
    }

    /// Whether [`trigger_shutdown`](Self::trigger_shutdown) has been called.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown_signal.borrow()
    }

    /// Completes once shutdown has been triggered (immediately if it already was).
    pub async fn shutdown_requested(&self) {
        let mut receiver = self.shutdown_receiver();
        // The sender lives as long as `self`, so `wait_for` cannot fail here.
        let _ = receiver.wait_for(|signalled| *signalled).await;
    }

    /// Marks the end of the shutdown.
    pub fn set_stopped(&self) {
        self.health_state.store(Arc::new(HealthState::Stopped));
    }

    /// The current health state.
    pub fn health_state(&self) -> HealthState {
        **self.health_state.load()
    }

    /// A shared, lock-free handle to the health state.
    pub fn health_state_handle(&self) -> Arc<ArcSwap<HealthState>> {
        Arc::clone(&self.health_state)
    }

    /// Counts one unit of in-flight work until the returned guard is dropped.
    pub fn in_flight_guard(&self) -> InFlightGuard {
        self.in_flight.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard { counter: Arc::clone(&self.in_flight) }
    }

    /// Units of work currently in flight.
    pub fn in_flight_count(&self) -> u64 {
        self.in_flight.count.load(Ordering::Acquire)
    }

    /// Waits until no work is in flight or `timeout` passes. Returns `true` if drained; a
    /// drained controller that was `Draining` is then `Stopped` (before a shutdown has been
    /// triggered, a drained controller stays as it is).
    pub async fn wait_for_drain(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.in_flight.drained.notified();
                tokio::pin!(notified);
                // Register interest before reading the count, so a guard dropped in between
                // still wakes us.
                notified.as_mut().enable();
                if self.in_flight_count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let drained = tokio::time::timeout(timeout, wait).await.is_ok();
        if drained {
            self.transition(|state| {
                (state == HealthState::Draining).then_some(HealthState::Stopped)
            });
        }
        drained
    }

    /// Asks every WebSocket connection to send what is queued, then Close 1001.
    ///
    /// [`NetworkModule::serve`](crate::network::NetworkModule::serve) calls this after the
    /// grace period; call it yourself only when serving the router some other way.
    pub fn close_connections(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.close_connections.cancel();
        self.wake_connections();
    }

    /// Drops every remaining WebSocket connection without further ceremony.
    pub fn force_close_connections(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.forced.store(true, Ordering::SeqCst);
        self.close_connections.cancel();
        self.wake_connections();
    }

    /// Whether [`close_connections`](Self::close_connections) (or the forced close) was called.
    pub(crate) fn closing_connections(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Whether [`force_close_connections`](Self::force_close_connections) was called.
    pub(crate) fn forcing_close(&self) -> bool {
        self.forced.load(Ordering::SeqCst)
    }

    /// Binds the controller to the registry its connections live in (the first binding
    /// stays); the engine does this for every connection it serves.
    pub(crate) fn serve_registry(&self, registry: &Arc<ConnectionRegistry>) {
        if self.connections.get().is_none() {
            let _ = self.connections.set(Arc::downgrade(registry));
        }
    }

    fn wake_connections(&self) {
        if let Some(registry) = self.connections.get().and_then(Weak::upgrade) {
            registry.wake_all();
        }
    }

    pub(crate) fn close_connections_token(&self) -> &CancellationToken {
        &self.close_connections
    }

    fn transition(&self, next: impl Fn(HealthState) -> Option<HealthState>) {
        self.health_state
            .rcu(|current| next(**current).map_or_else(|| Arc::clone(current), Arc::new));
    }
}

/// Listens for the signals that ask a process to stop (SIGINT and SIGTERM on Unix, Ctrl-C
/// elsewhere) from the moment it is called; the returned future completes on the first one.
/// Pass it to [`NetworkModule::serve`](crate::network::NetworkModule::serve) so that a process
/// manager's SIGTERM, not only Ctrl-C, stops the server gracefully.
///
/// ```no_run
/// use topgun_server::network::{NetworkConfig, NetworkModule, shutdown_signal};
///
/// # async fn run() -> anyhow::Result<()> {
/// let stop = shutdown_signal()?; // before start(): a signal right after binding is not lost
/// let mut module = NetworkModule::new(NetworkConfig::default());
/// module.start().await?;
/// module.serve(stop).await
/// # }
/// ```
///
/// # Errors
///
/// The signal handlers cannot be installed.
#[cfg(unix)]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received; shutting down"),
            _ = terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
        }
    })
}

/// Listens for Ctrl-C; the returned future completes on the first one.
///
/// # Errors
///
/// Never on this platform; the signature matches the Unix one.
#[cfg(not(unix))]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C received; shutting down");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_state_only_moves_forward() {
        let controller = ShutdownController::new();
        controller.set_ready();
        controller.trigger_shutdown();
        controller.set_ready();
        assert_eq!(controller.health_state(), HealthState::Draining, "no way back to ready");
        controller.set_stopped();
        assert_eq!(controller.health_state(), HealthState::Stopped);
        controller.trigger_shutdown();
        assert_eq!(controller.health_state(), HealthState::Stopped, "stopped is final");
    }

    #[test]
    fn receiver_taken_after_trigger_still_reads_the_shutdown() {
        let controller = ShutdownController::new();
        assert!(!*controller.shutdown_receiver().borrow());
        controller.trigger_shutdown();
        assert!(*controller.shutdown_receiver().borrow());
        assert!(controller.is_shutting_down());
    }

    #[tokio::test]
    async fn shutdown_requested_wakes_waiters() {
        let controller = Arc::new(ShutdownController::new());
        let waiter = tokio::spawn({
            let controller = Arc::clone(&controller);
            async move { controller.shutdown_requested().await }
        });
        controller.trigger_shutdown();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        // Already signalled: completes at once.
        tokio::time::timeout(Duration::from_secs(5), controller.shutdown_requested())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn wait_for_drain_returns_when_the_last_guard_drops() {
        let controller = Arc::new(ShutdownController::new());
        let first = controller.in_flight_guard();
        let second = controller.in_flight_guard();
        assert_eq!(controller.in_flight_count(), 2);
        let waiter = tokio::spawn({
            let controller = Arc::clone(&controller);
            async move { controller.wait_for_drain(Duration::from_secs(10)).await }
        });
        drop(first);
        assert_eq!(controller.in_flight_count(), 1);
        drop(second);
        assert!(waiter.await.unwrap(), "drain must complete once both guards are gone");
        assert_eq!(controller.in_flight_count(), 0);
    }

    #[tokio::test]
    async fn wait_for_drain_gives_up_at_the_timeout() {
        let controller = ShutdownController::new();
        controller.set_ready();
        controller.trigger_shutdown();
        let _guard = controller.in_flight_guard();
        assert!(!controller.wait_for_drain(Duration::from_millis(20)).await);
        assert_eq!(controller.health_state(), HealthState::Draining, "not drained: not stopped");
    }

    #[tokio::test]
    async fn a_drain_that_completes_leaves_the_state_stopped() {
        let controller = ShutdownController::new();
        controller.set_ready();
        assert!(controller.wait_for_drain(Duration::from_secs(5)).await);
        assert_eq!(controller.health_state(), HealthState::Ready, "no shutdown, no stop");
        controller.trigger_shutdown();
        assert!(controller.wait_for_drain(Duration::from_secs(5)).await);
        assert_eq!(controller.health_state(), HealthState::Stopped);
    }

    #[test]
    fn health_state_serializes_lowercase() {
        assert_eq!(serde_json::to_string(&HealthState::Draining).unwrap(), r#""draining""#);
        assert_eq!(HealthState::Ready.as_str(), "ready");
    }
}
