"""Validate step: bless the candidate model, or not, against the champion.

The champion is the best blessed run of the same model family on the same dataset,
by the gate metric on the gate split (:meth:`MetricsStore.champion`). The candidate is
blessed when

* there is no champion yet (the first model is blessed), or
* it is at least as good as the champion, up to a **relative** tolerance:
  ``candidate >= champion - tolerance * |champion|`` (``<= champion + ...`` when lower
  is better). ``tolerance=0.01`` accepts a candidate up to 1% worse than the champion.
  Relative, so that one setting means the same for NDCG@10 ~0.05 and HR@200 ~0.6;
  measured against the *best* blessed value, so quality cannot ratchet down over runs.

The decision is written to the store as the candidate's ``blessed`` row (value 1.0 or
0.0, details in ``labels["gate"]``): the next run's champion query sees it, re-validating
a run replaces it, and a rejected run can never become the champion.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from components import metrics_store


def decide(candidate_value: float, champion_value: float | None, tolerance: float,
           higher_is_better: bool = True) -> tuple[bool, float | None]:
  """The gate itself: ``(blessed, threshold)``; threshold is None without a champion."""
  if champion_value is None:
    return True, None
  slack = tolerance * abs(champion_value)
  if higher_is_better:
    threshold = champion_value - slack
    return candidate_value >= threshold, threshold
  threshold = champion_value + slack
  return candidate_value <= threshold, threshold


def run(store_uri: str, run_id: str, dataset: str, model_family: str, metric: str = "ndcg",
        k: int | None = 10, split: str = "valid", tolerance: float = 0.0,
        candidate_value: float | None = None, higher_is_better: bool = True,
        store_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Gates a candidate run against the champion and records the decision.

  Args:
    store_uri: ``bq://project.dataset.table`` or ``duckdb:///path/metrics.duckdb``.
    run_id: the candidate run.
    dataset: the dataset both were evaluated on.
    model_family: the ``model`` column (``"sasrec"``).
    metric: the gate metric's name, without the cut-off (``"ndcg"``, ``"mrr"``).
    k: the cut-off (10), or None for ``"mrr"``.
    split: the split to compare on (model selection is on ``"valid"``).
    tolerance: relative tolerance in [0, 1) (see the module docstring).
    candidate_value: the candidate's value; default: read from the store (the
      write_metrics step must have run). A given value is written to the store with
      the decision (replacing the run's row of that metric, if any).
    higher_is_better: False for metrics such as a loss.
    store_options: keyword arguments for :func:`components.metrics_store.open_store`.

  Returns:
    ``{"blessed", "champion_run_id", "champion_value", "candidate_value", "threshold",
    "metric", "reason"}``; champion entries are None when there was no champion.

  Raises:
    ValueError: bad tolerance or metric name, a NaN candidate, or no candidate value.
  """
  if not 0.0 <= tolerance < 1.0:
    raise ValueError(f"tolerance is relative and must lie in [0, 1), got {tolerance}")
  if "@" in metric:
    raise ValueError(f"give the metric without its cut-off and k apart "
                     f"(metric={metric.split('@')[0]!r}, k={metric.split('@')[1]}), got {metric!r}")
  name = metric if k is None else f"{metric}@{k}"
  store = metrics_store.open_store(store_uri, **dict(store_options or {}))
  own = store.rows(run_id)
  given = candidate_value is not None
  if not given:
    found = [r.value for r in own if (r.split, r.metric, r.k) == (split, metric, k)]
    if not found:
      raise ValueError(f"run {run_id!r} has no {split} {name} in {store.uri}; "
                       "write its metrics first (write_metrics) or pass candidate_value")
    candidate_value = found[0]
  candidate_value = float(candidate_value)
  if not math.isfinite(candidate_value):
    raise ValueError(f"candidate {split} {name} is {candidate_value}: "
                     "a diverged run is never blessed")

  champ = store.champion(dataset, model_family, metric, k, split=split, exclude_run_id=run_id,
                         higher_is_better=higher_is_better)
  champion_value = champ.value if champ else None
  blessed, threshold = decide(candidate_value, champion_value, tolerance, higher_is_better)
  if champ is None:
    reason = f"no blessed {model_family} on {dataset} yet: the first model is blessed"
  else:
    op = (">=" if blessed else "<") if higher_is_better else ("<=" if blessed else ">")
    reason = (f"{split} {name} {candidate_value:.6g} {op} {threshold:.6g} "
              f"(champion {champ.run_id}: {champ.value:.6g}, relative tolerance {tolerance:g})")
  decision = {"blessed": blessed, "champion_run_id": champ.run_id if champ else None,
              "champion_value": champion_value, "candidate_value": candidate_value,
              "threshold": threshold, "metric": f"{split}/{name}", "reason": reason}

  # Record the decision (and a given candidate value, so that a blessed run can be found
  # as the champion later) in one write; the candidate's other rows give the context.
  context = next((r for r in own if r.metric != metrics_store.BLESSED_METRIC), None)
  common = dict(run_id=run_id, model=model_family, dataset=dataset, split=split,
                pipeline=context.pipeline if context else None,
                model_uri=context.model_uri if context else None)
  rows = [metrics_store.MetricRow(
      metric=metrics_store.BLESSED_METRIC, k=None, value=1.0 if blessed else 0.0,
      labels={"gate": {**decision, "tolerance": tolerance, "higher_is_better": higher_is_better}},
      **common)]
  if given:
    rows.append(metrics_store.MetricRow(metric=metric, k=k, value=candidate_value,
                                        labels=context.labels if context else {}, **common))
  store.write(rows)
  return decision


# ---------------------------------------------------------------------------
# KFP component (the pipeline's validate step; pipelines/dag.py). The body runs in the
# recml-tools image and only calls ``run``. Its single return value is the decision as a
# string ("blessed" / "rejected"): kfp.local silently skips float comparisons in dsl.If,
# and its condition evaluator (kfp 2.17) resolves only a task's single ``Output`` or
# ``task--key`` channels, not named outputs such as ``validate-decision``.
# ---------------------------------------------------------------------------
from kfp.dsl import Markdown, Output  # pylint: disable=wrong-import-position,g-multiple-import

from components.kfp_step import step as _step  # pylint: disable=wrong-import-position


@_step("tools")
def validate(
    store_uri: str,
    verdict: Output[Markdown],
    run_id: str = "",
    job_name: str = "",
    dataset: str = "",
    model_family: str = "",
    metric: str = "ndcg",
    k: int = 10,
    split: str = "valid",
    tolerance: float = 0.0,
) -> str:
  """Compares this run with the champion in the metrics store: bless or reject.

  Args:
    store_uri: the metrics store.
    verdict: a Markdown note with the comparison; its metadata holds the gate's numbers.
    run_id: the run id; empty: the pipeline job name.
    job_name: the pipeline job name (``dsl.PIPELINE_JOB_NAME_PLACEHOLDER``).
    dataset: the dataset key.
    model_family: champion per dataset and model family.
    metric: e.g. ``ndcg``.
    k: the cut-off; 0 for metrics without one (mrr).
    split: the split compared.
    tolerance: relative tolerance (0.01: up to 1% worse than the champion passes).

  Returns:
    The decision: "blessed" or "rejected".
  """
  from components import validate as step  # pylint: disable=g-import-not-at-top
  result = step.run(store_uri, run_id or job_name, dataset, model_family, metric,
                    k if k > 0 else None, split, tolerance)
  decision = "blessed" if result.get("blessed") else "rejected"
  lines = [f"# Gate: {decision}", "", f"{metric}@{k} on {split}, tolerance {tolerance}", ""]
  lines += [f"- **{key}**: {value}" for key, value in sorted(result.items())]
  with open(verdict.path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  verdict.metadata.update({k_: v for k_, v in result.items()
                           if isinstance(v, (str, int, float, bool))})
  verdict.metadata["decision"] = decision
  return decision

