"""One input file of any format into chunks; the timestamp sample for unit detection."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from components.preprocess.sources.common import (
    DEFAULT_BATCH_ROWS, Chunk, InputError, SourceSpec)
from components.preprocess.sources.parquet import read_parquet
from components.preprocess.sources.text import read_lines
from trainers import features

SAMPLE_ROWS = 100_000   # rows read before the job to detect the timestamp unit
SAMPLE_FILES = 8        # from at most this many input files


def read_file(
    path: str,
    file_index: int,
    spec: SourceSpec,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[Chunk]:
  """Reads one input file of any format into chunks of raw events (streaming).

  Parquet goes to :func:`~components.preprocess.sources.parquet.read_parquet`, the
  line-based formats to :func:`~components.preprocess.sources.text.read_lines`
  (arguments and chunks as described there); BigQuery is not read per file.
  """
  if spec.format == "parquet":
    yield from read_parquet(path, file_index, spec, batch_rows)
    return
  if spec.format == "bigquery":
    raise InputError("bigquery input is read by ReadFromBigQuery, not read_file")
  yield from read_lines(path, file_index, spec, batch_rows)


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
