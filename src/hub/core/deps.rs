//! Dependencies: holding a QUEUED task back until what it depends on has
//! COMPLETED, checking where its dependencies stand, and releasing or
//! failing the tasks that wait once a dependency finishes.

use std::collections::{BTreeSet, HashMap};

use serde_json::json;

use crate::model::{Task, TaskState};

use super::{Core, Txn, REASON_DEPENDENCY_FAILED};

impl Core {
    /// Queue a QUEUED task, or hold it back until `unmet` dependencies
    /// have COMPLETED.
    pub fn wait_for(&mut self, task_id: &str, unmet: BTreeSet<String>) {
        if unmet.is_empty() {
            self.enqueue(task_id);
            return;
        }
        for dep in &unmet {
            self.dependents
                .entry(dep.clone())
                .or_default()
                .push(task_id.to_string());
        }
        self.waiting.insert(task_id.to_string(), unmet);
    }

    /// Where a task's dependencies stand: the first that FAILED or was
    /// CANCELLED, else those not COMPLETED yet. A dependency not in memory
    /// is finished: its state is in `known` (read from the store before the
    /// lock; a finished task only changes in memory), else retention removed
    /// it, which it does only to finished tasks: counted as COMPLETED.
    pub fn dependency_check(
        &self,
        task: &Task,
        known: &HashMap<String, TaskState>,
    ) -> Result<BTreeSet<String>, String> {
        let mut unmet = BTreeSet::new();
        for dep in &task.depends_on {
            let state = self.tasks.get(dep).map(|t| t.state);
            match state.or_else(|| known.get(dep).copied()) {
                Some(TaskState::Completed) | None => {}
                Some(TaskState::Failed | TaskState::Cancelled) => return Err(dep.clone()),
                Some(_) => {
                    unmet.insert(dep.clone());
                }
            }
        }
        Ok(unmet)
    }

    /// Tasks that finished in this transaction release or fail the tasks
    /// waiting for them (and those, in turn, theirs). True if anything changed.
    pub fn resolve_dependents(&mut self, txn: &mut Txn) -> bool {
        let mut changed = false;
        let mut i = 0;
        while i < txn.touched.len() {
            let id = txn.touched[i].0.clone();
            i += 1;
            let Some(state) = self.tasks.get(&id).map(|t| t.state) else {
                continue;
            };
            if !state.is_final() {
                continue;
            }
            let Some(waiters) = self.dependents.remove(&id) else {
                continue;
            };
            for w in waiters {
                let Some(unmet) = self.waiting.get_mut(&w) else {
                    continue; // Already failed, cancelled or released.
                };
                changed = true;
                if state == TaskState::Completed {
                    unmet.remove(&id);
                    if unmet.is_empty() {
                        self.waiting.remove(&w);
                        self.enqueue(&w);
                    }
                } else {
                    let error = json!({"reason": REASON_DEPENDENCY_FAILED, "dependency": id});
                    self.fail_task(txn, &w, error);
                }
            }
        }
        changed
    }
}
