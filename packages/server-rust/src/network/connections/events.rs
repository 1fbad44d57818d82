//! Disconnect listeners: every part of the server that must learn that a connection ended
//! (to drop its sessions, locks or subscriptions of its own), beside the handler's own
//! `on_disconnect`.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use crate::network::connection::DisconnectReason;
use crate::network::connections::handle::ConnectionHandle;

/// Told of every connection the transport ends; add one with
/// [`ConnectionRegistry::listen_disconnects`](crate::network::ConnectionRegistry::listen_disconnects).
///
/// For one connection it is called once, last in its order of events: after every handler
/// call for the connection has returned, after the connection has left the registry and its
/// topics, and after the handler's
/// [`on_disconnect`](crate::network::InboundHandler::on_disconnect). Listeners run one after
/// another on the connection's task, in the order they were added, as in-flight work a
/// graceful shutdown waits for; a listener that panics is logged and counted, and the next
/// one still runs. The connection's [extensions](ConnectionHandle::extension) are still there.
///
/// A closure `Fn(&Arc<ConnectionHandle>, DisconnectReason)` is a listener; implement the trait
/// for one that awaits:
///
/// ```
/// use std::sync::Arc;
/// use topgun_server::network::{ConnectionHandle, DisconnectListener, DisconnectReason};
///
/// struct Sessions;
///
/// #[async_trait::async_trait]
/// impl DisconnectListener for Sessions {
///     async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>, reason: DisconnectReason) {
///         tracing::info!(conn_id = %conn.id, reason = reason.as_str(), "session ended");
///     }
/// }
/// ```
#[async_trait]
pub trait DisconnectListener: Send + Sync + 'static {
    /// `conn` has ended, for `reason`.
    async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>, reason: DisconnectReason);
}

#[async_trait]
impl<F> DisconnectListener for F
where
    F: Fn(&Arc<ConnectionHandle>, DisconnectReason) + Send + Sync + 'static,
{
    async fn on_disconnect(&self, conn: &Arc<ConnectionHandle>, reason: DisconnectReason) {
        self(conn, reason);
    }
}

/// The listeners of one registry: read on every disconnect without a lock, added to rarely.
#[derive(Default)]
pub(crate) struct DisconnectListeners {
    listeners: ArcSwap<Vec<Arc<dyn DisconnectListener>>>,
}

impl fmt::Debug for DisconnectListeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DisconnectListeners").field("count", &self.listeners.load().len()).finish()
    }
}

impl DisconnectListeners {
    pub(crate) fn add(&self, listener: &Arc<dyn DisconnectListener>) {
        self.listeners.rcu(|listeners| {
            let mut more = Vec::clone(listeners);
            more.push(Arc::clone(listener));
            more
        });
    }

    /// The listeners now, in the order they were added.
    pub(crate) fn all(&self) -> Arc<Vec<Arc<dyn DisconnectListener>>> {
        self.listeners.load_full()
    }
}
