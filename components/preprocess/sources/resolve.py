"""Input resolution and format detection: which files, of which format."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import zipfile
from typing import Sequence

from components.preprocess.sources.common import FORMATS, InputError, filesystems

# File names of the official MovieLens releases (also as zip members).
MOVIELENS_FILES = {"ratings.dat": "movielens", "u.data": "ml-100k", "ratings.csv": "csv"}


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
  fs = filesystems()
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
    fs = filesystems()
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
  fs = filesystems()
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
      f = zip_member(path)[1]
    found[path] = f
  if len(set(found.values())) > 1:
    listed = ", ".join(f"{p} ({f})" for p, f in list(found.items())[:10])
    raise InputError(f"input files have mixed formats {sorted(set(found.values()))}: "
                     f"{listed}. Pass one format's files (a single file or a narrower "
                     "glob) and --format")
  return found.popitem()[1]


def zip_member(path: str) -> tuple[str, str]:
  """The ratings member of an official MovieLens zip and its format."""
  with filesystems().open(path) as f, zipfile.ZipFile(f) as z:
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
