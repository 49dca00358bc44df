#!/usr/bin/env bash
# Builds the project's container images with the local Docker engine, one after another,
# and records their sizes and build times in benchmarks/results/images.md.
#
# Usage: infra/build_images.sh [NAME...]      (default: every image in components/images.py)
# Environment:
#   RECML_IMAGE_TAG         tag (default: components/images.py's DEFAULT_TAG)
#   RECML_IMAGE_REGISTRY    also tag REGISTRY/recml-NAME:TAG (e.g. from infra/env.sh)
#   TRAINER_ACCELERATOR     cpu (default) | cuda | tpu: the JAX build in recml-trainer
#   RECML_BASE_IMAGE        base image (default recml-base:bookworm, made by bootstrap_docker.sh)
#   BEAM_SDK_IMAGE          Beam SDK image to take the Dataflow boot binary from (optional)
#   REVISION                source revision label (default: git HEAD, "unknown" outside git)
#   RECML_BUILD_NO_CACHE=1  build without the layer cache (a from-scratch build)
#   RECML_IMAGES_RESULTS    results file (default benchmarks/results/images.md; empty: none)
set -euo pipefail
cd "$(dirname "$0")/.."

python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
# Image names and default tag: components/images.py, loaded alone (no package imports).
read -r -a all_images <<<"$("$python" -c \
  'import runpy; print(*runpy.run_path("components/images.py")["IMAGES"])')"
default_tag=$("$python" -c \
  'import runpy; print(runpy.run_path("components/images.py")["DEFAULT_TAG"])')
tag=${RECML_IMAGE_TAG:-$default_tag}
registry=${RECML_IMAGE_REGISTRY:-}
accelerator=${TRAINER_ACCELERATOR:-cpu}
base_image=${RECML_BASE_IMAGE:-recml-base:bookworm}
revision=${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
results=${RECML_IMAGES_RESULTS-benchmarks/results/images.md}
logs=build/images

images=("$@")
[ ${#images[@]} -gt 0 ] || images=("${all_images[@]}")
for name in "${images[@]}"; do
  [[ " ${all_images[*]} " == *" $name "* ]] \
    || { echo "build_images: unknown image '$name' (known: ${all_images[*]})" >&2; exit 2; }
  [ -f "containers/$name/Dockerfile" ] \
    || { echo "build_images: containers/$name/Dockerfile is missing" >&2; exit 2; }
done

RECML_BASE_IMAGE=$base_image bash infra/bootstrap_docker.sh
mkdir -p "$logs"

build_args=(--build-arg "BASE_IMAGE=$base_image" --build-arg "REVISION=$revision"
            --build-arg "VERSION=$tag" --build-arg "ACCELERATOR=$accelerator")
[ -n "${BEAM_SDK_IMAGE:-}" ] && build_args+=(--build-arg "BEAM_SDK_IMAGE=$BEAM_SDK_IMAGE")
[ "${RECML_BUILD_NO_CACHE:-0}" = 1 ] && build_args+=(--no-cache)

rows=()
for name in "${images[@]}"; do
  ref="recml-$name:$tag"
  tags=(-t "$ref")
  [ -n "$registry" ] && tags+=(-t "${registry%/}/$ref")
  echo "build_images: building $ref (log: $logs/$name.log)" >&2
  start=$(date +%s)
  # --network host: PyPI is reached from build containers only through the host's network.
  if ! docker build --network host --pull=false -f "containers/$name/Dockerfile" \
      "${build_args[@]}" "${tags[@]}" . >"$logs/$name.log" 2>&1; then
    echo "build_images: building $ref failed; last lines of $logs/$name.log:" >&2
    tail -n 40 "$logs/$name.log" >&2
    exit 1
  fi
  seconds=$(( $(date +%s) - start ))
  size=$(docker image inspect -f '{{.Size}}' "$ref" | awk '{printf "%.0f", $1/1e6}')
  cached=$(grep -c 'Using cache' "$logs/$name.log" || true)
  detail=""
  [ "$name" = trainer ] && detail=" (ACCELERATOR=$accelerator)"
  rows+=("| \`$ref\`$detail | $size | $seconds | $([ "$cached" -eq 0 ] && echo yes || echo "no ($cached cached steps)") |")
  echo "build_images: $ref: ${size} MB in ${seconds} s" >&2
done

table=$(
  echo "| image | size (MB) | build time (s) | from scratch |"
  echo "|---|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
)
echo "$table"
if [ -n "$results" ]; then
  mkdir -p "$(dirname "$results")"
  {
    echo "# Container images"
    echo
    echo "Written by \`infra/build_images.sh\` on $(date -u +%Y-%m-%d) at revision \`${revision:0:12}\`:"
    echo "$(nproc) CPU cores (shared), Docker $(docker info --format '{{.ServerVersion}}, storage driver {{.Driver}}'),"
    echo "base image \`$base_image\`. Sizes are uncompressed (\`docker image inspect\`); build times"
    echo "include downloading every wheel from PyPI when not cached."
    echo
    echo "$table"
  } >"$results"
  echo "build_images: wrote $results" >&2
fi
