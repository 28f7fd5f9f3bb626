//! The hub's state when the copy cannot catch up with the log (it shares
//! the disk with it: a full disk stops both): what the copy holds, with the
//! durable records it lacks laid over it in memory. A rebuild after a
//! failed commit then needs nothing written, and reads go on.

use std::collections::HashMap;

use super::applier::Reader;
use super::{lock, Shared};
use crate::error::Result;
use crate::model::{EventKind, Task, TaskState};
use crate::store::sqlite::SqliteStore;
use crate::store::{entry, Loaded, Store};

/// [`Store::load`] as of every durable record, from the copy and the log.
pub(super) fn load(shared: &Shared, copy: &SqliteStore) -> Result<Loaded> {
    let upto = lock(&shared.state).durable_index;
    let (mut loaded, position) = copy.load_with_position()?;
    let records = Reader::from(position + 1).read(shared, upto, usize::MAX)?;
    let mut live: HashMap<String, Task> = loaded
        .tasks
        .drain(..)
        .map(|t| (t.task_id.clone(), t))
        .collect();
    // Tasks the overlay finished: their state, for a later change of them.
    let mut finished: HashMap<String, TaskState> = HashMap::new();
    for (index, payload) in &records {
        let (events, rows) = entry::decode(&index.to_string(), payload)?;
        let mut descriptions: HashMap<&str, String> = HashMap::new();
        for ev in &events {
            loaded.last_seq = loaded.last_seq.max(ev.seq);
            if ev.kind == EventKind::Created {
                if let Ok(Some(serde_json::Value::String(d))) =
                    crate::event::payload_field(ev.proto(), "description")
                {
                    descriptions.insert(ev.task_id.as_str(), d);
                }
            }
        }
        for w in rows {
            let mut task = w.task;
            let id = task.task_id.clone();
            let before = match (live.remove(&id), w.expected_last_seq) {
                (Some(old), _) => {
                    task.description = old.description;
                    Some(old.state)
                }
                (None, None) => None,
                (None, Some(_)) => match finished.remove(&id) {
                    Some(state) => Some(state),
                    // Finished before the copy's position: read it there.
                    None => copy.get_task(&id)?.map(|old| {
                        task.description = old.description;
                        old.state
                    }),
                },
            };
            if task.description.is_empty() {
                if let Some(d) = descriptions.remove(id.as_str()) {
                    task.description = d;
                }
            }
            if let Some(state) = before {
                let n = &mut loaded.state_counts[state_index(state)];
                *n = n.saturating_sub(1);
            }
            loaded.state_counts[state_index(task.state)] += 1;
            if task.state.is_final() {
                loaded.dependency_states.insert(id.clone(), task.state);
                finished.insert(id, task.state);
            } else {
                loaded.dependency_states.remove(&id);
                live.insert(id, task);
            }
        }
    }
    let mut tasks: Vec<Task> = live.into_values().collect();
    tasks.sort_by_key(|t| t.created_seq);
    loaded.tasks = tasks;
    Ok(loaded)
}

fn state_index(s: TaskState) -> usize {
    TaskState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}
