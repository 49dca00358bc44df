"""tf.data input pipeline for the sequence dataset (see :mod:`trainers.features`).

Reads the TFRecord shards of a split, shuffles (seeded per epoch, so a resumed
run sees the same order as an uninterrupted one), batches, parses a whole batch
at once, right-aligns sequences to ``max_len`` (padding on the left, keeping the
most recent items), pads the last batch to full size with zero-weight rows (one
compiled shape), and prefetches. Batches are dicts of numpy arrays:

train: ``inputs``, ``timestamps``, ``query_timestamps``, ``targets``,
``weights`` -- all ``[B, L]``; ``weights`` is 0 at padding and OOV targets.

eval: ``history``, ``timestamps``, ``query_timestamps`` (``[B, L]``),
``target``, ``weight`` (``[B]``), ``seen_items`` (``[B, W]``: every item before the
target, 0-padded to a power of two ``W``; the last ``max_len`` history items in
datasets written without it, see ``has_seen_items``).

Timestamps stay int64 (``TIME_KEYS``; any magnitude or unit); everything else is
int32 or float32. :func:`model_batch` turns a batch's times into what the models
take (int32 words of offsets, see :func:`trainers.features.time_words`): call it
on every batch handed to a jitted model, since JAX wraps int64 inputs to int32.

Length buckets (train only): about half the positions of a MovieLens batch are
padding. With ``length_buckets``, each window of ``bucket_window`` shuffled
batches is sorted by length, cut into batches, and each batch is truncated to
the smallest bucket that holds its longest sequence (dropping only padding:
sequences are right-aligned). Batches are then visited in a shuffled order. The
model sees a few fixed shapes (one compilation each) and does ~35% less work on
ML-1M.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from trainers import features

Batch = dict[str, np.ndarray]
TIME_KEYS = ("timestamps", "query_timestamps")


def _dtype(tf, key: str):
  return tf.int64 if key in TIME_KEYS else tf.float32 if key in ("weights", "weight") else tf.int32


def model_batch(batch: Batch) -> Batch:
  """``batch`` with its int64 times as int32 words of their offset from each row's
  latest query time (``[B, L, 2]``), the form a jitted model takes exactly."""
  reference = batch["query_timestamps"].max(axis=-1)
  return {**batch, **{k: features.time_words(batch[k], reference) for k in TIME_KEYS}}


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # JAX owns the accelerators; TF only reads files.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised
  return tf


def _right_align(tf, ragged, length: int):
  """Ragged ``[B, None]`` -> dense ``[B, length]``: last ``length`` values, left-padded with 0."""
  lengths = tf.minimum(tf.cast(ragged.row_lengths(), tf.int64), length)
  ragged = ragged[:, -length:] if length > 0 else ragged
  dense = ragged.to_tensor(default_value=0, shape=[None, length])
  shift = length - lengths                                          # [B]
  idx = tf.range(length, dtype=tf.int64)[None, :] - shift[:, None]  # source column
  gathered = tf.gather(dense, tf.maximum(idx, 0), batch_dims=1)
  return tf.where(idx >= 0, gathered, tf.zeros_like(gathered))


def _pad_rows(tf, x, batch_size: int):
  n = tf.shape(x)[0]
  paddings = [[0, batch_size - n]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.ensure_shape(tf.pad(x, paddings), [batch_size] + list(x.shape[1:]))


def _pad_to_power_of_two(tf, ragged):
  """Ragged ``[B, None]`` -> dense ``[B, W]`` padded with 0 on the right, ``W`` the
  smallest power of two that holds the longest row: few shapes, few compilations."""
  dense = ragged.to_tensor(default_value=0)
  longest = tf.maximum(tf.shape(dense, out_type=tf.int64)[1], 1)
  widths = tf.constant([1 << i for i in range(40)], tf.int64)
  width = tf.gather(widths, tf.searchsorted(widths, longest[None]))[0]
  return tf.pad(dense, [[0, 0], [0, width - tf.shape(dense, out_type=tf.int64)[1]]])


# Parse threads and batches parsed ahead. Fixed, with tf.data's autotuning off: with
# AUTOTUNE, ending an epoch's iterator blocked 3.9-4.3 s in about half the epochs on 2 CPU
# cores (SASRec on ml-1m-partial: 6.6 s epochs became 10.4 s); fixed, 9 epochs, no stall.
PARSE_THREADS = 2
PREFETCH = 2


def _parsed(tf, ds, parse):
  """``ds.map(parse)``, deterministic, parsed ahead in :data:`PARSE_THREADS` threads."""
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
  ds = ds.map(parse, num_parallel_calls=PARSE_THREADS, deterministic=True)
  return ds.with_options(options).prefetch(PREFETCH)


def _elements(data, ds) -> Iterator[Batch]:
  """``ds``'s elements as numpy. Once a pass has counted them (``data._num_elements``),
  later passes stop after the last one instead of asking tf.data for the end of the data
  (which, with autotuning on, was where the stall above showed)."""
  iterator, count = ds.as_numpy_iterator(), 0
  while data._num_elements is None or count < data._num_elements:  # pylint: disable=protected-access
    try:
      element = next(iterator)
    except StopIteration:
      data._num_elements = count  # pylint: disable=protected-access
      return
    count += 1
    yield element


class SequenceData:
  """One split of a sequence dataset, ready to iterate in batches.

  Args:
    data_dir: dataset directory (local or gs://).
    split: ``train``, ``valid`` or ``test``.
    batch_size: rows per batch (the last batch is padded with zero-weight rows).
    max_len: sequence length fed to the model.
    shuffle_buffer: examples in the shuffle buffer (train only); a buffer at
      least the split's size gives a uniform shuffle.
    cache: keep the serialized records in memory after the first pass.
  """

  def __init__(self, data_dir: str, split: str, batch_size: int, max_len: int,
               shuffle_buffer: int = 100_000, cache: bool = True,
               length_buckets: tuple[int, ...] = (), bucket_window: int = 8):
    tf = _tf()
    self.split, self.batch_size, self.max_len = split, batch_size, max_len
    self.shuffle_buffer = shuffle_buffer
    buckets = sorted({int(b) for b in length_buckets if 0 < int(b) < max_len} | {max_len})
    self.length_buckets = tuple(buckets) if split == features.TRAIN else (max_len,)
    self.bucket_window = max(1, bucket_window)
    self.files = features.split_files(data_dir, split)
    compression = "GZIP" if features.is_compressed(self.files[0]) else ""
    ds = tf.data.TFRecordDataset(self.files, compression_type=compression,
                                 num_parallel_reads=1)
    self._records = ds.cache() if cache else ds
    self._num_elements: int | None = None  # windows per pass, counted by the first full pass
    self._spec = features.feature_spec(split)
    # Datasets written before SEEN_ITEMS: eval batches carry the history window instead.
    self.has_seen_items = split == features.TRAIN or features.split_has_feature(
        data_dir, split, features.SEEN_ITEMS)

  def _parse_train(self, serialized):
    tf = _tf()
    ex = tf.io.parse_example(serialized, self._spec)
    items, ts = ex[features.ITEM_IDS], ex[features.TIMESTAMPS]
    length, b = self.max_len, self.batch_size
    targets = _right_align(tf, items[:, 1:], length)
    out = {
        "inputs": _right_align(tf, items[:, :-1], length),
        "timestamps": _right_align(tf, ts[:, :-1], length),
        "query_timestamps": _right_align(tf, ts[:, 1:], length),
        "targets": targets,
        "weights": tf.cast(targets >= features.FIRST_ITEM_ID, tf.float32),
    }
    rows = b * (self.bucket_window if self.bucketed else 1)
    out = {k: _pad_rows(tf, v, rows) for k, v in out.items()}
    return {k: tf.cast(v, _dtype(tf, k)) for k, v in out.items()}

  def _parse_eval(self, serialized):
    tf = _tf()
    ex = tf.io.parse_example(serialized, self._spec)
    items, ts = ex[features.ITEM_IDS], ex[features.TIMESTAMPS]
    target_ts = ex[features.TARGET_TIMESTAMP][:, None]
    next_ts = tf.concat([ts[:, 1:], tf.RaggedTensor.from_tensor(target_ts, row_splits_dtype=ts.row_splits.dtype)], axis=1)
    length, b = self.max_len, self.batch_size
    out = {
        "history": _right_align(tf, items, length),
        "timestamps": _right_align(tf, ts, length),
        "query_timestamps": _right_align(tf, next_ts, length),
        "target": ex[features.TARGET_ITEM],
        "weight": tf.ones_like(ex[features.TARGET_ITEM], tf.float32),
        "seen_items": _pad_to_power_of_two(
            tf, ex[features.SEEN_ITEMS] if self.has_seen_items else items[:, -length:]),
    }
    out = {k: _pad_rows(tf, v, b) for k, v in out.items()}
    return {k: tf.cast(v, _dtype(tf, k)) for k, v in out.items()}

  @property
  def bucketed(self) -> bool:
    return len(self.length_buckets) > 1

  def dataset(self, epoch: int = 0, seed: int = 0):
    """The ``tf.data.Dataset`` of one epoch (deterministic given ``seed``, ``epoch``).

    With length buckets, its elements are windows of ``bucket_window`` batches.
    """
    tf = _tf()
    ds = self._records
    is_train = self.split == features.TRAIN
    if is_train:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed * 100_003 + epoch,
                      reshuffle_each_iteration=False)
    rows = self.batch_size * (self.bucket_window if self.bucketed else 1)
    ds = ds.batch(rows)
    return _parsed(tf, ds, self._parse_train if is_train else self._parse_eval)

  def _bucket(self, window: Batch, rng: np.random.Generator) -> list[Batch]:
    """Sorts a window by length, cuts it into batches, truncates each to its bucket."""
    lengths = (window["inputs"] != features.PAD_ID).sum(axis=1)
    order = np.argsort(-lengths, kind="stable")
    out = []
    for lo in range(0, len(order), self.batch_size):
      idx = order[lo:lo + self.batch_size]
      longest = int(lengths[idx].max())
      if longest == 0:
        continue  # only padding rows (end of the epoch)
      keep = next(b for b in self.length_buckets if b >= longest)
      out.append({k: v[idx][:, -keep:] for k, v in window.items()})
    rng.shuffle(out)
    return out

  def batches(self, epoch: int = 0, seed: int = 0, max_steps: int = 0) -> Iterator[Batch]:
    """Numpy batches of one epoch; ``max_steps > 0`` stops early."""
    rng = np.random.default_rng([seed, epoch])
    step = 0
    for element in _elements(self, self.dataset(epoch, seed)):
      for batch in (self._bucket(element, rng) if self.bucketed else [element]):
        if max_steps and step >= max_steps:
          return
        step += 1
        yield batch

class RankingData:
  """One split of a ranking (CTR) dataset (see :mod:`trainers.ranking_features`).

  Batches: ``dense``, ``dense_missing`` (float32 ``[B, Nd]``), ``sparse`` (int32
  ``[B, Nc]``), ``multi_hot/<name>`` (int32 ``[B, M]``), ``label`` and ``weight``
  (float32 ``[B]``; ``weight`` is 0 on the rows that pad the last batch).
  Shuffling (train) is seeded by ``(seed, epoch)``, as for sequences.
  """

  def __init__(self, data_dir: str, split: str, batch_size: int,
               shuffle_buffer: int = 1_000_000, cache: bool = True):
    from trainers import ranking_features  # pylint: disable=g-import-not-at-top
    tf = _tf()
    self.split, self.batch_size, self.shuffle_buffer = split, batch_size, shuffle_buffer
    self.info = ranking_features.load_info(data_dir)
    self.files = features.split_files(data_dir, split)
    compression = "GZIP" if features.is_compressed(self.files[0]) else ""
    ds = tf.data.TFRecordDataset(self.files, compression_type=compression)
    self._records = ds.cache() if cache else ds
    self._num_elements: int | None = None  # batches per pass, counted by the first full pass
    self._spec = ranking_features.feature_spec(self.info)
    self.num_dense = len(self.info.dense)

  def _parse(self, serialized):
    tf = _tf()
    ex = tf.io.parse_example(serialized, self._spec)
    n = tf.shape(serialized)[0]
    out = {k: v for k, v in ex.items()}
    if self.num_dense == 0:  # no dense features (e.g. Frappe): empty [B, 0] arrays
      out["dense"] = out["dense_missing"] = tf.zeros([n, 0], tf.float32)
    if "sparse" not in out:  # only multi-hot features
      out["sparse"] = tf.zeros([n, 0], tf.int64)
    out["weight"] = tf.ones([n], tf.float32)
    out = {k: _pad_rows(tf, v, self.batch_size) for k, v in out.items()}
    return {k: tf.cast(v, tf.int32 if v.dtype == tf.int64 else tf.float32)
            for k, v in out.items()}

  def dataset(self, epoch: int = 0, seed: int = 0):
    """The ``tf.data.Dataset`` of one epoch (deterministic given ``seed``, ``epoch``)."""
    tf = _tf()
    ds = self._records
    if self.split == features.TRAIN:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed * 100_003 + epoch,
                      reshuffle_each_iteration=False)
    return _parsed(tf, ds.batch(self.batch_size), self._parse)

  def batches(self, epoch: int = 0, seed: int = 0, max_steps: int = 0) -> Iterator[Batch]:
    """Numpy batches of one epoch; ``max_steps > 0`` stops early."""
    for step, batch in enumerate(_elements(self, self.dataset(epoch, seed))):
      if max_steps and step >= max_steps:
        return
      yield batch
