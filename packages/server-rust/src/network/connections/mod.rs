//! Who is connected, and how to reach them: registry → queue → writer.
//!
//! | file | concern |
//! |---|---|
//! | `handle` | [`ConnectionHandle`](crate::network::ConnectionHandle): one live connection as the rest of the server sees it |
//! | `channel` | the queue's two ends, tokio-shaped, with drop accounting |
//! | `queue` | one connection's bounded outbound queue; who may write to the socket |
//! | `registry` | [`ConnectionRegistry`](crate::network::ConnectionRegistry): every live connection, broadcasts, sends by id |
//! | `topics` | [`Topics`](crate::network::Topics): subscribe and publish by topic name |
//! | `fanout` | one payload to many connections: pace (written at once or queued), drops, the cooperative wait |
//! | `events` | [`DisconnectListener`](crate::network::DisconnectListener): everyone told that a connection ended |

pub(crate) mod channel;
pub(crate) mod events;
pub(crate) mod fanout;
pub(crate) mod handle;
pub(crate) mod queue;
pub(crate) mod registry;
pub(crate) mod topics;
