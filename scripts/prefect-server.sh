#!/usr/bin/env bash
# A local Prefect server (API + UI) on 127.0.0.1, its SQLite database in the project's .prefect/.
#   scripts/prefect-server.sh                 # http://127.0.0.1:4200
#   PORT=4300 scripts/prefect-server.sh       # UI and API on 4300 (the UI is told to call the API there)
# Then, in each shell that deploys, triggers or runs a worker:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   scripts/prefect-worker.sh                 # or: prefect worker start --pool gpu
# Behind a proxy or on HOST=0.0.0.0, set PREFECT_UI_API_URL to the API's address as browsers reach it.
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
# The UI asks /ui-settings where the API is; Prefect answers from these settings (or a
# PREFECT_API_URL left in the shell), not from --port, so without them it points at :4200.
export PREFECT_SERVER_API_HOST="$HOST" PREFECT_SERVER_API_PORT="$PORT"
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://$HOST:$PORT/api}"
export PREFECT_UI_URL="${PREFECT_UI_URL:-http://$HOST:$PORT}"
# Concurrency slots are leases; kept in memory (Prefect's default) they are lost when the server
# dies, and a slot held then is never given back. On disk, in $PREFECT_HOME/concurrency_leases,
# they outlive a restart, and one whose holder died lapses and is taken back.
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem
mkdir -p "$PREFECT_HOME"
echo "Prefect UI: $PREFECT_UI_URL   API: export PREFECT_API_URL=http://$HOST:$PORT/api" >&2
exec "$PREFECT_BIN" server start --host "$HOST" --port "$PORT"
