//! How the hub's changes become durable, and what it does when one cannot:
//! the write epoch, the failure hook, the rebuild and the probe, in one
//! place.
//!
//! **Committing.** [`Hub::submit`] hands a transaction to the store under
//! the core lock (batches reach the store in `seq` order), tagged with the
//! hub's write epoch. After the commit the events are published, then the
//! transaction's own callbacks (acks, replies, pushes to sidecars) run.
//! [`Hub::barrier_at`] waits for everything queued before it.
//!
//! **When a commit fails**: forget everything that was not committed, refuse
//! writes while the store is unavailable, and take writes again once a
//! probe write succeeds — without a restart.
//!
//! 1. The failed batch's callbacks, and those of every queued batch of the
//!    same write epoch, get the error: no ack, no reply, no event published
//!    (the store's failure rule, [`crate::store::Poison`]).
//! 2. [`Hub::commit_failed`] (first callback of the failed batch) marks the
//!    hub degraded, bumps the epoch and rebuilds task state from the store.
//!    Sessions stay open; reads and watches go on.
//! 3. [`Hub::run_recovery`] probes the store with backoff; on success the hub
//!    leaves degraded mode, schedules, and fires the timers that waited.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::core::{Core, Txn};
use super::Hub;
use crate::error::{Error, Result, StorageFault};
use crate::store::Batch;

/// First and largest pause between probes of an unavailable store.
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Hub {
    /// Hand a transaction to the store (call with the core lock held, so
    /// batches reach the store in `seq` order). After the commit, events are
    /// published first, then the transaction's own callbacks run; a failed
    /// commit starts recovery first.
    pub(super) fn submit(&self, core: &mut Core, mut txn: Txn) {
        if core.resolve_dependents(&mut txn) {
            core.schedule(&mut txn, &self.config, &self.metrics);
        }
        if txn.timers_added {
            self.timer_wake.notify_one();
        }
        self.note_agents_changed();
        let mut batch = core.finish(txn, self.store.durable_seq());
        if batch.is_empty() {
            return;
        }
        let mut first: Vec<crate::store::Callback> = Vec::with_capacity(2);
        let epoch = batch.epoch;
        let hub = self.weak.clone();
        first.push(Box::new(move |r: &Result<()>| {
            if let (Err(e), Some(hub)) = (r, hub.upgrade()) {
                hub.commit_failed(epoch, e);
            }
        }));
        // A replicated store publishes events itself, as it applies them.
        if !batch.events.is_empty() && !self.store.replicated() {
            let events = batch.events.clone();
            let bus = self.bus.clone();
            first.push(Box::new(move |r: &Result<()>| {
                if r.is_ok() {
                    bus.publish(&events);
                }
            }));
        }
        let finished: Vec<String> = batch
            .tasks
            .iter()
            .filter(|w| w.task.state.is_final())
            .map(|w| w.task.task_id.clone())
            .collect();
        if !finished.is_empty() {
            let waiters = self.waiters.clone();
            first.push(Box::new(move |r: &Result<()>| {
                if r.is_ok() {
                    waiters.finished(finished.iter().map(String::as_str));
                }
            }));
        }
        first.append(&mut batch.callbacks);
        batch.callbacks = first;
        self.store.submit(batch);
    }

    /// Add a "durable" signal to a transaction.
    pub(super) fn durable_signal(txn: &mut Txn) -> oneshot::Receiver<Result<()>> {
        Self::durable_signal_on(&mut txn.batch)
    }

    pub(super) fn durable_signal_on(batch: &mut Batch) -> oneshot::Receiver<Result<()>> {
        let (tx, rx) = oneshot::channel();
        batch.then(move |r| {
            let _ = tx.send(r.clone());
        });
        rx
    }

    pub(super) async fn wait(rx: oneshot::Receiver<Result<()>>) -> Result<()> {
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Wait until everything submitted so far is durable. Fails if write
    /// epoch `epoch` (the one a caller read its state in) was poisoned: what
    /// it read may never have been stored.
    pub(super) async fn barrier_at(&self, epoch: u64) -> Result<()> {
        let mut batch = Batch {
            epoch,
            ..Batch::default()
        };
        let rx = Self::durable_signal_on(&mut batch);
        {
            // Under the lock, so it queues behind every batch already built.
            let _core = self.lock();
            self.store.submit(batch);
        }
        Self::wait(rx).await
    }

    /// Wait until every change made so far is durable (and its replies sent).
    pub async fn flush(&self) -> Result<()> {
        let epoch = self.lock().epoch;
        self.barrier_at(epoch).await
    }

    /// May `core` take a write now?
    pub(super) fn check_writable(&self, core: &Core) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        match core.refuse_writes() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// May `core` serve reads now? Not while memory may be ahead of the store.
    pub(super) fn check_readable(core: &Core) -> Result<()> {
        match (core.stale, core.refuse_writes()) {
            (true, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// A commit of write epoch `epoch` failed with `e`.
    pub(super) fn commit_failed(&self, epoch: u64, e: &Error) {
        let mut core = self.lock();
        if core.epoch > epoch {
            return; // Already rebuilt past it.
        }
        let (fault, detail) = match e {
            // Only that change was refused; other writers wait the moment
            // it takes to rebuild, as for any failed commit.
            Error::Storage {
                fault: StorageFault::TooLarge,
                detail,
            } => (
                StorageFault::Other,
                format!("rebuilding after the log refused a change: {detail}"),
            ),
            Error::Storage { fault, detail } => (*fault, detail.clone()),
            other => (StorageFault::Other, other.to_string()),
        };
        tracing::error!(%fault, %detail, "commit failed: refusing writes and rebuilding state from the store");
        core.epoch = epoch + 1;
        core.degraded = Some((fault, detail));
        drop(core);
        self.reload(epoch + 1);
        self.metrics.storage_fault();
        self.recovery_wake.notify_one();
    }

    /// Rebuild task state from the store for write epoch `epoch`. The store
    /// is read without the core lock (a load reads every live task: every
    /// request would wait on the lock meanwhile); the writes it could miss
    /// are refused while the hub is degraded. False: the store could not be
    /// read (nothing is served until a later rebuild succeeds).
    fn reload(&self, epoch: u64) -> bool {
        let loaded = self.store.load();
        let mut core = self.lock();
        if core.epoch != epoch {
            return true; // A newer failure rebuilds past this one.
        }
        match loaded {
            Ok(loaded) => {
                core.rebuild(loaded, &self.config);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the store; reads wait for recovery");
                core.stale = true;
                false
            }
        }
    }

    /// Leave degraded mode if the store takes writes again. True: recovered.
    fn try_recover(&self) -> bool {
        if let Err(e) = self.store.probe() {
            tracing::debug!(error = %e, "store still unavailable");
            return false;
        }
        // A cluster node that just won the lease: its state is the log's
        // as of now, not as of when it last led.
        let (stale, epoch) = {
            let core = self.lock();
            (core.stale, core.epoch)
        };
        if (stale || self.store.replicated()) && !self.reload(epoch) {
            return false;
        }
        let mut core = self.lock();
        if core.epoch != epoch || core.stale {
            return false; // Failed again meanwhile: probe again.
        }
        core.degraded = None;
        core.agent_changed();
        let mut txn = super::Txn::new();
        core.schedule(&mut txn, &self.config, &self.metrics);
        self.submit(&mut core, txn);
        drop(core);
        self.timer_wake.notify_one();
        tracing::info!("store takes writes again");
        true
    }

    /// Cluster mode: this node lost the lease (or the log refused its
    /// append). Forget sessions and undecided changes, follow the log again.
    pub fn step_down(&self, why: &str) {
        let epoch = {
            let mut core = self.lock();
            core.epoch += 1;
            core.degraded = Some((StorageFault::NotLeader, why.to_string()));
            for a in core.agents.values_mut() {
                a.session = None;
            }
            core.epoch
        };
        self.reload(epoch);
        self.lock().agent_changed();
        self.note_agents_changed();
    }

    /// Cluster mode: this node won the lease and fenced the log; take
    /// writes now (without waiting for the next probe).
    pub fn take_writes(self: &Arc<Self>) {
        let hub = self.clone();
        tokio::task::spawn_blocking(move || {
            if !hub.try_recover() {
                hub.recovery_wake.notify_one();
            }
        });
    }

    /// Probe the store while the hub is degraded. Runs until `shutdown`.
    pub async fn run_recovery(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.recovery_wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            let mut backoff = PROBE_BACKOFF_MIN;
            while self.lock().degraded.is_some() {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
                let hub = self.clone();
                let recovered = tokio::task::spawn_blocking(move || hub.try_recover())
                    .await
                    .unwrap_or(false);
                if recovered {
                    break;
                }
            }
        }
    }
}
