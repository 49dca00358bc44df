"""The model in a process of its own, kept up by a supervisor.

:class:`DeviceProcess` runs a :class:`serving.predictor.Predictor` in a spawned child
process and talks to it over a pipe (:func:`pack_rows` messages in, top-K arrays out);
:class:`Supervisor` starts it, restarts it with :class:`Backoff` when it dies, and gives
up (``on_fatal``) after too many restarts in a row. While the device is down, ``run``
raises :class:`DeviceUnavailable` (the server answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import multiprocessing
import signal
import time
from typing import Any, Callable, Sequence

import numpy as np

from serving import predictor as predictor_lib
from serving.protocol import RankingRow, Row
from trainers import export

log = logging.getLogger("recml.serve")


class DeviceUnavailable(RuntimeError):
  """The device process is down or restarting (answered with 503 and Retry-After)."""


def pack_rows(rows: Sequence[Row], k: int) -> dict[str, Any]:
  """Rows -> a few flat arrays (cheap to send to the device process)."""
  if isinstance(rows[0], RankingRow):
    return predictor_lib.pack_ranking_rows(rows, k)
  return {"lengths": np.array([len(r.items) for r in rows], np.int32),
          "items": np.concatenate([r.items for r in rows]),
          "timestamps": np.concatenate([r.timestamps for r in rows]),
          "query_timestamps": np.concatenate([r.query_timestamps for r in rows]),
          "exclude": np.array([r.exclude_history for r in rows], bool), "k": int(k)}


def unpack_rows(message: dict[str, Any]) -> list[Row]:
  """:func:`pack_rows`' message -> the rows (views of its arrays)."""
  if message.get("kind") == "ranking":
    return predictor_lib.unpack_ranking_rows(message)
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
  try:
    bundle = export.load_bundle(bundle_dir)
    predictor = predictor_lib.make_predictor(bundle, buckets, length_buckets)
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
      results = predictor_lib.run_rows(predictor, unpack_rows(message))
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
