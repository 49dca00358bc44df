"""Beam plumbing of the preprocessing step: raw events -> sequence dataset.

The graph (all runners)::

    files ─► ReadFiles ──batches──► tf.transform Analyze ─► transform_fn/
      (or BigQuery)  │                    │
                     │            TransformDataset (RecordBatches)
                     │                    │
                     │            GroupBatchByUser (numpy, per batch)
                     │                    │ (raw user, partial sequence)
                     │            GroupByKey ─► UserSequences ─► features.user_examples
                     │                                   │ ((split, shard), example)
                     ├─bad rows─► quarantine/*.jsonl      ▼
                     └─counts──► counts.json        WriteShards (sorted by user)

Timestamps travel in the input's unit (``spec.timestamp_unit``), so events are
ordered at full precision; ``UserSequences`` turns them into seconds (floor)
when it writes the examples. ``counts.json`` also holds the quarantined rows
per reason kind (keys ``QUARANTINE_PREFIX + kind``), counted from what the
quarantine files hold.

Speed comes from keeping events in Arrow batches: the reader yields record
batches, tf.transform analyses and transforms whole batches (vocabularies count
unique tokens per batch in TensorFlow), and the per-user grouping first groups
inside each batch with numpy, so Beam shuffles one element per (user, batch)
instead of one per event.

Determinism: input files are sorted, events are ordered by (timestamp, input
order, item), shard = user index mod shards, examples in a shard are sorted by
(user index, raw user id), quarantine rows by (file, line). Two runs on the
same input write byte-identical shards, vocabularies, quarantine and
``dataset_info.json``.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from components.preprocess import sources
from trainers import features

QUARANTINE_DIR = "quarantine"
COUNTS_FILE = "counts.json"
QUARANTINE_PREFIX = "quarantined: "  # counts.json keys of quarantined rows per reason kind
_BAD, _COUNTS = "bad", "counts"


# ---------------------------------------------------------------------------
# Pipeline options
# ---------------------------------------------------------------------------


def pipeline_flags(
    runner: str = "DirectRunner",
    *,
    project: str | None = None,
    region: str | None = None,
    temp_location: str | None = None,
    machine_type: str | None = None,
    sdk_container_image: str | None = None,
    job_name: str | None = None,
    max_num_workers: int | None = None,
    direct_num_workers: int = 1,
    direct_running_mode: str = "in_memory",
    extra_args: Sequence[str] = (),
) -> list[str]:
  """The Beam command-line flags for a runner.

  DirectRunner runs in memory in one worker by default (the fastest mode for
  batch-oriented work on a few cores); DataflowRunner gets the project, region,
  temp location, worker machine type and SDK container image passed through.

  Beam's ``DirectRunner`` first tries the Prism runner, which downloads a Go binary
  from GitHub at run time (offline: a failed download, then a fallback; online: another
  runner), and otherwise runs batch pipelines such as ours on ``FnApiRunner``. The flags
  name ``FnApiRunner`` directly, so a local run is the same on any machine.
  """
  flags = [f"--runner={runner}"]
  if runner == "DirectRunner":
    flags = ["--runner=FnApiRunner", f"--direct_num_workers={direct_num_workers}",
              f"--direct_running_mode={direct_running_mode}"]
  elif runner == "DataflowRunner":
    missing = [n for n, v in (("project", project), ("region", region),
                              ("temp_location", temp_location)) if not v]
    if missing:
      raise ValueError(f"DataflowRunner needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
  for name, value in (("project", project), ("region", region),
                      ("temp_location", temp_location),
                      ("machine_type", machine_type),
                      ("sdk_container_image", sdk_container_image),
                      ("job_name", job_name), ("max_num_workers", max_num_workers)):
    if value is not None:
      flags.append(f"--{name}={value}")
  return flags + list(extra_args)


def pipeline_options(*args, **kwargs) -> PipelineOptions:
  """``PipelineOptions`` from :func:`pipeline_flags`'s arguments."""
  return PipelineOptions(pipeline_flags(*args, **kwargs))


# ---------------------------------------------------------------------------
# DoFns
# ---------------------------------------------------------------------------


class _BundleCounts(beam.DoFn):
  """A DoFn that sums counts over a bundle and emits them once, tagged."""

  def start_bundle(self):
    self._counts: dict[str, int] = {}

  def _add(self, counts: dict[str, int]):
    for k, v in counts.items():
      self._counts[k] = self._counts.get(k, 0) + int(v)

  def finish_bundle(self):
    if self._counts:
      yield beam.pvalue.TaggedOutput(_COUNTS, WindowedValue(
          dict(self._counts), window.GlobalWindow().max_timestamp(),
          [window.GlobalWindow()]))


class ReadFiles(beam.DoFn):
  """(file index, path) -> raw record batches; bad rows and counts tagged."""

  def __init__(self, spec: sources.SourceSpec, batch_rows: int):
    self._spec = spec
    self._batch_rows = batch_rows

  def process(self, element):
    index, path = element
    try:
      for chunk in sources.read_file(path, index, self._spec, self._batch_rows):
        if chunk.batch is not None:
          yield chunk.batch
        for row in chunk.bad_rows:
          yield beam.pvalue.TaggedOutput(_BAD, row)
        yield beam.pvalue.TaggedOutput(_COUNTS, chunk.counts)
    except sources.InputError:
      raise
    except Exception as e:  # name the file in whatever escaped the reader
      raise RuntimeError(f"reading {path}: {type(e).__name__}: {e}") from e


class RecordsToBatch(beam.DoFn):
  """A list of BigQuery rows -> one raw record batch; bad rows and counts tagged."""

  def __init__(self, spec: sources.SourceSpec, where: str):
    self._spec = spec
    self._where = where

  def process(self, records):
    chunk = sources.records_to_batch(records, self._spec, self._where)
    if chunk.batch is not None:
      yield chunk.batch
    for row in chunk.bad_rows:
      yield beam.pvalue.TaggedOutput(_BAD, row)
    yield beam.pvalue.TaggedOutput(_COUNTS, chunk.counts)


def _flat(column) -> np.ndarray:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
    column = column.flatten()
  return column.to_numpy(zero_copy_only=False)


class GroupBatchByUser(_BundleCounts):
  """A transformed batch -> (raw user, (user index, items, timestamps, order))."""

  def process(self, element):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    batch, _ = element
    user_ids = _flat(batch.column(features.USER_ID)).astype(np.int64)
    items = _flat(batch.column("item_id")).astype(np.int64)
    stamps = _flat(batch.column(features.RAW_TIMESTAMP)).astype(np.int64)
    order = _flat(batch.column(sources.EVENT_ORDER)).astype(np.int64)
    raw = batch.column(sources.USER_KEY)
    if pa.types.is_list(raw.type) or pa.types.is_large_list(raw.type):
      raw = raw.flatten()
    encoded = pc.dictionary_encode(raw)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    perm = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.diff(codes[perm])) + 1
    for group in np.split(perm, starts):
      if not len(group):
        continue
      yield (names[codes[group[0]]],
             (int(user_ids[group[0]]), items[group], stamps[group], order[group]))
    self._add({"events_parsed": len(items),
               "events_oov": int(np.count_nonzero(items == features.OOV_ID))})


class UserSequences(_BundleCounts):
  """(raw user, partial sequences) -> ((split, shard), (user, raw user, example)).

  Events are ordered by their timestamps in the input's unit; the examples get
  them in seconds (``timestamp // units_per_second``).
  """

  def __init__(self, max_len: int, num_shards: int, units_per_second: int = 1):
    self._max_len = max_len
    self._num_shards = num_shards
    self._per_second = units_per_second

  def process(self, element):
    raw_user, parts = element
    parts = sorted(parts, key=lambda p: int(p[3][0]))  # deterministic concatenation
    user_id = parts[0][0]
    items = np.concatenate([p[1] for p in parts])
    stamps = np.concatenate([p[2] for p in parts])
    order = np.concatenate([p[3] for p in parts])
    n = len(items)
    if n < features.MIN_EVENTS_PER_USER:
      self._add({"users_too_few_events": 1, "events_dropped_short_users": n})
      return
    perm = np.lexsort((items, order, stamps))  # timestamp, then input order, then item
    # The sequences read the last max_len + 3 events; the valid/test examples' seen
    # items read every event, so the whole sequence goes to user_examples.
    window_len = self._max_len + 3
    counts = {"users": 1, "events_kept": n,
              "events_beyond_max_len": max(0, n - window_len)}
    if n - 2 < 2:
      counts["users_without_train"] = 1
    self._add(counts)
    shard = user_id % self._num_shards
    seconds = stamps[perm] if self._per_second == 1 else stamps[perm] // self._per_second
    for split, example in features.user_examples(
        user_id, items[perm], seconds, self._max_len):
      yield (split, shard), (user_id, raw_user, example)


def _write_shard(element, output_dir: str, num_shards: int):
  """Writes one TFRecord shard, examples sorted by (user, raw user)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  (split, shard), values = element
  records = sorted(v for v in values if v is not None)
  path = os.path.join(output_dir, features.shard_name(split, shard, num_shards))
  tf.io.gfile.makedirs(os.path.dirname(path))
  options = tf.io.TFRecordOptions(compression_type="GZIP")
  with tf.io.TFRecordWriter(path, options) as w:
    for _, _, example in records:
      w.write(example)
  return {f"examples_{split}": len(records)}


def _quarantine_shard(row: dict[str, Any], num_shards: int) -> int:
  return zlib.crc32(f"{row['file']}:{row['line']}".encode()) % num_shards


def quarantine_name(shard: int, num_shards: int) -> str:
  return os.path.join(QUARANTINE_DIR, f"part-{shard:05d}-of-{num_shards:05d}.jsonl")


def _write_quarantine(element, output_dir: str, num_shards: int) -> dict[str, int]:
  """Writes one quarantine shard; returns its rows per reason kind."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  shard, rows = element
  rows = sorted((r for r in rows if r is not None),
                key=lambda r: (r["file"], r["line"] or 0, r["raw"], r["reason"]))
  path = os.path.join(output_dir, quarantine_name(shard, num_shards))
  kinds: dict[str, int] = {}
  with FileSystems.create(path) as f:
    for r in rows:
      f.write((json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
      key = QUARANTINE_PREFIX + sources.reason_kind(r["reason"])
      kinds[key] = kinds.get(key, 0) + 1
  return kinds


def _sum_counts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
  total: dict[str, int] = {}
  for d in dicts:
    for k, v in d.items():
      total[k] = total.get(k, 0) + int(v)
  return total


def _write_json(value: dict[str, Any], path: str):
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  with FileSystems.create(path) as f:
    f.write(json.dumps(value, sort_keys=True, indent=2).encode("utf-8"))


def _keyed_shards(p, label: str, keys: Sequence[Any]):
  """One (key, None) per shard, so that empty shards are written too."""
  return (p | f"{label}Keys" >> beam.Create(list(keys), reshuffle=False)
          | f"{label}Pair" >> beam.Map(lambda k: (k, None)))


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def tensor_adapter_config(side_columns: Sequence[str]):
  """The tf.transform input description of raw record batches."""
  from tensorflow_metadata.proto.v0 import schema_pb2  # pylint: disable=g-import-not-at-top
  from tfx_bsl.tfxio import tensor_adapter  # pylint: disable=g-import-not-at-top
  reps = {}
  for column in (features.RAW_USER, features.RAW_ITEM, *side_columns):
    rep = schema_pb2.TensorRepresentation()
    rep.dense_tensor.column_name = column
    rep.dense_tensor.shape.SetInParent()
    reps[column] = rep
  return tensor_adapter.TensorAdapterConfig(sources.raw_arrow_schema(side_columns), reps)


def build(
    p: beam.Pipeline,
    *,
    files: Sequence[str],
    bigquery: Any,
    spec: sources.SourceSpec,
    output_dir: str,
    temp_dir: str,
    preprocessing_fn,
    max_len: int,
    num_shards: int,
    batch_rows: int,
) -> None:
  """Adds the preprocessing graph to ``p``; results land in ``output_dir``."""
  import tensorflow_transform.beam as tft_beam  # pylint: disable=g-import-not-at-top

  if bigquery is not None:
    read = (p | "ReadBigQuery" >> bigquery
            | "Batch" >> beam.BatchElements(min_batch_size=batch_rows,
                                            max_batch_size=batch_rows)
            | "RowsToBatches" >> beam.ParDo(RecordsToBatch(spec, "bigquery"))
            .with_outputs(_BAD, _COUNTS, main="batches"))
  else:
    read = (p | "Files" >> beam.Create(list(enumerate(files)), reshuffle=len(files) > 1)
            | "Read" >> beam.ParDo(ReadFiles(spec, batch_rows))
            .with_outputs(_BAD, _COUNTS, main="batches"))

  config = tensor_adapter_config(spec.side_columns)
  passthrough = {sources.USER_KEY, features.RAW_TIMESTAMP, sources.EVENT_ORDER}
  with tft_beam.Context(temp_dir=temp_dir, passthrough_keys=passthrough):
    transform_fn = (read.batches, config) | "Analyze" >> tft_beam.AnalyzeDataset(
        preprocessing_fn)
    transformed, _ = (((read.batches, config), transform_fn)
                      | "Transform" >> tft_beam.TransformDataset(output_record_batches=True))
    _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)

  grouped = (transformed
             | "GroupBatchByUser" >> beam.ParDo(GroupBatchByUser()).with_outputs(
                 _COUNTS, main="parts"))
  sequences = (grouped.parts
               | "GroupByUser" >> beam.GroupByKey()
               | "UserSequences" >> beam.ParDo(UserSequences(
                   max_len, num_shards, sources.TIMESTAMP_UNITS[spec.timestamp_unit or "s"]))
               .with_outputs(_COUNTS, main="examples"))
  shard_keys = [(s, k) for s in features.SPLITS for k in range(num_shards)]
  written = ((sequences.examples, _keyed_shards(p, "Shard", shard_keys))
             | "FlattenShards" >> beam.Flatten()
             | "GroupByShard" >> beam.GroupByKey()
             | "WriteShards" >> beam.Map(_write_shard, output_dir, num_shards))

  q_shards = num_shards
  quarantined = (
      (read[_BAD] | "KeyBad" >> beam.Map(lambda r: (_quarantine_shard(r, q_shards), r)),
       _keyed_shards(p, "Quarantine", range(q_shards)))
      | "FlattenBad" >> beam.Flatten()
      | "GroupBad" >> beam.GroupByKey()
      | "WriteQuarantine" >> beam.Map(_write_quarantine, output_dir, q_shards))

  _ = ((read[_COUNTS], grouped[_COUNTS], sequences[_COUNTS], written, quarantined)
       | "FlattenCounts" >> beam.Flatten()
       | "SumCounts" >> beam.CombineGlobally(_sum_counts)
       | "WriteCounts" >> beam.Map(_write_json, os.path.join(temp_dir, COUNTS_FILE)))
