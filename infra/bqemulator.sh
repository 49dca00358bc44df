#!/usr/bin/env bash
# A local BigQuery (the `bqemulator` PyPI package) for tests of the BigQuery code paths.
#
# Usage:
#   infra/bqemulator.sh install          # idempotent: venv + pinned packages + spatial extension
#   infra/bqemulator.sh start PORT       # install if missing, start on 127.0.0.1:PORT, wait for /healthz
#   infra/bqemulator.sh stop PORT        # stop the emulator started on PORT
#
# The emulator lives in its own venv (BQEMU_VENV, default .venv-bqemu at the repo
# root): it is a separate server process, and its ~30 dependencies (FastAPI,
# SQLAlchemy, OpenTelemetry, grpcio-tools, ...) belong in no image. Its state
# (HOME with the DuckDB extension directory, upload staging, pid and log files)
# stays inside that venv, so nothing is written to ~/.duckdb or /tmp/bqemu_uploads.
#
# Pitfalls handled here (see the notes on the emulator):
# * it runs `INSTALL spatial` at start-up, which needs the internet: the spatial
#   extension comes from the `duckdb-extension-spatial` wheel, linked into the
#   emulator's own HOME; duckdb and the extension must be the same version (1.5.4;
#   2.0 has no spatial wheel, 1.4.x crashes at start);
# * numpy is needed but undeclared;
# * its pytest plugin imports testcontainers: that only matters in a venv that
#   runs pytest, and the project's pytest never loads it (`-p no:bqemulator`).
# Client: bigquery.Client(project="test", credentials=AnonymousCredentials(),
#         client_options={"api_endpoint": "http://127.0.0.1:PORT"}).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${BQEMU_VENV:-.venv-bqemu}
project=${BQEMU_PROJECT:-test}
pins=(
  "bqemulator==1.4.0"
  "duckdb==1.5.4"
  "duckdb-extension-spatial==1.5.4"
  "numpy==2.4.6"
  "sqlglot==30.11.0"
)

find_python() {
  local cand
  for cand in ${PYTHON:-} python3.11 python3; do
    if command -v "$cand" >/dev/null \
        && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
      echo "$cand"; return
    fi
  done
  echo "bqemulator: Python >= 3.11 is required (set PYTHON=...)" >&2
  exit 1
}

install() {
  local state="$venv/state" stamp="$venv/.bqemu-installed"
  mkdir -p "$venv"
  exec 9>"$venv/.lock"   # two test sessions starting at once install only once
  command -v flock >/dev/null && flock 9
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ]; then
    [ -x "$venv/bin/python" ] || "$(find_python)" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
    echo "${pins[*]}" > "$stamp"
  fi
  # Link the wheel's spatial extension where DuckDB looks for it: $HOME/.duckdb/extensions/vX/PLATFORM/.
  local src dst
  read -r src dst < <("$venv/bin/python" - "$state/home" <<'EOF'
import pathlib, sys
import duckdb, duckdb_extension_spatial
ver = "v" + duckdb.__version__
platform = duckdb.execute("PRAGMA platform").fetchone()[0]
src = next(pathlib.Path(duckdb_extension_spatial.__file__).parent.rglob("spatial.duckdb_extension"))
dst = pathlib.Path(sys.argv[1]).resolve() / ".duckdb" / "extensions" / ver / platform
print(src.resolve(), dst)
EOF
  )
  mkdir -p "$dst" "$state/uploads" "$state/run"
  ln -sfn "$src" "$dst/spatial.duckdb_extension"
  exec 9>&-
}

start() {
  local port=${1:?usage: $0 start PORT}
  install
  local state
  state=$(cd "$venv/state" && pwd)
  local pidfile="$state/run/$port.pid" log="$state/run/$port.log"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "bqemulator: already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
    return
  fi
  HOME="$state/home" BQEMU_UPLOAD_STAGING_DIR="$state/uploads" \
    nohup "$venv/bin/bqemulator" start --rest-host 127.0.0.1 --rest-port "$port" \
      --grpc-host 127.0.0.1 --grpc-port 0 --project "$project" --ephemeral \
      --log-level warning >"$log" 2>&1 </dev/null &
  echo $! > "$pidfile"
  for _ in $(seq 1 300); do
    if "$venv/bin/python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "http://127.0.0.1:$port/healthz" 2>/dev/null; then
      echo "bqemulator: ready on http://127.0.0.1:$port (project $project, pid $(cat "$pidfile"))"
      return
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "bqemulator: exited during start-up; log $log:" >&2
      tail -n 30 "$log" >&2
      rm -f "$pidfile"
      exit 1
    fi
    sleep 0.1
  done
  echo "bqemulator: not healthy after 30 s; log $log" >&2
  stop "$port"
  exit 1
}

stop() {
  local port=${1:?usage: $0 stop PORT}
  local pidfile="$venv/state/run/$port.pid" pid
  [ -f "$pidfile" ] || { echo "bqemulator: nothing started on port $port"; return; }
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile" "$venv/state/run/$port.log"
  echo "bqemulator: stopped (port $port)"
}

case "${1:-}" in
  install) install; echo "bqemulator: installed in $venv" ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 install | start PORT | stop PORT" >&2; exit 2 ;;
esac
