//! Tokens and roles. One [`TokenVerifier`]; gRPC, HTTP and WebSocket identify
//! are thin adapters over it.
//!
//! Tokens are 32 random bytes (64 hex), shown once, stored only as SHA-256
//! hashes, compared in constant time and never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
            (Role::Admin, _) | (Role::Orchestrator, _) | (Role::Viewer, Access::Read) => Ok(()),
            (Role::Viewer, Access::Write) => {
                Err(Error::PermissionDenied("viewer tokens are read-only"))
            }
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
    store.insert_token(&record)?;
    Ok((secret, record))
}

/// Verifies bearer tokens against the store, with a short positive cache.
pub struct TokenVerifier {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
}

impl TokenVerifier {
    pub fn new(store: Arc<dyn Store>) -> TokenVerifier {
        TokenVerifier {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The principal behind `token`, or `Unauthenticated`.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        if token.is_empty() || token.len() > 256 {
            return Err(Error::Unauthenticated);
        }
        let hash = hash_token(token);
        if let Some((p, at)) = self.cache.lock().expect("token cache").get(&hash) {
            if at.elapsed() < TOKEN_CACHE_TTL {
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
