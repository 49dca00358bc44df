"""Raw event sources: input resolution, format detection and row parsing.

Every file format is read by one streaming function, :func:`read_file`, that
turns a file (local path or ``gs://``, plain, gzipped, or a member of an
official MovieLens ``.zip``) into Arrow record batches of raw events plus the
rejected rows with their reasons. The Beam pipeline calls it in a ``DoFn`` (one
element per file); tests call it directly. BigQuery rows come as dicts from
``ReadFromBigQuery`` and go through :func:`records_to_batch`.

Raw event columns (see ``trainers.features``): ``user`` and ``item`` (binary),
``timestamp`` (int64 unix seconds; 0 for formats without timestamps), optional
``category`` / ``behavior`` (binary) and ``event_order`` (int64): the file's
index in the sorted input list shifted left by 40 bits plus the event's ordinal
in its file. ``event_order`` breaks timestamp ties by input order and gives the
formats without timestamps their chronological order.

Rejected rows are dicts ``{"file", "line", "raw", "reason"}``; ``line`` is the
1-based line number (the 1-based row number for Parquet, ``None`` for BigQuery).
Every value the dataset cannot represent is such a row, never an exception:
timestamps that are not decimal integers, negative, outside int64 or implausible
in the run's unit (:func:`timestamp_reason`), and in the formats whose ids are
integers by definition (``INTEGER_ID_FORMATS``) ids that are not decimal
integers or lie outside int64. A reason reads ``"<kind>"`` or ``"<kind>: detail"``;
:func:`reason_kind` gives the kind that ``dataset_info.json`` counts.

Timestamps stay in the input's unit inside the pipeline (so that events in the
same second keep their order) and become seconds when examples are written; the
unit is declared or detected from a sample (:func:`detect_timestamp_unit`).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import os
import posixpath
import zipfile
from typing import Any, Iterable, Iterator, Sequence

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
SAMPLE_ROWS = 100_000   # rows read before the job to detect the timestamp unit
SAMPLE_FILES = 8        # from at most this many input files

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

# File names of the official MovieLens releases (also as zip members).
MOVIELENS_FILES = {"ratings.dat": "movielens", "u.data": "ml-100k", "ratings.csv": "csv"}

READ_CHUNK_BYTES = 8 << 20
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


def sample_timestamps(files: Sequence[str], spec: SourceSpec,
                      max_rows: int = SAMPLE_ROWS) -> list[int]:
  """Valid timestamps of the first rows of the first input files (unit detection).

  Reads up to ``max_rows`` rows spread over the first ``SAMPLE_FILES`` files with
  the job's own reader (bad rows are skipped, as the job quarantines them).
  """
  spec = dataclasses.replace(spec, timestamp_unit=None)
  picked = list(files[:SAMPLE_FILES])
  per_file = max(1, max_rows // max(1, len(picked)))
  out: list[int] = []
  for index, path in enumerate(picked):
    rows = 0
    for chunk in read_file(path, index, spec, batch_rows=per_file):
      if chunk.batch is not None:
        out += chunk.batch.column(features.RAW_TIMESTAMP).flatten().to_pylist()
      rows += chunk.counts.get("rows_read", 0)
      if rows >= per_file:
        break
  return out


# ---------------------------------------------------------------------------
# Input resolution and format detection
# ---------------------------------------------------------------------------


def _filesystems():
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return FileSystems


def resolve_input(input_path: str, fmt: str | None = None) -> list[tuple[str, int]]:
  """Expands a file, glob or MovieLens folder into sorted ``(path, size)``.

  Args:
    input_path: a file, a glob or a folder.
    fmt: ``--format``, if given: a folder then yields its ratings files of that
      format only.

  Raises:
    InputError: nothing matches, or a folder holds no known ratings file, or
      ratings files of more than one format (without ``fmt``).
  """
  fs = _filesystems()
  path = input_path.rstrip("/") if input_path not in ("/",) else input_path
  has_glob = any(ch in path for ch in "*?[")
  if not has_glob:
    if _is_dir(path):
      return _movielens_folder(path, fmt)
    matched = [m for m in fs.match([path])[0].metadata_list
               if m.path.rstrip("/") == path]
    if matched:
      return [(matched[0].path, matched[0].size_in_bytes)]
    raise InputError(
        f"--input {input_path!r} does not exist: pass a file, a glob (e.g. "
        "'data/*.csv') or a MovieLens folder as unpacked from the official zip")
  matched = fs.match([path])[0].metadata_list
  files = sorted((m.path, m.size_in_bytes) for m in matched
                 if not m.path.endswith("/"))
  if not files:
    raise InputError(f"--input glob {input_path!r} matches no file")
  return files


def _is_dir(path: str) -> bool:
  if "://" in path:
    fs = _filesystems()
    return bool(fs.match([path + "/*"])[0].metadata_list)
  return os.path.isdir(path)


# Ratings files a folder may hold (a partial copy may name its file differently,
# e.g. ratings_users1-2999.dat.gz), with their format.
FOLDER_PATTERNS = (("u.data", "ml-100k"), ("u.data.gz", "ml-100k"),
                   ("ratings*.dat", "movielens"), ("ratings*.dat.gz", "movielens"),
                   ("ratings*.csv", "csv"), ("ratings*.csv.gz", "csv"))


def _movielens_folder(folder: str, fmt: str | None = None) -> list[tuple[str, int]]:
  """The ratings files of a folder: all of them, when they share one format.

  A folder with files of two formats (``u.data`` and ``ratings.csv``) is an
  error rather than a guess, as is a file next to its gzipped copy.
  """
  fs = _filesystems()
  listing = {posixpath.basename(m.path): (m.path, m.size_in_bytes)
             for m in fs.match([folder + "/*"])[0].metadata_list}
  found: dict[str, str] = {}  # name -> format
  for name in sorted(listing):
    for pattern, f in FOLDER_PATTERNS:
      if fnmatch.fnmatch(name, pattern):
        found[name] = f
        break
  if not found:
    raise InputError(
        f"folder {folder!r} holds no MovieLens ratings file (ratings.dat, u.data, "
        "ratings.csv): pass the file itself with --input, or a glob")
  if fmt is not None:
    found = {n: f for n, f in found.items() if f == fmt}
    if not found:
      raise InputError(f"folder {folder!r} holds no ratings file of --format {fmt}")
  if len(set(found.values())) > 1:
    listed = ", ".join(f"{n} ({f})" for n, f in found.items())
    raise InputError(
        f"folder {folder!r} holds ratings files of {len(set(found.values()))} formats: "
        f"{listed}. Pass a single file with --input, or --format to read the files of "
        "one format")
  for name in found:
    if name.endswith(".gz") and name[:-3] in found:
      raise InputError(f"folder {folder!r} holds both {name[:-3]} and {name}: pass "
                       "one of them with --input")
  return [listing[n] for n in found]


def detect_format(path: str) -> str:
  """The format of one input file from its name.

  Raises:
    InputError: the name does not tell; the message lists the ``--format`` values.
  """
  name = posixpath.basename(path).lower()
  for suffix in (".gz", ".gzip", ".bz2", ".zst"):
    if name.endswith(suffix):
      name = name[: -len(suffix)]
  if name.endswith(".zip"):
    return "movielens-zip"
  if name == "u.data" or (name.startswith("u") and name.endswith((".base", ".test"))):
    return "ml-100k"
  if name.endswith(".dat"):
    return "movielens"
  if name.endswith((".csv", ".tsv")):
    return "csv"
  if name.endswith((".parquet", ".pq")):
    return "parquet"
  raise InputError(
      f"cannot tell the format of {path!r} from its name: pass --format with one "
      f"of {', '.join(FORMATS)} (pairs = 'user item' per line as in the SASRec/"
      "BERT4Rec releases; sequences = 'user item item ...' per line as in S3Rec/ICLRec)")


def resolve_format(files: Sequence[tuple[str, int]], fmt: str | None) -> str:
  """The single format of all files (``--format`` or detected from the names)."""
  if fmt is not None:
    if fmt not in FORMATS:
      raise InputError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt
  found = {}
  for path, _ in files:
    f = detect_format(path)
    if f == "movielens-zip":
      f = _zip_member(path)[1]
    found[path] = f
  if len(set(found.values())) > 1:
    listed = ", ".join(f"{p} ({f})" for p, f in list(found.items())[:10])
    raise InputError(f"input files have mixed formats {sorted(set(found.values()))}: "
                     f"{listed}. Pass one format's files (a single file or a narrower "
                     "glob) and --format")
  return found.popitem()[1]


def _zip_member(path: str) -> tuple[str, str]:
  """The ratings member of an official MovieLens zip and its format."""
  with _filesystems().open(path) as f, zipfile.ZipFile(f) as z:
    names = z.namelist()
  found = [(n, MOVIELENS_FILES[posixpath.basename(n)]) for n in sorted(names)
           if posixpath.basename(n) in MOVIELENS_FILES]
  if len({f for _, f in found}) > 1:
    raise InputError(f"{path} holds ratings files of several formats: "
                     f"{', '.join(f'{n} ({f})' for n, f in found)}. Unpack it and pass "
                     "a single file with --input")
  if found:
    return found[0]
  raise InputError(f"{path} has no ratings.dat, u.data or ratings.csv member: "
                   "pass the unpacked ratings file with --input")


# ---------------------------------------------------------------------------
# Line-oriented parsing
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Chunk:
  """What reading one part of a file yields: a batch, rejected rows, counts."""

  batch: Any = None                     # pyarrow.RecordBatch or None
  bad_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)


def _open_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """Yields ``(line number, raw line bytes)`` of a file, streaming."""
  fs = _filesystems()
  if path.lower().endswith(".zip"):
    member, _ = _zip_member(path)
    with fs.open(path) as f, zipfile.ZipFile(f) as z, z.open(member) as m:
      yield from _split_lines(m)
    return
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
  with fs.open(path, compression_type=CompressionTypes.AUTO) as f:
    yield from _split_lines(f)


def _split_lines(stream) -> Iterator[tuple[int, bytes]]:
  rest = b""
  number = 0
  while True:
    block = stream.read(READ_CHUNK_BYTES)
    if not block:
      break
    lines = (rest + block).split(b"\n")
    rest = lines.pop()
    for line in lines:
      number += 1
      yield number, line
  if rest:
    yield number + 1, rest


def _line_blocks(path: str, block_lines: int) -> Iterator[list[tuple[int, str | None, bytes]]]:
  """Groups lines into blocks of ``(number, text or None if undecodable, raw)``."""
  block: list[tuple[int, bytes]] = []

  def decode(items):
    raw = b"\n".join(line for _, line in items)
    try:
      texts = raw.decode("utf-8").split("\n")
      return [(n, t, line) for (n, line), t in zip(items, texts)]
    except UnicodeDecodeError:
      out = []
      for n, line in items:
        try:
          out.append((n, line.decode("utf-8"), line))
        except UnicodeDecodeError:
          out.append((n, None, line))
      return out

  for item in _open_lines(path):
    block.append(item)
    if len(block) >= block_lines:
      yield decode(block)
      block = []
  if block:
    yield decode(block)


def _bad(path: str, line: int | None, raw: str | bytes, reason: str) -> dict[str, Any]:
  if isinstance(raw, bytes):
    raw = raw.decode("utf-8", errors="backslashreplace")
  return {"file": path, "line": line, "raw": raw[:MAX_RAW_CHARS], "reason": reason}


class _Layout:
  """Field positions of a delimited format, fixed from its first line."""

  def __init__(self, spec: SourceSpec, path: str, first_fields: list[str] | None):
    self.fmt = spec.format
    self.sep = None
    self.header = False
    self.num_fields = None  # exact field count, or None (sequences: >= 2)
    if self.fmt == "movielens":
      self.sep, self.num_fields = "::", 4
      self.pos = {features.RAW_USER: 0, features.RAW_ITEM: 1, features.RAW_TIMESTAMP: 3}
    elif self.fmt == "ml-100k":
      self.sep, self.num_fields = "\t", 4
      self.pos = {features.RAW_USER: 0, features.RAW_ITEM: 1, features.RAW_TIMESTAMP: 3}
    elif self.fmt == "pairs":
      self.num_fields = 2
      self.pos = {features.RAW_USER: 0, features.RAW_ITEM: 1}
    elif self.fmt == "sequences":
      self.pos = {features.RAW_USER: 0}
    else:  # csv
      self._csv_layout(spec, path, first_fields or [])

  def _csv_layout(self, spec: SourceSpec, path: str, first: list[str]):
    self.sep = spec.delimiter
    names = [f.strip().strip('"').lower() for f in first]
    cols = spec.columns
    named = any(cols.get(c) is not None and not _is_index(cols.get(c))
                for c in COLUMN_ALIASES)
    if spec.header is None:
      known = {a for aliases in COLUMN_ALIASES.values() for a in aliases}
      self.header = named or any(n in known for n in names)
    else:
      self.header = spec.header
    self.num_fields = len(first)
    self.pos = {}
    for column in (features.RAW_USER, features.RAW_ITEM, features.RAW_TIMESTAMP,
                   *OPTIONAL_COLUMNS):
      want = cols.get(column)
      if want is None and column in OPTIONAL_COLUMNS:
        continue
      self.pos[column] = self._position(column, want, names, path)

  def _position(self, column, want, names, path) -> int:
    n = self.num_fields
    if want is not None and _is_index(want):
      i = int(want)
      if not -n <= i < n:
        raise InputError(f"{path}: column index {i} for {column} is out of range "
                         f"(the first row has {n} fields)")
      return i % n
    if self.header:
      candidates = [str(want).lower()] if want is not None else COLUMN_ALIASES[column]
      for c in candidates:
        if c in names:
          return names.index(c)
      raise InputError(
          f"{path}: no {column} column in header {names}: pass --{column}-col NAME")
    if want is not None:
      raise InputError(f"{path}: the file has no header, so --{column}-col must be "
                       f"a 0-based column index, not {want!r}")
    return {features.RAW_USER: 0, features.RAW_ITEM: 1, features.RAW_TIMESTAMP: n - 1}[column]


def _is_index(value) -> bool:
  if isinstance(value, int):
    return True
  try:
    int(value)
    return True
  except (TypeError, ValueError):
    return False


def _sniff_delimiter(path: str, first_line: str) -> str:
  name = path.lower()
  if ".tsv" in name or "\t" in first_line:
    return "\t"
  if ".csv" in name or "," in first_line:
    return ","
  for sep in (";", "|", " "):
    if sep in first_line:
      return sep
  return ","


def read_file(
    path: str,
    file_index: int,
    spec: SourceSpec,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[Chunk]:
  """Reads one input file into chunks of raw events (streaming).

  Args:
    path: a local or ``gs://`` path (``.gz``/``.bz2`` decompressed by name,
      ``.zip`` read through its MovieLens ratings member).
    file_index: the file's position in the sorted input list (``event_order``).
    spec: format and column mapping.
    batch_rows: events per record batch.

  Yields:
    :class:`Chunk` objects; their counts sum to the file's ``rows_read``,
    ``rows_quarantined``, ``blank_lines`` and ``header_lines``.
  """
  if spec.format == "parquet":
    yield from _read_parquet(path, file_index, spec, batch_rows)
    return
  if spec.format == "bigquery":
    raise InputError("bigquery input is read by ReadFromBigQuery, not read_file")
  layout = None
  ordinal = 0
  base = file_index << ORDER_FILE_SHIFT
  side = spec.side_columns
  for block in _line_blocks(path, batch_rows):
    cols = {features.RAW_USER: [], features.RAW_ITEM: [], features.RAW_TIMESTAMP: [],
            EVENT_ORDER: [], **{c: [] for c in side}}
    users, items, stamps, orders = (cols[features.RAW_USER], cols[features.RAW_ITEM],
                                    cols[features.RAW_TIMESTAMP], cols[EVENT_ORDER])
    extra = [(cols[c], None) for c in side]
    bad: list[dict[str, Any]] = []
    counts = {"rows_read": 0, "rows_quarantined": 0, "blank_lines": 0, "header_lines": 0}
    for number, text, raw in block:
      if text is not None:
        text = text.rstrip("\r")
        if not text.strip():
          counts["blank_lines"] += 1
          continue
      if layout is None:
        if text is None:
          counts["rows_read"] += 1
          bad.append(_bad(path, number, raw, "unreadable encoding (not utf-8)"))
          continue
        layout = _make_layout(spec, path, text)
        extra = [(cols[c], layout.pos[c]) for c in side]
        if layout.header:
          counts["header_lines"] += 1
          continue
      counts["rows_read"] += 1
      if text is None:
        bad.append(_bad(path, number, raw, "unreadable encoding (not utf-8)"))
        continue
      reason = None
      if layout.sep is None:
        fields = text.split()
      elif '"' in text and layout.fmt == "csv":
        fields = next(csv.reader([text], delimiter=layout.sep))
      else:
        fields = text.split(layout.sep)
      nf = len(fields)
      if layout.num_fields is not None and nf != layout.num_fields:
        reason = f"wrong field count: {nf} fields, expected {layout.num_fields}"
      elif layout.fmt == "sequences":
        if nf < 2:
          reason = "no items after the user id"
        elif not fields[0]:
          reason = "empty user id"
        else:
          user = fields[0]
          for item in fields[1:]:
            users.append(user)
            items.append(item)
            stamps.append(0)
            orders.append(base + ordinal)
            ordinal += 1
          continue
      if reason is None:
        pos = layout.pos
        user = fields[pos[features.RAW_USER]].strip()
        item = fields[pos[features.RAW_ITEM]].strip()
        ts = 0
        if not user:
          reason = "empty user id"
        elif not item:
          reason = "empty item id"
        elif spec.integer_ids:
          reason = id_reason(user, "user id") or id_reason(item, "item id")
        if reason is None and features.RAW_TIMESTAMP in pos:
          ts = parse_int(fields[pos[features.RAW_TIMESTAMP]])
          reason = ("non-numeric timestamp" if ts is None
                    else timestamp_reason(ts, spec.timestamp_unit))
      if reason is not None:
        bad.append(_bad(path, number, text, reason))
        continue
      users.append(user)
      items.append(item)
      stamps.append(ts)
      orders.append(base + ordinal)
      ordinal += 1
      for values, p in extra:
        values.append(fields[p].strip())
    counts["rows_quarantined"] = len(bad)
    yield Chunk(batch=make_batch(cols, side) if users else None, bad_rows=bad,
                counts=counts)


def _make_layout(spec: SourceSpec, path: str, first_line: str) -> _Layout:
  if spec.format != "csv":
    return _Layout(spec, path, None)
  sep = spec.delimiter or _sniff_delimiter(path, first_line)
  spec = dataclasses.replace(spec, delimiter=sep)
  first = next(csv.reader([first_line], delimiter=sep)) if '"' in first_line \
      else first_line.split(sep)
  return _Layout(spec, path, first)


# ---------------------------------------------------------------------------
# Record batches
# ---------------------------------------------------------------------------


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


def _read_parquet(path: str, file_index: int, spec: SourceSpec,
                  batch_rows: int) -> Iterator[Chunk]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  with _filesystems().open(path) as f:
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    mapping = _named_columns(spec, names, path)
    row = 0
    for table_batch in pf.iter_batches(batch_size=batch_rows,
                                       columns=sorted(set(mapping.values()))):
      cols = {c: table_batch.column(mapping[c]) for c in mapping}
      chunk = _validate_columns(cols, spec, path, file_index, row, source_rows=True)
      row += table_batch.num_rows
      yield chunk


def _named_columns(spec: SourceSpec, names: Sequence[str], where: str) -> dict[str, str]:
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


def _validate_columns(cols, spec: SourceSpec, where: str, file_index: int,
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
      bad_rows.append(_bad(where, first_row + int(i) + 1 if source_rows else None, raw,
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


def records_to_batch(records: Sequence[dict[str, Any]], spec: SourceSpec,
                     where: str) -> Chunk:
  """Validates BigQuery rows (dicts) into a raw-event chunk."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  names = list(records[0].keys()) if records else []
  mapping = _named_columns(spec, names, where)
  cols = {}
  for c, name in mapping.items():
    values = [r.get(name) for r in records]
    try:
      cols[c] = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed or huge: as text
      cols[c] = pa.array([None if v is None else str(v) for v in values], pa.large_string())
  return _validate_columns(cols, spec, where, 0, 0, source_rows=False)


# ---------------------------------------------------------------------------
# BigQuery
# ---------------------------------------------------------------------------


def bigquery_read(input_ref: str, *, method: str = "DIRECT_READ",
                  temp_dataset: str | None = None, project: str | None = None):
  """The ``ReadFromBigQuery`` transform for a table or a standard-SQL query.

  Args:
    input_ref: ``bq://project.dataset.table``, ``project:dataset.table``,
      ``project.dataset.table`` or a ``SELECT ...`` query.
    method: ``DIRECT_READ`` (Storage Read API) or ``EXPORT`` (needs a GCS
      temp location in the pipeline options).
    temp_dataset: dataset for query results (``project.dataset``), optional.
    project: billing project for the read.
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  ref = input_ref.strip()
  kwargs: dict[str, Any] = {"method": getattr(beam.io.ReadFromBigQuery.Method, method)}
  if project:
    kwargs["project"] = project
  if ref.lower().startswith(("select ", "with ")) or " " in ref:
    kwargs.update(query=ref, use_standard_sql=True)
    if temp_dataset:
      from apache_beam.io.gcp.internal.clients import bigquery as bq  # pylint: disable=g-import-not-at-top
      p, d = temp_dataset.split(".", 1)
      kwargs["temp_dataset"] = bq.DatasetReference(projectId=p, datasetId=d)
  else:
    kwargs["table"] = table_spec(ref)
  return beam.io.ReadFromBigQuery(**kwargs)


def table_spec(ref: str) -> str:
  """``bq://p.d.t`` / ``p.d.t`` / ``p:d.t`` -> ``p:d.t`` (Beam's table spec)."""
  if ref.startswith("bq://"):
    ref = ref[len("bq://"):]
  if ":" in ref:
    return ref
  parts = ref.split(".")
  if len(parts) != 3 or not all(parts):
    raise InputError(f"BigQuery table {ref!r} must be project.dataset.table "
                     "(or bq://project.dataset.table, or a SELECT query)")
  return f"{parts[0]}:{parts[1]}.{parts[2]}"


def is_bigquery_ref(input_ref: str) -> bool:
  ref = input_ref.strip().lower()
  return ref.startswith(("bq://", "select ", "with "))


def read_text(path: str) -> str:
  """Whole small text file (local or gs://)."""
  with _filesystems().open(path) as f:
    return io.TextIOWrapper(f, encoding="utf-8").read()


def iter_jsonl(path: str) -> Iterable[dict[str, Any]]:
  with _filesystems().open(path) as f:
    for line in io.TextIOWrapper(f, encoding="utf-8"):
      if line.strip():
        yield json.loads(line)
