#!/usr/bin/env bash
# Install what the interop tests need, into the work tree only:
#   - tests/interop/node_modules: the npm `ws` package (npm ci, from the
#     committed package.json + package-lock.json);
#   - .venv: a Python virtualenv with grpcio + grpcio-tools, and the
#     OpenTelemetry proto + API packages for the trace test (pinned in
#     tests/interop/requirements.txt) and the Python client (clients/python);
#   - Debian's chromium + chromium-driver (apt-get, as root) and
#     tests/dashboard/node_modules (playwright-core) for the dashboard
#     tests, which drive the page in that Chromium.
# Idempotent: a stamp holding the hash of the lock / requirements file skips
# work already done. Needs node + npm and python3 (with venv). No prompts.
set -euo pipefail
cd "$(dirname "$0")/.."

hash_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "test-deps: '$1' is required but not installed" >&2; exit 1; }
}

# ---- Node.js: ws ------------------------------------------------------------
need node
need npm
node_dir=tests/interop
node_stamp=$node_dir/node_modules/.agenthub-deps
node_hash=$(hash_of "$node_dir/package.json" "$node_dir/package-lock.json")
if [ -f "$node_stamp" ] && [ "$(cat "$node_stamp")" = "$node_hash" ] && [ -f "$node_dir/node_modules/ws/package.json" ]; then
  echo "test-deps: node modules up to date"
else
  echo "test-deps: npm ci in $node_dir"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error </dev/null)
  echo "$node_hash" > "$node_stamp"
fi

# ---- Python: grpcio + grpcio-tools -------------------------------------------
need python3
venv=.venv
req=tests/interop/requirements.txt
py_stamp=$venv/.agenthub-deps
py_hash=$(hash_of "$req")
if [ ! -x "$venv/bin/python" ]; then
  echo "test-deps: creating $venv"
  python3 -m venv "$venv"
fi
if [ -f "$py_stamp" ] && [ "$(cat "$py_stamp")" = "$py_hash" ] \
  && "$venv/bin/python" -c 'import grpc, grpc_tools.protoc, opentelemetry.trace, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc' 2>/dev/null; then
  echo "test-deps: python packages up to date"
else
  echo "test-deps: pip install -r $req into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --only-binary=:all: -r "$req" </dev/null
  echo "$py_hash" > "$py_stamp"
fi

# ---- The Python client (clients/python) into the same venv --------------------
client_stamp=$venv/.agenthub-client
client_hash=$(find clients/python -type f \( -name '*.py' -o -name '*.pyi' -o -name pyproject.toml \) \
  -not -path '*/build/*' -not -path '*.egg-info*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ -f "$client_stamp" ] && [ "$(cat "$client_stamp")" = "$client_hash" ] \
  && "$venv/bin/python" -c 'import agenthub, agenthub.aio' 2>/dev/null; then
  echo "test-deps: python client up to date"
else
  echo "test-deps: pip install ./clients/python into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    ./clients/python </dev/null
  rm -rf clients/python/build clients/python/*.egg-info
  echo "$client_hash" > "$client_stamp"
fi

# ---- Dashboard tests: system Chromium + playwright-core ----------------------
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "test-deps: chromium installed"
else
  [ "$(id -u)" = 0 ] || { echo "test-deps: installing chromium needs root (apt-get)" >&2; exit 1; }
  echo "test-deps: apt-get install chromium chromium-driver"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver </dev/null >/dev/null 2>&1; then
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends chromium chromium-driver </dev/null
  fi
fi
dash_dir=tests/dashboard
dash_stamp=$dash_dir/node_modules/.agenthub-deps
dash_hash=$(hash_of "$dash_dir/package.json" "$dash_dir/package-lock.json")
if [ -f "$dash_stamp" ] && [ "$(cat "$dash_stamp")" = "$dash_hash" ] && [ -f "$dash_dir/node_modules/playwright-core/package.json" ]; then
  echo "test-deps: dashboard node modules up to date"
else
  echo "test-deps: npm ci in $dash_dir"
  (cd "$dash_dir" && npm ci --no-audit --no-fund --loglevel=error </dev/null)
  echo "$dash_hash" > "$dash_stamp"
fi
