"""A loaded bundle on the default device: calls padded to compiled (batch, length) buckets.

:class:`Predictor` compiles the bundle's exported function once per (batch bucket, length
bucket) pair and measures each call's cost at warm-up; :func:`run_rows` runs parsed
requests (:class:`serving.protocol.Row`) with one call per group of similar history
lengths, merged when the measured costs say one bigger call is cheaper.

A ranking bundle gets a :class:`RankingPredictor` (:func:`make_predictor`): batch
buckets only; the rows of every instance of a batch (one per candidate) run together,
in calls of at most the largest bucket, and each instance's scores come back sorted,
best first, with the candidates' indices, as a retrieval row's top K comes back with
its item ids (so the batcher and the device process handle both alike).

Start-up: ``warmup(progress=print)`` reports a line per shape as it compiles and a
final one with the shapes read from JAX's persistent compilation cache;
:func:`trainers.compile_cache.use` turns that cache on in :func:`compile_cache_dir`, a
folder of the bundle's own (keyed by :func:`bundle_digest`), so a restart of the same bundle reads
its executables instead of compiling them (SASRec on ml-1m-partial, 28 shapes on this
machine's busy 2 cores: 72 s to compile and warm up, 3 to 5 s from the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from serving.protocol import RankingRow, Row
from trainers import compile_cache, export, features


def time_inputs(timestamps: np.ndarray, query_timestamps: np.ndarray, words: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
  """int64 ``[n, L]`` unix seconds (0 at padding) -> the exported function's two time
  inputs: the trainer's int32 words ``[n, L, 2]`` (:func:`trainers.input_pipeline.model_batch`),
  or for format 1 and 2 bundles (``words=False``) int32 offsets ``[n, L]`` from the same
  reference, saturated at the int32 range (exact for gaps under 2**31 s)."""
  timestamps = np.asarray(timestamps, np.int64)
  query_timestamps = np.asarray(query_timestamps, np.int64)
  reference = query_timestamps.max(axis=-1)  # as trainers.input_pipeline.model_batch
  if words:
    return (features.time_words(timestamps, reference),
            features.time_words(query_timestamps, reference))
  info = np.iinfo(np.int32)
  return tuple(np.clip(t - reference[:, None], info.min, info.max).astype(np.int32)
               for t in (timestamps, query_timestamps))


def right_align(rows: Sequence[Sequence[int]], length: int, out: np.ndarray | None = None):
  """Sequences (lists or arrays, oldest first) -> ``[len(rows), length]`` int32, left-padded
  with 0; longer ones keep their end. ``out`` (zeros, at least ``len(rows)`` rows) is
  filled instead of a new array."""
  arr = np.zeros((len(rows), length), np.int32) if out is None else out
  for r, row in enumerate(rows):
    row = row[-length:]
    if len(row):
      arr[r, length - len(row):] = row
  return arr


def doubling_buckets(first: int, last: int) -> tuple[int, ...]:
  """``first``, doubled while below ``last``, then ``last``: (1, 32) -> 1, 2, 4, ..., 32."""
  out, size = [], first
  while size < last:
    out.append(size)
    size *= 2
  return tuple(out + [last])


def default_length_buckets(max_len: int) -> tuple[int, ...]:
  """32, 64, ... below ``max_len``, then ``max_len``: 32, 64, 128, 200."""
  return doubling_buckets(32, max_len)


def bundle_digest(meta: dict[str, Any]) -> str:
  """16 hex digits of the sha256 of a bundle's file digests (``bundle.json``'s
  ``sha256``): the same files give the same digest, any other file another."""
  files = meta.get("sha256")
  if not files:
    raise ValueError("bundle.json lists no sha256 of its files: cannot key its compile cache")
  text = json.dumps(files, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def compile_cache_dir(meta: dict[str, Any], root: str | None = None) -> str:
  """The bundle's compile cache folder: ``<root>/<bundle digest>`` (a bundle never reads
  another's executables; root: :func:`trainers.compile_cache.default_root`)."""
  return os.path.join(root or compile_cache.default_root(), bundle_digest(meta))


def warm_shapes(shapes: Sequence[tuple[Any, str, Callable[[], Any]]], repeats: int,
                progress: Callable[[str], None] | None = None
                ) -> tuple[dict[Any, float], dict[str, Any]]:
  """Compiles and times each ``(key, label, call)``: its first call compiles it (or reads
  it from JAX's persistent cache), the fastest of ``repeats`` more is its cost.

  ``progress`` gets a line per shape (``compiling 3/28: batch 4 x length 32 ... 1.2 s``,
  `` (from cache)`` when read from the cache) and a final one. Returns ``({key: seconds
  per call}, {"shapes", "from_cache", "seconds"})``; ``from_cache`` counts JAX's
  cache-hit events (:data:`trainers.compile_cache.HIT_EVENT`), one per executable read.
  """
  import jax  # pylint: disable=g-import-not-at-top
  hits = []

  def listen(event: str, **kwargs) -> None:
    del kwargs
    if event == compile_cache.HIT_EVENT:
      hits.append(event)
  cost, started = {}, time.perf_counter()
  jax.monitoring.register_event_listener(listen)
  try:
    for n, (key, label, call) in enumerate(shapes, 1):
      before, first = len(hits), time.perf_counter()
      call()
      if progress is not None:
        cached = " (from cache)" if len(hits) > before else ""
        progress(f"compiling {n}/{len(shapes)}: {label} ... "
                 f"{time.perf_counter() - first:.1f} s{cached}")
      times = []
      for _ in range(repeats):
        at = time.perf_counter()
        call()
        times.append(time.perf_counter() - at)
      cost[key] = min(times)
  finally:
    jax.monitoring.unregister_event_listener(listen)
  stats = {"shapes": len(shapes), "from_cache": len(hits),
           "seconds": round(time.perf_counter() - started, 3)}
  if progress is not None:
    progress(f"compiled and warmed up in {stats['seconds']:.1f} s ({stats['shapes']} shapes, "
             f"from cache: {stats['from_cache']})")
  return cost, stats


def _smallest_at_least(buckets: Sequence[int], n: int, what: str) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


class Predictor:
  """Runs a bundle on the default device, calls padded to fixed (batch, length) buckets.

  ``jax.jit(exported.call)`` compiles once per (batch bucket, length bucket) pair
  (``warmup`` does all of them), so serving never recompiles: n rows whose longest history
  has m items run as ``[smallest batch bucket >= n, smallest length bucket >= m]``.
  A version-1 bundle (fixed length) has the single length bucket ``max_len``.
  """

  def __init__(self, bundle: export.Bundle, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
               length_buckets: Sequence[int] | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    self.bundle = bundle
    self.buckets = tuple(sorted(set(int(b) for b in buckets)))
    if not self.buckets or self.buckets[0] < 1:
      raise ValueError(f"bad buckets {buckets}")
    self.max_batch = self.buckets[-1]
    fixed = bundle.exported.in_avals[-1].shape[-1]
    if isinstance(fixed, int):  # a version-1 bundle
      self.length_buckets = (fixed,)
    else:
      lengths = length_buckets or default_length_buckets(bundle.max_len)
      self.length_buckets = tuple(sorted({min(int(n), bundle.max_len) for n in lengths}
                                         | {bundle.max_len}))
      if self.length_buckets[0] < 1:
        raise ValueError(f"bad length buckets {length_buckets}")
    # format 3 takes times as int32 words [b, l, 2]; 1 and 2 as int32 offsets [b, l]
    self.time_words = len(bundle.exported.in_avals[len(bundle.weights) + 1].shape) == 3
    self._weights = tuple(jax.device_put(w) for w in bundle.weights)
    self._call = jax.jit(bundle.exported.call)
    self._mask_slot = int(getattr(bundle, "mask_slot", False))
    # seconds per call of each (batch bucket, length bucket), measured by warmup()
    self.cost: dict[tuple[int, int], float] = {}
    self.startup: dict[str, Any] = {}  # warmup()'s shapes, from_cache and seconds

  def bucket(self, n: int) -> int:
    return _smallest_at_least(self.buckets, n, "batch of")

  def length(self, n_items: int) -> int:
    """The padded length for a history of ``n_items`` (at most ``max_len``), one column
    more for a model that appends ``[MASK]`` (so that the oldest item is not dropped
    below ``max_len``)."""
    n = max(1, n_items)
    if n < self.length_buckets[-1]:
      n += self._mask_slot
    return _smallest_at_least(self.length_buckets, n, "history of")

  def run(self, item_ids: np.ndarray, timestamps: np.ndarray, query_timestamps: np.ndarray,
          exclude_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[n, L]`` inputs (n <= max_batch, L a length bucket; ids int32, times int64 unix
    seconds, 0 at padding) -> ``(scores [n, K], ids [n, K])``."""
    n, length = item_ids.shape
    if length not in self.length_buckets:
      raise ValueError(f"length {length} is not one of the length buckets "
                       f"{self.length_buckets}")
    size = self.bucket(n)
    args = [item_ids, timestamps, query_timestamps, exclude_ids]
    if size != n:
      args = [np.pad(a, ((0, size - n), (0, 0))) for a in args]
    args[1:3] = time_inputs(args[1], args[2], self.time_words)
    scores, ids = self._call(self._weights, *args)
    return np.asarray(scores)[:n], np.asarray(ids)[:n]

  def plan(self, groups: dict[int, list[Any]]) -> list[tuple[int, list[Any]]]:
    """Which calls to make for rows grouped by length bucket: ``[(length, rows), ...]``.

    Adjacent groups (by length) merge into one call at the longer length when the
    measured cost says one bigger call is cheaper than two small ones (the fixed cost of
    a call against the extra padding). Without measurements every group is its own call.
    """
    lengths = sorted(groups)
    if len(lengths) < 2 or not self.cost:
      return [(n, groups[n]) for n in lengths]
    def cost(i: int, j: int) -> float:  # one call for groups i..j-1
      rows = sum(len(groups[n]) for n in lengths[i:j])
      if rows > self.max_batch:
        return float("inf")
      return self.cost.get((self.bucket(rows), lengths[j - 1]), float("inf"))
    best = [0.0] + [float("inf")] * len(lengths)
    cut = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
      for i in range(j):
        c = best[i] + cost(i, j)
        if c < best[j]:
          best[j], cut[j] = c, i
    calls, j = [], len(lengths)
    while j > 0:
      i = cut[j]
      calls.append((lengths[j - 1], [r for n in lengths[i:j] for r in groups[n]]))
      j = i
    return calls[::-1]

  def warmup(self, repeats: int = 3, progress: Callable[[str], None] | None = None) -> None:
    """Compiles every (batch, length) bucket and measures its cost (fastest of
    ``repeats`` calls), which :meth:`plan` uses; ``progress``: :func:`warm_shapes`."""
    shapes = []
    for length in self.length_buckets:
      for size in self.buckets:
        z = np.zeros((size, length), np.int32)
        z[:, -1] = features.OOV_ID
        shapes.append(((size, length), f"batch {size} x length {length}",
                       lambda z=z: self.run(z, z, z, z)))
    self.cost, self.startup = warm_shapes(shapes, repeats, progress)


class RankingPredictor:
  """Runs a ranking bundle on the default device, calls padded to fixed batch buckets.

  ``jax.jit(exported.call)`` compiles once per batch bucket (``warmup`` does all of
  them): n rows run as ``[smallest bucket >= n]`` (padding rows: zeros, the PAD id),
  more than the largest bucket as several calls. Rows are independent (batch norm runs
  on its running averages), so padding and grouping leave the scores unchanged.
  """

  length_buckets: tuple[int, ...] = ()  # no history lengths (the server reports them)

  def __init__(self, bundle: export.Bundle, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)):
    import jax  # pylint: disable=g-import-not-at-top
    self.bundle = bundle
    self.buckets = tuple(sorted(set(int(b) for b in buckets)))
    if not self.buckets or self.buckets[0] < 1:
      raise ValueError(f"bad buckets {buckets}")
    self.max_batch = self.buckets[-1]
    self.inputs = bundle.meta["signature"]["inputs"]
    self._weights = tuple(jax.device_put(w) for w in bundle.weights)
    self._call = jax.jit(bundle.exported.call)
    self.cost: dict[int, float] = {}  # seconds per call of each batch bucket (warmup)
    self.startup: dict[str, Any] = {}  # warmup()'s shapes, from_cache and seconds

  def bucket(self, n: int) -> int:
    return _smallest_at_least(self.buckets, n, "batch of")

  def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """``{input name: [n, ...]}`` (the signature's inputs) -> probabilities ``[n]``."""
    n = len(inputs[self.inputs[0]["name"]])
    out = np.empty(n, np.float32)
    for start in range(0, n, self.max_batch):
      stop = min(n, start + self.max_batch)
      size = self.bucket(stop - start)
      args = []
      for spec in self.inputs:
        x = np.asarray(inputs[spec["name"]][start:stop], spec["dtype"])
        args.append(np.pad(x, ((0, size - (stop - start)), (0, 0))) if size > stop - start
                    else x)
      out[start:stop] = np.asarray(self._call(self._weights, *args))[:stop - start]
    return out

  def warmup(self, repeats: int = 3, progress: Callable[[str], None] | None = None) -> None:
    """Compiles every batch bucket and measures its cost (fastest of ``repeats``);
    ``progress``: :func:`warm_shapes`."""
    shapes = []
    for size in self.buckets:
      zeros = {s["name"]: np.zeros((size, s["shape"][1]), s["dtype"]) for s in self.inputs}
      shapes.append((size, f"batch {size}", lambda zeros=zeros: self.run(zeros)))
    self.cost, self.startup = warm_shapes(shapes, repeats, progress)


def make_predictor(bundle: export.Bundle, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                   length_buckets: Sequence[int] | None = None):
  """The bundle's predictor: :class:`Predictor` (retrieval) or :class:`RankingPredictor`."""
  if bundle.task == export.RANKING:
    return RankingPredictor(bundle, buckets)
  return Predictor(bundle, buckets, length_buckets)


def run_ranking_rows(predictor: RankingPredictor, rows: Sequence[RankingRow]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Scores ranking rows in one run; per row ``(scores, candidate indices)`` by
  descending score (ties: the earlier candidate first), padded to the most candidates
  of the rows with ``-inf`` and ``-1``."""
  probs = predictor.run({s["name"]: np.concatenate([r.inputs[s["name"]] for r in rows])
                         for s in predictor.inputs})
  width = max(r.n for r in rows)
  out, start = [], 0
  for row in rows:
    p = probs[start:start + row.n]
    start += row.n
    order = np.argsort(-p, kind="stable")
    scores = np.full(width, -np.inf, np.float32)
    ids = np.full(width, -1, np.int32)
    scores[:row.n], ids[:row.n] = p[order], order
    out.append((scores, ids))
  return out


def encode(rows: Sequence[Row], length: int, size: int | None = None
           ) -> tuple[np.ndarray, ...]:
  """Rows -> :meth:`Predictor.run`'s four ``[size, length]`` inputs (item ids int32, times
  int64; size >= rows, extra rows are padding), right-aligned; histories longer than
  ``length`` keep their end."""
  size = len(rows) if size is None else size
  items, exclude = (np.zeros((size, length), np.int32) for _ in range(2))
  ts, qts = (np.zeros((size, length), np.int64) for _ in range(2))
  right_align([r.items for r in rows], length, items)
  right_align([r.timestamps for r in rows], length, ts)
  right_align([r.query_timestamps for r in rows], length, qts)
  for r, row in enumerate(rows):
    if row.exclude_history:
      exclude[r] = items[r]
  return items, ts, qts, exclude


def run_rows(predictor: Predictor | RankingPredictor, rows: Sequence[Row | RankingRow]
             ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Scores rows with one device call per length bucket; results in the rows' order.

  Rows are grouped by the length bucket of their own history, so a short history is not
  padded to the longest one in the batch (a call's cost grows with its padded length;
  on CPU, SASRec at batch 32 costs 0.09 ms per row at length 32 and 0.53 ms at 200).
  Ranking rows: :func:`run_ranking_rows`.
  """
  if isinstance(predictor, RankingPredictor):
    return run_ranking_rows(predictor, rows)
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
