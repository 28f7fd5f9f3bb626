//! End-to-end smoke tests with separate OS processes: the `agenthub` hub
//! binary and several `agenthub sidecar` binaries, spawned here; every task
//! is a small shell script (its description) that appends its id to a file
//! under `$OUT`. Run with `--nocapture` to see the measured times.

pub mod harness;
mod recovery;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agenthub::pb;
use agenthub::pb::task_event::Kind;
use serde_json::json;

use crate::helpers::ClientExt;
use harness::*;

/// 2 sidecars, 10 tasks: all complete, each output file written exactly
/// once, progress lines arrive as PROGRESS events; push→assign is measured.
#[tokio::test]
async fn smoke_two_sidecars_complete_ten_tasks_exactly_once() {
    let cluster = Cluster::start(&[]).await;
    let _a = cluster.sidecar("a1", &["--max-concurrency", "5"], &[]);
    let _b = cluster.sidecar("a2", &["--max-concurrency", "5"], &[]);
    cluster.wait_connected(&["a1", "a2"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;

    let script =
        format!(r#"echo "::progress 50"; echo '::progress {{"step":"write"}}'; {WRITE_ID}"#);
    let mut pushed = Vec::new();
    for _ in 0..10 {
        let at = Instant::now();
        let id = cluster
            .push(&mut client, &script, pb::Priority::Normal)
            .await;
        pushed.push((id, at));
    }
    let tasks: Vec<String> = pushed.iter().map(|(id, _)| id.clone()).collect();
    follow
        .until("10 tasks completed", |ev| {
            count_with(ev, &tasks, Kind::Completed) == 10
        })
        .await;
    let done_at = Instant::now();

    let events = follow.all();
    assert_completed_once(&events, &tasks);
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    for t in &tasks {
        assert_eq!(
            cluster.output_lines(t),
            vec![format!("{t} 1")],
            "output of {t}"
        );
        let done = of(&events, t, Kind::Completed)[0];
        *per_agent.entry(done.agent_id.clone()).or_default() += 1;
        let result = &payload(done)["result"];
        assert_eq!(result["exit_code"], 0, "{result}");
        assert_eq!(result["stdout_truncated"], false);
        let progress: Vec<_> = of(&events, t, Kind::Progress)
            .iter()
            .map(|e| payload(e)["progress"].clone())
            .collect();
        assert_eq!(
            progress,
            vec![json!(50), json!({"step": "write"})],
            "progress of {t}"
        );
        assert_eq!(of(&events, t, Kind::Assigned).len(), 1, "{t} assigned once");
    }
    assert_eq!(per_agent.len(), 2, "both sidecars worked: {per_agent:?}");

    let first_push = pushed[0].1;
    let assign: Vec<Duration> = pushed
        .iter()
        .map(|(id, at)| follow.arrived(id, Kind::Assigned).unwrap() - *at)
        .collect();
    let accept: Vec<Duration> = pushed
        .iter()
        .map(|(id, at)| follow.arrived(id, Kind::Accepted).unwrap() - *at)
        .collect();
    let complete: Vec<Duration> = pushed
        .iter()
        .map(|(id, at)| follow.arrived(id, Kind::Completed).unwrap() - *at)
        .collect();
    let (assign_p50, assign_max) = p50_max(assign);
    let (accept_p50, accept_max) = p50_max(accept);
    let (complete_p50, complete_max) = p50_max(complete);
    eprintln!(
        "smoke 2x10: push→ASSIGNED p50 {assign_p50} ms max {assign_max} ms; push→ACCEPTED p50 {accept_p50} ms max {accept_max} ms; \
         push→COMPLETED p50 {complete_p50} ms max {complete_max} ms; all 10 done {} ms after the first push; per agent {per_agent:?}",
        ms(done_at - first_push)
    );
    assert!(assign_max < 2000, "push→assign took {assign_max} ms");
}

/// 4 sidecars, 20 tasks in four priority lanes: each sidecar runs 5 ± 2,
/// every lane completes, and once all are queued, assignment follows
/// priority (URGENT first).
#[tokio::test]
async fn smoke_four_sidecars_share_twenty_tasks_and_no_lane_starves() {
    let cluster = Cluster::start(&[]).await;
    let agents = ["a1", "a2", "a3", "a4"];
    let _sidecars: Vec<_> = agents
        .iter()
        .map(|a| cluster.sidecar(a, &[], &[]))
        .collect();
    cluster.wait_connected(&agents).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let lanes = [
        pb::Priority::Low,
        pb::Priority::Normal,
        pb::Priority::High,
        pb::Priority::Urgent,
    ];
    let script = format!("sleep 0.3; {WRITE_ID}");
    let started = Instant::now();
    let mut priority_of = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let p = lanes[i % 4];
        let id = cluster.push(&mut client, &script, p).await;
        priority_of.insert(id.clone(), p as i32);
        tasks.push(id);
    }
    follow
        .until("20 tasks completed", |ev| {
            count_with(ev, &tasks, Kind::Completed) == 20
        })
        .await;
    let took = started.elapsed();

    let events = follow.all();
    assert_completed_once(&events, &tasks);
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    let mut per_lane: HashMap<i32, usize> = HashMap::new();
    for t in &tasks {
        assert_eq!(cluster.output_lines(t).len(), 1, "output of {t}");
        let by = &of(&events, t, Kind::Completed)[0].agent_id;
        *per_agent.entry(by.clone()).or_default() += 1;
        *per_lane.entry(priority_of[t]).or_default() += 1;
    }
    for a in agents {
        let n = per_agent.get(a).copied().unwrap_or(0);
        assert!(
            (3..=7).contains(&n),
            "{a} ran {n} tasks (want 5 ± 2): {per_agent:?}"
        );
    }
    for p in lanes {
        assert_eq!(per_lane.get(&(p as i32)), Some(&5), "lane {p:?} completed");
    }
    // Assignments made after the last push come from the queue: highest
    // priority first.
    let last_created = events
        .iter()
        .filter(|e| e.kind == Kind::Created as i32)
        .map(|e| e.seq)
        .max()
        .unwrap();
    let later: Vec<i32> = events
        .iter()
        .filter(|e| e.kind == Kind::Assigned as i32 && e.seq > last_created)
        .map(|e| priority_of[&e.task_id])
        .collect();
    assert!(
        later.len() >= 12,
        "most tasks waited in the queue: {later:?}"
    );
    assert!(
        later.windows(2).all(|w| w[0] >= w[1]),
        "queue order by priority: {later:?}"
    );
    eprintln!(
        "smoke 4x20: all done in {} ms; per agent {per_agent:?}; {} assignments from the queue, in priority order",
        ms(took),
        later.len()
    );
}

/// `CancelTask` on a running task: the sidecar sends SIGTERM to the
/// command's process group, SIGKILL after the grace (this script ignores
/// SIGTERM), reports nothing more, and takes the next task.
#[tokio::test]
async fn smoke_cancel_kills_the_command_and_the_sidecar_moves_on() {
    let cluster = Cluster::start(&[]).await;
    let a1 = cluster.sidecar("a1", &[], &[]);
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let stubborn =
        r#"trap '' TERM; echo $$ > "$OUT/$AGENTHUB_TASK_ID.pid"; while :; do sleep 0.05; done"#;
    let task = cluster
        .push(&mut client, stubborn, pb::Priority::Normal)
        .await;
    let pid_file = cluster.out.join(format!("{task}.pid"));
    let deadline = Instant::now() + DEADLINE;
    let pid: u64 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cancelled_at = Instant::now();
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: task.clone(),
        })
        .await
        .unwrap();
    while pid_alive(pid) {
        assert!(
            cancelled_at.elapsed() < DEADLINE,
            "command survived the cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_in = cancelled_at.elapsed();
    assert!(
        killed_in >= Duration::from_millis(400),
        "SIGTERM was ignored, so SIGKILL came after the 500 ms grace: {killed_in:?}"
    );

    let next = cluster
        .push(&mut client, WRITE_ID, pb::Priority::Normal)
        .await;
    follow
        .until("next task completed", |ev| {
            !of(ev, &next, Kind::Completed).is_empty()
        })
        .await;
    let events = follow.all();
    assert_eq!(of(&events, &task, Kind::Cancelled).len(), 1);
    assert!(
        of(&events, &task, Kind::Failed).is_empty()
            && of(&events, &task, Kind::Completed).is_empty()
    );
    assert!(a1.state()["tasks"].get(&task).is_none());
    eprintln!(
        "smoke cancel: command (ignoring SIGTERM) gone {} ms after CancelTask",
        ms(killed_in)
    );
}

/// Non-zero exit → `task_failed` with the exit code and the stderr tail;
/// a big stdout is cut to the last `--output-tail-bytes`, flagged.
#[tokio::test]
async fn smoke_failure_reports_exit_code_and_output_tails_are_capped() {
    let cluster = Cluster::start(&[]).await;
    let _a1 = cluster.sidecar("a1", &["--output-tail-bytes", "1000"], &[]);
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let failing = client
        .push_task(pb::PushTaskRequest {
            description: "echo some-output; echo boom >&2; exit 3".into(),
            max_attempts: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let big = cluster
        .push(
            &mut client,
            "head -c 100000 /dev/zero | tr '\\0' x; echo; echo END",
            pb::Priority::Normal,
        )
        .await;
    follow
        .until("both finished", |ev| {
            !of(ev, &failing, Kind::Failed).is_empty() && !of(ev, &big, Kind::Completed).is_empty()
        })
        .await;
    let events = follow.all();
    let error = &payload(of(&events, &failing, Kind::Failed)[0])["error"];
    assert_eq!(error["reason"], "exit_code");
    assert_eq!(error["exit_code"], 3);
    assert_eq!(error["stderr"], "boom\n");
    let task = client.task(&failing).await;
    assert_eq!(task.state, pb::task::State::Failed as i32);

    let result = &payload(of(&events, &big, Kind::Completed)[0])["result"];
    let stdout = result["stdout"].as_str().unwrap();
    assert_eq!(result["stdout_truncated"], true);
    assert_eq!(stdout.len(), 1000);
    assert!(stdout.ends_with("x\nEND\n"), "{stdout}");
}

/// SIGTERM: the sidecar takes no new task, lets the running ones finish
/// within `--shutdown-grace`, stops the rest (reported as
/// `sidecar_shutdown` failures, so the hub re-queues them), and exits 0.
/// The stopped task is not lost: another sidecar completes it.
#[tokio::test]
async fn smoke_sigterm_drains_then_exits() {
    let cluster = Cluster::start(&["--reconnect-grace", "1s"]).await;
    let mut a1 = cluster.sidecar(
        "a1",
        &["--max-concurrency", "2", "--shutdown-grace", "1500ms"],
        &[("STALL", "30")],
    );
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let short = cluster
        .push(
            &mut client,
            &format!("sleep 0.5; {WRITE_ID}"),
            pb::Priority::Normal,
        )
        .await;
    let long = cluster
        .push(
            &mut client,
            &format!(r#"sleep "${{STALL:-0.2}}"; {WRITE_ID}"#),
            pb::Priority::Normal,
        )
        .await;
    let tasks = vec![short.clone(), long.clone()];
    follow
        .until("both accepted", |ev| {
            count_with(ev, &tasks, Kind::Accepted) == 2
        })
        .await;
    let term_at = Instant::now();
    a1.sigterm();
    let status = a1.wait_exit(Duration::from_secs(15)).await;
    let exited_in = term_at.elapsed();
    assert!(status.success(), "{status:?}");
    let events = follow.all();
    let done = of(&events, &short, Kind::Completed);
    assert_eq!(done.len(), 1, "short task finished during the drain");
    assert_eq!(done[0].agent_id, "a1");
    let failed = of(&events, &long, Kind::Failed);
    assert_eq!(failed.len(), 1);
    assert_eq!(payload(failed[0])["error"]["reason"], "sidecar_shutdown");
    assert_eq!(failed[0].state, pb::task::State::Queued as i32, "re-queued");
    assert_eq!(a1.state()["tasks"], json!({}));

    let _a2 = cluster.sidecar("a2", &[], &[]);
    follow
        .until("a2 completed the stopped task", |ev| {
            !of(ev, &long, Kind::Completed).is_empty()
        })
        .await;
    let events = follow.all();
    assert_completed_once(&events, &tasks);
    assert_eq!(of(&events, &long, Kind::Completed)[0].agent_id, "a2");
    assert_eq!(
        cluster.output_lines(&long).len(),
        1,
        "the stopped command never wrote"
    );
    eprintln!(
        "smoke SIGTERM: sidecar exited {} ms after SIGTERM (shutdown grace 1.5 s)",
        ms(exited_in)
    );
}
