"""The ``recml serve`` and ``recml export`` commands.

    recml export --model-dir runs/.../train/model --data runs/.../preprocess/dataset --output /tmp/bundle
    recml serve --bundle /tmp/bundle --port 8080     # or no --bundle: the local registry's current model

``recml deploy`` (local registry or Vertex AI endpoint) needs the pipeline's environment
and the Vertex SDK, so it lives in :mod:`pipelines.deploy_cli`.

Failures: a bundle that cannot be loaded at start-up (missing, incomplete, corrupt) makes
``recml serve`` exit non-zero with the reason on stderr, so that the platform restarts or
reports the container. A device process that dies is restarted with exponential backoff
(0.5 s doubling to 30 s); meanwhile health and predict answer 503 with ``Retry-After``.
After ``--max-restarts`` restarts (default 6) without a minute of uptime in between, the
server exits non-zero. The health route names the device process (``device_pid``) and
counts its restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sys
from typing import Any

from serving import predictor, protocol, registry, server
from serving.device import Backoff
from trainers import export


def _serve_description() -> str:
  """The HTTP contract (:mod:`serving.server`) and the request format
  (:mod:`serving.protocol`), for ``recml serve --help``."""
  contract = server.__doc__.split("\n\n")[:2]
  request = itertools.takewhile(lambda p: not p.startswith("A malformed request"),
                                protocol.__doc__.split("\n\n"))
  return "\n\n".join([*contract, *request])


def register(subparsers) -> None:
  """Adds ``serve`` and ``export`` to the ``recml`` CLI."""
  p = subparsers.add_parser("serve", help="serve a model bundle over HTTP (Vertex AI contract)",
                            description=_serve_description(),
                            epilog=next(p for p in __doc__.split("\n\n")
                                        if p.startswith("Failures:")),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--bundle", help="bundle directory or gs:// URI (default: $AIP_STORAGE_URI, "
                 "else the current model of the local registry)")
  p.add_argument("--registry", help="local registry folder (default: $RECML_REGISTRY or "
                 "<pipeline root>/registry)")
  p.add_argument("--port", type=int, help="default: $AIP_HTTP_PORT or 8080")
  p.add_argument("--host", help="default: 0.0.0.0 when $AIP_HTTP_PORT is set (a container), "
                 "else 127.0.0.1")
  p.add_argument("--max-batch", type=int, default=64,
                 help="largest micro-batch (buckets are powers of two up to it)")
  p.add_argument("--length-buckets", type=_int_list, metavar="N,N,...",
                 help="padded history lengths, one compiled shape each (default: powers of "
                 "two from 32 below max_len, then max_len)")
  p.add_argument("--max-instances", type=int, default=protocol.Limits.max_instances,
                 help="most instances per request; more get 400 (default %(default)s)")
  p.add_argument("--max-candidates", type=int, default=protocol.Limits.max_candidates,
                 help="ranking: most candidates per instance; more get 400 "
                 "(default %(default)s)")
  p.add_argument("--max-body-bytes", type=int, default=protocol.Limits.max_body_bytes,
                 help="largest request body in bytes; larger ones get 413 "
                 "(default %(default)s = 1 MiB)")
  p.add_argument("--cpu-threads", type=int, default=1,
                 help="XLA CPU threads per device call (default 1: the event loop and the load "
                 "keep the other cores; measured 2x faster batches on a busy 2-core machine); "
                 "0 = XLA's default")
  p.add_argument("--max-restarts", type=int, default=Backoff.max_restarts,
                 help="device process restarts in a row (without a minute of uptime between "
                 "them) before the server exits non-zero (default %(default)s)")
  p.add_argument("--naive", action="store_true",
                 help="no micro-batching: one request at a time (benchmark baseline)")
  p.set_defaults(func=cmd_serve)

  p = subparsers.add_parser("export", help="write the serving bundle of a trained model")
  p.add_argument("--model-dir", required=True, help="training work directory")
  p.add_argument("--data", help="dataset directory with vocab/items.txt (ranking: "
                 "dataset_info.json and vocab/, copied into the bundle; default: the "
                 "config's data_dir)")
  p.add_argument("--output", required=True, help="bundle directory (new or empty)")
  p.add_argument("--max-k", type=int, default=100)
  p.set_defaults(func=cmd_export)


def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def _buckets(max_batch: int) -> tuple[int, ...]:
  return predictor.doubling_buckets(1, max_batch)


def check_bundle(path: str) -> dict[str, Any]:
  """What can be checked before binding the port, without JAX: the folder, its format
  and every file against its sha256 (``bundle.json``). Raises OSError or ValueError."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"bundle {path} does not exist or is not a directory")
  return export.verify_bundle_files(path)


def cmd_serve(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
  port, health_route, predict_route = server.routes_from_env()
  port = args.port or port
  host = args.host or ("0.0.0.0" if os.environ.get("AIP_HTTP_PORT") else "127.0.0.1")
  try:
    bundle = registry.resolve_bundle(args.bundle, args.registry)
    check_bundle(bundle)
  except (OSError, ValueError) as e:
    print(f"error: cannot serve {args.bundle or 'the current model'}: {e}", file=sys.stderr)
    return 2
  if args.cpu_threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()
  limits = protocol.Limits(max_body_bytes=args.max_body_bytes, max_instances=args.max_instances,
                           max_candidates=args.max_candidates)
  print(f"serving {bundle} on http://{host}:{port} (health {health_route}, predict "
        f"{predict_route}{', naive' if args.naive else ''})", flush=True)
  import uvloop  # pylint: disable=g-import-not-at-top
  with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    return runner.run(server.serve(bundle, host, port, health_route=health_route,
                                   predict_route=predict_route, limits=limits,
                                   buckets=_buckets(args.max_batch),
                                   length_buckets=args.length_buckets, naive=args.naive,
                                   backoff=Backoff(max_restarts=args.max_restarts)))


def cmd_export(args: argparse.Namespace) -> int:
  record = export.export_bundle(args.model_dir, args.output, data_dir=args.data,
                                max_k=args.max_k)
  if record["task"] == export.RANKING:
    names = record["features"]["dense"] + [f["name"] for f in record["features"]["categorical"]]
    print(f"bundle: {args.output} ({record['model']}, ranking, {len(names)} features: "
          f"{', '.join(names)})")
  else:
    print(f"bundle: {args.output} ({record['model']}, max_len {record['max_len']}, "
          f"max_k {record['max_k']}, {record['item_vocab_size']} ids)")
  return 0
