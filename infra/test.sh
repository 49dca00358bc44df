#!/usr/bin/env bash
# Runs every test tier this machine can run (the README's test command; .ci/run calls it):
#   unit + integration  always;
#   container           when a Docker engine can be started (infra/bootstrap_docker.sh).
# With CI=true an engine that cannot be started fails the run instead of skipping the tier.
# Usage: infra/test.sh [PYTEST_ARGS...]      e.g. infra/test.sh -x -k preprocess
set -euo pipefail
cd "$(dirname "$0")/.."
pytest=${PYTEST:-.venv/bin/pytest}
ci=${CI:-false}

# System packages the tests use: shellcheck (static infra tests), chromium (the HTML
# report rendered headless as a person would see it).
missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

if bash infra/bootstrap_docker.sh; then
  echo "test.sh: Docker engine ready: running unit, integration and container tests" >&2
  exec "$pytest" -q "$@"
fi
if [ "$ci" = true ] || [ "$ci" = 1 ]; then
  echo "test.sh: ERROR: CI=$ci and no Docker engine could be started (see above):" \
    "the container tier cannot be skipped in CI" >&2
  exit 1
fi
echo "test.sh: WARNING: no Docker engine: SKIPPING the container tier" \
  "(unit and integration tests only)" >&2
exec "$pytest" -q -m "not container" "$@"
