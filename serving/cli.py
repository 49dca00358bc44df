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
counts its restarts. With ``--workers`` N > 1, a dead HTTP worker is restarted the same
way (its open connections are lost; the other workers go on serving).

Start-up: ``recml serve`` prints ``starting ...`` at once, a line per (batch, length)
shape as it compiles, and ``ready in N s`` when the health route answers 200. Compiled
executables are kept in JAX's persistent compilation cache, in a folder of the bundle's
own (``~/.cache/recml/compile/<bundle digest>``; ``--compile-cache DIR`` changes the
root, ``--no-compile-cache`` turns it off), so a restart of the same bundle reads them
instead of compiling: SASRec on ml-1m-partial (28 shapes) was ready 75 s after the
process started cold, 4 to 8 s warm (this 2-core machine, busy with other work).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import socket
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from serving import predictor, protocol, registry, server, workers
from serving.device import Backoff
from trainers import compile_cache, export


# ``recml serve --help``'s and the README's curl example: ml-1m movie ids (an unknown id
# is out-of-vocabulary, not an error, so it runs against any retrieval bundle); the answer
# of the ml-1m-partial SASRec bundle, scores rounded
CURL_EXAMPLE = """\
    curl -s http://127.0.0.1:8080/predict -H 'Content-Type: application/json' \\
      -d '{"instances": [{"items": [1193, 661, 914, 3408], "k": 3}]}'
    -> {"predictions":[{"items":[3510,3512,3578],"scores":[0.3549,0.3319,0.3293]}]}"""


def _serve_description() -> str:
  """The HTTP contract (:mod:`serving.server`), for ``recml serve --help``."""
  return "\n\n".join(server.__doc__.split("\n\n")[:2])


def _serve_epilog() -> str:
  """The request format (:mod:`serving.protocol`), the routes, the errors, the limits
  (``protocol.Limits``' defaults), a curl example, start-up and failures."""
  limits = protocol.Limits()
  request = itertools.takewhile(lambda p: not p.startswith("A malformed request"),
                                protocol.__doc__.split("\n\n"))
  routes = """\
Routes (the port and the health and predict paths follow Vertex AI's $AIP_HTTP_PORT,
$AIP_HEALTH_ROUTE and $AIP_PREDICT_ROUTE):
    GET  /health       200 {"status": "ready", "model": ..., "device_pid": ...,
                       "device_restarts": ...}; 503 while compiling or restarting
    GET  /v1/metadata  the bundle (model, max_len, max_k, item_vocab_size, ...), its
                       compiled buckets and the batch counters
    POST /predict      the request above"""
  errors = textwrap.fill(
      'Errors: a JSON object {"error": "<reason>"}. 400: a malformed request, the reason '
      'naming the field ("instances[0].k must be an integer in [1, 100], got 500"); 413: '
      "a body over --max-body-bytes; 503 with Retry-After: still compiling, or the device "
      "process is restarting; 500: the model failed on the batch, or the server gave up.",
      88)
  limit_text = textwrap.fill(
      f"Limits: a body of at most --max-body-bytes (default {limits.max_body_bytes} bytes "
      f"= {limits.max_body_bytes / 2**20:g} MiB); at most --max-instances instances per "
      f"request (default {limits.max_instances}); per instance at most the bundle's "
      f"max_len item ids (/v1/metadata; send the most recent), each id at most "
      f"{limits.max_id_chars} "
      f"characters, so at most {limits.max_instances} x max_len ids per request; k from 1 "
      f"to the bundle's max_k (`recml export --max-k`, default {export.DEFAULT_MAX_K}), "
      f"default {protocol.DEFAULT_K}; ranking: at most --max-candidates candidates per "
      f"instance (default {limits.max_candidates}).", 88)
  example = ("Example, against `recml serve --bundle BUNDLE` (port 8080; the answer of an "
             f"ml-1m-partial SASRec bundle):\n{CURL_EXAMPLE}")
  tail = [p for p in __doc__.split("\n\n") if p.startswith(("Start-up:", "Failures:"))]
  return "\n\n".join([*request, routes, errors, limit_text, example, *tail])


def register(subparsers) -> None:
  """Adds ``serve`` and ``export`` to the ``recml`` CLI."""
  p = subparsers.add_parser("serve", help="serve a model bundle over HTTP (Vertex AI contract)",
                            description=_serve_description(), epilog=_serve_epilog(),
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
  p.add_argument("--workers", type=int, metavar="N",
                 help="HTTP worker processes sharing the port (they parse and answer; one "
                 "device process batches the rows of all of them). Default: one per core "
                 f"but one, at least 1 (here {workers.default_workers()}); 1 = one process "
                 "serves HTTP and supervises the device process")
  cache = p.add_mutually_exclusive_group()
  cache.add_argument("--compile-cache", metavar="DIR",
                     help="root of the compiled-shape cache (JAX's persistent compilation "
                     "cache), one folder per bundle digest: a restart of the same bundle "
                     "reads its shapes instead of compiling them (default: "
                     "$XDG_CACHE_HOME/recml/compile, else ~/.cache/recml/compile; JAX "
                     "runs what it finds there: only this server's user should write to it)")
  cache.add_argument("--no-compile-cache", action="store_true",
                     help="compile every shape at each start, with no cache on disk")
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
  p.add_argument("--quantize", choices=export.QUANTIZE, default=export.NONE,
                 help="how embedding tables are stored: none (float32) or int8 (a float16 "
                 "scale per row, or per group of rows for narrow tables; dequantized inside "
                 "the exported function; other parameters stay float32) (default %(default)s)")
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


def use_compile_cache(args: argparse.Namespace, meta: dict[str, Any]) -> str | None:
  """Turns on the bundle's compile cache (for the device process started next); prints
  where it is and what it holds. A folder that cannot be made: a warning, no cache."""
  directory = None if args.no_compile_cache else predictor.compile_cache_dir(
      meta, args.compile_cache)
  directory = compile_cache.turn_on(directory, "recml serve", "shape")
  if directory is not None:
    print(f"compile cache: {directory} ({compile_cache.entries(directory)} executables)",
          flush=True)
  return directory


def _local_host(host: str) -> str:
  """The host to reach a server bound to ``host`` from this machine (a URL host)."""
  host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
  return f"[{host}]" if ":" in host else host


def port_in_use(host: str, port: int) -> bool:
  """Whether something already answers on ``host:port``."""
  try:
    with socket.create_connection((_local_host(host).strip("[]"), port), timeout=0.5):
      return True
  except OSError:
    return False


def announce_ready(health_url: str, started: float, what: str) -> threading.Thread:
  """Prints ``ready in N s: <what>`` once ``health_url`` answers 200 (a daemon thread
  polling over HTTP, as the platform does)."""
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy

  def poll():
    while True:
      try:
        with opener.open(health_url, timeout=5) as r:
          if r.status == 200:
            break
      except (urllib.error.URLError, OSError):  # not bound yet, or 503 while compiling
        pass
      time.sleep(0.1)
    print(f"ready in {time.monotonic() - started:.1f} s: {what}", flush=True)
  thread = threading.Thread(target=poll, name="recml-announce-ready", daemon=True)
  thread.start()
  return thread


def cmd_serve(args: argparse.Namespace) -> int:
  started = time.monotonic()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
  port, health_route, predict_route = server.routes_from_env()
  port = args.port or port
  host = args.host or ("0.0.0.0" if os.environ.get("AIP_HTTP_PORT") else "127.0.0.1")
  try:
    bundle = registry.resolve_bundle(args.bundle, args.registry)
    meta = check_bundle(bundle)
  except (OSError, ValueError) as e:
    print(f"error: cannot serve {args.bundle or 'the current model'}: {e}", file=sys.stderr)
    return 2
  if port_in_use(host, port):
    print(f"error: port {port} is in use on {_local_host(host)} (another server?); "
          "choose another with --port", file=sys.stderr)
    return 2
  if args.cpu_threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()
  limits = protocol.Limits(max_body_bytes=args.max_body_bytes, max_instances=args.max_instances,
                           max_candidates=args.max_candidates)
  if args.workers is not None and (args.workers < 1 or args.naive and args.workers > 1):
    print(f"error: --workers {args.workers}: expected at least 1 (--naive: 1)", file=sys.stderr)
    return 2
  n_workers = 1 if args.naive else args.workers or workers.default_workers()
  what = (f"serving {bundle} on http://{host}:{port} (health {health_route}, predict "
          f"{predict_route}{', naive' if args.naive else f', {n_workers} HTTP workers'})")
  print(f"starting: {what}; not ready until compiled", flush=True)
  use_compile_cache(args, meta)
  announce_ready(f"http://{_local_host(host)}:{port}{health_route}", started, what)
  import uvloop  # pylint: disable=g-import-not-at-top
  with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    return runner.run(server.serve(bundle, host, port, health_route=health_route,
                                   predict_route=predict_route, limits=limits,
                                   buckets=_buckets(args.max_batch),
                                   length_buckets=args.length_buckets, naive=args.naive,
                                   backoff=Backoff(max_restarts=args.max_restarts),
                                   workers=n_workers))


def cmd_export(args: argparse.Namespace) -> int:
  record = export.export_bundle(args.model_dir, args.output, data_dir=args.data,
                                max_k=args.max_k, quantize=args.quantize)
  if record["task"] == export.RANKING:
    names = record["features"]["dense"] + [f["name"] for f in record["features"]["categorical"]]
    print(f"bundle: {args.output} ({record['model']}, ranking, {len(names)} features: "
          f"{', '.join(names)})")
  else:
    print(f"bundle: {args.output} ({record['model']}, max_len {record['max_len']}, "
          f"max_k {record['max_k']}, {record['item_vocab_size']} ids)")
  sizes = record["quantization"]["embedding_bytes"]
  if record["quantization"]["scheme"] != export.NONE:
    print(f"embedding tables: {record['quantization']['scheme']}, {sizes['stored']:,} bytes "
          f"({sizes['float32']:,} as float32: {sizes['ratio']:.2f}x smaller)")
  return 0
