"""The sequence-dataset contract: the one place that names every feature.

Preprocessing (Beam + tf.transform), training, evaluation and serving all import
this module. It defines

* the feature names and the TFRecord schema of each split,
* the split protocol (per user, time-ordered: last event = test target,
  second-to-last = validation target, everything before = training),
* ``dataset_info.json`` (vocabulary sizes, counts, parameters, source),
* :func:`user_examples`, the pure function that turns one user's time-ordered
  events into the serialized examples of every split. The Beam step calls it in
  a ``DoFn``; :func:`write_sequence_dataset` calls it in-process for tests and
  small data. There is no second path.

Item ids in the dataset are *indices* into the item vocabulary written by
tf.transform: ``0`` is padding, ``1`` is the out-of-vocabulary bucket (rare or
unknown items), ``2..num_items+1`` are the admitted items in descending order of
frequency. ``item_vocab_size`` counts all of them (padding and OOV included), so
a model's item table has ``item_vocab_size`` rows and the full-ranking candidate
set is ``[FIRST_ITEM_ID, item_vocab_size)``.

Layout of a dataset directory::

    dataset_info.json
    train/part-00000-of-0000N.tfrecord.gz ...
    valid/part-...   test/part-...
    transform_fn/ transformed_metadata/    (tf.transform output, when made by Beam)
    vocab/items.txt                         (raw item id per line, line i = index i)
    quarantine/                             (rejected raw rows with reasons)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------
USER_ID = "user_id"            # int64 scalar: user index (vocabulary or hash)
ITEM_IDS = "item_ids"          # int64 list: item indices, oldest first
TIMESTAMPS = "timestamps"      # int64 list: unix seconds, aligned with ITEM_IDS
TARGET_ITEM = "target_item"    # int64 scalar (valid/test): the held-out item
TARGET_TIMESTAMP = "target_timestamp"  # int64 scalar (valid/test)
# int64 list (valid/test): every distinct item id of the user before the target,
# ascending, not truncated to max_len. Evaluation excludes them from the ranking.
SEEN_ITEMS = "seen_items"

# Raw (pre-transform) column names that readers produce and tf.transform consumes.
RAW_USER = "user"
RAW_ITEM = "item"
RAW_TIMESTAMP = "timestamp"
RAW_CATEGORY = "category"
RAW_BEHAVIOR = "behavior"

SPLITS = ("train", "valid", "test")
TRAIN, VALID, TEST = SPLITS

PAD_ID = 0
OOV_ID = 1
FIRST_ITEM_ID = 2  # first admitted item index; candidates are [FIRST_ITEM_ID, vocab)

DATASET_INFO_FILE = "dataset_info.json"
ITEM_VOCAB_FILE = os.path.join("vocab", "items.txt")
SCHEMA_VERSION = 1

# Users need this many events: one for training input and one for a training
# target would need 4, but a user with 3 events still gives a valid and a test
# example (with a one-item history). Users below this are dropped and counted.
MIN_EVENTS_PER_USER = 3

# ---------------------------------------------------------------------------
# Split protocol
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserSplits:
  """One user's examples, as plain Python values (before serialization)."""

  user_id: int
  train: dict[str, Any] | None
  valid: dict[str, Any]
  test: dict[str, Any]


def split_user_events(
    user_id: int,
    item_ids: Sequence[int],
    timestamps: Sequence[int],
    max_len: int,
) -> UserSplits | None:
  """Applies the split protocol to one user's time-ordered events.

  Args:
    user_id: the user's index.
    item_ids: item indices, oldest first (ties already in input order).
    timestamps: unix seconds aligned with ``item_ids``.
    max_len: the model's maximum history length. Histories keep the most recent
      ``max_len`` items; the training sequence keeps ``max_len + 1`` so that it
      yields ``max_len`` (input, next item) pairs. ``SEEN_ITEMS`` of the valid and
      test examples covers every earlier event, so callers pass all of them.

  Returns:
    The user's examples, or ``None`` when the user has fewer than
    ``MIN_EVENTS_PER_USER`` events (the caller counts those).
    ``train`` is ``None`` when the history before the validation item has fewer
    than two items (no (input, target) pair to train on).
  """
  n = len(item_ids)
  if n != len(timestamps):
    raise ValueError(f"user {user_id}: {n} items but {len(timestamps)} timestamps")
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  if n < MIN_EVENTS_PER_USER:
    return None
  items = [int(x) for x in item_ids]
  ts = [int(x) for x in timestamps]

  def history(end: int, keep: int) -> dict[str, Any]:
    start = max(0, end - keep)
    return {ITEM_IDS: items[start:end], TIMESTAMPS: ts[start:end]}

  train = None
  if n - 2 >= 2:
    train = {USER_ID: user_id, **history(n - 2, max_len + 1)}
  valid = {USER_ID: user_id, **history(n - 2, max_len),
           TARGET_ITEM: items[n - 2], TARGET_TIMESTAMP: ts[n - 2],
           SEEN_ITEMS: sorted(set(items[:n - 2]))}
  test = {USER_ID: user_id, **history(n - 1, max_len),
          TARGET_ITEM: items[n - 1], TARGET_TIMESTAMP: ts[n - 1],
          SEEN_ITEMS: sorted(set(items[:n - 1]))}
  return UserSplits(user_id=user_id, train=train, valid=valid, test=test)


# ---------------------------------------------------------------------------
# TFRecord schema (tf.train.Example). Serialization uses the protobuf classes
# that ship with TensorFlow; parsing specs are built lazily so that importing
# this module does not import TensorFlow.
# ---------------------------------------------------------------------------


def _int64_list(values: Iterable[int]):
  from tensorflow.core.example import feature_pb2  # pylint: disable=g-import-not-at-top
  return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=list(values)))


def serialize_example(features: Mapping[str, Any]) -> bytes:
  """Serializes one split example (a dict from :func:`split_user_events`)."""
  from tensorflow.core.example import example_pb2, feature_pb2  # pylint: disable=g-import-not-at-top
  feats = {}
  for name, value in features.items():
    if isinstance(value, (list, tuple, np.ndarray)):
      feats[name] = _int64_list(value)
    else:
      feats[name] = _int64_list([value])
  return example_pb2.Example(
      features=feature_pb2.Features(feature=feats)).SerializeToString(deterministic=True)


def user_examples(
    user_id: int,
    item_ids: Sequence[int],
    timestamps: Sequence[int],
    max_len: int,
) -> Iterator[tuple[str, bytes]]:
  """Yields ``(split, serialized tf.train.Example)`` for one user."""
  splits = split_user_events(user_id, item_ids, timestamps, max_len)
  if splits is None:
    return
  if splits.train is not None:
    yield TRAIN, serialize_example(splits.train)
  yield VALID, serialize_example(splits.valid)
  yield TEST, serialize_example(splits.test)


def feature_spec(split: str) -> dict[str, Any]:
  """The ``tf.io.parse_example`` spec of a split."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {
      USER_ID: tf.io.FixedLenFeature([], tf.int64),
      ITEM_IDS: tf.io.RaggedFeature(tf.int64),
      TIMESTAMPS: tf.io.RaggedFeature(tf.int64),
  }
  if split != TRAIN:
    spec[TARGET_ITEM] = tf.io.FixedLenFeature([], tf.int64)
    spec[TARGET_TIMESTAMP] = tf.io.FixedLenFeature([], tf.int64)
    spec[SEEN_ITEMS] = tf.io.RaggedFeature(tf.int64)  # empty rows in older datasets
  return spec


def split_files(data_dir: str, split: str) -> list[str]:
  """The TFRecord shards of one split, sorted. Works for local paths and gs://."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  files = sorted(tf.io.gfile.glob(os.path.join(data_dir, split, "*.tfrecord*")))
  if not files:
    raise FileNotFoundError(
        f"no TFRecord shards for split {split!r} under {data_dir}/{split}/; "
        "is this a sequence dataset written by `recml preprocess`?")
  return files


def is_compressed(path: str) -> bool:
  return path.endswith(".gz")


def split_has_feature(data_dir: str, split: str, name: str) -> bool:
  """Whether the first example of a split carries feature ``name`` (True if it is empty).

  Tells datasets written before a feature was added (parsing fills a missing
  ragged feature with empty rows, which reads like a real empty list).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  files = split_files(data_dir, split)
  records = tf.data.TFRecordDataset(files, "GZIP" if is_compressed(files[0]) else "")
  for record in records.take(1):
    return name in example_pb2.Example.FromString(record.numpy()).features.feature
  return True


# ---------------------------------------------------------------------------
# Times as the models take them
# ---------------------------------------------------------------------------
# Timestamps are int64 everywhere outside the compiled model (TFRecords, input
# batches). JAX computes in 32 bits (x64 is off), and an int64 array handed to a
# jitted function is silently wrapped to int32, so the batches' int64 times enter the
# model as two int32 words of their offset from a per-sequence reference (the row's
# latest query time): ``time - reference = high * 2**TIME_WORD_BITS + low`` with
# ``0 <= low < 2**TIME_WORD_BITS``. HSTU's time bias subtracts word by word
# (:func:`trainers.models.hstu.time_gaps`), so a gap's only error is float32's rounding
# of the gap itself (relative, below 2**-23), whatever the times' magnitude or unit, for
# offsets below 2**55.
# Models only use differences of times, which the reference leaves unchanged.
TIME_WORD_BITS = 24
_INT32 = np.iinfo(np.int32)


def time_words(times: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """int64 ``[B, L]`` times -> int32 ``[B, L, 2]`` (high, low) words of ``times - reference``.

  ``reference`` is ``[B]`` (one time per row). Offsets beyond 2**55 (padding of a row
  whose reference is beyond 2**55) saturate the high word.
  """
  offset = np.asarray(times, np.int64) - np.asarray(reference, np.int64)[..., None]
  high = offset >> TIME_WORD_BITS
  if high.size and (high.min() < _INT32.min or high.max() > _INT32.max):  # rare: saturate
    high = np.clip(high, _INT32.min, _INT32.max)
  out = np.empty(offset.shape + (2,), np.int32)  # written in place: no stack, no astype
  out[..., 0] = high
  np.bitwise_and(offset, (1 << TIME_WORD_BITS) - 1, out=out[..., 1], casting="unsafe")
  return out


# ---------------------------------------------------------------------------
# dataset_info.json
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class DatasetInfo:
  """What training, evaluation and serving need to know about a dataset."""

  item_vocab_size: int            # rows of the item table: PAD + OOV + items
  num_users: int                  # users with examples (>= MIN_EVENTS_PER_USER)
  max_len: int
  num_examples: dict[str, int]    # per split
  counts: dict[str, int]          # rows_read, rows_kept, rows_quarantined, ...
  source: dict[str, Any]          # input path(s), format
  params: dict[str, Any]          # preprocessing parameters
  vocab_files: dict[str, str] = dataclasses.field(default_factory=dict)
  extra_vocab_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  schema_version: int = SCHEMA_VERSION
  # Quarantined rows per reason kind ("non-numeric user id": 12, ...); they sum
  # to counts["rows_quarantined"].
  quarantine: dict[str, int] = dataclasses.field(default_factory=dict)
  # Unit of the raw input's timestamps ("s", "ms", "us", "ns"; "none" for formats
  # without timestamps), detected or declared. The dataset itself holds seconds.
  source_timestamp_unit: str = "s"

  @property
  def num_items(self) -> int:
    """Admitted items (candidates for ranking), excluding PAD and OOV."""
    return self.item_vocab_size - FIRST_ITEM_ID

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  def save(self, data_dir: str) -> str:
    return write_dataset_json(data_dir, self.to_json())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DatasetInfo":
    if d.get("task", "sequence") != "sequence":
      raise ValueError(f"a {d['task']} dataset, not a sequence dataset (see "
                       "trainers.ranking_features)")
    version = d.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
      raise ValueError(f"dataset schema_version {version} != supported {SCHEMA_VERSION}")
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [n for n in ("item_vocab_size", "num_users", "max_len") if n not in d]
    if missing:
      raise ValueError(f"dataset_info.json lacks {missing}")
    return cls(**{k: v for k, v in d.items() if k in names})


def load_dataset_info(data_dir: str) -> DatasetInfo:
  """Reads ``dataset_info.json`` of a dataset directory (local or gs://)."""
  return DatasetInfo.from_dict(read_dataset_json(data_dir))


def write_dataset_json(data_dir: str, text: str) -> str:
  """Writes ``dataset_info.json`` (local or gs://) of either task; returns its path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.path.join(data_dir, DATASET_INFO_FILE)
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(text + "\n")
  return path


def read_dataset_json(data_dir: str) -> dict[str, Any]:
  """The parsed ``dataset_info.json`` of a dataset directory, of either task."""
  path = os.path.join(data_dir, DATASET_INFO_FILE)
  # Local files without TensorFlow (serving reads local bundles, and need not load it).
  exists, opener = os.path.exists, open
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    exists, opener = tf.io.gfile.exists, tf.io.gfile.GFile
  if not exists(path):
    raise FileNotFoundError(
        f"{path} not found: pass a directory written by `recml preprocess`")
  with opener(path, "r") as f:
    return json.load(f)


def load_item_vocab(data_dir: str) -> list[str]:
  """Raw item ids by index (index 0 = '<pad>', 1 = '<oov>')."""
  path = os.path.join(data_dir, ITEM_VOCAB_FILE)
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


# ---------------------------------------------------------------------------
# In-process writer (tests and small data). The Beam step writes the same files
# through the same functions.
# ---------------------------------------------------------------------------


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return os.path.join(split, f"part-{shard:05d}-of-{num_shards:05d}.tfrecord.gz")


def write_sequence_dataset(
    out_dir: str,
    user_events: Mapping[int, tuple[Sequence[int], Sequence[int]]],
    *,
    item_vocab_size: int,
    max_len: int,
    item_vocab: Sequence[str] | None = None,
    source: Mapping[str, Any] | None = None,
    counts: Mapping[str, int] | None = None,
) -> DatasetInfo:
  """Writes a sequence dataset from already-indexed, time-ordered events.

  Args:
    out_dir: the dataset directory.
    user_events: user index -> (item indices, timestamps), oldest first.
    item_vocab_size: PAD + OOV + admitted items.
    max_len: maximum history length.
    item_vocab: optional raw ids by index, written to ``vocab/items.txt``.
    source, counts: recorded in ``dataset_info.json``.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records: dict[str, list[bytes]] = {s: [] for s in SPLITS}
  users = 0
  for user in sorted(user_events):
    items, ts = user_events[user]
    emitted = False
    for split, rec in user_examples(user, items, ts, max_len):
      records[split].append(rec)
      emitted = True
    users += emitted
  opts = tf.io.TFRecordOptions(compression_type="GZIP")
  for split, recs in records.items():
    tf.io.gfile.makedirs(os.path.join(out_dir, split))
    with tf.io.TFRecordWriter(os.path.join(out_dir, shard_name(split, 0, 1)), opts) as w:
      for r in recs:
        w.write(r)
  vocab_files = {}
  if item_vocab is not None:
    if len(item_vocab) != item_vocab_size:
      raise ValueError(f"item_vocab has {len(item_vocab)} entries, expected {item_vocab_size}")
    tf.io.gfile.makedirs(os.path.join(out_dir, "vocab"))
    with tf.io.gfile.GFile(os.path.join(out_dir, ITEM_VOCAB_FILE), "w") as f:
      f.write("".join(f"{v}\n" for v in item_vocab))
    vocab_files["item"] = ITEM_VOCAB_FILE
  info = DatasetInfo(
      item_vocab_size=item_vocab_size,
      num_users=users,
      max_len=max_len,
      num_examples={s: len(r) for s, r in records.items()},
      counts=dict(counts or {}),
      source=dict(source or {"writer": "write_sequence_dataset"}),
      params={"max_len": max_len},
      vocab_files=vocab_files,
  )
  info.save(out_dir)
  return info
