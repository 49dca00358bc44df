"""Reading ranking (CTR) rows: Criteo TSV, CSV, Parquet, BigQuery -> Arrow batches.

The ranking counterpart of :mod:`components.preprocess.sources` (whose line streaming
and quarantine rows it reuses). :func:`read_file` turns one input file into
:class:`Piece` objects: an Arrow record batch of raw rows in the layout tf.transform
reads (:func:`arrow_schema`), optional times, the file's split for pre-split inputs,
and the rows it rejects with their reasons. BigQuery rows go through
:func:`records_to_piece`. The column spec comes resolved (:mod:`.ctr_spec`).

Raw values follow ``trainers.ranking_features`` (one parser for preprocessing and
serving): labels 0/1, dense numbers (empty/NaN = missing), categorical text (empty =
``MISSING``), multi-hot lists. Rejected rows (``{"file", "line", "raw", "reason"}``)
have reason kinds ``wrong field count``, ``bad label``, ``non-numeric dense value``,
``non-finite dense value``, ``bad categorical value``, ``bad time``, ``unreadable
encoding (not utf-8)``.

Each row has a key, ``(file index << 40) + line number`` (the row number for Parquet;
a hash of the row for BigQuery), from which the random split (:func:`random_splits`)
and the output shard are drawn.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from components.preprocess.ctr_spec import (
    CRITEO_FIELDS, CtrSpec, column_names, split_fields)
from components.preprocess.sources import (
    DEFAULT_BATCH_ROWS, InputError, bad_row, content_lines, filesystems, line_blocks)
from trainers import ranking_features as rf

ROW_FILE_SHIFT = 40        # row key = (file index << 40) + line (or row) number
SPLIT_CODES = {s: i for i, s in enumerate(rf.SPLITS)}

# Raw Arrow columns (what tf.transform reads).
LABEL_COLUMN = "label"
DENSE_INDEX = "dense_index"
DENSE_VALUE = "dense_value"
DENSE_INPUT = "dense"       # the SparseTensor [B, Nd] tf.transform builds from the two
ROW_KEY = "row_key"         # passed through tf.transform untouched
SPLIT = "split"             # the split code (SPLIT_CODES), added by the pipeline


# ---------------------------------------------------------------------------
# Rows -> Arrow
# ---------------------------------------------------------------------------


def arrow_schema(spec: CtrSpec):
  """The Arrow schema of raw ranking batches (list columns; see ``ctr_pipeline``)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  fields = [pa.field(LABEL_COLUMN, pa.large_list(pa.float32()))]
  if spec.dense:
    fields += [pa.field(DENSE_INDEX, pa.large_list(pa.int64())),
               pa.field(DENSE_VALUE, pa.large_list(pa.float32()))]
  for name in (*spec.categorical, *spec.multi_hot_names):
    value = pa.int64() if spec.is_hashed(name) else pa.large_binary()
    fields.append(pa.field(spec.input_column(name), pa.large_list(value)))
  fields.append(pa.field(ROW_KEY, pa.large_list(pa.int64())))
  return pa.schema(fields)


@dataclasses.dataclass
class Piece:
  """Rows read from one part of the input: a batch, times, split, bad rows, counts."""

  batch: Any = None                      # pyarrow.RecordBatch or None
  times: Any = None                      # float64 [rows] with a time column, else None
  split: str | None = None               # the file's split (pre-split input)
  bad_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)


def parse_time(value: Any) -> float:
  """A time as seconds (or any number): int/float, decimal text or ISO 8601 (UTC)."""
  if isinstance(value, datetime.datetime):
    if value.tzinfo is None:
      value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()
  if isinstance(value, datetime.date):
    return parse_time(datetime.datetime(value.year, value.month, value.day))
  if isinstance(value, (bytes, str)):
    text = (value.decode("utf-8", errors="replace") if isinstance(value, bytes)
            else value).strip()
    try:
      number = rf.parse_dense(text)
    except ValueError:
      try:
        return parse_time(datetime.datetime.fromisoformat(text))
      except ValueError:
        raise ValueError("bad time") from None
    if number is None:
      raise ValueError("bad time")
    return number
  if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_)) and math.isfinite(float(value)):
    return float(value)
  raise ValueError("bad time")


class RowParser:
  """Parses rows (raw values in ``spec.columns`` order) into the columns of a batch.

  Hashed features get their ids here (``FIRST_ID + hash_bucket``); vocabulary
  features keep their values for tf.transform.
  """

  def __init__(self, spec: CtrSpec):
    self.spec = spec
    self._nd = len(spec.dense)
    self._nc = len(spec.categorical)
    self._nm = len(spec.multi_hot)
    self._cache: dict[str, dict[str, int]] = {n: {} for n in spec.hash_buckets}
    self.reset()

  def reset(self) -> None:
    self.labels: list[float] = []
    self.dense_index: list[int] = []
    self.dense_value: list[float] = []
    self.dense_len: list[int] = []
    self.cats: list[list[Any]] = [[] for _ in self.spec.categorical]
    self.lists: list[list[Any]] = [[] for _ in self.spec.multi_hot]
    self.list_len: list[list[int]] = [[] for _ in self.spec.multi_hot]
    self.keys: list[int] = []
    self.times: list[float] = []
    self.bad_rows: list[dict[str, Any]] = []

  def _id(self, name: str, token: str):
    if name not in self._cache:
      return token
    cache = self._cache[name]
    value = cache.get(token)
    if value is None:
      value = rf.FIRST_ID + rf.hash_bucket(token, self.spec.hash_buckets[name])
      if len(cache) < 1 << 16:
        cache[token] = value
    return value

  def add(self, values: Sequence[Any], key: int, where: str, line: int | None,
          raw: Any) -> bool:
    """Adds one row; on a bad value records it in ``bad_rows`` and returns False."""
    spec = self.spec
    try:
      label = rf.parse_label(values[0])
    except ValueError:
      return self.reject(where, line, raw, f"bad label: {values[0]!r}")
    index, dense = [], []
    for j in range(self._nd):
      v = values[1 + j]
      try:
        x = rf.parse_dense(v)
      except ValueError as e:
        return self.reject(where, line, raw, f"{e}: {spec.dense[j]} = {v!r}")
      if x is not None:
        index.append(j)
        dense.append(x)
    start = 1 + self._nd
    cats = []
    for j, name in enumerate(spec.categorical):
      v = values[start + j]
      try:
        cats.append(self._id(name, rf.categorical_token(v)))
      except ValueError:
        return self.reject(where, line, raw, f"bad categorical value: {name} = {v!r}")
    start += self._nc
    lists = []
    for j, name in enumerate(spec.multi_hot_names):
      v = values[start + j]
      try:
        lists.append([self._id(name, t) for t in rf.multi_hot_tokens(v, spec.separator)])
      except ValueError:
        return self.reject(where, line, raw, f"bad categorical value: {name} = {v!r}")
    if spec.time_column:
      v = values[start + self._nm]
      try:
        self.times.append(parse_time(v))
      except ValueError:
        return self.reject(where, line, raw, f"bad time: {spec.time_column} = {v!r}")
    self.labels.append(label)
    self.dense_index += index
    self.dense_value += dense
    self.dense_len.append(len(index))
    for j, c in enumerate(cats):
      self.cats[j].append(c)
    for j, values_ in enumerate(lists):
      self.lists[j] += values_
      self.list_len[j].append(len(values_))
    self.keys.append(key)
    return True

  def reject(self, where: str, line: int | None, raw: Any, reason: str) -> bool:
    """Records a rejected row (its raw text, or its values as JSON); returns False."""
    if not isinstance(raw, (str, bytes)):
      raw = json.dumps(raw, sort_keys=True, default=str)
    self.bad_rows.append(bad_row(where, line, raw, reason))
    return False

  def take(self, counts: dict[str, int], split: str | None = None) -> Piece:
    """The rows added since the last call, as a :class:`Piece` (then resets)."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    spec = self.spec
    n = len(self.labels)
    batch = None
    if n:
      one = pa.array(np.arange(n + 1, dtype=np.int64))

      def lists(values, lengths, value_type):
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arr = pa.array(values, pa.large_string() if value_type == pa.large_binary()
                       else value_type).cast(value_type)
        return pa.LargeListArray.from_arrays(pa.array(offsets), arr)

      arrays = [pa.LargeListArray.from_arrays(one, pa.array(self.labels, pa.float32()))]
      if self._nd:
        arrays += [lists(self.dense_index, self.dense_len, pa.int64()),
                   lists(self.dense_value, self.dense_len, pa.float32())]
      for name, values in zip(spec.categorical, self.cats):
        t = pa.int64() if spec.is_hashed(name) else pa.large_binary()
        arrays.append(lists(values, np.ones(n, np.int64), t))
      for name, values, lengths in zip(spec.multi_hot_names, self.lists, self.list_len):
        t = pa.int64() if spec.is_hashed(name) else pa.large_binary()
        arrays.append(lists(values, lengths, t))
      arrays.append(pa.LargeListArray.from_arrays(one, pa.array(self.keys, pa.int64())))
      batch = pa.RecordBatch.from_arrays(arrays, schema=arrow_schema(spec))
    times = np.asarray(self.times, np.float64) if spec.time_column else None
    counts = dict(counts, rows_quarantined=len(self.bad_rows))
    piece = Piece(batch=batch, times=times, split=split, bad_rows=self.bad_rows,
                  counts=counts)
    self.reset()
    return piece


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


def read_file(path: str, file_index: int, spec: CtrSpec, split: str | None = None,
              batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[Piece]:
  """Reads one input file into pieces (streaming).

  Args:
    path: a local or ``gs://`` path (``.gz``/``.bz2`` decompressed by name).
    file_index: the file's position in the sorted input list (row keys).
    spec: the resolved column spec.
    split: the file's split for pre-split input, else None.
    batch_rows: rows per record batch.

  Yields:
    :class:`Piece` objects whose counts sum to the file's ``rows_read``,
    ``rows_quarantined``, ``blank_lines`` and ``header_lines``.
  """
  if spec.format == "parquet":
    yield from _read_parquet(path, file_index, spec, split, batch_rows)
    return
  if spec.format == "bigquery":
    raise InputError("bigquery input is read by ReadFromBigQuery, not read_file")
  parser = RowParser(spec)
  base = file_index << ROW_FILE_SHIFT
  positions = None
  num_fields = CRITEO_FIELDS if spec.format == "criteo" else None
  sep = "\t" if spec.format == "criteo" else spec.delimiter
  for block in line_blocks(path, batch_rows):
    counts = {"rows_read": 0, "blank_lines": 0, "header_lines": 0}
    for number, text, raw in content_lines(block, counts):
      if positions is None:
        if spec.format == "criteo":
          positions = list(range(CRITEO_FIELDS))
        elif text is not None:
          names, sep, has_header = column_names("csv", path, spec.delimiter, spec.header)
          num_fields = len(names)
          missing = [c for c in spec.columns if c not in names]
          if missing:
            raise InputError(f"{path}: no column {missing[0]!r} among {names} (the "
                             "files of one input share their columns)")
          positions = [names.index(c) for c in spec.columns]
          if has_header:
            counts["header_lines"] += 1
            continue
      counts["rows_read"] += 1
      if text is None:
        parser.reject(path, number, raw, "unreadable encoding (not utf-8)")
        continue
      fields = split_fields(text, sep)
      if len(fields) != num_fields:
        parser.reject(path, number, text,
                      f"wrong field count: {len(fields)} fields, expected {num_fields}")
        continue
      parser.add([fields[p] for p in positions], base + number, path, number, text)
    yield parser.take(counts, split)


def _read_parquet(path: str, file_index: int, spec: CtrSpec, split: str | None,
                  batch_rows: int) -> Iterator[Piece]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  parser = RowParser(spec)
  base = file_index << ROW_FILE_SHIFT
  columns = list(spec.columns)
  with filesystems().open(path) as f:
    pf = pq.ParquetFile(f)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
      raise InputError(f"{path}: no column {missing[0]!r} among {pf.schema_arrow.names}")
    row = 0
    for table in pf.iter_batches(batch_size=batch_rows, columns=sorted(set(columns))):
      values = [table.column(c).to_pylist() for c in columns]
      for i, row_values in enumerate(zip(*values)):
        number = row + i + 1
        parser.add(row_values, base + number, path, number,
                   dict(zip(columns, row_values)))
      row += table.num_rows
      yield parser.take({"rows_read": table.num_rows}, split)


def records_to_piece(records: Sequence[Mapping[str, Any]], spec: CtrSpec,
                     where: str = "bigquery") -> Piece:
  """BigQuery rows (dicts) -> a piece. Row keys hash the row's content (no line order)."""
  parser = RowParser(spec)
  columns = spec.columns
  for record in records:
    missing = [c for c in columns if c not in record]
    if missing:
      raise InputError(f"{where}: no column {missing[0]!r} among {sorted(record)}")
    text = json.dumps(record, sort_keys=True, default=str)
    key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(),
                         "little") >> 1
    parser.add([record[c] for c in columns], key, where, None, text)
  return parser.take({"rows_read": len(records)})


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x) -> np.ndarray:
  """SplitMix64's finalizer: a bijective, well-mixed uint64 hash of uint64 values."""
  with np.errstate(over="ignore"):
    z = np.atleast_1d(np.asarray(x).astype(np.uint64)) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_splits(keys: np.ndarray, ratios: Sequence[float], seed: int) -> np.ndarray:
  """Split codes (0 train, 1 valid, 2 test) of rows from their keys and the seed."""
  seeded = np.asarray(keys).astype(np.uint64) ^ mix64(seed)[0]
  u = (mix64(seeded) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
  return np.searchsorted(np.cumsum(ratios)[:2], u, side="right").astype(np.int8)


def time_cutoffs(times: np.ndarray, counts: np.ndarray, ratios: Sequence[float]
                 ) -> tuple[float, float]:
  """The last train time and the last valid time, from the distinct times and counts.

  The train cutoff is the earliest time at which at least ``ratios[0]`` of the rows
  have been seen, the valid one the same at ``ratios[0] + ratios[1]``; rows at a cutoff
  go to the earlier split.
  """
  if not len(times):  # pylint: disable=g-explicit-length-test
    return 0.0, 0.0   # no row: nothing to split
  cum = np.cumsum(counts)
  total = cum[-1]
  ends = np.cumsum(ratios)[:2] * total
  idx = np.minimum(np.searchsorted(cum, ends - 1e-9, side="left"), len(times) - 1)
  return float(times[idx[0]]), float(times[idx[1]])


def time_splits(times: np.ndarray, cutoffs: tuple[float, float]) -> np.ndarray:
  """Split codes of rows from their times and :func:`time_cutoffs`."""
  return np.searchsorted(np.asarray(cutoffs), times, side="left").astype(np.int8)
