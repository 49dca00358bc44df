"""The preprocessing step as a plain function: :func:`run`.

``run`` checks the input up front (missing, empty, unknown format fail at once),
resolves the timestamp unit (declared, or detected from a sample of the input),
runs the Beam pipeline of :mod:`components.preprocess.pipeline`, then applies
the bad-row threshold and writes ``vocab/items.txt`` and ``dataset_info.json``
(only when the input passes). Heavy imports happen inside, so importing this
module (and the ``recml`` CLI) stays fast.

Outputs are written to a sibling work folder, ``<output>.partial``, and
published only when the run succeeds (:func:`publish`), so a failed or rejected
run leaves the previous dataset at ``--output`` as it was. The work folder of a
run that crashed is removed by the next run; the one of a rejected run (too
many bad rows) is kept for inspection of its ``quarantine/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from typing import Any, Iterator, Mapping, Sequence

from components.preprocess import sources
from trainers import features

DEFAULT_MAX_LEN = 200
DEFAULT_MIN_ITEM_COUNT = 1
DEFAULT_BAD_ROWS_THRESHOLD = 0.01
BYTES_PER_SHARD = 256 << 20      # input bytes per output shard (auto sharding)
BIGQUERY_SHARDS = 16
MAX_SHARDS = 1000
FIRST_BAD_ROWS = 5               # shown in the threshold error
TIE_RULE = "frequency descending, ties by raw id bytes descending (tf.transform)"

# What a run writes into the output directory (replaced on a re-run; other
# files there are kept). dataset_info.json first: it goes first, arrives last.
OUTPUTS = (features.DATASET_INFO_FILE, *features.SPLITS, "quarantine", "transform_fn",
           "transformed_metadata", "vocab", ".tmp")
WORK_SUFFIX = ".partial"     # <output>.partial: the run's work folder
PREVIOUS_SUFFIX = ".previous"  # <output>.previous: the old dataset while swapping
TIMESTAMP_UNIT_CHOICES = ("auto", *sources.TIMESTAMP_UNITS)


class BadInputError(ValueError):
  """Too many malformed rows (above the bad-rows threshold)."""


@dataclasses.dataclass
class PreprocessResult:
  """What the step produced; the KFP wrapper copies it into its artifacts."""

  output_dir: str
  info: features.DatasetInfo
  counts: dict[str, int]
  markdown: str
  seconds: float = 0.0

  def metrics(self) -> dict[str, float]:
    """Flat numbers for a KFP ``Metrics`` artifact."""
    out = {k: float(v) for k, v in sorted(self.counts.items())}
    out.update({f"quarantined_{_slug(k)}": float(v)
                for k, v in sorted(self.info.quarantine.items())})
    out.update({f"examples_{s}": float(n) for s, n in self.info.num_examples.items()})
    out["item_vocab_size"] = float(self.info.item_vocab_size)
    out["num_users"] = float(self.info.num_users)
    return out

  def to_dict(self) -> dict[str, Any]:
    return {"output_dir": self.output_dir, "counts": dict(self.counts),
            "num_examples": dict(self.info.num_examples),
            "item_vocab_size": self.info.item_vocab_size,
            "num_users": self.info.num_users, "markdown": self.markdown,
            "quarantine": dict(self.info.quarantine),
            "source_timestamp_unit": self.info.source_timestamp_unit,
            "seconds": self.seconds}


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def run(
    input_path: str,
    output_dir: str,
    *,
    format: str | None = None,  # pylint: disable=redefined-builtin
    max_len: int = DEFAULT_MAX_LEN,
    min_item_count: int = DEFAULT_MIN_ITEM_COUNT,
    bad_rows_threshold: float = DEFAULT_BAD_ROWS_THRESHOLD,
    columns: sources.ColumnMapping | dict[str, Any] | None = None,
    delimiter: str | None = None,
    header: bool | None = None,
    user_encoding: str = "vocabulary",
    user_hash_buckets: int = 1 << 20,
    num_shards: int | None = None,
    batch_rows: int = sources.DEFAULT_BATCH_ROWS,
    runner: str = "DirectRunner",
    project: str | None = None,
    bigquery_method: str = "DIRECT_READ",
    pipeline_args: Sequence[str] = (),
    timestamp_unit: str = "auto",
    task: str = "sequence",
    ranking: Mapping[str, Any] | None = None,
    **cloud: Any,
) -> PreprocessResult:
  """Turns raw events into the sequence dataset of ``trainers.features``.

  With ``task="ranking"``, turns CTR rows into the ranking dataset of
  ``trainers.ranking_features`` instead (:func:`components.preprocess.ctr_step.run`,
  whose column spec and split arguments ``ranking`` holds; the sequence-only
  arguments are not used) and returns its ``RankingResult``.

  Args:
    input_path: a file, a glob, a MovieLens folder (as unpacked from the
      official zip), an official ``ml-*.zip``, or for BigQuery a table
      (``bq://project.dataset.table``) or a ``SELECT`` query.
    output_dir: the dataset directory (local or ``gs://``); earlier outputs of
      this step in it are replaced, only once this run succeeds (:func:`publish`).
    format: one of ``sources.FORMATS``; detected from file names when None.
    max_len: history length kept per example (most recent events).
    min_item_count: items seen fewer times map to the OOV id (counted).
    bad_rows_threshold: fail when quarantined / read rows exceeds this.
    columns: where user, item, timestamp (and optional category, behavior) are
      (CSV/Parquet/BigQuery); see :class:`sources.ColumnMapping`. Category and
      behavior, when given, also get a vocabulary each.
    delimiter, header: CSV layout (detected when None).
    user_encoding: ``"vocabulary"`` or ``"hash"`` (``user_hash_buckets``).
    num_shards: TFRecord shards per split; default from the input size.
    batch_rows: events per Arrow record batch.
    runner, project, and in ``cloud``: region, temp_location, machine_type,
      sdk_container_image: Beam runner and Dataflow settings (``pipeline.pipeline_flags``).
    bigquery_method: ``DIRECT_READ`` or ``EXPORT``.
    pipeline_args: extra Beam flags.
    timestamp_unit: the unit of integer input timestamps, ``s``, ``ms``, ``us``
      or ``ns``, or ``auto``: detected from the median of a sample of the input
      (:func:`sources.detect_timestamp_unit`; BigQuery has no sample, so
      ``auto`` means seconds there, and typed TIMESTAMP columns are exact). The
      dataset holds seconds either way; the unit is recorded in
      ``dataset_info.json`` (``source_timestamp_unit``). Timestamps that are
      implausible in the unit (after the year 5138) are quarantined.

  Returns:
    A :class:`PreprocessResult`.

  Raises:
    sources.InputError: missing or empty input, unknown format, bad mapping.
    BadInputError: the bad-row fraction is above ``bad_rows_threshold``.
  """
  if task == "ranking":
    from components.preprocess import ctr_step  # pylint: disable=g-import-not-at-top
    return ctr_step.run(
        input_path, output_dir, format=format, delimiter=delimiter, header=header,
        bad_rows_threshold=bad_rows_threshold, num_shards=num_shards,
        batch_rows=batch_rows, runner=runner, project=project,
        bigquery_method=bigquery_method, pipeline_args=pipeline_args,
        **dict(ranking or {}), **cloud)
  if task != "sequence":
    raise sources.InputError(f"--task must be sequence or ranking, got {task!r}")
  start = time.perf_counter()
  if max_len < 1:
    raise sources.InputError(f"--max-len must be >= 1, got {max_len}")
  if min_item_count < 1:
    raise sources.InputError(f"--min-item-count must be >= 1, got {min_item_count}")
  if not 0.0 <= bad_rows_threshold <= 1.0:
    raise sources.InputError(f"--bad-rows-threshold must be in [0, 1], got {bad_rows_threshold}")
  if timestamp_unit not in TIMESTAMP_UNIT_CHOICES:
    raise sources.InputError(f"--timestamp-unit must be one of "
                             f"{', '.join(TIMESTAMP_UNIT_CHOICES)}, got {timestamp_unit!r}")
  if isinstance(columns, dict):
    columns = sources.ColumnMapping(**columns)
  columns = columns or sources.ColumnMapping()

  # Input checks that fail at once.
  bigquery = None
  files: list[str] = []
  if format == "bigquery" or (format is None and sources.is_bigquery_ref(input_path)):
    fmt = "bigquery"
    bigquery = sources.bigquery_read(input_path, method=bigquery_method, project=project)
    shards = num_shards or BIGQUERY_SHARDS
  else:
    matched = sources.resolve_input(input_path, format)
    if all(size == 0 for _, size in matched):
      raise sources.InputError(
          f"--input {input_path!r} is empty ({len(matched)} file(s), 0 bytes): "
          "pass a file with events")
    fmt = sources.resolve_format(matched, format)
    files = [path for path, _ in matched]
    total = sum(size for _, size in matched)
    shards = num_shards or max(1, min(MAX_SHARDS, math.ceil(total / BYTES_PER_SHARD)))
  spec = sources.SourceSpec(format=fmt, columns=columns, delimiter=delimiter, header=header)
  unit, unit_how = _resolve_timestamp_unit(timestamp_unit, spec, files)
  spec = dataclasses.replace(spec, timestamp_unit=unit)

  with staged_output(output_dir) as work_dir:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from components.preprocess import pipeline as beam_pipeline  # pylint: disable=g-import-not-at-top
    from components.preprocess import preprocessing_fn as pfn  # pylint: disable=g-import-not-at-top

    temp_dir = os.path.join(work_dir, ".tmp")

    options = beam_pipeline.pipeline_options(runner, project=project,
                                             extra_args=pipeline_args, **cloud)
    preprocessing_fn = pfn.make_preprocessing_fn(
        min_item_count=min_item_count, user_encoding=user_encoding,
        user_hash_buckets=user_hash_buckets, side_features=spec.side_columns)
    with beam.Pipeline(options=options) as p:
      beam_pipeline.build(
          p, files=files, bigquery=bigquery, spec=spec, output_dir=work_dir,
          temp_dir=temp_dir, preprocessing_fn=preprocessing_fn, max_len=max_len,
          num_shards=shards, batch_rows=batch_rows)

    import json  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(os.path.join(temp_dir, beam_pipeline.COUNTS_FILE)) as f:
      counts = {k: int(v) for k, v in json.load(f).items()}
    tf.io.gfile.rmtree(temp_dir)
    prefix = beam_pipeline.QUARANTINE_PREFIX
    quarantine = {k[len(prefix):]: counts.pop(k) for k in sorted(counts) if k.startswith(prefix)}
    num_examples = {s: counts.pop(f"examples_{s}", 0) for s in features.SPLITS}
    for key in ("rows_read", "rows_quarantined", "blank_lines", "header_lines",
                "events_parsed", "events_oov", "users", "users_too_few_events",
                "events_dropped_short_users", "events_kept", "events_beyond_max_len",
                "users_without_train"):
      counts.setdefault(key, 0)
    counts["rows_kept"] = counts["rows_read"] - counts["rows_quarantined"]
    where = input_path if bigquery is not None else ", ".join(files[:3]) + (
        f" (+{len(files) - 3} more)" if len(files) > 3 else "")

    if counts["rows_read"] == 0:
      raise sources.InputError(f"no rows in {where}: the input holds only blank or "
                               "header lines; pass a file with events")
    bad = counts["rows_quarantined"]
    if bad / counts["rows_read"] > bad_rows_threshold:
      raise BadInputError(_bad_rows_message(work_dir, shards, counts, bad_rows_threshold))
    if counts["events_parsed"] == counts["events_oov"]:
      raise sources.InputError(f"no item in {where} is seen --min-item-count="
                               f"{min_item_count} times: lower --min-item-count")
    if counts["users"] == 0:
      raise sources.InputError(
          f"no user in {where} has {features.MIN_EVENTS_PER_USER} or more events, so "
          "no example can be made: check the user column mapping")

    canonicalize_saved_model(os.path.join(work_dir, "transform_fn"))

    # Vocabularies and dataset_info.json.
    assets = os.path.join(work_dir, "transform_fn", "assets")
    item_tokens = _read_vocab(os.path.join(assets, pfn.ITEM_VOCAB))
    item_vocab = ["<pad>", "<oov>"] + item_tokens
    tf.io.gfile.makedirs(os.path.join(work_dir, "vocab"))
    with tf.io.gfile.GFile(os.path.join(work_dir, features.ITEM_VOCAB_FILE), "w") as f:
      f.write("".join(f"{v}\n" for v in item_vocab))
    vocab_files = {"item": features.ITEM_VOCAB_FILE}
    extra_sizes = {}
    if user_encoding == "vocabulary":
      vocab_files["user"] = os.path.join("transform_fn", "assets", pfn.USER_VOCAB)
      extra_sizes["user"] = len(_read_vocab(os.path.join(assets, pfn.USER_VOCAB)))
    else:
      extra_sizes["user"] = user_hash_buckets
    for column in spec.side_columns:
      name = pfn.vocab_name(column)
      vocab_files[column] = os.path.join("transform_fn", "assets", name)
      extra_sizes[column] = len(_read_vocab(os.path.join(assets, name)))

    source = {"input": input_path, "format": fmt, "num_files": len(files)}
    if 0 < len(files) <= 100:
      source["files"] = files
    params = {
        "max_len": max_len, "min_item_count": min_item_count,
        "bad_rows_threshold": bad_rows_threshold, "user_encoding": user_encoding,
        "num_shards": shards, "columns": columns.to_dict(), "delimiter": delimiter,
        "header": header, "side_features": list(spec.side_columns),
        "min_events_per_user": features.MIN_EVENTS_PER_USER,
        "timestamps": "input" if spec.has_timestamps else "none (0; input order)",
        "timestamp_unit": timestamp_unit, "timestamp_unit_resolved": unit_how,
        "event_order": "timestamp, then input order",
        "vocabulary_order": TIE_RULE,
    }
    if user_encoding == "hash":
      params["user_hash_buckets"] = user_hash_buckets
    info = features.DatasetInfo(
        item_vocab_size=len(item_vocab), num_users=counts["users"], max_len=max_len,
        num_examples=num_examples, counts=dict(sorted(counts.items())), source=source,
        params=params, vocab_files=vocab_files, extra_vocab_sizes=extra_sizes,
        quarantine=quarantine, source_timestamp_unit=spec.timestamp_unit or "none")
    info.save(work_dir)
  seconds = time.perf_counter() - start
  return PreprocessResult(output_dir=output_dir, info=info, counts=info.counts,
                          markdown=summary_markdown(info), seconds=seconds)


@contextlib.contextmanager
def staged_output(output_dir: str) -> Iterator[str]:
  """Yields a work folder that replaces ``output_dir`` if the block succeeds.

  The work folder is ``<output_dir>.partial`` (emptied first: a crashed run
  may have left it). On success it is published with :func:`publish`; on
  :class:`BadInputError` it stays, for its ``quarantine/``; on any other error
  it is removed. ``output_dir`` is untouched until the block succeeds.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  final_dir = output_dir.rstrip("/") or output_dir
  work_dir = final_dir + WORK_SUFFIX
  if tf.io.gfile.exists(work_dir):
    tf.io.gfile.rmtree(work_dir)
  tf.io.gfile.makedirs(work_dir)
  try:
    yield work_dir
  except BadInputError:
    raise
  except BaseException:
    tf.io.gfile.rmtree(work_dir)
    raise
  publish(work_dir, final_dir)


def _resolve_timestamp_unit(requested: str, spec: sources.SourceSpec,
                            files: Sequence[str]) -> tuple[str | None, str]:
  """The unit of the input's timestamps and how it was found (for the record)."""
  if not spec.has_timestamps:
    return None, "none (no timestamps in this format)"
  if requested != "auto":
    return requested, "declared"
  if not files:  # BigQuery: nothing to sample before the job
    return "s", "assumed (auto on BigQuery: integer columns taken as seconds)"
  unit, median = sources.detect_timestamp_unit(sources.sample_timestamps(files, spec))
  if median is None:
    return unit, "assumed (auto: no valid timestamp in the sample)"
  return unit, f"detected (auto: median {median:.4g} of a sample)"


def publish(work_dir: str, output_dir: str) -> None:
  """Moves a finished run's outputs from ``work_dir`` into ``output_dir``.

  Local paths: two renames swap the folders (``output_dir`` moves to
  ``<output_dir>.previous``, ``work_dir`` takes its name), then files in the old
  folder that this step does not write are moved across and the old folder is
  deleted. A reader sees the old dataset or the new one (or, for the instant
  between the renames, none), never a mix.

  ``gs://`` (and local file systems that cannot rename folders, such as a
  gcsfuse mount): object stores have no folder rename, so the step's old outputs
  are deleted (``dataset_info.json`` first) and the new objects are copied in
  server-side (``dataset_info.json`` last), then ``work_dir`` is deleted. A
  failed or rejected run still leaves the old dataset untouched, since nothing
  is deleted before the run succeeds; during the copy a reader finds no
  ``dataset_info.json`` and fails with "not found" rather than read a mix.
  """
  if "://" not in output_dir and _swap_local(work_dir, output_dir):
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  for name in OUTPUTS:
    path = os.path.join(output_dir, name)
    if gfile.isdir(path):
      gfile.rmtree(path)
    elif gfile.exists(path):
      gfile.remove(path)
  gfile.makedirs(output_dir)
  copies = []
  for root, _, names in gfile.walk(work_dir):
    for name in names:
      src = os.path.join(root, name)
      copies.append((src, os.path.join(output_dir, os.path.relpath(src, work_dir))))
  info = os.path.join(work_dir, features.DATASET_INFO_FILE)
  copies.sort(key=lambda c: c[0] == info)  # dataset_info.json last
  for src, dst in copies:
    gfile.makedirs(os.path.dirname(dst))
    gfile.copy(src, dst, overwrite=True)
  gfile.rmtree(work_dir)


def _swap_local(work_dir: str, output_dir: str) -> bool:
  """Swaps the folders by renames; False (nothing changed) if folders cannot be renamed."""
  previous = output_dir + PREVIOUS_SUFFIX
  if os.path.exists(previous):  # left by a run killed between the two renames
    shutil.rmtree(previous)
  if not os.path.exists(output_dir):
    try:
      os.rename(work_dir, output_dir)
    except OSError:
      return False
    return True
  try:
    os.rename(output_dir, previous)
  except OSError:
    return False
  try:
    os.rename(work_dir, output_dir)
  except OSError:
    os.rename(previous, output_dir)
    return False
  for name in os.listdir(previous):
    if name not in OUTPUTS:
      os.rename(os.path.join(previous, name), os.path.join(output_dir, name))
  shutil.rmtree(previous)
  return True


def canonicalize_saved_model(export_dir: str) -> None:
  """Rewrites a SavedModel's protos so that equal models are equal bytes.

  TensorFlow serializes protobuf maps in hash order and stamps a random uuid in
  ``fingerprint.pb``. This writes ``saved_model.pb`` with deterministic
  serialization and recomputes the fingerprint with a uuid derived from its
  content hashes. The model loads exactly as before.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import fingerprint_pb2, saved_model_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting  # pylint: disable=g-import-not-at-top
  path = os.path.join(export_dir, "saved_model.pb")
  with tf.io.gfile.GFile(path, "rb") as f:
    model = saved_model_pb2.SavedModel.FromString(f.read())
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(model.SerializeToString(deterministic=True))
  fingerprint = fingerprint_pb2.FingerprintDef.FromString(
      fingerprinting.CreateFingerprintDef(export_dir))
  content = (f"{fingerprint.saved_model_checksum}:{fingerprint.graph_def_program_hash}:"
             f"{fingerprint.signature_def_hash}:{fingerprint.saved_object_graph_hash}:"
             f"{fingerprint.checkpoint_hash}")
  fingerprint.uuid = str(int.from_bytes(hashlib.sha256(content.encode()).digest()[:16], "big"))
  with tf.io.gfile.GFile(os.path.join(export_dir, "fingerprint.pb"), "wb") as f:
    f.write(fingerprint.SerializeToString(deterministic=True))


def _read_vocab(path: str) -> list[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read().decode("utf-8")
  lines = data.split("\n")
  if lines and not lines[-1]:
    lines.pop()
  return lines


def _bad_rows_message(output_dir: str, shards: int, counts: dict[str, int],
                      threshold: float) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from components.preprocess import pipeline as beam_pipeline  # pylint: disable=g-import-not-at-top
  rows = []
  for shard in range(shards):
    path = os.path.join(output_dir, beam_pipeline.quarantine_name(shard, shards))
    if tf.io.gfile.exists(path):
      rows += list(sources.iter_jsonl(path))
  rows.sort(key=lambda r: (r["file"], r["line"] or 0))
  files = sorted({r["file"] for r in rows})
  first = "\n".join(
      f"  {r['file']}:{r['line']}: {r['reason']}: {r['raw'][:120]!r}"
      for r in rows[:FIRST_BAD_ROWS])
  bad, read = counts["rows_quarantined"], counts["rows_read"]
  return (
      f"{bad} of {read} rows ({bad / read:.2%}) are malformed, above "
      f"--bad-rows-threshold {threshold} (in {', '.join(files[:5])}). First bad rows:\n"
      f"{first}\nAll rejected rows with reasons are in "
      f"{os.path.join(output_dir, beam_pipeline.QUARANTINE_DIR)}/ (this run's work "
      f"folder; nothing was published, so a dataset already at "
      f"{output_dir[:-len(WORK_SUFFIX)]} is unchanged). Fix the input, check "
      "--format, --timestamp-unit and the column mapping, or raise --bad-rows-threshold.")


def summary_rows(info: features.DatasetInfo) -> list[tuple[str, str, int]]:
  """The dataset's counts as ``(key, label, count)``: the step's summary, the run report."""
  c = info.counts
  return [
      ("rows_read", "rows read", c.get("rows_read", 0)),
      ("rows_kept", "rows kept", c.get("rows_kept", 0)),
      ("rows_quarantined", "rows quarantined", c.get("rows_quarantined", 0)),
      *[(f"quarantined:{kind}", f"quarantined: {kind}", n)
        for kind, n in sorted(info.quarantine.items())],
      ("events_oov", "events mapped to OOV", c.get("events_oov", 0)),
      ("users", "users with examples", info.num_users),
      ("users_too_few_events", f"users dropped (< {features.MIN_EVENTS_PER_USER} events)",
       c.get("users_too_few_events", 0)),
      ("items", "items (vocabulary, excl. PAD/OOV)", info.num_items),
      *[(f"examples:{s}", f"{s} examples", n) for s, n in info.num_examples.items()],
  ]


def summary_markdown(info: features.DatasetInfo) -> str:
  """A short Markdown summary for the KFP ``Markdown`` artifact and the CLI."""
  read = max(info.counts.get("rows_read", 0), 1)
  lines = [
      "## Preprocessed sequence dataset",
      "",
      f"Source: `{info.source.get('input')}` ({info.source.get('format')}); "
      f"max_len {info.max_len}, min item count {info.params.get('min_item_count')}.",
      f"Input timestamps in `{info.source_timestamp_unit}` "
      f"({info.params.get('timestamp_unit_resolved', 'declared')}), written as seconds.",
      "",
      "| | count |",
      "|---|---:|",
  ]
  for key, label, n in summary_rows(info):
    share = f" ({n / read:.2%})" if key == "rows_quarantined" else ""
    lines.append(f"| {label} | {n:,}{share} |")
  return "\n".join(lines) + "\n"
