"""The ranking (CTR) dataset contract: the one place that names every CTR feature.

Preprocessing (Beam + tf.transform, ``components/preprocess/ctr_*.py``), training and
serving all import this module; serving uses it without TensorFlow (nothing here imports
TensorFlow at module level). It defines

* the TFRecord features of every split (``tf.train.Example``, gzip):

  ===================  =====================  ==========================================
  feature              type                   value
  ===================  =====================  ==========================================
  ``label``            float [1]              0 or 1
  ``dense``            float [Nd]             ``(log1p(max(x, 0)) - mean) / std``; 0 when
                                              missing (the train mean)
  ``dense_missing``    float [Nd]             1 where the raw value is missing, else 0
  ``sparse``           int64 [Nc]             one id per scalar categorical feature
  ``multi_hot/<name>`` int64 [M]              ids of a list feature, 0-padded
  ===================  =====================  ==========================================

  ``dense``/``dense_missing`` are written only when there are dense features,
  ``sparse`` only when there are scalar categorical features (:func:`feature_spec`).
  Dense features and ids are in the order of ``dataset_info.json``'s ``dense`` and
  ``categorical`` lists (``sparse`` skips the multi-hot entries).
* the ids: ``PAD_ID`` (0) pads multi-hot lists and is never an id of a value;
  ``OOV_ID`` (1) is a value seen fewer than ``min_count`` times in train, or never;
  vocabulary features give admitted values ``FIRST_ID + rank`` (rank by descending train
  frequency, ties by the value's bytes descending, tf.transform's rule); hashed features
  give ``FIRST_ID + hash_bucket(value, buckets)``, in ``[2, 2 + buckets)``. A table of a
  feature has ``vocab_size`` rows (padding and OOV included).
* raw values: a categorical value is the text of the field with surrounding whitespace
  removed (integers as decimal text); an empty or absent value is the value ``MISSING``
  (``"<missing>"``), which gets an id like any other value (a raw value spelled
  ``<missing>`` reads as missing too). A dense value is a number; empty, absent or NaN
  is missing, anything else (text, infinities, booleans) is an error. Labels are 0 or 1.
  A multi-hot value is a list (or a text split at ``multi_hot_separator``); empty
  entries are dropped, the first ``multi_hot`` entries kept, in input order (a
  multi-hot vocabulary counts every value listed in train, truncated or not).
* ``vocab/<name>.txt`` for each vocabulary feature: line ``i`` is the raw value of id
  ``i`` (lines 0 and 1 are ``<pad>`` and ``<oov>``), as ``vocab/items.txt`` of the
  sequence dataset.
* ``dataset_info.json`` (:class:`RankingInfo`, with ``"task": "ranking"``) and
  :func:`transform_rows`, the numpy version of the train-time transform, which serving
  applies to raw feature values. It gives the values preprocessing wrote for the same
  raw rows (float32 rounding of ``log1p`` aside); tests check it.

Layout of a ranking dataset directory::

    dataset_info.json
    train/part-00000-of-0000N.tfrecord.gz ...   valid/...   test/...
    vocab/<feature>.txt                         (vocabulary features)
    transform_fn/ transformed_metadata/         (tf.transform output)
    quarantine/                                 (rejected raw rows with reasons)
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from trainers import features

TASK = "ranking"
SPLITS = features.SPLITS
TRAIN, VALID, TEST = SPLITS
DATASET_INFO_FILE = features.DATASET_INFO_FILE
SCHEMA_VERSION = 1

# TFRecord feature names.
LABEL = "label"
DENSE = "dense"
DENSE_MISSING = "dense_missing"
SPARSE = "sparse"
MULTI_HOT_PREFIX = "multi_hot/"

PAD_ID = 0
OOV_ID = 1
FIRST_ID = 2
MISSING = "<missing>"
VOCAB, HASH = "vocab", "hash"   # categorical feature kinds
VOCAB_DIR = "vocab"
VOCAB_HEAD = ("<pad>", "<oov>")  # the first two lines of a vocabulary file
DEFAULT_MULTI_HOT_SEPARATOR = "|"


def multi_hot_key(name: str) -> str:
  """The TFRecord feature of a multi-hot feature."""
  return MULTI_HOT_PREFIX + name


def vocab_file(name: str) -> str:
  """The vocabulary file of a feature, relative to the dataset directory."""
  return os.path.join(VOCAB_DIR, f"{name}.txt")


# ---------------------------------------------------------------------------
# Raw values (shared by the readers of preprocessing and by serving)
# ---------------------------------------------------------------------------


def hash_bucket(value: str, buckets: int) -> int:
  """A stable hash of a categorical value into ``[0, buckets)``.

  The first 8 bytes of BLAKE2b (``digest_size=8``) of the value's UTF-8 bytes, read as a
  little-endian unsigned integer, modulo ``buckets``. The same on every machine, Python
  version and run (unlike ``hash()``), and needs no TensorFlow. Hashed ids are
  ``FIRST_ID + hash_bucket(categorical_token(raw), buckets)``.
  """
  digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") % buckets


def categorical_token(value: Any) -> str:
  """The value of a raw categorical field (see the module docstring).

  Raises:
    ValueError: the value is neither text nor an integer (floats, booleans, lists).
  """
  if value is None:
    return MISSING
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if isinstance(value, str):
    return value.strip() or MISSING
  if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    return str(int(value))
  raise ValueError(f"a categorical value must be text or an integer, not "
                   f"{type(value).__name__} {value!r}")


def multi_hot_tokens(value: Any, separator: str = DEFAULT_MULTI_HOT_SEPARATOR) -> list[str]:
  """The values of a raw multi-hot field: a list, or a text split at ``separator``.

  Empty entries (and a missing field) give no value. Raises ValueError for other types.
  """
  if value is None:
    return []
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if isinstance(value, str):
    parts: Iterable[Any] = value.split(separator)
  elif isinstance(value, (list, tuple, np.ndarray)):
    parts = value
  else:
    raise ValueError(f"a multi-hot value must be a list or a text, not "
                     f"{type(value).__name__} {value!r}")
  out = []
  for part in parts:
    if part is None:
      continue
    token = categorical_token(part)
    if token != MISSING:
      out.append(token)
  return out


def parse_dense(value: Any) -> float | None:
  """The number of a raw dense field; None when missing (empty, absent or NaN).

  Raises:
    ValueError: ``"non-numeric dense value"`` (text that is not a decimal number,
      booleans, other types) or ``"non-finite dense value"`` (infinities).
  """
  if value is None:
    return None
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  if isinstance(value, str):
    text = value.strip()
    if not text:
      return None
    if "_" in text:  # float() takes "1_000"
      raise ValueError("non-numeric dense value")
    try:
      number = float(text)
    except ValueError:
      raise ValueError("non-numeric dense value") from None
  elif isinstance(value, (int, float, decimal.Decimal, np.integer, np.floating)) and (
      not isinstance(value, (bool, np.bool_))):
    number = float(value)
  else:
    raise ValueError("non-numeric dense value")
  if math.isnan(number):
    return None
  if math.isinf(number):
    raise ValueError("non-finite dense value")
  return number


def parse_label(value: Any) -> float:
  """A label: 0 or 1 (as a number or its text, ``"1.0"`` included); else ValueError."""
  number = None
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  if isinstance(value, str):
    try:
      number = float(value.strip()) if "_" not in value else None
    except ValueError:
      number = None
  elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_)):
    number = float(value)
  if number not in (0.0, 1.0):
    raise ValueError("bad label")
  return number


# ---------------------------------------------------------------------------
# dataset_info.json
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DenseFeature:
  """A dense feature and the train statistics of ``log1p(max(x, 0))`` (float32 values).

  ``std`` is the population standard deviation; a feature with ``std == 0`` (constant in
  train) is only centred, and one never present in train has mean 0 and std 1.
  """

  name: str
  mean: float
  std: float


@dataclasses.dataclass(frozen=True)
class CategoricalFeature:
  """A categorical feature: its kind, table size and, for lists, the fixed length."""

  name: str
  kind: str                   # VOCAB or HASH
  vocab_size: int             # table rows: PAD + OOV + values (or buckets)
  min_count: int | None = None  # VOCAB: train count to be admitted
  buckets: int | None = None    # HASH
  multi_hot: int = 0          # 0: one value per row; else the list length written

  def to_dict(self) -> dict[str, Any]:
    out = {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size,
           "multi_hot": self.multi_hot}
    if self.kind == VOCAB:
      out["min_count"] = self.min_count
      out["vocab_file"] = vocab_file(self.name)
    else:
      out["buckets"] = self.buckets
    return out


@dataclasses.dataclass
class RankingInfo:
  """What training, evaluation and serving need to know about a ranking dataset."""

  label: str                                 # the raw label column
  dense: list[DenseFeature]
  categorical: list[CategoricalFeature]
  counts: dict[str, int]                     # examples per split
  label_rate: dict[str, float]               # mean label per split
  quarantine: dict[str, int]                 # rejected rows per reason kind
  rows: dict[str, int]                       # rows_read, rows_kept, rows_quarantined, ...
  source: dict[str, Any]                     # input, format, files; fingerprint, dataset_id
  params: dict[str, Any]                     # preprocessing parameters
  multi_hot_separator: str = DEFAULT_MULTI_HOT_SEPARATOR
  task: str = TASK
  schema_version: int = SCHEMA_VERSION

  @property
  def dense_names(self) -> list[str]:
    return [f.name for f in self.dense]

  @property
  def scalar_categorical(self) -> list[CategoricalFeature]:
    """The features of ``sparse``, in its order."""
    return [f for f in self.categorical if not f.multi_hot]

  @property
  def multi_hot(self) -> list[CategoricalFeature]:
    return [f for f in self.categorical if f.multi_hot]

  def feature(self, name: str) -> CategoricalFeature:
    for f in self.categorical:
      if f.name == name:
        return f
    raise KeyError(name)

  def to_dict(self) -> dict[str, Any]:
    return {
        "schema_version": self.schema_version, "task": self.task, "label": self.label,
        "dense": [dataclasses.asdict(f) for f in self.dense],
        "categorical": [f.to_dict() for f in self.categorical],
        "counts": dict(self.counts), "label_rate": dict(self.label_rate),
        "quarantine": dict(self.quarantine), "rows": dict(self.rows),
        "source": dict(self.source), "params": dict(self.params),
        "multi_hot_separator": self.multi_hot_separator,
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def save(self, data_dir: str) -> str:
    return features.write_dataset_json(data_dir, self.to_json())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RankingInfo":
    if d.get("task") != TASK:
      raise ValueError(f"not a ranking dataset (task {d.get('task', 'sequence')!r}): "
                       "pass a directory written by `recml preprocess --task ranking`")
    version = d.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
      raise ValueError(f"ranking dataset schema_version {version} != supported "
                       f"{SCHEMA_VERSION}")
    cat_fields = {f.name for f in dataclasses.fields(CategoricalFeature)}
    return cls(
        label=d["label"],
        dense=[DenseFeature(**f) for f in d["dense"]],
        categorical=[CategoricalFeature(**{k: v for k, v in f.items() if k in cat_fields})
                     for f in d["categorical"]],
        counts=dict(d.get("counts", {})), label_rate=dict(d.get("label_rate", {})),
        quarantine=dict(d.get("quarantine", {})), rows=dict(d.get("rows", {})),
        source=dict(d.get("source", {})), params=dict(d.get("params", {})),
        multi_hot_separator=d.get("multi_hot_separator", DEFAULT_MULTI_HOT_SEPARATOR),
        schema_version=version)


def is_ranking(data_dir: str) -> bool:
  """Whether ``data_dir`` holds a ranking dataset (its ``dataset_info.json`` says so)."""
  return features.read_dataset_json(data_dir).get("task") == TASK


def load_info(data_dir: str) -> RankingInfo:
  """Reads ``dataset_info.json`` of a ranking dataset (local or gs://)."""
  return RankingInfo.from_dict(features.read_dataset_json(data_dir))


def read_vocab_file(path: str) -> list[str]:
  """The lines of a vocabulary file (line i = the raw value of id i)."""
  with open(path, encoding="utf-8") as f:
    data = f.read()
  lines = data.split("\n")
  if lines and not lines[-1]:
    lines.pop()
  return lines


def load_vocabs(data_dir: str, info: RankingInfo) -> dict[str, dict[str, int]]:
  """Raw value -> id of every vocabulary feature (local files; no TensorFlow)."""
  out = {}
  for f in info.categorical:
    if f.kind != VOCAB:
      continue
    lines = read_vocab_file(os.path.join(data_dir, vocab_file(f.name)))
    if len(lines) != f.vocab_size or tuple(lines[:FIRST_ID]) != VOCAB_HEAD:
      raise ValueError(f"{vocab_file(f.name)} has {len(lines)} lines, expected "
                       f"{f.vocab_size} starting with {VOCAB_HEAD}")
    out[f.name] = {token: i for i, token in enumerate(lines) if i >= FIRST_ID}
  return out


# ---------------------------------------------------------------------------
# The transform, in numpy (serving)
# ---------------------------------------------------------------------------


def category_id(token: str, feature: CategoricalFeature,
                vocab: Mapping[str, int] | None) -> int:
  """The id of a categorical value (a :func:`categorical_token`)."""
  if feature.kind == HASH:
    return FIRST_ID + hash_bucket(token, feature.buckets)
  return vocab.get(token, OOV_ID)


def transform_rows(rows: Sequence[Mapping[str, Any]], info: RankingInfo,
                   vocabs: Mapping[str, Mapping[str, int]]) -> dict[str, np.ndarray]:
  """Raw rows -> the model's features, as preprocessing writes them.

  Args:
    rows: one dict per row, raw feature name -> raw value (a JSON value). An absent
      feature is missing; the label column, if present, is ignored.
    info: the dataset's :class:`RankingInfo`.
    vocabs: :func:`load_vocabs`.

  Returns:
    ``{"dense": float32 [B, Nd], "dense_missing": float32 [B, Nd], "sparse": int64
    [B, Nc], "multi_hot/<name>": int64 [B, M]}``, with the keys the TFRecords have.

  Raises:
    ValueError: a value the dataset cannot represent, or an unknown feature; the
      message names the row and the feature.
  """
  known = {info.label, *info.dense_names, *(f.name for f in info.categorical)}
  n = len(rows)
  nd = len(info.dense)
  raw_dense = np.zeros((n, nd), np.float32)
  missing = np.ones((n, nd), np.float32)
  scalars = info.scalar_categorical
  sparse = np.zeros((n, len(scalars)), np.int64)
  lists = {f.name: np.zeros((n, f.multi_hot), np.int64) for f in info.multi_hot}
  for r, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"row {r}: expected an object of feature values, got "
                       f"{type(row).__name__}")
    unknown = sorted(set(row) - known)
    if unknown:
      raise ValueError(f"row {r}: unknown feature {unknown[0]!r} (known: "
                       f"{', '.join(sorted(known - {info.label}))})")
    for j, f in enumerate(info.dense):
      try:
        x = parse_dense(row.get(f.name))
      except ValueError as e:
        raise ValueError(f"row {r}: feature {f.name!r}: {e}: {row.get(f.name)!r}") from None
      if x is not None:
        raw_dense[r, j] = x
        missing[r, j] = 0.0
    for j, f in enumerate(scalars):
      try:
        token = categorical_token(row.get(f.name))
      except ValueError as e:
        raise ValueError(f"row {r}: feature {f.name!r}: {e}") from None
      sparse[r, j] = category_id(token, f, vocabs.get(f.name))
    for f in info.multi_hot:
      try:
        tokens = multi_hot_tokens(row.get(f.name), info.multi_hot_separator)
      except ValueError as e:
        raise ValueError(f"row {r}: feature {f.name!r}: {e}") from None
      ids = [category_id(t, f, vocabs.get(f.name)) for t in tokens[:f.multi_hot]]
      lists[f.name][r, :len(ids)] = ids
  out: dict[str, np.ndarray] = {}
  if nd:
    mean = np.array([f.mean for f in info.dense], np.float32)
    std = np.array([f.std for f in info.dense], np.float32)
    scale = np.where(std > 0, std, np.float32(1.0))
    z = (np.log1p(np.maximum(raw_dense, np.float32(0.0))) - mean) / scale
    out[DENSE] = np.where(missing > 0, np.float32(0.0), z).astype(np.float32)
    out[DENSE_MISSING] = missing
  if scalars:
    out[SPARSE] = sparse
  for f in info.multi_hot:
    out[multi_hot_key(f.name)] = lists[f.name]
  return out


# ---------------------------------------------------------------------------
# TFRecord parsing
# ---------------------------------------------------------------------------


def feature_spec(info: RankingInfo) -> dict[str, Any]:
  """The ``tf.io.parse_example`` spec of every split."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {LABEL: tf.io.FixedLenFeature([], tf.float32)}
  if info.dense:
    spec[DENSE] = tf.io.FixedLenFeature([len(info.dense)], tf.float32)
    spec[DENSE_MISSING] = tf.io.FixedLenFeature([len(info.dense)], tf.float32)
  if info.scalar_categorical:
    spec[SPARSE] = tf.io.FixedLenFeature([len(info.scalar_categorical)], tf.int64)
  for f in info.multi_hot:
    spec[multi_hot_key(f.name)] = tf.io.FixedLenFeature([f.multi_hot], tf.int64)
  return spec


def split_files(data_dir: str, split: str) -> list[str]:
  """The TFRecord shards of one split, sorted (the sequence dataset's layout)."""
  return features.split_files(data_dir, split)
