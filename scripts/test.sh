#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests need
# (interop clients: npm `ws`, Python `grpcio`), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/test-deps.sh ]; then
  scripts/test-deps.sh
fi
cargo test --locked -- --test-threads=2
