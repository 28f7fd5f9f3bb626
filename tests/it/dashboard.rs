//! The web dashboard (SPEC §11): the page and gRPC-Web on the HTTP listener,
//! the committed bundle built from its current sources, and the page itself
//! driven in the system Chromium (`tests/dashboard/driver.mjs`, installed by
//! `scripts/test-deps.sh`). Screenshots go to `target/tmp/dashboard/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agenthub::auth::Role;
use agenthub::pb;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::helpers::*;

/// One browser at a time: the load case measures latency, and the machine
/// running the suite is small.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long one driver command may take (page waits have their own timeouts).
const DRIVER_TIMEOUT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard")
}

/// The dashboard in Chromium, remote-controlled through the driver script.
struct Page {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Page {
    /// Start Chromium on the hub's HTTP origin. Fails (never skips) when
    /// node, playwright-core or Chromium is missing.
    async fn open(hub: &TestHub) -> Page {
        let driver = repo().join("tests/dashboard/driver.mjs");
        let mut child = tokio::process::Command::new("node")
            .arg(&driver)
            .arg(hub.http_url("/"))
            .arg(screenshots())
            .current_dir(repo().join("tests/dashboard"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (scripts/test-deps.sh installs the dashboard test deps)");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut page = Page {
            child,
            stdin,
            lines,
        };
        page.call(json!({"op": "goto", "path": "/"})).await;
        page
    }

    async fn try_call(&mut self, cmd: Value) -> Result<Value, String> {
        // If the driver already exited (e.g. it could not start Chromium),
        // the write fails and the read below returns its last word.
        let _ = self.stdin.write_all(format!("{cmd}\n").as_bytes()).await;
        let reply = tokio::time::timeout(DRIVER_TIMEOUT, self.lines.next_line())
            .await
            .map_err(|_| format!("driver: no reply to {cmd} within {DRIVER_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("driver exited before answering {cmd}"))?;
        let reply: Value = serde_json::from_str(&reply).map_err(|e| format!("{e}: {reply}"))?;
        if reply["ok"] == true {
            Ok(reply["value"].clone())
        } else {
            Err(format!("{}: {}", cmd["op"], reply["error"]))
        }
    }

    async fn call(&mut self, cmd: Value) -> Value {
        match self.try_call(cmd).await {
            Ok(v) => v,
            Err(e) => {
                let _ = self.screenshot("failure").await;
                panic!("{e}")
            }
        }
    }

    async fn wait(&mut self, sel: &str) {
        self.call(json!({"op": "wait", "sel": sel})).await;
    }

    async fn wait_gone(&mut self, sel: &str) {
        self.call(json!({"op": "wait", "sel": sel, "state": "detached"}))
            .await;
    }

    async fn click(&mut self, sel: &str) {
        self.call(json!({"op": "click", "sel": sel})).await;
    }

    async fn fill(&mut self, sel: &str, text: &str) {
        self.call(json!({"op": "fill", "sel": sel, "text": text}))
            .await;
    }

    async fn text(&mut self, sel: &str) -> String {
        self.call(json!({"op": "text", "sel": sel}))
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn count(&mut self, sel: &str) -> u64 {
        self.call(json!({"op": "count", "sel": sel}))
            .await
            .as_u64()
            .unwrap()
    }

    async fn eval(&mut self, js: &str) -> Value {
        self.call(json!({"op": "eval", "js": js})).await
    }

    async fn screenshot(&mut self, name: &str) -> Result<Value, String> {
        self.try_call(json!({"op": "screenshot", "name": name}))
            .await
    }

    async fn sign_in(&mut self, token: &str) {
        self.fill("#token", token).await;
        self.click("#sign-in").await;
        self.wait("#connection.live").await;
    }

    async fn sign_out(&mut self) {
        self.click("#sign-out").await;
        self.wait("#token").await;
    }

    async fn show(&mut self, view: &str) {
        self.click(&format!("#tab-{view}")).await;
    }

    /// Open a task's detail through the search box (Enter on an exact id).
    async fn open_task(&mut self, task_id: &str) {
        self.show("tasks").await;
        self.fill("#filter-search", task_id).await;
        self.call(json!({"op": "press", "sel": "#filter-search", "key": "Enter"}))
            .await;
        self.wait(&format!(
            "#task-detail[data-task='{task_id}'] #detail-state"
        ))
        .await;
    }

    /// The page's counters (`window.agenthubStats`).
    async fn stats(&mut self) -> Value {
        self.eval("window.agenthubStats").await
    }

    /// Wait until the page has applied every event up to `seq`.
    async fn wait_seq(&mut self, seq: u64) {
        let js = format!(
            "new Promise((ok, no) => {{ const t0 = Date.now(); (function poll() {{ \
             const s = window.agenthubStats; if (s && s.lastSeq >= {seq}) return ok(s.lastSeq); \
             if (Date.now() - t0 > 10000) return no(new Error('page at seq ' + (s && s.lastSeq) + ', want {seq}')); \
             setTimeout(poll, 20); }})(); }})"
        );
        self.eval(&js).await;
    }

    async fn close(mut self) {
        let _ = self.try_call(json!({"op": "close"})).await;
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

/// The hub's last event seq, from `GET /health`.
async fn last_seq(hub: &TestHub) -> u64 {
    let (_, body) = http(
        hub,
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let health: Value = serde_json::from_slice(&body).unwrap();
    health["last_seq"].as_u64().unwrap()
}

/// `sha256sum`-style lines over the dashboard's sources, hashed: the same
/// list and format as `web/build.mjs`.
fn web_source_hash() -> String {
    let root = repo();
    let mut files = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    walk(&root.join("web/src"), &mut files);
    for f in [
        "index.html",
        "build.mjs",
        "package.json",
        "package-lock.json",
        "buf.gen.yaml",
        "tsconfig.json",
    ] {
        files.push(root.join("web").join(f));
    }
    files.push(root.join("proto/agenthub/v1/hub.proto"));
    let mut rel: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    rel.sort();
    let lines: String = rel
        .iter()
        .map(|p| {
            let bytes = std::fs::read(root.join(p)).unwrap();
            format!("{}  {p}\n", hex::encode(Sha256::digest(&bytes)))
        })
        .collect();
    hex::encode(Sha256::digest(lines.as_bytes()))
}

#[test]
fn dashboard_bundle_is_built_from_current_sources() {
    let built = agenthub::web::BUILD_HASH.trim();
    assert_eq!(
        built,
        web_source_hash(),
        "src/web/assets is older than web/ (or proto/): run `cd web && npm ci && npm run build` and commit the result"
    );
}

/// A raw HTTP/1.1 exchange (the test crate has no HTTP client).
async fn http(hub: &TestHub, request: &[u8]) -> (String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(hub.ws_addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).to_lowercase();
    (head, buf[split + 4..].to_vec())
}

/// A unary gRPC-Web call; returns the response head and body.
async fn grpc_web(hub: &TestHub, method: &str, token: Option<&str>) -> (String, Vec<u8>) {
    // An empty message: one uncompressed frame of length 0.
    let frame = [0u8, 0, 0, 0, 0];
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "POST /agenthub.v1.TaskHub/{method} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/grpc-web+proto\r\n\
         x-grpc-web: 1\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n",
        hub.ws_addr,
        frame.len()
    )
    .into_bytes();
    req.extend_from_slice(&frame);
    http(hub, &req).await
}

#[tokio::test]
async fn dashboard_page_and_grpc_web_are_served_on_the_http_listener() {
    let hub = TestHub::start().await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let (head, body) = http(&hub, get("/").as_bytes()).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("content-security-policy:"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("/assets/app.js"));
    for (path, ty) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
    ] {
        let (head, body) = http(&hub, get(path).as_bytes()).await;
        assert!(
            head.starts_with("http/1.1 200") && head.contains(ty),
            "{path}: {head}"
        );
        assert!(!body.is_empty(), "{path}");
    }

    // Revalidation by build hash.
    let etag = format!("\"{}\"", agenthub::web::BUILD_HASH.trim());
    let again = format!(
        "GET /assets/app.js HTTP/1.1\r\nhost: x\r\nif-none-match: {etag}\r\nconnection: close\r\n\r\n"
    );
    let (head, body) = http(&hub, again.as_bytes()).await;
    assert!(head.starts_with("http/1.1 304"), "{head}");
    assert!(body.is_empty());

    // gRPC-Web: the same service and auth as the gRPC listener.
    let viewer = hub.token(Role::Viewer, None);
    let (head, body) = grpc_web(&hub, "ListAgents", Some(&viewer)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: application/grpc-web"),
        "{head}"
    );
    let body = String::from_utf8_lossy(&body).to_lowercase();
    assert!(
        body.contains("grpc-status:0"),
        "trailers in the body: {body:?}"
    );

    // Errors: trailers-only responses, the status in the headers.
    let (head, _) = grpc_web(&hub, "ListAgents", None).await;
    assert!(
        head.contains("grpc-status: 16"),
        "no token: UNAUTHENTICATED: {head}"
    );
    let (head, _) = grpc_web(&hub, "CancelTask", Some(&viewer)).await;
    assert!(
        head.contains("grpc-status: 7"),
        "viewer write: PERMISSION_DENIED: {head}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_viewer_is_read_only_and_admin_can_act() {
    let _one = BROWSER.lock().await;
    let hub = TestHub::start().await;
    let mut sc = hub
        .sidecar_with(
            "builder",
            json!({"capabilities": ["rust"], "max_concurrency": 2}),
        )
        .await;
    let pushed = hub.client().await.push(pinned("builder", "compile")).await;
    let (id, generation) = sc.next_assign().await;
    assert_eq!(id, pushed.task_id);
    sc.accept(&id, generation).await;

    let mut page = Page::open(&hub).await;
    // A wrong token reads plainly, and nothing is kept.
    page.fill("#token", "not-a-token").await;
    page.click("#sign-in").await;
    page.wait("#login-error:has-text('wrong, expired or revoked')")
        .await;

    let viewer = hub.token(Role::Viewer, None);
    page.sign_in(&viewer).await;
    assert_eq!(page.text("#role").await, "read-only");
    assert_eq!(page.count("#tab-push").await, 0, "no Push for a viewer");
    page.wait("#fleet-table tr[data-agent='builder'] .badge.online")
        .await;
    page.wait("#feed li").await;
    let kept = page
        .eval(&format!(
            "sessionStorage.getItem('agenthub.token') === '{viewer}' && !location.href.includes('{viewer}')"
        ))
        .await;
    assert_eq!(kept, true, "the token lives in sessionStorage, not the URL");
    page.open_task(&id).await;
    assert_eq!(page.text("#detail-state").await, "RUNNING");
    assert_eq!(
        page.count("#cancel-task").await,
        0,
        "no Cancel for a viewer"
    );
    page.screenshot("viewer").await.unwrap();

    page.sign_out().await;
    page.sign_in(&hub.admin_token).await;
    assert_eq!(page.text("#role").await, "read + write");
    assert_eq!(page.count("#tab-push").await, 1);
    page.open_task(&id).await;
    page.wait("#cancel-task").await;
    page.close().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_new_sidecar_and_a_task_pushed_from_the_form_completes() {
    let _one = BROWSER.lock().await;
    let hub = TestHub::start().await;
    let orchestrator = hub.token(Role::Orchestrator, None);
    let mut page = Page::open(&hub).await;
    page.sign_in(&orchestrator).await;
    page.wait("#view p.empty").await;

    let mut sc = hub
        .sidecar_with(
            "docs-agent",
            json!({"capabilities": ["docs"], "max_concurrency": 3}),
        )
        .await;
    page.wait("#fleet-table tr[data-agent='docs-agent']").await;

    page.show("push").await;
    page.fill("#push-description", "write the release notes")
        .await;
    page.fill("#push-caps", "docs").await;
    page.click("#push-submit").await;
    page.wait("#push-result-task").await;
    let (id, generation) = sc.next_assign().await;
    assert_eq!(page.text("#push-result-task").await, id);
    sc.accept(&id, generation).await;
    sc.send(
        json!({"type": "task_progress", "task_id": id, "generation": generation, "progress": 50}),
    )
    .await;
    sc.complete(&id, generation, json!({"notes": "done"})).await;

    page.click("#push-result-task").await;
    page.wait("#detail-state.st-completed").await;
    assert!(page.text("#detail-result").await.contains("done"));
    page.wait("#timeline li[data-kind='PROGRESS']").await;
    page.wait(&format!("#feed li:has-text('{id}'):has-text('COMPLETED')"))
        .await;
    page.screenshot("pushed-and-completed").await.unwrap();

    // A second agent at work, and a task nobody can take: the fleet and
    // queue views say so.
    let mut gpu = hub
        .sidecar_with(
            "gpu-1",
            json!({"capabilities": ["gpu", "linux"], "max_concurrency": 2}),
        )
        .await;
    let mut client = hub.client_with(&orchestrator).await;
    client.push(pinned("gpu-1", "train the model")).await;
    let (id, generation) = gpu.next_assign().await;
    gpu.accept(&id, generation).await;
    client
        .push(scheduled("build for arm", &["arm64"], pb::Priority::High))
        .await;
    page.click("#task-detail button.close").await;
    page.show("queue").await;
    page.wait("#view li:has-text('no capable agent')").await;
    page.show("fleet").await;
    page.wait("#fleet-table tr[data-agent='gpu-1'] td.slots:has-text('1 / 2')")
        .await;
    page.screenshot("fleet").await.unwrap();
    page.close().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_cancels_a_running_task_and_retries_a_failed_one() {
    let _one = BROWSER.lock().await;
    let hub = TestHub::start().await;
    let mut sc = hub
        .sidecar_with("worker", json!({"max_concurrency": 2}))
        .await;
    let mut client = hub.client().await;
    let running = client.push(pinned("worker", "long job")).await.task_id;
    let (id, generation) = sc.next_assign().await;
    assert_eq!(id, running);
    sc.accept(&id, generation).await;
    let failing = client
        .push(pb::PushTaskRequest {
            max_attempts: 1,
            ..pinned("worker", "flaky job")
        })
        .await
        .task_id;
    let (id, generation) = sc.next_assign().await;
    assert_eq!(id, failing);
    sc.accept(&id, generation).await;
    sc.send(json!({"type": "task_failed", "task_id": id, "generation": generation, "error": "disk full"}))
        .await;
    assert_eq!(sc.recv_type("task_ack").await["status"], "failed");

    let mut page = Page::open(&hub).await;
    page.sign_in(&hub.admin_token).await;

    page.open_task(&running).await;
    page.click("#cancel-task").await;
    let cancelled = sc.recv_type("task_cancelled").await;
    assert_eq!(cancelled["task_id"], running.as_str());
    page.wait("#timeline li[data-kind='CANCELLED']").await;
    page.wait("#detail-state.st-cancelled").await;
    page.wait_gone("#cancel-task").await;
    page.wait("#retry-task").await;
    // The state filter pages finished tasks in from ListTasks.
    page.fill("#filter-search", "").await;
    page.call(json!({"op": "select", "sel": "#filter-state", "value": (pb::task::State::Cancelled as i32).to_string()}))
        .await;
    page.wait(&format!(".vrow[data-task='{running}']")).await;
    page.wait("#tasks-count:has-text('1 task')").await;

    page.open_task(&failing).await;
    page.wait("#detail-error:has-text('disk full')").await;
    page.click("#retry-task").await;
    page.wait("#timeline li[data-kind='RETRIED']").await;
    // Queued again, and assigned again: a second generation.
    let (again, generation) = sc.next_assign().await;
    assert_eq!(again, failing);
    assert_eq!(generation, 2);
    page.wait("#timeline h4:has-text('Generation 2')").await;
    page.screenshot("retried").await.unwrap();
    page.close().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_reconnects_after_a_hub_restart_and_resumes_without_duplicates() {
    let _one = BROWSER.lock().await;
    let hub = TestHub::start().await;
    let ws_addr = hub.ws_addr;
    let mut client = hub.client().await;
    for i in 0..5 {
        client
            .push(scheduled(&format!("before {i}"), &[], pb::Priority::Normal))
            .await;
    }
    let mut page = Page::open(&hub).await;
    page.sign_in(&hub.admin_token).await;
    page.wait_seq(last_seq(&hub).await).await;

    // Stop; restart on the same data dir and the same HTTP port.
    let tmp = hub.stop().await.unwrap();
    page.wait("#connection.reconnecting").await;
    page.wait("#banner:has-text('reconnecting')").await;
    page.screenshot("reconnecting").await.unwrap();
    let hub = TestHub::start_in(tmp.path(), |c| c.ws_addr = ws_addr).await;
    page.wait("#connection.live").await;
    let mut client = hub.client().await;
    for i in 0..5 {
        client
            .push(scheduled(&format!("after {i}"), &[], pb::Priority::Normal))
            .await;
    }
    let head = last_seq(&hub).await;
    assert_eq!(head, 10);
    page.wait_seq(head).await;

    let stats = page.stats().await;
    let seqs: Vec<u64> = serde_json::from_value(stats["seqs"].clone()).unwrap();
    assert_eq!(
        seqs,
        (1..=head).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    assert_eq!(stats["gaps"], 0);
    assert!(stats["reconnects"].as_u64().unwrap() >= 1);
    page.wait(&format!("#feed li[data-seq='{head}']")).await;
    let shown: Vec<u64> = serde_json::from_value(
        page.eval("[...document.querySelectorAll('#feed li')].map(li => Number(li.dataset.seq))")
            .await,
    )
    .unwrap();
    let mut unique = shown.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        shown.len(),
        "a seq shown twice in the feed: {shown:?}"
    );
    assert_eq!(unique, (1..=head).collect::<Vec<_>>());
    page.close().await;
    hub.stop().await;
    drop(tmp);
}

/// 10,000 queued tasks in the table, then 200 events/s for a few seconds:
/// event-to-screen p99 (hub timestamp → just after the frame that drew the
/// event is painted) must stay within 500 ms while the table scrolls.
///
/// The hub's data dir is in memory (/dev/shm where there is one): this
/// measures the page and the delivery path, not the fsync latency of a disk
/// shared with whatever else the machine is doing (that is the benchmarks').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_keeps_up_with_10k_tasks_and_200_events_per_second() {
    const TASKS: usize = 10_000;
    const RATE: u64 = 200;
    const SECONDS: u64 = 8;
    let _one = BROWSER.lock().await;
    let shm = Path::new("/dev/shm");
    let data = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let hub = TestHub::start_in(data.path(), |_| {}).await;

    // 10,000 tasks waiting for a capability nobody has yet.
    let client = hub.client().await;
    let mut pushers = Vec::new();
    for p in 0..8 {
        let mut c = client.clone();
        pushers.push(tokio::spawn(async move {
            for i in (p..TASKS).step_by(8) {
                c.push(scheduled(
                    &format!("load task {i}"),
                    &["load"],
                    pb::Priority::Normal,
                ))
                .await;
            }
        }));
    }
    for p in pushers {
        p.await.unwrap();
    }

    let mut page = Page::open(&hub).await;
    page.sign_in(&hub.admin_token).await;
    page.show("tasks").await;
    page.wait(&format!("#tasks-count:has-text('{TASKS} tasks')"))
        .await;

    // One sidecar takes 50 of them and reports progress at RATE events/s.
    let mut sc = hub
        .sidecar_with(
            "loader",
            json!({"capabilities": ["load"], "max_concurrency": 50}),
        )
        .await;
    let mut running = Vec::new();
    for _ in 0..50 {
        running.push(sc.next_assign().await);
    }
    for (id, generation) in &running {
        sc.accept(id, *generation).await;
    }
    page.wait_seq(last_seq(&hub).await).await;
    page.eval(
        "window.agenthubStats.latencies.length = 0; window.agenthubStats.arrivals.length = 0",
    )
    .await;

    // Scroll the table through the load; collect frame intervals.
    page.eval(
        "window.scrollFrames = []; (function scroll(t0) { const v = document.getElementById('tasks-viewport'); \
         let last = performance.now(); const end = last + 1000 * 60; \
         (function step(now) { window.scrollFrames.push(now - last); last = now; \
           v.scrollTop = (v.scrollTop + 90) % (v.scrollHeight - v.clientHeight); \
           if (!window.stopScroll && now < end) requestAnimationFrame(step); })(last); })()",
    )
    .await;

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let per_tick = RATE / 20;
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(SECONDS) {
        tick.tick().await;
        for _ in 0..per_tick {
            let (id, generation) = &running[(sent % running.len() as u64) as usize];
            sc.send(json!({"type": "task_progress", "task_id": id, "generation": generation, "progress": sent}))
                .await;
            sent += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let head = eventually(|| async {
        let s = last_seq(&hub).await;
        (s >= (TASKS as u64) + 100 + sent).then_some(s)
    })
    .await;
    page.wait_seq(head).await;
    page.eval("window.stopScroll = true").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    page.screenshot("load").await.unwrap();

    let stats = page.stats().await;
    let mut lat: Vec<f64> = serde_json::from_value(stats["latencies"].clone()).unwrap();
    let mut arrivals: Vec<f64> = serde_json::from_value(stats["arrivals"].clone()).unwrap();
    let mut frames: Vec<f64> =
        serde_json::from_value(page.eval("window.scrollFrames").await).unwrap();
    assert!(
        lat.len() as u64 >= sent,
        "{} latencies for {sent} events",
        lat.len()
    );
    lat.sort_by(f64::total_cmp);
    arrivals.sort_by(f64::total_cmp);
    frames.sort_by(f64::total_cmp);
    let pct =
        |v: &[f64], p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let (p50, p99, max) = (pct(&lat, 50.0), pct(&lat, 99.0), lat[lat.len() - 1]);
    let (f50, f99) = (pct(&frames, 50.0), pct(&frames, 99.0));
    let (a50, a99) = (pct(&arrivals, 50.0), pct(&arrivals, 99.0));
    println!(
        "dashboard load: {TASKS} tasks in the table, {sent} events in {elapsed:.1} s ({:.0}/s): \
         event-to-screen p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms \
         (of which hub and network: p50 {a50:.0} ms, p99 {a99:.0} ms); \
         scrolling frame interval p50 {f50:.0} ms, p99 {f99:.0} ms ({} frames)",
        sent as f64 / elapsed,
        frames.len()
    );
    assert_eq!(stats["gaps"], 0);
    assert!(p99 <= 500.0, "event-to-screen p99 {p99:.0} ms > 500 ms");
    for view in ["fleet", "queue", "charts"] {
        page.show(view).await;
        page.wait(&format!("#tab-{view}.active")).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        page.screenshot(&format!("load-{view}")).await.unwrap();
    }
    page.close().await;
    hub.stop().await;
    drop(data);
}

/// Revoke a token directly in the store (as `agenthub token revoke` does).
fn revoke(hub: &TestHub, token: &str) {
    use agenthub::store::Store;
    let store = agenthub::store::sqlite::SqliteStore::open(&hub.dir, None, false).unwrap();
    let hash = agenthub::auth::hash_token(token);
    let record = store
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.hash == hash)
        .expect("token issued");
    assert!(store.revoke_token(&record.id).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_signs_out_plainly_when_its_token_is_revoked() {
    let _one = BROWSER.lock().await;
    let hub = TestHub::start().await;
    let viewer = hub.token(Role::Viewer, None);
    let mut page = Page::open(&hub).await;
    page.sign_in(&viewer).await;
    revoke(&hub, &viewer);
    page.wait("#login-error:has-text('wrong, expired or revoked')")
        .await;
    let kept = page.eval("sessionStorage.getItem('agenthub.token')").await;
    assert_eq!(kept, Value::Null, "a revoked token is forgotten");
    page.close().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_starts_over_when_the_hub_serves_another_log() {
    use agenthub::store::Store;
    let _one = BROWSER.lock().await;
    let hub = TestHub::start().await;
    let ws_addr = hub.ws_addr;
    let mut client = hub.client().await;
    for i in 0..5 {
        client
            .push(scheduled(&format!("old {i}"), &[], pb::Priority::Normal))
            .await;
    }
    let mut page = Page::open(&hub).await;
    page.sign_in(&hub.admin_token).await;
    page.show("tasks").await;
    page.wait("#tasks-count:has-text('5 tasks')").await;

    // The same address and token, but a new store: another event log.
    let admin = hub.admin_token.clone();
    let hash = agenthub::auth::hash_token(&admin);
    let old_dir = hub.stop().await.unwrap();
    let record = agenthub::store::sqlite::SqliteStore::open(old_dir.path(), None, false)
        .unwrap()
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.hash == hash)
        .unwrap();
    let new_dir = tempfile::tempdir().unwrap();
    agenthub::store::sqlite::SqliteStore::open(new_dir.path(), None, false)
        .unwrap()
        .insert_token(&record)
        .unwrap();
    // A token table that is not empty: the hub bootstraps no admin token.
    std::fs::write(new_dir.path().join("admin.token"), &admin).unwrap();
    let hub = TestHub::start_in(new_dir.path(), |c| c.ws_addr = ws_addr).await;
    let mut client = hub.client_with(&admin).await;
    for i in 0..2 {
        client
            .push(scheduled(&format!("new {i}"), &[], pb::Priority::Normal))
            .await;
    }
    page.wait("#tasks-count:has-text('2 tasks')").await;
    page.wait("#feed li[data-seq='2']").await;
    assert_eq!(
        page.count("#feed li").await,
        2,
        "the old log's events are gone"
    );
    page.close().await;
    hub.stop().await;
    drop((old_dir, new_dir));
}

/// Task detail shows a task's dependencies and deadline, and its output as
/// it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_task_detail_shows_dependencies_and_live_output() {
    let _one = BROWSER.lock().await;
    let hub = TestHub::start().await;
    let mut sc = hub.sidecar("writer-1").await;
    let mut client = hub.client().await;
    let first = client.push(pinned("writer-1", "first")).await.task_id;
    let (id, generation) = sc.next_assign().await;
    assert_eq!(id, first);
    sc.accept(&id, generation).await;
    let second = client
        .push(pb::PushTaskRequest {
            depends_on: vec![first.clone()],
            deadline_ms: agenthub::model::now_ms() + 3_600_000,
            ..pinned("writer-1", "second")
        })
        .await
        .task_id;
    let out = |data: &str| json!({"type": "task_output", "task_id": first, "generation": generation, "stream": "stdout", "data": data});
    sc.send(out("building...\n")).await;

    let mut page = Page::open(&hub).await;
    page.sign_in(&hub.admin_token).await;
    page.open_task(&first).await;
    page.wait("#detail-output:has-text('building...')").await;
    sc.send(out("tests passed\n")).await;
    page.wait("#detail-output:has-text('tests passed')").await;
    page.screenshot("task-output").await.unwrap();

    page.open_task(&second).await;
    page.wait(&format!("#detail-depends-on:has-text('{first}')"))
        .await;
    assert!(page.text("#task-detail").await.contains("Deadline"));
    page.close().await;
    hub.stop().await;
}
