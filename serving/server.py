"""The HTTP server, on the Vertex AI custom-container contract.

Listens on ``$AIP_HTTP_PORT`` (8080), answers ``GET $AIP_HEALTH_ROUTE`` (``/health``: 503
until the model is compiled for every batch bucket and warmed up, then 200; it names the
device process, ``device_pid``, counts its restarts, and names the HTTP worker that
answered, ``worker_pid``), ``GET /v1/metadata`` and ``POST $AIP_PREDICT_ROUTE``
(``/predict``: the request format of :mod:`serving.protocol`).

HTTP worker processes (``--workers``, default one per core but one; :mod:`serving.workers`)
share the port and parse, validate and encode requests (plain predicts on a lean path,
:mod:`serving.fastpath`); the model runs in one device process (:mod:`serving.device`),
which micro-batches the rows of every worker's requests (:mod:`serving.batcher`),
handed over in shared memory (:mod:`serving.shm`). A batch's rows are grouped by history
length (length buckets, default 32, 64, 128, max_len) and the groups are run as one or
several calls, whichever the costs measured at warm-up say is cheaper; every (batch,
length) shape is compiled before the health route says ready. With one worker, this
process is the worker and supervises the device process itself. ``naive=True`` serves
one request at a time in this process instead (the benchmark's baseline: same bundle,
same length buckets, no batching).
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
from serving import fastpath, protocol, shm
from serving.device import (Backoff, CorePlan, DeviceLink, DeviceUnavailable, Supervisor,
                            core_plan, pin_threads, worker_cores)
from trainers import export

log = logging.getLogger("recml.serve")

DEFAULT_PORT = 8080
DEFAULT_HEALTH_ROUTE = "/health"
DEFAULT_PREDICT_ROUTE = "/predict"
MIN_ARENA_BYTES = 8 << 20  # a worker's shared memory for rows in flight (at least)


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
  """The server's state (``ready``, ``error``, ``bundle``, ``supervisor``, ``link``...)."""
  return app[_keys()[0]]


def arena_bytes(bundle, limits: protocol.Limits) -> int:
  """A worker's shared memory: room for two of the largest requests the limits allow,
  and at least :data:`MIN_ARENA_BYTES`."""
  largest = shm.schema(bundle.meta).max_request_bytes(limits, bundle.meta.get("max_len", 0))
  return max(MIN_ARENA_BYTES, 2 * largest)


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
             backoff: Backoff = Backoff(), on_fatal: Callable[[str], None] | None = None,
             control=None, workers: int = 1, cores: CorePlan | None = None):
  """The server: loads and warms up the bundle in the background, then answers.

  Without ``control``, the app starts and supervises its own device process. In a
  worker of a multi-worker server (:mod:`serving.workers`), ``control`` is the pipe from
  the master process, which supervises the device process: it carries the device's
  state (:meth:`serving.device.Supervisor.state`), and its end of file means the master
  is gone (``on_fatal``). ``workers``: how many workers serve the port (reported).
  ``cores``: where the device process runs (:func:`serving.device.core_plan`).

  ``on_fatal(reason)`` is called when the bundle cannot be loaded or the device process
  cannot be kept up (``recml serve`` then exits non-zero); without it the health route
  answers 500 with the reason.
  """
  from aiohttp import web  # pylint: disable=g-import-not-at-top
  state: dict[str, Any] = {"ready": False, "error": None}
  app = web.Application(client_max_size=limits.max_body_bytes)
  master: dict[str, Any] = {"state": None, "ready": asyncio.Event()}  # worker mode

  def fatal(reason: str) -> None:
    state["ready"], state["error"] = False, reason
    if on_fatal is not None:
      on_fatal(reason)

  def load():
    """Naive: the model in this process. Else: the vocabulary here (no JAX), the model in
    a device process (started here, or by the master)."""
    started = time.time()
    if naive:
      bundle = export.load_bundle(bundle_dir)
      predictor = predictor_lib.make_predictor(bundle, (1,), length_buckets)
      predictor.warmup(progress=lambda line: print(line, flush=True))
      info = {"buckets": predictor.buckets, "length_buckets": predictor.length_buckets}
      state.update(predictor=predictor)
    elif control is None:
      supervisor = state["supervisor"] = Supervisor(bundle_dir, buckets, length_buckets,
                                                    backoff, on_fatal=fatal, cores=cores)
      info = supervisor.start()
      bundle = export.load_bundle(bundle_dir, verify=False, model=False)  # checked by device
    else:
      info = master["state"]["info"]
      bundle = export.load_bundle(bundle_dir, verify=False, model=False)  # checked by device
    if control is None:
      log.info("bundle %s (%s) compiled for batches %s x lengths %s and warmed up in %.1fs",
               bundle_dir, bundle.meta.get("model"), info["buckets"], info["length_buckets"],
               time.time() - started)
    return bundle, info

  def from_master() -> None:
    try:
      message = control.recv()
    except (EOFError, OSError):
      asyncio.get_running_loop().remove_reader(control.fileno())
      fatal("the master process went away")
      return
    master["state"] = message
    if "link" in state:
      state["link"].update(message)
    if message["ready"]:
      master["ready"].set()

  async def startup(app_):
    loop = asyncio.get_running_loop()
    if control is not None:
      loop.add_reader(control.fileno(), from_master)

    async def warm():
      if control is not None:
        await master["ready"].wait()  # the device process has checked the bundle
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
        supervisor = state.get("supervisor")
        link = state["link"] = DeviceLink(shm.schema(bundle.meta), arena_bytes(bundle, limits),
                                          supervisor.describe if supervisor else None)
        if supervisor is not None:
          supervisor.on_change = link.update
          supervisor.attach(loop)
        else:
          link.update(master["state"])
      state["ready"] = True
    app_[_keys()[1]] = loop.create_task(warm())

  async def cleanup(app_):
    app_[_keys()[1]].cancel()
    if control is not None and not control.closed:
      asyncio.get_running_loop().remove_reader(control.fileno())
    if "link" in state:
      await state["link"].close()
    if "supervisor" in state:
      state["supervisor"].close()

  def error(status: int, message: str, retry_after: int | None = None):
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers)

  def unavailable() -> tuple[int, str, int | None] | None:
    """``None`` when ready, else ``(status, reason, Retry-After)`` (500: failed for good)."""
    if state["error"]:  # for good (the CLI has exited)
      return 500, state["error"], None
    if not state["ready"]:
      return 503, DeviceLink.LOADING, 1
    link = state.get("link")
    return link.unavailable() if link is not None else None

  async def health(request):
    del request
    down = unavailable()
    if down is not None:
      return error(*down)
    out = {"status": "ready", "model": state["bundle"].meta.get("model"),
           "worker_pid": os.getpid(), "workers": workers}
    if "link" in state:
      device = state["link"].state
      out.update(device_pid=device["pid"], device_restarts=device["restarts"])
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
    out["workers"] = workers
    if "link" in state:  # the device process's counters, over all workers
      batches, rows, seconds = state["link"].counters()
      out.update(batches=batches, rows=rows, device_seconds=round(seconds, 3))
    return web.json_response(out)

  async def answer_predict(body: bytes) -> tuple[int, bytes, int | None]:
    """A predict body's answer: ``(status, JSON, Retry-After)`` (for aiohttp's route
    and :mod:`serving.fastpath`)."""
    import orjson  # pylint: disable=g-import-not-at-top

    def failed(status: int, message: str, retry_after: int | None = None):
      return status, orjson.dumps({"error": message}), retry_after
    down = unavailable()
    if down is not None:
      return failed(*down)
    bundle = state["bundle"]
    try:
      rows = protocol.parse_body(body, bundle, limits)
    except protocol.RequestError as e:
      return failed(e.status, str(e))
    if naive:  # one instance at a time, on the event loop
      results = [predictor_lib.run_rows(state["predictor"], [row])[0] for row in rows]
    else:
      link = state["link"]
      try:
        results = await link.run(rows)
      except DeviceUnavailable as e:  # dead or restarting: the client may retry
        return failed(503, f"{e}; restarting it, retry later", link.retry_after())
      except RuntimeError as e:  # the model failed on this batch
        return failed(500, str(e))
    return 200, orjson.dumps({"predictions": [protocol.prediction(bundle, r, s, i)
                                              for r, (s, i) in zip(rows, results)]}), None

  async def predict(request):
    down = unavailable()
    if down is not None:
      return error(*down)
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
      return error(413, f"payload too large: {request.content_length} bytes > "
                   f"{limits.max_body_bytes}")
    try:
      body = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return error(413, f"payload too large: more than {limits.max_body_bytes} bytes")
    status, payload, retry_after = await answer_predict(body)
    return web.Response(body=payload, status=status, content_type="application/json",
                        headers={"Retry-After": str(retry_after)} if retry_after else None)

  app.router.add_get(health_route, health)
  app.router.add_get("/v1/metadata", metadata)
  app.router.add_post(predict_route, predict)
  app.on_startup.append(startup)
  app.on_cleanup.append(cleanup)
  state.update(answer_predict=answer_predict, predict_route=predict_route,
               max_body_bytes=limits.max_body_bytes)
  app[_keys()[0]] = state
  return app


def fast_site(runner, sock):
  """The site that serves ``runner``'s app (:func:`make_app`) on a listening socket,
  plain predicts by :mod:`serving.fastpath`."""
  state = app_state(runner.app)
  return fastpath.FastSite(runner, sock, state["answer_predict"], state["predict_route"],
                           state["max_body_bytes"])


def stop_on_signals(loop) -> tuple[asyncio.Future, Callable[[str | None], None]]:
  """``(stop, finish)``: a future that SIGINT or SIGTERM sets to None and ``finish(reason)``
  to the reason (the first one wins)."""
  stop = loop.create_future()

  def finish(reason: str | None) -> None:
    if not stop.done():
      stop.set_result(reason)
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, finish, None)
  return stop, finish


async def serve(bundle: str, host: str, port: int, workers: int = 1, **app_kwargs) -> int:
  """Runs the server until SIGTERM/SIGINT (0) or a fatal error (1, reason on stderr).

  ``workers`` > 1: :func:`serving.workers.serve` (this process supervises the workers
  and the device process); 1: this process is the one worker.
  """
  if workers > 1:
    from serving import workers as workers_lib  # pylint: disable=g-import-not-at-top
    return await workers_lib.serve(bundle, host, port, workers, **app_kwargs)
  from aiohttp import web  # pylint: disable=g-import-not-at-top
  loop = asyncio.get_running_loop()
  stop, finish = stop_on_signals(loop)
  cores = None if app_kwargs.get("naive") else core_plan()
  if cores:  # this thread, and the threads it starts: off the device process's core
    pin_threads(worker_cores(cores))
  app = make_app(bundle, on_fatal=finish, cores=cores, **app_kwargs)
  runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
  await runner.setup()
  try:
    await fast_site(runner, fastpath.listening_socket(host, port)).start()
    reason = await stop
  finally:
    await runner.cleanup()
  if reason is not None:
    print(f"error: {reason}", file=sys.stderr, flush=True)
    return 1
  return 0
