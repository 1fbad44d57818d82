//! TopGun's Rust server.
//!
//! [`network`] is the transport: an axum HTTP + WebSocket server with per-connection
//! backpressure, health endpoints, graceful shutdown and TLS. Other crates plug in through
//! [`network::InboundHandler`] and [`network::ConnectionRegistry`].

pub mod network;
