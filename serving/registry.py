"""Where bundles are kept and found: the local registry, GCS, Vertex's storage URI.

The local registry is files only (usable from the tools image without JAX)::

    REGISTRY/
      current.json            the deployed version: {"version", "path", "deployed_at", ...}
      history.jsonl           one line per deployment
      models/<version>/       a copy of each deployed bundle (version = 0001, 0002, ...)

``current.json`` is replaced atomically, so a server starting during a deployment
reads either the old or the new version, never half of one. :func:`publish` adds a
version (the pipeline's local deploy step, ``recml deploy``); :func:`resolve_bundle`
is what ``recml serve`` serves: ``--bundle``, else ``$AIP_STORAGE_URI`` (a ``gs://``
copy, :func:`fetch_gcs`), else the registry's current model.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from typing import Any

from trainers import export

REGISTRY_CURRENT = "current.json"
REGISTRY_HISTORY = "history.jsonl"
# The local pipeline root when $RECML_PIPELINE_ROOT is unset: pipelines.env's
# DEFAULT_LOCAL_ROOT (serving does not import pipelines; a test keeps the two equal).
DEFAULT_PIPELINE_ROOT = "runs"


def publish(bundle_dir: str, registry: str, run_id: str = "",
            labels: dict[str, Any] | None = None) -> dict[str, Any]:
  """Copies a verified bundle into the registry and makes it the current model."""
  meta = export.verify_bundle_files(bundle_dir)
  models = os.path.join(registry, "models")
  os.makedirs(models, exist_ok=True)
  existing = [int(v) for v in os.listdir(models) if v.isdigit()]
  number = max(existing, default=0) + 1
  while True:  # os.mkdir is atomic: two deployments never share a version
    version = f"{number:04d}"
    staging = os.path.join(models, f".{version}.tmp")
    try:
      os.mkdir(os.path.join(models, version))
      break
    except FileExistsError:
      number += 1
  target = os.path.join(models, version)
  shutil.rmtree(staging, ignore_errors=True)
  shutil.copytree(bundle_dir, staging)
  os.rmdir(target)
  os.replace(staging, target)
  record = {
      "version": version,
      "path": os.path.abspath(target),
      "source": os.path.abspath(bundle_dir),
      "run_id": run_id,
      "model": meta.get("model"),
      "valid": meta.get("source", {}).get("valid", {}),
      "labels": dict(labels or {}),
      "deployed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  tmp = os.path.join(registry, f".{REGISTRY_CURRENT}.{version}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(registry, REGISTRY_CURRENT))
  with open(os.path.join(registry, REGISTRY_HISTORY), "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
  return record


def current(registry: str) -> dict[str, Any]:
  """The registry's current deployment (``current.json``)."""
  path = os.path.join(registry, REGISTRY_CURRENT)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no deployed model in {registry} ({REGISTRY_CURRENT} missing): run the pipeline "
        "until a model is blessed, or `recml deploy --bundle DIR`")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def default_registry() -> str:
  """``$RECML_REGISTRY``, else ``registry/`` in the local pipeline root
  (``$RECML_PIPELINE_ROOT``, else ``runs``: ``pipelines.env.DEFAULT_LOCAL_ROOT``)."""
  if os.environ.get("RECML_REGISTRY"):
    return os.environ["RECML_REGISTRY"]
  root = os.environ.get("RECML_PIPELINE_ROOT") or DEFAULT_PIPELINE_ROOT
  return os.path.join(os.path.abspath(root), "registry")


def safe_relpath(name: str) -> str:
  """A blob name relative to its bundle's prefix -> a relative local path that stays inside
  the destination folder; raises ``ValueError`` for names that could leave it.

  Refused: absolute names (a join drops the folder before them), empty segments (``a//b``;
  after the prefix, ``//etc/passwd`` is absolute), ``.`` and ``..`` segments, NUL bytes.
  One trailing ``/`` (a folder placeholder) is allowed and kept.
  """
  segments = name.split("/")
  if name.endswith("/"):
    segments.pop()
  bad = [s for s in segments if s in ("", ".", "..")]
  if not name or name.startswith("/") or bad or "\0" in name:
    why = ("is absolute" if name.startswith("/") else "has a NUL byte" if "\0" in name
           else f"has a {bad[0]!r} path segment" if bad else "is empty")
    raise ValueError(f"unsafe blob name {name!r}: it {why}")
  return os.path.join(*segments) + ("/" if name.endswith("/") else "")


def blob_path(dest: str, prefix: str, name: str) -> str | None:
  """The local file of blob ``name`` listed under ``prefix``, inside ``dest``; None for
  folder placeholders (``prefix`` itself, names ending in ``/``).

  Raises ``ValueError`` (naming the blob) for a name outside ``prefix`` or one that
  :func:`safe_relpath` refuses; the resolved path is checked to be inside ``dest``.
  """
  if not name.startswith(prefix):
    raise ValueError(f"blob {name!r} is not under the prefix {prefix!r}")
  rel = name[len(prefix):]
  if not rel:
    return None
  try:
    rel = safe_relpath(rel)
  except ValueError as e:
    raise ValueError(f"blob {name!r}: {e}") from None
  if rel.endswith("/"):
    return None
  root = os.path.realpath(dest)
  path = os.path.realpath(os.path.join(root, rel))
  if os.path.commonpath([root, path]) != root:  # e.g. a symlink inside dest
    raise ValueError(f"blob {name!r} resolves to {path}, outside {root}")
  return path


def fetch_gcs(uri: str, dest: str) -> str:
  """Copies a ``gs://`` bundle (Vertex sets ``AIP_STORAGE_URI``) into ``dest``.

  Every blob name is checked (:func:`blob_path`) before anything is downloaded: one
  that would land outside ``dest`` fails the whole copy.
  """
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket_name, _, prefix = uri[len("gs://"):].partition("/")
  prefix = prefix.rstrip("/") + "/" if prefix else ""
  client = storage.Client()
  blobs = [(blob, blob_path(dest, prefix, blob.name))
           for blob in client.list_blobs(bucket_name, prefix=prefix)]
  blobs = [(blob, path) for blob, path in blobs if path is not None]
  if not blobs:
    raise FileNotFoundError(f"nothing under {uri}")
  for blob, path in blobs:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob.download_to_filename(path)
  return dest


def resolve_bundle(bundle: str | None, registry: str | None) -> str:
  """--bundle, else Vertex's ``$AIP_STORAGE_URI``, else the registry's current model."""
  source = bundle or os.environ.get("AIP_STORAGE_URI")
  if source:
    if source.startswith("gs://"):
      import tempfile  # pylint: disable=g-import-not-at-top
      return fetch_gcs(source, tempfile.mkdtemp(prefix="recml-bundle-"))
    return source
  return current(registry or default_registry())["path"]
