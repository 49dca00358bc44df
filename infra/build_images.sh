#!/usr/bin/env bash
# Builds the project's container images with the local Docker engine, one after another,
# from containers/Dockerfile (build arg IMAGE=NAME); then removes the untagged images these
# and earlier builds left behind (old versions of a tag, stages of the images not built:
# `docker image prune --filter label=ai.recml.build=1`, nothing else), prints how much
# disk the images take, and records sizes and build times in benchmarks/results/images.md.
# One build at a time on a machine (a second waits for the first).
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
#   RECML_CACHE_DIR         where the lock file lives (default ~/.cache/recml)
set -euo pipefail
cd "$(dirname "$0")/.."

python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
# Image names, default tag, Dockerfile and build label: components/images.py, loaded
# alone (no package imports).
mapfile -t meta < <("$python" -c 'import runpy; m = runpy.run_path("components/images.py")
print(" ".join(m["IMAGES"]), m["DEFAULT_TAG"], m["DOCKERFILE"], m["BUILD_LABEL"], sep="\n")')
[ ${#meta[@]} -eq 4 ] || { echo "build_images: could not read components/images.py" >&2; exit 2; }
read -r -a all_images <<<"${meta[0]}"
default_tag=${meta[1]}
dockerfile=${meta[2]}
build_label=${meta[3]}
tag=${RECML_IMAGE_TAG:-$default_tag}
registry=${RECML_IMAGE_REGISTRY:-}
accelerator=${TRAINER_ACCELERATOR:-cpu}
base_image=${RECML_BASE_IMAGE:-recml-base:bookworm}
revision=${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
results=${RECML_IMAGES_RESULTS-benchmarks/results/images.md}
logs=build/images
cache=${RECML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recml}

images=("$@")
[ ${#images[@]} -gt 0 ] || images=("${all_images[@]}")
for name in "${images[@]}"; do
  [[ " ${all_images[*]} " == *" $name "* ]] \
    || { echo "build_images: unknown image '$name' (known: ${all_images[*]})" >&2; exit 2; }
done
[ -f "$dockerfile" ] || { echo "build_images: $dockerfile is missing" >&2; exit 2; }

# One build at a time: a prune must not remove a stage that another build is using.
mkdir -p "$cache"
exec 8>"$cache/build_images.lock"
if ! flock -n 8; then
  echo "build_images: waiting for another build_images.sh on this machine" >&2
  flock 8
fi
# The lock's descriptor stays out of the engine that bootstrap may start (it outlives us).
RECML_BASE_IMAGE=$base_image bash infra/bootstrap_docker.sh 8>&-
mkdir -p "$logs"

common_args=(--build-arg "BASE_IMAGE=$base_image" --build-arg "REVISION=$revision"
             --build-arg "VERSION=$tag")
[ "${RECML_BUILD_NO_CACHE:-0}" = 1 ] && common_args+=(--no-cache)

rows=()
for name in "${images[@]}"; do
  ref="recml-$name:$tag"
  tags=(-t "$ref")
  [ -n "$registry" ] && tags+=(-t "${registry%/}/$ref")
  build_args=("${common_args[@]}" --build-arg "IMAGE=$name")
  case "$name" in
    trainer) build_args+=(--build-arg "ACCELERATOR=$accelerator") ;;
    preprocess) [ -z "${BEAM_SDK_IMAGE:-}" ] \
                  || build_args+=(--build-arg "BEAM_SDK_IMAGE=$BEAM_SDK_IMAGE") ;;
  esac
  echo "build_images: building $ref (log: $logs/$name.log)" >&2
  start=$(date +%s)
  # --network host: PyPI is reached from build containers only through the host's network.
  if ! docker build --network host --pull=false -f "$dockerfile" \
      "${build_args[@]}" "${tags[@]}" . >"$logs/$name.log" 2>&1; then
    echo "build_images: building $ref failed; last lines of $logs/$name.log:" >&2
    tail -n 40 "$logs/$name.log" >&2
    exit 1
  fi
  seconds=$(( $(date +%s) - start ))
  size=$(docker image inspect -f '{{.Size}}' "$ref" | awk '{printf "%.0f", $1/1e6}')
  # Whether the (slow) dependency step ran or came from the layer cache.
  deps=installed
  if grep -A2 'RUN python3 install_deps.py' "$logs/$name.log" | grep 'Using cache' >/dev/null
  then deps=cached; fi
  detail=""
  [ "$name" = trainer ] && detail=" (ACCELERATOR=$accelerator)"
  rows+=("| \`$ref\`$detail | $size | $seconds | $deps |")
  echo "build_images: $ref: ${size} MB in ${seconds} s" >&2
done

# Untagged images with the build label: older versions of a rebuilt tag, the stages of the
# images not built here. Never anything without the label, never a tagged image.
reclaimed=$(docker image prune -f --filter "label=$build_label" \
  | sed -n 's/^Total reclaimed space: //p')
echo "build_images: pruned the untagged images of builds (label $build_label):" \
  "${reclaimed:-0B} freed" >&2
# Each image's size counts the layers it shares with others (the base image, the user);
# `docker system df` counts every layer once, for all images on this engine.
disk=$(docker system df --format '{{.Type}} {{.Size}}' | awk '$1 == "Images" {print $2}')
untagged=$(docker image ls --quiet --filter dangling=true | wc -l)
echo "build_images: the images take on disk (docker image ls):" >&2
docker image ls --filter "reference=recml-*" --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' >&2
echo "build_images: all images on this Docker engine: $disk (docker system df, shared" \
  "layers once); untagged images left: $untagged" >&2

table=$(
  echo "| image | size (MB) | build time (s) | dependencies |"
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
    echo "include downloading every wheel from PyPI when not cached. All images on the engine"
    echo "after the build took $disk (\`docker system df\`: shared layers counted once)."
    echo
    echo "$table"
  } >"$results"
  echo "build_images: wrote $results" >&2
fi
