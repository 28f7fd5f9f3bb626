//! Task rows and history in the embedded store.
//!
//! A task's payload is stored once: `description` lives in its CREATED
//! event, `result` in its COMPLETED event (both are what watchers see), and
//! the row holds everything else (state, agent, generation, metadata,
//! error...) plus the columns the indexes need. Reading a task from disk
//! joins the two back. Finished tasks are served from here (by index, never
//! by scan); only live tasks are read at start.
//!
//! Retention removes finished tasks and their events (all of a task's
//! events lie between its `created_seq` and `last_seq`) in small batches on
//! a reader connection, off the commit path, and gives the pages back with
//! incremental vacuum.

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::error::{Error, Result};
use crate::event;
use crate::model::{Seq, Task, TaskState};
use crate::store::{ListFilter, Purged, TaskListing, TaskWrite};

/// Schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// The stable number of a state in the `state` column (the proto's values).
pub fn state_code(s: TaskState) -> i64 {
    TaskState::ALL.iter().position(|x| *x == s).unwrap_or(0) as i64 + 1
}

fn state_from_code(code: i64) -> Option<TaskState> {
    TaskState::ALL.get(usize::try_from(code - 1).ok()?).copied()
}

/// Create or upgrade the schema. Version 0 stored whole tasks as JSON in
/// `body`; its rows keep that body (read as it is) and gain the columns.
pub fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let has_state: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'state'")?
        .exists([])?;
    if !has_state {
        conn.execute_batch(
            "ALTER TABLE tasks ADD COLUMN state INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE tasks ADD COLUMN agent_id TEXT;
             ALTER TABLE tasks ADD COLUMN created_seq INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE tasks ADD COLUMN finished_at INTEGER;
             UPDATE tasks SET
               state = CASE json_extract(body, '$.state')
                 WHEN 'QUEUED' THEN 1 WHEN 'ASSIGNED' THEN 2 WHEN 'RUNNING' THEN 3
                 WHEN 'COMPLETED' THEN 4 WHEN 'FAILED' THEN 5 WHEN 'CANCELLED' THEN 6 ELSE 0 END,
               agent_id = json_extract(body, '$.agent_id'),
               created_seq = json_extract(body, '$.created_seq');
             UPDATE tasks SET finished_at = json_extract(body, '$.updated_at_ms') WHERE state >= 4;",
        )?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_seq);
         CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, created_seq);
         CREATE INDEX IF NOT EXISTS tasks_by_agent ON tasks (agent_id, created_seq);
         CREATE INDEX IF NOT EXISTS tasks_by_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;",
    )?;
    // Pages freed by retention go back to the file system.
    let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if auto_vacuum != 2 {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

const INSERT_TASK: &str =
    "INSERT INTO tasks (task_id, last_seq, body, state, agent_id, created_seq, finished_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const UPDATE_TASK: &str = "UPDATE tasks SET last_seq = ?2, body = ?3, state = ?4, agent_id = ?5, created_seq = ?6, finished_at = ?7 \
     WHERE task_id = ?1 AND last_seq = ?8";

/// Write one task row (insert, or compare-and-set update on `last_seq`).
/// Returns the number of rows changed (1 on success).
pub fn write_task(tx: &Transaction<'_>, w: &TaskWrite, expected: Option<Seq>) -> Result<usize> {
    let t = &w.task;
    let body = w.body();
    let finished = t.state.is_final().then_some(t.updated_at_ms);
    let (last, created, state) = (t.last_seq as i64, t.created_seq as i64, state_code(t.state));
    let row: [&dyn rusqlite::ToSql; 7] = [
        &t.task_id,
        &last,
        &body,
        &state,
        &t.agent_id,
        &created,
        &finished,
    ];
    let n = match expected {
        None => tx.prepare_cached(INSERT_TASK)?.execute(&row[..])?,
        Some(prev) => {
            let prev = prev as i64;
            let mut args = row.to_vec();
            args.push(&prev);
            tx.prepare_cached(UPDATE_TASK)?.execute(&args[..])?
        }
    };
    Ok(n)
}

/// A payload field of the event at `seq`, as JSON.
fn event_field(conn: &Connection, seq: Seq, field: &str) -> Result<Option<serde_json::Value>> {
    let mut stmt = conn.prepare_cached("SELECT body FROM events WHERE seq = ?1")?;
    let body: Option<Vec<u8>> = stmt
        .query_row(params![seq as i64], |r| r.get(0))
        .optional()?;
    let Some(body) = body else { return Ok(None) };
    event::payload_field(&body, field).map_err(|e| Error::storage(e.to_string()))
}

/// A row as read: `task_id, last_seq, created_seq, body`.
struct Row {
    task_id: String,
    last_seq: i64,
    created_seq: i64,
    body: String,
}

/// The columns [`Row`] reads.
const ROW: &str = "task_id, last_seq, created_seq, body";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        task_id: r.get(0)?,
        last_seq: r.get(1)?,
        created_seq: r.get(2)?,
        body: r.get(3)?,
    })
}

/// A task from its row, with its description and result from its events.
fn task_from_row(conn: &Connection, row: &Row) -> Result<Task> {
    let mut task = crate::store::row::task(
        &row.task_id,
        row.last_seq as Seq,
        row.created_seq as Seq,
        &row.body,
    )?;
    if task.description.is_empty() && task.created_seq > 0 {
        if let Some(serde_json::Value::String(d)) =
            event_field(conn, task.created_seq, "description")?
        {
            task.description = d;
        }
    }
    if task.state == TaskState::Completed && task.result.is_none() {
        task.result = Some(event_field(conn, task.last_seq, "result")?.unwrap_or_default());
    }
    Ok(task)
}

fn tasks_from(conn: &Connection, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Task>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt
        .query_map(args, row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.iter().map(|r| task_from_row(conn, r)).collect()
}

/// Every live (not finished) task: what the hub keeps in memory.
pub fn load_live(conn: &Connection) -> Result<Vec<Task>> {
    tasks_from(
        conn,
        &format!("SELECT {ROW} FROM tasks WHERE state IN (1, 2, 3) ORDER BY created_seq"),
        &[],
    )
}

/// The states of the finished tasks that live tasks depend on (a live
/// task's dependencies that are live themselves are among the live tasks).
/// A dependency that is gone was removed by retention, which only removes
/// finished tasks; it is left out (the hub treats it as COMPLETED: a
/// dependent of a task that failed fails with it, in the same commit).
pub fn dependency_states(
    conn: &Connection,
    live: &[Task],
) -> Result<std::collections::HashMap<String, TaskState>> {
    let live_ids: std::collections::HashSet<&str> =
        live.iter().map(|t| t.task_id.as_str()).collect();
    let mut out = std::collections::HashMap::new();
    let mut stmt = conn.prepare_cached("SELECT state FROM tasks WHERE task_id = ?1")?;
    for dep in live.iter().flat_map(|t| &t.depends_on) {
        if live_ids.contains(dep.as_str()) || out.contains_key(dep) {
            continue;
        }
        let code: Option<i64> = stmt.query_row(params![dep], |r| r.get(0)).optional()?;
        if let Some(state) = code.and_then(state_from_code) {
            out.insert(dep.clone(), state);
        }
    }
    Ok(out)
}

/// Tasks per state (index: `TaskState::ALL`).
pub fn state_counts(conn: &Connection) -> Result<[u64; 6]> {
    let mut out = [0u64; 6];
    let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (state, n) = row?;
        if let Some(s) = state_from_code(state) {
            out[state_code(s) as usize - 1] = n as u64;
        }
    }
    Ok(out)
}

pub fn get(conn: &Connection, task_id: &str) -> Result<Option<Task>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {ROW} FROM tasks WHERE task_id = ?1"))?;
    let found = stmt.query_row(params![task_id], row).optional()?;
    found.map(|r| task_from_row(conn, &r)).transpose()
}

/// One page in creation order, and the seq it reflects (one read
/// transaction: the page is exactly the state as of that seq).
pub fn list(conn: &mut Connection, f: &ListFilter) -> Result<TaskListing> {
    let tx = conn.transaction()?;
    let after = i64::try_from(f.after_created_seq).unwrap_or(i64::MAX);
    let limit = f.limit as i64;
    let state = f.state.map(state_code);
    let tasks = match (state, f.agent_id.as_deref()) {
        (None, None) => tasks_from(
            &tx,
            &format!("SELECT {ROW} FROM tasks WHERE created_seq > ?1 ORDER BY created_seq LIMIT ?2"),
            &[&after, &limit],
        )?,
        (Some(s), None) => tasks_from(
            &tx,
            &format!("SELECT {ROW} FROM tasks WHERE state = ?3 AND created_seq > ?1 ORDER BY created_seq LIMIT ?2"),
            &[&after, &limit, &s],
        )?,
        // An agent's tasks are the narrower set: walk its index in creation order.
        (None, Some(a)) => tasks_from(
            &tx,
            &format!("SELECT {ROW} FROM tasks INDEXED BY tasks_by_agent WHERE agent_id = ?3 AND created_seq > ?1 ORDER BY created_seq LIMIT ?2"),
            &[&after, &limit, &a],
        )?,
        (Some(s), Some(a)) => tasks_from(
            &tx,
            &format!("SELECT {ROW} FROM tasks INDEXED BY tasks_by_agent WHERE agent_id = ?3 AND state = ?4 AND created_seq > ?1 ORDER BY created_seq LIMIT ?2"),
            &[&after, &limit, &a, &s],
        )?,
    };
    let as_of_seq: Option<i64> = tx.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
    let as_of_seq = (as_of_seq.unwrap_or(0) as Seq).max(purged_upto(&tx)?);
    tx.finish()?;
    Ok(TaskListing { tasks, as_of_seq })
}

/// Remove up to `limit` tasks that finished before `cutoff_ms`, with their
/// events, in one short write transaction.
pub fn purge(conn: &mut Connection, cutoff_ms: i64, limit: usize) -> Result<Purged> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let victims: Vec<(String, i64, i64, i64)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT task_id, state, created_seq, last_seq FROM tasks \
             WHERE finished_at IS NOT NULL AND finished_at < ?1 ORDER BY finished_at LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![cutoff_ms, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    let mut out = Purged::default();
    {
        let mut del_events =
            tx.prepare_cached("DELETE FROM events WHERE seq BETWEEN ?1 AND ?2 AND task_id = ?3")?;
        let mut del_task = tx.prepare_cached("DELETE FROM tasks WHERE task_id = ?1")?;
        for (task_id, state, created, last) in &victims {
            out.events += del_events.execute(params![created, last, task_id])? as u64;
            del_task.execute(params![task_id])?;
            out.max_seq = out.max_seq.max(*last as Seq);
            if let Some(s) = state_from_code(*state) {
                out.by_state[state_code(s) as usize - 1] += 1;
            }
        }
    }
    if out.max_seq > 0 {
        // History is complete only above the highest seq removed.
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('purged_upto', ?1) \
             ON CONFLICT(key) DO UPDATE SET value = MAX(CAST(value AS INTEGER), ?1)",
            params![out.max_seq as i64],
        )?;
    }
    tx.commit()?;
    out.task_ids = victims.into_iter().map(|v| v.0).collect();
    if !out.task_ids.is_empty() {
        // Give the freed pages back to the file system (each step of the
        // pragma frees one page: run it to the end).
        let mut stmt = conn.prepare("PRAGMA incremental_vacuum")?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
    }
    Ok(out)
}

/// The highest seq removed by retention (0: none).
pub fn purged_upto(conn: &Connection) -> Result<Seq> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'purged_upto'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The oldest seq event pruning kept whole (0: never pruned). Below it only
/// the CREATED and COMPLETED events of stored tasks remain.
pub fn pruned_below(conn: &Connection) -> Result<Seq> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'pruned_below'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Integrity problems, if any: SQLite's own check, seq continuity above the
/// purged part, and every live task's latest event present.
pub fn check(conn: &Connection) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
        let row = row?;
        if row != "ok" {
            problems.push(format!("integrity_check: {row}"));
        }
    }
    let floor = purged_upto(conn)?.max(pruned_below(conn)?.saturating_sub(1)) as i64;
    let (n, max): (i64, Option<i64>) = conn.query_row(
        "SELECT COUNT(*), MAX(seq) FROM events WHERE seq > ?1",
        params![floor],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if let Some(max) = max {
        let first: Option<i64> = conn.query_row(
            "SELECT MIN(seq) FROM events WHERE seq > ?1",
            params![floor],
            |r| r.get(0),
        )?;
        let first = first.unwrap_or(floor + 1);
        if max - first + 1 != n {
            problems.push(format!(
                "seq continuity: {n} events between {first} and {max}, expected {}",
                max - first + 1
            ));
        }
    }
    let missing: i64 = conn.query_row(
        "SELECT COUNT(*) FROM tasks t WHERE t.state IN (1, 2, 3) \
         AND NOT EXISTS (SELECT 1 FROM events e WHERE e.seq = t.last_seq AND e.task_id = t.task_id)",
        [],
        |r| r.get(0),
    )?;
    if missing > 0 {
        problems.push(format!("{missing} live tasks without their latest event"));
    }
    Ok(problems)
}
