"""Raw event sources: input resolution, format detection and row parsing.

Every file format is read by one streaming function, :func:`read_file`, that
turns a file (local path or ``gs://``, plain, gzipped, or a member of an
official MovieLens ``.zip``) into Arrow record batches of raw events plus the
rejected rows with their reasons. The Beam pipeline calls it in a ``DoFn`` (one
element per file); tests call it directly. BigQuery rows come as dicts from
``ReadFromBigQuery`` and go through :func:`records_to_batch`.

One module per job; this package re-exports their public names:

- ``common``: the contract: ``SourceSpec`` / ``ColumnMapping``, ``InputError``,
  value checks and quarantine reasons, ``bad_row`` (a quarantine record),
  timestamp-unit detection, ``Chunk`` and the raw Arrow batch, file helpers.
- ``resolve``: ``--input`` (file, glob, MovieLens folder) to files, and their format.
- ``text``: the line-based formats (MovieLens ``::``, ``u.data``, CSV, pairs,
  sequences; plain, gzip or zip) and the line streaming they share.
- ``typed``: column lookup and checks of typed Arrow columns (Parquet, BigQuery).
- ``parquet``, ``bigquery``: those inputs.
- ``reader``: :func:`read_file` (one file, any format) and the timestamp sample.
"""

from components.preprocess.sources.bigquery import (
    bigquery_read, is_bigquery_ref, records_to_batch, table_spec)
from components.preprocess.sources.common import (
    COLUMN_ALIASES, DEFAULT_BATCH_ROWS, EVENT_ORDER, FORMATS, INT64_MAX, INT64_MIN,
    INTEGER_ID_FORMATS, MAX_RAW_CHARS, MAX_SECONDS, OPTIONAL_COLUMNS, ORDER_FILE_SHIFT,
    TIMESTAMP_UNITS, USER_KEY, Chunk, ColumnMapping, InputError, SourceSpec, bad_row,
    detect_timestamp_unit, filesystems, id_reason, iter_jsonl, make_batch, parse_int,
    raw_arrow_schema, reason_kind, timestamp_reason)
from components.preprocess.sources.parquet import read_parquet
from components.preprocess.sources.reader import (
    SAMPLE_FILES, SAMPLE_ROWS, read_file, sample_timestamps)
from components.preprocess.sources.resolve import (
    FOLDER_PATTERNS, MOVIELENS_FILES, detect_format, resolve_format, resolve_input,
    zip_member)
from components.preprocess.sources.text import (
    READ_CHUNK_BYTES, content_lines, line_blocks, open_lines, read_lines, sniff_delimiter,
    split_lines)
