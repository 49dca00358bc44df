"""The ``recml deploy`` command: a bundle becomes the served model.

    recml deploy --bundle /tmp/bundle                 # local registry; --target vertex [--dry-run]

Locally the bundle is published to the registry that ``recml serve`` reads
(:func:`serving.registry.publish`); on Vertex AI it is uploaded to the Model Registry and
deployed to an endpoint with the values of the pipeline's deploy step
(:mod:`components.deploy`), so the CLI and the pipeline cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines import env as env_lib
from serving import registry


def register(subparsers) -> None:
  """Adds ``deploy`` to the ``recml`` CLI."""
  p = subparsers.add_parser("deploy", help="deploy a bundle: local registry or Vertex AI endpoint")
  p.add_argument("--bundle", required=True, help="bundle directory (gs:// for Vertex)")
  p.add_argument("--target", choices=("local", "vertex"), default="local")
  p.add_argument("--registry", help="local registry folder (default: $RECML_REGISTRY or "
                 "<pipeline root>/registry, as for serve)")
  p.add_argument("--display-name", default="recml")
  p.add_argument("--endpoint", help="Vertex: existing endpoint resource name (default: create)")
  p.add_argument("--dry-run", action="store_true", help="Vertex: print the requests only")
  p.add_argument("--env-file", help="KEY=VALUE file, e.g. infra/env.sh")
  p.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
  from components import deploy as deploy_step  # pylint: disable=g-import-not-at-top  (kfp)
  try:
    if args.target == "local":
      record = deploy_step.run_local(args.bundle, args.registry or registry.default_registry())
      print(f"deployed version {record['version']}: {record['path']}")
      return 0
    env = env_lib.load_env(args.env_file)
    request = deploy_step.vertex_requests(env, artifact_uri=args.bundle,
                                          display_name=args.display_name,
                                          endpoint=args.endpoint)
    if args.dry_run:
      print(json.dumps(request, indent=2, sort_keys=True))
      return 0
    print(f"deployed: {deploy_step.vertex_deploy(request)}")
    return 0
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
