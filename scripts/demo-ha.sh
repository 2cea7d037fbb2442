#!/usr/bin/env bash
# The local demo's second story (scripts/demo.sh ha): one subtocall instance
# dies and nothing is lost. A private redis-server, a real Crossbar, two
# subtocall instances sharing the Redis queue (SUBTOCALL_QUEUE=redis), the two
# example backends (each event takes them 0.3 s) and a publisher publishing
# EVENTS events to com.example.status, about 20 a second. When a third of the
# events have been delivered, the busier instance is killed with SIGKILL; the
# other goes on and takes over what the killed one held once it has been idle
# for SUBTOCALL_CLAIM_IDLE (2s here). Prints how many events each backend handled,
# whether every event arrived, how many arrived more than once (delivery is at
# least once: an event whose call was under way when its instance died is
# called again by the survivor), and what `subtocall status` says of the
# survivor. Exits 1 if not every event arrived within the timeout.
#
#   scripts/demo.sh ha [EVENTS]   (default 200)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EVENTS="${1:-200}"
if ! [[ "$EVENTS" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/demo.sh ha [EVENTS]   (EVENTS a whole number, at least 1)" >&2
  exit 2
fi
INTERVAL=0.05     # seconds between two publications
WORK_SECONDS=0.3  # what each event takes a backend
CLAIM_IDLE=2s
STREAM='{subtocall:com.example.SUB_status}:stream'
. scripts/demo-common.sh

if ! command -v redis-server >/dev/null; then
  echo "scripts/demo.sh ha needs redis-server on the PATH" >&2
  exit 1
fi

demo_setup

REDIS_PORT="$(free_port)"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
mkdir -p "$WORK/redis"
say "Starting a private redis-server on 127.0.0.1:$REDIS_PORT, no persistence (log: $WORK/redis.log)"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --dir "$WORK/redis" --logfile "$WORK/redis.log" &
PIDS+=($!)
wait_for "$WORK/redis.log" "Ready to accept connections" 30

start_crossbar

SUB_PIDS=() HTTP_PORTS=()
for n in 1 2; do
  HTTP_PORTS[$n]="$(free_port)"
  say "Starting subtocall-$n on the Redis queue (status: http://127.0.0.1:${HTTP_PORTS[$n]}/status)"
  WAMP_URL="$URL" CROSSBAR_REALM=realm1 \
  BACKEND_USERNAME=subtocall BACKEND_SECRET=subtocall-secret \
  SUBTOCALL_DETAILS_KWARG=_details SUBTOCALL_HTTP_ADDR="127.0.0.1:${HTTP_PORTS[$n]}" \
  SUBTOCALL_QUEUE=redis REDIS_URL="$REDIS_URL" SUBTOCALL_CLAIM_IDLE="$CLAIM_IDLE" \
  SUBTOCALL_INSTANCE_ID="subtocall-$n" \
    "$BIN" 2> >(tee "$WORK/subtocall-$n.log" | sed -u "s/^[^ ]* *//; s/^/[subtocall-$n] /") &
  SUB_PIDS[$n]=$!
  PIDS+=($!)
done

say "Starting two example backends (examples/backend.py --work $WORK_SECONDS; logs: $WORK/backend-A.log, -B.log)"
for name in A B; do
  "$PY" -u examples/backend.py --url "$URL" --name "$name" --work "$WORK_SECONDS" \
    >"$WORK/backend-$name.log" 2>&1 &
  PIDS+=($!)
done
for name in A B; do wait_for "$WORK/backend-$name.log" "registered" 30; done
for n in 1 2; do wait_for "$WORK/subtocall-$n.log" "subscribed to com.example.status" 30; done

# The sequence numbers the backends were called with, one line per call.
calls() { grep -ho 'handled \[[0-9]*\]' "$WORK"/backend-*.log 2>/dev/null | tr -dc '0-9\n' || true; }
handled() { grep -c "handled" "$WORK/backend-$1.log" 2>/dev/null || true; }
distinct() { calls | sort -u | wc -l; }
published() { grep -c "published event" "$WORK/publisher.log" 2>/dev/null || true; }
in_redis() { # entries in the stream: admitted and not yet delivered
  "$PY" -c 'import redis, sys; print(redis.Redis(port=int(sys.argv[1])).xlen(sys.argv[2]))' \
    "$REDIS_PORT" "$STREAM" 2>/dev/null || echo "?"
}
fail() { # message: keeps the logs (cleanup removes WORK), exits 1
  local keep
  keep="$(mktemp -d -t subtocall-demo-ha-logs-XXXXXX)"
  cp "$WORK"/*.log "$keep"/ 2>/dev/null || true
  echo "[demo] $1; the logs are kept in $keep" >&2
  exit 1
}
metric() { # instance name: the sum of a metric's samples at the instance's /metrics (0 if unreachable)
  "$PY" -c '
import sys, urllib.request
try:
    text = urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()
except OSError:
    text = ""
name = sys.argv[2]
print(int(sum(float(l.split()[-1]) for l in text.splitlines()
              if l.startswith(name + " ") or l.startswith(name + "{"))))
' "http://127.0.0.1:${HTTP_PORTS[$1]}/metrics" "$2"
}
forwarded() { metric "$1" subtocall_events_forwarded_total; }
now_ms() { date +%s%3N; }
seconds_since() { # start_ms -> "12.3"
  local d=$(( $(now_ms) - $1 ))
  printf '%d.%d' $((d / 1000)) $((d % 1000 / 100))
}

KILL_AT=$(( EVENTS / 3 > 0 ? EVENTS / 3 : 1 ))
say "Publishing $EVENTS events to com.example.status, one every ${INTERVAL}s (examples/publisher.py); the busier subtocall is killed after $KILL_AT are delivered"
START_MS="$(now_ms)"
"$PY" -u examples/publisher.py --url "$URL" --count "$EVENTS" --interval "$INTERVAL" \
  >"$WORK/publisher.log" 2>&1 &
PUB_PID=$!
PIDS+=($!)

TIMEOUT=$(( 60 + EVENTS / 10 ))   # publishing takes about EVENTS / 20 seconds
end=$((SECONDS + TIMEOUT))
KILLED_AT="" VICTIM="" SURVIVOR="" PUBLISHED_IN="" next_report=$((SECONDS + 2))
while :; do
  d="$(distinct)"
  if [ -z "$KILLED_AT" ] && [ "$d" -ge "$KILL_AT" ]; then
    # The busier instance (more calls answered so far) is the victim: then the
    # survivor has more to take over.
    f1="$(forwarded 1)" f2="$(forwarded 2)"
    if [ "$f2" -gt "$f1" ]; then VICTIM=2 SURVIVOR=1; else VICTIM=1 SURVIVOR=2; fi
    kill -KILL "${SUB_PIDS[$VICTIM]}"
    wait "${SUB_PIDS[$VICTIM]}" 2>/dev/null || true  # no "Killed" line from bash
    KILLED_AT="$d"
    echo "[demo] $(seconds_since "$START_MS") s: $(published) published, $d delivered" \
      "(forwarded by subtocall-1: $f1, by subtocall-2: $f2): kill -KILL subtocall-$VICTIM (pid ${SUB_PIDS[$VICTIM]})"
    next_report=$((SECONDS + 2))
  fi
  if [ -z "$PUBLISHED_IN" ] && ! kill -0 "$PUB_PID" 2>/dev/null; then
    if ! wait "$PUB_PID"; then
      cat "$WORK/publisher.log" >&2
      fail "the publisher failed"
    fi
    PUBLISHED_IN="$(seconds_since "$START_MS")"
    echo "[demo] $PUBLISHED_IN s: all $(published) events published"
  fi
  [ -n "$PUBLISHED_IN" ] && [ "$d" -ge "$EVENTS" ] && break
  if [ $SECONDS -ge $end ]; then
    fail "not every event arrived within ${TIMEOUT}s: $d of $EVENTS delivered, $(in_redis) entries still in Redis"
  fi
  if [ $SECONDS -ge $next_report ]; then
    echo "[demo] $(seconds_since "$START_MS") s: $(published) published, $d delivered"
    next_report=$((SECONDS + 2))
  fi
  sleep 0.2
done
DELIVERED_IN="$(seconds_since "$START_MS")"
echo "[demo] $DELIVERED_IN s: all $EVENTS events delivered"

# Every event has arrived; wait until Redis holds nothing more, so that a call
# the survivor repeats after taking an entry over is counted below.
until [ "$(in_redis)" = 0 ]; do
  if [ $SECONDS -ge $end ]; then
    fail "every event arrived, but $(in_redis) entries are still in Redis after ${TIMEOUT}s"
  fi
  sleep 0.2
done

TOTAL="$(calls | wc -l)"
DISTINCT="$(distinct)"
TWICE="$(calls | sort | uniq -d | wc -l)"
say "Result"
echo "published $EVENTS events in $PUBLISHED_IN s; subtocall-$VICTIM was killed with SIGKILL when $KILLED_AT had been delivered"
echo "backend A handled $(handled A) calls, backend B handled $(handled B)"
echo "every one of the $EVENTS events was delivered ($DISTINCT distinct sequence numbers, in $DELIVERED_IN s);"
if [ "$TWICE" -eq 0 ]; then
  echo "none of them more than once ($TOTAL calls in all)"
else
  echo "$TWICE of them more than once ($TOTAL calls in all): delivery is at least once; a call under way"
  echo "when its instance died is made again by the survivor (a backend that must not act twice de-duplicates on the publication id)"
fi
echo "the survivor, subtocall-$SURVIVOR, counted:"
for m in subtocall_events_received_total subtocall_events_forwarded_total \
         subtocall_queue_admitted_total subtocall_queue_admitted_elsewhere_total \
         subtocall_queue_taken_over_total; do
  printf '  %-42s %s\n' "$m" "$(metric "$SURVIVOR" "$m")"
done
say "What the survivor is doing (subtocall status with SUBTOCALL_HTTP_ADDR=127.0.0.1:${HTTP_PORTS[$SURVIVOR]})"
SUBTOCALL_HTTP_ADDR="127.0.0.1:${HTTP_PORTS[$SURVIVOR]}" "$BIN" status || true
say "Shutting down"
