"""The preprocess step as a KFP component: raw events in, a sequence dataset out
(or, with ``task="ranking"``, CTR rows in, a ranking dataset out).

The logic is :func:`components.preprocess.run` (Beam + tf.transform); this module only
maps it onto typed artifacts: the ``Dataset`` (with vocabulary size, users, examples per
split and row counts as metadata), a ``Metrics`` artifact of the same counts, and the
step's Markdown summary (rows read / kept / quarantined and why).

The step takes the input's fingerprint (the fingerprint step's digest) as a parameter,
so its cache key changes when the data does, and returns the dataset identity
(:func:`components.fingerprint.dataset_identity`, ``ranking_dataset_identity`` for
ranking), which it also records in
``dataset_info.json`` (``source.fingerprint``, ``source.dataset_id``) and the
Dataset's metadata.
"""


from typing import Any, Mapping, Sequence

from kfp.dsl import Dataset, Markdown, Metrics, Output

from components import kfp_step


def record_identity(data_dir: str, fingerprint: str, dataset_id: str) -> None:
  """Adds the input's fingerprint and the dataset identity to ``dataset_info.json``."""
  from trainers import features, ranking_features  # pylint: disable=g-import-not-at-top
  if ranking_features.is_ranking(data_dir):
    info = ranking_features.load_info(data_dir)
  else:
    info = features.load_dataset_info(data_dir)
  info.source.update({"fingerprint": fingerprint, "dataset_id": dataset_id})
  info.save(data_dir)


def dataset_metadata(data_dir: str) -> dict[str, Any]:
  """Dataset artifact metadata read from ``dataset_info.json``."""
  from trainers import features, ranking_features  # pylint: disable=g-import-not-at-top
  if ranking_features.is_ranking(data_dir):
    return _ranking_metadata(ranking_features.load_info(data_dir))
  info = features.load_dataset_info(data_dir)
  meta: dict[str, Any] = {
      "item_vocab_size": info.item_vocab_size,
      "num_items": info.num_items,
      "num_users": info.num_users,
      "max_len": info.max_len,
      "schema_version": info.schema_version,
  }
  meta.update({f"examples/{k}": v for k, v in info.num_examples.items()})
  meta.update({f"rows/{k}": v for k, v in info.counts.items()})
  meta.update({f"quarantined/{k}": v for k, v in info.quarantine.items()})
  meta["source_timestamp_unit"] = info.source_timestamp_unit
  meta["source"] = {k: v for k, v in info.source.items() if isinstance(v, (str, int, float))}
  if info.source.get("dataset_id"):
    meta["dataset_id"] = info.source["dataset_id"]
  return meta


def _ranking_metadata(info) -> dict[str, Any]:
  meta: dict[str, Any] = {"task": info.task, "schema_version": info.schema_version,
                          "num_dense": len(info.dense),
                          "num_categorical": len(info.categorical)}
  meta.update({f"examples/{k}": v for k, v in info.counts.items()})
  meta.update({f"label_rate/{k}": v for k, v in info.label_rate.items()})
  meta.update({f"vocab_size/{f.name}": f.vocab_size for f in info.categorical})
  meta.update({f"rows/{k}": v for k, v in info.rows.items()})
  meta.update({f"quarantined/{k}": v for k, v in info.quarantine.items()})
  meta["source"] = {k: v for k, v in info.source.items() if isinstance(v, (str, int, float))}
  if info.source.get("dataset_id"):
    meta["dataset_id"] = info.source["dataset_id"]
  return meta


# Beam flags that ``preprocess.run`` takes as arguments; the others pass through.
_RUN_FLAGS = ("runner", "project", "region", "temp_location", "machine_type",
              "sdk_container_image")


def beam_kwargs(beam_args: Sequence[str]) -> dict[str, Any]:
  """``["--runner=DataflowRunner", "--project=p", "--job_name=j"]`` -> ``run`` keywords.

  Flags that ``run`` names become keywords; the rest go to ``pipeline_args``.
  """
  kwargs: dict[str, Any] = {}
  rest = []
  for arg in beam_args:
    name, sep, value = arg.lstrip("-").partition("=")
    if sep and name in _RUN_FLAGS:
      kwargs[name] = value
    else:
      rest.append(arg)
  if rest:
    kwargs["pipeline_args"] = rest
  return kwargs


def numeric(meta: Mapping[str, Any]) -> dict[str, float]:
  """The numeric entries of a metadata dict (for a Metrics artifact)."""
  return {k: float(v) for k, v in meta.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


@kfp_step.step("preprocess")
def preprocess(
    input_uri: str,
    dataset: Output[Dataset],
    stats: Output[Metrics],
    summary: Output[Markdown],
    data_format: str = "",
    max_len: int = 200,
    min_item_count: int = 1,
    bad_rows_threshold: float = 0.01,
    beam_args: list = [],  # pylint: disable=dangerous-default-value
    fingerprint: str = "",
    timestamp_unit: str = "auto",
    task: str = "sequence",
    ranking: dict = {},  # pylint: disable=dangerous-default-value
) -> str:
  """Reads raw events, applies the split protocol and writes the sequence dataset.

  Args:
    input_uri: raw events: a file, a folder (e.g. MovieLens), gs:// or bq://.
    dataset: the sequence dataset directory (TFRecords, transform_fn, dataset_info.json).
    stats: row counts, users, vocabulary size, examples per split.
    summary: the step's Markdown summary.
    data_format: input format; empty = detect from the input.
    max_len: maximum history length.
    min_item_count: items seen fewer times map to the OOV bucket.
    bad_rows_threshold: fail when a larger fraction of rows is quarantined.
    beam_args: Beam pipeline options (e.g. ``--runner=DataflowRunner ...``).
    fingerprint: the input's fingerprint (the fingerprint step's output); part of the
      cache key. Empty: computed here.
    timestamp_unit: the unit of integer timestamps (``s``, ``ms``, ``us``, ``ns``) or
      ``auto`` (detected).
    task: ``sequence`` (the sequence dataset) or ``ranking`` (the CTR dataset of
      ``trainers.ranking_features``; ``max_len``, ``min_item_count`` and
      ``timestamp_unit`` are then unused).
    ranking: for ``task="ranking"``: the keyword arguments of
      :func:`components.preprocess.ctr_step.run` (``label``, ``dense``, ``categorical``,
      ``multi_hot``, ``hash_buckets``, ``min_count``, ``split``, ``split_ratios``,
      ``split_seed``, ``time_column``, ...).

  Returns:
    The dataset identity, ``ds-<12 hex>`` (the metrics store's ``dataset_id``).
  """
  from components import fingerprint as fingerprint_lib  # pylint: disable=g-import-not-at-top
  from components import preprocess  # pylint: disable=g-import-not-at-top
  from components.preprocess import component as step  # pylint: disable=g-import-not-at-top

  digest = fingerprint or fingerprint_lib.compute(input_uri)["digest"]
  if task == "ranking":
    from components.preprocess import ctr_step  # pylint: disable=g-import-not-at-top
    result = preprocess.run(
        input_uri, dataset.path, format=data_format or None, task=task, ranking=ranking,
        bad_rows_threshold=bad_rows_threshold, **step.beam_kwargs(beam_args))
    dataset_id = fingerprint_lib.ranking_dataset_identity(
        digest, ctr_step.identity_params(result.info))
  else:
    dataset_id = fingerprint_lib.dataset_identity(
        digest, max_len=max_len, min_item_count=min_item_count,
        timestamp_unit=timestamp_unit, data_format=data_format)
    result = preprocess.run(
        input_uri, dataset.path, format=data_format or None, max_len=max_len,
        min_item_count=min_item_count, bad_rows_threshold=bad_rows_threshold,
        timestamp_unit=timestamp_unit, **step.beam_kwargs(beam_args))
  step.record_identity(dataset.path, digest, dataset_id)
  meta = step.dataset_metadata(dataset.path)
  dataset.metadata.update(meta)
  for key, value in result.metrics().items():
    stats.log_metric(key, value)
  stats.log_metric("seconds", result.seconds)
  with open(summary.path, "w", encoding="utf-8") as f:
    f.write(result.markdown)
    f.write(f"\nDataset identity: `{dataset_id}` (input fingerprint `{digest}`).\n")
  return dataset_id

