"""Fingerprint step: what the input data *is*, so that a run knows whether it is new.

A scheduled pipeline reads the same ``data_uri`` every week while the data behind it
changes; the URI alone says nothing. The fingerprint does, without reading the data
twice where the storage already knows:

* files (a local path, a glob or a MovieLens folder; ``gs://``): exactly the files the
  preprocess step reads (:func:`components.preprocess.sources.resolve.resolve_input`), as the
  sorted list of names relative to their common folder, sizes and content hashes:
  SHA-256 streamed from local files; for ``gs://`` the object metadata (MD5, or CRC32C
  plus the generation for composite objects without one; the generation is recorded in
  any case), listed without downloading anything. A touched file (new mtime, same
  bytes) keeps its fingerprint; moving the data to another folder does too;
* BigQuery (``bq://project.dataset.table``): the table's last-modified time, row count,
  size and streaming-buffer row estimate; for a view or a ``SELECT`` query, a dry run
  names the tables it reads and each is fingerprinted, with the query text.

The digest (``sha256:<hex>``) is the step's output; the preprocess step takes it as
an input parameter, so its cache key (and through its outputs, train's, evaluate's and
export's) changes exactly when the data does. The step itself is never cached.

:func:`dataset_identity` combines the digest with the split protocol and the
preprocessing parameters that change the data into ``ds-<12 hex>``: the metrics store's
``dataset_id``, by which champions are found (the config's ``dataset:`` is a label).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
from typing import Any, Iterable, Mapping, Sequence

MANIFEST_FILE = "fingerprint.json"
# The split protocol the dataset identity includes (trainers.features).
SPLIT_PROTOCOL = "leave-one-out per user, time-ordered: last = test, second-to-last = valid"
# Fields of an entry that identify the content (the others are recorded for lineage).
_CONTENT_FIELDS = ("name", "size", "sha256", "md5", "crc32c", "generation", "table",
                   "modified", "num_rows", "num_bytes", "streaming_rows", "query_sha256")


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def sha256_file(path: str) -> str:
  """The SHA-256 (hex) of a local file, streamed."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _split_scheme(path: str) -> tuple[str, str]:
  if "://" in path:
    scheme, rest = path.split("://", 1)
    return scheme + "://", rest
  return "", os.path.abspath(path)


def relative_names(paths: Sequence[str]) -> list[str]:
  """Names relative to the files' common folder (a single file: its base name)."""
  parts = [_split_scheme(p)[1] for p in paths]
  base = posixpath.commonpath([posixpath.dirname(p) for p in parts]) if parts else ""
  return [posixpath.relpath(p, base) if base else p for p in parts]


def local_entries(paths: Sequence[str]) -> list[dict[str, Any]]:
  """``{"name", "size", "sha256"}`` per local file."""
  return [{"name": name, "size": os.path.getsize(path), "sha256": sha256_file(path)}
          for path, name in zip(paths, relative_names(paths))]


def gcs_blob_entry(blob, name: str) -> dict[str, Any]:
  """The entry of one ``google.cloud.storage.Blob`` from its metadata (no download).

  MD5 identifies the content; composite objects have only a CRC32C, which with the
  generation (a new one per upload) identifies it.
  """
  entry: dict[str, Any] = {"name": name, "size": int(blob.size), "generation": blob.generation}
  if blob.md5_hash:
    entry["md5"] = base64.b64decode(blob.md5_hash).hex()
  elif blob.crc32c:
    entry["crc32c"] = base64.b64decode(blob.crc32c).hex()
  else:
    raise ValueError(f"gs://{blob.bucket.name}/{blob.name} has neither MD5 nor CRC32C")
  return entry


def _gcs_parts(path: str) -> tuple[str, str]:
  bucket, _, name = path[len("gs://"):].partition("/")
  return bucket, name


def gcs_entries(paths: Sequence[str], client=None) -> list[dict[str, Any]]:
  """Entries of ``gs://`` objects from one listing per bucket (metadata only).

  Args:
    paths: ``gs://bucket/name`` of each object.
    client: a ``google.cloud.storage.Client`` (default: made from the environment).
  """
  if client is None:
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    client = storage.Client()
  names = relative_names(paths)
  by_bucket: dict[str, list[str]] = {}
  for path in paths:
    bucket, name = _gcs_parts(path)
    by_bucket.setdefault(bucket, []).append(name)
  blobs = {}
  for bucket, objects in by_bucket.items():
    prefix = posixpath.commonpath([posixpath.dirname(o) for o in objects])
    prefix = prefix + "/" if prefix else ""
    wanted = set(objects)
    for blob in client.list_blobs(bucket, prefix=prefix):
      if blob.name in wanted:
        blobs[f"gs://{bucket}/{blob.name}"] = blob
  missing = [p for p in paths if p not in blobs]
  if missing:
    raise FileNotFoundError(f"{len(missing)} input object(s) vanished while fingerprinting: "
                            f"{', '.join(missing[:3])}")
  return [gcs_blob_entry(blobs[p], n) for p, n in zip(paths, names)]


def file_entries(input_uri: str, gcs_client=None) -> list[dict[str, Any]]:
  """Entries of the files the preprocess step reads for ``input_uri``."""
  from components.preprocess.sources import resolve  # pylint: disable=g-import-not-at-top
  try:
    paths = [path for path, _ in resolve.resolve_input(input_uri)]
  except resolve.InputError:
    # Not a file, glob or MovieLens folder: a folder of CTR files (ranking input).
    from components.preprocess import ctr_spec  # pylint: disable=g-import-not-at-top
    paths = [path for path, _ in ctr_spec.resolve_files(input_uri)]
  gcs = [p for p in paths if p.startswith("gs://")]
  other = [p for p in paths if "://" in p and not p.startswith("gs://")]
  if other:
    raise ValueError(f"cannot fingerprint {other[0]!r}: local paths and gs:// only")
  if gcs and len(gcs) != len(paths):
    raise ValueError(f"input {input_uri!r} mixes local and gs:// files")
  return gcs_entries(paths, gcs_client) if gcs else local_entries(paths)


# ---------------------------------------------------------------------------
# BigQuery
# ---------------------------------------------------------------------------
def bigquery_table_entry(table) -> dict[str, Any]:
  """The entry of one ``google.cloud.bigquery.Table`` (from ``get_table``)."""
  buffer = table.streaming_buffer
  return {"table": f"{table.project}.{table.dataset_id}.{table.table_id}",
          "modified": table.modified.isoformat() if table.modified else None,
          "num_rows": table.num_rows, "num_bytes": table.num_bytes,
          "streaming_rows": int(buffer.estimated_rows or 0) if buffer else 0}


def bigquery_entries(input_ref: str, client=None) -> list[dict[str, Any]]:
  """Entries of a BigQuery table, view or query (``bq://p.d.t`` or ``SELECT ...``)."""
  from components.preprocess.sources import bigquery as bq_input  # pylint: disable=g-import-not-at-top
  from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
  ref = input_ref.strip()
  is_query = not ref.lower().startswith("bq://")
  table_id = None
  if not is_query:
    project, _, rest = bq_input.table_spec(ref).rpartition(":")   # project:dataset.table
    table_id = f"{project}.{rest}"
  if client is None:
    client = bigquery.Client(project=table_id.rsplit(".", 2)[0] if table_id else None)
  entries = []
  query = ref
  if table_id:
    table = client.get_table(table_id)
    if table.table_type not in ("VIEW", "MATERIALIZED_VIEW"):
      return [bigquery_table_entry(table)]
    entries.append({"table": table_id, "view": table.table_type})
    query = f"SELECT * FROM `{table_id}`"
    if table.view_query:
      entries[0]["query_sha256"] = hashlib.sha256(table.view_query.encode()).hexdigest()
  else:
    entries.append({"query_sha256": hashlib.sha256(ref.encode()).hexdigest()})
  job = client.query(query, job_config=bigquery.QueryJobConfig(dry_run=True,
                                                               use_query_cache=False))
  read = sorted({f"{t.project}.{t.dataset_id}.{t.table_id}" for t in job.referenced_tables})
  if not read:
    raise ValueError(f"{input_ref!r} reads no table: nothing to fingerprint")
  entries += [bigquery_table_entry(client.get_table(t)) for t in read]
  return entries


# ---------------------------------------------------------------------------
# The fingerprint and the dataset identity
# ---------------------------------------------------------------------------
def digest(entries: Iterable[Mapping[str, Any]]) -> str:
  """``sha256:<hex>`` of the content-identifying fields of the entries.

  A GCS generation counts only for objects without an MD5 (composite objects): with
  one, a re-upload of the same bytes is the same data.
  """
  canonical = [{k: e[k] for k in _CONTENT_FIELDS if e.get(k) is not None
                and not (k == "generation" and e.get("md5"))}
               for e in entries]
  text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def compute(input_uri: str, *, gcs_client=None, bq_client=None) -> dict[str, Any]:
  """The fingerprint of an input: ``{"input", "kind", "entries", "digest"}``.

  Raises:
    components.preprocess.sources.common.InputError: the input does not exist.
  """
  from components.preprocess.sources import bigquery as bq_input  # pylint: disable=g-import-not-at-top
  if not input_uri or not input_uri.strip():
    raise ValueError("no input to fingerprint: pass data_uri")
  if bq_input.is_bigquery_ref(input_uri):
    kind, entries = "bigquery", bigquery_entries(input_uri, bq_client)
  else:
    kind, entries = "files", file_entries(input_uri, gcs_client)
  return {"input": input_uri, "kind": kind, "entries": entries, "digest": digest(entries)}


def dataset_identity(fingerprint: str, *, max_len: int, min_item_count: int,
                     timestamp_unit: str = "auto", data_format: str = "") -> str:
  """``ds-<12 hex>``: the data (its fingerprint digest) as the preprocess step makes it.

  The split protocol and the parameters that change the examples (history length,
  item frequency cut-off, the timestamps' unit, the input format) are part of it:
  models trained on the same raw data cut differently are not compared either.
  """
  from trainers import features  # pylint: disable=g-import-not-at-top
  if not fingerprint:
    raise ValueError("dataset_identity needs the input's fingerprint (the fingerprint step)")
  spec = {"fingerprint": fingerprint, "protocol": SPLIT_PROTOCOL,
          "min_events_per_user": features.MIN_EVENTS_PER_USER,
          "max_len": int(max_len), "min_item_count": int(min_item_count),
          "timestamp_unit": timestamp_unit or "auto", "format": data_format or "auto"}
  return _identity(spec)


def ranking_dataset_identity(fingerprint: str, params: Mapping[str, Any]) -> str:
  """``ds-<12 hex>`` of a ranking dataset: the fingerprint and what makes its examples.

  ``params`` are the format, column spec, encodings and split of the run
  (:func:`components.preprocess.ctr_step.identity_params`).
  """
  if not fingerprint:
    raise ValueError("dataset_identity needs the input's fingerprint (the fingerprint step)")
  return _identity({"fingerprint": fingerprint, **params})


def _identity(spec: Mapping[str, Any]) -> str:
  text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
  return "ds-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def run(input_uri: str, out_dir: str | None = None, **clients) -> dict[str, Any]:
  """Fingerprints ``input_uri``; writes ``fingerprint.json`` into ``out_dir`` when given."""
  result = compute(input_uri, **clients)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, MANIFEST_FILE), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  return result


# ---------------------------------------------------------------------------
# KFP component (the pipeline's first step; pipelines/dag.py). Never cached: its whole
# point is to look at the data again. Runs in the preprocess image (Beam's file
# systems, google-cloud-storage and -bigquery).
# ---------------------------------------------------------------------------
from kfp.dsl import Artifact, Output  # pylint: disable=wrong-import-position,g-multiple-import

from components.kfp_step import step as _step  # pylint: disable=wrong-import-position


@_step("preprocess")
def fingerprint(input_uri: str, manifest: Output[Artifact]) -> str:
  """Fingerprints the input data (file hashes / GCS metadata / BigQuery table state).

  Args:
    input_uri: raw events: a file, a folder, a glob, gs:// or bq://.
    manifest: ``fingerprint.json``: every file (name, size, hash) or table (modified
      time, rows) and the digest.

  Returns:
    The digest, ``sha256:<hex>`` (the preprocess step's ``fingerprint`` input).
  """
  from components import fingerprint as step  # pylint: disable=g-import-not-at-top
  result = step.run(input_uri, manifest.path)
  manifest.metadata.update({"digest": result["digest"], "kind": result["kind"],
                            "entries": len(result["entries"]), "input": input_uri})
  print(f"fingerprint of {input_uri}: {result['digest']} ({len(result['entries'])} entries)")
  return result["digest"]
