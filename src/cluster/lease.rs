//! The leader lease: one KV entry (`leader` in [`LEASE_BUCKET`]) whose
//! bucket keeps values for one lease. The holder renews it by
//! compare-and-set every third of a lease; the others read it every eighth
//! of a lease and, once it is gone, try to create it (only one can). The
//! winner then fences the log ([`ClusterStore::promote`]) before it decides
//! anything: the lease says who should lead, the log's fence makes sure
//! nobody else still writes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::{kv, stream};

use super::log::ClusterStore;
use super::{LeaderView, Node, LEASE_BUCKET};
use crate::hub::Hub;

const KEY: &str = "leader";

async fn bucket(node: &Node) -> kv::Store {
    let mut backoff = Duration::from_millis(100);
    loop {
        let made = node
            .js
            .create_key_value(kv::Config {
                bucket: LEASE_BUCKET.to_string(),
                history: 1,
                max_age: node.options.lease,
                storage: stream::StorageType::File,
                num_replicas: node.options.replicas,
                ..Default::default()
            })
            .await;
        match made {
            Ok(kv) => return kv,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the lease bucket; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Sleep for `d`, or less if the node starts shutting down.
async fn pause(d: Duration, stopping: &mut tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stopping.changed() => {}
    }
}

fn holder(value: &str) -> String {
    value.split('/').next().unwrap_or("").to_string()
}

/// Take part in leader election until the process ends.
pub async fn run(node: Arc<Node>, store: Arc<ClusterStore>, hub: Weak<Hub>) {
    let lease = node.options.lease;
    let kv = bucket(&node).await;
    let mut held: Option<(u64, String)> = None;
    // When the held lease was last written (taken before the write: the
    // entry expires one lease after the server stored it, never sooner).
    let mut written_at = tokio::time::Instant::now();
    let mut stopping = node.stopping.subscribe();
    loop {
        if *stopping.borrow_and_update() {
            if let Some((rev, _)) = held.take() {
                store.demote("shutting down");
                let _ = kv.delete_expect_revision(KEY, Some(rev)).await;
                tracing::info!("leader lease handed back");
            }
            node.forget_leader();
            return;
        }
        if held.is_some() && !store.is_leader() {
            // Deposed by the log (another node appended): let go.
            if let Some((rev, _)) = held.take() {
                let _ = kv.delete_expect_revision(KEY, Some(rev)).await;
            }
        }
        match held.clone() {
            Some((rev, value)) => {
                let attempt = tokio::time::Instant::now();
                match kv.update(KEY, value.clone().into(), rev).await {
                    Ok(next) => {
                        held = Some((next, value));
                        written_at = attempt;
                    }
                    // Not refused, just not answered (NATS settling, a
                    // server away): the lease is still ours until it
                    // expires, so try again while a try can land before that.
                    Err(e)
                        if e.kind() != kv::UpdateErrorKind::WrongLastRevision
                            && written_at.elapsed() + lease / 3 < lease =>
                    {
                        tracing::warn!(error = %e, "leader lease not renewed yet; retrying");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "leader lease lost");
                        held = None;
                        step_down(&node, &store, "leader lease lost");
                    }
                }
                pause(lease / 3, &mut stopping).await;
            }
            None => {
                match kv.entry(KEY).await {
                    Ok(Some(e)) if e.operation == kv::Operation::Put => {
                        let value = String::from_utf8_lossy(&e.value).into_owned();
                        node.see_leader(LeaderView {
                            leader: Some(holder(&value)),
                            leadership: Some(value.clone()),
                            is_self: false,
                        });
                    }
                    Ok(_) => {
                        let attempt = tokio::time::Instant::now();
                        if let Some(won) = try_lead(&node, &store, &kv).await {
                            held = Some(won);
                            written_at = attempt;
                            if let Some(hub) = hub.upgrade() {
                                hub.take_writes();
                            }
                            continue;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
                }
                pause(lease / 8, &mut stopping).await;
            }
        }
    }
}

/// Create the lease entry and fence the log. `Some((revision, value))` if
/// this node now leads.
async fn try_lead(node: &Node, store: &ClusterStore, kv: &kv::Store) -> Option<(u64, String)> {
    let value = format!(
        "{}/{}",
        node.node_id(),
        hex::encode(rand::random::<[u8; 6]>())
    );
    let rev = kv.create(KEY, value.clone().into()).await.ok()?;
    match tokio::time::timeout(node.options.lease / 2, store.promote(&value)).await {
        Ok(Ok(term)) => {
            tracing::info!(node_id = node.node_id(), term, "elected leader");
            node.see_leader(LeaderView {
                leader: Some(node.node_id().to_string()),
                leadership: Some(value.clone()),
                is_self: true,
            });
            Some((rev, value))
        }
        outcome => {
            let why = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_string(),
            };
            tracing::warn!(reason = %why, "won the lease but could not fence the log; letting go");
            store.demote("could not fence the log");
            let _ = kv.delete_expect_revision(KEY, Some(rev)).await;
            None
        }
    }
}

/// The lease is lost. Demoting the store tells the hub (the store's
/// `on_deposed`), which steps down once.
fn step_down(node: &Node, store: &ClusterStore, why: &str) {
    store.demote(why);
    node.forget_leader();
}
