//! The sidecar WebSocket: wire format in [`protocol`], one socket's life in
//! [`session`]; what an upgrade must pass in [`upgrade`], identify limits and
//! revocation in [`limits`], protocol-violation close codes in [`close`].

pub mod close;
pub mod limits;
pub mod protocol;
pub mod session;
pub mod upgrade;
