//! The sidecar WebSocket: wire format in [`protocol`], one socket's life in [`session`].

pub mod protocol;
pub mod session;
