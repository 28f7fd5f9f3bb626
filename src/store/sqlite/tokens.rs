//! The token table: storing, finding, listing and revoking API tokens
//! (what [`SqliteStore`](super::SqliteStore) answers for them).

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;
use crate::model::{Role, TokenRecord};

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let role: String = r.get(2)?;
    Ok(TokenRecord {
        id: r.get(0)?,
        hash: r.get(1)?,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        agent_id: r.get(3)?,
        created_at_ms: r.get(4)?,
        revoked: r.get::<_, i64>(5)? != 0,
    })
}

const TOKEN_COLS: &str = "id, hash, role, agent_id, created_at_ms, revoked";

/// Store a new token.
pub(super) fn insert(conn: &Connection, t: &TokenRecord) -> Result<()> {
    conn.execute(
        "INSERT INTO tokens (id, hash, role, agent_id, created_at_ms, revoked) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            t.id,
            t.hash,
            t.role.as_str(),
            t.agent_id,
            t.created_at_ms,
            t.revoked as i64
        ],
    )?;
    Ok(())
}

/// The token with this hash.
pub(super) fn find(conn: &Connection, hash: &str) -> Result<Option<TokenRecord>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash = ?1"))?;
    Ok(stmt.query_row(params![hash], token_from_row).optional()?)
}

/// Every token, oldest first.
pub(super) fn list(conn: &Connection) -> Result<Vec<TokenRecord>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at_ms, id"
    ))?;
    let rows = stmt.query_map([], token_from_row)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Revoke a token: false if there is none with this id.
pub(super) fn revoke(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", params![id])? == 1)
}
