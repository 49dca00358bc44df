"""The HTTP server, on the Vertex AI custom-container contract.

Listens on ``$AIP_HTTP_PORT`` (8080), answers ``GET $AIP_HEALTH_ROUTE`` (``/health``: 503
until the model is compiled for every batch bucket and warmed up, then 200; it names the
device process, ``device_pid``, and counts its restarts), ``GET /v1/metadata`` and
``POST $AIP_PREDICT_ROUTE`` (``/predict``: the request format of :mod:`serving.protocol`).

Concurrent requests are micro-batched (:mod:`serving.batcher`). The model runs in a
device process of its own (:mod:`serving.device`; the event loop here parses and answers,
and neither waits for the other's GIL). A batch's rows are grouped by history length
(length buckets, default 32, 64, 128, max_len) and the groups are run as one or several
calls, whichever the costs measured at warm-up say is cheaper; every (batch, length)
shape is compiled before the health route says ready. ``naive=True`` serves one request
at a time in this process instead (the benchmark's baseline: same bundle, same length
buckets, no batching).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

from serving import predictor as predictor_lib
from serving import protocol
from serving.batcher import Batcher
from serving.device import Backoff, DeviceUnavailable, Supervisor
from trainers import export

log = logging.getLogger("recml.serve")

DEFAULT_PORT = 8080
DEFAULT_HEALTH_ROUTE = "/health"
DEFAULT_PREDICT_ROUTE = "/predict"


_KEYS: tuple[Any, Any] | None = None


def _keys():
  """The application's typed keys (aiohttp.web.AppKey; made on first use, as aiohttp is
  imported lazily)."""
  global _KEYS  # pylint: disable=global-statement
  if _KEYS is None:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    _KEYS = (web.AppKey("recml_state", dict), web.AppKey("recml_warm", asyncio.Task))
  return _KEYS


def app_state(app) -> dict[str, Any]:
  """The server's state (``ready``, ``error``, ``bundle``, ``supervisor``, ``batcher``...)."""
  return app[_keys()[0]]


def routes_from_env(environ=os.environ) -> tuple[int, str, str]:
  """``(port, health route, predict route)`` from Vertex's ``AIP_*`` variables."""
  return (int(environ.get("AIP_HTTP_PORT") or DEFAULT_PORT),
          environ.get("AIP_HEALTH_ROUTE") or DEFAULT_HEALTH_ROUTE,
          environ.get("AIP_PREDICT_ROUTE") or DEFAULT_PREDICT_ROUTE)


def make_app(bundle_dir: str, *, health_route: str = DEFAULT_HEALTH_ROUTE,
             predict_route: str = DEFAULT_PREDICT_ROUTE,
             limits: protocol.Limits = protocol.Limits(),
             buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
             length_buckets: Sequence[int] | None = None, naive: bool = False,
             backoff: Backoff = Backoff(), on_fatal: Callable[[str], None] | None = None):
  """The server: loads and warms up the bundle in the background, then answers.

  ``on_fatal(reason)`` is called when the bundle cannot be loaded or the device process
  cannot be kept up (``recml serve`` then exits non-zero); without it the health route
  answers 500 with the reason.
  """
  from aiohttp import web  # pylint: disable=g-import-not-at-top
  state: dict[str, Any] = {"ready": False, "error": None}
  app = web.Application(client_max_size=limits.max_body_bytes)

  def fatal(reason: str) -> None:
    state["ready"], state["error"] = False, reason
    if on_fatal is not None:
      on_fatal(reason)

  def load():
    """Naive: the model in this process. Else: the vocabulary here (no JAX), the model in
    a device process."""
    started = time.time()
    if naive:
      bundle = export.load_bundle(bundle_dir)
      predictor = predictor_lib.make_predictor(bundle, (1,), length_buckets)
      predictor.warmup()
      info = {"buckets": predictor.buckets, "length_buckets": predictor.length_buckets}
      state.update(predictor=predictor)
    else:
      supervisor = state["supervisor"] = Supervisor(bundle_dir, buckets, length_buckets,
                                                    backoff, on_fatal=fatal)
      info = supervisor.start()
      bundle = export.load_bundle(bundle_dir, verify=False, model=False)  # checked by device
    log.info("bundle %s (%s) compiled for batches %s x lengths %s and warmed up in %.1fs",
             bundle_dir, bundle.meta.get("model"), info["buckets"], info["length_buckets"],
             time.time() - started)
    return bundle, info

  async def startup(app_):
    async def warm():
      loop = asyncio.get_running_loop()
      try:
        bundle, info = await loop.run_in_executor(None, load)
      except Exception as e:  # pylint: disable=broad-except
        # a RuntimeError carries the device process's own "Type: message"
        reason = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        log.error("cannot load the bundle %s: %s", bundle_dir, reason)
        fatal(f"cannot load the bundle {bundle_dir}: {reason}")
        return
      state.update(bundle=bundle, info=info)
      if not naive:
        state["supervisor"].attach(loop)
        state["batcher"] = Batcher(state["supervisor"], max(info["buckets"]))
        state["batcher"].start()
      state["ready"] = True
    app_[_keys()[1]] = asyncio.get_running_loop().create_task(warm())

  async def cleanup(app_):
    app_[_keys()[1]].cancel()
    if "batcher" in state:
      await state["batcher"].stop()
    if "supervisor" in state:
      state["supervisor"].close()

  def error(status: int, message: str, retry_after: int | None = None):
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers)

  def unavailable():
    """``None`` when ready, else the answer saying why not (500: failed for good)."""
    if state["error"]:  # for good (the CLI has exited)
      return error(500, state["error"])
    supervisor = state.get("supervisor")
    if not state["ready"]:
      return error(503, "loading: compiling and warming up the model", 1)
    if supervisor is not None and not supervisor.ready:
      return error(503, f"{supervisor.down_reason}; restarting it, retry later",
                   supervisor.retry_after())
    return None

  async def health(request):
    del request
    answer = unavailable()
    if answer is not None:
      return answer
    out = {"status": "ready", "model": state["bundle"].meta.get("model")}
    if "supervisor" in state:
      out.update(device_pid=state["supervisor"].device.pid,
                 device_restarts=state["supervisor"].restarts)
    return web.json_response(out)

  async def metadata(request):
    del request
    if not state["ready"]:
      return error(503, "loading", 1)
    meta = state["bundle"].meta
    if state["bundle"].task == export.RANKING:
      keys = ("task", "model", "features", "created", "platforms")
    else:
      keys = ("model", "max_len", "max_k", "item_vocab_size", "item_id_type", "created",
              "platforms")
    out = {k: meta.get(k) for k in keys}
    out["buckets"] = list(state["info"]["buckets"])
    out["length_buckets"] = list(state["info"]["length_buckets"])
    if "batcher" in state:
      batcher = state["batcher"]
      out.update(batches=batcher.batches, rows=batcher.rows,
                 device_seconds=round(batcher.device_seconds, 3))
    return web.json_response(out)

  async def predict(request):
    answer = unavailable()
    if answer is not None:
      return answer
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
      return error(413, f"payload too large: {request.content_length} bytes > "
                   f"{limits.max_body_bytes}")
    try:
      body = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return error(413, f"payload too large: more than {limits.max_body_bytes} bytes")
    bundle = state["bundle"]
    try:
      rows = protocol.parse_body(body, bundle, limits)
    except protocol.RequestError as e:
      return error(e.status, str(e))
    if naive:  # one instance at a time, on the event loop
      results = [predictor_lib.run_rows(state["predictor"], [row])[0] for row in rows]
    else:
      try:
        results = await state["batcher"].predict(rows)
      except DeviceUnavailable as e:  # dead or restarting: the client may retry
        return error(503, f"{e}; restarting it, retry later",
                     state["supervisor"].retry_after())
      except RuntimeError as e:  # the model failed on this batch
        return error(500, str(e))
    import orjson  # pylint: disable=g-import-not-at-top
    return web.Response(body=orjson.dumps(
        {"predictions": [protocol.prediction(bundle, r, s, i)
                         for r, (s, i) in zip(rows, results)]}),
                        content_type="application/json")

  app.router.add_get(health_route, health)
  app.router.add_get("/v1/metadata", metadata)
  app.router.add_post(predict_route, predict)
  app.on_startup.append(startup)
  app.on_cleanup.append(cleanup)
  app[_keys()[0]] = state
  return app


async def serve(bundle: str, host: str, port: int, **app_kwargs) -> int:
  """Runs the server until SIGTERM/SIGINT (0) or a fatal error (1, reason on stderr)."""
  from aiohttp import web  # pylint: disable=g-import-not-at-top
  loop = asyncio.get_running_loop()
  stop = loop.create_future()

  def finish(reason: str | None) -> None:
    if not stop.done():
      stop.set_result(reason)
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, finish, None)
  app = make_app(bundle, on_fatal=finish, **app_kwargs)
  runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
  await runner.setup()
  try:
    await web.TCPSite(runner, host, port).start()
    reason = await stop
  finally:
    await runner.cleanup()
  if reason is not None:
    print(f"error: {reason}", file=sys.stderr, flush=True)
    return 1
  return 0
