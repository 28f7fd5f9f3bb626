//! Setting up: the log stream and the token bucket in NATS (retried while
//! a starting cluster times out), then opening the store on them.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::jetstream::{kv, stream};
use tokio::sync::{mpsc, watch};

use super::follower::follow;
use super::retry::{retrying, SETUP_TIMEOUT};
use super::tokens::{follow_tokens, token_bucket};
use super::writer::{watch_copy, writer};
use super::{ClusterStore, Part, Shared};
use crate::cluster::{nats_err, Node, STREAM};
use crate::error::{Error, Result};
use crate::store::copy::Applier;
use crate::store::sqlite::SqliteStore;
use crate::store::CommitStats;

/// Create (or find) the log stream and the token bucket: the log's id and the bucket.
async fn setup(node: &Node) -> Result<(String, kv::Store)> {
    let opts = &node.options;
    let mut metadata = HashMap::new();
    metadata.insert(
        "agenthub_log_id".to_string(),
        format!("log-{}", hex::encode(rand::random::<[u8; 8]>())),
    );
    let config = stream::Config {
        name: STREAM.to_string(),
        subjects: vec!["agenthub.log.>".to_string()],
        storage: stream::StorageType::File,
        num_replicas: opts.replicas,
        allow_atomic_publish: true,
        allow_direct: true,
        metadata,
        ..Default::default()
    };
    let stream = node
        .js
        .get_or_create_stream(config)
        .await
        .map_err(|e| nats_err("cannot create the log stream", e))?;
    let info = stream
        .get_info()
        .await
        .map_err(|e| nats_err("cannot read the log stream", e))?;
    let log_id = info
        .config
        .metadata
        .get("agenthub_log_id")
        .cloned()
        .ok_or_else(|| {
            Error::storage(format!(
                "stream {STREAM} exists but was not made by agenthub (no agenthub_log_id)"
            ))
        })?;
    let token_kv = token_bucket(&node.js, opts.replicas).await?;
    Ok((log_id, token_kv))
}

impl ClusterStore {
    /// Create (or find) the stream and token bucket, open the local copy in
    /// `dir`, and start following the log. Returns once the copy has caught
    /// up with the log's head as it was at the start.
    pub async fn open(node: Arc<Node>, dir: &std::path::Path) -> Result<Arc<ClusterStore>> {
        Self::open_with_faults(node, dir, None).await
    }

    /// [`ClusterStore::open`] with fault injection on the local copy (tests,
    /// fault drills).
    pub async fn open_with_faults(
        node: Arc<Node>,
        dir: &std::path::Path,
        faults: Option<Arc<crate::store::Faults>>,
    ) -> Result<Arc<ClusterStore>> {
        let give_up = Instant::now() + SETUP_TIMEOUT;
        let (log_id, token_kv) = retrying(give_up, "cannot set up the log in NATS yet", || {
            setup(&node)
        })
        .await?;
        let replica = SqliteStore::open_replica_with_faults(dir, &log_id, faults.clone())?;
        let start = replica.log_position()?;
        let shared = Arc::new(Shared {
            node: node.clone(),
            rt: tokio::runtime::Handle::current(),
            apply_lock: tokio::sync::Mutex::new(()),
            refollow: watch::Sender::new(0),
            copy: Applier::new(Arc::new(replica)),
            head: watch::Sender::new(start),
            sent: AtomicU64::new(0),
            acked: watch::Sender::new(0),
            part: Mutex::new(Part::Follower),
            bus: Mutex::new(None),
            on_deposed: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            token_kv,
            stats: Mutex::new(CommitStats::default()),
            log_id,
            faults,
            ids: Default::default(),
        });
        follow_tokens(shared.clone()).await?;
        tokio::spawn(follow(shared.clone(), start));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(shared.clone(), rx));
        tokio::spawn(watch_copy(shared.clone()));
        let store = Arc::new(ClusterStore { shared, tx });
        retrying(give_up, "cannot catch up with the log yet", || {
            store.catch_up()
        })
        .await?;
        store.note_last_term().await;
        Ok(store)
    }
}
