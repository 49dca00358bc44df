"""Micro-batching: rows of concurrent requests share device calls.

Every instance goes into one queue; whatever is queued when the device is free (up to
``max_batch`` rows) is the next batch, so batches grow with the load and a lone request
waits for nobody.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import numpy as np

from serving.protocol import Row

log = logging.getLogger("recml.serve")


class Batcher:
  """Queues rows from concurrent requests; the device process runs them in batches.

  ``device``: anything with ``async run(rows, k) -> (scores [n, k], ids [n, k], seconds)``
  (a :class:`serving.device.Supervisor`).
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
