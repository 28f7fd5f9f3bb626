//! One integration-test binary: every test drives a real hub (in-process on
//! 127.0.0.1:0, or the `agenthub` binary as its own process) with real clients.

mod helpers;

mod agentcom;
mod cluster;
mod core_flow;
mod cursors;
mod dashboard;
mod durability;
mod failure_domains;
mod faults;
mod history;
mod interop;
mod log_file;
mod model;
mod ops;
mod orchestrator;
mod scheduler;
mod security;
mod smoke;
