"""Beam plumbing of the ranking (CTR) preprocessing: raw rows -> ranking dataset.

The graph (all runners)::

    files ─► ReadCtr ─pieces─► AssignSplit ─train─► tft Analyze ─► transform_fn/
    (or BQ)   │       ▲         │ every split        │
              │  time cutoffs   └─► TransformDataset ◄┘
              │  (time split)          │
              ├─bad rows─► quarantine/     ShardRows (tf.Examples per batch)
              └─counts──► counts.json        │
                               GroupByKey ─► WriteShards (rows by key)

tf.transform sees train rows only in the analysis (means, standard deviations,
vocabularies) and transforms every split with the result, in one pass: batches carry
their split in a passed-through ``split`` column. Rows travel in Arrow record
batches end to end; examples are encoded per batch (``tfx_bsl``), and Beam shuffles
one element per (batch, shard) rather than one per row.

Determinism: input files are sorted; a row's key is (file index << 40) + line number
(a hash of the row for BigQuery); shard = mix64(key) mod shards; rows in a shard are
sorted by key, and each tf.Example is serialized with its features sorted. Two runs on
the same input write byte-identical shards, vocabularies, quarantine and
``dataset_info.json`` (``transform_fn/`` holds the same graph, whose nodes tf.transform
may list in another order).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
from tensorflow.core.example import example_pb2

from components.preprocess import ctr_sources, ctr_spec, pipeline
from components.preprocess import preprocessing_fn as pfn
from components.preprocess.sources import InputError
from trainers import features
from trainers import ranking_features as rf

STATS_FILE = "dense_stats.json"
_STATS = "stats"
# The sequence pipeline's plumbing, shared: output tags, empty shards, quarantine, counts.
_BAD, _COUNTS = pipeline._BAD, pipeline._COUNTS  # pylint: disable=protected-access
_keyed_shards = pipeline._keyed_shards  # pylint: disable=protected-access
_quarantine_shard = pipeline._quarantine_shard  # pylint: disable=protected-access
_write_quarantine = pipeline._write_quarantine  # pylint: disable=protected-access
_sum_counts = pipeline._sum_counts  # pylint: disable=protected-access
_write_json = pipeline._write_json  # pylint: disable=protected-access


class ReadCtrFiles(beam.DoFn):
  """(file index, path, split) -> pieces; bad rows and counts tagged."""

  def __init__(self, spec: ctr_spec.CtrSpec, batch_rows: int):
    self._spec = spec
    self._batch_rows = batch_rows

  def process(self, element):
    index, path, split = element
    try:
      for piece in ctr_sources.read_file(path, index, self._spec, split, self._batch_rows):
        yield from _piece_outputs(piece)
    except InputError:
      raise
    except Exception as e:  # name the file in whatever escaped the reader
      raise RuntimeError(f"reading {path}: {type(e).__name__}: {e}") from e


def _piece_outputs(piece: ctr_sources.Piece):
  if piece.batch is not None:
    yield piece
  for row in piece.bad_rows:
    yield beam.pvalue.TaggedOutput(_BAD, row)
  yield beam.pvalue.TaggedOutput(_COUNTS, piece.counts)


def _records_to_pieces(records, spec: ctr_spec.CtrSpec):
  yield from _piece_outputs(ctr_sources.records_to_piece(records, spec))


def _distinct_times(piece: ctr_sources.Piece):
  times, counts = np.unique(piece.times, return_counts=True)
  return times, counts


def _merge_times(parts) -> tuple[np.ndarray, np.ndarray]:
  parts = [p for p in parts if p is not None and len(p[0])]
  if not parts:
    return np.zeros(0), np.zeros(0, np.int64)
  times = np.concatenate([p[0] for p in parts])
  counts = np.concatenate([p[1] for p in parts])
  distinct, inverse = np.unique(times, return_inverse=True)
  return distinct, np.bincount(inverse, weights=counts).astype(np.int64)


class AssignSplit(beam.DoFn):
  """A piece -> one batch per split it has rows of, with the ``split`` column.

  Train batches also go to the ``train`` output (tf.transform's analysis).
  """

  def __init__(self, rule: ctr_spec.SplitRule):
    self._rule = rule

  def process(self, piece: ctr_sources.Piece, cutoffs=None):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    batch = piece.batch
    n = batch.num_rows
    if self._rule.kind == "files":
      codes = np.full(n, ctr_sources.SPLIT_CODES[piece.split], np.int8)
    elif self._rule.kind == "time":
      codes = ctr_sources.time_splits(piece.times, cutoffs)
    else:
      keys = batch.column(ctr_sources.ROW_KEY).flatten().to_numpy()
      codes = ctr_sources.random_splits(keys, self._rule.ratios, self._rule.seed)
    for code, split in enumerate(rf.SPLITS):
      mask = codes == code
      if not mask.any():
        continue
      part = batch if mask.all() else batch.filter(pa.array(mask))
      rows = part.num_rows
      column = pa.LargeListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int64)),
                                             pa.array(np.full(rows, code, np.int64)))
      part = pa.RecordBatch.from_arrays([*part.columns, column],
                                        schema=part.schema.append(
                                            pa.field(ctr_sources.SPLIT, column.type)))
      if split == rf.TRAIN:
        yield beam.pvalue.TaggedOutput(rf.TRAIN, part)
      yield part


class ShardRows(pipeline._BundleCounts):  # pylint: disable=protected-access
  """A transformed batch of one split -> ((split, shard), (row keys, tf.Examples))."""

  OUTPUTS = (rf.LABEL, rf.DENSE, rf.DENSE_MISSING, rf.SPARSE)

  def __init__(self, num_shards: int):
    self._num_shards = num_shards
    self._encoder = None

  def setup(self):
    from tfx_bsl.coders import example_coder  # pylint: disable=g-import-not-at-top
    self._encoder = example_coder.RecordBatchToExamplesEncoder()

  def process(self, element):
    batch, _ = element
    names = batch.schema.names
    split = rf.SPLITS[batch.column(ctr_sources.SPLIT)[0][0].as_py()]  # one split per batch
    if pfn.DENSE_MEAN in names and split == rf.TRAIN:
      mean = batch.column(pfn.DENSE_MEAN)[0].as_py()
      std = batch.column(pfn.DENSE_STD)[0].as_py()
      yield beam.pvalue.TaggedOutput(_STATS, (mean, std))
    keep = [n for n in names if n in self.OUTPUTS or n.startswith(rf.MULTI_HOT_PREFIX)]
    # tfx_bsl writes a tf.Example's feature map in hash order; sort it (deterministic).
    records = [example_pb2.Example.FromString(r).SerializeToString(deterministic=True)
               for r in self._encoder.encode(batch.select(keep))]
    keys = batch.column(ctr_sources.ROW_KEY).flatten().to_numpy()
    labels = batch.column(rf.LABEL).flatten().to_numpy()
    shards = (ctr_sources.mix64(keys) % np.uint64(self._num_shards)).astype(np.int64)
    for shard in np.unique(shards):
      idx = np.flatnonzero(shards == shard)
      yield (split, int(shard)), (keys[idx], [records[i] for i in idx])
    self._add({f"examples_{split}": len(keys), f"positives_{split}": int(labels.sum())})


def _write_shard(element, output_dir: str, num_shards: int) -> dict[str, int]:
  """Writes one TFRecord shard, rows sorted by key (ties by their bytes)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  (split, shard), values = element
  rows = sorted((int(k), r) for v in values if v is not None for k, r in zip(*v))
  path = os.path.join(output_dir, features.shard_name(split, shard, num_shards))
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type="GZIP")) as w:
    for _, record in rows:
      w.write(record)
  return {}


def _first(values):
  for v in values:
    if v is not None:
      return v
  return None


def tensor_adapter_config(spec: ctr_spec.CtrSpec):
  """The tf.transform input description of raw ranking batches."""
  from tensorflow_metadata.proto.v0 import schema_pb2  # pylint: disable=g-import-not-at-top
  from tfx_bsl.tfxio import tensor_adapter  # pylint: disable=g-import-not-at-top
  reps = {}

  def dense(column):
    rep = schema_pb2.TensorRepresentation()
    rep.dense_tensor.column_name = column
    rep.dense_tensor.shape.SetInParent()
    reps[column] = rep

  dense(ctr_sources.LABEL_COLUMN)
  if spec.dense:
    rep = schema_pb2.TensorRepresentation()
    rep.sparse_tensor.dense_shape.dim.add().size = len(spec.dense)
    rep.sparse_tensor.index_column_names.append(ctr_sources.DENSE_INDEX)
    rep.sparse_tensor.value_column_name = ctr_sources.DENSE_VALUE
    reps[ctr_sources.DENSE_INPUT] = rep
  for name in spec.categorical:
    dense(spec.input_column(name))
  for name in spec.multi_hot_names:
    rep = schema_pb2.TensorRepresentation()
    rep.ragged_tensor.feature_path.step.append(spec.input_column(name))
    reps[spec.input_column(name)] = rep
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  schema = ctr_sources.arrow_schema(spec).append(
      pa.field(ctr_sources.SPLIT, pa.large_list(pa.int64())))
  return tensor_adapter.TensorAdapterConfig(schema, reps)


def build(
    p: beam.Pipeline,
    *,
    files: Sequence[tuple[str, str | None]],
    bigquery: Any,
    spec: ctr_spec.CtrSpec,
    rule: ctr_spec.SplitRule,
    output_dir: str,
    temp_dir: str,
    num_shards: int,
    batch_rows: int,
) -> None:
  """Adds the ranking preprocessing graph to ``p``; results land in ``output_dir``.

  ``files`` are ``(path, split)`` (split None unless the input is pre-split). Counts
  go to ``temp_dir/counts.json``, the dense statistics to ``temp_dir/dense_stats.json``.
  """
  import tensorflow_transform.beam as tft_beam  # pylint: disable=g-import-not-at-top

  if bigquery is not None:
    read = (p | "ReadBigQuery" >> bigquery
            | "Batch" >> beam.BatchElements(min_batch_size=batch_rows,
                                            max_batch_size=batch_rows)
            | "RowsToPieces" >> beam.FlatMap(_records_to_pieces, spec)
            .with_outputs(_BAD, _COUNTS, main="pieces"))
  else:
    elements = [(i, path, split) for i, (path, split) in enumerate(files)]
    read = (p | "Files" >> beam.Create(elements, reshuffle=len(files) > 1)
            | "Read" >> beam.ParDo(ReadCtrFiles(spec, batch_rows))
            .with_outputs(_BAD, _COUNTS, main="pieces"))

  side = []
  if rule.kind == "time":
    ratios = rule.ratios
    cutoffs = (read.pieces
               | "DistinctTimes" >> beam.Map(_distinct_times)
               | "MergeTimes" >> beam.CombineGlobally(_merge_times)
               | "Cutoffs" >> beam.Map(lambda tc: ctr_sources.time_cutoffs(*tc, ratios)))
    side = [beam.pvalue.AsSingleton(cutoffs)]
  split = (read.pieces | "AssignSplit" >> beam.ParDo(AssignSplit(rule), *side)
           .with_outputs(rf.TRAIN, main="all"))

  config = tensor_adapter_config(spec)
  passthrough = {ctr_sources.ROW_KEY, ctr_sources.SPLIT}
  with tft_beam.Context(temp_dir=temp_dir, passthrough_keys=passthrough):
    preprocessing_fn = pfn.make_ctr_preprocessing_fn(spec)
    transform_fn = ((split[rf.TRAIN], config)
                    | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing_fn))
    transformed, _ = (((split.all, config), transform_fn)
                      | "Transform" >> tft_beam.TransformDataset(output_record_batches=True))
    _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)
  rows = (transformed | "ShardRows" >> beam.ParDo(ShardRows(num_shards))
          .with_outputs(_COUNTS, _STATS, main="rows"))

  shard_keys = [(s, k) for s in rf.SPLITS for k in range(num_shards)]
  written = ((rows.rows, _keyed_shards(p, "Shard", shard_keys))
             | "FlattenShards" >> beam.Flatten()
             | "GroupByShard" >> beam.GroupByKey()
             | "WriteShards" >> beam.Map(_write_shard, output_dir, num_shards))

  quarantined = (
      (read[_BAD] | "KeyBad" >> beam.Map(lambda r: (_quarantine_shard(r, num_shards), r)),
       _keyed_shards(p, "Quarantine", range(num_shards)))
      | "FlattenBad" >> beam.Flatten()
      | "GroupBad" >> beam.GroupByKey()
      | "WriteQuarantine" >> beam.Map(_write_quarantine, output_dir, num_shards))

  _ = ((read[_COUNTS], rows[_COUNTS], written, quarantined)
       | "FlattenCounts" >> beam.Flatten()
       | "SumCounts" >> beam.CombineGlobally(_sum_counts)
       | "WriteCounts" >> beam.Map(_write_json, os.path.join(temp_dir, pipeline.COUNTS_FILE)))
  if spec.dense:
    _ = (rows[_STATS]
         | "FirstStats" >> beam.CombineGlobally(_first)
         | "WriteStats" >> beam.Map(
             lambda s: _write_json({"mean": s[0], "std": s[1]} if s else {},
                                   os.path.join(temp_dir, STATS_FILE))))
