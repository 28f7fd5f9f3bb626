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

/// How long a token the store does not know is answered from memory.
/// Tokens are random: a token issued later was never tried before it.
pub const UNKNOWN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Most unknown tokens remembered (the oldest half goes when full).
pub const MAX_UNKNOWN_TOKENS: usize = 10_000;
/// Store look-ups that find no token: a bucket of this many, refilled at
/// this many per second. While it is empty, a token not in memory is
/// refused without asking the store (`agenthub_token_lookups_refused_total`).
pub const UNKNOWN_LOOKUP_BURST: f64 = 20.0;
pub const UNKNOWN_LOOKUPS_PER_SEC: f64 = 20.0;

/// Tokens the store said it does not know, and the budget for asking it.
struct Unknown {
    seen: HashMap<String, Instant>,
    budget: f64,
    refilled: Instant,
}

impl Unknown {
    fn new() -> Unknown {
        Unknown {
            seen: HashMap::new(),
            budget: UNKNOWN_LOOKUP_BURST,
            refilled: Instant::now(),
        }
    }

    /// Known to be unknown (recently)?
    fn known_unknown(&self, hash: &str) -> bool {
        self.seen
            .get(hash)
            .is_some_and(|at| at.elapsed() < UNKNOWN_TOKEN_TTL)
    }

    /// May the store be asked about a token not in memory? Only look-ups
    /// that find nothing spend the budget ([`Unknown::remember`]), so valid
    /// tokens are refused only while a flood of bad ones has spent it.
    fn may_look_up(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * UNKNOWN_LOOKUPS_PER_SEC;
        self.budget = (self.budget + refill).min(UNKNOWN_LOOKUP_BURST);
        self.refilled = now;
        self.budget >= 1.0
    }

    fn remember(&mut self, hash: String) {
        self.budget -= 1.0;
        if self.seen.len() >= MAX_UNKNOWN_TOKENS {
            let mut ages: Vec<Instant> = self.seen.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.seen.retain(|_, at| *at > cut);
        }
        self.seen.insert(hash, Instant::now());
    }
}

/// Counts of what the verifier asked the store (for `/metrics`).
#[derive(Clone, Default)]
pub struct VerifierCounters {
    /// Token look-ups that reached the store.
    pub lookups: prometheus_client::metrics::counter::Counter,
    /// Unknown tokens refused without a look-up (budget spent).
    pub refused: prometheus_client::metrics::counter::Counter,
}

/// Verifies bearer tokens against the store, with a short positive cache, a
/// negative cache and a budget for look-ups of tokens it has not seen: a
/// flood of bad tokens costs memory look-ups, not store reads.
pub struct TokenVerifier {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
    /// Tokens the store did not know. A std mutex, never held across a
    /// store read.
    unknown: Mutex<Unknown>,
    revocations: Revocations,
    counters: VerifierCounters,
}

impl TokenVerifier {
    pub fn new(store: Arc<dyn Store>) -> TokenVerifier {
        Self::with_counters(store, VerifierCounters::default())
    }

    pub fn with_counters(store: Arc<dyn Store>, counters: VerifierCounters) -> TokenVerifier {
        TokenVerifier {
            store,
            cache: Mutex::new(HashMap::new()),
            unknown: Mutex::new(Unknown::new()),
            revocations: Revocations::default(),
            counters,
        }
    }

    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Issue a token (admin API).
    pub fn issue(&self, role: Role, agent_id: Option<String>) -> Result<(String, TokenRecord)> {
        let (secret, record) = issue_token(&*self.store, role, agent_id)?;
        self.lock_unknown().seen.remove(&record.hash);
        Ok((secret, record))
    }

    fn lock_unknown(&self) -> std::sync::MutexGuard<'_, Unknown> {
        self.unknown.lock().unwrap_or_else(|e| e.into_inner())
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
    /// Valid tokens are taken into the cache too, so one issued without the
    /// hub is known within one poll even while bad tokens spend the
    /// look-up budget.
    pub fn refresh_revocations(&self) -> Result<()> {
        let tokens = self.store.list_tokens()?;
        let ids = tokens
            .iter()
            .filter(|t| t.revoked)
            .map(|t| t.id.clone())
            .collect();
        self.revocations.set(ids);
        let now = Instant::now();
        let mut cache = self.cache.lock().expect("token cache");
        if cache.len() + tokens.len() > 10_000 {
            cache.clear();
        }
        for t in tokens.into_iter().filter(|t| !t.revoked) {
            let principal = Principal {
                token_id: t.id,
                role: t.role,
                agent_id: t.agent_id,
            };
            cache.insert(t.hash, (principal, now));
        }
        Ok(())
    }

    /// The principal behind `token`, or `Unauthenticated`.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        if token.is_empty() || token.len() > 256 {
            return Err(Error::Unauthenticated);
        }
        let hash = hash_token(token);
        let mut known = false;
        if let Some((p, at)) = self.cache.lock().expect("token cache").get(&hash) {
            if at.elapsed() < TOKEN_CACHE_TTL {
                if self.revocations.is_revoked(&p.token_id) {
                    return Err(Error::Unauthenticated);
                }
                return Ok(p.clone());
            }
            known = true;
        }
        // A token verified before is asked about again whatever the budget.
        if !known {
            let mut unknown = self.lock_unknown();
            if unknown.known_unknown(&hash) {
                return Err(Error::Unauthenticated);
            }
            if !unknown.may_look_up() {
                self.counters.refused.inc();
                return Err(Error::Unauthenticated);
            }
        }
        self.counters.lookups.inc();
        let Some(record) = self.find_token(&hash)? else {
            self.lock_unknown().remember(hash);
            return Err(Error::Unauthenticated);
        };
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

    /// The store's look-up of `hash`, off the tokio worker it is called
    /// on: callers are synchronous (the gRPC interceptor among them), so
    /// on the multi-threaded runtime the worker hands its other tasks to
    /// the others while it reads (`block_in_place`).
    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.store.find_token(hash))
            }
            _ => self.store.find_token(hash),
        }
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
    verifier: Arc<TokenVerifier>,
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
        let v = verifier.clone();
        match tokio::task::spawn_blocking(move || v.refresh_revocations()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot re-read revoked tokens"),
            Err(_) => return,
        }
    }
}
