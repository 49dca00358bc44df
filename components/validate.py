"""Validate step: bless the candidate model, tie it, or reject it, against the champion.

The champion is the best blessed run of the same model family **on the same data**: the
same dataset identity (``dataset_id``, from the input's fingerprint and the
preprocessing parameters; :mod:`components.fingerprint`), by the gate metric on the gate
split (:meth:`MetricsStore.champion`). The config's ``dataset:`` is only a display
label: a run on last week's data with the same label is never the champion of this
week's. The rule, with ``slack = tolerance * |champion|`` (**relative**, so that one
setting means the same for NDCG@10 ~0.05 and HR@200 ~0.6):

* **blessed** (deployed) when there is no champion on this identity yet (the first
  model on new data), or when the candidate *beats* the champion by more than the
  slack: ``candidate > champion + slack`` (``<`` and ``-`` when lower is better);
* **tie** (recorded, **not redeployed**) when the candidate is the champion's model
  (same ``model_uri``: a cached retrain on unchanged data), or its value lies within
  the slack of the champion's, bounds included: with ``tolerance=0`` only an equal
  value ties; ``tolerance=0.01`` treats differences up to 1% as noise;
* **rejected** when it is worse than ``champion - slack``.

Measured against the *best* blessed value, so quality cannot ratchet down over runs;
ties and rejections never become champions. The pipeline deploys only on "blessed"
(``dsl.If(validate == "blessed")``), so a re-run on unchanged data adds no registry
version.

A ranking (CTR) gate blesses on AUC and guards on log loss (``guard_metric``): a
candidate that beats the champion's AUC but whose log loss is worse than the
champion's by more than the same relative slack is rejected (a model can rank better
while its probabilities are miscalibrated, and served scores are probabilities).
Whether lower is better follows the metric's name (:data:`LOWER_IS_BETTER`).

The decision is written to the store as the candidate's ``blessed`` row (value 1.0,
0.5 or 0.0 for blessed, tie, rejected; details in ``labels["gate"]``): the next run's
champion query sees it, and re-validating a run replaces it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from components import metrics_store

BLESSED, TIE, REJECTED = "blessed", "tie", "rejected"
LOWER_IS_BETTER = frozenset({"logloss", "ne", "loss"})


def is_higher_better(metric: str) -> bool:
  return metric not in LOWER_IS_BETTER


def decide(candidate_value: float, champion_value: float | None, tolerance: float,
           higher_is_better: bool = True) -> tuple[str, float | None, float | None]:
  """The gate on values: ``(decision, bless_threshold, reject_threshold)``.

  ``bless_threshold`` is the value to beat (strictly) for "blessed";
  ``reject_threshold`` the value below which (above, when lower is better) the
  candidate is "rejected"; in between, bounds included, it is a "tie". Both are None
  without a champion.
  """
  if champion_value is None:
    return BLESSED, None, None
  slack = tolerance * abs(champion_value)
  sign = 1.0 if higher_is_better else -1.0
  bless_at, reject_at = champion_value + sign * slack, champion_value - sign * slack
  if sign * (candidate_value - bless_at) > 0:
    return BLESSED, bless_at, reject_at
  if sign * (candidate_value - reject_at) < 0:
    return REJECTED, bless_at, reject_at
  return TIE, bless_at, reject_at


def _dataset_id(own: list[metrics_store.MetricRow], run_id: str, given: str | None,
                where: str) -> str:
  """The candidate's dataset identity: the one given, which its rows must agree with."""
  recorded = {r.dataset_id for r in own if r.metric != metrics_store.BLESSED_METRIC}
  recorded.discard(None)
  if len(recorded) > 1:
    raise ValueError(f"run {run_id!r} has rows on several dataset identities in {where}: "
                     f"{sorted(recorded)}")
  if given:
    if recorded and recorded != {given}:
      raise ValueError(f"run {run_id!r} was evaluated on dataset {recorded.pop()} in {where}, "
                       f"not on the dataset_id={given!r} given")
    return given
  if not recorded:
    raise ValueError(f"run {run_id!r} has no dataset identity (dataset_id) in {where}: "
                     "write its metrics with dataset_id (the preprocess step's output) or "
                     "pass dataset_id")
  return recorded.pop()


def run(store_uri: str, run_id: str, dataset: str, model_family: str, metric: str = "ndcg",
        k: int | None = 10, split: str = "valid", tolerance: float = 0.0,
        candidate_value: float | None = None, higher_is_better: bool | None = None,
        store_options: Mapping[str, Any] | None = None,
        dataset_id: str | None = None, guard_metric: str | None = None) -> dict[str, Any]:
  """Gates a candidate run against the champion on its data and records the decision.

  Args:
    store_uri: ``bq://project.dataset.table`` or ``duckdb:///path/metrics.duckdb``.
    run_id: the candidate run.
    dataset: the dataset's display label (for the record and the messages).
    model_family: the ``model`` column (``"sasrec"``).
    metric: the gate metric's name, without the cut-off (``"ndcg"``, ``"mrr"``).
    k: the cut-off (10), or None for ``"mrr"``.
    split: the split to compare on (model selection is on ``"valid"``).
    tolerance: relative tolerance in [0, 1) (see the module docstring).
    candidate_value: the candidate's value; default: read from the store (the
      write_metrics step must have run). A given value is written to the store with
      the decision (replacing the run's row of that metric, if any).
    higher_is_better: False for metrics such as a loss; default: from the name.
    store_options: keyword arguments for :func:`components.metrics_store.open_store`.
    dataset_id: the data's identity (``ds-...``); default: the one the candidate's
      metrics were written with. Champions are looked up by it.
    guard_metric: a second metric without cut-off (``"logloss"``) that may veto a
      blessing: worse than the champion's by more than the slack -> rejected.

  Returns:
    ``{"decision", "blessed", "champion_run_id", "champion_value", "candidate_value",
    "threshold", "reject_threshold", "metric", "dataset", "dataset_id", "reason"}``;
    ``blessed`` is True only for "blessed"; champion entries and thresholds are None
    when there was no champion.

  Raises:
    ValueError: bad tolerance or metric name, a NaN candidate, no candidate value, or
      no (or a conflicting) dataset identity.
  """
  if not 0.0 <= tolerance < 1.0:
    raise ValueError(f"tolerance is relative and must lie in [0, 1), got {tolerance}")
  if "@" in metric:
    raise ValueError(f"give the metric without its cut-off and k apart "
                     f"(metric={metric.split('@')[0]!r}, k={metric.split('@')[1]}), got {metric!r}")
  name = metric if k is None else f"{metric}@{k}"
  if higher_is_better is None:
    higher_is_better = is_higher_better(metric)
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
  dataset_id = _dataset_id(own, run_id, dataset_id, store.uri)

  context = next((r for r in own if r.metric != metrics_store.BLESSED_METRIC), None)
  model_uri = context.model_uri if context else None
  champ = store.champion(dataset_id, model_family, metric, k, split=split,
                         exclude_run_id=run_id, higher_is_better=higher_is_better)
  champion_value = champ.value if champ else None
  decision, threshold, reject_at = decide(candidate_value, champion_value, tolerance,
                                          higher_is_better)
  if champ is None:
    reason = (f"no blessed {model_family} on {dataset} ({dataset_id}) yet: the first model "
              "on this data is blessed")
  elif model_uri and model_uri == champ.model_uri:
    decision = TIE
    reason = (f"tie: not redeployed: the same model as champion {champ.run_id} "
              f"({model_uri}), e.g. a cached retrain on unchanged data")
  else:
    champion_text = (f"champion {champ.run_id}: {champ.value:.6g}, "
                     f"relative tolerance {tolerance:g}")
    better, worse = (">", "<") if higher_is_better else ("<", ">")
    if decision == BLESSED:
      reason = f"{split} {name} {candidate_value:.6g} {better} {threshold:.6g} ({champion_text})"
    elif decision == REJECTED:
      reason = f"{split} {name} {candidate_value:.6g} {worse} {reject_at:.6g} ({champion_text})"
    else:
      reason = (f"tie: not redeployed: {split} {name} {candidate_value:.6g} within "
                f"[{min(threshold, reject_at):.6g}, {max(threshold, reject_at):.6g}] "
                f"({champion_text})")
  guard = None
  if guard_metric and champ is not None and decision == BLESSED:
    guard = _guard(store, own, champ.run_id, guard_metric, split, tolerance)
    if guard["decision"] == REJECTED:
      decision = REJECTED
      reason = (f"{reason}, but {guard['reason']}")
  result = {"decision": decision, "blessed": decision == BLESSED,
            "champion_run_id": champ.run_id if champ else None,
            "champion_value": champion_value, "candidate_value": candidate_value,
            "threshold": threshold, "reject_threshold": reject_at,
            "metric": f"{split}/{name}", "dataset": dataset, "dataset_id": dataset_id,
            "reason": reason}
  if guard is not None:
    result["guard"] = guard

  # Record the decision (and a given candidate value, so that a blessed run can be found
  # as the champion later) in one write; the candidate's other rows give the context.
  common = dict(run_id=run_id, model=model_family, dataset=dataset, split=split,
                dataset_id=dataset_id,
                pipeline=context.pipeline if context else None, model_uri=model_uri)
  rows = [metrics_store.MetricRow(
      metric=metrics_store.BLESSED_METRIC, k=None,
      value=metrics_store.DECISION_VALUES[decision],
      labels={"gate": {**result, "tolerance": tolerance, "higher_is_better": higher_is_better}},
      **common)]
  if given:
    rows.append(metrics_store.MetricRow(metric=metric, k=k, value=candidate_value,
                                        labels=context.labels if context else {}, **common))
  store.write(rows)
  return result


def _guard(store, own, champion_run_id: str, metric: str, split: str,
           tolerance: float) -> dict[str, Any]:
  """The guard metric's own gate: the candidate's value against the champion run's."""
  def value(rows, who):
    found = [r.value for r in rows if (r.split, r.metric, r.k) == (split, metric, None)]
    if not found:
      raise ValueError(f"{who} has no {split} {metric} in {store.uri}: the guard metric "
                       "must be written with the gate metric")
    return float(found[0])
  candidate = value(own, "the candidate")
  champion = value(store.rows(champion_run_id), f"champion {champion_run_id}")
  better = is_higher_better(metric)
  decision, _, reject_at = decide(candidate, champion, tolerance, better)
  worse = "<" if better else ">"
  reason = (f"guard {split} {metric} {candidate:.6g} {worse} {reject_at:.6g} (champion "
            f"{champion:.6g})" if decision == REJECTED else
            f"guard {split} {metric} {candidate:.6g} holds (champion {champion:.6g})")
  return {"metric": f"{split}/{metric}", "candidate_value": candidate,
          "champion_value": champion, "decision": decision, "reason": reason}


# ---------------------------------------------------------------------------
# KFP component (the pipeline's validate step; pipelines/dag.py). The body runs in the
# recml-tools image and only calls ``run``. Its single return value is the decision as a
# string ("blessed" / "tie" / "rejected"): kfp.local silently skips float comparisons in dsl.If,
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
    dataset_id: str = "",
    guard_metric: str = "",
) -> str:
  """Compares this run with the champion on the same data: bless, tie or reject.

  Args:
    store_uri: the metrics store.
    verdict: a Markdown note with the comparison; its metadata holds the gate's numbers.
    run_id: the run id; empty: the pipeline job name.
    job_name: the pipeline job name (``dsl.PIPELINE_JOB_NAME_PLACEHOLDER``).
    dataset: the dataset's display label.
    model_family: champion per dataset identity and model family.
    metric: e.g. ``ndcg``.
    k: the cut-off; 0 for metrics without one (mrr).
    split: the split compared.
    tolerance: relative tolerance (0.01: within 1% of the champion is a tie).
    dataset_id: the dataset identity (the preprocess step's output); empty: the one the
      run's metrics were written with.
    guard_metric: e.g. ``logloss`` for ranking: may veto a blessing (module docstring).

  Returns:
    The decision: "blessed" (deploy), "tie" (not redeployed) or "rejected".
  """
  from components import validate as step  # pylint: disable=g-import-not-at-top
  result = step.run(store_uri, run_id or job_name, dataset, model_family, metric,
                    k if k > 0 else None, split, tolerance, dataset_id=dataset_id or None,
                    guard_metric=guard_metric or None)
  decision = result["decision"]
  shown = f"{metric}@{k}" if k > 0 else metric
  lines = [f"# Gate: {decision}", "", f"{shown} on {split}, tolerance {tolerance}", ""]
  lines += [f"- **{key}**: {value}" for key, value in sorted(result.items())]
  with open(verdict.path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  verdict.metadata.update({k_: v for k_, v in result.items()
                           if isinstance(v, (str, int, float, bool))})
  verdict.metadata["decision"] = decision
  return decision

