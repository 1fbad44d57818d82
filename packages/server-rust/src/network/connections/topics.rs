//! registry → **topics** → fanout → queue: publish and subscribe by topic name.
//!
//! Each topic keeps its own subscribers, so a publish reaches exactly them at a cost that grows
//! with the subscribers, not with the connections the server holds. A connection's topics are
//! also in its [`ConnectionMetadata::topics`](crate::network::ConnectionMetadata::topics),
//! changed under the metadata lock together with the topic's subscribers, so the two always
//! agree; the transport clears both when the connection ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;

use crate::network::connection::ConnectionId;
use crate::network::connections::fanout::{self, BroadcastOutcome, Fanout};
use crate::network::connections::handle::ConnectionHandle;

/// Why [`Topics::subscribe`] refused a subscription.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The connection holds `max_topics_per_connection` topics already.
    #[error("the connection is subscribed to {limit} topics already, the most it may be")]
    LimitReached {
        /// The connection's `max_topics_per_connection`.
        limit: usize,
    },
    /// The topic's name is longer than [`Topics::MAX_NAME_BYTES`].
    #[error("a topic name of {len} bytes is longer than the {limit} allowed")]
    NameTooLong {
        /// The name's length in bytes.
        len: usize,
        /// [`Topics::MAX_NAME_BYTES`].
        limit: usize,
    },
    /// The connection has ended; nothing can reach it any more.
    #[error("the connection is closed")]
    Disconnected,
}

/// The topics of one registry, reached through
/// [`ConnectionRegistry::topics`](crate::network::ConnectionRegistry::topics): connections
/// subscribe to topics by name, and a publish reaches every subscriber of its topic (one
/// shared [`Bytes`], compressed once where compression is on, as a broadcast is).
///
/// ```
/// use topgun_server::network::{ConnectionConfig, ConnectionKind, ConnectionRegistry};
///
/// # tokio_test_runtime(async {
/// let registry = ConnectionRegistry::new();
/// let config = ConnectionConfig::default();
/// let (alice, mut alice_queue) = registry.register(ConnectionKind::Client, &config);
/// let (bob, mut bob_queue) = registry.register(ConnectionKind::Client, &config);
/// let topics = registry.topics();
/// topics.subscribe(&alice, "chat/lobby").await.unwrap();
/// topics.subscribe(&bob, "chat/lobby").await.unwrap();
///
/// // Bob speaks: everyone subscribed hears it but Bob.
/// let outcome = topics.publish_except("chat/lobby", vec![0x90], bob.id);
/// assert_eq!(outcome.queued, 1);
/// assert!(alice_queue.try_recv().is_ok());
/// assert!(bob_queue.try_recv().is_err());
/// assert!(alice.metadata.read().await.topics.contains("chat/lobby"));
/// # });
/// # fn tokio_test_runtime(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug)]
pub struct Topics {
    fanout: Arc<Fanout>,
    subscribers: DashMap<Arc<str>, HashMap<ConnectionId, Arc<ConnectionHandle>>>,
    subscriptions: AtomicUsize,
    published: AtomicU64,
}

impl Topics {
    /// Longest topic name, in bytes.
    pub const MAX_NAME_BYTES: usize = 1024;

    pub(crate) fn new(fanout: Arc<Fanout>) -> Self {
        Self {
            fanout,
            subscribers: DashMap::new(),
            subscriptions: AtomicUsize::new(0),
            published: AtomicU64::new(0),
        }
    }

    /// Subscribes `conn` to `topic`; `Ok(false)` if it already was.
    ///
    /// Takes the connection's metadata lock for a moment (the topic goes into
    /// [`ConnectionMetadata::topics`](crate::network::ConnectionMetadata::topics) with it):
    /// do not call it while holding that lock.
    ///
    /// # Errors
    ///
    /// [`TopicError::LimitReached`] past the connection's `max_topics_per_connection`,
    /// [`TopicError::NameTooLong`] for a name over [`MAX_NAME_BYTES`](Self::MAX_NAME_BYTES),
    /// [`TopicError::Disconnected`] once the connection has ended.
    pub async fn subscribe(
        &self,
        conn: &Arc<ConnectionHandle>,
        topic: &str,
    ) -> Result<bool, TopicError> {
        if topic.len() > Self::MAX_NAME_BYTES {
            return Err(TopicError::NameTooLong { len: topic.len(), limit: Self::MAX_NAME_BYTES });
        }
        let mut metadata = conn.metadata.write().await;
        // Checked under the lock the transport's own clear-out takes after the connection
        // ended: a subscription is either refused here or cleared there.
        if !conn.is_connected() {
            return Err(TopicError::Disconnected);
        }
        if metadata.topics.contains(topic) {
            return Ok(false);
        }
        if metadata.topics.len() >= conn.max_topics() {
            return Err(TopicError::LimitReached { limit: conn.max_topics() });
        }
        self.subscribers.entry(Arc::from(topic)).or_default().insert(conn.id, Arc::clone(conn));
        metadata.topics.insert(topic.to_owned());
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Unsubscribes `conn` from `topic`; `false` if it was not subscribed. Takes the
    /// connection's metadata lock, as [`subscribe`](Self::subscribe) does.
    pub async fn unsubscribe(&self, conn: &ConnectionHandle, topic: &str) -> bool {
        let mut metadata = conn.metadata.write().await;
        if !metadata.topics.remove(topic) {
            return false;
        }
        self.forget(conn.id, topic);
        true
    }

    /// Unsubscribes `conn` from every topic; returns how many it held. The transport calls it
    /// for every connection it ends, before the handler's `on_disconnect`.
    pub async fn unsubscribe_all(&self, conn: &ConnectionHandle) -> usize {
        let mut metadata = conn.metadata.write().await;
        let topics = std::mem::take(&mut metadata.topics);
        for topic in &topics {
            self.forget(conn.id, topic);
        }
        topics.len()
    }

    /// Removes `id` from `topic`'s subscribers, and the topic once it has none.
    fn forget(&self, id: ConnectionId, topic: &str) {
        if let Some(mut subscribers) = self.subscribers.get_mut(topic)
            && subscribers.remove(&id).is_some()
        {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        self.subscribers.remove_if(topic, |_, subscribers| subscribers.is_empty());
    }

    /// Queues `msg_bytes` as a binary message on every subscriber of `topic`, never waiting;
    /// O(subscribers). Full queues are counted in [`BroadcastOutcome::dropped`] (and on each
    /// connection), as for a broadcast.
    ///
    /// The topic's subscribers are read-locked while the message goes out, so subscribing to
    /// a topic waits for a publish to it in progress.
    pub fn publish(&self, topic: &str, msg_bytes: impl Into<Bytes>) -> BroadcastOutcome {
        self.publish_to(topic, &msg_bytes.into(), None)
    }

    /// [`publish`](Self::publish) to every subscriber but `except`: the publisher does not
    /// hear its own message.
    pub fn publish_except(
        &self,
        topic: &str,
        msg_bytes: impl Into<Bytes>,
        except: ConnectionId,
    ) -> BroadcastOutcome {
        self.publish_to(topic, &msg_bytes.into(), Some(except))
    }

    fn publish_to(
        &self,
        topic: &str,
        payload: &Bytes,
        except: Option<ConnectionId>,
    ) -> BroadcastOutcome {
        self.published.fetch_add(1, Ordering::Relaxed);
        self.fanout.once(|direct| self.deliver(direct, topic, payload, except, |_| {}))
    }

    /// [`publish`](Self::publish), then waits for the subscribers' writers to catch up, as
    /// [`broadcast_cooperative`](crate::network::ConnectionRegistry::broadcast_cooperative)
    /// does: for async code that publishes in a loop.
    pub async fn publish_cooperative(
        &self,
        topic: &str,
        msg_bytes: impl Into<Bytes>,
    ) -> BroadcastOutcome {
        self.publish_cooperative_to(topic, msg_bytes.into(), None).await
    }

    /// [`publish_cooperative`](Self::publish_cooperative) to every subscriber but `except`.
    pub async fn publish_cooperative_except(
        &self,
        topic: &str,
        msg_bytes: impl Into<Bytes>,
        except: ConnectionId,
    ) -> BroadcastOutcome {
        self.publish_cooperative_to(topic, msg_bytes.into(), Some(except)).await
    }

    async fn publish_cooperative_to(
        &self,
        topic: &str,
        payload: Bytes,
        except: Option<ConnectionId>,
    ) -> BroadcastOutcome {
        self.published.fetch_add(1, Ordering::Relaxed);
        self.fanout
            .cooperative(|direct, lagging| {
                self.deliver(direct, topic, &payload, except, |conn| lagging.note(conn))
            })
            .await
    }

    fn deliver(
        &self,
        direct: bool,
        topic: &str,
        payload: &Bytes,
        except: Option<ConnectionId>,
        took: impl FnMut(&Arc<ConnectionHandle>),
    ) -> BroadcastOutcome {
        let Some(subscribers) = self.subscribers.get(topic) else {
            return BroadcastOutcome::default();
        };
        fanout::send_each(direct, payload, subscribers.values(), |c| Some(c.id) != except, took)
    }

    /// How many connections are subscribed to `topic`.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.subscribers.get(topic).map_or(0, |subscribers| subscribers.len())
    }

    /// The ids of `topic`'s subscribers, in no particular order.
    pub fn subscribers(&self, topic: &str) -> Vec<ConnectionId> {
        self.subscribers
            .get(topic)
            .map(|subscribers| subscribers.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Topics with at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.subscribers.len()
    }

    /// Subscriptions, over every topic.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Publishes since the registry was built, whether or not they reached anyone.
    pub fn published_total(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}
