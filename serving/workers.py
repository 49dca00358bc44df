"""Several HTTP worker processes in front of one device process (``recml serve
--workers N``, N > 1).

This process, the master, takes the port, starts the device process
(:class:`serving.device.Supervisor`) and N workers (:class:`WorkerPool`), and relays the
device process's state to every worker over a pipe. Each worker is the aiohttp
application of :mod:`serving.server` (plain predicts: :mod:`serving.fastpath`) on its
own socket bound to the same port with ``SO_REUSEPORT`` (the kernel spreads new
connections over them); it parses, validates and encodes requests, hands the rows to
the device process in shared memory (:mod:`serving.shm`) and answers. The device
process batches the rows of all workers. The workers keep off the core of the device
process's batching thread (:func:`serving.device.core_plan`).

Failures: a dead device process is restarted with backoff (every worker answers 503 with
``Retry-After`` meanwhile); a dead worker too (its open connections are lost; the other
workers keep serving, and new connections go to them). After ``max_restarts`` restarts
of one of them in a row without ``stable`` seconds of uptime, the master exits 1 with
the reason (the platform replaces the container). SIGTERM or SIGINT: the workers finish
what they hold (up to 5 s), then the device process stops, and the master exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from serving.device import (Backoff, Supervisor, core_plan, exit_reason, pin_threads,
                            worker_cores)
from serving.fastpath import listening_socket
from serving.server import stop_on_signals

log = logging.getLogger("recml.serve")


def default_workers() -> int:
  """One HTTP worker per core this process may use, but one left for the device
  process; at least one."""
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
           os.cpu_count() or 1)
  return max(1, cores - 1)


def _worker_main(control, index: int, bundle: str, host: str, port: int,
                 app_kwargs: dict[str, Any], cores: set[int] | None) -> None:
  """A worker process: the HTTP application on a ``SO_REUSEPORT`` socket until SIGTERM
  (exit 0) or the master's pipe closes (exit 1), on ``cores`` (all if None)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the master, which stops us
  if cores:
    pin_threads(cores)
  logging.basicConfig(level=logging.INFO, format=(
      f"%(asctime)s %(name)s [worker {index} pid {os.getpid()}] %(message)s"))
  logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
  import uvloop  # pylint: disable=g-import-not-at-top
  sys.exit(uvloop.run(_serve_worker(control, bundle, host, port, app_kwargs)))


async def _serve_worker(control, bundle: str, host: str, port: int,
                        app_kwargs: dict[str, Any]) -> int:
  from aiohttp import web  # pylint: disable=g-import-not-at-top
  from serving import server  # pylint: disable=g-import-not-at-top
  loop = asyncio.get_running_loop()
  stop = loop.create_future()

  def finish(reason: str | None) -> None:
    if not stop.done():
      stop.set_result(reason)
  loop.add_signal_handler(signal.SIGTERM, finish, None)
  app = server.make_app(bundle, control=control, on_fatal=finish, **app_kwargs)
  runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
  await runner.setup()
  try:
    await server.fast_site(runner, listening_socket(host, port, reuse_port=True)).start()
    reason = await stop
  finally:
    await runner.cleanup()
  if reason is not None:
    log.error("%s", reason)
    return 1
  return 0


class WorkerPool:
  """The HTTP worker processes (on ``cores``): started, told the device process's state
  (:meth:`publish`), restarted with ``backoff`` when one dies; ``on_fatal(reason)``
  when one keeps dying."""

  def __init__(self, n: int, bundle: str, host: str, port: int, app_kwargs: dict[str, Any],
               backoff: Backoff = Backoff(), on_fatal=None, cores: set[int] | None = None):
    self.n, self.args = n, (bundle, host, port, app_kwargs, cores)
    self.backoff, self.on_fatal = backoff, on_fatal
    self.processes: list[Any] = [None] * n
    self.pipes: list[Any] = [None] * n
    self.restarts = 0
    self._started = [0.0] * n
    self._streak = [0] * n   # restarts of a worker since it last stayed up `stable` seconds
    self._state: dict[str, Any] | None = None
    self._loop: asyncio.AbstractEventLoop | None = None
    self._closed = False

  @property
  def pids(self) -> list[int]:
    return [p.pid for p in self.processes if p is not None]

  def start(self, loop: asyncio.AbstractEventLoop) -> None:
    self._loop = loop
    for i in range(self.n):
      self._spawn(i)

  def _spawn(self, i: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    pipe, child = ctx.Pipe()
    process = ctx.Process(target=_worker_main, name=f"recml-worker-{i}", daemon=True,
                          args=(child, i, *self.args))
    process.start()
    child.close()
    self.processes[i], self.pipes[i], self._started[i] = process, pipe, time.monotonic()
    self._loop.add_reader(process.sentinel, self._exited, i)
    if self._state is not None:
      self._send(i, self._state)

  def publish(self, state: dict[str, Any]) -> None:
    """Sends the device process's state to every worker (and to those started later)."""
    self._state = state
    for i in range(self.n):
      self._send(i, state)

  def _send(self, i: int, state: dict[str, Any]) -> None:
    try:
      self.pipes[i].send(state)
    except OSError:  # a dead worker: its restart gets the state
      pass

  def _exited(self, i: int) -> None:
    process = self.processes[i]
    self._loop.remove_reader(process.sentinel)
    self.pipes[i].close()
    if self._closed:
      return
    reason = f"HTTP worker {i} (pid {process.pid}) died ({exit_reason(process)})"
    log.error("%s", reason)
    if time.monotonic() - self._started[i] >= self.backoff.stable:
      self._streak[i] = 0
    if self._streak[i] >= self.backoff.max_restarts:
      if self.on_fatal is not None:
        self.on_fatal(f"{reason}; giving up after {self._streak[i]} restarts without "
                      f"{self.backoff.stable:g}s of uptime")
      return
    delay = self.backoff.delay(self._streak[i])
    self._streak[i] += 1
    log.warning("restarting HTTP worker %d in %.1fs (restart %d in a row)", i, delay,
                self._streak[i])
    self._loop.call_later(delay, self._restart, i)

  def _restart(self, i: int) -> None:
    if self._closed:
      return
    self._spawn(i)
    self.restarts += 1
    log.info("HTTP worker %d restarted: pid %d", i, self.processes[i].pid)

  def close(self, timeout: float = 10) -> None:
    """SIGTERM to every worker (they finish what they hold), then SIGKILL after
    ``timeout`` seconds."""
    self._closed = True
    alive = [p for p in self.processes if p is not None and p.is_alive()]
    for p in alive:
      p.terminate()
    deadline = time.monotonic() + timeout
    for p in alive:
      p.join(max(0.0, deadline - time.monotonic()))
      if p.is_alive():
        p.kill()
        p.join(5)
    for pipe in self.pipes:
      if pipe is not None:
        pipe.close()


async def serve(bundle: str, host: str, port: int, workers: int, *,
                buckets=(1, 2, 4, 8, 16, 32, 64), length_buckets=None,
                backoff: Backoff = Backoff(), **app_kwargs) -> int:
  """The master: runs ``workers`` HTTP workers and the device process until SIGTERM or
  SIGINT (0) or a fatal error (1, the reason on stderr). ``app_kwargs``: the workers'
  :func:`serving.server.make_app` arguments (routes, limits)."""
  loop = asyncio.get_running_loop()
  stop, finish = stop_on_signals(loop)
  held = listening_socket(host, port, reuse_port=True, listen=False)  # the port is ours
  port = held.getsockname()[1]                        # (port 0: the one chosen)
  cores = core_plan()
  pool = WorkerPool(workers, bundle, host, port, {**app_kwargs, "workers": workers},
                    backoff, on_fatal=finish, cores=worker_cores(cores))
  info: dict[str, Any] = {}
  supervisor = Supervisor(bundle, buckets, length_buckets, backoff, on_fatal=finish,
                          on_change=lambda state: pool.publish({**state, "info": info}),
                          cores=cores)

  async def start_device() -> None:
    started = time.time()
    try:
      info.update(await loop.run_in_executor(None, supervisor.start))
    except Exception as e:  # pylint: disable=broad-except
      # a RuntimeError carries the device process's own "Type: message"
      reason = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
      log.error("cannot load the bundle %s: %s", bundle, reason)
      finish(f"cannot load the bundle {bundle}: {reason}")
      return
    log.info("bundle %s compiled for batches %s x lengths %s and warmed up in %.1fs; "
             "%d HTTP workers (pids %s)", bundle, info["buckets"], info["length_buckets"],
             time.time() - started, workers, pool.pids)
    supervisor.attach(loop)

  pool.start(loop)
  task = loop.create_task(start_device())
  try:
    reason = await stop
  finally:
    task.cancel()
    pool.close()
    supervisor.close()
    held.close()
  if reason is not None:
    print(f"error: {reason}", file=sys.stderr, flush=True)
    return 1
  return 0
