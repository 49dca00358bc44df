#!/usr/bin/env bash
# Builds every image on Cloud Build and pushes it to Artifact Registry
# ($REGISTRY/recml-NAME:$RECML_IMAGE_TAG), with infra/gcp/cloudbuild.yaml.
# Usage: infra/gcp/submit_build.sh       (after infra/gcp/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source infra/env.sh
: "${PROJECT:?}" "${REGION:?}" "${BUCKET:?}" "${AR_REPO:?}" "${BUILD_SA:?}"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
gcloud builds submit . --project="$PROJECT" --region="$REGION" \
  --config=infra/gcp/cloudbuild.yaml \
  --service-account="projects/$PROJECT/serviceAccounts/$BUILD_SA" \
  --gcs-source-staging-dir="$BUCKET/cloudbuild/source" \
  --ignore-file=infra/gcp/gcloudignore \
  --substitutions="_REGION=$REGION,_REPO=$AR_REPO,_TAG=${RECML_IMAGE_TAG:-0.1.0},_REVISION=$revision,_TRAINER_ACCELERATOR=${TRAINER_ACCELERATOR:-tpu}"
