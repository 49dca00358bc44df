"""Parquet files: streamed in record batches, columns found by name."""

from __future__ import annotations

from typing import Iterator

from components.preprocess.sources.common import Chunk, SourceSpec, filesystems
from components.preprocess.sources.typed import named_columns, validate_columns


def read_parquet(path: str, file_index: int, spec: SourceSpec,
                  batch_rows: int) -> Iterator[Chunk]:
  """Reads one Parquet file (local or gs://) into chunks; ``line`` is the 1-based row."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  with filesystems().open(path) as f:
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    mapping = named_columns(spec, names, path)
    row = 0
    for table_batch in pf.iter_batches(batch_size=batch_rows,
                                       columns=sorted(set(mapping.values()))):
      cols = {c: table_batch.column(mapping[c]) for c in mapping}
      chunk = validate_columns(cols, spec, path, file_index, row, source_rows=True)
      row += table_batch.num_rows
      yield chunk
