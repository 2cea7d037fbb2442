#!/usr/bin/env bash
# The project's test command (CI runs it through .ci/run, with CI=true and no stdin).
#
#   1. creates the pinned Crossbar virtualenv once (scripts/setup-crossbar.sh; 30-90 s
#      on a fresh clone, about 1 s afterwards) and exports SUBTOCALL_CROSSBAR_VENV;
#   2. runs the doctests (cheap; keeps examples in doc comments honest);
#   3. runs the whole suite with cargo-nextest (profile "ci" when CI=true), no fail-fast.
#
# Extra arguments go to `cargo nextest run` (e.g. scripts/test.sh --test harness).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STARTED=$SECONDS

step() { printf '\n==> %s\n' "$*"; }

step "[1/3] Crossbar virtualenv (scripts/setup-crossbar.sh)"
VENV="$(bash scripts/setup-crossbar.sh </dev/null)"
export SUBTOCALL_CROSSBAR_VENV="$VENV"
echo "    SUBTOCALL_CROSSBAR_VENV=$SUBTOCALL_CROSSBAR_VENV"

step "[2/3] doctests"
cargo test --workspace --doc </dev/null

step "[3/3] test suite (cargo nextest run --workspace --no-fail-fast)"
PROFILE=default
if [ "${CI:-}" = "true" ]; then
  PROFILE=ci
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --profile "$PROFILE" "$@" </dev/null
else
  echo "    cargo-nextest is not installed; falling back to cargo test" >&2
  cargo test --workspace --no-fail-fast "$@" </dev/null
fi

step "all tests passed in $((SECONDS - STARTED)) s"
