"""Input data for a run: a local copy, a cloud URI, or a known public data set downloaded once.

``resolve_data("movielens-1m")`` downloads MovieLens-1M from GroupLens into the user's
cache folder (``$RECML_CACHE``, else ``$XDG_CACHE_HOME/recml``, else ``~/.cache/recml``),
verifies the archive's published MD5 and unpacks it; later calls reuse the copy.
Without network access it raises :class:`DataUnavailable`, whose message says to pass
``--data PATH``.
"""

import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile

CLOUD_SCHEMES = ("gs://", "bq://", "s3://", "http://", "https://")
OFFLINE_HINT = ("pass a local copy with --data PATH "
                "(e.g. --data ../shared/datasets/ml-1m-partial)")


class DataUnavailable(RuntimeError):
  """The data set could not be obtained (no network, no local copy)."""


class ChecksumMismatch(DataUnavailable):
  """A downloaded archive does not match its published checksum."""


@dataclasses.dataclass(frozen=True)
class Download:
  """A public archive: where it is, its published MD5, the folder it unpacks to."""

  name: str
  url: str
  md5: str
  folder: str


# GroupLens publishes ml-1m.zip.md5 next to the archive.
MOVIELENS_1M = Download(
    name="movielens-1m",
    url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    md5="c4d9eecfca2ab87c1945afe126590906",
    folder="ml-1m",
)
KNOWN = {"movielens-1m": MOVIELENS_1M, "ml-1m": MOVIELENS_1M}


def cache_dir() -> str:
  """The user's cache folder for downloads."""
  if os.environ.get("RECML_CACHE"):
    return os.environ["RECML_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "recml")


def md5sum(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "md5").hexdigest()


def _safe_extract(archive: zipfile.ZipFile, dest: str) -> None:
  root = os.path.realpath(dest)
  for member in archive.namelist():
    target = os.path.realpath(os.path.join(dest, member))
    if target != root and not target.startswith(root + os.sep):
      raise DataUnavailable(f"refusing to unpack {member!r} outside {dest}")
  archive.extractall(dest)


def fetch(download: Download, cache: str | None = None, url: str | None = None,
          timeout: float = 60.0) -> str:
  """Downloads, verifies and unpacks ``download`` once; returns the unpacked folder.

  Args:
    download: what to fetch.
    cache: the cache folder (default :func:`cache_dir`).
    url: another address of the same archive (a mirror; tests use a local server).
    timeout: seconds per network operation.

  Raises:
    DataUnavailable: the download failed (with a hint to pass ``--data``).
    ChecksumMismatch: the archive's MD5 differs from the published one.
  """
  cache = cache or cache_dir()
  target = os.path.join(cache, download.folder)
  marker = os.path.join(target, ".recml-verified")
  if os.path.exists(marker):
    return target
  os.makedirs(cache, exist_ok=True)
  url = url or download.url
  fd, tmp = tempfile.mkstemp(prefix=download.name + "-", suffix=".zip", dir=cache)
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
          shutil.copyfileobj(response, out)
      except (urllib.error.URLError, OSError) as e:
        raise DataUnavailable(
            f"could not download {download.name} from {url} ({e}); {OFFLINE_HINT}") from e
    actual = md5sum(tmp)
    if actual != download.md5:
      raise ChecksumMismatch(
          f"{url}: MD5 {actual} does not match the published {download.md5}; "
          f"the download is corrupt or not the expected file. {OFFLINE_HINT}")
    staging = tempfile.mkdtemp(prefix=".unpack-", dir=cache)
    try:
      with zipfile.ZipFile(tmp) as archive:
        _safe_extract(archive, staging)
      unpacked = os.path.join(staging, download.folder)
      if not os.path.isdir(unpacked):
        raise DataUnavailable(f"{url}: the archive has no {download.folder}/ folder")
      shutil.rmtree(target, ignore_errors=True)
      os.replace(unpacked, target)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    with open(marker, "w", encoding="utf-8") as f:
      f.write(f"{download.url} md5={download.md5}\n")
    return target
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def resolve_data(data: str, *, cache: str | None = None) -> str:
  """Turns ``--data`` (or a config's ``data``) into what the preprocess step reads.

  Args:
    data: a known data set name (``movielens-1m``), a local path, or a cloud URI.
    cache: the download cache folder.

  Returns:
    An absolute local path, or the URI unchanged.

  Raises:
    DataUnavailable: nothing given, a missing path, or a failed download.
  """
  if not data:
    raise DataUnavailable(f"no input data: {OFFLINE_HINT}")
  if data in KNOWN:
    return fetch(KNOWN[data], cache=cache)
  if data.startswith(CLOUD_SCHEMES):
    return data
  path = os.path.abspath(os.path.expanduser(data))
  if not os.path.exists(path):
    raise DataUnavailable(f"--data {data}: no such file or folder")
  return path
