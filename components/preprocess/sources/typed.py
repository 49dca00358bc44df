"""Typed columns (Parquet, BigQuery): column names, then values checked as Arrow arrays."""

from __future__ import annotations

import json
from typing import Any, Sequence

from components.preprocess.sources.common import (
    COLUMN_ALIASES, EVENT_ORDER, INT64_MAX, MAX_SECONDS, ORDER_FILE_SHIFT, TIMESTAMP_UNITS,
    Chunk, InputError, SourceSpec, bad_row, make_batch, parse_int, timestamp_reason)
from trainers import features


def named_columns(spec: SourceSpec, names: Sequence[str], where: str) -> dict[str, str]:
  """Maps raw columns to the input's column names (Parquet, BigQuery)."""
  lower = {n.lower(): n for n in names}
  out = {}
  wanted = [features.RAW_USER, features.RAW_ITEM]
  if spec.has_timestamps:
    wanted.append(features.RAW_TIMESTAMP)
  wanted += list(spec.side_columns)
  for column in wanted:
    want = spec.columns.get(column)
    candidates = [str(want)] if want is not None else list(COLUMN_ALIASES[column])
    for c in candidates:
      if c in names or c.lower() in lower:
        out[column] = c if c in names else lower[c.lower()]
        break
    else:
      raise InputError(f"{where}: no {column} column among {list(names)}: pass "
                       f"--{column}-col NAME")
  return out


def validate_columns(cols, spec: SourceSpec, where: str, file_index: int,
                      first_row: int, source_rows: bool) -> Chunk:
  """Checks typed columns (Parquet/BigQuery), splits good events from bad rows."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
  n = len(cols[features.RAW_USER])
  reasons = np.full(n, None, dtype=object)
  out = {}
  for column in (features.RAW_USER, features.RAW_ITEM, *spec.side_columns):
    arr = cols[column]
    if pa.types.is_dictionary(arr.type):
      arr = arr.dictionary_decode()
    arr = arr.cast(pa.large_string())
    arr = pc.utf8_trim_whitespace(arr)
    empty = pc.fill_null(pc.equal(pc.utf8_length(arr), 0), True).to_numpy(zero_copy_only=False)
    label = "user id" if column == features.RAW_USER else (
        "item id" if column == features.RAW_ITEM else column)
    reasons[(reasons == None) & empty] = f"empty {label}"  # pylint: disable=singleton-comparison
    out[column] = arr
  if spec.has_timestamps:
    ts, ts_reasons = _timestamps_to_int(cols[features.RAW_TIMESTAMP], spec.timestamp_unit)
    free = (reasons == None) & (ts_reasons != None)  # pylint: disable=singleton-comparison
    reasons[free] = ts_reasons[free]
    out[features.RAW_TIMESTAMP] = ts
  else:
    out[features.RAW_TIMESTAMP] = np.zeros(n, dtype=np.int64)
  bad_mask = reasons != None  # pylint: disable=singleton-comparison
  good = ~bad_mask
  bad_rows = []
  if bad_mask.any():
    idx = np.flatnonzero(bad_mask)
    raw_cols = {c: _raw_values(cols[c].take(pa.array(idx))) for c in cols}
    for j, i in enumerate(idx):
      raw = json.dumps({c: _jsonable(v[j]) for c, v in raw_cols.items()}, sort_keys=True)
      bad_rows.append(bad_row(where, first_row + int(i) + 1 if source_rows else None, raw,
                           reasons[i]))
  base = file_index << ORDER_FILE_SHIFT
  kept = np.flatnonzero(good)
  batch_cols = {
      features.RAW_USER: out[features.RAW_USER].filter(pa.array(good)),
      features.RAW_ITEM: out[features.RAW_ITEM].filter(pa.array(good)),
      features.RAW_TIMESTAMP: pa.array(out[features.RAW_TIMESTAMP][good], pa.int64()),
      EVENT_ORDER: pa.array(base + first_row + kept, pa.int64()) if source_rows
      else pa.array(np.zeros(len(kept), np.int64)),
  }
  for c in spec.side_columns:
    batch_cols[c] = out[c].filter(pa.array(good))
  counts = {"rows_read": n, "rows_quarantined": len(bad_rows)}
  return Chunk(batch=make_batch(batch_cols, spec.side_columns) if len(kept) else None,
               bad_rows=bad_rows, counts=counts)


def _raw_values(arr) -> list[Any]:
  """Python values of a column for quarantine rows (dates beyond Python's as text)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
    return arr.cast(pa.string()).to_pylist()
  return arr.to_pylist()


def _jsonable(v):
  if isinstance(v, bytes):
    return v.decode("utf-8", errors="backslashreplace")
  if isinstance(v, (str, int, float, bool)) or v is None:
    return v
  return str(v)


def _timestamps_to_int(arr, unit: str | None):
  """Int64 timestamps in ``unit`` and a reason per row (None: kept) from a column.

  Typed (timestamp, date) columns are converted to ``unit`` (seconds while the
  unit is unknown), flooring finer parts; integer, float and text columns are
  taken as numbers in ``unit``. Values that do not fit int64 (uint64 above
  2**63, huge floats, long digit strings) get a reason instead of an error.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
  n = len(arr)
  reasons = np.full(n, None, dtype=object)
  if pa.types.is_dictionary(arr.type):
    arr = arr.dictionary_decode()
  if pa.types.is_date(arr.type):
    arr = pc.cast(arr, pa.timestamp("s"), safe=False)
  if pa.types.is_timestamp(arr.type):
    have, want = TIMESTAMP_UNITS[arr.type.unit], TIMESTAMP_UNITS[unit or "s"]
    arr = pc.cast(arr, pa.int64())  # counts of the column's own unit since the epoch
    if want > have:  # to a finer unit: values that would overflow are out of range
      factor = want // have
      limit = INT64_MAX // factor
      fits = pc.fill_null(pc.and_(pc.less_equal(arr, limit), pc.greater_equal(arr, -limit)),
                          True)
      reasons[~fits.to_numpy(zero_copy_only=False)] = "timestamp out of int64 range"
      arr = pc.multiply(pc.if_else(fits, arr, None), factor)
    elif want < have:  # floor (pyarrow's cast truncates toward zero)
      values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False) // (have // want)
      arr = pc.if_else(pc.is_null(arr), None, pa.array(values, pa.int64()))
  elif pa.types.is_unsigned_integer(arr.type):
    fits = pc.fill_null(pc.less_equal(arr, pa.scalar(INT64_MAX, arr.type)), True)
    reasons[~fits.to_numpy(zero_copy_only=False)] = "timestamp out of int64 range"
    arr = pc.if_else(fits, arr, None).cast(pa.int64())
  elif pa.types.is_floating(arr.type):
    null = pc.is_null(arr).to_numpy(zero_copy_only=False)
    whole = pc.fill_null(pc.equal(pc.floor(arr), arr), False).to_numpy(zero_copy_only=False)
    reasons[~whole & ~null] = "non-numeric timestamp"  # fractional, NaN or infinite
    # 2**63 is exact as a float and the first value above int64.
    fits = pc.fill_null(pc.and_(pc.greater_equal(arr, -2.0**63), pc.less(arr, 2.0**63)),
                        False).to_numpy(zero_copy_only=False)
    reasons[whole & ~fits] = "timestamp out of int64 range"
    arr = pc.if_else(pa.array(whole & fits), arr, None).cast(pa.int64())
  elif pa.types.is_integer(arr.type):
    arr = arr.cast(pa.int64())
  else:
    values = arr.cast(pa.large_string()).to_pylist()
    out = np.zeros(n, dtype=np.int64)
    for i, v in enumerate(values):
      parsed = None if v is None else parse_int(v)
      reason = "non-numeric timestamp" if parsed is None else timestamp_reason(parsed, unit)
      if reason is None:
        out[i] = parsed
      else:
        reasons[i] = reason
    return out, reasons
  null = pc.is_null(arr).to_numpy(zero_copy_only=False)
  out = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).astype(np.int64)
  reasons[null & (reasons == None)] = "non-numeric timestamp"  # pylint: disable=singleton-comparison
  bound = min(MAX_SECONDS * TIMESTAMP_UNITS[unit], INT64_MAX) if unit else INT64_MAX
  suspect = (reasons == None) & ((out < 0) | (out >= bound))  # pylint: disable=singleton-comparison
  for i in np.flatnonzero(suspect):
    reasons[i] = timestamp_reason(int(out[i]), unit)
  return out, reasons
