#!/usr/bin/env bash
# Runs the test tiers (the README's test command; .ci/run calls it through `make test`).
# The tiers are pytest markers; their selections live here only (the Makefile calls this
# script, tests/infra/test_make.py reads them with --print-selection):
#   unit         neither marker                   always;
#   integration  @pytest.mark.integration          always;
#   container    @pytest.mark.container            needs a Docker engine (infra/bootstrap_docker.sh).
# `all` (the default) runs the tiers one after another, each as its own pytest run, and the
# container tier only when a Docker engine can be started; with CI=true an engine that
# cannot be started fails the run instead of skipping the tier. `container` on its own
# always fails without an engine. Every tier runs even when an earlier one failed (unless
# -x/--exitfirst is given); the exit status is the first failing tier's.
# Usage: infra/test.sh [unit|integration|container|all] [PYTEST_ARGS...]
#          e.g. infra/test.sh unit -x -k preprocess;  infra/test.sh -k preprocess (all tiers)
#        infra/test.sh --print-selection [TIER]   prints "TIER<TAB>MARKER EXPRESSION" lines
set -euo pipefail
cd "$(dirname "$0")/.."
pytest=${PYTEST:-.venv/bin/pytest}
ci=${CI:-false}

tiers=(unit integration container)
selection() {  # $1: tier -> its pytest -m expression (pairwise disjoint, together: all tests)
  case "$1" in
    unit) echo "not integration and not container" ;;
    integration) echo "integration and not container" ;;
    container) echo "container" ;;
    *) return 1 ;;
  esac
}

if [ "${1:-}" = --print-selection ]; then
  if [ $# -gt 1 ]; then
    expr=$(selection "$2") || { echo "test.sh: unknown tier '$2' (${tiers[*]})" >&2; exit 2; }
    printf '%s\t%s\n' "$2" "$expr"
  else
    for t in "${tiers[@]}"; do printf '%s\t%s\n' "$t" "$(selection "$t")"; done
  fi
  exit 0
fi

tier=all
case "${1:-}" in
  unit | integration | container | all) tier=$1; shift ;;
esac

# System packages the tests use: shellcheck (static infra tests), chromium (the HTML
# report rendered headless as a person would see it).
missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

# Which tiers run. The engine is started before any test runs, so that CI fails at once.
run_tiers=()
skipped=""
case "$tier" in
  unit | integration) run_tiers=("$tier") ;;
  container)
    if ! bash infra/bootstrap_docker.sh; then
      echo "test.sh: ERROR: no Docker engine could be started (see above):" \
        "the container tier cannot run without one" >&2
      exit 1
    fi
    run_tiers=(container) ;;
  all)
    if bash infra/bootstrap_docker.sh; then
      echo "test.sh: Docker engine ready: running the unit, integration and container tiers" >&2
      run_tiers=(unit integration container)
    elif [ "$ci" = true ] || [ "$ci" = 1 ]; then
      echo "test.sh: ERROR: CI=$ci and no Docker engine could be started (see above):" \
        "the container tier cannot be skipped in CI" >&2
      exit 1
    else
      echo "test.sh: WARNING: no Docker engine: SKIPPING the container tier" \
        "(unit and integration tiers only)" >&2
      run_tiers=(unit integration)
      skipped="container skipped (no Docker engine)"
    fi ;;
esac

exitfirst=false
for a in "$@"; do
  case "$a" in -x | --exitfirst) exitfirst=true ;; esac
done

status=0       # the first failing tier's pytest status
ran_any=false  # whether any tier selected a test
summary=()
for t in "${run_tiers[@]}"; do
  expr=$(selection "$t")
  # Counted with the same arguments as the run (paths, -k), so that N is what runs.
  crc=0
  ids=$("$pytest" --collect-only -q -m "$expr" "$@" 2>/dev/null) || crc=$?
  # One node id per line; with an extra -q in the arguments, "file.py: N" per file.
  n=$(awk '/^[^ ]+::/ {n++} /^[^ ]+\.py: [0-9]+$/ {n += $2} END {print n + 0}' <<<"$ids")
  echo "test.sh: tier $t ($n tests): pytest -m \"$expr\"" >&2
  if [ "$crc" -eq 5 ]; then  # nothing selected (a collection error runs, and shows)
    summary+=("$t: no tests selected")
    continue
  fi
  rc=0
  "$pytest" -q -m "$expr" "$@" || rc=$?
  case "$rc" in
    0) ran_any=true; summary+=("$t passed") ;;
    5) summary+=("$t: no tests selected") ;;
    *) ran_any=true; summary+=("$t FAILED (pytest exit $rc)")
       [ "$status" -ne 0 ] || status=$rc ;;
  esac
  # Interrupted (2) or a usage error (4, the next tier would repeat it): stop here.
  if [ "$rc" -eq 2 ] || [ "$rc" -eq 4 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && $exitfirst; }; then
    summary+=("stopped after the $t tier")
    break
  fi
done
[ -z "$skipped" ] || summary+=("$skipped")

line=$(printf '%s; ' "${summary[@]}")
echo "test.sh: ${line%; }" >&2
if [ "$status" -eq 0 ] && ! $ran_any; then
  status=5  # as pytest: no test was selected at all
fi
exit "$status"
