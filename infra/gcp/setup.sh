#!/usr/bin/env bash
# Creates what a Vertex AI deployment of RecML needs, in the project of infra/env.sh:
# APIs, the GCS bucket (pipeline roots, Dataflow temp), the Artifact Registry repository,
# the BigQuery dataset + metrics table, and one service account per role with
# least-privilege grants. Idempotent: existing resources are left as they are.
#
# Usage: infra/gcp/setup.sh            (after: cp infra/env.example.sh infra/env.sh; edit)
# Needs: gcloud and bq (Google Cloud CLI), logged in as someone who may create these
# (roles/owner, or the admin roles for each service plus resourcemanager.projectIamAdmin).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f infra/env.sh ] || { echo "gcp/setup: create infra/env.sh from infra/env.example.sh" >&2; exit 1; }
# shellcheck source=/dev/null
source infra/env.sh
: "${PROJECT:?}" "${REGION:?}" "${BUCKET:?}" "${AR_REPO:?}" "${BQ_LOCATION:?}"
: "${BQ_DATASET:?}" "${BQ_METRICS_TABLE:?}" "${PIPELINES_SA:?}" "${DATAFLOW_SA:?}"
: "${TRAINER_SA:?}" "${BUILD_SA:?}"
log() { echo "gcp/setup: $*" >&2; }
gcloud config set project "$PROJECT" >/dev/null

# --- APIs ------------------------------------------------------------------------------
log "enabling APIs"
gcloud services enable \
  aiplatform.googleapis.com artifactregistry.googleapis.com bigquery.googleapis.com \
  bigquerystorage.googleapis.com cloudbuild.googleapis.com compute.googleapis.com \
  dataflow.googleapis.com iam.googleapis.com logging.googleapis.com \
  monitoring.googleapis.com storage.googleapis.com

# --- storage ---------------------------------------------------------------------------
if ! gcloud storage buckets describe "$BUCKET" >/dev/null 2>&1; then
  log "creating bucket $BUCKET"
  gcloud storage buckets create "$BUCKET" --location="$REGION" \
    --uniform-bucket-level-access --public-access-prevention
fi
if ! gcloud artifacts repositories describe "$AR_REPO" --location="$REGION" >/dev/null 2>&1; then
  log "creating Artifact Registry repository $AR_REPO"
  gcloud artifacts repositories create "$AR_REPO" --location="$REGION" \
    --repository-format=docker --description="RecML pipeline images"
fi

# --- BigQuery: the metrics store -------------------------------------------------------
# Schema: infra/gcp/metrics_table.json, the same as components/metrics_store.METRICS_SCHEMA
# (tests/infra/test_static.py compares them).
if ! bq --project_id="$PROJECT" show --dataset "$PROJECT:$BQ_DATASET" >/dev/null 2>&1; then
  log "creating dataset $PROJECT:$BQ_DATASET"
  bq --project_id="$PROJECT" --location="$BQ_LOCATION" mk --dataset \
    --description="RecML pipeline metrics" "$PROJECT:$BQ_DATASET"
fi
table="$PROJECT:$BQ_DATASET.$BQ_METRICS_TABLE"
if ! bq --project_id="$PROJECT" show "$table" >/dev/null 2>&1; then
  log "creating table $table"
  bq --project_id="$PROJECT" mk --table \
    --schema=infra/gcp/metrics_table.json \
    --clustering_fields=dataset,model,run_id \
    --description="One row per (run_id, split, metric, k); written idempotently" \
    "$table"
fi

# --- service accounts and their grants -------------------------------------------------
ensure_sa() {  # $1: email, $2: display name
  if ! gcloud iam service-accounts describe "$1" >/dev/null 2>&1; then
    log "creating service account $1"
    gcloud iam service-accounts create "${1%%@*}" --display-name="$2"
  fi
}
grant_project() {  # $1: service account email, $2...: roles
  local sa=$1; shift
  for role in "$@"; do
    gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$sa" \
      --role="$role" --condition=None >/dev/null
  done
}
grant_bucket() { gcloud storage buckets add-iam-policy-binding "$BUCKET" \
  --member="serviceAccount:$1" --role="$2" >/dev/null; }
grant_repo() { gcloud artifacts repositories add-iam-policy-binding "$AR_REPO" \
  --location="$REGION" --member="serviceAccount:$1" --role="$2" >/dev/null; }
grant_table() { bq --project_id="$PROJECT" add-iam-policy-binding \
  --member="serviceAccount:$1" --role="$2" "$table" >/dev/null; }
grant_act_as() {  # $1 may run workloads as $2
  gcloud iam service-accounts add-iam-policy-binding "$2" \
    --member="serviceAccount:$1" --role=roles/iam.serviceAccountUser >/dev/null; }

ensure_sa "$PIPELINES_SA" "RecML pipelines (Vertex AI Pipelines jobs and their light steps)"
ensure_sa "$DATAFLOW_SA" "RecML Dataflow workers (preprocess)"
ensure_sa "$TRAINER_SA" "RecML TPU training (Vertex AI CustomJobs)"
ensure_sa "$BUILD_SA" "RecML image builds (Cloud Build)"
sleep 5  # new service accounts take a moment to become visible to IAM

log "granting roles"
# Pipelines: run the DAG, launch Dataflow and CustomJobs as their own accounts, write the
# metrics table, register and deploy models; its artifacts live in the bucket.
grant_project "$PIPELINES_SA" roles/aiplatform.user roles/dataflow.developer \
  roles/bigquery.jobUser roles/logging.logWriter
grant_bucket "$PIPELINES_SA" roles/storage.objectAdmin
grant_repo "$PIPELINES_SA" roles/artifactregistry.reader
grant_table "$PIPELINES_SA" roles/bigquery.dataEditor
grant_act_as "$PIPELINES_SA" "$DATAFLOW_SA"
grant_act_as "$PIPELINES_SA" "$TRAINER_SA"
# Dataflow workers: the worker role, read/write data in the bucket, pull the SDK image,
# read raw events from BigQuery (add dataViewer on the source dataset if it is elsewhere).
grant_project "$DATAFLOW_SA" roles/dataflow.worker roles/bigquery.readSessionUser \
  roles/bigquery.jobUser
grant_bucket "$DATAFLOW_SA" roles/storage.objectAdmin
grant_repo "$DATAFLOW_SA" roles/artifactregistry.reader
# TPU training: read data and write checkpoints in the bucket, logs and metrics.
grant_project "$TRAINER_SA" roles/logging.logWriter roles/monitoring.metricWriter
grant_bucket "$TRAINER_SA" roles/storage.objectAdmin
grant_repo "$TRAINER_SA" roles/artifactregistry.reader
# Cloud Build: read the uploaded source, push images, write build logs.
grant_bucket "$BUILD_SA" roles/storage.objectViewer
grant_repo "$BUILD_SA" roles/artifactregistry.writer
grant_project "$BUILD_SA" roles/logging.logWriter

log "done. Build and push the images: infra/gcp/submit_build.sh"
log "Users who submit runs need roles/aiplatform.user and roles/iam.serviceAccountUser on $PIPELINES_SA."
