//! Smoke tests of failure and recovery with real processes: `kill -9` of a
//! sidecar or of the hub, and sidecars restarted on their state file.

use std::time::{Duration, Instant};

use agenthub::pb;
use agenthub::pb::task_event::Kind;

use super::harness::*;

/// `kill -9` a sidecar while it runs a task: after the reconnect grace the
/// hub reclaims the task and the other sidecar completes it. One COMPLETED
/// per task, nothing lost. The task was in the killed sidecar's state file
/// (written before `task_accepted`).
#[tokio::test]
async fn smoke_killed_sidecar_task_completes_on_the_other() {
    let cluster = Cluster::start(&["--reconnect-grace", "1s"]).await;
    // On a1 the script stalls, so a1 is mid-task when it dies.
    let mut a1 = cluster.sidecar("a1", &[], &[("STALL", "30")]);
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let script = format!(r#"sleep "${{STALL:-0.2}}"; {WRITE_ID}"#);
    let victim = cluster
        .push(&mut client, &script, pb::Priority::Normal)
        .await;
    follow
        .until("a1 accepted", |ev| {
            of(ev, &victim, Kind::Accepted)
                .iter()
                .any(|e| e.agent_id == "a1")
        })
        .await;

    let _a2 = cluster.sidecar("a2", &[], &[]);
    cluster.wait_connected(&["a2"]).await;
    let mut tasks = vec![victim.clone()];
    for _ in 0..3 {
        tasks.push(
            cluster
                .push(&mut client, &script, pb::Priority::Normal)
                .await,
        );
    }

    // The task was in a1's state file before a1 accepted it; its pid right after.
    assert_eq!(a1.state()["tasks"][&victim]["generation"], 1);
    let orphan = a1.recorded_pid(&victim).await;
    let killed_at = Instant::now();
    a1.kill9().await;
    follow
        .until("4 tasks completed", |ev| {
            count_with(ev, &tasks, Kind::Completed) == 4
        })
        .await;
    let recovered_in = follow.arrived(&victim, Kind::Completed).unwrap() - killed_at;

    let events = follow.all();
    assert_completed_once(&events, &tasks);
    let done = of(&events, &victim, Kind::Completed)[0];
    assert_eq!(done.agent_id, "a2");
    assert_eq!(done.generation, 2);
    let reclaimed = of(&events, &victim, Kind::Reclaimed);
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(payload(reclaimed[0])["reason"], "agent_disconnected");
    for t in &tasks {
        assert_eq!(cluster.output_lines(t).len(), 1, "output of {t}");
    }
    // The killed sidecar's command outlived it (a restarted sidecar would
    // adopt it); stop it so it never writes.
    assert!(
        pid_alive(orphan),
        "the command of the killed sidecar is still running"
    );
    signal(format!("-{orphan}"), "KILL");
    eprintln!(
        "smoke kill -9 sidecar: task completed on a2 {} ms after the kill (reconnect grace 1 s)",
        ms(recovered_in)
    );
}

/// `kill -9` the hub mid-run and restart it on the same data dir and ports:
/// the sidecars (never restarted) reconnect on their own and every task
/// completes exactly once.
#[tokio::test]
async fn smoke_hub_killed_mid_run_sidecars_reconnect_and_finish() {
    let mut cluster =
        Cluster::start(&["--reconnect-grace", "20s", "--accept-timeout", "20s"]).await;
    let mut a1 = cluster.sidecar("a1", &["--max-concurrency", "2"], &[]);
    let mut a2 = cluster.sidecar("a2", &["--max-concurrency", "2"], &[]);
    cluster.wait_connected(&["a1", "a2"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let script = format!(r#"sleep 1.2; {WRITE_ID}"#);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        tasks.push(
            cluster
                .push(&mut client, &script, pb::Priority::Normal)
                .await,
        );
    }
    follow
        .until("4 tasks completed", |ev| {
            count_with(ev, &tasks, Kind::Completed) >= 4
        })
        .await;
    let before = follow.all();
    let completed_before = count_with(&before, &tasks, Kind::Completed);
    drop(follow);

    let killed_at = Instant::now();
    cluster.kill_and_restart_hub().await;
    let restarted_in = killed_at.elapsed();
    cluster.wait_connected(&["a1", "a2"]).await;
    let reconnected_in = killed_at.elapsed();
    let mut client = cluster.client().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let page = client
            .list_tasks(pb::ListTasksRequest {
                state: pb::task::State::Completed as i32,
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.tasks.len() == tasks.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 12 completed after the restart",
            page.tasks.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_done_in = killed_at.elapsed();

    assert!(
        a1.is_running() && a2.is_running(),
        "the sidecars were never restarted"
    );
    let history = cluster.history().await;
    assert_completed_once(&history, &tasks);
    for t in &tasks {
        assert_eq!(
            cluster.output_lines(t).len(),
            1,
            "task {t} ran exactly once"
        );
    }
    let recovering = history
        .iter()
        .filter(|e| e.kind == Kind::Recovering as i32)
        .count();
    eprintln!(
        "smoke kill -9 hub: {completed_before}/12 done before the kill; hub back in {} ms; sidecars reconnected {} ms after the kill; \
         all 12 completed {} ms after the kill; {recovering} tasks recovered in flight",
        ms(restarted_in),
        ms(reconnected_in),
        ms(all_done_in)
    );
}

/// A sidecar killed with `kill -9` and restarted on the same state file
/// asks about its tasks (`task_recovering`); the hub says continue; it
/// reports the task whose command finished while it was down (from the
/// command's exit file) and waits for the one still running. Nothing runs
/// twice.
#[tokio::test]
async fn smoke_restarted_sidecar_continues_its_tasks() {
    let cluster = Cluster::start(&["--reconnect-grace", "20s"]).await;
    let mut a1 = cluster.sidecar("a1", &["--max-concurrency", "2"], &[]);
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let quick = cluster
        .push(
            &mut client,
            &format!("sleep 1; {WRITE_ID}"),
            pb::Priority::Normal,
        )
        .await;
    let slow = cluster
        .push(
            &mut client,
            &format!("sleep 3; {WRITE_ID}; echo slow-done"),
            pb::Priority::Normal,
        )
        .await;
    let tasks = vec![quick.clone(), slow.clone()];
    follow
        .until("both accepted", |ev| {
            count_with(ev, &tasks, Kind::Accepted) == 2
        })
        .await;
    a1.kill9().await;
    assert_eq!(
        count_with(&follow.all(), &tasks, Kind::Completed),
        0,
        "the sidecar was killed before any command finished"
    );
    // The quick command finishes while its sidecar is down.
    let deadline = Instant::now() + DEADLINE;
    while cluster.output_lines(&quick).is_empty() {
        assert!(Instant::now() < deadline, "quick command never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cluster.output_lines(&slow).is_empty(),
        "slow command still running"
    );
    a1.spawn();
    follow
        .until("both completed", |ev| {
            count_with(ev, &tasks, Kind::Completed) == 2
        })
        .await;

    let events = follow.all();
    assert_completed_once(&events, &tasks);
    for t in &tasks {
        assert_eq!(of(&events, t, Kind::Recovering).len(), 1, "{t} recovering");
        assert_eq!(of(&events, t, Kind::Continued).len(), 1, "{t} continued");
        assert_eq!(
            of(&events, t, Kind::Assigned).len(),
            1,
            "{t} never reassigned"
        );
        assert_eq!(
            cluster.output_lines(t),
            vec![format!("{t} 1")],
            "{t} ran once"
        );
        let done = of(&events, t, Kind::Completed)[0];
        assert_eq!((done.agent_id.as_str(), done.generation), ("a1", 1));
        assert_eq!(payload(done)["result"]["exit_code"], 0);
    }
    let slow_done = of(&events, &slow, Kind::Completed)[0];
    assert_eq!(payload(slow_done)["result"]["stdout"], "slow-done\n");
    let deadline = Instant::now() + DEADLINE;
    while !a1.state()["tasks"].as_object().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "state file still holds tasks: {}",
            a1.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `kill -9` a sidecar while its command runs and restart it after the
/// reconnect grace, on the same state file. The hub took the task back
/// (`agent_disconnected`) but gave it to nobody; the sidecar's
/// `task_recovering` (naming generation 1) gets it back under generation 2
/// (`task_continue`). The sidecar follows the command it left running, which
/// ran once (under generation 1), and reports its end under generation 2.
#[tokio::test]
async fn smoke_sidecar_killed_past_the_grace_continues_its_command_under_a_new_generation() {
    let cluster = Cluster::start(&["--reconnect-grace", "1s"]).await;
    let mut a1 = cluster.sidecar("a1", &[], &[]);
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    // The command runs until the test creates `$OUT/go`.
    let script =
        format!(r#"while [ ! -e "$OUT/go" ]; do sleep 0.02; done; {WRITE_ID}; echo went-on"#);
    let task = cluster
        .push(&mut client, &script, pb::Priority::Normal)
        .await;
    follow
        .until("a1 accepted", |ev| {
            !of(ev, &task, Kind::Accepted).is_empty()
        })
        .await;
    let orphan = a1.recorded_pid(&task).await;
    a1.kill9().await;
    follow
        .until("reclaimed after the grace", |ev| {
            !of(ev, &task, Kind::Reclaimed).is_empty()
        })
        .await;
    assert!(pid_alive(orphan), "the command outlived its sidecar");

    a1.spawn();
    follow
        .until("given back", |ev| {
            !of(ev, &task, Kind::Continued).is_empty()
        })
        .await;
    // The sidecar takes the new generation for its record; the run keeps
    // its directory (named by generation 1).
    let deadline = Instant::now() + DEADLINE;
    while a1.state()["tasks"][&task]["generation"] != 2 {
        assert!(
            Instant::now() < deadline,
            "the state file never took generation 2: {}",
            a1.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a1.state()["tasks"][&task]["run_generation"], 1);
    assert_eq!(a1.state()["tasks"][&task]["pid"], orphan);
    std::fs::write(cluster.out.join("go"), "").unwrap();
    follow
        .until("task completed", |ev| {
            !of(ev, &task, Kind::Completed).is_empty()
        })
        .await;

    let events = follow.all();
    assert_completed_once(&events, std::slice::from_ref(&task));
    let reclaimed = of(&events, &task, Kind::Reclaimed);
    assert_eq!(payload(reclaimed[0])["reason"], "agent_disconnected");
    assert_eq!(
        of(&events, &task, Kind::Assigned).len(),
        1,
        "never reassigned"
    );
    let continued = of(&events, &task, Kind::Continued);
    assert_eq!((continued.len(), continued[0].generation), (1, 2));
    assert_eq!(
        payload(continued[0]),
        serde_json::json!({"reason": "still_running", "previous_generation": 1})
    );
    let done = of(&events, &task, Kind::Completed)[0];
    assert_eq!((done.agent_id.as_str(), done.generation), ("a1", 2));
    assert_eq!(payload(done)["result"]["stdout"], "went-on\n");
    assert_eq!(
        cluster.output_lines(&task),
        vec![format!("{task} 1")],
        "the command ran once"
    );
    // Forgotten once acked: the record, then the run's directory.
    let runs = a1.state_file.with_extension("json.tasks");
    let deadline = Instant::now() + DEADLINE;
    while !a1.state()["tasks"].as_object().unwrap().is_empty()
        || std::fs::read_dir(&runs).unwrap().count() > 0
    {
        assert!(
            Instant::now() < deadline,
            "the sidecar still holds the task: {}",
            a1.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sidecar restarted after the hub gave its task to another sidecar:
/// `task_recovering` → `task_reassign`; it stops the command it left running
/// and forgets the task. Exactly one completion, by the other sidecar.
#[tokio::test]
async fn smoke_restarted_sidecar_drops_a_reassigned_task() {
    let cluster = Cluster::start(&["--reconnect-grace", "1s"]).await;
    let mut a1 = cluster.sidecar("a1", &[], &[("STALL", "30")]);
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let script = format!(r#"sleep "${{STALL:-0.2}}"; {WRITE_ID}"#);
    let task = cluster
        .push(&mut client, &script, pb::Priority::Normal)
        .await;
    follow
        .until("a1 accepted", |ev| {
            !of(ev, &task, Kind::Accepted).is_empty()
        })
        .await;
    let orphan = a1.recorded_pid(&task).await;
    a1.kill9().await;
    let _a2 = cluster.sidecar("a2", &[], &[]);
    follow
        .until("a2 completed", |ev| {
            !of(ev, &task, Kind::Completed).is_empty()
        })
        .await;
    assert!(pid_alive(orphan), "a1's command outlived a1");

    a1.spawn();
    let deadline = Instant::now() + DEADLINE;
    while !a1.state()["tasks"].as_object().unwrap().is_empty() || pid_alive(orphan) {
        assert!(
            Instant::now() < deadline,
            "a1 kept the task or its command: {}",
            a1.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.wait_connected(&["a1"]).await;
    let events = follow.all();
    assert_completed_once(&events, std::slice::from_ref(&task));
    assert_eq!(of(&events, &task, Kind::Completed)[0].agent_id, "a2");
    assert_eq!(cluster.output_lines(&task), vec![format!("{task} 2")]);
    let log = std::fs::read_to_string(&a1.log).unwrap();
    assert!(
        log.contains("hub reassigned the task"),
        "a1 got task_reassign"
    );
}

/// The log lines of a sidecar that contain `message`.
fn log_lines(sidecar: &SidecarProc, message: &str) -> Vec<String> {
    std::fs::read_to_string(&sidecar.log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(message))
        .map(str::to_string)
        .collect()
}

/// `--hub` with two URLs, the first one unreachable: the sidecar's next
/// attempt goes to the second URL, where it identifies and runs a task.
#[tokio::test]
async fn smoke_sidecar_with_two_hub_urls_skips_the_unreachable_one() {
    let cluster = Cluster::start(&[]).await;
    let dead = format!("ws://{}/ws", unused_addr());
    let hubs = format!("{dead},{}", cluster.ws_url());
    let a1 = cluster.sidecar_at(
        &hubs,
        "a1",
        &["--backoff-initial", "100ms", "--backoff-max", "200ms"],
        &[],
    );
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    let task = cluster
        .push(&mut client, WRITE_ID, pb::Priority::Normal)
        .await;
    follow
        .until("task completed", |ev| {
            !of(ev, &task, Kind::Completed).is_empty()
        })
        .await;
    assert_eq!(of(&follow.all(), &task, Kind::Completed)[0].agent_id, "a1");
    assert_eq!(cluster.output_lines(&task), vec![format!("{task} 1")]);

    let unreachable = log_lines(&a1, "cannot reach the hub");
    assert!(
        unreachable.first().is_some_and(|l| l.contains(&dead)),
        "the first attempt went to the first URL: {unreachable:?}"
    );
    let connected = log_lines(&a1, "connected to the hub");
    assert!(
        connected.len() == 1 && connected[0].contains(&cluster.ws_url()),
        "identified on the second URL: {connected:?}"
    );
}

/// `--hub A,B`: the sidecar runs a task on the hub at A; the hub is killed
/// and comes back (same data) at B while the command finishes. The sidecar's
/// next attempt goes to B, where it resends the pending report: the task
/// completes once, by its first run.
#[tokio::test]
async fn smoke_sidecar_follows_the_hub_to_its_second_url_and_resends_its_report() {
    let mut cluster =
        Cluster::start(&["--reconnect-grace", "20s", "--accept-timeout", "20s"]).await;
    let first = cluster.ws_url();
    let moved_to = unused_addr();
    let second = format!("ws://{moved_to}/ws");
    let a1 = cluster.sidecar_at(
        &format!("{first},{second}"),
        "a1",
        &["--backoff-initial", "100ms", "--backoff-max", "200ms"],
        &[],
    );
    cluster.wait_connected(&["a1"]).await;
    let follow = Follow::start(&cluster).await;
    let mut client = cluster.client().await;
    // The command runs until the test creates `$OUT/go`.
    let script = format!(r#"while [ ! -e "$OUT/go" ]; do sleep 0.02; done; {WRITE_ID}"#);
    let task = cluster
        .push(&mut client, &script, pb::Priority::Normal)
        .await;
    follow
        .until("a1 accepted", |ev| {
            !of(ev, &task, Kind::Accepted).is_empty()
        })
        .await;
    drop(follow);

    cluster.kill_hub().await;
    std::fs::write(cluster.out.join("go"), "").unwrap();
    let deadline = Instant::now() + DEADLINE;
    while cluster.output_lines(&task).is_empty() {
        assert!(Instant::now() < deadline, "the command never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.restart_hub_at(moved_to).await;
    assert_eq!(cluster.ws_url(), second);

    let follow = Follow::start(&cluster).await;
    follow
        .until("task completed", |ev| {
            !of(ev, &task, Kind::Completed).is_empty()
        })
        .await;
    let events = follow.all();
    assert_completed_once(&events, std::slice::from_ref(&task));
    let done = of(&events, &task, Kind::Completed)[0];
    assert_eq!((done.agent_id.as_str(), done.generation), ("a1", 1));
    assert_eq!(cluster.output_lines(&task), vec![format!("{task} 1")]);
    let connected = log_lines(&a1, "connected to the hub");
    assert!(
        connected.len() >= 2
            && connected[0].contains(&first)
            && connected.last().unwrap().contains(&second),
        "identified at A, then at B: {connected:?}"
    );
}
