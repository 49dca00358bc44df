#!/usr/bin/env bash
# Creates a local Kind cluster running Kubeflow Pipelines standalone, loads the project's
# images into it and port-forwards the KFP UI and API to http://localhost:$KFP_PORT.
# Then: `recml run --target kfp --kfp-host http://localhost:8080 ...`.
#
# Needs docker, kind and kubectl (>= 1.21, for `apply -k` with remote refs) on PATH and
# network access to GitHub and the image registries the KFP manifests name. Idempotent:
# an existing cluster is reused, manifests are re-applied, images re-loaded.
#
# Usage: infra/kind/up.sh
# Environment (defaults; infra/env.sh overrides): KIND_CLUSTER=recml, KFP_PORT=8080,
#   RECML_DATA_DIR=../shared/datasets (mounted read-only at /data in the node),
#   RECML_IMAGE_TAG, RECML_SKIP_BUILD=1 (load the images as they are).
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned versions: the KFP backend matching the kfp-server-api pin in
# requirements/constraints.txt, and a Kind node image of a Kubernetes version that this
# KFP release supports. Always exact versions, never a moving branch or tag.
KFP_VERSION=2.17.3
KIND_NODE_IMAGE=kindest/node:v1.32.2
KFP_MANIFESTS=github.com/kubeflow/pipelines/manifests/kustomize

# shellcheck source=/dev/null
[ -f infra/env.sh ] && source infra/env.sh
cluster=${KIND_CLUSTER:-recml}
port=${KFP_PORT:-8080}
data_dir=${RECML_DATA_DIR:-../shared/datasets}
state=${XDG_STATE_HOME:-$HOME/.local/state}/recml-kind
log() { echo "kind/up: $*" >&2; }

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { log "ERROR: $tool is not on PATH"; exit 1; }
done
mkdir -p "$state"

# --- cluster ---------------------------------------------------------------------------
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  log "cluster $cluster exists"
else
  # cluster.yaml mounts /tmp/recml-kind-data; point it at the data folder.
  ln -sfn "$(cd "$data_dir" && pwd)" /tmp/recml-kind-data
  kind create cluster --name "$cluster" --image "$KIND_NODE_IMAGE" \
    --config infra/kind/cluster.yaml --wait 180s
fi
kubectl config use-context "kind-$cluster" >/dev/null

# --- Kubeflow Pipelines standalone -----------------------------------------------------
log "installing Kubeflow Pipelines $KFP_VERSION (platform-agnostic manifests)"
kubectl apply -k "$KFP_MANIFESTS/cluster-scoped-resources?ref=$KFP_VERSION"
kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
kubectl apply -k "$KFP_MANIFESTS/env/platform-agnostic?ref=$KFP_VERSION"
log "waiting for the KFP deployments (first start pulls the images: ~5-10 min)"
kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=1200s

# --- the project's images --------------------------------------------------------------
# Steps use versioned tags, so pods take the loaded images (pull policy IfNotPresent).
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
mapfile -t images < <("$python" -c \
  'import runpy; m = runpy.run_path("components/images.py")
for n in m["IMAGES"]: print(m["image"](n, registry=""))')
if [ "${RECML_SKIP_BUILD:-0}" != 1 ]; then
  RECML_IMAGE_REGISTRY="" bash infra/build_images.sh
fi
for ref in "${images[@]}"; do
  log "loading $ref"
  kind load docker-image --name "$cluster" "$ref"
done

# --- UI and API on localhost -----------------------------------------------------------
pidfile="$state/port-forward-$cluster.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  log "port-forward already running (pid $(cat "$pidfile"))"
else
  nohup kubectl -n kubeflow port-forward svc/ml-pipeline-ui "$port:80" \
    >"$state/port-forward-$cluster.log" 2>&1 &
  echo $! >"$pidfile"
fi
log "KFP UI and API: http://localhost:$port   (infra/kind/down.sh removes the cluster)"
