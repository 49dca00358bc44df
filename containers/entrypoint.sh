#!/bin/sh
# Entrypoint of every recml image: runs the given command (`docker run IMAGE recml ...`,
# KFP's executor, a Vertex CustomJob's command), or `recml --help` when none is given.
#
# Dataflow starts a custom SDK container with only the Beam harness flags as arguments
# (--id=..., --logging_endpoint=..., ...). When the image carries the Beam boot binary
# (the preprocess image built with BEAM_SDK_IMAGE set) such a call goes to it.
set -e
if [ $# -eq 0 ]; then
  set -- recml --help
fi
case "$1" in
  --*)
    if [ -x /opt/apache/beam/boot ]; then
      exec /opt/apache/beam/boot "$@"
    fi
    echo "recml-entrypoint: got flags ($1 ...) but no command, and this image has no" \
      "Beam boot binary (/opt/apache/beam/boot); build it with BEAM_SDK_IMAGE set." >&2
    exit 2
    ;;
esac
exec "$@"
