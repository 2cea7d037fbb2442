#!/usr/bin/env bash
# Renders doc/img/dashboard.png from a real run: Crossbar, subtocall (release
# build, memory queue, short retry policy, SUBTOCALL_ORDER_BY=kwarg:key),
# backends and a publisher (scripts/dashboard_peers.py), and a Prometheus that
# scrapes subtocall every 2 s and loads doc/prometheus/subtocall-alerts.yml.
# Then scripts/render_dashboard.py evaluates every panel's expr of
# doc/grafana/subtocall.json against that Prometheus and plots it in the
# dashboard's layout (Grafana itself cannot be installed here).
#
#   scripts/dashboard-screenshot.sh [SECONDS] [OUT]   (default 150, doc/img/dashboard.png)
#
# The run, at fractions of SECONDS of publishing:
#   com.example.SUB_orders    two healthy backends, 200 events/s
#   com.example.SUB_payments  one flaky backend (8% retryable, 2% final errors),
#                             100 events/s; it leaves at 47% and is back at 57%
#                             (retries, then `exhausted` dead letters)
#   com.example.SUB_reports   one slow backend (50-150 ms per call, 8 keys in
#                             order), 40 events/s with a burst of 150/s from 27%
#                             to 40% (events wait, in order)
#   the router restarts at 70% (reconnect, not ready for a few seconds)
# followed by 20 s without traffic. Needs: prometheus (Debian: apt-get install
# prometheus), python3 with venv; installs the Crossbar venv and matplotlib (in
# target/render-venv) on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DURATION="${1:-150}"
OUT="${2:-doc/img/dashboard.png}"
SCRAPE=2
STEP=2
began=$SECONDS

say() { printf '\n\033[1m==> [%4ds] %s\033[0m\n' "$((SECONDS - began))" "$*"; }

command -v prometheus >/dev/null || { echo "prometheus is not on PATH (Debian: apt-get install prometheus)" >&2; exit 1; }

say "Crossbar virtualenv"
VENV="$(bash scripts/setup-crossbar.sh)"
PY="$VENV/bin/python"

say "matplotlib virtualenv (target/render-venv)"
RENDER_VENV="$ROOT/target/render-venv"
if ! "$RENDER_VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$RENDER_VENV"
  "$RENDER_VENV/bin/pip" install --quiet matplotlib
fi

say "Building subtocall (release)"
cargo build --release --quiet --bin subtocall
BIN="$ROOT/target/release/subtocall"

WORK="$(mktemp -d -t subtocall-dashboard-XXXXXX)"
PIDS=()
CROSSBAR_PID=""
PROMETHEUS_PID=""
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}
cleanup() {
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[$i]}"; done
  [ -n "$PROMETHEUS_PID" ] && stop_pid "$PROMETHEUS_PID"
  [ -n "$CROSSBAR_PID" ] && stop_pid "$CROSSBAR_PID"
  if [ "${KEEP_WORK:-}" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"; HTTP_PORT="$(free_port)"; PROM_PORT="$(free_port)"
URL="ws://127.0.0.1:$PORT/ws"

mkdir -p "$WORK/.crossbar"
"$PY" scripts/local_router.py config "$PORT" "$WORK/.crossbar/config.json"

start_crossbar() {
  "$VENV/bin/crossbar" start --cbdir "$WORK/.crossbar" --loglevel warn --color false \
    >>"$WORK/crossbar.log" 2>&1 &
  CROSSBAR_PID=$!
  "$PY" scripts/local_router.py wait "$URL"
}

say "Starting Crossbar on $URL"
start_crossbar

say "Starting Prometheus on 127.0.0.1:$PROM_PORT (scrape every ${SCRAPE}s)"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: ${SCRAPE}s
  evaluation_interval: ${SCRAPE}s
rule_files:
  - $ROOT/doc/prometheus/subtocall-alerts.yml
scrape_configs:
  - job_name: subtocall
    static_configs:
      - targets: ["127.0.0.1:$HTTP_PORT"]
EOF
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROMETHEUS_PID=$!
PROM="http://127.0.0.1:$PROM_PORT"
for _ in $(seq 100); do curl -sf "$PROM/-/ready" >/dev/null && break; sleep 0.2; done
curl -sf "$PROM/-/ready" >/dev/null || { tail "$WORK/prometheus.log" >&2; exit 1; }

say "Starting subtocall (http://127.0.0.1:$HTTP_PORT/metrics)"
WAMP_URL="$URL" CROSSBAR_REALM=realm1 \
BACKEND_USERNAME=subtocall BACKEND_SECRET=subtocall-secret \
SUBTOCALL_HTTP_ADDR="127.0.0.1:$HTTP_PORT" \
SUBTOCALL_ORDER_BY=kwarg:key \
SUBTOCALL_RETRY_MAX_ATTEMPTS=4 SUBTOCALL_RETRY_INITIAL_BACKOFF=200ms \
SUBTOCALL_RETRY_MAX_BACKOFF=1s SUBTOCALL_RETRY_MAX_AGE=10s \
SUBTOCALL_CALL_TIMEOUT=5s \
SUBTOCALL_RECONNECT_INITIAL_BACKOFF=200ms SUBTOCALL_RECONNECT_MAX_BACKOFF=1s \
  "$BIN" 2>"$WORK/subtocall.log" &
PIDS+=($!)

peer() { # name, then dashboard_peers.py arguments
  local name=$1; shift
  "$PY" -u scripts/dashboard_peers.py --url "$URL" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}
say "Starting backends"
peer orders-A backend --procedure com.example.SUB_orders --name orders-A --kind healthy
peer orders-B backend --procedure com.example.SUB_orders --name orders-B --kind healthy
peer payments-1 backend --procedure com.example.SUB_payments --name payments-1 --kind flaky
PAYMENTS_PID=${PIDS[-1]}
peer reports-1 backend --procedure com.example.SUB_reports --name reports-1 --kind slow

wait_for() { # file pattern seconds
  local end=$((SECONDS + $3))
  until grep -q "$2" "$1" 2>/dev/null; do
    if [ $SECONDS -ge $end ]; then echo "timed out waiting for '$2' in $1" >&2; tail "$1" >&2; exit 1; fi
    sleep 0.1
  done
}
for topic in orders payments reports; do
  wait_for "$WORK/subtocall.log" "subscribed to com.example.$topic" 30
done

frac() { "$PY" -c "print(round($DURATION * $1))"; }
T0=$(date +%s.%N)
START=$("$PY" -c "print($T0 - 6)") # a moment before the traffic
at() { # seconds since T0
  local wait
  wait=$("$PY" -c "import time; print(max(0, $T0 + $1 - time.time()))")
  sleep "$wait"
}

say "Publishing for ${DURATION}s"
peer publisher publisher --duration "$DURATION" \
  --topic com.example.orders=200 --topic com.example.payments=100 --topic com.example.reports=40 \
  --burst "com.example.reports=150@$(frac 0.27)-$(frac 0.40)"
PUBLISHER_PID=${PIDS[-1]}

at "$(frac 0.47)"
say "payments-1 leaves"
stop_pid "$PAYMENTS_PID"

at "$(frac 0.57)"
say "payments-1 is back"
peer payments-1b backend --procedure com.example.SUB_payments --name payments-1 --kind flaky

at "$(frac 0.70)"
say "Restarting the router"
stop_pid "$CROSSBAR_PID"
sleep 1
start_crossbar

wait "$PUBLISHER_PID" || true
say "Traffic done; 20 s without traffic"
sleep 20
END=$(date +%s.%N)

say "Rendering $OUT from Prometheus (--start $START --end $END)"
"$RENDER_VENV/bin/python" scripts/render_dashboard.py --prometheus "$PROM" \
  --dashboard doc/grafana/subtocall.json --start "$START" --end "$END" \
  --step "$STEP" --scrape-interval "$SCRAPE" --out "$OUT" \
  --note "Run: ${DURATION}s of traffic on three procedures, a backend leaving, a router restart."

say "Alerts of doc/prometheus/subtocall-alerts.yml that fired during the run"
curl -sfG "$PROM/api/v1/query" --data-urlencode "query=count by (alertname, alertstate) (max_over_time(ALERTS[$(( ${DURATION%.*} + 60 ))s]))" \
  | "$PY" -c 'import json,sys; [print(" ", r["metric"]["alertname"], r["metric"]["alertstate"]) for r in json.load(sys.stdin)["data"]["result"]]'
grep -h 'left:\|done:' "$WORK"/*.log || true
say "Done in $((SECONDS - began))s: $OUT"
