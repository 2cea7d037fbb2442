#!/usr/bin/env bash
# The local demo: a real Crossbar router, subtocall, two example backends that
# share com.example.SUB_status (roundrobin), and a publisher that publishes
# ordinary events to com.example.status. Shows which backend handled which
# event, then shuts everything down cleanly. Installs what it needs on first
# run (the Crossbar virtualenv; a cargo build).
#
#   scripts/demo.sh [EVENTS]      (default 10)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EVENTS="${1:-10}"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Crossbar virtualenv (first run installs crossbar==26.10.1, about a minute)"
VENV="$(bash scripts/setup-crossbar.sh)"
PY="$VENV/bin/python"

say "Building subtocall"
cargo build --release --quiet --bin subtocall
BIN="$ROOT/target/release/subtocall"

WORK="$(mktemp -d -t subtocall-demo-XXXXXX)"
PIDS=()
cleanup() {
  # Reverse start order: backends and subtocall first, the router last.
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "${PIDS[$i]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${PIDS[$i]}" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port, and the example router config bound to 127.0.0.1 on it.
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
HTTP_PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$WORK/.crossbar"
"$PY" scripts/local_router.py config "$PORT" "$WORK/.crossbar/config.json"
URL="ws://127.0.0.1:$PORT/ws"

say "Starting Crossbar on $URL (log: $WORK/crossbar.log)"
"$VENV/bin/crossbar" start --cbdir "$WORK/.crossbar" --loglevel warn --color false \
  --shutdownafter 900 >"$WORK/crossbar.log" 2>&1 &
PIDS+=($!)
"$PY" scripts/local_router.py wait "$URL"

say "Starting subtocall (metrics: http://127.0.0.1:$HTTP_PORT/metrics)"
WAMP_URL="$URL" CROSSBAR_REALM=realm1 \
BACKEND_USERNAME=subtocall BACKEND_SECRET=subtocall-secret \
SUBTOCALL_DETAILS_KWARG=_details SUBTOCALL_HTTP_ADDR="127.0.0.1:$HTTP_PORT" \
  "$BIN" 2> >(tee "$WORK/subtocall.log" | sed -u 's/^[^ ]* *//; s/^/[subtocall] /') &
PIDS+=($!)

say "Starting two example backends (examples/backend.py)"
for name in A B; do
  "$PY" -u examples/backend.py --url "$URL" --name "$name" 2>&1 | tee "$WORK/backend-$name.log" &
  PIDS+=($!)
done

wait_for() { # file pattern seconds
  local end=$((SECONDS + $3))
  until grep -q "$2" "$1" 2>/dev/null; do
    if [ $SECONDS -ge $end ]; then echo "timed out waiting for '$2' in $1" >&2; exit 1; fi
    sleep 0.1
  done
}
wait_for "$WORK/subtocall.log" "subscribed to com.example.status" 30

say "Publishing $EVENTS events to com.example.status (examples/publisher.py)"
"$PY" -u examples/publisher.py --url "$URL" --count "$EVENTS" --interval 0.1

handled() { grep -c "handled" "$WORK/backend-$1.log" 2>/dev/null || true; }
end=$((SECONDS + 30))
until [ $(( $(handled A) + $(handled B) )) -ge "$EVENTS" ]; do
  if [ $SECONDS -ge $end ]; then echo "not every event arrived; see $WORK" >&2; exit 1; fi
  sleep 0.1
done

say "Result"
echo "backend A handled $(handled A) events, backend B handled $(handled B): each of the $EVENTS events exactly once."
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null | grep -E '^subtocall_events_(received|forwarded)_total' || true
say "What subtocall is doing (subtocall status)"
"$BIN" status --url "http://127.0.0.1:$HTTP_PORT" || true
say "Shutting down"
