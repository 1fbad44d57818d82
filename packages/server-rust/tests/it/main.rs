//! The transport's integration tests, one module per capability, in one test binary (one link,
//! one build). Shared helpers live in the `topgun-test-support` crate. The log test has a
//! binary of its own because it installs a global subscriber.

mod building_on;
mod decoders;
mod handshake;
mod http;
mod lifecycle;
mod limits;
mod observability;
mod open_internet;
mod permessage_deflate;
mod rfc6455;
mod shutdown;
mod spec_057;
mod tls;
mod websocket;
