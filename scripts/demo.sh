#!/usr/bin/env bash
# The local demo: a real Crossbar router, subtocall, two example backends that
# share com.example.SUB_status (roundrobin), and a publisher that publishes
# ordinary events to com.example.status. Shows which backend handled which
# event, then shuts everything down cleanly. Installs what it needs on first
# run (the Crossbar virtualenv; a cargo build).
#
#   scripts/demo.sh [EVENTS]      (default 10)
#   scripts/demo.sh ha [EVENTS]   (default 200) two subtocall instances on the
#                                 Redis queue, one killed mid-stream: see
#                                 scripts/demo-ha.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${1:-}" = ha ]; then
  shift
  exec bash scripts/demo-ha.sh "$@"
fi
EVENTS="${1:-10}"
. scripts/demo-common.sh

demo_setup
start_crossbar
HTTP_PORT="$(free_port)"

say "Starting subtocall (metrics: http://127.0.0.1:$HTTP_PORT/metrics)"
WAMP_URL="$URL" CROSSBAR_REALM=realm1 \
BACKEND_USERNAME=subtocall BACKEND_SECRET=subtocall-secret \
SUBTOCALL_DETAILS_KWARG=_details SUBTOCALL_HTTP_ADDR="127.0.0.1:$HTTP_PORT" \
SUBTOCALL_POLICY_FILE=examples/policies.toml \
  "$BIN" 2> >(tee "$WORK/subtocall.log" | sed -u 's/^[^ ]* *//; s/^/[subtocall] /') &
PIDS+=($!)

say "Starting two example backends (examples/backend.py)"
for name in A B; do
  "$PY" -u examples/backend.py --url "$URL" --name "$name" 2>&1 | tee "$WORK/backend-$name.log" &
  PIDS+=($!)
done

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
