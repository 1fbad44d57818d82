//! Connection identity and the types every room shares: ids, kinds, metadata, errors.
//!
//! The connection itself lives in its rooms: `handle.rs` ([`ConnectionHandle`], what the rest
//! of the server holds), `channel.rs` (the two ends of its outbound queue with their drop
//! accounting), `queue.rs` (the queue), `registry.rs` ([`ConnectionRegistry`], broadcasts).
//!
//! [`ConnectionHandle`]: crate::network::ConnectionHandle
//! [`ConnectionRegistry`]: crate::network::ConnectionRegistry

use std::collections::HashSet;
use std::fmt;
use std::time::Instant;

use topgun_core::{Principal, Timestamp};

/// Process-unique identifier of one connection; never reused while the registry lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionKind {
    /// An application client (browser, TypeScript client, service).
    Client,
    /// Another server node of the cluster.
    ClusterPeer,
}

impl ConnectionKind {
    /// Every kind, in [`index`](Self::index) order.
    pub(crate) const ALL: [Self; 2] = [Self::Client, Self::ClusterPeer];

    /// Position in [`ALL`](Self::ALL), for per-kind arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Client => 0,
            Self::ClusterPeer => 1,
        }
    }

    /// The lowercase name used in logs and metric labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::ClusterPeer => "cluster_peer",
        }
    }
}

/// Why a WebSocket connection ended; the `reason` label of `topgun_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The client closed the connection or went away.
    ClientClose,
    /// Nothing arrived for `idle_timeout`.
    IdleTimeout,
    /// The client did not keep up: queue overflow or a blocked socket write.
    SlowConsumer,
    /// The client broke a limit: message size, text frames.
    Limit,
    /// The server shut down.
    Shutdown,
    /// The application closed it (`OutboundMessage::Close` or `close_with`).
    Application,
    /// A read or write failed, or the handler panicked.
    Error,
    /// Not authenticated within `auth_timeout`.
    AuthTimeout,
}

impl DisconnectReason {
    pub(crate) const ALL: [Self; 8] = [
        Self::ClientClose,
        Self::IdleTimeout,
        Self::SlowConsumer,
        Self::Limit,
        Self::Shutdown,
        Self::Application,
        Self::Error,
        Self::AuthTimeout,
    ];

    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClose => "client_close",
            Self::IdleTimeout => "idle_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Limit => "limit",
            Self::Shutdown => "shutdown",
            Self::Application => "application",
            Self::Error => "error",
            Self::AuthTimeout => "auth_timeout",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The queue stayed full for the whole timeout.
    #[error("timed out waiting for space in the connection's outbound queue")]
    Timeout,
    /// The connection is closed; nothing will read the queue again.
    #[error("connection is closed")]
    Disconnected,
    /// The queue is full right now.
    #[error("connection's outbound queue is full")]
    Full,
    /// The message is larger than the connection accepts
    /// ([`ConnectionConfig::max_outbound_message_size`](crate::network::ConnectionConfig::max_outbound_message_size)); it is refused, not sent.
    #[error("outbound message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The message's size in bytes.
        size: usize,
        /// The connection's `max_outbound_message_size`.
        limit: usize,
    },
}

/// Mutable, application-level state of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionMetadata {
    /// Whether the connection has authenticated. Starts `false`.
    pub authenticated: bool,
    /// The identity the connection authenticated as.
    pub principal: Option<Principal>,
    /// Query subscriptions held by the connection.
    pub subscriptions: HashSet<String>,
    /// Pub/sub topics the connection listens to.
    pub topics: HashSet<String>,
    /// When the connection last showed signs of life.
    pub last_heartbeat: Instant,
    /// The newest hybrid-logical-clock timestamp seen from the connection.
    pub last_hlc: Option<Timestamp>,
    /// For cluster peers: the remote node's id.
    pub peer_node_id: Option<String>,
}

impl Default for ConnectionMetadata {
    fn default() -> Self {
        Self {
            authenticated: false,
            principal: None,
            subscriptions: HashSet::new(),
            topics: HashSet::new(),
            last_heartbeat: Instant::now(),
            last_hlc: None,
            peer_node_id: None,
        }
    }
}
