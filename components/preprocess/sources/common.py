"""The reader contract: source spec, value checks, quarantine rows, event batches.

Raw event columns (see ``trainers.features``): ``user`` and ``item`` (binary),
``timestamp`` (int64 unix seconds; 0 for formats without timestamps), optional
``category`` / ``behavior`` (binary) and ``event_order`` (int64): the file's
index in the sorted input list shifted left by 40 bits plus the event's ordinal
in its file. ``event_order`` breaks timestamp ties by input order and gives the
formats without timestamps their chronological order.

Rejected rows are dicts ``{"file", "line", "raw", "reason"}`` (:func:`bad_row`);
``line`` is the 1-based line number (the 1-based row number for Parquet, ``None``
for BigQuery). Every value the dataset cannot represent is such a row, never an
exception: timestamps that are not decimal integers, negative, outside int64 or
implausible in the run's unit (:func:`timestamp_reason`), and in the formats whose
ids are integers by definition (``INTEGER_ID_FORMATS``) ids that are not decimal
integers or lie outside int64. A reason reads ``"<kind>"`` or ``"<kind>: detail"``;
:func:`reason_kind` gives the kind that ``dataset_info.json`` counts.

Timestamps stay in the input's unit inside the pipeline (so that events in the
same second keep their order) and become seconds when examples are written; the
unit is declared or detected from a sample (:func:`detect_timestamp_unit`).
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Iterable, Sequence

from trainers import features

FORMATS = ("movielens", "ml-100k", "csv", "parquet", "pairs", "sequences", "bigquery")

# Formats whose user and item ids are integers by definition (MovieLens releases):
# a row whose id is not a decimal integer in int64 is quarantined.
INTEGER_ID_FORMATS = ("movielens", "ml-100k")

# Timestamp units of the input: seconds per unit. The dataset always holds seconds.
TIMESTAMP_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Seconds at or above this (1e11 s: the year 5138) are not plausible: in a given
# unit, values at or above MAX_SECONDS * units per second are quarantined.
MAX_SECONDS = 10**11
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Raw columns beyond the contract's names.
EVENT_ORDER = "event_order"
USER_KEY = "user_key"   # the raw user id again, passed through tf.transform untouched
ORDER_FILE_SHIFT = 40   # event_order = (file index << 40) + event ordinal in the file
OPTIONAL_COLUMNS = (features.RAW_CATEGORY, features.RAW_BEHAVIOR)

# Names a header may use for each raw column (matched case-insensitively).
COLUMN_ALIASES = {
    features.RAW_USER: ("user", "user_id", "userid", "uid", "visitorid", "reviewerid"),
    features.RAW_ITEM: ("item", "item_id", "itemid", "movie_id", "movieid", "iid",
                        "product_id", "asin"),
    features.RAW_TIMESTAMP: ("timestamp", "ts", "time", "unix_time", "unixreviewtime",
                             "event_time"),
    features.RAW_CATEGORY: ("category", "category_id", "categoryid", "cate_id", "cat"),
    features.RAW_BEHAVIOR: ("behavior", "behaviour", "behavior_type", "event", "action"),
}

DEFAULT_BATCH_ROWS = 1 << 17
MAX_RAW_CHARS = 1000  # quarantine keeps at most this much of a rejected row


class InputError(ValueError):
  """The input cannot be read as asked (missing, empty, unknown format)."""


@dataclasses.dataclass(frozen=True)
class ColumnMapping:
  """Where each raw column is in the input.

  A value is a column name (files with a header, Parquet, BigQuery) or a
  0-based column index as a string or int (files without a header; negative
  counts from the end). ``None`` means: the format's default (user and item by
  the known names, or columns 0 and 1; timestamp by name, or the last column),
  and for category/behavior, absent.
  """

  user: str | int | None = None
  item: str | int | None = None
  timestamp: str | int | None = None
  category: str | int | None = None
  behavior: str | int | None = None

  def get(self, column: str):
    return getattr(self, column)

  def to_dict(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """How to read the input files."""

  format: str
  columns: ColumnMapping = ColumnMapping()
  delimiter: str | None = None   # csv: None = from the extension / first line
  header: bool | None = None     # csv: None = detect from the first line
  encoding: str = "utf-8"
  # The unit of integer timestamps (a key of TIMESTAMP_UNITS), or None before it
  # is known (the detection sample): then no upper bound is applied and typed
  # timestamp columns are read in seconds.
  timestamp_unit: str | None = None

  @property
  def side_columns(self) -> tuple[str, ...]:
    return tuple(c for c in OPTIONAL_COLUMNS if self.columns.get(c) is not None)

  @property
  def has_timestamps(self) -> bool:
    return self.format not in ("pairs", "sequences")

  @property
  def integer_ids(self) -> bool:
    return self.format in INTEGER_ID_FORMATS

# ---------------------------------------------------------------------------
# Value checks and the timestamp unit
# ---------------------------------------------------------------------------


def parse_int(text: str) -> int | None:
  """The value of a decimal integer (optional sign, ASCII digits), else None.

  Stricter than ``int()``, which also takes ``"1_000"`` and non-ASCII digits.
  The value is unbounded: callers check the int64 range.
  """
  s = text.strip()
  digits = s[1:] if s[:1] in ("+", "-") else s
  if not (digits.isascii() and digits.isdigit()):
    return None
  return int(s)


def id_reason(text: str, label: str) -> str | None:
  """Why an id of an integer-id format cannot be kept, or None."""
  value = parse_int(text)
  if value is None:
    return f"non-numeric {label}"
  if not INT64_MIN <= value <= INT64_MAX:
    return f"{label} out of int64 range"
  return None


def timestamp_reason(value: int, unit: str | None) -> str | None:
  """Why an integer timestamp in ``unit`` cannot be kept, or None.

  Timestamps must fit int64, be non-negative and, once the unit is known, lie
  below ``MAX_SECONDS`` (the year 5138) in seconds: a millisecond value among
  seconds is out of range rather than a date 50,000 years ahead.
  """
  if not INT64_MIN <= value <= INT64_MAX:
    return "timestamp out of int64 range"
  if value < 0:
    return "negative timestamp"
  if unit is not None and value >= MAX_SECONDS * TIMESTAMP_UNITS[unit]:
    return (f"timestamp out of range: {value} {unit} is after the year 5138; "
            "check --timestamp-unit")
  return None


def reason_kind(reason: str) -> str:
  """The kind of a quarantine reason (the text before its first ':')."""
  return reason.split(":", 1)[0]


def detect_timestamp_unit(timestamps: Sequence[int]) -> tuple[str, float | None]:
  """The unit of integer unix timestamps from the magnitude of their median.

  Rule: median < 1e11 -> seconds (1e11 s is the year 5138), < 1e14 -> milliseconds,
  < 1e17 -> microseconds, else nanoseconds. Each bound is 1e11 seconds in the
  smaller unit and March 1973 in the larger one, so any date from 1973 to 5138 is
  read right. Timestamps counted from some other origin (e.g. milliseconds
  since the start of an experiment, below 1e11) need ``--timestamp-unit``.

  Returns:
    The unit (a key of ``TIMESTAMP_UNITS``) and the median (None without values,
    which counts as seconds).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  if len(timestamps) == 0:  # pylint: disable=g-explicit-length-test
    return "s", None
  median = float(np.median(np.asarray(timestamps, dtype=np.int64)))
  for unit, bound in (("s", 1e11), ("ms", 1e14), ("us", 1e17)):
    if median < bound:
      return unit, median
  return "ns", median


# ---------------------------------------------------------------------------
# What a reader yields: chunks of event batches and quarantine rows
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Chunk:
  """What reading one part of a file yields: a batch, rejected rows, counts."""

  batch: Any = None                     # pyarrow.RecordBatch or None
  bad_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)


def bad_row(path: str, line: int | None, raw: str | bytes, reason: str) -> dict[str, Any]:
  """A quarantine row: where the row was, what it held (truncated) and why it is rejected."""
  if isinstance(raw, bytes):
    raw = raw.decode("utf-8", errors="backslashreplace")
  return {"file": path, "line": line, "raw": raw[:MAX_RAW_CHARS], "reason": reason}


def raw_arrow_schema(side_columns: Sequence[str] = ()):
  """The Arrow schema of raw event batches (every column a list of one value)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  fields = [pa.field(features.RAW_USER, pa.large_list(pa.large_binary())),
            pa.field(features.RAW_ITEM, pa.large_list(pa.large_binary())),
            pa.field(features.RAW_TIMESTAMP, pa.large_list(pa.int64())),
            pa.field(EVENT_ORDER, pa.large_list(pa.int64()))]
  fields += [pa.field(c, pa.large_list(pa.large_binary())) for c in side_columns]
  fields.append(pa.field(USER_KEY, pa.large_list(pa.large_binary())))
  return pa.schema(fields)


def make_batch(cols: dict[str, Any], side_columns: Sequence[str] = ()):
  """Builds a raw-event record batch from equal-length columns (lists or arrays)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  schema = raw_arrow_schema(side_columns)
  n = len(cols[features.RAW_USER])
  offsets = pa.array(np.arange(n + 1, dtype=np.int64))
  arrays = []
  for field in schema:
    if field.name == USER_KEY:
      arrays.append(arrays[0])  # same buffers as the user column
      continue
    values = cols[field.name]
    value_type = field.type.value_type
    if not isinstance(values, pa.Array):
      values = pa.array(values, type=pa.large_string() if value_type == pa.large_binary()
                        else value_type)
    arrays.append(pa.LargeListArray.from_arrays(offsets, values.cast(value_type)))
  return pa.RecordBatch.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------------------
# Files (local or gs://, through Beam's FileSystems)
# ---------------------------------------------------------------------------


def filesystems():
  """Beam's ``FileSystems`` (imported on first use: Beam is heavy)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return FileSystems


def iter_jsonl(path: str) -> Iterable[dict[str, Any]]:
  """The records of a JSON-lines file (local or gs://), skipping blank lines."""
  with filesystems().open(path) as f:
    for line in io.TextIOWrapper(f, encoding="utf-8"):
      if line.strip():
        yield json.loads(line)
