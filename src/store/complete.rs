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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Batch;
use crate::error::Result;

/// A committed group: each batch with its outcome.
pub type Done = Vec<(Batch, Result<()>)>;

/// Runs committed groups' callbacks, in commit order.
pub struct Completer {
    tx: Option<mpsc::UnboundedSender<Done>>,
    /// Groups handed over whose callbacks have not all run yet.
    pending: Arc<AtomicUsize>,
}

impl Completer {
    /// On the current tokio runtime if there is one, else inline.
    pub fn new() -> Completer {
        let pending = Arc::new(AtomicUsize::new(0));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Completer { tx: None, pending };
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        let left = pending.clone();
        rt.spawn(async move {
            while let Some(done) = rx.recv().await {
                complete(done);
                left.fetch_sub(1, Ordering::Release);
            }
        });
        Completer {
            tx: Some(tx),
            pending,
        }
    }

    /// Run `done`'s callbacks, in order, after every group handed over
    /// before it. A runtime that has stopped takes nothing: then they run
    /// here.
    ///
    /// A group of one batch, with nothing handed over still running, runs
    /// here at once: it has one waiter, so handing it over would add a hop
    /// to a lone round trip and save no wake-up; and every group before it
    /// has completed, so the order holds.
    pub fn hand_over(&self, done: Done) {
        if done.iter().all(|(b, _)| b.callbacks.is_empty()) {
            return;
        }
        let lone = done.len() == 1 && self.pending.load(Ordering::Acquire) == 0;
        let unsent = match &self.tx {
            Some(tx) if !lone => {
                self.pending.fetch_add(1, Ordering::AcqRel);
                let unsent = tx.send(done).err().map(|e| e.0);
                if unsent.is_some() {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                }
                unsent
            }
            _ => Some(done),
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn group(sizes: usize, first: usize, seen: &Arc<Mutex<Vec<usize>>>) -> Done {
        (first..first + sizes)
            .map(|n| {
                let mut b = Batch::default();
                let seen = seen.clone();
                b.then(move |_| seen.lock().unwrap().push(n));
                (b, Ok(()))
            })
            .collect()
    }

    /// Lone batches run at once and larger groups on the runtime, and
    /// every callback still runs in commit order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callbacks_run_in_commit_order_whichever_way_a_group_goes() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let completer = Completer::new();
        let (last_tx, last_rx) = tokio::sync::oneshot::channel();
        let total = {
            let seen = seen.clone();
            // The committing thread, as the log's writer is.
            std::thread::spawn(move || {
                let mut n = 0;
                for i in 0..2_000 {
                    let size = [1, 1, 3, 1, 8][i % 5];
                    completer.hand_over(group(size, n, &seen));
                    n += size;
                }
                let mut last = Batch::default();
                last.then(move |_| {
                    let _ = last_tx.send(());
                });
                completer.hand_over(vec![(last, Ok(())), (Batch::default(), Ok(()))]);
                n
            })
            .join()
            .unwrap()
        };
        last_rx.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), (0..total).collect::<Vec<_>>());
    }

    /// Without a runtime (the offline tools) a group completes on the spot.
    #[test]
    fn without_a_runtime_a_group_completes_at_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        Completer::new().hand_over(group(3, 0, &seen));
        assert_eq!(*seen.lock().unwrap(), [0, 1, 2]);
    }
}
