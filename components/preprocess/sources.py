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

  @property
  def side_columns(self) -> tuple[str, ...]:
    return tuple(c for c in OPTIONAL_COLUMNS if self.columns.get(c) is not None)

  @property
  def has_timestamps(self) -> bool:
    return self.format not in ("pairs", "sequences")


# ---------------------------------------------------------------------------
# Input resolution and format detection
# ---------------------------------------------------------------------------


def _filesystems():
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return FileSystems


def resolve_input(input_path: str) -> list[tuple[str, int]]:
  """Expands a file, glob or MovieLens folder into sorted ``(path, size)``.

  Raises:
    InputError: nothing matches, or a folder holds no known ratings file.
  """
  fs = _filesystems()
  path = input_path.rstrip("/") if input_path not in ("/",) else input_path
  has_glob = any(ch in path for ch in "*?[")
  if not has_glob:
    if _is_dir(path):
      return _movielens_folder(path)
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


def _movielens_folder(folder: str) -> list[tuple[str, int]]:
  fs = _filesystems()
  listing = {posixpath.basename(m.path): (m.path, m.size_in_bytes)
             for m in fs.match([folder + "/*"])[0].metadata_list}
  for name in MOVIELENS_FILES:
    for candidate in (name, name + ".gz"):
      if candidate in listing:
        return [listing[candidate]]
  # A partial copy may name its ratings file differently (ratings_*.dat.gz).
  for pattern in ("ratings*.dat", "ratings*.dat.gz", "ratings*.csv", "ratings*.csv.gz"):
    hits = sorted(v for k, v in listing.items() if fnmatch.fnmatch(k, pattern))
    if hits:
      return hits
  raise InputError(
      f"folder {folder!r} holds no MovieLens ratings file (ratings.dat, u.data, "
      "ratings.csv): pass the file itself with --input, or a glob")


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
  found = set()
  for path, _ in files:
    f = detect_format(path)
    if f == "movielens-zip":
      f = _zip_member(path)[1]
    found.add(f)
  if len(found) > 1:
    raise InputError(f"input files have mixed formats {sorted(found)}: pass one "
                     "format's files (a narrower glob) and --format")
  return found.pop()


def _zip_member(path: str) -> tuple[str, str]:
  """The ratings member of an official MovieLens zip and its format."""
  with _filesystems().open(path) as f, zipfile.ZipFile(f) as z:
    names = z.namelist()
  for base, fmt in MOVIELENS_FILES.items():
    for n in sorted(names):
      if posixpath.basename(n) == base:
        return n, fmt
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
        elif features.RAW_TIMESTAMP in pos:
          try:
            ts = int(fields[pos[features.RAW_TIMESTAMP]])
          except ValueError:
            reason = "non-numeric timestamp"
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
    arr = cols[features.RAW_TIMESTAMP]
    ts, bad_ts = _timestamps_to_seconds(arr)
    reasons[(reasons == None) & bad_ts] = "non-numeric timestamp"  # pylint: disable=singleton-comparison
    out[features.RAW_TIMESTAMP] = ts
  else:
    out[features.RAW_TIMESTAMP] = np.zeros(n, dtype=np.int64)
  bad_mask = reasons != None  # pylint: disable=singleton-comparison
  good = ~bad_mask
  bad_rows = []
  if bad_mask.any():
    idx = np.flatnonzero(bad_mask)
    raw_cols = {c: cols[c].take(pa.array(idx)).to_pylist() for c in cols}
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


def _jsonable(v):
  if isinstance(v, bytes):
    return v.decode("utf-8", errors="backslashreplace")
  if isinstance(v, (str, int, float, bool)) or v is None:
    return v
  return str(v)


def _timestamps_to_seconds(arr):
  """Int64 unix seconds and a bad-value mask from an Arrow timestamp column."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
  n = len(arr)
  if pa.types.is_timestamp(arr.type):
    arr = pc.cast(arr, pa.timestamp("s")).cast(pa.int64())
  elif pa.types.is_date(arr.type):
    arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
  elif pa.types.is_integer(arr.type):
    arr = arr.cast(pa.int64())
  elif pa.types.is_floating(arr.type):
    ok = pc.fill_null(pc.equal(pc.floor(arr), arr), False)
    arr = pc.if_else(ok, arr, None).cast(pa.int64())
  else:
    values = arr.cast(pa.large_string()).to_pylist()
    out = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    for i, v in enumerate(values):
      try:
        out[i] = int(v)
      except (TypeError, ValueError):
        bad[i] = True
    return out, bad
  bad = pc.is_null(arr).to_numpy(zero_copy_only=False)
  return pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).astype(np.int64), bad


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
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: validate as text
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
