"""Line-based formats: MovieLens ``::``, ``u.data``, CSV/TSV, pairs, sequences.

Files are streamed line by line (plain, gzipped or bzip2ed by name, or the
ratings member of an official MovieLens ``.zip``) and parsed in blocks of
``batch_rows`` lines: :func:`read_lines` turns them into :class:`Chunk` objects
of raw events and quarantine rows. :func:`open_lines` and :func:`line_blocks`
are the streaming layer alone, for readers of other line-based formats.
"""

from __future__ import annotations

import csv
import dataclasses
import zipfile
from typing import Any, Iterator

from components.preprocess.sources.common import (
    COLUMN_ALIASES, DEFAULT_BATCH_ROWS, EVENT_ORDER, OPTIONAL_COLUMNS, ORDER_FILE_SHIFT,
    Chunk, InputError, SourceSpec, bad_row, filesystems, id_reason, make_batch, parse_int,
    timestamp_reason)
from components.preprocess.sources.resolve import zip_member
from trainers import features

READ_CHUNK_BYTES = 8 << 20


def open_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """Yields ``(line number, raw line bytes)`` of a file, streaming."""
  fs = filesystems()
  if path.lower().endswith(".zip"):
    member, _ = zip_member(path)
    with fs.open(path) as f, zipfile.ZipFile(f) as z, z.open(member) as m:
      yield from split_lines(m)
    return
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
  with fs.open(path, compression_type=CompressionTypes.AUTO) as f:
    yield from split_lines(f)


def split_lines(stream) -> Iterator[tuple[int, bytes]]:
  """Yields ``(line number, raw line bytes)`` of a binary stream, ``\\n``-separated."""
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


def line_blocks(path: str, block_lines: int) -> Iterator[list[tuple[int, str | None, bytes]]]:
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

  for item in open_lines(path):
    block.append(item)
    if len(block) >= block_lines:
      yield decode(block)
      block = []
  if block:
    yield decode(block)


def content_lines(block, counts: dict[str, int]) -> Iterator[tuple[int, str | None, bytes]]:
  """The lines of a :func:`line_blocks` block that hold something: ``\r`` stripped
  (CRLF files), blank lines skipped and counted in ``counts["blank_lines"]``."""
  for number, text, raw in block:
    if text is not None:
      text = text.rstrip("\r")
      if not text.strip():
        counts["blank_lines"] += 1
        continue
    yield number, text, raw


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


def sniff_delimiter(path: str, first_line: str) -> str:
  name = path.lower()
  if ".tsv" in name or "\t" in first_line:
    return "\t"
  if ".csv" in name or "," in first_line:
    return ","
  for sep in (";", "|", " "):
    if sep in first_line:
      return sep
  return ","



def read_lines(
    path: str,
    file_index: int,
    spec: SourceSpec,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[Chunk]:
  """Reads one file of a line-based format into chunks of raw events (streaming).

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
  layout = None
  ordinal = 0
  base = file_index << ORDER_FILE_SHIFT
  side = spec.side_columns
  for block in line_blocks(path, batch_rows):
    cols = {features.RAW_USER: [], features.RAW_ITEM: [], features.RAW_TIMESTAMP: [],
            EVENT_ORDER: [], **{c: [] for c in side}}
    users, items, stamps, orders = (cols[features.RAW_USER], cols[features.RAW_ITEM],
                                    cols[features.RAW_TIMESTAMP], cols[EVENT_ORDER])
    extra = [(cols[c], None) for c in side]
    bad: list[dict[str, Any]] = []
    counts = {"rows_read": 0, "rows_quarantined": 0, "blank_lines": 0, "header_lines": 0}
    for number, text, raw in content_lines(block, counts):
      if layout is None:
        if text is None:
          counts["rows_read"] += 1
          bad.append(bad_row(path, number, raw, "unreadable encoding (not utf-8)"))
          continue
        layout = _make_layout(spec, path, text)
        extra = [(cols[c], layout.pos[c]) for c in side]
        if layout.header:
          counts["header_lines"] += 1
          continue
      counts["rows_read"] += 1
      if text is None:
        bad.append(bad_row(path, number, raw, "unreadable encoding (not utf-8)"))
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
        bad.append(bad_row(path, number, text, reason))
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
  sep = spec.delimiter or sniff_delimiter(path, first_line)
  spec = dataclasses.replace(spec, delimiter=sep)
  first = next(csv.reader([first_line], delimiter=sep)) if '"' in first_line \
      else first_line.split(sep)
  return _Layout(spec, path, first)
