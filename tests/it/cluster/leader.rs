//! Only the leader acts: calls a follower forwards go to the current
//! leadership only, and a push the follower sends again after its leader
//! went away runs once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hubs::{HubCluster, DEADLINE};
use crate::helpers::{kind, pinned};
use crate::smoke::harness::signal;
use agenthub::pb;

/// Pushes without a `task_id` go through a follower, four at a time, while
/// the leader is paused (SIGSTOP) past its lease and then resumed. Every
/// push is answered (the follower waits for the next leader and sends the
/// push there again, with the id it gave it), and every push is executed
/// exactly once: one CREATED event per push, none for anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_through_a_follower_while_the_leader_is_paused_run_exactly_once() {
    const PUSHERS: usize = 4;
    const EACH: usize = 25;
    let c = HubCluster::start(3, &["--lease", "1s"]).await;
    let old = c.leader().await;
    let via = (old + 1) % 3;
    let pid = c.node(old).child.id().unwrap();
    let acked = Arc::new(AtomicUsize::new(0));
    let mut pushers = Vec::new();
    for p in 0..PUSHERS {
        let mut client = c.client(via).await;
        let acked = acked.clone();
        pushers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in 0..EACH {
                let mut req = pinned("nobody", &format!("push {p}/{k}"));
                req.queue_if_offline = true;
                let mut req = tonic::Request::new(req);
                req.set_timeout(Duration::from_secs(20));
                let resp = match client.push_task(req).await {
                    Ok(r) => r.into_inner(),
                    Err(s) => panic!("push {p}/{k} through n{via}: {s:?}"),
                };
                // A push the follower sent again after its first leader
                // went away answers created=false if that leader had run
                // it: the task exists once either way (checked below).
                ids.push(resp.task_id);
                acked.fetch_add(1, Ordering::SeqCst);
            }
            ids
        }));
    }
    // Pause the leader with pushes in flight, past its lease.
    let deadline = Instant::now() + DEADLINE;
    while acked.load(Ordering::SeqCst) < PUSHERS * 3 {
        assert!(Instant::now() < deadline, "no pushes acked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signal(pid, "STOP");
    let before = acked.load(Ordering::SeqCst);
    // Pushes go on through the next leader while the old one is paused.
    while acked.load(Ordering::SeqCst) < before + PUSHERS * 3 {
        assert!(
            Instant::now() < deadline,
            "pushes stopped while n{old} is paused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(pid, "CONT");
    let mut ids = Vec::new();
    for p in pushers {
        ids.extend(tokio::time::timeout(DEADLINE, p).await.unwrap().unwrap());
    }
    assert_eq!(ids.len(), PUSHERS * EACH);

    // The resumed node has read what was sent to it while paused; the
    // cluster agrees on one leader, and its log holds each push once.
    let new = c.leader().await;
    assert_ne!(new, old);
    let mut created: HashMap<String, usize> = HashMap::new();
    for ev in c.history(new).await {
        if kind(&ev) == pb::task_event::Kind::Created {
            *created.entry(ev.task_id.clone()).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(created.get(id), Some(&1), "{id}: {created:?}");
    }
    assert_eq!(
        created.len(),
        ids.len(),
        "tasks no push was answered with: {:?}",
        created
            .keys()
            .filter(|k| !ids.contains(k))
            .collect::<Vec<_>>()
    );
}

/// A follower SIGKILLed with 20 forwarded watch streams open: the leader
/// ends them and frees their watch slots within 2 × the lease (it hears no
/// keep-alive from that follower any more), so the token can watch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_follower_frees_its_forwarded_watches_on_the_leader() {
    const WATCHES: usize = 20;
    let lease = Duration::from_secs(1);
    let mut c = HubCluster::start(3, &["--lease", "1s", "--max-watches-per-token", "20"]).await;
    let leader = c.leader().await;
    let via = (leader + 1) % 3;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["token", "issue", "--role", "viewer", "--nats"])
        .arg(c.nats.url_list())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "token issue: {out:?}");
    let viewer = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let addrs: Vec<String> = (0..3).map(|i| c.node(i).grpc_addr.to_string()).collect();
    let watch = |i: usize| {
        let addr = addrs[i].clone();
        let token = viewer.clone();
        async move {
            let mut client = agenthub::client::connect(&addr, &token).await.unwrap();
            client.watch_agents(pb::ListAgentsRequest {}).await
        }
    };
    let mut open = Vec::new();
    for _ in 0..WATCHES {
        let mut s = watch(via).await.unwrap().into_inner();
        // The first list comes from the leader: it holds the slot now.
        tokio::time::timeout(DEADLINE, s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        open.push(s);
    }
    let full = watch(leader).await.unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full:?}");

    c.kill(via);
    let killed = Instant::now();
    let freed = loop {
        match watch(leader).await {
            Ok(_) => break killed.elapsed(),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(killed.elapsed() < DEADLINE, "slots never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("watch on the leader: {s:?}"),
        }
    };
    // 2 × the lease after the last keep-alive, which came before the kill
    // (plus a little for scheduling on a loaded machine).
    assert!(
        freed <= lease * 2 + Duration::from_millis(300),
        "slots freed {freed:?} after the kill"
    );
    drop(open);
}

/// A leader answers at most `--max-forwarded-calls` forwarded calls at
/// once (streams included): one more is refused with `UNAVAILABLE`, calls
/// made on the leader itself go on, and a slot given back (a stream ended
/// by its client) takes the next forwarded call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_answers_at_most_max_forwarded_calls_and_refuses_one_more() {
    const MOST: usize = 3;
    let c = HubCluster::start(3, &["--max-forwarded-calls", "3"]).await;
    let leader = c.leader().await;
    let via = (leader + 1) % 3;
    let mut through = c.client(via).await;
    let mut open = Vec::new();
    for _ in 0..MOST {
        let mut s = through
            .watch_agents(pb::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner();
        // The first list comes from the leader: the call holds a slot now.
        tokio::time::timeout(DEADLINE, s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        open.push(s);
    }
    let mut req = pinned("nobody", "one more");
    req.queue_if_offline = true;
    let err = through.push_task(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("too many forwarded calls"),
        "{err:?}"
    );
    // The leader's own callers are not forwarded: unaffected.
    let direct = c.client(leader).await.push_task(req.clone()).await.unwrap();
    assert!(direct.into_inner().created);

    drop(open.pop());
    let pushed = crate::helpers::eventually(|| {
        let mut through = through.clone();
        let req = req.clone();
        async move { through.push_task(req).await.ok() }
    })
    .await
    .into_inner();
    assert!(pushed.created);
}
