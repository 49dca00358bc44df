#!/usr/bin/env bash
# Stops the KFP port-forward and deletes the Kind cluster made by infra/kind/up.sh.
# Usage: infra/kind/down.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
[ -f infra/env.sh ] && source infra/env.sh
cluster=${KIND_CLUSTER:-recml}
state=${XDG_STATE_HOME:-$HOME/.local/state}/recml-kind

pidfile="$state/port-forward-$cluster.pid"
if [ -f "$pidfile" ]; then
  kill "$(cat "$pidfile")" 2>/dev/null || true
  rm -f "$pidfile"
fi
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind delete cluster --name "$cluster"
else
  echo "kind/down: no cluster named $cluster" >&2
fi
