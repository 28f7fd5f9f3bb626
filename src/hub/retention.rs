//! Retention: finished tasks, their events and their output are removed once `retention`
//! has passed since they finished, in small batches on a reader connection
//! (off the commit path), checked every `retention_interval`. Live tasks are
//! never touched; a task this close to the cutoff can no longer be retried,
//! so nothing retention removes is written again.

use std::sync::Arc;

use tokio::sync::watch;

use super::Hub;
use crate::model::now_ms;

/// Tasks removed per transaction (keeps each write lock short).
const PURGE_BATCH: usize = 500;

impl Hub {
    /// Run until `shutdown` turns true.
    pub async fn run_retention(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(keep) = self.config.retention else {
            return;
        };
        let mut tick = tokio::time::interval(self.config.retention_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if self.lock().degraded.is_some() {
                continue;
            }
            let cutoff = now_ms() - keep.as_millis() as i64;
            loop {
                let store = self.store.clone();
                let purged =
                    tokio::task::spawn_blocking(move || store.purge_finished(cutoff, PURGE_BATCH))
                        .await;
                let purged = match purged {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "retention pass failed; retrying later");
                        break;
                    }
                    Err(_) => break,
                };
                let n = purged.task_ids.len();
                if n > 0 {
                    self.lock().forget_purged(&purged);
                    self.output.purge(purged.task_ids.clone());
                    self.metrics.retention_purged_tasks.inc_by(n as u64);
                    self.metrics.retention_purged_events.inc_by(purged.events);
                    tracing::debug!(
                        tasks = n,
                        events = purged.events,
                        "retention removed finished tasks"
                    );
                }
                if n < PURGE_BATCH {
                    break;
                }
            }
        }
    }
}
