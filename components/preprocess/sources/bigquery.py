"""BigQuery input: the ``ReadFromBigQuery`` transform, table references, row validation."""

from __future__ import annotations

from typing import Any, Sequence

from components.preprocess.sources.common import Chunk, InputError, SourceSpec
from components.preprocess.sources.typed import named_columns, validate_columns


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


def records_to_batch(records: Sequence[dict[str, Any]], spec: SourceSpec,
                     where: str) -> Chunk:
  """Validates BigQuery rows (dicts) into a raw-event chunk."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  names = list(records[0].keys()) if records else []
  mapping = named_columns(spec, names, where)
  cols = {}
  for c, name in mapping.items():
    values = [r.get(name) for r in records]
    try:
      cols[c] = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed or huge: as text
      cols[c] = pa.array([None if v is None else str(v) for v in values], pa.large_string())
  return validate_columns(cols, spec, where, 0, 0, source_rows=False)
