"""The model server (``recml serve``) and the ``export`` / ``deploy`` commands.

    recml export --model-dir runs/.../train/model --data runs/.../preprocess/dataset --output /tmp/bundle
    recml serve --bundle /tmp/bundle --port 8080     # or no --bundle: the local registry's current model
    recml deploy --bundle /tmp/bundle                 # local registry; --target vertex [--dry-run]

HTTP, on the Vertex AI custom-container contract: listens on ``$AIP_HTTP_PORT`` (8080),
answers ``GET $AIP_HEALTH_ROUTE`` (``/health``: 503 until the model is compiled for every
batch bucket and warmed up, then 200) and ``POST $AIP_PREDICT_ROUTE`` (``/predict``)::

    {"instances": [{"items": [1193, 661, 914], "k": 10, "exclude_history": true,
                    "timestamps": [978300760, 978302109, 978301968],
                    "query_timestamp": 978302200}],
     "parameters": {"k": 20}}                                    (optional defaults)
    -> {"predictions": [{"items": [2355, 1197, ...], "scores": [0.41, 0.39, ...]}]}

An instance: ``items`` (required) the user's recent raw item ids, oldest first, at most
the model's ``max_len``; unknown ids map to the OOV bucket. ``k`` (default 10, at most
the bundle's ``max_k``). ``exclude_history`` (default true): items of the history are
not recommended. ``timestamps`` (optional, unix seconds aligned with ``items``, int64:
any integer in [0, 2**63)) and ``query_timestamp`` (optional, the time of the
recommendation). Defaults for time-aware models (HSTU): the query time is the request's
arrival time; without ``timestamps`` every item is taken to be as recent as the query
(all time gaps zero). SASRec ignores time.
Scores are the trainer's (cosine similarity of user and item vectors); fewer than ``k``
items come back only when the history excludes nearly the whole catalogue.

A malformed request gets a 400 whose ``error`` says what is wrong (a body over
``--max-body-bytes`` a 413); nothing in a request is executed or unpickled, and bundles
are data files (see :mod:`trainers.export`).

Failures: a bundle that cannot be loaded at start-up (missing, incomplete, corrupt) makes
``recml serve`` exit non-zero with the reason on stderr, so that the platform restarts or
reports the container. A device process that dies is restarted with exponential backoff
(0.5 s doubling to 30 s); meanwhile health and predict answer 503 with ``Retry-After``.
After ``--max-restarts`` restarts (default 6) without a minute of uptime in between, the
server exits non-zero. The health route names the device process (``device_pid``) and
counts its restarts.

Concurrent requests are micro-batched: every instance goes into one queue; whatever is
queued when the device is free (up to ``--max-batch`` rows) is the next batch, so batches
grow with the load and a lone request waits for nobody. The model runs in a device
process of its own (the event loop here parses and answers; neither waits for the other's
GIL). A batch's rows are grouped by history length (length buckets, default 32, 64, 128,
max_len) and the groups are run as one or several calls, whichever the costs measured at
warm-up say is cheaper; every (batch, length) shape is compiled before the health route
says ready. ``--naive`` serves one request at a time in this process instead (the
benchmark's baseline: same bundle, same length buckets, no batching).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("recml.serve")

DEFAULT_PORT = 8080
DEFAULT_HEALTH_ROUTE = "/health"
DEFAULT_PREDICT_ROUTE = "/predict"
DEFAULT_K = 10
TIMESTAMP_MAX = 2**63 - 1  # unix seconds, as int64
INSTANCE_KEYS = ("items", "k", "exclude_history", "timestamps", "query_timestamp")
PARAMETER_KEYS = ("k", "exclude_history")


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a request may hold; beyond these it gets a 400 (a body too large: 413)."""

  max_body_bytes: int = 1 << 20
  max_instances: int = 64
  max_id_chars: int = 256


class RequestError(ValueError):
  """A malformed request (answered with ``status`` and this message)."""

  status = 400


class PayloadTooLarge(RequestError):
  status = 413


class DeviceUnavailable(RuntimeError):
  """The device process is down or restarting (answered with 503 and Retry-After)."""


@dataclasses.dataclass
class Row:
  """One parsed instance, oldest first: ``[n]`` int32 item indices, int64 unix seconds."""

  items: np.ndarray
  timestamps: np.ndarray
  query_timestamps: np.ndarray
  exclude_history: bool
  k: int


# ---------------------------------------------------------------------------
# Request parsing and validation
# ---------------------------------------------------------------------------


_ID_TYPES = frozenset((int, str))
_NON_JSON_CONSTANT = re.compile(rb"-?\b(?:NaN|Infinity)\b")
_INT_TYPE = {int}


def _is_int(x: Any) -> bool:
  return type(x) is int  # pylint: disable=unidiomatic-typecheck  (bool is an int subclass)


def _timestamp(value: Any, where: str) -> int:
  if not _is_int(value) or not 0 <= value <= TIMESTAMP_MAX:
    raise RequestError(f"{where} must be an integer unix time in seconds in "
                       f"[0, 2**63 - 1], got {json.dumps(value)[:40]}")
  return value


def parse_body(body: bytes, bundle, limits: Limits, now: int | None = None) -> list[Row]:
  """Validates a ``{"instances": [...]}`` body; raises :class:`RequestError` with the reason."""
  import orjson  # pylint: disable=g-import-not-at-top  (serve extra only)
  if len(body) > limits.max_body_bytes:
    raise PayloadTooLarge(f"payload too large: {len(body)} bytes > {limits.max_body_bytes}")
  try:  # strict RFC 8259: NaN/Infinity, bad UTF-8, ints beyond 64 bits, deep nesting fail
    payload = orjson.loads(body)
  except orjson.JSONDecodeError as e:
    constant = _NON_JSON_CONSTANT.search(body)
    if constant:
      raise RequestError(f"body is not valid JSON: {constant.group().decode()} is not a JSON "
                         "number") from None
    raise RequestError(f"body is not valid JSON: {str(e)[:200]}") from None
  if not isinstance(payload, dict):
    raise RequestError('body must be a JSON object {"instances": [...]}')
  unknown = sorted(set(payload) - {"instances", "parameters"})
  if unknown:
    raise RequestError(f"unknown top-level field(s) {unknown[:5]}; expected 'instances' "
                       "(and optional 'parameters')")
  instances = payload.get("instances")
  if not isinstance(instances, list):
    raise RequestError('"instances" must be a list of objects')
  if not instances:
    raise RequestError('"instances" is empty')
  if len(instances) > limits.max_instances:
    raise RequestError(f'too many instances: {len(instances)} > {limits.max_instances}')
  params = payload.get("parameters", {})
  if not isinstance(params, dict):
    raise RequestError('"parameters" must be an object')
  unknown = sorted(set(params) - set(PARAMETER_KEYS))
  if unknown:
    raise RequestError(f"unknown parameter(s) {unknown[:5]}; known: {list(PARAMETER_KEYS)}")
  defaults = {"k": DEFAULT_K, "exclude_history": True}
  defaults.update(_options(params, bundle, "parameters"))
  now = int(time.time()) if now is None else now
  return [_parse_instance(inst, i, bundle, limits, defaults, now)
          for i, inst in enumerate(instances)]


def _options(obj: dict[str, Any], bundle, where: str) -> dict[str, Any]:
  out = {}
  if "k" in obj:
    k = obj["k"]
    if not _is_int(k) or not 1 <= k <= bundle.max_k:
      raise RequestError(f"{where}.k must be an integer in [1, {bundle.max_k}], "
                         f"got {json.dumps(k)[:40]}")
    out["k"] = k
  if "exclude_history" in obj:
    if not isinstance(obj["exclude_history"], bool):
      raise RequestError(f"{where}.exclude_history must be true or false, "
                         f"got {json.dumps(obj['exclude_history'])[:40]}")
    out["exclude_history"] = obj["exclude_history"]
  return out


def _parse_instance(inst: Any, i: int, bundle, limits: Limits, defaults: dict[str, Any],
                    now: int) -> Row:
  where = f"instances[{i}]"
  if not isinstance(inst, dict):
    raise RequestError(f'{where} must be an object like {{"items": [...], "k": 10}}')
  unknown = sorted(set(inst) - set(INSTANCE_KEYS))
  if unknown:
    raise RequestError(f"{where}: unknown field(s) {unknown[:5]}; known: {list(INSTANCE_KEYS)}")
  items = inst.get("items")
  if not isinstance(items, list):
    raise RequestError(f'{where}.items must be a list of raw item ids (strings or integers)')
  if not items:
    raise RequestError(f"{where}.items is empty: send at least one recent item id")
  if len(items) > bundle.max_len:
    raise RequestError(f"{where}.items has {len(items)} ids; this model takes at most "
                       f"{bundle.max_len} (send the most recent)")
  kinds = set(map(type, items))
  if not kinds <= _ID_TYPES or (str in kinds and max(
      len(r) for r in items if type(r) is str) > limits.max_id_chars):  # pylint: disable=unidiomatic-typecheck
    for j, raw in enumerate(items):  # the slow path only finds the first bad id
      if isinstance(raw, str):
        if len(raw) > limits.max_id_chars:
          raise RequestError(f"{where}.items[{j}] is longer than {limits.max_id_chars} "
                             "characters")
      elif not _is_int(raw):
        raise RequestError(f"{where}.items[{j}] must be a string or an integer, "
                           f"got {json.dumps(raw)[:40]}")
  opts = {**defaults, **_options(inst, bundle, where)}
  query = now
  if "query_timestamp" in inst:
    query = _timestamp(inst["query_timestamp"], f"{where}.query_timestamp")
  if "timestamps" in inst:
    ts = inst["timestamps"]
    if not isinstance(ts, list) or len(ts) != len(items):
      raise RequestError(f"{where}.timestamps must be a list of {len(items)} integers "
                         "(one per item)")
    if not (set(map(type, ts)) == _INT_TYPE and 0 <= min(ts) and max(ts) <= TIMESTAMP_MAX):
      ts = [_timestamp(t, f"{where}.timestamps[{j}]") for j, t in enumerate(ts)]
    ts = np.array(ts, np.int64)
  else:
    ts = np.full(len(items), query, np.int64)
  qts = np.empty_like(ts)
  qts[:-1], qts[-1] = ts[1:], query
  return Row(items=np.array(bundle.lookup(items), np.int32), timestamps=ts,
             query_timestamps=qts, exclude_history=opts["exclude_history"], k=opts["k"])


def encode(rows: Sequence[Row], length: int, size: int | None = None
           ) -> tuple[np.ndarray, ...]:
  """Rows -> :meth:`trainers.export.Predictor.run`'s four ``[size, length]`` inputs (item
  ids int32, times int64; size >= rows, extra rows are padding), right-aligned; histories
  longer than ``length`` keep their end."""
  from trainers import export  # pylint: disable=g-import-not-at-top
  size = len(rows) if size is None else size
  items, exclude = (np.zeros((size, length), np.int32) for _ in range(2))
  ts, qts = (np.zeros((size, length), np.int64) for _ in range(2))
  export.right_align([r.items for r in rows], length, items)
  export.right_align([r.timestamps for r in rows], length, ts)
  export.right_align([r.query_timestamps for r in rows], length, qts)
  for r, row in enumerate(rows):
    if row.exclude_history:
      exclude[r] = items[r]
  return items, ts, qts, exclude


def prediction(bundle, row: Row, scores: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
  keep = np.isfinite(scores[:row.k])
  return {"items": bundle.raw_ids(ids[:row.k][keep]),
          "scores": [float(s) for s in scores[:row.k][keep]]}


def run_rows(predictor, rows: Sequence[Row]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Scores rows with one device call per length bucket; results in the rows' order.

  Rows are grouped by the length bucket of their own history, so a short history is not
  padded to the longest one in the batch (a call's cost grows with its padded length;
  on CPU, SASRec at batch 32 costs 0.09 ms per row at length 32 and 0.53 ms at 200).
  """
  groups: dict[int, list[int]] = {}
  for j, row in enumerate(rows):
    groups.setdefault(predictor.length(len(row.items)), []).append(j)
  out: list[Any] = [None] * len(rows)
  for length, members in predictor.plan(groups):
    scores, ids = predictor.run(*encode([rows[j] for j in members], length,
                                        predictor.bucket(len(members))))
    for n, j in enumerate(members):
      out[j] = (scores[n], ids[n])
  return out


# ---------------------------------------------------------------------------
# The device process
# ---------------------------------------------------------------------------


def pack_rows(rows: Sequence[Row], k: int) -> dict[str, Any]:
  """Rows -> a few flat arrays (cheap to send to the device process)."""
  return {"lengths": np.array([len(r.items) for r in rows], np.int32),
          "items": np.concatenate([r.items for r in rows]),
          "timestamps": np.concatenate([r.timestamps for r in rows]),
          "query_timestamps": np.concatenate([r.query_timestamps for r in rows]),
          "exclude": np.array([r.exclude_history for r in rows], bool), "k": int(k)}


def unpack_rows(message: dict[str, Any]) -> list[Row]:
  ends = np.cumsum(message["lengths"])
  starts = ends - message["lengths"]
  return [Row(items=message["items"][a:b], timestamps=message["timestamps"][a:b],
              query_timestamps=message["query_timestamps"][a:b], exclude_history=bool(x),
              k=message["k"])
          for a, b, x in zip(starts, ends, message["exclude"])]


def _device_main(conn, bundle_dir: str, buckets: tuple[int, ...],
                 length_buckets: tuple[int, ...] | None) -> None:
  """The device process: loads, compiles and warms up the bundle, then answers batches.

  Messages in: :func:`pack_rows` dicts. Out: ``("ready", info)`` once, then per batch
  ``("ok", scores [n, k], ids [n, k], seconds)`` or ``("error", message)``.
  """
  from trainers import export  # pylint: disable=g-import-not-at-top
  try:
    bundle = export.load_bundle(bundle_dir)
    predictor = export.Predictor(bundle, buckets, length_buckets)
    predictor.warmup()
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", f"{type(e).__name__}: {e}"))
    return
  conn.send(("ready", {"buckets": predictor.buckets,
                       "length_buckets": predictor.length_buckets}))
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):  # the server closed the pipe: shut down
      return
    started = time.perf_counter()
    try:
      results = run_rows(predictor, unpack_rows(message))
      k = message["k"]
      conn.send(("ok", np.stack([s[:k] for s, _ in results]),
                 np.stack([i[:k] for _, i in results]), time.perf_counter() - started))
    except Exception as e:  # pylint: disable=broad-except
      conn.send(("error", f"{type(e).__name__}: {e}"))


class DeviceProcess:
  """The model in a child process, so that the event loop and the device calls never
  wait for each other's GIL.

  In one process, a device thread next to a spinning Python thread ran 19 batches/s
  instead of 103 (it needs the GIL briefly around every call and waits up to a switch
  interval each time); next to a spinning separate process, 74. A process of its own has
  its own interpreter. One batch is in flight at a time;
  the event loop learns of the answer from the pipe's file descriptor (no thread), and of
  the process's death from the same pipe (end of file): then ``on_exit(self)`` is called.
  """

  def __init__(self, bundle_dir: str, buckets: Sequence[int],
               length_buckets: Sequence[int] | None,
               on_exit: Callable[[DeviceProcess], None] | None = None):
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold XLA threads
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(
        target=_device_main, name="recml-device", daemon=True,
        args=(child, bundle_dir, tuple(buckets), tuple(length_buckets) if length_buckets else None))
    self.process.start()
    child.close()
    self.on_exit = on_exit
    self.dead = False
    self._reply: asyncio.Future | None = None
    self._loop: asyncio.AbstractEventLoop | None = None

  @property
  def pid(self) -> int:
    return self.process.pid

  def exit_reason(self) -> str:
    """``exit code N`` or ``killed by signal SIGKILL`` (after the process ended)."""
    self.process.join(1)
    code = self.process.exitcode
    if code is None:
      return "still running"
    if code < 0:
      try:
        return f"killed by signal {signal.Signals(-code).name}"
      except ValueError:
        return f"killed by signal {-code}"
    return f"exit code {code}"

  def wait_ready(self) -> dict[str, Any]:
    """Blocks until the bundle is compiled and warmed up (call it from a thread)."""
    while not self.conn.poll(0.5):
      if not self.process.is_alive():
        raise RuntimeError(f"the device process (pid {self.pid}) ended while loading "
                           f"({self.exit_reason()})")
    try:
      kind, payload = self.conn.recv()
    except (EOFError, OSError):
      raise RuntimeError(f"the device process (pid {self.pid}) ended while loading "
                         f"({self.exit_reason()})") from None
    if kind != "ready":
      raise RuntimeError(payload)
    return payload

  def attach(self, loop: asyncio.AbstractEventLoop) -> None:
    self._loop = loop
    loop.add_reader(self.conn.fileno(), self._readable)

  def _readable(self) -> None:
    try:
      message = self.conn.recv()
    except (EOFError, OSError):
      self._died()
      return
    reply, self._reply = self._reply, None
    if reply is not None and not reply.done():
      reply.set_result(message)

  def _died(self) -> None:
    if self.dead:
      return
    self.dead = True
    if self._loop is not None and not self.conn.closed:
      self._loop.remove_reader(self.conn.fileno())
    reason = f"the device process (pid {self.pid}) died ({self.exit_reason()})"
    reply, self._reply = self._reply, None
    if reply is not None and not reply.done():
      reply.set_exception(DeviceUnavailable(reason))
    if self.on_exit is not None:
      self.on_exit(self)

  async def run(self, rows: Sequence[Row], k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(scores [n, k], ids [n, k], device seconds)`` for rows (one call at a time).

    Raises :class:`DeviceUnavailable` when the process is dead or dies meanwhile.
    """
    if self.dead or not self.process.is_alive():
      raise DeviceUnavailable(f"the device process (pid {self.pid}) died "
                              f"({self.exit_reason()})")
    self._reply = asyncio.get_running_loop().create_future()
    try:
      self.conn.send(pack_rows(rows, k))
    except OSError as e:  # the pipe broke: the process is gone (EOF follows)
      self._reply = None
      raise DeviceUnavailable(f"the device process (pid {self.pid}) is gone: {e}") from None
    kind, *payload = await self._reply
    if kind != "ok":
      raise RuntimeError(payload[0])
    return tuple(payload)

  def close(self) -> None:
    self.on_exit = None  # closing is not dying
    if self._loop is not None and not self.conn.closed:
      self._loop.remove_reader(self.conn.fileno())
    self.conn.close()
    self.process.join(5)
    if self.process.is_alive():
      self.process.terminate()
      self.process.join(5)


@dataclasses.dataclass(frozen=True)
class Backoff:
  """When to restart a dead device process: after ``first * 2**n`` seconds (at most
  ``cap``), n the restarts since the device last stayed up ``stable`` seconds; after
  ``max_restarts`` such restarts in a row the server gives up (the platform takes over)."""

  first: float = 0.5
  cap: float = 30.0
  stable: float = 60.0
  max_restarts: int = 6

  def delay(self, n: int) -> float:
    return min(self.cap, self.first * 2 ** n)


class Supervisor:
  """Keeps one device process up: starts it, restarts it with :class:`Backoff` when it
  dies, and answers ``run`` through it (:class:`DeviceUnavailable` while it is down).

  ``on_fatal(reason)`` is called when it gives up.
  """

  def __init__(self, bundle_dir: str, buckets: Sequence[int],
               length_buckets: Sequence[int] | None, backoff: Backoff = Backoff(),
               on_fatal: Callable[[str], None] | None = None):
    self.args = (bundle_dir, tuple(buckets), length_buckets)
    self.backoff = backoff
    self.on_fatal = on_fatal
    self.device: DeviceProcess | None = None
    self.ready = False
    self.restarts = 0           # successful restarts
    self.streak = 0             # restarts since the device last stayed up `stable` seconds
    self.down_reason = "loading"
    self.fatal: str | None = None
    self.load_seconds = 0.0     # the last start's duration (spawn, load, compile, warm-up)
    self._ready_since = 0.0
    self._retry_at = 0.0        # monotonic time the device should be ready again
    self._loop: asyncio.AbstractEventLoop | None = None
    self._task: asyncio.Task | None = None
    self._starting: DeviceProcess | None = None
    self._closed = False

  def start(self) -> dict[str, Any]:
    """Starts the device and blocks until it is ready (call it from a thread); then
    :meth:`attach` on the event loop."""
    started = time.monotonic()
    device = self._starting = DeviceProcess(*self.args, on_exit=self._died)
    try:
      if self._closed:
        raise RuntimeError("the server is shutting down")
      info = device.wait_ready()
    except BaseException:
      device.close()
      raise
    finally:
      self._starting = None
    self.load_seconds = time.monotonic() - started
    self.device = device
    return info

  def attach(self, loop: asyncio.AbstractEventLoop) -> None:
    self._loop = loop
    self.device.attach(loop)
    self.ready, self._ready_since = True, time.monotonic()
    log.info("device process %d ready (started in %.1fs)", self.device.pid, self.load_seconds)

  def retry_after(self) -> int:
    """Seconds until the device should answer again (for ``Retry-After``)."""
    return max(1, math.ceil(self._retry_at - time.monotonic()))

  def _died(self, device: DeviceProcess) -> None:
    if self._closed or device is not self.device:
      return
    self.ready = False
    if time.monotonic() - self._ready_since >= self.backoff.stable:
      self.streak = 0
    self.down_reason = f"the device process (pid {device.pid}) died ({device.exit_reason()})"
    log.error("%s", self.down_reason)
    device.close()
    self._retry_at = time.monotonic() + self.backoff.delay(self.streak) + self.load_seconds
    self._task = self._loop.create_task(self._restart())

  async def _restart(self) -> None:
    loop = asyncio.get_running_loop()
    while not self._closed:
      if self.streak >= self.backoff.max_restarts:
        self.fatal = (f"{self.down_reason}; giving up after {self.streak} restarts without "
                      f"{self.backoff.stable:g}s of uptime")
        log.error("%s", self.fatal)
        if self.on_fatal is not None:
          self.on_fatal(self.fatal)
        return
      delay = self.backoff.delay(self.streak)
      self.streak += 1
      self._retry_at = time.monotonic() + delay + self.load_seconds
      log.warning("restarting the device process in %.1fs (restart %d in a row): %s",
                  delay, self.streak, self.down_reason)
      await asyncio.sleep(delay)
      try:
        await loop.run_in_executor(None, self.start)
      except Exception as e:  # pylint: disable=broad-except
        self.down_reason = f"the restarted device process failed: {e}"
        log.error("%s", self.down_reason)
        continue
      if self._closed:
        self.device.close()
        return
      self.restarts += 1
      self.attach(loop)
      log.info("device process restarted: pid %d (restart %d)", self.device.pid,
               self.restarts)
      return

  async def run(self, rows: Sequence[Row], k: int) -> tuple[np.ndarray, np.ndarray, float]:
    if not self.ready:
      raise DeviceUnavailable(self.down_reason)
    return await self.device.run(rows, k)

  def close(self) -> None:
    self._closed = True
    if self._task is not None:
      self._task.cancel()
    starting = self._starting
    if starting is not None:  # a start in a thread: end it now, not after its warm-up
      starting.process.kill()
    if self.device is not None:
      self.device.close()


# ---------------------------------------------------------------------------
# Micro-batching
# ---------------------------------------------------------------------------


class Batcher:
  """Queues rows from concurrent requests; the device process runs them in batches.

  Whatever is queued when the device becomes free (up to ``max_batch`` rows) is the next
  batch, so batches grow with the load and a lone request waits for nobody.
  ``device``: anything with ``async run(rows, k)`` (a :class:`Supervisor`).
  """

  def __init__(self, device, max_batch: int):
    self.device = device
    self.max_batch = max_batch
    self.queue: asyncio.Queue = asyncio.Queue()
    self.batches = 0
    self.rows = 0
    self.device_seconds = 0.0
    self._task: asyncio.Task | None = None

  def start(self) -> None:
    self._task = asyncio.get_running_loop().create_task(self._work())

  async def stop(self) -> None:
    if self._task:
      self._task.cancel()

  async def predict(self, rows: Sequence[Row]) -> list[tuple[np.ndarray, np.ndarray]]:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in rows]
    for row, fut in zip(rows, futures):
      self.queue.put_nowait((row, fut))
    return list(await asyncio.gather(*futures))

  async def _work(self) -> None:
    while True:
      batch = [await self.queue.get()]
      while len(batch) < self.max_batch and not self.queue.empty():
        batch.append(self.queue.get_nowait())
      batch = [(r, f) for r, f in batch if not f.done()]  # cancelled (client went away)
      if not batch:
        continue
      rows = [r for r, _ in batch]
      try:
        scores, ids, seconds = await self.device.run(rows, max(r.k for r in rows))
      except Exception as e:  # pylint: disable=broad-except
        log.error("batch of %d failed: %s", len(batch), e)
        for _, fut in batch:
          if not fut.done():
            fut.set_exception(e)
        continue
      self.device_seconds += seconds
      self.batches += 1
      self.rows += len(batch)
      for j, (_, fut) in enumerate(batch):
        if not fut.done():
          fut.set_result((scores[j], ids[j]))


# ---------------------------------------------------------------------------
# The aiohttp application
# ---------------------------------------------------------------------------


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
  return (int(environ.get("AIP_HTTP_PORT") or DEFAULT_PORT),
          environ.get("AIP_HEALTH_ROUTE") or DEFAULT_HEALTH_ROUTE,
          environ.get("AIP_PREDICT_ROUTE") or DEFAULT_PREDICT_ROUTE)


def make_app(bundle_dir: str, *, health_route: str = DEFAULT_HEALTH_ROUTE,
             predict_route: str = DEFAULT_PREDICT_ROUTE, limits: Limits = Limits(),
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
    from trainers import export  # pylint: disable=g-import-not-at-top
    started = time.time()
    if naive:
      bundle = export.load_bundle(bundle_dir)
      predictor = export.Predictor(bundle, (1,), length_buckets)
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
      rows = parse_body(body, bundle, limits)
    except RequestError as e:
      return error(e.status, str(e))
    if naive:  # one instance at a time, on the event loop
      results = [run_rows(state["predictor"], [row])[0] for row in rows]
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
        {"predictions": [prediction(bundle, r, s, i) for r, (s, i) in zip(rows, results)]}),
                        content_type="application/json")

  app.router.add_get(health_route, health)
  app.router.add_get("/v1/metadata", metadata)
  app.router.add_post(predict_route, predict)
  app.on_startup.append(startup)
  app.on_cleanup.append(cleanup)
  app[_keys()[0]] = state
  return app


# ---------------------------------------------------------------------------
# Where the bundle comes from
# ---------------------------------------------------------------------------


def default_registry() -> str:
  """``$RECML_REGISTRY``, else ``registry/`` in the local pipeline root."""
  from pipelines import env as env_lib  # pylint: disable=g-import-not-at-top
  if os.environ.get("RECML_REGISTRY"):
    return os.environ["RECML_REGISTRY"]
  root = os.environ.get("RECML_PIPELINE_ROOT") or env_lib.DEFAULT_LOCAL_ROOT
  return os.path.join(os.path.abspath(root), "registry")


def safe_relpath(name: str) -> str:
  """A blob name relative to its bundle's prefix -> a relative local path that stays inside
  the destination folder; raises ``ValueError`` for names that could leave it.

  Refused: absolute names (a join drops the folder before them), empty segments (``a//b``;
  after the prefix, ``//etc/passwd`` is absolute), ``.`` and ``..`` segments, NUL bytes.
  One trailing ``/`` (a folder placeholder) is allowed and kept.
  """
  segments = name.split("/")
  if name.endswith("/"):
    segments.pop()
  bad = [s for s in segments if s in ("", ".", "..")]
  if not name or name.startswith("/") or bad or "\0" in name:
    why = ("is absolute" if name.startswith("/") else "has a NUL byte" if "\0" in name
           else f"has a {bad[0]!r} path segment" if bad else "is empty")
    raise ValueError(f"unsafe blob name {name!r}: it {why}")
  return os.path.join(*segments) + ("/" if name.endswith("/") else "")


def blob_path(dest: str, prefix: str, name: str) -> str | None:
  """The local file of blob ``name`` listed under ``prefix``, inside ``dest``; None for
  folder placeholders (``prefix`` itself, names ending in ``/``).

  Raises ``ValueError`` (naming the blob) for a name outside ``prefix`` or one that
  :func:`safe_relpath` refuses; the resolved path is checked to be inside ``dest``.
  """
  if not name.startswith(prefix):
    raise ValueError(f"blob {name!r} is not under the prefix {prefix!r}")
  rel = name[len(prefix):]
  if not rel:
    return None
  try:
    rel = safe_relpath(rel)
  except ValueError as e:
    raise ValueError(f"blob {name!r}: {e}") from None
  if rel.endswith("/"):
    return None
  root = os.path.realpath(dest)
  path = os.path.realpath(os.path.join(root, rel))
  if os.path.commonpath([root, path]) != root:  # e.g. a symlink inside dest
    raise ValueError(f"blob {name!r} resolves to {path}, outside {root}")
  return path


def fetch_gcs(uri: str, dest: str) -> str:
  """Copies a ``gs://`` bundle (Vertex sets ``AIP_STORAGE_URI``) into ``dest``.

  Every blob name is checked (:func:`blob_path`) before anything is downloaded: one
  that would land outside ``dest`` fails the whole copy.
  """
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket_name, _, prefix = uri[len("gs://"):].partition("/")
  prefix = prefix.rstrip("/") + "/" if prefix else ""
  client = storage.Client()
  blobs = [(blob, blob_path(dest, prefix, blob.name))
           for blob in client.list_blobs(bucket_name, prefix=prefix)]
  blobs = [(blob, path) for blob, path in blobs if path is not None]
  if not blobs:
    raise FileNotFoundError(f"nothing under {uri}")
  for blob, path in blobs:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob.download_to_filename(path)
  return dest


def resolve_bundle(bundle: str | None, registry: str | None) -> str:
  """--bundle, else Vertex's ``$AIP_STORAGE_URI``, else the registry's current model."""
  from trainers import export  # pylint: disable=g-import-not-at-top
  source = bundle or os.environ.get("AIP_STORAGE_URI")
  if source:
    if source.startswith("gs://"):
      import tempfile  # pylint: disable=g-import-not-at-top
      return fetch_gcs(source, tempfile.mkdtemp(prefix="recml-bundle-"))
    return source
  return export.current(registry or default_registry())["path"]


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def register(subparsers) -> None:
  """Adds ``export``, ``serve`` and ``deploy`` to the ``recml`` CLI."""
  p = subparsers.add_parser("serve", help="serve a model bundle over HTTP (Vertex AI contract)",
                            description=__doc__.split("\n\n")[2],
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
  p.add_argument("--max-instances", type=int, default=Limits.max_instances,
                 help="most instances per request; more get 400 (default %(default)s)")
  p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
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
  p.add_argument("--data", help="dataset directory with vocab/items.txt (default: the "
                 "config's data_dir)")
  p.add_argument("--output", required=True, help="bundle directory (new or empty)")
  p.add_argument("--max-k", type=int, default=100)
  p.set_defaults(func=cmd_export)

  p = subparsers.add_parser("deploy", help="deploy a bundle: local registry or Vertex AI endpoint")
  p.add_argument("--bundle", required=True, help="bundle directory (gs:// for Vertex)")
  p.add_argument("--target", choices=("local", "vertex"), default="local")
  p.add_argument("--registry", help="local registry folder (default as for serve)")
  p.add_argument("--display-name", default="recml")
  p.add_argument("--endpoint", help="Vertex: existing endpoint resource name (default: create)")
  p.add_argument("--dry-run", action="store_true", help="Vertex: print the requests only")
  p.add_argument("--env-file", help="KEY=VALUE file, e.g. infra/env.sh")
  p.set_defaults(func=cmd_deploy)


def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def _buckets(max_batch: int) -> tuple[int, ...]:
  from trainers import export  # pylint: disable=g-import-not-at-top
  return export.doubling_buckets(1, max_batch)


def check_bundle(path: str) -> dict[str, Any]:
  """What can be checked before binding the port, without JAX: the folder, its format
  and every file against its sha256 (``bundle.json``). Raises OSError or ValueError."""
  from trainers import export  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f"bundle {path} does not exist or is not a directory")
  return export.verify_bundle_files(path)


async def _serve(bundle: str, host: str, port: int, **app_kwargs) -> int:
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


def cmd_serve(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
  port, health_route, predict_route = routes_from_env()
  port = args.port or port
  host = args.host or ("0.0.0.0" if os.environ.get("AIP_HTTP_PORT") else "127.0.0.1")
  try:
    bundle = resolve_bundle(args.bundle, args.registry)
    check_bundle(bundle)
  except (OSError, ValueError) as e:
    print(f"error: cannot serve {args.bundle or 'the current model'}: {e}", file=sys.stderr)
    return 2
  if args.cpu_threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()
  limits = Limits(max_body_bytes=args.max_body_bytes, max_instances=args.max_instances)
  print(f"serving {bundle} on http://{host}:{port} (health {health_route}, predict "
        f"{predict_route}{', naive' if args.naive else ''})", flush=True)
  import uvloop  # pylint: disable=g-import-not-at-top
  with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    return runner.run(_serve(bundle, host, port, health_route=health_route,
                             predict_route=predict_route, limits=limits,
                             buckets=_buckets(args.max_batch),
                             length_buckets=args.length_buckets, naive=args.naive,
                             backoff=Backoff(max_restarts=args.max_restarts)))


def cmd_export(args: argparse.Namespace) -> int:
  from components import export as export_step  # pylint: disable=g-import-not-at-top
  record = export_step.run(args.model_dir, args.output, args.data, args.max_k)
  print(f"bundle: {args.output} ({record['model']}, max_len {record['max_len']}, "
        f"max_k {record['max_k']}, {record['item_vocab_size']} ids)")
  return 0


def cmd_deploy(args: argparse.Namespace) -> int:
  from components import deploy as deploy_step  # pylint: disable=g-import-not-at-top
  from pipelines import env as env_lib  # pylint: disable=g-import-not-at-top
  try:
    if args.target == "local":
      record = deploy_step.run_local(args.bundle, args.registry or default_registry())
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
