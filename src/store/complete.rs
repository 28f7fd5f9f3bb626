//! Where a group commit's callbacks run: on the tokio runtime the store was
//! opened in, handed over once per group, or on the committing thread when
//! there is no runtime (the offline tools).
//!
//! A callback wakes whoever awaits the commit (an acknowledgement, an RPC
//! reply, the event bus). Run on the committing thread, every waiter of a
//! group is a wake-up from outside the runtime (a system call, often a
//! sleeping worker woken), and the group's memory is freed on a thread that
//! did not allocate it. Handed over, a group costs one wake-up, and its
//! waiters are woken from a worker, on the worker's own queue.

use tokio::sync::mpsc;

use super::Batch;
use crate::error::Result;

/// A committed group: each batch with its outcome.
pub type Done = Vec<(Batch, Result<()>)>;

/// Runs committed groups' callbacks, in commit order.
pub struct Completer {
    tx: Option<mpsc::UnboundedSender<Done>>,
}

impl Completer {
    /// On the current tokio runtime if there is one, else inline.
    pub fn new() -> Completer {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Completer { tx: None };
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        rt.spawn(async move {
            while let Some(done) = rx.recv().await {
                complete(done);
            }
        });
        Completer { tx: Some(tx) }
    }

    /// Run `done`'s callbacks, in order, after every group handed over
    /// before it. A runtime that has stopped takes nothing: then they run
    /// here.
    pub fn hand_over(&self, done: Done) {
        if done.iter().all(|(b, _)| b.callbacks.is_empty()) {
            return;
        }
        let unsent = match &self.tx {
            Some(tx) => tx.send(done).err().map(|e| e.0),
            None => Some(done),
        };
        if let Some(done) = unsent {
            complete(done);
        }
    }
}

impl Default for Completer {
    fn default() -> Self {
        Completer::new()
    }
}

fn complete(done: Done) {
    for (batch, result) in done {
        batch.complete(&result);
    }
}
