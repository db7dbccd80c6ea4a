#!/usr/bin/env bash
# `make demo`: the whole chain on the embedded defaults (SQLite source, DuckDB warehouse, local
# datasets, MLflow on SQLite, Prefect's ephemeral API), then where to look and how to serve.
set -euo pipefail
cd "$(dirname "$0")/.."
export PAYLATER_HOME=${PAYLATER_HOME:-$PWD/var}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
export BENTOML_HOME=${BENTOML_HOME:-$PAYLATER_HOME/bentoml}
users=${DEMO_USERS:-20000}
months=${DEMO_MONTHS:-12}
bin=.venv/bin
step() { printf '\n==> %s\n' "$*"; }

# The demo runs on the embedded defaults only: backend URLs exported for a real deployment (the
# README's "Running it for real") must not receive synthetic users or a demo candidate.
# DEMO_KEEP_BACKENDS=1 keeps them, for a demo on backends of your own (a local PostgreSQL).
ignored=()
[ "${DEMO_KEEP_BACKENDS:-0}" = 1 ] || for var in PAYLATER_SOURCE_URL PAYLATER_WAREHOUSE_URL PAYLATER_DATASET_URL \
  PAYLATER_WORKER_DATABASE_URL MLFLOW_TRACKING_URI PAYLATER_MLFLOW_TRACKING_URI PREFECT_API_URL; do
  if [ -n "${!var:-}" ]; then
    echo "demo: ignoring $var for the demo (it uses the embedded defaults under PAYLATER_HOME)"
    ignored+=("$var")
    unset "$var"
  fi
done

# The data stores are rebuilt from a fresh simulated world; MLflow keeps its history, as it would.
step "resetting the demo data stores under $PAYLATER_HOME (MLflow history is kept)"
rm -rf "$PAYLATER_HOME/source.db" "$PAYLATER_HOME/warehouse.duckdb" "$PAYLATER_HOME/datasets" "$PAYLATER_HOME/truth"
mkdir -p "$PAYLATER_HOME"

step "simulating $users users over $months months into the source database"
$bin/paylater demo-data generate --users "$users" --months "$months"

step "daily pipeline: sync the warehouse, then build features (as_of = yesterday in Tokyo)"
$bin/python -m flows.daily_pipeline

step "monthly retrain: train, track in MLflow, register, gate, stage"
$bin/python -m flows.monthly_retrain

step "the model registry"
$bin/paylater registry list

if [ ${#ignored[@]} -gt 0 ]; then
  printf '\nYour shell still exports %s: unset them before the commands below, which would\notherwise use those backends instead of the demo'"'"'s.\n' "${ignored[*]}"
fi

cat <<TXT

Results
  source database   $PAYLATER_HOME/source.db
  warehouse         $PAYLATER_HOME/warehouse.duckdb
  datasets          $PAYLATER_HOME/datasets  (training/ and scoring/, each as_of with manifest.json)
  MLflow            $PAYLATER_HOME/mlflow.db and $PAYLATER_HOME/mlartifacts

Look at it
  MLflow UI:        .venv/bin/mlflow ui --backend-store-uri sqlite:///$PAYLATER_HOME/mlflow.db --host 127.0.0.1 --port 5000
  Registry:         PAYLATER_HOME=$PAYLATER_HOME .venv/bin/paylater registry list     (show VERSION, history, compare A B)
TXT

# MLflow keeps its history across demos: a candidate trained on a regenerated world can fail the
# gates against the production model of an earlier one (or any candidate an absolute gate), and
# then nothing is staged.
if ! $bin/paylater registry show staging >/dev/null 2>&1; then
  cat <<TXT

Nothing is staged: the newest candidate did not pass the gates (its reasons:
PAYLATER_HOME=$PAYLATER_HOME .venv/bin/paylater registry show VERSION). A production version, if the registry list shows one,
keeps serving:
  PAYLATER_HOME=$PAYLATER_HOME BENTOML_HOME=$BENTOML_HOME PAYLATER_SERVE_STAGE=production .venv/bin/bentoml serve bentos.service:PaylaterScorer --host 127.0.0.1 --port 3000
To start the registry afresh, remove $PAYLATER_HOME/mlflow.db and $PAYLATER_HOME/mlartifacts and run make demo again.
TXT
  exit 0
fi

cat <<TXT

Serve the staged candidate (the staging service)
  PAYLATER_HOME=$PAYLATER_HOME BENTOML_HOME=$BENTOML_HOME PAYLATER_SERVE_STAGE=staging .venv/bin/bentoml serve bentos.service:PaylaterScorer --host 127.0.0.1 --port 3000
  curl -s -X POST 127.0.0.1:3000/v2/score -H 'content-type: application/json' -d '{"user_id": 1, "amount_jpy": 10000}'
Verify it, then promote it (promoting builds the version's bento into BENTOML_HOME)
  PAYLATER_HOME=$PAYLATER_HOME .venv/bin/paylater registry verify --stage staging --url http://127.0.0.1:3000
  PAYLATER_HOME=$PAYLATER_HOME BENTOML_HOME=$BENTOML_HOME .venv/bin/paylater registry promote VERSION --to production --reason "checked on staging"
TXT
