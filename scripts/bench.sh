#!/usr/bin/env bash
# The benchmark command (doc/benchmarks.md): what subtocall costs per event,
# beside the limit, beside the real router and beside the build it replaced.
# Builds in release mode the current checkout and a baseline commit (below),
# then runs
#
#   1. the sidecar ceiling: subtocall against a loopback WAMP peer, MessagePack
#      and JSON (events/s, CPU per event, RSS), plus instructions per event
#      under valgrind --tool=callgrind;
#   2. through a real Crossbar 26.10.1: publishers -> Crossbar -> subtocall ->
#      Crossbar -> two roundrobin backends, beside two baselines on the same
#      router (backends subscribing directly; publishers calling SUB_ directly);
#   3. Redis mode against a private redis-server, beside redis-benchmark;
#   4. the Redis queue (SUBTOCALL_QUEUE=redis) beside the memory queue, same
#      build, same run: against the loopback peer with one instance and with
#      two sharing a private redis-server (events/s, subtocall's and
#      redis-server's CPU per event, exactly-once check, instructions per
#      event under callgrind), and at 500 events/s through Crossbar (a path
#      of part 2: the p99 the Redis queue adds);
#   5. per-key ordering: the ceiling with 1, 100 and 10,000 keys;
#   6. per-procedure policies: instructions per event with a policy file of
#      100 rules (the procedure matching the last) beside none;
#
# the baseline build alternating with the current one for the ceiling,
# instructions and CPU per event, the CPU per event at 500 events/s (loopback
# peer and Crossbar) and RSS, and rewrites the generated section of doc/benchmarks.md and doc/img/bench-*.png.
# About 11 minutes on a 2-core machine once built (644 s at 0358a4b; a
# fresh clone also builds both, a few minutes each, and creates the Crossbar
# virtualenv once); `--quick --only queue` about 75 s (`--only queue` starts
# a Crossbar of its own for the two queues' paths).
#
#   scripts/bench.sh [--quick] [--only ceiling,callgrind,paced,crossbar,redis,queue,ordering,policy]
#                    [--no-write] [--baseline REV] ...
#
# --no-write prints the section instead of writing it: a run of some parts
# only rewrites the generated section with those parts alone.
#
# Two parts run only when named and write nothing: queue-paced (the memory
# and Redis queue at the moderate rate from the loopback peer) and
# queue-ceiling (the Redis queue's ceiling with one instance), each with the
# baseline build alternating and redis-server's INFO commandstats per event.
# The Redis queue's targets of issue 21 were set on the build before the
# queue core; on another machine, read them against that build:
#
#   scripts/bench.sh --only queue-paced,queue-ceiling --baseline e4174ba
#
# The baseline: --baseline REV, else $BENCH_BASELINE, else
# BASELINE_DEFAULT in this script (068ae7d, the commit before the event-loop
# redesign); `none` measures the current checkout alone. It is
# extracted with `git archive` into target/bench-baseline/src and built there
# with its own Cargo.lock into target/bench-baseline/target, both kept between
# runs (extracted again only when the commit changes). The benchmark itself is
# always the current checkout's: only the subtocall binary differs.
#
# Needs: a Rust toolchain, python3.11 (for Crossbar), redis-server and
# redis-benchmark, valgrind, and the DejaVu fonts (Debian: fonts-dejavu-core).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The last commit before the single event loop and the sans-IO forwarding
# core (4fe93d9): what the redesign is measured against.
BASELINE_DEFAULT=068ae7d
BASELINE="${BENCH_BASELINE:-$BASELINE_DEFAULT}"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline)
      [ $# -ge 2 ] || { echo "bench: --baseline needs a commit (or none)" >&2; exit 1; }
      BASELINE="$2"
      shift 2
      ;;
    --baseline=*) BASELINE="${1#--baseline=}"; shift ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) args+=("$1"); shift ;;
  esac
done

missing=()
for tool in redis-server redis-benchmark valgrind; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: missing ${missing[*]} (Debian: apt-get install redis-server valgrind)" >&2
  exit 1
fi

baseline_sha=""
if [ "$BASELINE" != none ]; then
  # Resolved before anything is built, so that a typo fails at once.
  if ! baseline_sha="$(git rev-parse --verify --quiet "$BASELINE^{commit}")"; then
    echo "bench: baseline $BASELINE is not a commit of this repository" >&2
    exit 1
  fi
fi

echo "bench: Crossbar virtualenv (scripts/setup-crossbar.sh)" >&2
VENV="$(bash scripts/setup-crossbar.sh </dev/null)"

TARGET="$(cargo metadata --format-version 1 --no-deps </dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"

echo "bench: building subtocall and the benchmark in release mode" >&2
# Two commands: `--bin subtocall` would otherwise select only that binary.
cargo build --release --quiet -p subtocall --bin subtocall </dev/null
cargo build --release --quiet -p subtocall-bench </dev/null

baseline_args=()
if [ -n "$baseline_sha" ]; then
  short="$(git rev-parse --short "$baseline_sha")"
  dir="$TARGET/bench-baseline"
  src="$dir/src"
  started=$SECONDS
  if [ "$(cat "$src/.bench-commit" 2>/dev/null || true)" != "$baseline_sha" ]; then
    echo "bench: extracting the baseline $short into $src" >&2
    rm -rf "$src"
    mkdir -p "$src"
    # -m: the files get the time of extraction, not the commit's, so that
    # cargo never takes a different commit's sources for already built.
    git archive "$baseline_sha" | tar -x -m -C "$src"
    echo "$baseline_sha" >"$src/.bench-commit"
  fi
  echo "bench: building the baseline $short in release mode (into $dir/target)" >&2
  CARGO_TARGET_DIR="$dir/target" cargo build --release --quiet --locked \
    --manifest-path "$src/Cargo.toml" -p subtocall --bin subtocall </dev/null
  echo "bench: baseline $short ready in $((SECONDS - started)) s" >&2
  baseline_args=(--baseline-subtocall "$dir/target/release/subtocall" --baseline-commit "$short")
fi

exec "$TARGET/release/subtocall-bench" \
  --subtocall "$TARGET/release/subtocall" --venv "$VENV" --repo "$ROOT" \
  ${baseline_args[@]+"${baseline_args[@]}"} ${args[@]+"${args[@]}"}
