"""The ranking (CTR) preprocessing step as a plain function: :func:`run`.

``components.preprocess.run(..., task="ranking", ranking={...})`` and
``recml preprocess --task ranking`` call it. It resolves the input (files and their
splits, format, column spec) up front, runs the Beam graph of
:mod:`components.preprocess.ctr_pipeline`, applies the bad-row threshold, and writes
``vocab/<feature>.txt`` and ``dataset_info.json`` (``trainers.ranking_features``).
Output is staged in ``<output>.partial`` and published on success, as for the
sequence dataset (:func:`components.preprocess.step.staged_output`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

from components.preprocess import ctr_spec, step
from components.preprocess.sources import (
    DEFAULT_BATCH_ROWS, InputError, bigquery_read, is_bigquery_ref)
from trainers import ranking_features as rf

ROW_COUNTS = ("rows_read", "rows_quarantined", "blank_lines", "header_lines")


@dataclasses.dataclass
class RankingResult:
  """What the step produced (the KFP wrapper copies it into its artifacts)."""

  output_dir: str
  info: rf.RankingInfo
  markdown: str
  seconds: float = 0.0

  @property
  def counts(self) -> dict[str, int]:
    return dict(self.info.rows)

  def metrics(self) -> dict[str, float]:
    """Flat numbers for a KFP ``Metrics`` artifact."""
    out = {k: float(v) for k, v in sorted(self.info.rows.items())}
    out.update({f"quarantined_{step._slug(k)}": float(v)  # pylint: disable=protected-access
                for k, v in sorted(self.info.quarantine.items())})
    out.update({f"examples_{s}": float(n) for s, n in self.info.counts.items()})
    out.update({f"label_rate_{s}": float(r) for s, r in self.info.label_rate.items()})
    out.update({f"vocab_size_{f.name}": float(f.vocab_size) for f in self.info.categorical})
    return out

  def to_dict(self) -> dict[str, Any]:
    return {"output_dir": self.output_dir, "task": rf.TASK, "info": self.info.to_dict(),
            "markdown": self.markdown, "seconds": self.seconds}


def run(
    input_path: str,
    output_dir: str,
    *,
    format: str | None = None,  # pylint: disable=redefined-builtin
    label: str | None = None,
    dense: str | Sequence[str] = (),
    categorical: str | Sequence[str] = (),
    multi_hot: str | Sequence[str] = (),
    multi_hot_separator: str = rf.DEFAULT_MULTI_HOT_SEPARATOR,
    hash_buckets: str | Sequence[str] = (),
    min_count: str | Sequence[str] = (),
    split: str = "auto",
    split_ratios: str | Sequence[float] | None = None,
    split_seed: int = 0,
    time_column: str | None = None,
    delimiter: str | None = None,
    header: bool | None = None,
    bad_rows_threshold: float = step.DEFAULT_BAD_ROWS_THRESHOLD,
    num_shards: int | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    runner: str = "DirectRunner",
    project: str | None = None,
    bigquery_method: str = "DIRECT_READ",
    pipeline_args: Sequence[str] = (),
    **cloud: Any,
) -> RankingResult:
  """Turns raw CTR rows into the ranking dataset of ``trainers.ranking_features``.

  Args:
    input_path: a file, a glob, a folder (its ``.csv``/``.tsv``/``.txt``/``.parquet``
      files; named ``train*``/``valid*``/``test*`` = pre-split), or for BigQuery
      ``bq://project.dataset.table`` or a ``SELECT`` query.
    output_dir: the dataset directory (local or ``gs://``), replaced on success.
    format: ``criteo``, ``csv``, ``parquet`` or ``bigquery``; detected when None
      (Criteo: 40 tab-separated fields with a 0/1 label and no ``label`` given).
    label: the label column (0/1); Criteo's is fixed.
    dense: numeric columns (``"a,b"`` or a list): ``log1p(max(x, 0))``, z-scored with
      train statistics, plus a missing indicator.
    categorical: one-value categorical columns; default: every column that has no
      other role.
    multi_hot: list columns as ``COLUMN:SIZE`` (truncated / 0-padded to SIZE).
    multi_hot_separator: separator of list values in text columns.
    hash_buckets: ``N`` (hash every categorical feature into N buckets) and/or
      ``FEATURE=N``; the other features get a vocabulary.
    min_count: ``N`` (default: 10 for Criteo, else 2) and/or ``FEATURE=N``: vocabulary
      values seen fewer times in train map to OOV.
    split: ``auto`` (pre-split files when their names say so, else random),
      ``files``, ``random`` or ``time``.
    split_ratios: train/valid/test ratios of random and time splits (0.8, 0.1, 0.1).
    split_seed: seed of the random split.
    time_column: the column that orders rows for ``split="time"`` (numbers or ISO 8601;
      implies the time split when ``split`` is ``auto``).
    delimiter, header: CSV layout (detected when None).
    bad_rows_threshold: fail when quarantined / read rows exceeds this.
    num_shards: TFRecord shards per split; default from the input size.
    batch_rows: rows per Arrow record batch.
    runner, project, bigquery_method, pipeline_args, and in ``cloud``: region,
      temp_location, machine_type, sdk_container_image: as for the sequence dataset
      (:func:`components.preprocess.step.run`).

  Returns:
    A :class:`RankingResult`.

  Raises:
    InputError: missing or empty input, a bad column spec or split, no train row.
    step.BadInputError: the bad-row fraction is above ``bad_rows_threshold``.
  """
  start = time.perf_counter()
  if not 0.0 <= bad_rows_threshold <= 1.0:
    raise InputError(f"--bad-rows-threshold must be in [0, 1], got {bad_rows_threshold}")
  if split not in ctr_spec.SPLIT_KINDS:
    raise InputError(f"--split must be one of {', '.join(ctr_spec.SPLIT_KINDS)}, "
                     f"got {split!r}")
  if format is not None and format not in ctr_spec.CTR_FORMATS:
    raise InputError(f"unknown ranking --format {format!r}: use one of "
                     f"{', '.join(ctr_spec.CTR_FORMATS)}")
  ratios = ctr_spec.parse_ratios(split_ratios)
  time_column = time_column or None
  if time_column and split == "auto":
    split = "time"
  if split == "time" and not time_column:
    raise InputError("--split time needs --time-column")

  bigquery, files, file_splits = None, [], {}
  if format == "bigquery" or (format is None and is_bigquery_ref(input_path)):
    fmt, names = "bigquery", None
    if split in ("auto", "files"):
      split = "random" if split == "auto" else split
    if split == "files":
      raise InputError("BigQuery input cannot be pre-split: use --split random or time")
    bigquery = bigquery_read(input_path, method=bigquery_method, project=project)
    shards = num_shards or step.BIGQUERY_SHARDS
  else:
    matched = [(p, size) for p, size in ctr_spec.resolve_files(input_path)]
    if all(size == 0 for _, size in matched):
      raise InputError(f"--input {input_path!r} is empty ({len(matched)} file(s), 0 bytes)")
    files = [p for p, _ in matched]
    split, file_splits = ctr_spec.assign_file_splits(files, split)
    if split == "files" and time_column:
      raise InputError("--time-column splits rows by time, but the input is pre-split "
                       "(train/valid/test files): drop one of them")
    fmt = format or ctr_spec.detect_format(files, label)
    names, delimiter, header = ctr_spec.column_names(fmt, files[0], delimiter, header)
    total = sum(size for _, size in matched)
    shards = num_shards or max(1, min(step.MAX_SHARDS,
                                      math.ceil(total / step.BYTES_PER_SHARD)))
  spec = ctr_spec.resolve_spec(
      fmt, names, label=label, dense=ctr_spec.parse_list(dense),
      categorical=ctr_spec.parse_list(categorical),
      multi_hot=ctr_spec.parse_multi_hot(multi_hot), hash_buckets=hash_buckets,
      min_count=min_count, separator=multi_hot_separator, delimiter=delimiter,
      header=header, time_column=time_column, where=files[0] if files else input_path)
  if fmt == "parquet":
    ctr_spec.check_parquet_types(files[0], spec)
  rule = ctr_spec.SplitRule(kind=split, ratios=ratios, seed=int(split_seed))

  with step.staged_output(output_dir) as work_dir:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from components.preprocess import ctr_pipeline, pipeline  # pylint: disable=g-import-not-at-top
    from components.preprocess import preprocessing_fn as pfn  # pylint: disable=g-import-not-at-top

    temp_dir = os.path.join(work_dir, ".tmp")
    options = pipeline.pipeline_options(runner, project=project, extra_args=pipeline_args,
                                        **cloud)
    with beam.Pipeline(options=options) as p:
      ctr_pipeline.build(
          p, files=[(f, file_splits.get(f)) for f in files], bigquery=bigquery, spec=spec,
          rule=rule, output_dir=work_dir, temp_dir=temp_dir, num_shards=shards,
          batch_rows=batch_rows)

    with tf.io.gfile.GFile(os.path.join(temp_dir, pipeline.COUNTS_FILE)) as f:
      counts = {k: int(v) for k, v in json.load(f).items()}
    stats = {}
    if spec.dense:
      with tf.io.gfile.GFile(os.path.join(temp_dir, ctr_pipeline.STATS_FILE)) as f:
        stats = json.load(f)
    tf.io.gfile.rmtree(temp_dir)
    prefix = pipeline.QUARANTINE_PREFIX
    quarantine = {k[len(prefix):]: counts.pop(k) for k in sorted(counts) if k.startswith(prefix)}
    examples = {s: counts.get(f"examples_{s}", 0) for s in rf.SPLITS}
    positives = {s: counts.get(f"positives_{s}", 0) for s in rf.SPLITS}
    rows = {k: counts.get(k, 0) for k in ROW_COUNTS}
    rows["rows_kept"] = rows["rows_read"] - rows["rows_quarantined"]
    where = input_path if bigquery is not None else ", ".join(files[:3]) + (
        f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    if rows["rows_read"] == 0:
      raise InputError(f"no rows in {where}: the input holds only blank or header lines")
    if rows["rows_quarantined"] / rows["rows_read"] > bad_rows_threshold:
      raise step.BadInputError(step._bad_rows_message(  # pylint: disable=protected-access
          work_dir, shards, rows, bad_rows_threshold))
    if examples[rf.TRAIN] == 0:
      raise InputError(f"no train row in {where}: the split left train empty")

    step.canonicalize_saved_model(os.path.join(work_dir, "transform_fn"))
    vocab_sizes = _write_vocabularies(work_dir, spec)
    dense_features = [rf.DenseFeature(name, float(m), float(s))
                      for name, m, s in zip(spec.dense, stats.get("mean", []),
                                            stats.get("std", []))]
    if len(dense_features) != len(spec.dense):  # train has rows, so stats were written
      raise RuntimeError(f"dense statistics missing from the run: {stats}")
    source = {"input": input_path, "format": fmt, "num_files": len(files)}
    if 0 < len(files) <= 100:
      source["files"] = files
    params = {
        "format": fmt, "label": spec.label, "dense": list(spec.dense),
        "categorical": list(spec.categorical), "multi_hot": [list(m) for m in spec.multi_hot],
        "hash_buckets": dict(spec.hash_buckets), "min_count": dict(spec.min_count),
        "multi_hot_separator": spec.separator, "time_column": spec.time_column,
        "split": rule.to_dict(), "delimiter": delimiter, "header": header,
        "bad_rows_threshold": bad_rows_threshold, "num_shards": shards,
        "dense_transform": "(log1p(max(x, 0)) - train mean) / train std; missing -> 0",
        "vocabulary_order": step.TIE_RULE,
        "hash": "FIRST_ID + blake2b-64(value) mod buckets",
    }
    info = rf.RankingInfo(
        label=spec.label, dense=dense_features,
        categorical=spec.categorical_features(vocab_sizes), counts=examples,
        label_rate={s: (positives[s] / examples[s] if examples[s] else 0.0)
                    for s in rf.SPLITS},
        quarantine=quarantine, rows=dict(sorted(rows.items())), source=source,
        params=params, multi_hot_separator=spec.separator)
    info.save(work_dir)
  seconds = time.perf_counter() - start
  return RankingResult(output_dir=output_dir, info=info, markdown=summary_markdown(info),
                       seconds=seconds)


def identity_params(info: rf.RankingInfo) -> dict[str, Any]:
  """The parameters that make a ranking dataset what it is (for its dataset id).

  What the examples depend on: the format, the column spec and encodings, the split.
  Not where the input lives (the fingerprint covers the content), sharding or the
  bad-rows threshold.
  """
  keys = ("format", "label", "dense", "categorical", "multi_hot", "hash_buckets",
          "min_count", "multi_hot_separator", "time_column", "split")
  return {"task": rf.TASK, **{k: info.params.get(k) for k in keys}}


def _write_vocabularies(work_dir: str, spec: ctr_spec.CtrSpec) -> dict[str, int]:
  """``vocab/<feature>.txt`` from tf.transform's assets; returns the table sizes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from components.preprocess import preprocessing_fn as pfn  # pylint: disable=g-import-not-at-top
  from tensorflow_transform import analyzers  # pylint: disable=g-import-not-at-top
  _, dummy = analyzers.get_empy_vocabulary_dummy_value(tf.string)
  assets = os.path.join(work_dir, "transform_fn", "assets")
  tf.io.gfile.makedirs(os.path.join(work_dir, rf.VOCAB_DIR))
  sizes = {}
  for index, name in enumerate((*spec.categorical, *spec.multi_hot_names)):
    if spec.is_hashed(name):
      continue
    path = os.path.join(assets, pfn.ctr_vocab_name(index))
    tokens = step._read_vocab(path)  # pylint: disable=protected-access
    if tokens == [dummy.decode()]:  # tf.transform's stand-in for an empty vocabulary
      tokens = []
    lines = [*rf.VOCAB_HEAD, *tokens]
    with tf.io.gfile.GFile(os.path.join(work_dir, rf.vocab_file(name)), "w") as f:
      f.write("".join(f"{t}\n" for t in lines))
    sizes[name] = len(lines)
  return sizes


def summary_markdown(info: rf.RankingInfo) -> str:
  """A short Markdown summary for the KFP ``Markdown`` artifact and the CLI."""
  r = info.rows
  read = max(r.get("rows_read", 0), 1)
  lines = [
      "## Preprocessed ranking dataset",
      "",
      f"Source: `{info.source.get('input')}` ({info.source.get('format')}); label "
      f"`{info.label}`, {len(info.dense)} dense and {len(info.categorical)} categorical "
      f"features; split {info.params.get('split', {}).get('kind')}.",
      "",
      "| | count |",
      "|---|---:|",
      f"| rows read | {r.get('rows_read', 0):,} |",
      f"| rows kept | {r.get('rows_kept', 0):,} |",
      f"| rows quarantined | {r.get('rows_quarantined', 0):,} "
      f"({r.get('rows_quarantined', 0) / read:.2%}) |",
      *[f"| quarantined: {kind} | {n:,} |" for kind, n in sorted(info.quarantine.items())],
      *[f"| {s} examples (label rate {info.label_rate[s]:.4f}) | {n:,} |"
        for s, n in info.counts.items()],
      "",
      "| feature | kind | table rows |",
      "|---|---|---:|",
      *[f"| {f.name} | {f.kind}" + (f", {f.multi_hot} per row" if f.multi_hot else "")
        + f" | {f.vocab_size:,} |" for f in info.categorical],
  ]
  return "\n".join(lines) + "\n"
