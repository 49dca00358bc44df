"""Micro-batching across every HTTP worker, in the device process.

Every row of every worker's requests goes into one queue, first in first out; whatever
is queued when the device is free (up to ``max_batch`` rows) is the next batch, so
batches grow with the load and a lone request waits for nobody. A request with more rows
than a batch holds is split, and answered when its last row is done.

:func:`serve` is the device process's loop: it accepts the workers' connections
(:class:`serving.shm.WorkerChannel`), reads their request records, runs the batches
(``run``: :func:`serving.predictor.run_rows`, which groups a batch's rows by length
bucket) and writes the answers into the workers' arenas.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import selectors
import socket
import time
from typing import Any, Callable, Sequence

import numpy as np

from serving import shm

log = logging.getLogger("recml.serve")


@dataclasses.dataclass(eq=False)
class Request:
  """One worker request in the device process: its rows (views of the worker's arena)
  and where their answers go."""

  channel: Any                  # a serving.shm.WorkerChannel
  id: int
  rows: list
  answers: tuple                # where the rows' answers go (views of the arena)
  done: int = 0
  failed: bool = False


class Batcher:
  """The queue of rows and the batches made of it.

  ``run(rows)``: every row's ``(scores, ids)``, in order (the device call); ``schema``:
  :func:`serving.shm.schema`, which writes the answers.
  """

  def __init__(self, run: Callable[[Sequence[Any]], list[tuple[np.ndarray, np.ndarray]]],
               schema, max_batch: int):
    self.run_rows, self.schema, self.max_batch = run, schema, max_batch
    self.queue: collections.deque[tuple[Request, int]] = collections.deque()
    self.batches = 0
    self.rows = 0
    self.device_seconds = 0.0

  def add(self, request: Request) -> None:
    self.queue.extend((request, j) for j in range(len(request.rows)))

  def next_batch(self) -> list[tuple[Request, int]]:
    """The oldest queued rows, at most ``max_batch`` (rows of failed requests and of
    workers that went away are dropped)."""
    batch = []
    while self.queue and len(batch) < self.max_batch:
      request, j = self.queue.popleft()
      if not (request.failed or request.channel.closed):
        batch.append((request, j))
    return batch

  def run(self, batch: list[tuple[Request, int]]) -> None:
    """Runs a batch; answers every request whose last row it holds (an error: every
    request in it, at once)."""
    started = time.perf_counter()
    try:
      results = self.run_rows([request.rows[j] for request, j in batch])
    except Exception as e:  # pylint: disable=broad-except
      message = f"{type(e).__name__}: {e}"
      log.error("batch of %d rows failed: %s", len(batch), message)
      for request, _ in batch:
        if not request.failed:
          request.failed = True
          request.channel.reply(request.id, message)
      return
    self.device_seconds += time.perf_counter() - started
    self.batches += 1
    self.rows += len(batch)
    for (request, j), (scores, ids) in zip(batch, results):
      self.schema.answer(request.answers, j, request.rows[j], scores, ids)
      request.done += 1
      if request.done == len(request.rows):
        request.channel.reply(request.id)


def serve(listener: socket.socket, control, batcher: Batcher) -> None:
  """Answers the workers that connect to ``listener`` until ``control`` (the
  supervisor's end of the pipe) closes."""
  sel = selectors.DefaultSelector()
  sel.register(listener, selectors.EVENT_READ)
  sel.register(control, selectors.EVENT_READ)
  channels: set[shm.WorkerChannel] = set()

  def drop(channel: shm.WorkerChannel) -> None:
    sel.unregister(channel)
    channels.discard(channel)
    channel.close()

  while True:
    for key, _ in sel.select(0 if batcher.queue else None):
      source = key.fileobj
      if source is listener:
        sock, _ = listener.accept()
        try:
          channel = shm.WorkerChannel(sock)
        except (OSError, ValueError) as e:
          log.error("refused a worker connection: %s", e)
          sock.close()
          continue
        channels.add(channel)
        sel.register(channel, selectors.EVENT_READ)
      elif source is control:
        try:
          control.recv()  # nothing is sent after start-up: this is the end of file
        except (EOFError, OSError):
          return
      else:
        records = source.read()
        if records is None:  # the worker went away: its queued rows are dropped
          drop(source)
          continue
        for rid, offset, counts in records:
          try:
            rows, answers = batcher.schema.read(source.arena.map, offset, counts)
          except ValueError as e:
            source.reply(rid, f"ValueError: bad request record: {e}")
            continue
          batcher.add(Request(source, rid, rows, answers))
    if batcher.queue:
      batch = batcher.next_batch()
      if batch:
        batcher.run(batch)
      counters = (batcher.batches, batcher.rows, batcher.device_seconds)
      for channel in list(channels):
        channel.arena.counters[:] = counters
        if not channel.flush():
          drop(channel)
    else:
      for channel in list(channels):  # record errors answered without a batch
        if not channel.flush():
          drop(channel)
