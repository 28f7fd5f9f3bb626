//! agenthub: a durable task hub for AI-agent sidecars.
//!
//! Sidecars hold a WebSocket to the hub; orchestrators push tasks over gRPC;
//! dashboards follow every task event. Every change is stored before anyone
//! is told about it.
//!
//! # Layout
//! - [`config`]: `Config`, defaults, validation (and the form origins are
//!   compared in).
//! - [`error`]: the one error type and its mapping to gRPC / WebSocket / HTTP.
//! - [`model`]: tasks, events, agents, tokens: plain data.
//! - [`link`]: typed messages between the hub and agent connections.
//! - [`hub`]: task state transitions, sessions registry, scheduler, timers,
//!   dependencies, WaitTask, live task output. It knows cluster mode only as
//!   the [`hub::Cluster`] trait, which [`cluster`] implements.
//! - [`bus`]: event fan-out to watchers; catch-up from the store.
//! - [`store`]: the `Store` trait; the single node's store (a segmented log
//!   file, and a SQLite copy applied from it); the entry codec and the SQLite
//!   copy both modes share; the task-output file; fault injection.
//! - [`cluster`]: cluster mode: the JetStream log and its local copies, the
//!   leader lease, calls and sidecar sessions carried to the leader.
//! - [`auth`]: tokens and roles.
//! - [`grpc`], [`pb`]: the `agenthub.v1.TaskHub` service and its types.
//! - [`http`], [`ws`]: the HTTP listener and the sidecar WebSocket protocol.
//! - [`server`]: binds and runs both listeners; [`listener`]: their accept
//!   loops (TLS, connection limit, timeouts); [`tls`]: certificates and reload;
//!   [`grpc_limits`]: watch slots, revocation and status codes at the gRPC edge.
//! - [`web`]: the embedded dashboard page and gRPC-Web on the HTTP listener.
//! - [`client`]: a gRPC client for the CLI and tests.
//! - [`sidecar`]: the reference sidecar.
//! - [`notify`]: readiness for systemd (`Type=notify`).
//! - [`telemetry`]: log format, level and colour; trace export.

pub mod auth;
pub mod bus;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod error;
pub mod event;
pub mod grpc;
pub mod grpc_limits;
pub mod http;
pub mod hub;
pub mod link;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pb;
pub mod server;
pub mod sidecar;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod web;
pub mod ws;

pub use config::Config;
pub use error::{Error, Result};
pub use hub::Hub;
pub use server::Server;
