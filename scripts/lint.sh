#!/usr/bin/env bash
# Static checks, run by .ci/run before the tests:
#   - cargo fmt --check;
#   - cargo clippy on every target and feature, warnings as errors;
#   - cargo deny check advisories bans licenses (deny.toml), with cargo-deny
#     installed by `cargo install --locked cargo-deny` when missing.
#
# The RustSec advisory database is fetched from its git repository into
# $CARGO_HOME/advisory-db. Without network access to it, the check runs
# offline against the copy already there (a clone of the database in
# $CARGO_HOME/advisory-db/advisory-db-3157b0e258782691) and says so; with no
# copy at all it checks bans and licenses and warns that advisories were not
# checked.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check

echo "== cargo clippy --all-targets --all-features -- -D warnings" >&2
cargo clippy --locked --all-targets --all-features -- -D warnings

if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "== cargo install --locked cargo-deny" >&2
  cargo install --locked cargo-deny
fi
echo "== cargo deny check advisories bans licenses" >&2
# cargo-deny reads the metadata of every crate in Cargo.lock, for every
# target: fetch them all first (an offline check cannot download them).
cargo fetch --locked
db_dir="${CARGO_HOME:-$HOME/.cargo}/advisory-db"
if cargo deny fetch db; then
  cargo deny check advisories bans licenses
elif [ -n "$(find "$db_dir" -mindepth 2 -maxdepth 2 -name .git 2>/dev/null | head -n 1)" ]; then
  # A clone of the database is there (a failed fetch leaves only its lock file).
  echo "lint: cannot fetch the advisory database; checking offline against $db_dir" >&2
  for db in "$db_dir"/*/; do
    git -C "$db" log -1 --format='lint: advisory database as of %cd' 2>/dev/null >&2 || true
  done
  cargo deny --offline check advisories bans licenses
else
  # Bans and licenses need no database: they are always checked. The
  # advisories check is skipped, loudly, rather than failing a machine that
  # cannot reach the database.
  echo "lint: WARNING: no advisory database (it cannot be fetched and $db_dir is empty):" >&2
  echo "lint: WARNING: advisories NOT checked. Clone https://github.com/rustsec/advisory-db" >&2
  echo "lint: WARNING: into $db_dir/advisory-db-3157b0e258782691 to check them offline." >&2
  cargo deny --offline check bans licenses
fi
