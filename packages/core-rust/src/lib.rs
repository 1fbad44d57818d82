//! Core types shared by TopGun's Rust crates.
//!
//! - [`Timestamp`] and [`HybridClock`]: TopGun's hybrid logical clock, wire-compatible with the
//!   TypeScript client (`{ millis, counter, nodeId }`).
//! - [`Principal`]: the authenticated identity attached to a connection.
//! - [`number`]: serde helpers that read whole numbers as JavaScript clients write them
//!   (integers above 2^32 - 1 arrive as float64).

mod hlc;
pub mod number;
mod principal;

pub use hlc::{ClockDriftError, HybridClock, SystemClock, Timestamp, WallClock};
pub use principal::Principal;
