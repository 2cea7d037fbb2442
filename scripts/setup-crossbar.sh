#!/usr/bin/env bash
# Creates (once) the pinned Crossbar virtualenv used by the tests, the demo and
# the benchmark, and prints its path. Idempotent: about 1 s when present.
#
#   CROSSBAR_VENV   where to put it (default: <repo>/.venv/crossbar-<version>)
#   CROSSBAR_PYTHON which python3.11 to use
#
# The venv also holds autobahn-python (a crossbar dependency) plus redis-py,
# which the Python test peers use.
set -euo pipefail
CB_VERSION="26.10.1"
REDIS_PY_VERSION="5.2.1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CROSSBAR_VENV:-$ROOT/.venv/crossbar-$CB_VERSION}"
PY="${CROSSBAR_PYTHON:-$(command -v python3.11 || command -v python3 || echo python3.11)}"
# The stamp is written last, so a half-finished install is redone, not trusted.
STAMP="$VENV/.subtocall-ready-$CB_VERSION-$REDIS_PY_VERSION"

if [ -f "$STAMP" ] && [ -x "$VENV/bin/crossbar" ]; then
  echo "$VENV"
  exit 0
fi

echo "setup-crossbar: creating $VENV (crossbar==$CB_VERSION; takes 30-90 s once)" >&2
rm -rf "$VENV" "$VENV.uvtool"
mkdir -p "$(dirname "$VENV")"
# uv is much faster than pip. PYTHONDONTWRITEBYTECODE may be set in the
# environment, so bytecode is compiled at install time (otherwise every
# crossbar start pays 8-11 s of compilation).
if "$PY" -m venv "$VENV.uvtool" >&2 && "$VENV.uvtool/bin/pip" install -q uv >&2; then
  UV="$VENV.uvtool/bin/uv"
  "$UV" venv -q -p "$PY" "$VENV" >&2
  VIRTUAL_ENV="$VENV" "$UV" pip install -q --compile-bytecode \
    "crossbar==$CB_VERSION" "redis==$REDIS_PY_VERSION" >&2
  # bjdata's sdist is built against numpy 1.x; rebuilding it against the
  # installed numpy silences a harmless but noisy traceback on every import.
  VIRTUAL_ENV="$VENV" "$UV" pip install -q --compile-bytecode --no-build-isolation \
    --reinstall --no-deps bjdata==0.6.6 >&2 || true
else
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "crossbar==$CB_VERSION" "redis==$REDIS_PY_VERSION" >&2
  "$VENV/bin/pip" install -q --no-build-isolation --force-reinstall --no-deps bjdata==0.6.6 >&2 || true
fi
rm -rf "$VENV.uvtool"
"$VENV/bin/crossbar" version >/dev/null 2>&1
"$VENV/bin/python" -c "import autobahn, redis" >&2
touch "$STAMP"
echo "$VENV"
