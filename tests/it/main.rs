//! One integration-test binary: every test drives a real hub (in-process on
//! 127.0.0.1:0, or the `agenthub` binary as its own process) with real clients.

mod helpers;

mod agentcom;
mod core_flow;
mod cursors;
mod durability;
mod faults;
mod interop;
mod model;
mod scheduler;
mod smoke;
