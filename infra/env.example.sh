# shellcheck shell=bash
# Environment-specific values: the one place for them. Copy, edit, source:
#   cp infra/env.example.sh infra/env.sh && $EDITOR infra/env.sh && source infra/env.sh
# infra/env.sh is read by infra/gcp/*.sh and infra/kind/*.sh; keep it out of git.
# No secret belongs here: the scripts use your gcloud login / the service accounts below.

# --- Google Cloud (the `vertex` target) ------------------------------------------------
export PROJECT=my-gcp-project                   # project id
export REGION=us-central1                       # Vertex AI, Dataflow, Artifact Registry
export BUCKET=gs://${PROJECT}-recml             # pipeline roots, Dataflow temp, staging
export PIPELINE_ROOT=${BUCKET}/pipeline-root
export AR_REPO=recml                            # Artifact Registry (Docker) repository
export REGISTRY=${REGION}-docker.pkg.dev/${PROJECT}/${AR_REPO}
export BQ_LOCATION=US                           # BigQuery dataset location
export BQ_DATASET=recml
export BQ_METRICS_TABLE=metrics
export METRICS_STORE=bq://${PROJECT}.${BQ_DATASET}.${BQ_METRICS_TABLE}
# Service accounts made by infra/gcp/setup.sh (least privilege, one per role):
export PIPELINES_SA=recml-pipelines@${PROJECT}.iam.gserviceaccount.com  # runs the DAG
export DATAFLOW_SA=recml-dataflow@${PROJECT}.iam.gserviceaccount.com    # Dataflow workers
export TRAINER_SA=recml-trainer@${PROJECT}.iam.gserviceaccount.com      # TPU CustomJobs
export BUILD_SA=recml-build@${PROJECT}.iam.gserviceaccount.com          # Cloud Build
# TPU training (Vertex CustomJob) and the trainer image's JAX build:
export TPU_MACHINE_TYPE=ct5lp-hightpu-4t
export TPU_TOPOLOGY=2x2
export TRAINER_ACCELERATOR=tpu

# --- what `recml run|compile|schedule|deploy` read (pipelines/env.py) -----------------
export RECML_PROJECT=${PROJECT}
export RECML_REGION=${REGION}
export RECML_PIPELINE_ROOT=${PIPELINE_ROOT}
export RECML_SERVICE_ACCOUNT=${PIPELINES_SA}
export RECML_STORE_URI=${METRICS_STORE}
export RECML_EXPERIMENT=recml

# --- images (read by components/images.py and infra/build_images.sh) ------------------
export RECML_IMAGE_REGISTRY=${REGISTRY}
export RECML_IMAGE_TAG=0.1.0

# --- local Kubeflow Pipelines on Kind (the `kfp` target) -------------------------------
export KIND_CLUSTER=recml
export KFP_PORT=8080
export KFP_HOST=http://localhost:${KFP_PORT}
# (for `--target kfp`, also: export RECML_KFP_HOST=${KFP_HOST})
