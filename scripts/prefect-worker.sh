#!/usr/bin/env bash
# A process worker for the `gpu` work pool, run on the GPU box in this checkout.
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   scripts/prefect-worker.sh                 # = prefect worker start --pool gpu
#   POOL=gpu-2 scripts/prefect-worker.sh --limit 1
# Flow runs start in this checkout (the deployment's working directory) with this environment:
# set MLFLOW_TRACKING_URI here to track to a server instead of the local mlflow/ store.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api (scripts/prefect-server.sh prints it)}"
# The project's venv (make setup) if there is one, else the `prefect` on PATH.
if [ -z "${PREFECT_BIN:-}" ]; then
  if [ -x .venv/bin/prefect ]; then PREFECT_BIN=$PWD/.venv/bin/prefect; else PREFECT_BIN=prefect; fi
fi
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# Flow runs send a heartbeat this often; the automation flows/deploy.py creates marks a run Crashed
# after three are missed (flows/prefect_env.py: HEARTBEAT_S, CRASHED_AFTER_S).
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
exec "$PREFECT_BIN" worker start --pool "${POOL:-gpu}" --type process "$@"
