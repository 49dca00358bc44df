"""Write-metrics step: the evaluation output, as rows of the metrics store.

One row per ``(split, metric, k)`` of the evaluate step's output (``components.evaluate``):
``{"valid": {"hr@10": 0.1, "ndcg@10": ..., "mrr": ...}, "test": {...}, "best_test": {...},
"model": "sasrec", "selected_epoch": 12, ...}``. Each mapping-valued entry is a split;
its keys ``name@K`` become ``metric=name, k=K`` and plain names (``mrr``) get a NULL
``k``. The other top-level entries (``selected_epoch``, ...) are run facts, not metrics:
they go into every row's ``labels`` (explicit ``labels`` win). Rewriting a run replaces its
rows (the store's writes are idempotent per ``(run_id, split, metric, k)``), so a retried
step never duplicates metrics. Every row carries the dataset identity (``dataset_id``,
from the preprocess step) next to the display label ``dataset``: the gate finds the
champion by the identity.
"""

from __future__ import annotations

from typing import Any, Mapping

from components import metrics_store

# Top-level entries of the evaluation output that are columns already, not labels.
_COLUMN_ENTRIES = frozenset(metrics_store.COLUMNS)


def to_rows(run_id: str, pipeline: str | None, model: str, dataset: str,
            metrics: Mapping[str, Any] | str, model_uri: str | None = None,
            labels: Mapping[str, Any] | str | None = None,
            dataset_id: str | None = None) -> list[metrics_store.MetricRow]:
  """The metric rows of one run's evaluation output (see the module docstring).

  Raises:
    ValueError: a metric value is not a number, a key is not ``name`` / ``name@K``,
      or there is no split at all.
  """
  metrics = metrics_store.json_object(metrics, "metrics")
  labels = metrics_store.json_object(labels, "labels")
  facts = {k: v for k, v in metrics.items()
           if not isinstance(v, Mapping) and k not in _COLUMN_ENTRIES}
  labels = {**facts, **labels}
  rows = []
  for split, values in metrics.items():
    if not isinstance(values, Mapping):
      continue
    for name, value in values.items():
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metrics[{split!r}][{name!r}] must be a number, got {value!r}")
      metric, k = metrics_store.parse_metric_name(name)
      rows.append(metrics_store.MetricRow(
          run_id=run_id, pipeline=pipeline or None, model=model, dataset=dataset,
          split=split, metric=metric, k=k, value=value, model_uri=model_uri or None,
          labels=labels, dataset_id=dataset_id or None))
  if not rows:
    raise ValueError("metrics hold no split: expected {'valid': {'hr@10': ...}, 'test': {...}}")
  return rows


def run(store_uri: str, run_id: str, pipeline: str | None, model: str, dataset: str,
        metrics: Mapping[str, Any] | str, model_uri: str | None = None,
        labels: Mapping[str, Any] | str | None = None,
        store_options: Mapping[str, Any] | None = None, dataset_id: str | None = None) -> int:
  """Writes one run's evaluation metrics to the metrics store.

  Args:
    store_uri: ``bq://project.dataset.table`` or ``duckdb:///path/metrics.duckdb``.
    run_id: the pipeline run's id.
    pipeline: the pipeline's name.
    model: the model family (``"sasrec"``); the champion is looked up per family.
    dataset: the dataset's display name (the config's ``dataset:`` label).
    metrics: the evaluate step's output (a mapping or its JSON text).
    model_uri: where the trained model lies.
    labels: extra facts about the run (a JSON object), stored with every row.
    store_options: keyword arguments for :func:`components.metrics_store.open_store`
      (e.g. a BigQuery client).
    dataset_id: the dataset identity (``ds-...``, the preprocess step's output).

  Returns:
    The number of rows written.
  """
  rows = to_rows(run_id, pipeline, model, dataset, metrics, model_uri, labels, dataset_id)
  return metrics_store.open_store(store_uri, **dict(store_options or {})).write(rows)


# ---------------------------------------------------------------------------
# KFP component (the pipeline's write_metrics step; pipelines/dag.py). The body runs
# in the recml-tools image and only calls ``run`` (see components/kfp_step.py).
# ---------------------------------------------------------------------------
from kfp.dsl import Input, Metrics, Model  # pylint: disable=wrong-import-position,g-multiple-import

from components.kfp_step import step as _step  # pylint: disable=wrong-import-position


@_step("tools")
def write_metrics(
    store_uri: str,
    metrics: Input[Metrics],
    model: Input[Model],
    run_id: str = "",
    job_name: str = "",
    pipeline: str = "recml",
    model_name: str = "",
    dataset: str = "",
    labels: dict = {},  # pylint: disable=dangerous-default-value
    dataset_id: str = "",
) -> str:
  """Writes the evaluate step's metrics (every split) into the metrics store.

  Args:
    store_uri: ``duckdb:///path`` or ``bq://project.dataset.table``.
    metrics: the evaluate step's Metrics (its file holds every split as JSON).
    model: the trained model (its URI is stored with each row).
    run_id: the run id; empty: the pipeline job name.
    job_name: the pipeline job name (``dsl.PIPELINE_JOB_NAME_PLACEHOLDER``).
    pipeline: the pipeline name.
    model_name: the model family (e.g. sasrec).
    dataset: the dataset key.
    labels: free-form labels stored with each row.
    dataset_id: the dataset identity (the preprocess step's output).

  Returns:
    The run id the rows were written under.
  """
  import json  # pylint: disable=g-import-not-at-top
  from components import write_metrics as step  # pylint: disable=g-import-not-at-top
  with open(metrics.path, encoding="utf-8") as f:
    result = json.load(f)
  rid = run_id or job_name
  rows = step.run(store_uri, rid, pipeline, model_name or result.get("model", ""),
                  dataset or result.get("dataset", ""), result, model.uri, dict(labels),
                  dataset_id=dataset_id or None)
  print(f"write_metrics: {rows} rows for run {rid} into {store_uri}")
  return rid

