//! TopGun's Rust server.
//!
//! [`network`] is the transport: an axum HTTP + WebSocket server with per-connection
//! backpressure, health endpoints, graceful shutdown and TLS. Other crates plug in through
//! [`network::InboundHandler`] and [`network::ConnectionRegistry`].

pub mod network;

/// Compiles the README's Rust examples as doc tests, so the embedding example stays true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
