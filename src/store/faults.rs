//! Fault injection for the embedded store: fail the next N commits, fail
//! every commit (and probe) while a fault is set, or slow commits down. The
//! store consults it right before each group commit, so the failure path is
//! the real one (poisoned epochs, rebuild, degraded mode). Used by tests and
//! fault drills; a store built without it pays nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, StorageFault};

/// Shared switches; cheap to clone behind an `Arc`.
#[derive(Debug, Default)]
pub struct Faults {
    fail_next: AtomicU64,
    fail_all: Mutex<Option<StorageFault>>,
    delay_us: AtomicU64,
    injected: AtomicU64,
    discard: AtomicBool,
    refuse_change: Mutex<Option<String>>,
    fail_copy: AtomicBool,
    lose_deliveries: AtomicBool,
    lost: AtomicU64,
    fail_catch_ups: AtomicU64,
    follow_failures: AtomicU64,
    stalls: AtomicU64,
}

impl Faults {
    /// Fail the next `n` commits.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Fail every commit and probe with `fault` until [`Faults::clear`].
    pub fn fail_all(&self, fault: StorageFault) {
        *self.fail_all.lock().unwrap_or_else(|e| e.into_inner()) = Some(fault);
    }

    /// Stop failing (pending `fail_next` counts included).
    pub fn clear(&self) {
        *self.fail_all.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.fail_next.store(0, Ordering::SeqCst);
    }

    /// Make every commit take at least this long.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Acknowledge every commit without writing anything: the hub runs as if
    /// storage cost nothing. For measuring the rest of the hub (the
    /// benchmark's `hub-bound` group); never for data anyone keeps.
    pub fn discard_writes(&self) {
        self.discard.store(true, Ordering::SeqCst);
    }

    /// Whether commits are acknowledged unwritten ([`Faults::discard_writes`]).
    pub fn discards(&self) -> bool {
        self.discard.load(Ordering::Relaxed)
    }

    /// Commits failed by injection so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Called before a commit: the injected failure, if any.
    pub fn before_commit(&self) -> Result<(), Error> {
        let delay = self.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        let fault = *self.fail_all.lock().unwrap_or_else(|e| e.into_inner());
        let fault = fault.or_else(|| {
            self.fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .ok()
                .map(|_| StorageFault::Io)
        });
        match fault {
            Some(fault) => {
                self.injected.fetch_add(1, Ordering::SeqCst);
                Err(Error::Storage {
                    fault,
                    detail: "injected fault".into(),
                })
            }
            None => Ok(()),
        }
    }

    /// Refuse every change of this one task (`None`: stop), as a change
    /// that fails for a reason of its own would be: the rest of the hub's
    /// writes go on.
    pub fn refuse_changes_of(&self, task_id: Option<&str>) {
        *self.refuse_change.lock().unwrap_or_else(|e| e.into_inner()) = task_id.map(str::to_string);
    }

    /// Called when one change is checked: the injected refusal, if any.
    pub fn check_change(&self, task_id: &str) -> Result<(), Error> {
        let refused = self.refuse_change.lock().unwrap_or_else(|e| e.into_inner());
        match refused.as_deref() {
            Some(id) if id == task_id => {
                self.injected.fetch_add(1, Ordering::SeqCst);
                Err(Error::InvalidArgument(format!(
                    "the change of task {task_id} was refused (injected fault)"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Fail every apply of the log to the single node's query copy (as a
    /// full disk does) until called with `false`.
    pub fn fail_copy(&self, fail: bool) {
        self.fail_copy.store(fail, Ordering::SeqCst);
    }

    /// Called before the copy applies records: the injected failure, if any.
    pub fn before_copy(&self) -> Result<(), Error> {
        match self.fail_copy.load(Ordering::SeqCst) {
            true => Err(Error::Storage {
                fault: StorageFault::Full,
                detail: "injected fault (query copy)".into(),
            }),
            false => Ok(()),
        }
    }

    /// Make a cluster follower's consumer go quiet for good when it
    /// delivers while this is set (until called with `false`): it delivers
    /// nothing more and reports no error, as a consumer does whose NATS
    /// server went away while it was being recreated.
    pub fn lose_deliveries(&self, lose: bool) {
        self.lose_deliveries.store(lose, Ordering::SeqCst);
    }

    /// Called for each message a follower's consumer delivers: true when it
    /// is to be lost ([`Faults::lose_deliveries`]).
    pub fn delivery_lost(&self) -> bool {
        let lost = self.lose_deliveries.load(Ordering::SeqCst);
        if lost {
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
        lost
    }

    /// Fail the next `n` catch-ups of a cluster node's copy with the log
    /// (as a request to a settling NATS cluster times out).
    pub fn fail_catch_ups(&self, n: u64) {
        self.fail_catch_ups.store(n, Ordering::SeqCst);
    }

    /// Called before a catch-up: the injected failure, if any.
    pub fn before_catch_up(&self) -> Result<(), Error> {
        let failed = self
            .fail_catch_ups
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(Error::storage(
                "injected fault (catch-up: request timed out)",
            ));
        }
        Ok(())
    }

    /// Deliveries lost by injection so far.
    pub fn lost_deliveries(&self) -> u64 {
        self.lost.load(Ordering::SeqCst)
    }

    /// Called when a cluster node's following of the log fails (and is
    /// retried after a pause): counted, for tests to see.
    pub fn note_follow_failure(&self) {
        self.follow_failures.fetch_add(1, Ordering::SeqCst);
    }

    /// Failures of a cluster node's following of the log so far.
    pub fn follow_failures(&self) -> u64 {
        self.follow_failures.load(Ordering::SeqCst)
    }

    /// Called when a cluster node finds its consumer quiet while the log
    /// holds entries the copy lacks (one of the failures counted above).
    pub fn note_stall(&self) {
        self.stalls.fetch_add(1, Ordering::SeqCst);
    }

    /// Quiet consumers found so far.
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::SeqCst)
    }

    /// Called by a probe: fails while `fail_all` is set.
    pub fn before_probe(&self) -> Result<(), Error> {
        match *self.fail_all.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(fault) => Err(Error::Storage {
                fault,
                detail: "injected fault".into(),
            }),
            None => Ok(()),
        }
    }
}
