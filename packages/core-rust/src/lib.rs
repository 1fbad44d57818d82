//! Core types shared by TopGun's Rust crates.
//!
//! - [`Timestamp`] and [`HybridClock`]: TopGun's hybrid logical clock, wire-compatible with the
//!   TypeScript client (`{ millis, counter, nodeId }`).
//! - [`Principal`]: the authenticated identity attached to a connection.

mod hlc;
mod principal;

pub use hlc::{ClockDriftError, HybridClock, SystemClock, Timestamp, WallClock};
pub use principal::Principal;
