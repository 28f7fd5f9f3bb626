//! [`ClusterStore`], the [`Store`] the hub uses in cluster mode: writes go
//! to the leader's writer, reads to the local copy, tokens to the token
//! cache; and the handle's own controls (bus, deposition, leadership).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::tokens::StoredToken;
use super::{demote, not_leader, wait_head, Part, Shared, APPLY_TIMEOUT};
use crate::bus::EventBus;
use crate::cluster::block_on;
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::model::{Seq, Task, TokenRecord};
use crate::store::{Batch, CommitStats, ListFilter, Loaded, Purged, Store, TaskListing};

/// Called when this node loses the right to append (with the reason).
pub type OnDeposed = Box<dyn Fn(&str) + Send + Sync>;

/// [`Store`] on a JetStream stream, with a local SQLite copy for reads.
pub struct ClusterStore {
    pub(super) shared: Arc<Shared>,
    pub(super) tx: mpsc::UnboundedSender<Batch>,
}

impl ClusterStore {
    /// Feed applied events to `bus` (the hub's).
    pub fn set_bus(&self, bus: Arc<EventBus>) {
        *self.shared.bus.lock().expect("bus") = Some(bus);
    }

    /// Run `f` when this node loses the right to append.
    pub fn on_deposed(&self, f: OnDeposed) {
        *self.shared.on_deposed.lock().expect("on_deposed") = Some(f);
    }

    /// Stop appending (lease lost). Queued batches fail.
    pub fn demote(&self, why: &str) {
        demote(&self.shared, why);
    }

    pub fn is_leader(&self) -> bool {
        matches!(*self.shared.part.lock().expect("part"), Part::Leader { .. })
    }

    /// The highest seq in the local copy.
    pub fn head(&self) -> Seq {
        *self.shared.head.borrow()
    }

    /// Wait until the local copy holds every append the log acknowledged
    /// to this node: a read sees every change acknowledged before it began.
    fn caught_up(&self) -> Result<()> {
        let acked = *self.shared.acked.borrow();
        if self.head() >= acked {
            return Ok(());
        }
        let shared = self.shared.clone();
        block_on(&self.shared.rt, async move {
            wait_head(&shared, acked, APPLY_TIMEOUT).await
        })
    }
}

impl Store for ClusterStore {
    fn submit(&self, batch: Batch) {
        self.shared.ids.insert_created(&batch.tasks);
        if let Err(mpsc::error::SendError(batch)) = self.tx.send(batch) {
            batch.complete(&Err(Error::ShuttingDown));
        }
    }

    fn load(&self) -> Result<Loaded> {
        let loaded = self.shared.copy.store().load()?;
        // Ids applied or submitted from here on go in as they come.
        self.shared.ids.fill_from(
            loaded.state_counts.iter().sum(),
            self.shared.copy.store().clone(),
        );
        Ok(loaded)
    }

    fn may_hold_task(&self, task_id: &str) -> bool {
        self.shared.ids.may_contain(task_id)
    }

    fn get_task(&self, task_id: &str) -> Result<Option<Task>> {
        self.caught_up()?;
        self.shared.copy.store().get_task(task_id)
    }

    fn list_tasks(&self, filter: &ListFilter) -> Result<TaskListing> {
        self.caught_up()?;
        self.shared.copy.store().list_tasks(filter)
    }

    fn max_change_bytes(&self) -> usize {
        // One append is one NATS message.
        crate::cluster::piece_size(&self.shared.node.client)
    }

    fn purge_finished(&self, cutoff_ms: i64, limit: usize) -> Result<Purged> {
        // Retention works on this node's copy only (see docs/cluster.md).
        self.shared.copy.store().purge_finished(cutoff_ms, limit)
    }

    fn disk_bytes(&self) -> u64 {
        self.shared.copy.store().disk_bytes()
    }

    fn read_events(&self, after: Seq, limit: usize) -> Result<Vec<EncodedEvent>> {
        self.caught_up()?;
        self.shared.copy.store().read_events(after, limit)
    }

    fn first_retained_seq(&self) -> Seq {
        self.shared.copy.store().first_retained_seq()
    }

    fn durable_seq(&self) -> Seq {
        self.shared.copy.store().durable_seq()
    }

    fn log_id(&self) -> String {
        self.shared.log_id.clone()
    }

    fn probe(&self) -> Result<()> {
        if !self.is_leader() {
            return Err(not_leader(&self.shared));
        }
        // The hub reloads its state from the copy next: it must hold every
        // append this node sent. A leader whose copy stopped following
        // lets another node lead rather than hold the lease unable to write.
        let sent = self.shared.sent.load(Ordering::Acquire);
        if self.head() < sent {
            let shared = self.shared.clone();
            let caught_up = block_on(&self.shared.rt, async move {
                wait_head(&shared, sent, APPLY_TIMEOUT).await
            });
            if let Err(e) = caught_up {
                super::follower::refollow(&self.shared);
                demote(&self.shared, "the local copy of the log stopped following");
                return Err(e);
            }
        }
        Ok(())
    }

    fn event_count(&self) -> u64 {
        self.shared.copy.store().event_count()
    }

    fn commit_stats(&self) -> CommitStats {
        self.shared.stats.lock().expect("stats").clone()
    }

    fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        self.shared.put_token(StoredToken::of(token))
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.shared.find_token(hash)
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.shared.list_tokens()
    }

    fn revoke_token(&self, id: &str) -> Result<bool> {
        self.shared.revoke_token(id)
    }

    fn replicated(&self) -> bool {
        true
    }

    fn close(&self) {
        self.shared.copy.store().close();
    }
}
