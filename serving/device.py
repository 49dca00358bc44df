"""The model in a process of its own, kept up by a supervisor, and the front end's link
to it.

:class:`DeviceProcess` runs a :class:`serving.predictor.Predictor` in a spawned child
process: once the bundle is compiled and warmed up, the child listens on a Unix socket
for the HTTP workers and batches their rows (:func:`serving.batcher.serve`; rows and
answers go through shared memory, :mod:`serving.shm`). Its pipe to the supervisor says
when it is ready, and its end of file says it died. :class:`Supervisor` starts it,
restarts it with :class:`Backoff` when it dies, gives up (``on_fatal``) after too many
restarts in a row, and publishes its state (``on_change``). A worker's
:class:`DeviceLink` follows that state and connects to each new device process;
meanwhile ``run`` raises :class:`DeviceUnavailable` (the server answers 503 with
``Retry-After``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any, Callable, Sequence

from serving import batcher as batcher_lib
from serving import predictor as predictor_lib
from serving import shm
from serving.protocol import RankingRow, Row
from serving.shm import DeviceUnavailable
from trainers import export

log = logging.getLogger("recml.serve")


CorePlan = tuple[tuple[int, ...], int]  # (every core, the device process's core)


def core_plan() -> CorePlan | None:
  """Where ``recml serve`` runs on the cores this process may use (Linux, two or more):
  ``(all of them, the last one)``. The device process keeps to the last core and the HTTP
  workers to the others. With one XLA thread per call (``--cpu-threads 1``, the default)
  the whole device process does, XLA's threads too (:func:`device_affinity`); otherwise
  only its own thread (the one that batches and calls the model), XLA's threads using
  every core. No worker then preempts the device's thread or cools its core's caches: on
  this project's 2-core machine (shared, noisy), SASRec on ml-1m-partial at concurrency
  32 answered a median 2,656 QPS against 2,575 unpinned (13 alternating runs; 9 won),
  with a lower p99. None: no pinning."""
  if not hasattr(os, "sched_getaffinity"):
    return None
  cores = tuple(sorted(os.sched_getaffinity(0)))
  return (cores, cores[-1]) if len(cores) > 1 else None


def xla_single_threaded(environ=os.environ) -> bool:
  """Whether XLA runs each call on one thread here (``recml serve --cpu-threads 1`` sets
  ``--xla_cpu_multi_thread_eigen=false`` in ``XLA_FLAGS``)."""
  return "--xla_cpu_multi_thread_eigen=false" in environ.get("XLA_FLAGS", "")


def device_affinity(plan: CorePlan, environ=os.environ) -> set[int]:
  """The cores of the device process while it loads the bundle (XLA sizes its CPU thread
  pool from them then): its own core when XLA runs calls on one thread, else every core.

  The flags alone do not give one thread: XLA's CPU client still starts a pool of one
  thread per core it may use, and a call's work runs on it. On 2 cores, SASRec calls kept
  1.34 cores busy (357 us of CPU a row against 266 us of wall time, 16 rows a call; on
  one core, 287 us of both). In the server that second thread took the HTTP workers'
  core: SASRec on ml-1m-partial at c=32 answered 2,745, 2,772 and 2,756 QPS with XLA's
  pool on both cores against 2,934, 3,068 and 2,920 with the device process on its own
  core (alternating runs; its CPU 340 against 305 us a row)."""
  return {plan[1]} if xla_single_threaded(environ) else set(plan[0])


def pin_threads(cores: set[int]) -> None:
  """Every thread of this process onto ``cores`` (``sched_setaffinity(0)`` moves only the
  calling thread; threads started before it, by modules imported at start-up, stay)."""
  for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
    try:
      os.sched_setaffinity(int(task), cores)
    except OSError:  # the thread ended meanwhile
      pass


def worker_cores(plan: CorePlan | None) -> set[int] | None:
  """The cores of the HTTP workers (all but the device process's), or None."""
  return set(plan[0]) - {plan[1]} if plan else None


def _device_main(conn, bundle_dir: str, buckets: tuple[int, ...],
                 length_buckets: tuple[int, ...] | None, address: str,
                 cores: CorePlan | None = None) -> None:
  """The device process: loads, compiles and warms up the bundle, listens at
  ``address``, says ``("ready", info)`` on the pipe (or ``("error", message)``), then
  batches the workers' rows until the pipe closes (on ``cores``' device core)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops us
  if cores:  # XLA's threads, started while loading, get these cores
    pin_threads(device_affinity(cores))
  try:
    bundle = export.load_bundle(bundle_dir)
    predictor = predictor_lib.make_predictor(bundle, buckets, length_buckets)
    predictor.warmup(progress=lambda line: print(line, flush=True))
    if cores:  # this thread (it batches and calls the model): the device's own core
      os.sched_setaffinity(0, {cores[1]})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(128)
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", f"{type(e).__name__}: {e}"))
    return
  conn.send(("ready", {"buckets": predictor.buckets,
                       "length_buckets": predictor.length_buckets}))
  batcher = batcher_lib.Batcher(lambda rows: predictor_lib.run_rows(predictor, rows),
                                shm.schema(bundle.meta), predictor.buckets[-1])
  batcher_lib.serve(listener, conn, batcher)


def exit_reason(process: multiprocessing.process.BaseProcess) -> str:
  """``exit code N`` or ``killed by signal SIGKILL`` (after the process ended; waits up
  to a second for it to be reaped)."""
  process.join(1)
  code = process.exitcode
  deadline = time.monotonic() + 0.5
  while code is None and time.monotonic() < deadline:  # reaped by another thread's join,
    time.sleep(0.005)                                  # which stores the status next
    code = process.exitcode
  if code is None:
    return "still running"
  if code < 0:
    try:
      return f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit code {code}"


class DeviceProcess:
  """The model in a child process, so that the event loops and the device calls never
  wait for each other's GIL.

  In one process, a device thread next to a spinning Python thread ran 19 batches/s
  instead of 103 (it needs the GIL briefly around every call and waits up to a switch
  interval each time); next to a spinning separate process, 74. A process of its own has
  its own interpreter. The event loop learns of the process's death from its pipe's file
  descriptor (end of file; no thread): then ``on_exit(self)`` is called.
  """

  def __init__(self, bundle_dir: str, buckets: Sequence[int],
               length_buckets: Sequence[int] | None, address: str,
               on_exit: Callable[[DeviceProcess], None] | None = None,
               cores: CorePlan | None = None):
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold XLA threads
    self.conn, child = ctx.Pipe()
    self.address = address
    self.process = ctx.Process(
        target=_device_main, name="recml-device", daemon=True,
        args=(child, bundle_dir, tuple(buckets),
              tuple(length_buckets) if length_buckets else None, address, cores))
    self.process.start()
    child.close()
    self.on_exit = on_exit
    self.dead = False
    self._loop: asyncio.AbstractEventLoop | None = None

  @property
  def pid(self) -> int:
    return self.process.pid

  def exit_reason(self) -> str:
    """``exit code N`` or ``killed by signal SIGKILL`` (after the process ended)."""
    return exit_reason(self.process)

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
      self.conn.recv()  # nothing is sent after "ready"
    except (EOFError, OSError):
      self._died()

  def _died(self) -> None:
    if self.dead:
      return
    self.dead = True
    if self._loop is not None and not self.conn.closed:
      self._loop.remove_reader(self.conn.fileno())
    if self.on_exit is not None:
      self.on_exit(self)

  def close(self) -> None:
    self.on_exit = None  # closing is not dying
    if self._loop is not None and not self.conn.closed:
      self._loop.remove_reader(self.conn.fileno())
    self.conn.close()
    self.process.join(5)
    if self.process.is_alive():
      self.process.terminate()
      self.process.join(5)
    try:
      os.unlink(self.address)
    except OSError:
      pass


@dataclasses.dataclass(frozen=True)
class Backoff:
  """When to restart a dead process (the device process, an HTTP worker): after
  ``first * 2**n`` seconds (at most ``cap``), n the restarts since it last stayed up
  ``stable`` seconds; after ``max_restarts`` such restarts in a row the server gives up
  (the platform takes over)."""

  first: float = 0.5
  cap: float = 30.0
  stable: float = 60.0
  max_restarts: int = 6

  def delay(self, n: int) -> float:
    return min(self.cap, self.first * 2 ** n)


class Supervisor:
  """Keeps one device process up: starts it, restarts it with :class:`Backoff` when it
  dies, and publishes its :meth:`state` (``on_change(state)``) to the front end.

  ``on_fatal(reason)`` is called when it gives up. Each device process listens on a
  Unix socket of its own in a private folder (``address`` in the state); ``cores``:
  :func:`core_plan`.
  """

  def __init__(self, bundle_dir: str, buckets: Sequence[int],
               length_buckets: Sequence[int] | None, backoff: Backoff = Backoff(),
               on_fatal: Callable[[str], None] | None = None,
               on_change: Callable[[dict[str, Any]], None] | None = None,
               cores: CorePlan | None = None):
    self.args = (bundle_dir, tuple(buckets), length_buckets)
    self.backoff = backoff
    self.on_fatal = on_fatal
    self.on_change = on_change
    self.cores = cores
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
    self._folder = tempfile.mkdtemp(prefix="recml-serve-")  # 0700: this user only
    self._starts = 0

  def state(self) -> dict[str, Any]:
    """What the front end needs: ``ready``, ``address`` (when ready), ``pid``,
    ``restarts``, ``reason`` (why it is down), ``retry_at`` (monotonic seconds) and
    ``fatal`` (the reason it gave up, else None)."""
    device = self.device
    return {"ready": self.ready, "address": device.address if self.ready else None,
            "pid": device.pid if device else None, "restarts": self.restarts,
            "reason": self.down_reason, "retry_at": self._retry_at, "fatal": self.fatal}

  def describe(self) -> str:
    """Why the device process went away, as soon as it has (its exit status)."""
    device = self.device
    if device is None:
      return self.down_reason
    if device.process.is_alive():
      return f"the device process (pid {device.pid}) closed its connection"
    return f"the device process (pid {device.pid}) died ({device.exit_reason()})"

  def _publish(self) -> None:
    if self.on_change is not None and not self._closed:
      self.on_change(self.state())

  def start(self) -> dict[str, Any]:
    """Starts the device and blocks until it is ready (call it from a thread); then
    :meth:`attach` on the event loop."""
    started = time.monotonic()
    self._starts += 1
    address = os.path.join(self._folder, f"device-{self._starts}.sock")
    device = self._starting = DeviceProcess(*self.args, address, on_exit=self._died,
                                            cores=self.cores)
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
    self._publish()

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
    self._publish()
    self._task = self._loop.create_task(self._restart())

  async def _restart(self) -> None:
    loop = asyncio.get_running_loop()
    while not self._closed:
      if self.streak >= self.backoff.max_restarts:
        self.fatal = (f"{self.down_reason}; giving up after {self.streak} restarts without "
                      f"{self.backoff.stable:g}s of uptime")
        log.error("%s", self.fatal)
        self._publish()
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
        self._publish()
        continue
      if self._closed:
        self.device.close()
        return
      self.restarts += 1
      self.attach(loop)
      log.info("device process restarted: pid %d (restart %d)", self.device.pid,
               self.restarts)
      return

  def close(self) -> None:
    self._closed = True
    if self._task is not None:
      self._task.cancel()
    starting = self._starting
    if starting is not None:  # a start in a thread: end it now, not after its warm-up
      starting.process.kill()
    if self.device is not None:
      self.device.close()
    shutil.rmtree(self._folder, ignore_errors=True)


class DeviceLink:
  """A worker's view of the device process: the state its supervisor publishes
  (:meth:`Supervisor.state`, from this process or from the master over a pipe) and a
  :class:`serving.shm.DeviceClient` connected to the live device process.

  ``describe()`` says why a connection ended (default: the device process went away).
  """

  LOADING = "loading: compiling and warming up the model"

  def __init__(self, schema, arena_bytes: int,
               describe: Callable[[], str] | None = None):
    self.schema, self.arena_bytes = schema, arena_bytes
    self.describe = describe or (
        lambda: f"the device process (pid {self.state['pid']}) went away")
    self.state: dict[str, Any] = {"ready": False, "address": None, "pid": None,
                                  "restarts": 0, "reason": "loading", "retry_at": 0.0,
                                  "fatal": None}
    self.client: shm.DeviceClient | None = None
    self._connecting: asyncio.Task | None = None
    self._closed = False

  @property
  def ready(self) -> bool:
    return (self.state["ready"] and self.client is not None and self.client.connected
            and self.client.address == self.state["address"])

  def update(self, state: dict[str, Any]) -> None:
    """A new state (called on the event loop): connects to a new device process."""
    self.state = state
    if state["ready"] and not self.ready:
      self._connect_soon()

  def _connect_soon(self) -> None:
    if self._closed:
      return
    if self._connecting is None or self._connecting.done():
      self._connecting = asyncio.get_running_loop().create_task(self._connect())

  async def _connect(self) -> None:
    while self.state["ready"] and not self.ready:
      address = self.state["address"]
      try:
        client = await shm.DeviceClient.connect(address, self.schema, self.arena_bytes,
                                                describe=self.describe, on_lost=self._lost)
      except OSError as e:  # gone meanwhile (the supervisor's news follows), or not yet
        log.debug("cannot connect to the device process at %s: %s", address, e)
        await asyncio.sleep(0.1)
        continue
      old, self.client = self.client, client
      if old is not None:
        old.close()

  def _lost(self, client: shm.DeviceClient) -> None:
    if client is self.client and self.state["ready"]:
      self._connect_soon()  # the same device process, or its death is not yet known

  def retry_after(self) -> int:
    """Seconds until the device should answer again (for ``Retry-After``)."""
    return max(1, math.ceil(self.state["retry_at"] - time.monotonic()))

  def unavailable(self) -> tuple[int, str, int | None] | None:
    """None when ready, else ``(status, reason, Retry-After)``: 500 when the supervisor
    gave up, 503 while loading, restarting or connecting."""
    state = self.state
    if state["fatal"]:
      return 500, state["fatal"], None
    if self.ready:
      return None
    if state["reason"] == "loading":
      return 503, self.LOADING, 1
    if state["ready"]:
      return 503, f"connecting to the device process (pid {state['pid']})", 1
    return 503, f"{state['reason']}; restarting it, retry later", self.retry_after()

  async def run(self, rows: Sequence[Row | RankingRow]) -> list[tuple[Any, Any]]:
    """Every row's ``(scores, ids)`` (:meth:`serving.shm.DeviceClient.run`)."""
    client = self.client
    if client is None or not self.ready:
      raise DeviceUnavailable(self.describe() if self.state["ready"] else
                              self.state["reason"])
    return await client.run(rows)

  def counters(self) -> tuple[int, int, float]:
    """The device process's ``(batches, rows, device seconds)``, over all workers."""
    return self.client.counters() if self.client is not None else (0, 0, 0.0)

  async def close(self) -> None:
    self._closed = True
    if self._connecting is not None:
      self._connecting.cancel()
      await asyncio.gather(self._connecting, return_exceptions=True)
    if self.client is not None:
      self.client.close()
