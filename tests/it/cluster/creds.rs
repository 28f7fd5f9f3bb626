//! NATS decentralized authentication made at test time, as `nsc` makes it:
//! an operator and its system account, accounts the operator signs, users
//! an account signs, all as NATS JWTs (nats-io/jwt v2: header, claims and
//! an ed25519 nkey signature, each base64url without padding); a user's
//! `.creds` file; and the nats-server config that trusts the operator
//! (`resolver: MEMORY`, the accounts preloaded).

use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde_json::{json, Value};
use sha2::{Digest, Sha512_256};

/// Every JWT's header: signed with an nkey.
const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
/// Claims format version (nats-io/jwt v2).
const VERSION: u32 = 2;

/// An operator: the root of trust the servers are configured with, and
/// its system account.
pub struct Operator {
    key: KeyPair,
    jwt: String,
    system: Account,
}

/// An account signed by an operator: its key signs its users.
pub struct Account {
    key: KeyPair,
    jwt: String,
}

impl Operator {
    /// A new operator with a system account (`SYS`) it names in its claims.
    pub fn new() -> Operator {
        let key = KeyPair::new_operator();
        let system = Account::signed_by(&key, "SYS", false);
        let jwt = encode(
            &key,
            &key.public_key(),
            "agenthub-test-operator",
            json!({"type": "operator", "version": VERSION,
                   "system_account": system.key.public_key()}),
        );
        Operator { key, jwt, system }
    }

    /// An account this operator signs; `jetstream`: with JetStream
    /// enabled and unlimited.
    pub fn account(&self, name: &str, jetstream: bool) -> Account {
        Account::signed_by(&self.key, name, jetstream)
    }

    /// nats-server config trusting this operator, with its system account
    /// and `accounts` preloaded (any other account is unknown to it).
    pub fn server_conf(&self, accounts: &[&Account]) -> String {
        let preload: String = std::iter::once(&self.system)
            .chain(accounts.iter().copied())
            .map(|a| format!("  {}: \"{}\"\n", a.key.public_key(), a.jwt))
            .collect();
        format!(
            "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n",
            self.jwt,
            self.system.key.public_key()
        )
    }
}

impl Account {
    fn signed_by(operator: &KeyPair, name: &str, jetstream: bool) -> Account {
        let key = KeyPair::new_account();
        let mut limits = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1,
                                "exports": -1, "wildcards": true, "conn": -1, "leaf": -1});
        if jetstream {
            for limit in ["mem_storage", "disk_storage", "streams", "consumer"] {
                limits[limit] = json!(-1);
            }
        }
        let jwt = encode(
            operator,
            &key.public_key(),
            name,
            json!({"type": "account", "version": VERSION, "limits": limits,
                   "default_permissions": {"pub": {}, "sub": {}}}),
        );
        Account { key, jwt }
    }

    /// The `.creds` file of a new user this account signs (no permission
    /// limits), in the format `nsc generate creds` writes.
    pub fn user_creds(&self, name: &str) -> String {
        let user = KeyPair::new_user();
        let jwt = encode(
            &self.key,
            &user.public_key(),
            name,
            json!({"type": "user", "version": VERSION, "pub": {}, "sub": {},
                   "subs": -1, "data": -1, "payload": -1}),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n",
            user.seed().unwrap()
        )
    }
}

/// The JWT of `subject` named `name` with these `nats` claims, issued now
/// and signed by `issuer`. Its `jti` is the base32 SHA-512/256 of the
/// claims without it, as nats-io/jwt makes it (a unique id; servers do not
/// check it).
fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut claims = json!({"iat": now.as_secs(), "iss": issuer.public_key(),
                            "name": name, "sub": subject, "nats": nats});
    let id = Sha512_256::digest(claims.to_string().as_bytes());
    claims["jti"] = json!(BASE32_NOPAD.encode(&id));
    let signed = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(HEADER.as_bytes()),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}
