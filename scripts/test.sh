#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests need
# (interop clients: npm `ws`, Python `grpcio`; the dashboard tests' Chromium
# and playwright-core), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh

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
