//! Cluster mode (SPEC §9): hub nodes as processes on a 3-node NATS
//! JetStream cluster.

pub mod creds;
pub mod edge;
pub mod failover;
pub mod faults;
pub mod fence;
pub mod flow;
pub mod hubs;
pub mod leader;
pub mod nats;
pub mod ready;
