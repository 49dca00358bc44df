"""Zero-copy hand-off of encoded rows between the HTTP workers and the device process.

A worker connects to the device process over a Unix socket and lends it an
:class:`Arena`: shared memory (an anonymous ``memfd``) that both map (the descriptor
travels over the socket once, ``SCM_RIGHTS``). A request's rows are written into a
block of the arena (:class:`Ring`) as flat arrays (:func:`schema`: item ids, times,
lengths...; ranking: the model's inputs); the device process reads them in place and
writes the request's top K back into the same block. The socket carries only
fixed-size records: ``REQUEST`` (which block, how many rows) from the worker, ``REPLY``
(done, or an error message) from the device, many per write.

Worker side: :class:`DeviceClient` (asyncio). Device side: :class:`WorkerChannel`
(one per connected worker, read by :mod:`serving.batcher`'s loop).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import mmap
import os
import socket
import struct
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from serving.protocol import RankingRow, Row

HELLO = struct.Struct("<4sQ")      # magic, arena bytes (with the arena's descriptor)
MAGIC = b"RCML"
REQUEST = struct.Struct("<IQIII")  # request id, block offset, rows, total, k
REPLY = struct.Struct("<II")       # request id, error bytes that follow (0: done)
HEADER = 64                        # arena bytes before the ring: the device's counters
ALIGN = 64                         # blocks start on cache lines
SEND_TIMEOUT_S = 10.0              # a worker that reads nothing for this long is dropped


class DeviceUnavailable(RuntimeError):
  """The device process is down or restarting (answered with 503 and Retry-After)."""


def _align(n: int, to: int) -> int:
  return -(-n // to) * to


def _check(mm, offset: int, nbytes: int, counts) -> None:
  if counts[0] < 1:
    raise ValueError(f"a request without rows (counts {counts})")
  if offset < HEADER or offset + nbytes > len(mm):
    raise ValueError(f"a block of {nbytes} bytes at {offset} (counts {counts}) is outside "
                     f"the arena ({len(mm)} bytes)")


class RetrievalSchema:
  """Where a retrieval request's arrays lie in its block, from ``(rows, total, k)``.

  ``total`` history items over ``rows`` instances, answered with their top ``k``: the
  rows' timestamps, then query timestamps (int64 ``[total]`` each), item ids (int32
  ``[total]``), each row's ``(length, k, exclude history)`` (int32 ``[rows, 3]``), then
  the answer: ``scores`` (float32 ``[rows, k]``) and ``ids`` (int32 ``[rows, k]``).
  """

  def __init__(self, meta: dict[str, Any]):
    self.max_k = int(meta["max_k"])

  @staticmethod
  def _layout(rows: int, total: int, k: int) -> tuple[int, int, int, int, int]:
    items = 16 * total
    per_row = items + 4 * total
    scores = per_row + 12 * rows
    ids = scores + 4 * rows * k
    return items, per_row, scores, ids, ids + 4 * rows * k

  def counts(self, rows: Sequence[Row]) -> tuple[int, int, int]:
    return len(rows), sum(len(r.items) for r in rows), max(r.k for r in rows)

  def nbytes(self, counts: tuple[int, int, int]) -> int:
    return self._layout(*counts)[-1]

  def max_request_bytes(self, limits, max_len: int) -> int:
    """The largest block a request within ``limits`` needs."""
    return self.nbytes((limits.max_instances, limits.max_instances * max_len, self.max_k))

  def write(self, mm, offset: int, counts: tuple[int, int, int], rows: Sequence[Row]) -> None:
    """Worker side: the rows into their block."""
    n_rows, total, _ = counts
    items, per_row, _, _, _ = self._layout(*counts)
    at = offset
    for row in rows:
      n = len(row.items)
      mm[at:at + 8 * n] = row.timestamps
      mm[at + 8 * total:at + 8 * (total + n)] = row.query_timestamps
      at += 8 * n
    at = offset + items
    for row in rows:
      mm[at:at + 4 * len(row.items)] = row.items
      at += 4 * len(row.items)
    struct.pack_into(f"<{3 * n_rows}i", mm, offset + per_row,
                     *[v for r in rows for v in (len(r.items), r.k, r.exclude_history)])

  def read(self, mm, offset: int, counts: tuple[int, int, int]
           ) -> tuple[list[Row], tuple[np.ndarray, np.ndarray]]:
    """Device side: the block's rows (views of the arena) and its answer arrays."""
    n_rows, total, k = counts
    items, per_row, scores, ids, end = self._layout(*counts)
    _check(mm, offset, end, counts)
    times = np.frombuffer(mm, np.int64, 2 * total, offset)
    item_ids = np.frombuffer(mm, np.int32, total, offset + items)
    spec = struct.unpack_from(f"<{3 * n_rows}i", mm, offset + per_row)
    rows, at = [], 0
    for j in range(0, 3 * n_rows, 3):
      n = spec[j]
      if not 0 < n <= total - at or not 0 < spec[j + 1] <= k:
        raise ValueError(f"row {j // 3}: length {n}, k {spec[j + 1]} do not fit the "
                         f"counts {counts}")
      rows.append(Row(items=item_ids[at:at + n], timestamps=times[at:at + n],
                      query_timestamps=times[total + at:total + at + n],
                      exclude_history=bool(spec[j + 2]), k=spec[j + 1]))
      at += n
    if at != total:
      raise ValueError(f"row lengths add up to {at}, not {total}")
    answers = (np.frombuffer(mm, np.float32, n_rows * k, offset + scores).reshape(n_rows, k),
               np.frombuffer(mm, np.int32, n_rows * k, offset + ids).reshape(n_rows, k))
    return rows, answers

  @staticmethod
  def answer(answers, j: int, row: Row, scores: np.ndarray, ids: np.ndarray) -> None:
    """Device side: row ``j``'s top K into the block."""
    del row
    k = answers[0].shape[1]
    answers[0][j] = scores[:k]
    answers[1][j] = ids[:k]

  def results(self, mm, offset: int, counts: tuple[int, int, int]
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Worker side: every row's ``(scores, ids)``, copied out of the block."""
    n_rows, _, k = counts
    _, _, scores, ids, end = self._layout(*counts)
    s = np.frombuffer(mm[offset + scores:offset + ids], np.float32).reshape(n_rows, k)
    i = np.frombuffer(mm[offset + ids:offset + end], np.int32).reshape(n_rows, k)
    return list(zip(s, i))


class RankingSchema:
  """Where a ranking request's arrays lie in its block, from ``(rows, total, 0)``.

  ``rows`` instances of ``total`` model rows: the signature's inputs ``[total, ...]``
  (its order and dtypes), each instance's ``(model rows, candidate list)`` (int32
  ``[rows, 2]``), then the answer: a score (float32) and a candidate index (int32) per
  model row, each instance's sorted in its own span.
  """

  def __init__(self, meta: dict[str, Any]):
    self.inputs = [(s["name"], np.dtype(s["dtype"]), tuple(s["shape"][1:]))
                   for s in meta["signature"]["inputs"]]

  def _layout(self, rows: int, total: int) -> tuple[list[int], int, int, int, int]:
    at, starts = 0, []
    for _, dtype, shape in self.inputs:
      starts.append(at)
      at += -(-dtype.itemsize * total * math.prod(shape) // 8) * 8
    scores = at + 8 * rows
    return starts, at, scores, scores + 4 * total, scores + 8 * total

  def counts(self, rows: Sequence[RankingRow]) -> tuple[int, int, int]:
    return len(rows), sum(r.n for r in rows), 0

  def nbytes(self, counts: tuple[int, int, int]) -> int:
    return self._layout(counts[0], counts[1])[-1]

  def max_request_bytes(self, limits, max_len: int) -> int:
    del max_len
    return self.nbytes((limits.max_instances, limits.max_instances * limits.max_candidates,
                        0))

  def write(self, mm, offset: int, counts: tuple[int, int, int],
            rows: Sequence[RankingRow]) -> None:
    starts, per_row, _, _, _ = self._layout(counts[0], counts[1])
    for (name, dtype, _), start in zip(self.inputs, starts):
      values = np.concatenate([r.inputs[name] for r in rows])
      mm[offset + start:offset + start + values.size * dtype.itemsize] = (
          np.ascontiguousarray(values, dtype))
    struct.pack_into(f"<{2 * len(rows)}i", mm, offset + per_row,
                     *[v for r in rows for v in (r.n, r.candidates)])

  def read(self, mm, offset: int, counts: tuple[int, int, int]
           ) -> tuple[list[RankingRow], tuple[np.ndarray, np.ndarray, list[int]]]:
    n_rows, total, _ = counts
    starts, per_row, scores, ids, end = self._layout(n_rows, total)
    _check(mm, offset, end, counts)
    inputs = {name: np.frombuffer(mm, dtype, total * math.prod(shape),
                                  offset + start).reshape(total, *shape)
              for (name, dtype, shape), start in zip(self.inputs, starts)}
    spec = struct.unpack_from(f"<{2 * n_rows}i", mm, offset + per_row)
    rows, firsts, at = [], [], 0
    for j in range(0, 2 * n_rows, 2):
      n = spec[j]
      if not 0 < n <= total - at:
        raise ValueError(f"instance {j // 2}: {n} rows do not fit the counts {counts}")
      rows.append(RankingRow(inputs={k: v[at:at + n] for k, v in inputs.items()}, n=n,
                             candidates=bool(spec[j + 1])))
      firsts.append(at)
      at += n
    if at != total:
      raise ValueError(f"instances hold {at} rows, not {total}")
    return rows, (np.frombuffer(mm, np.float32, total, offset + scores),
                  np.frombuffer(mm, np.int32, total, offset + ids), firsts)

  @staticmethod
  def answer(answers, j: int, row: RankingRow, scores: np.ndarray, ids: np.ndarray) -> None:
    start = answers[2][j]
    answers[0][start:start + row.n] = scores[:row.n]
    answers[1][start:start + row.n] = ids[:row.n]

  def results(self, mm, offset: int, counts: tuple[int, int, int]
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    n_rows, total, _ = counts
    _, per_row, scores, ids, end = self._layout(n_rows, total)
    s = np.frombuffer(mm[offset + scores:offset + ids], np.float32)
    i = np.frombuffer(mm[offset + ids:offset + end], np.int32)
    out, at = [], 0
    for n in struct.unpack_from(f"<{2 * n_rows}i", mm, offset + per_row)[::2]:
      out.append((s[at:at + n], i[at:at + n]))
      at += n
    return out


def schema(meta: dict[str, Any]) -> RetrievalSchema | RankingSchema:
  """The block layout of a bundle's requests (``bundle.json``'s metadata)."""
  return RankingSchema(meta) if meta.get("task") == "ranking" else RetrievalSchema(meta)


class Arena:
  """Shared memory: an anonymous file (``memfd``; elsewhere an unlinked temporary file)
  mapped by a worker and lent to the device process by its descriptor.

  The first :data:`HEADER` bytes hold the device process's counters (``batches``,
  ``rows``, ``device seconds``, as float64), written after every batch.
  """

  def __init__(self, size: int, fd: int | None = None):
    self.size = size
    if fd is None:
      if hasattr(os, "memfd_create"):
        fd = os.memfd_create("recml-arena", os.MFD_CLOEXEC)
      else:  # pragma: no cover (not Linux)
        fd, path = tempfile.mkstemp(prefix="recml-arena-")
        os.unlink(path)
      os.ftruncate(fd, size)
    elif os.fstat(fd).st_size < size:
      os.close(fd)
      raise ValueError(f"the arena is smaller than {size} bytes")
    self.fd = fd
    self.map = mmap.mmap(fd, size)
    self.counters = np.frombuffer(self.map, np.float64, 3)

  def close(self) -> None:
    if self.fd >= 0:
      os.close(self.fd)
      self.fd = -1


class Ring:
  """First-in first-out allocation of blocks in ``[start, size)``; blocks may be freed
  in any order (space comes back as the oldest ones are freed)."""

  def __init__(self, start: int, size: int):
    self.start, self.size = start, size
    self.blocks: collections.deque[list] = collections.deque()  # [start, end, freed]
    self.by_start: dict[int, list] = {}
    self.head = self.start

  def alloc(self, n: int) -> int | None:
    """The offset of ``n`` free bytes, or None (full for now)."""
    n = _align(max(n, 1), ALIGN)
    if not self.blocks:
      at = self.start if self.start + n <= self.size else None
    else:
      tail = self.blocks[0][0]
      if self.blocks[-1][0] >= tail:  # used: [tail, head); free: [head, size), [start, tail)
        at = (self.head if self.head + n <= self.size else
              self.start if self.start + n <= tail else None)
      else:                           # wrapped; free: [head, tail)
        at = self.head if self.head + n <= tail else None
    if at is not None:
      block = [at, at + n, False]
      self.blocks.append(block)
      self.by_start[at] = block
      self.head = at + n
    return at

  def free(self, at: int) -> None:
    self.by_start.pop(at)[2] = True
    while self.blocks and self.blocks[0][2]:
      self.blocks.popleft()
    if not self.blocks:
      self.head = self.start


class DeviceClient(asyncio.Protocol):
  """One connection of a worker to the device process (:meth:`connect`), with its own
  arena: rows into the arena, a record on the socket, the answer back from the arena.

  ``describe()`` says why the device went away (for :class:`DeviceUnavailable`);
  ``on_lost(self)`` is called when the connection ends (the client is then spent).
  """

  def __init__(self, address: str, schema, arena_bytes: int,
               describe: Callable[[], str] = lambda: "the device process went away",
               on_lost: Callable[[DeviceClient], None] | None = None):
    self.address, self.schema = address, schema
    self.arena = Arena(_align(arena_bytes, mmap.PAGESIZE))
    self.ring = Ring(HEADER, self.arena.size)
    self.describe, self.on_lost = describe, on_lost
    self.transport: asyncio.Transport | None = None
    self._pending: dict[int, tuple[asyncio.Future, int, tuple[int, int, int]]] = {}
    self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
    self._ids = itertools.count()
    self._buffer = b""
    self._records = bytearray()  # request records not yet written (one write per loop turn)

  @classmethod
  async def connect(cls, address: str, schema, arena_bytes: int,
                    **kwargs) -> DeviceClient:
    """Connects to the device process listening at ``address`` and lends it a new arena."""
    loop = asyncio.get_running_loop()
    client = cls(address, schema, arena_bytes, **kwargs)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
      sock.setblocking(False)
      await loop.sock_connect(sock, address)
      socket.send_fds(sock, [HELLO.pack(MAGIC, client.arena.size)], [client.arena.fd])
      await loop.create_unix_connection(lambda: client, sock=sock)
    except BaseException:
      sock.close()
      raise
    finally:
      client.arena.close()  # the device process has its own descriptor; the mapping stays
    return client

  @property
  def connected(self) -> bool:
    return self.transport is not None

  def counters(self) -> tuple[int, int, float]:
    """The device process's ``(batches, rows, device seconds)`` (over all workers)."""
    batches, rows, seconds = self.arena.counters.tolist()
    return int(batches), int(rows), seconds

  def close(self) -> None:
    if self.transport is not None:
      self.transport.close()

  def connection_made(self, transport) -> None:
    self.transport = transport

  def connection_lost(self, exc) -> None:
    del exc
    self.transport = None
    pending, self._pending = self._pending, {}
    waiting, self._waiting = self._waiting, collections.deque()
    if pending or waiting:
      reason = self.describe()
      for fut in itertools.chain((p[0] for p in pending.values()), (w[1] for w in waiting)):
        if not fut.done():
          fut.set_exception(DeviceUnavailable(reason))
    if self.on_lost is not None:
      self.on_lost(self)

  def data_received(self, data: bytes) -> None:
    buf = self._buffer + data if self._buffer else data
    at, end = 0, len(buf)
    while end - at >= REPLY.size:
      rid, length = REPLY.unpack_from(buf, at)
      if end - at - REPLY.size < length:
        break
      error = buf[at + REPLY.size:at + REPLY.size + length].decode(errors="replace")
      at += REPLY.size + length
      fut, offset, counts = self._pending.pop(rid)
      if not fut.done():  # else cancelled: the client went away
        if error:
          fut.set_exception(RuntimeError(error))
        else:
          fut.set_result(self.schema.results(self.arena.map, offset, counts))
      self.ring.free(offset)
    self._buffer = buf[at:]
    while self._waiting:
      n, fut = self._waiting[0]
      if fut.done():
        self._waiting.popleft()
        continue
      offset = self.ring.alloc(n)
      if offset is None:
        break
      self._waiting.popleft()
      fut.set_result(offset)

  async def _space(self, n: int) -> int:
    if _align(n, ALIGN) > self.ring.size - self.ring.start:
      raise RuntimeError(f"a request of {n} bytes does not fit the shared memory arena "
                         f"({self.ring.size} bytes)")
    fut = asyncio.get_running_loop().create_future()
    self._waiting.append((n, fut))
    try:
      offset = await fut
    except asyncio.CancelledError:  # the client went away: give back a block it was given
      if fut.done() and not fut.cancelled():
        self.ring.free(fut.result())
      raise
    if self.transport is None:  # lost while waiting (the block is gone with the ring)
      raise DeviceUnavailable(self.describe())
    return offset

  async def run(self, rows: Sequence[Row | RankingRow]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every row's ``(scores, ids)``: its top K by descending score (ranking: its
    candidates' probabilities, sorted, and their indices).

    Raises:
      DeviceUnavailable: not connected, or the device process went away meanwhile.
      RuntimeError: the model failed on the batch (the device process's message).
    """
    if self.transport is None:
      raise DeviceUnavailable(self.describe())
    counts = self.schema.counts(rows)
    n = self.schema.nbytes(counts)
    offset = None if self._waiting else self.ring.alloc(n)
    if offset is None:
      offset = await self._space(n)
    try:
      self.schema.write(self.arena.map, offset, counts, rows)
    except BaseException:
      self.ring.free(offset)
      raise
    rid = next(self._ids) & 0xFFFFFFFF
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    self._pending[rid] = (fut, offset, counts)
    if not self._records:  # the requests parsed in this turn of the loop go in one write
      loop.call_soon(self._send)
    self._records += REQUEST.pack(rid, offset, *counts)
    return await fut

  def _send(self) -> None:
    if self.transport is not None:
      self.transport.write(bytes(self._records))
    self._records.clear()


class WorkerChannel:
  """The device process's end of one worker's connection: the worker's arena, its
  request records in, reply records out (sent by :meth:`flush`, once per batch)."""

  def __init__(self, sock: socket.socket):
    sock.settimeout(SEND_TIMEOUT_S)  # the hello is sent right after connecting
    message, fds, _, _ = socket.recv_fds(sock, HELLO.size, 1)
    if len(message) != HELLO.size or len(fds) != 1:
      for fd in fds:
        os.close(fd)
      raise ValueError("a worker connected without lending its arena")
    magic, size = HELLO.unpack(message)
    if magic != MAGIC:
      os.close(fds[0])
      raise ValueError(f"a worker sent {magic!r}, not {MAGIC!r}")
    self.sock = sock
    self.arena = Arena(size, fds[0])
    self.arena.close()  # the mapping stays
    self.closed = False
    self._buffer = b""
    self._out = bytearray()

  def fileno(self) -> int:
    return self.sock.fileno()

  def read(self) -> list[tuple[int, int, tuple[int, int, int]]] | None:
    """The complete request records received (``(id, offset, counts)``); None at end
    of file (the worker went away)."""
    try:
      data = self.sock.recv(1 << 16)
    except (ConnectionError, OSError):
      data = b""
    if not data:
      return None
    buf = self._buffer + data if self._buffer else data
    whole = len(buf) - len(buf) % REQUEST.size
    self._buffer = buf[whole:]
    return [(rid, offset, (rows, total, k))
            for rid, offset, rows, total, k in REQUEST.iter_unpack(buf[:whole])]

  def reply(self, rid: int, error: str = "") -> None:
    data = error.encode()[:4000]
    self._out += REPLY.pack(rid, len(data)) + data

  def flush(self) -> bool:
    """Sends the queued replies; False when the worker is gone (or reads nothing)."""
    if self._out and not self.closed:
      try:
        self.sock.sendall(self._out)
      except OSError:
        self.closed = True
      self._out.clear()
    return not self.closed

  def close(self) -> None:
    self.closed = True
    self.sock.close()
