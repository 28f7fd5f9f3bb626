//! Tokens and roles. One [`TokenVerifier`]; gRPC, HTTP and WebSocket identify
//! are thin adapters over it.
//!
//! Tokens are 32 random bytes (64 hex), shown once, stored only as SHA-256
//! hashes, compared in constant time and never logged.
//!
//! Revocation reaches live sessions and streams through [`Revocations`]: the
//! set of revoked token ids, published on a `watch` channel. A revoke through
//! the hub ([`TokenVerifier::revoke`]) publishes at once; one made directly in
//! the data directory is picked up by [`poll_revocations`] (every
//! `Config::revocation_poll`, 1 s by default).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::model::now_ms;
pub use crate::model::{Role, TokenRecord};
use crate::store::Store;

/// How long a verified token is trusted without asking the store again
/// (so a revoked token stops working within this).
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(2);

/// An operation class checked against a role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// GetTask, ListTasks, ListAgents, WatchTaskEvents.
    Read,
    /// PushTask, CancelTask, RetryTask.
    Write,
    /// IssueToken, ListTokens, RevokeToken.
    Admin,
}

/// Who a verified token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub role: Role,
    pub agent_id: Option<String>,
}

impl Principal {
    /// Check an API operation (gRPC / HTTP). Agent tokens are for the WebSocket only.
    pub fn allow(&self, access: Access) -> Result<()> {
        match (self.role, access) {
            (Role::Admin, _)
            | (Role::Orchestrator, Access::Read | Access::Write)
            | (Role::Viewer, Access::Read) => Ok(()),
            (Role::Viewer, Access::Write) => {
                Err(Error::PermissionDenied("viewer tokens are read-only"))
            }
            (Role::Orchestrator | Role::Viewer, Access::Admin) => Err(Error::PermissionDenied(
                "token management needs an admin token",
            )),
            (Role::Agent, _) => Err(Error::PermissionDenied(
                "agent tokens are for the sidecar WebSocket only",
            )),
        }
    }
}

/// SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Create a token, store its hash, return `(secret, record)`. The secret is not kept.
pub fn issue_token(
    store: &dyn Store,
    role: Role,
    agent_id: Option<String>,
) -> Result<(String, TokenRecord)> {
    let (secret, record) = new_token(role, agent_id)?;
    store.insert_token(&record)?;
    Ok((secret, record))
}

/// A new token's secret and record (not stored yet).
pub fn new_token(role: Role, agent_id: Option<String>) -> Result<(String, TokenRecord)> {
    if (role == Role::Agent) != agent_id.is_some() {
        return Err(Error::InvalidArgument(
            "an agent token needs --agent, and only agent tokens take one".into(),
        ));
    }
    if agent_id.as_deref().is_some_and(str::is_empty) {
        return Err(Error::InvalidArgument("agent id must not be empty".into()));
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let hash = hash_token(&secret);
    let record = TokenRecord {
        id: format!("tok-{}", &hash[..12]),
        hash,
        role,
        agent_id,
        created_at_ms: now_ms(),
        revoked: false,
    };
    Ok((secret, record))
}

/// The ids of revoked tokens, watched by every live session and stream.
pub struct Revocations {
    /// The whole set; small (one id per revoked token).
    tx: watch::Sender<HashSet<String>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            tx: watch::channel(HashSet::new()).0,
        }
    }
}

impl Revocations {
    /// Mark one token id revoked.
    pub fn revoke(&self, id: &str) {
        self.tx.send_if_modified(|set| set.insert(id.to_string()));
    }

    /// Replace the set with what the store says (new ids wake their watchers).
    pub fn set(&self, ids: HashSet<String>) {
        self.tx.send_if_modified(|set| {
            if *set == ids {
                return false;
            }
            *set = ids;
            true
        });
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.tx.borrow().contains(id)
    }

    /// Resolves once token `id` is revoked.
    pub fn revoked(&self, id: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        let id = id.to_string();
        async move {
            if rx.wait_for(|set| set.contains(&id)).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Verifies bearer tokens against the store, with a short positive cache.
pub struct TokenVerifier {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
    revocations: Revocations,
}

impl TokenVerifier {
    pub fn new(store: Arc<dyn Store>) -> TokenVerifier {
        TokenVerifier {
            store,
            cache: Mutex::new(HashMap::new()),
            revocations: Revocations::default(),
        }
    }

    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Issue a token (admin API).
    pub fn issue(&self, role: Role, agent_id: Option<String>) -> Result<(String, TokenRecord)> {
        issue_token(&*self.store, role, agent_id)
    }

    /// Every token, secrets excluded (admin API).
    pub fn list(&self) -> Result<Vec<TokenRecord>> {
        self.store.list_tokens()
    }

    /// Revoke a token and end its live sessions and streams; false if unknown.
    pub fn revoke(&self, id: &str) -> Result<bool> {
        if !self.store.revoke_token(id)? {
            return Ok(false);
        }
        self.revocations.revoke(id);
        Ok(true)
    }

    /// Re-read the revoked ids from the store (revocations made without the hub).
    pub fn refresh_revocations(&self) -> Result<()> {
        let ids = self
            .store
            .list_tokens()?
            .into_iter()
            .filter(|t| t.revoked)
            .map(|t| t.id)
            .collect();
        self.revocations.set(ids);
        Ok(())
    }

    /// The principal behind `token`, or `Unauthenticated`.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        if token.is_empty() || token.len() > 256 {
            return Err(Error::Unauthenticated);
        }
        let hash = hash_token(token);
        if let Some((p, at)) = self.cache.lock().expect("token cache").get(&hash) {
            if at.elapsed() < TOKEN_CACHE_TTL {
                if self.revocations.is_revoked(&p.token_id) {
                    return Err(Error::Unauthenticated);
                }
                return Ok(p.clone());
            }
        }
        let record = self
            .store
            .find_token(&hash)?
            .ok_or(Error::Unauthenticated)?;
        // The lookup is by hash; compare the full stored hash in constant time anyway.
        if !bool::from(record.hash.as_bytes().ct_eq(hash.as_bytes())) || record.revoked {
            return Err(Error::Unauthenticated);
        }
        let principal = Principal {
            token_id: record.id,
            role: record.role,
            agent_id: record.agent_id,
        };
        let mut cache = self.cache.lock().expect("token cache");
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(hash, (principal.clone(), Instant::now()));
        Ok(principal)
    }

    /// Parse `Bearer <token>` and verify it.
    pub fn verify_bearer(&self, header: Option<&str>) -> Result<Principal> {
        let token = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(Error::Unauthenticated)?;
        self.verify(token)
    }
}

/// Re-read revocations every `every` until `shutdown` turns true, so a
/// `token revoke` run on the data directory reaches live sessions too.
pub async fn poll_revocations(
    hub: Arc<crate::hub::Hub>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let h = hub.clone();
        match tokio::task::spawn_blocking(move || h.verifier().refresh_revocations()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot re-read revoked tokens"),
            Err(_) => return,
        }
    }
}
