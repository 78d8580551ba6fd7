#!/usr/bin/env bash
# A local Prefect server (API + UI) on 127.0.0.1, its SQLite database in the project's .prefect/.
#   scripts/prefect-server.sh                 # http://127.0.0.1:4200
#   PORT=4300 scripts/prefect-server.sh
# Then, in each shell that deploys, triggers or runs a worker:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   scripts/prefect-worker.sh                 # or: prefect worker start --pool gpu
set -euo pipefail
cd "$(dirname "$0")/.."
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-4200}"
# The project's venv (make setup) if there is one, else the `prefect` on PATH.
if [ -z "${PREFECT_BIN:-}" ]; then
  if [ -x .venv/bin/prefect ]; then PREFECT_BIN=$PWD/.venv/bin/prefect; else PREFECT_BIN=prefect; fi
fi
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
# No usage data leaves the machine, and the telemetry job does not contend for the SQLite lock.
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
mkdir -p "$PREFECT_HOME"
echo "Prefect UI: http://$HOST:$PORT   API: export PREFECT_API_URL=http://$HOST:$PORT/api" >&2
exec "$PREFECT_BIN" server start --host "$HOST" --port "$PORT"
