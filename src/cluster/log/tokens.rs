//! Tokens on a cluster: the token bucket (a JetStream key-value store),
//! each node's cache of it kept by a watch, the token queries the store
//! answers from that cache, and [`TokenAdmin`] for managing tokens without
//! running a node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::retry::{retrying, SETUP_TIMEOUT};
use super::Shared;
use crate::cluster::{block_on, nats_err, TOKEN_BUCKET};
use crate::error::Result;
use crate::model::TokenRecord;

/// A token as kept in the token bucket (the record's hash is not serialized
/// with the record itself).
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct StoredToken {
    id: String,
    hash: String,
    role: crate::model::Role,
    agent_id: Option<String>,
    created_at_ms: i64,
    revoked: bool,
}

impl StoredToken {
    pub(super) fn of(r: &TokenRecord) -> StoredToken {
        StoredToken {
            id: r.id.clone(),
            hash: r.hash.clone(),
            role: r.role,
            agent_id: r.agent_id.clone(),
            created_at_ms: r.created_at_ms,
            revoked: r.revoked,
        }
    }

    fn record(&self) -> TokenRecord {
        TokenRecord {
            id: self.id.clone(),
            hash: self.hash.clone(),
            role: self.role,
            agent_id: self.agent_id.clone(),
            created_at_ms: self.created_at_ms,
            revoked: self.revoked,
        }
    }
}

/// Create (or open) the token bucket.
pub(super) async fn token_bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store> {
    js.create_key_value(kv::Config {
        bucket: TOKEN_BUCKET.to_string(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_err("cannot open the token bucket", e))
}

/// Every token in the bucket.
async fn read_tokens(kv: &kv::Store) -> Result<Vec<StoredToken>> {
    let mut keys = kv.keys().await.map_err(|e| nats_err("token bucket", e))?;
    let mut out = Vec::new();
    while let Some(Ok(key)) = keys.next().await {
        if let Ok(Some(v)) = kv.get(&key).await {
            if let Ok(t) = serde_json::from_slice::<StoredToken>(&v) {
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// Keep the token cache equal to the token bucket.
pub(super) async fn follow_tokens(shared: Arc<Shared>) -> Result<()> {
    // A watch of every change, then the current values (read directly: the
    // watch's own replay of them ends with a marker we cannot see here).
    // Retried like the rest of the setup: a starting cluster may time out.
    let give_up = Instant::now() + SETUP_TIMEOUT;
    let (mut watch, tokens) = retrying(give_up, "cannot read the token bucket yet", || async {
        let watch = shared
            .token_kv
            .watch_with_history(">")
            .await
            .map_err(|e| nats_err("token bucket", e))?;
        Ok((watch, read_tokens(&shared.token_kv).await?))
    })
    .await?;
    for t in tokens {
        shared
            .tokens
            .lock()
            .expect("tokens")
            .insert(t.id.clone(), t);
    }
    tokio::spawn(async move {
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { continue };
            if entry.operation != kv::Operation::Put {
                shared.tokens.lock().expect("tokens").remove(&entry.key);
                continue;
            }
            if let Ok(t) = serde_json::from_slice::<StoredToken>(&entry.value) {
                shared
                    .tokens
                    .lock()
                    .expect("tokens")
                    .insert(t.id.clone(), t);
            }
        }
    });
    Ok(())
}

impl Shared {
    pub(super) fn put_token(&self, t: StoredToken) -> Result<()> {
        let kv = self.token_kv.clone();
        let stored = t.clone();
        block_on(&self.rt, async move { store_token(&kv, &stored).await })?;
        self.tokens.lock().expect("tokens").insert(t.id.clone(), t);
        Ok(())
    }

    pub(super) fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let found = |tokens: &HashMap<String, StoredToken>| {
            tokens
                .values()
                .find(|t| t.hash == hash)
                .map(StoredToken::record)
        };
        if let Some(r) = found(&self.tokens.lock().expect("tokens")) {
            return Ok(Some(r));
        }
        // Issued a moment ago on another node: read the bucket itself.
        let id = format!("tok-{}", &hash[..12.min(hash.len())]);
        let kv = self.token_kv.clone();
        let got = block_on(&self.rt, async move { kv.get(id).await })
            .map_err(|e| nats_err("token bucket", e))?;
        let Some(v) = got else { return Ok(None) };
        let Ok(t) = serde_json::from_slice::<StoredToken>(&v) else {
            return Ok(None);
        };
        let mut tokens = self.tokens.lock().expect("tokens");
        tokens.insert(t.id.clone(), t);
        Ok(found(&tokens))
    }

    pub(super) fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let tokens = self.tokens.lock().expect("tokens");
        let mut out: Vec<TokenRecord> = tokens.values().map(StoredToken::record).collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(out)
    }

    pub(super) fn revoke_token(&self, id: &str) -> Result<bool> {
        let current = self.tokens.lock().expect("tokens").get(id).map(|t| {
            let mut r = t.record();
            r.revoked = true;
            StoredToken::of(&r)
        });
        match current {
            Some(t) => {
                self.put_token(t)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Store `t` in the token bucket. A bucket just created may not have a
/// leader yet, or not be known to every server: retry a while.
async fn store_token(kv: &kv::Store, t: &StoredToken) -> Result<()> {
    let value = Bytes::from(serde_json::to_vec(t).expect("token serializes"));
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        match kv.put(t.id.clone(), value.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < give_up => {
                tracing::debug!(error = %e, "token not stored yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(nats_err("token bucket", e)),
        }
    }
}

/// How long `agenthub token ... --nats` retries opening the token bucket.
const TOKEN_ADMIN_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Issue, list and revoke tokens on a cluster without running a node
/// (`agenthub token ... --nats`).
pub struct TokenAdmin {
    kv: kv::Store,
}

impl TokenAdmin {
    pub async fn connect(options: &crate::cluster::ClusterOptions) -> Result<TokenAdmin> {
        let client = options.connect().await?;
        let js = jetstream::new(client);
        let give_up = Instant::now() + TOKEN_ADMIN_SETUP_TIMEOUT;
        let kv = retrying(give_up, "cannot open the token bucket yet", || {
            token_bucket(&js, options.replicas)
        })
        .await?;
        Ok(TokenAdmin { kv })
    }

    pub async fn insert(&self, token: &TokenRecord) -> Result<()> {
        store_token(&self.kv, &StoredToken::of(token)).await
    }

    pub async fn list(&self) -> Result<Vec<TokenRecord>> {
        let mut out: Vec<TokenRecord> = read_tokens(&self.kv)
            .await?
            .iter()
            .map(StoredToken::record)
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(out)
    }

    pub async fn revoke(&self, id: &str) -> Result<bool> {
        let Some(v) = self
            .kv
            .get(id)
            .await
            .map_err(|e| nats_err("token bucket", e))?
        else {
            return Ok(false);
        };
        let mut t: StoredToken =
            serde_json::from_slice(&v).map_err(|e| nats_err("token bucket", e))?;
        t.revoked = true;
        store_token(&self.kv, &t).await?;
        Ok(true)
    }
}
