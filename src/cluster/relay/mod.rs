//! Sidecar sessions across nodes.
//!
//! A sidecar's WebSocket stays on the node it connected to. That node
//! relays the sidecar's messages (as the JSON text it sent) to the leader on
//! the subject of the leadership it identified with ([`agent_in_subject`](crate::cluster::agent_in_subject):
//! a deposed leader never takes the next one's); the leader's hub sees the session as a
//! [`RemoteLink`] and its messages and closes go back on the node's
//! [`agent_out_subject`](crate::cluster::agent_out_subject). A session that identifies on the leader itself
//! talks to its hub directly.
//!
//! An identify that arrives while the node is not ready (an election under
//! way) waits for a leader (at most about 2 × the lease). When the
//! leadership changes, every node closes its relayed sessions once, with
//! close code 1012 ("service restart"), after the new leader is known (a
//! lease that lapses and comes back to the same leadership closes nothing):
//! the sidecars reconnect (to any node), identify with the new leader and
//! resend what it has not acked.
//! Within the reconnect grace they keep their tasks. The leader closes the
//! sessions of a node that stops sending heartbeats for a lease.
//!
//! **Files.** `node.rs` is every node's side ([`Relay`]: its sessions'
//! messages to the leader, and the leader's back to them); `intake.rs` is
//! the leader's side (every node's sessions as [`RemoteLink`]s of its hub).

mod intake;
mod node;

pub use intake::RemoteLink;
pub use node::Relay;

pub(super) const HDR_NODE: &str = "Agenthub-Node";
pub(super) const HDR_INCARNATION: &str = "Agenthub-Incarnation";
pub(super) const HDR_SESSION: &str = "Agenthub-Session";
pub(super) const HDR_KIND: &str = "Agenthub-Kind";
/// On every piece but the last of a message too large for one NATS message.
pub(super) const HDR_MORE: &str = "Agenthub-More";
/// On every piece of a message sent in pieces: its index, from 0.
pub(super) const HDR_PIECE: &str = "Agenthub-Piece";
