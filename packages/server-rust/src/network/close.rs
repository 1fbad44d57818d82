//! The WebSocket close codes this server sends, and why.
//!
//! | code | when | reason text |
//! |---|---|---|
//! | `1000` | [`OutboundMessage::Close`](crate::network::OutboundMessage::Close) from the application | the application's |
//! | `1001` | graceful shutdown | [`SHUTDOWN_REASON`] |
//! | `1001` | no frame (not even a pong) for `idle_timeout` | [`IDLE_REASON`] |
//! | `1002` | a frame breaking RFC 6455 or the negotiated extensions (unmasked, reserved bits, a stray continuation, a bad close frame...) | names the rule |
//! | `1003` | a text frame on this binary-only protocol | [`TEXT_FRAME_REASON`] |
//! | `1007` | a text message or close reason that is not UTF-8, or compressed data that does not inflate | says which |
//! | `1008` | not [authenticated](crate::network::ConnectionHandle::authenticate) within `auth_timeout` | [`AUTH_TIMEOUT_REASON`] |
//! | `1009` | a message or frame over `max_message_size` / `max_frame_size` | names the limit |
//! | `1011` | a panic in the connection's task: the inbound handler's, or the transport's own | [`HANDLER_FAILED_REASON`] |
//! | `1013` | `max_consecutive_drops` messages in a row did not fit the outbound queue | names the count |
//!
//! A client whose socket stops draining for longer than `send_timeout` gets no close frame (nothing
//! more can be written to it): its TCP connection is closed.

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// The server is going away: shutdown, or the connection went idle.
pub const GOING_AWAY: u16 = 1001;
/// The client broke the WebSocket protocol.
pub const PROTOCOL_ERROR: u16 = 1002;
/// The server cannot accept this data type (text frames).
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A message's data is not what its frame says (text that is not UTF-8, data that does not inflate).
pub const INVALID_PAYLOAD: u16 = 1007;
/// The connection broke a policy: it did not authenticate in time.
pub const POLICY_VIOLATION: u16 = 1008;
/// A message was too big to process.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The server hit an unexpected condition.
pub const INTERNAL_ERROR: u16 = 1011;
/// The client fell behind; reconnect (and resynchronise) later.
pub const TRY_AGAIN_LATER: u16 = 1013;

/// Reason sent with 1001 on shutdown.
pub const SHUTDOWN_REASON: &str = "server shutting down";
/// Reason sent with 1001 when a connection went idle.
pub const IDLE_REASON: &str = "idle timeout";
/// Reason sent with 1003.
pub const TEXT_FRAME_REASON: &str = "text frames are not supported: send binary MsgPack frames";
/// Reason sent with 1008 when a connection did not authenticate within `auth_timeout`.
pub const AUTH_TIMEOUT_REASON: &str = "authentication timeout";
/// Reason sent with 1011.
pub const HANDLER_FAILED_REASON: &str = "internal server error";

/// A close frame the server has been asked to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseRequest {
    /// The close code.
    pub(crate) code: u16,
    /// The reason text, cut to the protocol's 123-byte limit when sent.
    pub(crate) reason: String,
    /// Sent after what is queued (a client that broke the protocol still receives the answers
    /// to the messages it sent before), not ahead of it.
    pub(crate) after_queue: bool,
}
