# Shared by scripts/demo.sh and scripts/demo-ha.sh (sourced from the
# repository's root, not run): the Crossbar virtualenv, the release build, a
# work directory, a free port, a local Crossbar, and the cleanup that stops
# every process in PIDS in reverse start order on exit.

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Sets VENV, PY, BIN, WORK and PIDS, and the traps that clean up on exit.
demo_setup() {
  say "Crossbar virtualenv (first run installs crossbar==26.10.1, about a minute)"
  VENV="$(bash scripts/setup-crossbar.sh)"
  PY="$VENV/bin/python"

  say "Building subtocall"
  cargo build --release --quiet --bin subtocall
  BIN="$ROOT/target/release/subtocall"

  WORK="$(mktemp -d -t subtocall-demo-XXXXXX)"
  PIDS=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

cleanup() {
  # Reverse start order: backends and subtocall first, the router last.
  # 12 s each: past subtocall's drain (SUBTOCALL_SHUTDOWN_TIMEOUT, 10 s).
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    for _ in $(seq 120); do kill -0 "${PIDS[$i]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${PIDS[$i]}" 2>/dev/null || true
  done
  rm -rf "$WORK"
}

# A free port on 127.0.0.1.
free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts the example router config bound to 127.0.0.1 on a free port and
# waits until it accepts connections; sets URL.
start_crossbar() {
  local port
  port="$(free_port)"
  mkdir -p "$WORK/.crossbar"
  "$PY" scripts/local_router.py config "$port" "$WORK/.crossbar/config.json"
  URL="ws://127.0.0.1:$port/ws"

  say "Starting Crossbar on $URL (log: $WORK/crossbar.log)"
  "$VENV/bin/crossbar" start --cbdir "$WORK/.crossbar" --loglevel warn --color false \
    --shutdownafter 900 >"$WORK/crossbar.log" 2>&1 &
  PIDS+=($!)
  "$PY" scripts/local_router.py wait "$URL"
}

wait_for() { # file pattern seconds
  local end=$((SECONDS + $3))
  until grep -q "$2" "$1" 2>/dev/null; do
    if [ $SECONDS -ge $end ]; then echo "timed out waiting for '$2' in $1" >&2; exit 1; fi
    sleep 0.1
  done
}
