use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A hybrid logical clock timestamp.
///
/// Ordered by `millis`, then `counter`, then `node_id`, so two timestamps from different nodes
/// never compare equal. Serialised as `{ "millis", "counter", "nodeId" }`, the shape TopGun's
/// TypeScript client reads and writes. Deserialising accepts the numbers as that client writes
/// them: `millis` above 2^32 - 1 arrives as a float64, read exactly (see [`crate::number`]);
/// a fractional, negative or out-of-range number is refused.
///
/// ```
/// use topgun_core::Timestamp;
///
/// let a = Timestamp::new(10, 0, "node-a");
/// let b = Timestamp::new(10, 1, "node-a");
/// assert!(a < b);
/// assert_eq!(serde_json::to_string(&a).unwrap(), r#"{"millis":10,"counter":0,"nodeId":"node-a"}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timestamp {
    /// Physical component: milliseconds since the Unix epoch.
    #[serde(deserialize_with = "crate::number::deserialize_u64")]
    pub millis: u64,
    /// Logical component: orders events within the same millisecond.
    #[serde(deserialize_with = "crate::number::deserialize_u32")]
    pub counter: u32,
    /// The node that issued the timestamp; breaks ties between nodes.
    pub node_id: String,
}

impl Timestamp {
    /// Builds a timestamp from its three parts.
    pub fn new(millis: u64, counter: u32, node_id: impl Into<String>) -> Self {
        Self { millis, counter, node_id: node_id.into() }
    }
}

impl fmt::Display for Timestamp {
    /// Formats as `millis:counter:nodeId`, the string form TopGun uses in logs and keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.millis, self.counter, self.node_id)
    }
}

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// [`SystemClock`] is the real one; tests inject their own to move time backwards or forwards.
pub trait WallClock: Send + Sync {
    /// Current wall-clock time in milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_millis(&self) -> u64 {
        // A clock set before 1970 reads as the epoch; the logical counter keeps order anyway.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A remote timestamp lies further in the future than the clock tolerates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote timestamp {remote} is {ahead_ms} ms ahead of local wall clock {local_millis}, \
     more than the allowed drift of {max_drift_ms} ms"
)]
pub struct ClockDriftError {
    /// The rejected remote timestamp.
    pub remote: Timestamp,
    /// The local wall clock when the timestamp was rejected.
    pub local_millis: u64,
    /// How far ahead of the local clock the remote timestamp was.
    pub ahead_ms: u64,
    /// The configured tolerance.
    pub max_drift_ms: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct ClockState {
    millis: u64,
    counter: u32,
}

/// A hybrid logical clock issuing strictly increasing [`Timestamp`]s for one node.
///
/// Timestamps never go backwards, even if the wall clock does, and merging a remote timestamp
/// with [`update`](Self::update) keeps causality: every later local timestamp is greater than it.
///
/// ```
/// use topgun_core::HybridClock;
///
/// let clock = HybridClock::new("node-a");
/// let first = clock.now();
/// let second = clock.now();
/// assert!(first < second);
/// ```
pub struct HybridClock {
    node_id: String,
    max_drift: Duration,
    wall: Box<dyn WallClock>,
    state: Mutex<ClockState>,
}

impl fmt::Debug for HybridClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HybridClock")
            .field("node_id", &self.node_id)
            .field("max_drift", &self.max_drift)
            .finish_non_exhaustive()
    }
}

impl HybridClock {
    /// Maximum distance a remote timestamp may lie ahead of the local wall clock by default.
    pub const DEFAULT_MAX_DRIFT: Duration = Duration::from_secs(60);

    /// A clock for `node_id` on the system wall clock with [`Self::DEFAULT_MAX_DRIFT`].
    pub fn new(node_id: impl Into<String>) -> Self {
        Self::with_wall_clock(node_id, Self::DEFAULT_MAX_DRIFT, SystemClock)
    }

    /// A clock with an explicit drift tolerance and wall-clock source.
    pub fn with_wall_clock(
        node_id: impl Into<String>,
        max_drift: Duration,
        wall: impl WallClock + 'static,
    ) -> Self {
        Self {
            node_id: node_id.into(),
            max_drift,
            wall: Box::new(wall),
            state: Mutex::new(ClockState::default()),
        }
    }

    /// The node id stamped on every timestamp this clock issues.
    #[must_use]
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Issues a timestamp greater than every timestamp issued or merged before.
    ///
    /// # Panics
    ///
    /// Never in practice: the state lock is only poisoned if a previous holder panicked, and no
    /// code path under the lock can panic.
    pub fn now(&self) -> Timestamp {
        let wall = self.wall.now_millis();
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if wall > state.millis {
            *state = ClockState { millis: wall, counter: 0 };
        } else {
            Self::advance_counter(&mut state);
        }
        Timestamp::new(state.millis, state.counter, self.node_id.clone())
    }

    /// Merges a timestamp received from another node.
    ///
    /// # Errors
    ///
    /// Returns [`ClockDriftError`] and leaves the clock untouched when `remote` is more than the
    /// configured drift ahead of the local wall clock, so one node with a broken clock cannot drag
    /// every other node's clock into the future.
    pub fn update(&self, remote: &Timestamp) -> Result<(), ClockDriftError> {
        let wall = self.wall.now_millis();
        let max_drift_ms = u64::try_from(self.max_drift.as_millis()).unwrap_or(u64::MAX);
        if remote.millis > wall.saturating_add(max_drift_ms) {
            return Err(ClockDriftError {
                remote: remote.clone(),
                local_millis: wall,
                ahead_ms: remote.millis - wall,
                max_drift_ms,
            });
        }
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let millis = wall.max(state.millis).max(remote.millis);
        let counter = if millis == state.millis && millis == remote.millis {
            state.counter.max(remote.counter).checked_add(1)
        } else if millis == state.millis {
            state.counter.checked_add(1)
        } else if millis == remote.millis {
            remote.counter.checked_add(1)
        } else {
            Some(0)
        };
        match counter {
            Some(counter) => *state = ClockState { millis, counter },
            // The counter overflowed within one millisecond: borrow the next millisecond.
            None => *state = ClockState { millis: millis + 1, counter: 0 },
        }
        Ok(())
    }

    fn advance_counter(state: &mut ClockState) {
        match state.counter.checked_add(1) {
            Some(counter) => state.counter = counter,
            None => *state = ClockState { millis: state.millis + 1, counter: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A wall clock the test moves by hand.
    #[derive(Clone, Default)]
    struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        fn at(millis: u64) -> Self {
            Self(Arc::new(AtomicU64::new(millis)))
        }
        fn set(&self, millis: u64) {
            self.0.store(millis, Ordering::SeqCst);
        }
    }

    impl WallClock for ManualClock {
        fn now_millis(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn clock_at(millis: u64) -> (HybridClock, ManualClock) {
        let wall = ManualClock::at(millis);
        (HybridClock::with_wall_clock("local", Duration::from_secs(1), wall.clone()), wall)
    }

    #[test]
    fn timestamps_order_by_millis_then_counter_then_node() {
        let mut sorted = vec![
            Timestamp::new(2, 0, "a"),
            Timestamp::new(1, 5, "b"),
            Timestamp::new(1, 5, "a"),
            Timestamp::new(1, 0, "z"),
        ];
        sorted.sort();
        assert_eq!(
            sorted,
            vec![
                Timestamp::new(1, 0, "z"),
                Timestamp::new(1, 5, "a"),
                Timestamp::new(1, 5, "b"),
                Timestamp::new(2, 0, "a"),
            ]
        );
    }

    #[test]
    fn now_is_monotonic_when_the_wall_clock_goes_backwards() {
        let (clock, wall) = clock_at(1_000);
        let before = clock.now();
        wall.set(400);
        let after_jump = clock.now();
        let next = clock.now();
        assert!(before < after_jump && after_jump < next);
        assert_eq!(after_jump.millis, 1_000, "physical part must not follow the clock back");
        wall.set(2_000);
        assert_eq!(clock.now(), Timestamp::new(2_000, 0, "local"));
    }

    #[test]
    fn update_makes_later_timestamps_exceed_the_remote_one() {
        let (clock, _wall) = clock_at(1_000);
        let remote = Timestamp::new(1_500, 7, "remote");
        clock.update(&remote).unwrap();
        let next = clock.now();
        assert!(next > remote, "{next} must be after {remote}");
        assert_eq!(next.millis, 1_500);
    }

    #[test]
    fn update_rejects_a_remote_timestamp_beyond_the_drift_bound() {
        let (clock, _wall) = clock_at(1_000);
        let far = Timestamp::new(2_001, 0, "remote");
        let err = clock.update(&far).unwrap_err();
        assert_eq!(err.ahead_ms, 1_001);
        assert_eq!(err.max_drift_ms, 1_000);
        assert!(err.to_string().contains("more than the allowed drift of 1000 ms"), "{err}");
        assert_eq!(clock.now().millis, 1_000, "a rejected update must not move the clock");
        clock.update(&Timestamp::new(2_000, 0, "remote")).expect("exactly at the bound is fine");
    }

    #[test]
    fn counter_overflow_rolls_into_the_next_millisecond() {
        let (clock, _wall) = clock_at(5);
        clock.update(&Timestamp::new(5, u32::MAX, "remote")).unwrap();
        assert_eq!(clock.now(), Timestamp::new(6, 1, "local"));
    }

    #[test]
    fn msgpack_round_trip_uses_the_client_field_names() {
        let ts = Timestamp::new(1_700_000_000_000, 3, "node-1");
        let bytes = rmp_serde::to_vec_named(&ts).unwrap();
        assert_eq!(rmp_serde::from_slice::<Timestamp>(&bytes).unwrap(), ts);
        let as_map: std::collections::BTreeMap<String, rmpv_like::Value> =
            rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            as_map.keys().map(String::as_str).collect::<Vec<_>>(),
            ["counter", "millis", "nodeId"]
        );
    }

    #[test]
    fn msgpack_from_the_typescript_client_is_read() {
        // {millis: 1796023824376, counter: 0, nodeId: 'n'} from the client's own serializer:
        // map16, millis as float64.
        let bytes = b"\xde\x00\x03\xa6millis\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00\xa7counter\x00\xa6nodeId\xa1n";
        let ts: Timestamp = rmp_serde::from_slice(bytes).unwrap();
        assert_eq!(ts, Timestamp::new(1_796_023_824_376, 0, "n"));
        let fractional = b"\xde\x00\x03\xa6millis\xcb\x42\x7a\x22\xb5\xca\xff\x80\x01\xa7counter\x00\xa6nodeId\xa1n";
        let err = rmp_serde::from_slice::<Timestamp>(fractional).unwrap_err().to_string();
        assert!(err.contains("a whole number"), "{err}");
    }

    /// Enough of a dynamic MsgPack value to look at map keys without another dependency.
    mod rmpv_like {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        pub enum Value {
            Int(#[allow(dead_code)] u64),
            Str(#[allow(dead_code)] String),
        }
    }
}
