//! Prometheus metrics for the transport, served at `GET /metrics`.
//!
//! Each [`NetworkModule`](crate::network::NetworkModule) owns its own recorder (nothing is
//! installed globally), so several servers in one process, or an application with its own
//! `metrics` recorder, do not mix their numbers. Handles for every metric on the per-message
//! path are registered once up front: recording is then an atomic add, with no lookup, lock or
//! allocation. Histograms are recorded per frame or burst, never per message.
//!
//! The figures every frame adds to (frames, messages and bytes sent and received, messages per
//! frame, queue depth) are not added to the shared counters as they happen: each worker thread
//! tallies them apart ([`Tally`]), and rendering (or upkeep) folds the tallies in. Ten thousand
//! writers on two threads adding to one counter pass its cache line back and forth on every
//! frame, and the exporter's histograms append every sample to a shared list: in a profiled
//! fan-out those updates took about 4 % of the server's CPU.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `topgun_connections_open` | gauge | `kind` | open connections |
//! | `topgun_connections_opened_total` | counter | `kind` | connections opened |
//! | `topgun_connections_closed_total` | counter | `kind`, `reason` | connections closed, by [`DisconnectReason`] |
//! | `topgun_websocket_upgrades_refused_total` | counter | `reason` | upgrades refused: `draining`, `connection_limit` (`503`), `per_ip_limit` (`429`), `origin` (`403`) |
//! | `topgun_rate_limited_requests_total` | counter | | requests answered `429` by the per-address rate limit |
//! | `topgun_inbound_throttled_total` | counter | | times a connection's reading paused on its inbound message budget |
//! | `topgun_proxy_protocol_refused_total` | counter | | connections closed for a missing or invalid PROXY protocol header |
//! | `topgun_websocket_messages_received_total` | counter | | binary messages received |
//! | `topgun_websocket_received_bytes_total` | counter | | payload bytes received |
//! | `topgun_websocket_messages_sent_total` | counter | | messages sent (inside batches or alone) |
//! | `topgun_websocket_sent_bytes_total` | counter | | frame bytes sent |
//! | `topgun_websocket_frames_sent_total` | counter | | data frames sent |
//! | `topgun_websocket_compressed_frames_total` | counter | | of those, frames sent compressed (permessage-deflate) |
//! | `topgun_websocket_compressed_bytes_total` | counter | | bytes those frames' payloads took after compression |
//! | `topgun_websocket_batch_messages` | histogram | | messages per data frame |
//! | `topgun_websocket_outbound_queue_depth` | histogram | | queued messages when the writer wakes |
//! | `topgun_outbound_dropped_messages_total` | counter | | messages that never reached their connection: full queue, queued at close, sent after close |
//! | `topgun_tls_handshake_failures_total` | counter | | TLS handshakes that failed |
//! | `topgun_topics` | gauge | | topics with at least one subscriber ([`Topics`](crate::network::Topics)) |
//! | `topgun_topic_subscriptions` | gauge | | subscriptions over every topic |
//! | `topgun_topic_messages_published_total` | counter | | publishes to a topic |
//! | `topgun_panics_total` | counter | `source` | panics caught in a connection's task: `handler` (a call into the [`InboundHandler`](crate::network::InboundHandler)) or `transport` (the connection's own code); each closed its connection with 1011 |
//! | `topgun_http_requests_total` | counter | `route`, `status` | HTTP requests answered |
//! | `topgun_http_request_duration_seconds` | histogram | `route` | HTTP request latency |
//! | `topgun_in_flight_operations` | gauge | | handler calls and requests in progress |
//! | `topgun_health_state` | gauge | `state` | 1 for the current state, 0 for the others |
//! | `topgun_uptime_seconds` | gauge | | seconds since the server was built |

pub(crate) mod http;

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::network::connection::{ConnectionKind, DisconnectReason};
use crate::network::connections::registry::ConnectionRegistry;
use crate::network::routes::Route;
use crate::network::shutdown::{HealthState, ShutdownController};

/// Where a caught panic came from; the `source` label of `topgun_panics_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PanicSource {
    Handler,
    Transport,
}

impl PanicSource {
    const ALL: [Self; 2] = [Self::Handler, Self::Transport];

    fn as_str(self) -> &'static str {
        match self {
            Self::Handler => "handler",
            Self::Transport => "transport",
        }
    }
}

/// Why an upgrade was refused; the `reason` label of `topgun_websocket_upgrades_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusedUpgrade {
    Draining,
    ConnectionLimit,
    PerIpLimit,
    Origin,
}

impl RefusedUpgrade {
    const ALL: [Self; 4] = [Self::Draining, Self::ConnectionLimit, Self::PerIpLimit, Self::Origin];

    fn as_str(self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::ConnectionLimit => "connection_limit",
            Self::PerIpLimit => "per_ip_limit",
            Self::Origin => "origin",
        }
    }
}

const HEALTH_STATES: [HealthState; 4] =
    [HealthState::Starting, HealthState::Ready, HealthState::Draining, HealthState::Stopped];

/// The transport's metrics and the recorder that renders them.
pub struct TransportMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    opened: [Counter; 2],
    closed: [[Counter; DisconnectReason::ALL.len()]; 2],
    open: [Gauge; 2],
    /// `topgun_websocket_upgrades_refused_total`, in [`RefusedUpgrade::ALL`] order.
    refused: [Counter; RefusedUpgrade::ALL.len()],
    rate_limited: Counter,
    pub(crate) proxy_protocol_refused: Counter,
    pub(crate) inbound_throttled: Counter,
    messages_received: Counter,
    bytes_received: Counter,
    messages_sent: Counter,
    bytes_sent: Counter,
    frames_sent: Counter,
    pub(crate) compressed_frames: Counter,
    pub(crate) compressed_bytes: Counter,
    batch_messages: Histogram,
    queue_depth: Histogram,
    /// Every thread's tally of the figures above, folded in when rendering.
    tallies: Tallies,
    pub(crate) tls_handshake_failures: Counter,
    topics: Gauge,
    topic_subscriptions: Gauge,
    topic_published: Counter,
    /// `topgun_panics_total`, in [`PanicSource::ALL`] order.
    panics: [Counter; PanicSource::ALL.len()],
    dropped: Counter,
    /// `topgun_http_requests_total` handles by route and status, created on first use, so a
    /// request costs no allocation or map lookup once its (route, status) has been seen.
    http_requests: [[OnceLock<Counter>; STATUS_SLOTS]; Route::SLOTS],
    http_latency: [Histogram; Route::SLOTS],
    in_flight: Gauge,
    health: [Gauge; 4],
    uptime: Gauge,
}

impl fmt::Debug for TransportMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportMetrics").finish_non_exhaustive()
    }
}

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
const DURATION_BUCKETS: [f64; 12] =
    [0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
const COUNT_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// `# HELP` text and unit of every metric.
const DESCRIPTIONS: [(&str, &str, Option<Unit>); 27] = [
    ("topgun_connections_open", "Open connections.", None),
    ("topgun_connections_opened_total", "Connections opened.", None),
    ("topgun_connections_closed_total", "Connections closed, by reason.", None),
    ("topgun_websocket_upgrades_refused_total", "WebSocket upgrades refused, by reason.", None),
    ("topgun_rate_limited_requests_total", "Requests refused by the per-address rate limit.", None),
    (
        "topgun_inbound_throttled_total",
        "Times a connection's reading paused on its message budget.",
        None,
    ),
    (
        "topgun_proxy_protocol_refused_total",
        "Connections closed for a missing or invalid PROXY protocol header.",
        None,
    ),
    ("topgun_websocket_messages_received_total", "Binary messages received.", None),
    ("topgun_websocket_received_bytes_total", "Payload bytes received.", Some(Unit::Bytes)),
    ("topgun_websocket_messages_sent_total", "Messages sent, batched or alone.", None),
    ("topgun_websocket_sent_bytes_total", "Data frame bytes sent.", Some(Unit::Bytes)),
    ("topgun_websocket_frames_sent_total", "Data frames sent.", None),
    (
        "topgun_websocket_compressed_frames_total",
        "Data frames sent compressed (permessage-deflate).",
        None,
    ),
    (
        "topgun_websocket_compressed_bytes_total",
        "Payload bytes of the frames sent compressed, after compression.",
        Some(Unit::Bytes),
    ),
    ("topgun_websocket_batch_messages", "Messages per data frame.", None),
    ("topgun_websocket_outbound_queue_depth", "Queued messages when a writer wakes.", None),
    (
        "topgun_outbound_dropped_messages_total",
        "Messages that never reached their connection.",
        None,
    ),
    ("topgun_tls_handshake_failures_total", "Failed TLS handshakes.", None),
    ("topgun_panics_total", "Panics caught in connection tasks, by source.", None),
    ("topgun_topics", "Topics with at least one subscriber.", None),
    ("topgun_topic_subscriptions", "Subscriptions over every topic.", None),
    ("topgun_topic_messages_published_total", "Messages published to a topic.", None),
    ("topgun_http_requests_total", "HTTP requests answered.", None),
    ("topgun_http_request_duration_seconds", "HTTP request latency.", Some(Unit::Seconds)),
    ("topgun_in_flight_operations", "Handler calls and requests in progress.", None),
    ("topgun_health_state", "1 for the current health state.", None),
    ("topgun_uptime_seconds", "Seconds since the server was built.", Some(Unit::Seconds)),
];

impl Default for TransportMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl TransportMetrics {
    /// A fresh set of metrics with its own recorder.
    ///
    /// # Panics
    ///
    /// Never: the bucket lists passed to the exporter are constant and non-empty.
    #[must_use]
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("topgun_http_request_duration_seconds".into()),
                &DURATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_batch_messages".into()), &COUNT_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_queue_depth".into()), &COUNT_BUCKETS)
            })
            .expect("constant, non-empty buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let r = &recorder;
        for (name, help, unit) in DESCRIPTIONS {
            // Counters, gauges and histograms share one description table in this exporter.
            recorder.describe_counter(name.into(), unit, help.into());
        }
        let counter = |name: &'static str, labels: Vec<Label>| {
            r.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge = |name: &'static str, labels: Vec<Label>| {
            r.register_gauge(&Key::from_parts(name, labels), &METADATA)
        };
        let histogram = |name: &'static str| r.register_histogram(&Key::from_name(name), &METADATA);
        let kind = |k: ConnectionKind| Label::new("kind", k.as_str());
        Self {
            opened: ConnectionKind::ALL
                .map(|k| counter("topgun_connections_opened_total", vec![kind(k)])),
            closed: ConnectionKind::ALL.map(|k| {
                DisconnectReason::ALL.map(|reason| {
                    counter(
                        "topgun_connections_closed_total",
                        vec![kind(k), Label::new("reason", reason.as_str())],
                    )
                })
            }),
            open: ConnectionKind::ALL.map(|k| gauge("topgun_connections_open", vec![kind(k)])),
            refused: RefusedUpgrade::ALL.map(|why| {
                counter(
                    "topgun_websocket_upgrades_refused_total",
                    vec![Label::new("reason", why.as_str())],
                )
            }),
            rate_limited: counter("topgun_rate_limited_requests_total", vec![]),
            proxy_protocol_refused: counter("topgun_proxy_protocol_refused_total", vec![]),
            inbound_throttled: counter("topgun_inbound_throttled_total", vec![]),
            messages_received: counter("topgun_websocket_messages_received_total", vec![]),
            bytes_received: counter("topgun_websocket_received_bytes_total", vec![]),
            messages_sent: counter("topgun_websocket_messages_sent_total", vec![]),
            bytes_sent: counter("topgun_websocket_sent_bytes_total", vec![]),
            frames_sent: counter("topgun_websocket_frames_sent_total", vec![]),
            compressed_frames: counter("topgun_websocket_compressed_frames_total", vec![]),
            compressed_bytes: counter("topgun_websocket_compressed_bytes_total", vec![]),
            batch_messages: histogram("topgun_websocket_batch_messages"),
            queue_depth: histogram("topgun_websocket_outbound_queue_depth"),
            tls_handshake_failures: counter("topgun_tls_handshake_failures_total", vec![]),
            topics: gauge("topgun_topics", vec![]),
            topic_subscriptions: gauge("topgun_topic_subscriptions", vec![]),
            topic_published: counter("topgun_topic_messages_published_total", vec![]),
            panics: PanicSource::ALL.map(|source| {
                counter("topgun_panics_total", vec![Label::new("source", source.as_str())])
            }),
            dropped: counter("topgun_outbound_dropped_messages_total", vec![]),
            http_requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            http_latency: std::array::from_fn(|route| {
                let key = Key::from_parts(
                    "topgun_http_request_duration_seconds",
                    vec![Label::new("route", Route::slot_name(route))],
                );
                r.register_histogram(&key, &METADATA)
            }),
            in_flight: gauge("topgun_in_flight_operations", vec![]),
            health: HEALTH_STATES
                .map(|s| gauge("topgun_health_state", vec![Label::new("state", s.as_str())])),
            uptime: gauge("topgun_uptime_seconds", vec![]),
            tallies: Tallies::default(),
            recorder,
            handle,
        }
    }

    /// Counts one data frame handed to a socket, carrying `messages` messages in `bytes` bytes.
    pub(crate) fn frame_sent(&self, messages: u64, bytes: u64) {
        self.tallies.with_mine(|tally| {
            tally.frames_sent.fetch_add(1, Ordering::Relaxed);
            tally.messages_sent.fetch_add(messages, Ordering::Relaxed);
            tally.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
            tally.count(true, messages);
        });
    }

    /// Records how many messages a writer found queued when it woke.
    pub(crate) fn queue_taken(&self, depth: usize) {
        self.tallies.with_mine(|tally| tally.count(false, depth as u64));
    }

    /// Counts one binary message of `bytes` bytes received.
    pub(crate) fn message_received(&self, bytes: u64) {
        self.tallies.with_mine(|tally| {
            tally.messages_received.fetch_add(1, Ordering::Relaxed);
            tally.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        });
    }

    /// Moves every thread's tally into the Prometheus metrics.
    fn fold_tallies(&self) {
        let take = |figure: &AtomicU64| figure.swap(0, Ordering::Relaxed);
        for tally in self.tallies.all() {
            self.frames_sent.increment(take(&tally.frames_sent));
            self.messages_sent.increment(take(&tally.messages_sent));
            self.bytes_sent.increment(take(&tally.bytes_sent));
            self.messages_received.increment(take(&tally.messages_received));
            self.bytes_received.increment(take(&tally.bytes_received));
            for (histogram, counts) in [
                (&self.batch_messages, &tally.batch_messages),
                (&self.queue_depth, &tally.queue_depth),
            ] {
                for (value, count) in counts.iter().enumerate() {
                    let count = take(count);
                    if count > 0 {
                        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
                        histogram.record_many(value as f64, count as usize);
                    }
                }
            }
            // Values past the exact range are rare (frames of hundreds of messages).
            for (value, histogram) in
                tally.beyond.lock().unwrap_or_else(PoisonError::into_inner).drain(..)
            {
                #[allow(clippy::cast_precision_loss)]
                if histogram {
                    self.batch_messages.record(value as f64);
                } else {
                    self.queue_depth.record(value as f64);
                }
            }
        }
    }

    pub(crate) fn connection_opened(&self, kind: ConnectionKind) {
        self.opened[kind.index()].increment(1);
    }

    pub(crate) fn connection_closed(&self, kind: ConnectionKind, reason: DisconnectReason) {
        self.closed[kind.index()][reason.index()].increment(1);
    }

    pub(crate) fn upgrade_refused(&self, why: RefusedUpgrade) {
        self.refused[why as usize].increment(1);
    }

    /// Counts a request refused by the per-address rate limit.
    /// Counts one panic caught in a connection's task.
    pub(crate) fn panicked(&self, source: PanicSource) {
        let index = PanicSource::ALL.iter().position(|s| *s == source).unwrap_or(0);
        self.panics[index].increment(1);
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.increment(1);
    }

    /// Records one answered HTTP request.
    pub(crate) fn http_request(&self, route: usize, status: u16, elapsed: Duration) {
        let slot = usize::from(status).saturating_sub(STATUS_BASE).min(STATUS_SLOTS - 1);
        let counter = self.http_requests[route][slot].get_or_init(|| {
            let labels = vec![
                Label::new("route", Route::slot_name(route)),
                Label::new("status", status.to_string()),
            ];
            self.recorder
                .register_counter(&Key::from_parts("topgun_http_requests_total", labels), &METADATA)
        });
        counter.increment(1);
        self.http_latency[route].record(elapsed.as_secs_f64());
    }

    /// Renders every metric in the Prometheus text format, refreshing the values that are
    /// read from the registry and the shutdown controller at scrape time.
    pub fn render(
        &self,
        registry: &ConnectionRegistry,
        shutdown: &ShutdownController,
        start_time: Instant,
    ) -> String {
        for kind in ConnectionKind::ALL {
            #[allow(clippy::cast_precision_loss)] // connection counts are far below 2^52
            self.open[kind.index()].set(registry.count_by_kind(kind) as f64);
        }
        self.dropped.absolute(registry.dropped_messages_total());
        let topics = registry.topics();
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        {
            self.topics.set(topics.topic_count() as f64);
            self.topic_subscriptions.set(topics.subscription_count() as f64);
        }
        self.topic_published.absolute(topics.published_total());
        #[allow(clippy::cast_precision_loss)]
        self.in_flight.set(shutdown.in_flight_count() as f64);
        let current = shutdown.health_state();
        for (gauge, state) in self.health.iter().zip(HEALTH_STATES) {
            gauge.set(if state == current { 1.0 } else { 0.0 });
        }
        self.uptime.set(start_time.elapsed().as_secs_f64());
        self.fold_tallies();
        // Rendering folds pending histogram samples itself.
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets, bounding memory between scrapes.
    pub(crate) fn run_upkeep(&self) {
        self.fold_tallies();
        self.handle.run_upkeep();
    }
}

/// Histogram values tallied by exact value; larger ones are kept in a list.
const EXACT_VALUES: usize = 257;

/// One thread's share of the per-frame figures of one [`TransportMetrics`]: written by that
/// thread only, so its cache lines stay there until a scrape reads them.
#[repr(align(128))]
struct Tally {
    frames_sent: AtomicU64,
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    /// Frames by messages per frame.
    batch_messages: [AtomicU64; EXACT_VALUES],
    /// Writer wake-ups by queue depth.
    queue_depth: [AtomicU64; EXACT_VALUES],
    /// Values of either histogram past the exact range: (value, `true` for messages per frame).
    beyond: Mutex<Vec<(u64, bool)>>,
}

impl Tally {
    fn new() -> Self {
        Self {
            frames_sent: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            batch_messages: std::array::from_fn(|_| AtomicU64::new(0)),
            queue_depth: std::array::from_fn(|_| AtomicU64::new(0)),
            beyond: Mutex::new(Vec::new()),
        }
    }

    /// Counts one sample of `value` into one of this tally's histograms: messages per frame
    /// (`batch`) or queue depth.
    fn count(&self, batch: bool, value: u64) {
        let counts = if batch { &self.batch_messages } else { &self.queue_depth };
        match usize::try_from(value).ok().and_then(|index| counts.get(index)) {
            Some(count) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            None => self.count_beyond(batch, value),
        }
    }

    #[cold]
    #[inline(never)]
    fn count_beyond(&self, batch: bool, value: u64) {
        self.beyond.lock().unwrap_or_else(PoisonError::into_inner).push((value, batch));
    }
}

/// The tallies of one [`TransportMetrics`], one per thread that recorded anything.
struct Tallies {
    /// Tells these tallies apart in a thread's list, which outlives any one server.
    id: usize,
    all: Mutex<Vec<Arc<Tally>>>,
}

impl Default for Tallies {
    fn default() -> Self {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), all: Mutex::new(Vec::new()) }
    }
}

thread_local! {
    /// This thread's tally for each live [`TransportMetrics`] it recorded for, by id.
    static MINE: RefCell<Vec<(usize, Arc<Tally>)>> = const { RefCell::new(Vec::new()) };
}

impl Tallies {
    /// Runs `record` on the calling thread's tally, made on its first use.
    fn with_mine(&self, record: impl FnOnce(&Tally)) {
        MINE.with_borrow_mut(|mine| {
            let tally = match mine.iter().position(|(id, _)| *id == self.id) {
                Some(index) => &mine[index].1,
                None => self.add_mine(mine),
            };
            record(tally);
        });
    }

    /// The calling thread's first figure for these metrics: a tally of its own.
    #[cold]
    #[inline(never)]
    fn add_mine<'a>(&self, mine: &'a mut Vec<(usize, Arc<Tally>)>) -> &'a Arc<Tally> {
        // Forget the tallies of metrics that are gone (only this list holds them then).
        mine.retain(|(_, tally)| Arc::strong_count(tally) > 1);
        let tally = Arc::new(Tally::new());
        self.lock().push(Arc::clone(&tally));
        mine.push((self.id, tally));
        &mine[mine.len() - 1].1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Tally>>> {
        self.all.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn all(&self) -> Vec<Arc<Tally>> {
        self.lock().clone()
    }
}

/// Statuses 100 to 599 get their own slot; anything else shares the last one.
const STATUS_BASE: usize = 100;
const STATUS_SLOTS: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
    }

    #[test]
    fn every_threads_tally_is_rendered_and_none_twice() {
        let metrics = Arc::new(TransportMetrics::new());
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let metrics = Arc::clone(&metrics);
                std::thread::spawn(move || {
                    metrics.frame_sent(2, 100);
                    metrics.frame_sent(1000, 5000);
                    metrics.queue_taken(3);
                    metrics.message_received(7);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let registry = ConnectionRegistry::new();
        let shutdown = ShutdownController::new();
        let render = || metrics.render(&registry, &shutdown, Instant::now());
        let text = render();
        assert_eq!(line(&text, "topgun_websocket_frames_sent_total"), Some("6"));
        assert_eq!(line(&text, "topgun_websocket_messages_sent_total"), Some("3006"));
        assert_eq!(line(&text, "topgun_websocket_sent_bytes_total"), Some("15300"));
        assert_eq!(line(&text, "topgun_websocket_batch_messages_count"), Some("6"));
        assert_eq!(line(&text, "topgun_websocket_batch_messages_sum"), Some("3006"));
        assert_eq!(line(&text, "topgun_websocket_outbound_queue_depth_sum"), Some("9"));
        assert_eq!(line(&text, "topgun_websocket_received_bytes_total"), Some("21"));
        // Folded once: rendering again adds nothing.
        assert_eq!(line(&render(), "topgun_websocket_messages_sent_total"), Some("3006"));
    }
}
