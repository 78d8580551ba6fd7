#!/bin/bash
# PostgreSQL's first start (docker/compose.yaml): the roles and databases of MLflow (runs and
# registry; users and permissions of its basic auth) and Prefect. Passwords from the environment.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username postgres \
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v prefect_pw="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
SQL
