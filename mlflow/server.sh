#!/usr/bin/env bash
# Start an MLflow tracking server over the project's local store (the same SQLite database and
# artifact folder that `qlora` uses when MLFLOW_TRACKING_URI is unset).
#   mlflow/server.sh                 # http://127.0.0.1:5000
#   MLFLOW_PORT=5001 mlflow/server.sh
#   MLFLOW_HOST=0.0.0.0 mlflow/server.sh   # only behind auth: see the README's shared-server section
#   MLFLOW_STORE=/srv/mlflow mlflow/server.sh   # another store folder (mlflow.db + artifacts/)
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
mlflow_bin=${MLFLOW_BIN:-$(command -v mlflow || echo "$here/../.venv/bin/mlflow")}
store=${MLFLOW_STORE:-$here}
mkdir -p "$store/artifacts"
# The server's background job workers serve GenAI features this pipeline does not use.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "$mlflow_bin" server \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" \
  --host "$host" --port "$port" \
  --workers "${MLFLOW_WORKERS:-1}" "$@"
