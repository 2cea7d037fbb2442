#!/usr/bin/env bash
# The benchmark command (doc/benchmarks.md): what subtocall costs per event,
# beside the limit and beside the real router. Builds in release mode, then runs
#
#   1. the sidecar ceiling: subtocall against a loopback WAMP peer, MessagePack
#      and JSON (events/s, CPU per event, RSS), plus instructions per event
#      under valgrind --tool=callgrind;
#   2. through a real Crossbar 26.10.1: publishers -> Crossbar -> subtocall ->
#      Crossbar -> two roundrobin backends, beside two baselines on the same
#      router (backends subscribing directly; publishers calling SUB_ directly);
#   3. Redis mode against a private redis-server, beside redis-benchmark;
#
# and rewrites the generated section of doc/benchmarks.md and doc/img/bench-*.png.
# About 6 minutes on a 2-core machine once built (a fresh clone also builds
# and, once, creates the Crossbar virtualenv).
#
#   scripts/bench.sh [--quick] [--only ceiling,callgrind,crossbar,redis] [--no-write] ...
#
# Needs: a Rust toolchain, python3.11 (for Crossbar), redis-server and
# redis-benchmark, valgrind, and the DejaVu fonts (Debian: fonts-dejavu-core).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

missing=()
for tool in redis-server redis-benchmark valgrind; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: missing ${missing[*]} (Debian: apt-get install redis-server valgrind)" >&2
  exit 1
fi

echo "bench: Crossbar virtualenv (scripts/setup-crossbar.sh)" >&2
VENV="$(bash scripts/setup-crossbar.sh </dev/null)"

echo "bench: building subtocall and the benchmark in release mode" >&2
# Two commands: `--bin subtocall` would otherwise select only that binary.
cargo build --release --quiet -p subtocall --bin subtocall </dev/null
cargo build --release --quiet -p subtocall-bench </dev/null
TARGET="$(cargo metadata --format-version 1 --no-deps </dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"

exec "$TARGET/release/subtocall-bench" \
  --subtocall "$TARGET/release/subtocall" --venv "$VENV" --repo "$ROOT" "$@"
