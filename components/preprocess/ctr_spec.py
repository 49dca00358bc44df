"""What a ranking (CTR) input is: the column spec, the input's files, format and splits.

Everything :mod:`components.preprocess.ctr_step` resolves before the Beam job:
:class:`CtrSpec` (label, dense, categorical and multi-hot columns, and per feature a
vocabulary with a minimum count or hash buckets), :class:`SplitRule`, the parsing of
their flags, the files of ``--input`` (a file, a glob, or a folder of data files),
pre-split files by name, the format (Criteo TSV is told by its first line) and the
column names (a CSV header, the Parquet schema). The rows are read by
:mod:`components.preprocess.ctr_sources`.

Formats:

* ``criteo``: the Criteo display-advertising TSV, no header, 40 fields: label,
  ``I1..I13`` (integers), ``C1..C26`` (hashed categorical), empty = missing.
* ``csv`` (any delimiter, with a header naming the columns; without one, columns are
  named by their 0-based index), ``parquet`` (list columns for multi-hot), ``bigquery``:
  the column spec of :class:`CtrSpec`.

Splits (:class:`SplitRule`): ``files`` (pre-split input: files named ``train*``,
``valid*``/``val*``/``validation*``/``dev*`` and ``test*``), ``random`` (each row by a
seeded hash of its key: file index and line number, so the split does not depend on
the runner or on where the data lives) or ``time`` (by a time column: the earliest rows
train, the latest test; rows with equal times stay together).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import posixpath
from typing import Any, Mapping, Sequence

from components.preprocess.sources import (
    InputError, filesystems, is_bigquery_ref, open_lines, parse_int, resolve_input,
    sniff_delimiter)
from trainers import ranking_features as rf

CTR_FORMATS = ("criteo", "csv", "parquet", "bigquery")
SPLIT_KINDS = ("auto", "files", "random", "time")

CRITEO_LABEL = "label"
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
CRITEO_FIELDS = 1 + len(CRITEO_DENSE) + len(CRITEO_CATEGORICAL)

# Vocabulary admission defaults: Criteo's tail of values seen once or a few times is
# huge (FuxiCTR's Criteo_x1 setting is 10); other inputs keep values seen twice, so
# that the OOV row is trained on train's singletons.
DEFAULT_MIN_COUNT = {"criteo": 10}
DEFAULT_MIN_COUNT_OTHER = 2
DEFAULT_SPLIT_RATIOS = (0.8, 0.1, 0.1)

SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"),
                 "test": ("test",)}
DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".gzip", ".bz2", ".zst")


def vocab_column(name: str) -> str:
  """The raw Arrow column of a vocabulary feature (its values)."""
  return f"cat/{name}"


def hash_column(name: str) -> str:
  """The raw Arrow column of a hashed feature (its ids, hashed by the reader)."""
  return f"hash/{name}"


# ---------------------------------------------------------------------------
# The column spec
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CtrSpec:
  """What to read and how each feature is encoded (resolved: nothing left to detect)."""

  format: str
  label: str
  dense: tuple[str, ...] = ()
  categorical: tuple[str, ...] = ()                 # one value per row
  multi_hot: tuple[tuple[str, int], ...] = ()       # (column, list length)
  hash_buckets: Mapping[str, int] = dataclasses.field(default_factory=dict)  # hashed
  min_count: Mapping[str, int] = dataclasses.field(default_factory=dict)     # vocab
  separator: str = rf.DEFAULT_MULTI_HOT_SEPARATOR
  delimiter: str | None = None
  header: bool | None = None
  time_column: str | None = None

  @property
  def multi_hot_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.multi_hot)

  @property
  def columns(self) -> tuple[str, ...]:
    """The input columns a row is read from, in :meth:`RowParser.add`'s order."""
    time = (self.time_column,) if self.time_column else ()
    return (self.label, *self.dense, *self.categorical, *self.multi_hot_names, *time)

  def is_hashed(self, name: str) -> bool:
    return name in self.hash_buckets

  def input_column(self, name: str) -> str:
    """The raw Arrow column of a categorical feature."""
    return hash_column(name) if self.is_hashed(name) else vocab_column(name)

  def categorical_features(self, vocab_sizes: Mapping[str, int] | None = None
                           ) -> list[rf.CategoricalFeature]:
    """The features of ``dataset_info.json`` (scalars, then multi-hot)."""
    out = []
    sizes = dict(self.multi_hot)
    for name in (*self.categorical, *self.multi_hot_names):
      if self.is_hashed(name):
        buckets = self.hash_buckets[name]
        out.append(rf.CategoricalFeature(name, rf.HASH, rf.FIRST_ID + buckets,
                                         buckets=buckets, multi_hot=sizes.get(name, 0)))
      else:
        size = (vocab_sizes or {}).get(name, rf.FIRST_ID)
        out.append(rf.CategoricalFeature(name, rf.VOCAB, size,
                                         min_count=self.min_count[name],
                                         multi_hot=sizes.get(name, 0)))
    return out

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["multi_hot"] = [list(m) for m in self.multi_hot]
    d["dense"], d["categorical"] = list(self.dense), list(self.categorical)
    d["hash_buckets"], d["min_count"] = dict(self.hash_buckets), dict(self.min_count)
    return d


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """How rows are assigned to splits."""

  kind: str                                       # files, random or time
  ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS
  seed: int = 0

  def to_dict(self) -> dict[str, Any]:
    if self.kind == "files":
      return {"kind": "files"}
    return {"kind": self.kind, "ratios": list(self.ratios),
            **({"seed": self.seed} if self.kind == "random" else {})}


def parse_list(values: str | Sequence[str] | None) -> list[str]:
  """``"a,b"`` or ``["a,b", "c"]`` -> ``["a", "b", "c"]`` (empty entries dropped)."""
  if values is None:
    return []
  if isinstance(values, str):
    values = [values]
  return [v.strip() for value in values for v in str(value).split(",") if v.strip()]


def parse_assignments(values: str | Sequence[str] | None, flag: str
                      ) -> tuple[int | None, dict[str, int]]:
  """``["100", "C1=5,C2=7"]`` -> ``(100, {"C1": 5, "C2": 7})``: a default and per feature."""
  default, per_feature = None, {}
  for entry in parse_list(values):
    name, sep, number = entry.rpartition("=")
    value = parse_int(number)
    if value is None or value < 1 or (sep and not name.strip()):
      raise InputError(f"{flag} {entry!r}: expected N or FEATURE=N with N >= 1")
    if sep:
      per_feature[name.strip()] = value
    else:
      default = value
  return default, per_feature


def parse_multi_hot(values: str | Sequence[str] | None) -> tuple[tuple[str, int], ...]:
  """``["genres:5", "tags:10"]`` -> ``(("genres", 5), ("tags", 10))``."""
  out = []
  for entry in parse_list(values):
    name, sep, size = entry.rpartition(":")
    value = parse_int(size)
    if not sep or not name.strip() or value is None or value < 1:
      raise InputError(f"--multi-hot {entry!r}: expected COLUMN:SIZE with SIZE >= 1")
    out.append((name.strip(), value))
  return tuple(out)


def parse_ratios(values: str | Sequence[float | str] | None) -> tuple[float, float, float]:
  """``"0.8,0.1,0.1"`` -> ``(0.8, 0.1, 0.1)``; each > 0, summing to 1."""
  if values is None or (not isinstance(values, str) and len(values) == 0):
    return DEFAULT_SPLIT_RATIOS
  parts = parse_list(values) if isinstance(values, str) else list(values)
  try:
    ratios = tuple(float(v) for v in parts)
  except ValueError:
    ratios = ()
  if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
    raise InputError(f"--split-ratios {values!r}: expected three ratios > 0 (train, "
                     "valid, test) that sum to 1, e.g. 0.8,0.1,0.1")
  return ratios


def resolve_spec(
    fmt: str,
    names: Sequence[str] | None,
    *,
    label: str | None,
    dense: Sequence[str] = (),
    categorical: Sequence[str] = (),
    multi_hot: Sequence[tuple[str, int]] = (),
    hash_buckets: str | Sequence[str] | None = None,
    min_count: str | Sequence[str] | None = None,
    separator: str = rf.DEFAULT_MULTI_HOT_SEPARATOR,
    delimiter: str | None = None,
    header: bool | None = None,
    time_column: str | None = None,
    where: str = "the input",
) -> CtrSpec:
  """Fills and checks a column spec against the input's column ``names``.

  Criteo has its own columns. Otherwise ``label`` is required; without ``categorical``,
  every column that is not the label, dense, multi-hot or the time column is
  categorical (``names`` must then be known: BigQuery needs ``--categorical``).

  Raises:
    InputError: a column that the input lacks, a column named twice, no feature.
  """
  if fmt == "criteo":
    if dense or categorical or multi_hot or (label and label != CRITEO_LABEL):
      raise InputError("--format criteo has fixed columns (label, I1..I13, C1..C26): "
                       "drop --label/--dense/--categorical/--multi-hot")
    label, dense, categorical, names = (CRITEO_LABEL, CRITEO_DENSE, CRITEO_CATEGORICAL,
                                        (CRITEO_LABEL, *CRITEO_DENSE, *CRITEO_CATEGORICAL))
  if not label:
    raise InputError(f"{where}: pass --label COLUMN (and --dense / --categorical / "
                     "--multi-hot) for a ranking dataset, or --format criteo")
  dense, categorical = list(dense), list(categorical)
  taken = {label, *dense, *(n for n, _ in multi_hot), *([time_column] if time_column else [])}
  if not categorical:
    if names is None:
      raise InputError(f"{where}: pass --categorical (the columns of BigQuery input are "
                       "not known before the job)")
    categorical = [n for n in names if n not in taken]
  used = [label, *dense, *categorical, *(n for n, _ in multi_hot)]
  if time_column:
    used.append(time_column)
  twice = sorted({n for n in used if used.count(n) > 1})
  if twice:
    raise InputError(f"{where}: column(s) {twice} named twice in the column spec")
  if names is not None:
    absent = [n for n in used if n not in names]
    if absent:
      raise InputError(f"{where}: no column {absent[0]!r} among {list(names)}")
  bad = [n for n in used if not n or "/" in n or "\n" in n]
  if bad:
    raise InputError(f"{where}: column name {bad[0]!r} cannot name a feature ('/' or "
                     "line break)")
  if not (dense or categorical or multi_hot):
    raise InputError(f"{where}: no feature besides the label: pass --dense / "
                     "--categorical / --multi-hot")
  features = [*categorical, *(n for n, _ in multi_hot)]
  default_buckets, buckets = parse_assignments(hash_buckets, "--hash-buckets")
  default_count, counts = parse_assignments(min_count, "--min-count")
  for flag, per in (("--hash-buckets", buckets), ("--min-count", counts)):
    unknown = sorted(set(per) - set(features))
    if unknown:
      raise InputError(f"{flag} names {unknown[0]!r}, which is not a categorical or "
                       f"multi-hot feature ({', '.join(features)})")
  both = sorted(set(buckets) & set(counts))
  if both:
    raise InputError(f"feature {both[0]!r} has both --hash-buckets and --min-count: "
                     "a feature is hashed or has a vocabulary")
  hashed, vocab = {}, {}
  base_count = default_count or DEFAULT_MIN_COUNT.get(fmt, DEFAULT_MIN_COUNT_OTHER)
  for name in features:
    if name in buckets or (default_buckets and name not in counts):
      hashed[name] = buckets.get(name, default_buckets)
    else:
      vocab[name] = counts.get(name, base_count)
  if not separator:
    raise InputError("--multi-hot-separator must not be empty")
  return CtrSpec(format=fmt, label=label, dense=tuple(dense), categorical=tuple(categorical),
                 multi_hot=tuple(multi_hot), hash_buckets=hashed, min_count=vocab,
                 separator=separator, delimiter=delimiter, header=header,
                 time_column=time_column or None)


# ---------------------------------------------------------------------------
# Input files, format and columns
# ---------------------------------------------------------------------------


def _stem(path: str) -> str:
  name = posixpath.basename(path).lower()
  for suffix in COMPRESSION_SUFFIXES:
    if name.endswith(suffix):
      name = name[: -len(suffix)]
  return name


def split_of_name(path: str) -> str | None:
  """The split a file's name gives (``train.csv``, ``valid_0.parquet``, ...), or None."""
  stem = _stem(path)
  for split, aliases in SPLIT_ALIASES.items():
    for alias in aliases:
      if stem == alias or (stem.startswith(alias) and stem[len(alias)] in "._-"):
        return split
  return None


def resolve_files(input_path: str) -> list[tuple[str, int]]:
  """A file, a glob or a folder (its data files) -> sorted ``(path, size)``."""
  fs = filesystems()
  path = input_path.rstrip("/") or input_path
  if "://" in path:
    is_dir = not any(ch in path for ch in "*?[") and bool(
        fs.match([path + "/*"])[0].metadata_list)
  else:
    is_dir = os.path.isdir(path)
  if is_dir:
    listing = sorted((m.path, m.size_in_bytes) for m in fs.match([path + "/*"])[0].metadata_list
                     if _stem(m.path).endswith(DATA_SUFFIXES))
    if not listing:
      raise InputError(f"folder {input_path!r} holds no data file ({', '.join(DATA_SUFFIXES)}"
                       ", optionally gzipped)")
    return listing
  return resolve_input(input_path)


def assign_file_splits(files: Sequence[str], kind: str) -> tuple[str, dict[str, str]]:
  """The split kind (``auto`` resolved) and, for ``files``, each file's split.

  Files pre-split by name (at least two of train / valid / test named) give ``files``;
  otherwise ``auto`` means ``random``.

  Raises:
    InputError: pre-split files without one of the splits, or a data file that names
      no split among pre-split ones; ``--split files`` on files that name no split.
  """
  named = {path: split_of_name(path) for path in files}
  found = {s for s in named.values() if s}
  if kind == "auto":
    kind = "files" if len(found) >= 2 else "random"
  if kind != "files":
    return kind, {}
  unnamed = [p for p, s in named.items() if s is None]
  if unnamed:
    raise InputError(f"pre-split input: {unnamed[0]} names no split (train*, valid*, "
                     "test*); remove it or pass files of one split kind")
  missing = [s for s in rf.SPLITS if s not in found]
  if missing:
    raise InputError(f"pre-split input has no {missing[0]} file (found "
                     f"{', '.join(sorted(found))}); name files train*, valid* and test*, "
                     "or pass --split random / time")
  return kind, dict(named)


def first_line(path: str) -> str | None:
  """The first non-blank line of a text file (decoded, without the line end)."""
  for _, raw in open_lines(path):
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    if text.strip():
      return text
  return None


def looks_like_criteo(line: str | None) -> bool:
  """A Criteo TSV line: 40 tab-separated fields, a 0/1 label, integer (or empty) I1..I13."""
  if not line:
    return False
  fields = line.split("\t")
  return (len(fields) == CRITEO_FIELDS and fields[0] in ("0", "1")
          and all(not f or parse_int(f) is not None for f in fields[1:14]))


def detect_format(files: Sequence[str], label: str | None) -> str:
  """The format of ranking input files from their names and first line."""
  stems = {_stem(p).rsplit(".", 1)[-1] for p in files}
  if stems <= {"parquet", "pq"}:
    return "parquet"
  if stems & {"parquet", "pq"}:
    raise InputError(f"input files mix Parquet and text: {', '.join(files[:5])}")
  if label is None and looks_like_criteo(first_line(files[0])):
    return "criteo"
  return "csv"


def is_criteo_input(input_path: str) -> bool:
  """Whether ``--input`` is Criteo TSV (for ``--task auto``); False when it cannot tell."""
  if is_bigquery_ref(input_path):
    return False
  try:
    files = [p for p, size in resolve_files(input_path) if size]
    if not files or _stem(files[0]).endswith((".parquet", ".pq")):
      return False
    return looks_like_criteo(first_line(files[0]))
  except (InputError, OSError, ValueError):
    return False


def column_names(fmt: str, path: str, delimiter: str | None, header: bool | None
                 ) -> tuple[list[str] | None, str | None, bool]:
  """The input's column names, the delimiter and whether the text has a header line.

  CSV: the first line's fields when ``header`` (None: a header unless every field of
  the first line is a number), else ``"0".."n-1"``. Parquet: the schema's names.
  """
  if fmt == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with filesystems().open(path) as f:
      return list(pq.ParquetFile(f).schema_arrow.names), None, False
  if fmt != "csv":
    return None, delimiter, False
  line = first_line(path)
  if line is None:
    return None, delimiter, False
  sep = delimiter or sniff_delimiter(path, line)
  fields = [f.strip().strip('"') for f in split_fields(line, sep)]
  if header is None:
    header = not all(_is_number(f) for f in fields if f)
  if not header:
    return [str(i) for i in range(len(fields))], sep, False
  return fields, sep, True


def check_parquet_types(path: str, spec: CtrSpec) -> None:
  """Parquet categorical columns must hold text or integers (not floats, dates, ...)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  with filesystems().open(path) as f:
    schema = pq.ParquetFile(f).schema_arrow

  def base(t):
    while pa.types.is_dictionary(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
      t = t.value_type
    return t

  for name in (*spec.categorical, *spec.multi_hot_names):
    t = base(schema.field(name).type)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
      raise InputError(f"{path}: categorical column {name!r} is {t}: a categorical "
                       "column holds text or integers (cast it)")


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def split_fields(text: str, sep: str) -> list[str]:
  """The fields of a delimited line (CSV quoting honoured except in TSV)."""
  if '"' in text and sep != "\t":
    return next(csv.reader([text], delimiter=sep))
  return text.split(sep)
