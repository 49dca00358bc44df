"""Evaluate step: the selected checkpoint's metrics, plus an HTML run report.

``run`` recomputes the metrics of a split (``test`` by default) from the model's best
checkpoint, merges them with what training recorded (validation metrics at the
selected epoch, the best test epoch for comparison with papers) and renders a
self-contained HTML report: headline numbers, a metrics table and training curves as
inline SVG (no scripts, no CDN; it opens offline and inside the KFP/Vertex UIs). The
data is named by what it is (``data_source``, from ``dataset_info.json``:
``ml-1m-partial``), not only by the config's label. The whole run's report (data,
timings, gate, deployment, lineage) is :mod:`pipelines.report`.

The model's task decides what is computed:

* retrieval (SASRec, HSTU): full-ranking HR/NDCG/MRR of ``split``
  (``trainers.evaluate.evaluate_split``); validation from training;
* ranking (DLRM v2, DCNv2): AUC, log loss, accuracy, NE and calibration of ``valid``
  and ``split``, both recomputed (:mod:`trainers.ranking_eval`), plus the ROC curve and
  the confusion matrix at 0.5 of ``split``, which the KFP component logs as a
  ``ClassificationMetrics`` artifact (shown by the KFP and Vertex UIs) and the report
  draws.
"""


import json
import os
from typing import Any, Mapping, Sequence

from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import kfp_step, report_html
from components.report_html import HEADLINE

# Run facts: targets (retrieval) or examples (ranking) per split.
COUNT_SUFFIXES = ("/ranked_targets", "/oov_targets", "/examples")


def read_log(model_dir: str) -> list[dict[str, Any]]:
  """The per-epoch training log (``log.jsonl``), oldest first; empty when absent."""
  path = os.path.join(model_dir, "log.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _data_source(model_dir: str, data_dir: str | None) -> str:
  """The data's name from ``dataset_info.json`` (``ml-1m-partial``); empty when unknown."""
  from trainers import features  # pylint: disable=g-import-not-at-top
  for folder in (data_dir, model_dir):  # training copies dataset_info.json to the model
    if folder:
      try:
        return report_html.data_label(features.read_dataset_json(folder).get("source") or {})
      except FileNotFoundError:
        continue
  return ""


def model_task(model_dir: str) -> str:
  """``retrieval`` or ``ranking``: the task of the model a work directory holds."""
  from trainers import configs  # pylint: disable=g-import-not-at-top
  from trainers.checkpoints import load_config_dict  # pylint: disable=g-import-not-at-top
  return configs.TrainConfig.from_dict(load_config_dict(model_dir)).task


def _flat_metrics(values: Mapping[str, Any], split: str) -> dict[str, float]:
  """Accepts ``{"hr@10": x}`` or ``{"test": {"hr@10": x}}`` and returns the flat form."""
  if split in values and isinstance(values[split], Mapping):
    values = values[split]
  return {k: float(v) for k, v in values.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run(model_dir: str, data_dir: str | None = None, split: str = "test",
        report_path: str | None = None, title: str = "",
        dataset_name: str = "") -> dict[str, Any]:
  """Evaluates the model's selected checkpoint and writes the HTML report.

  Args:
    model_dir: the train step's work directory.
    data_dir: the dataset (defaults to the one recorded in config.json).
    split: the split to recompute (``test`` or ``valid``).
    report_path: where to write the HTML report (skipped when None).
    title: report title (e.g. the run id).
    dataset_name: the dataset's name (default: what training recorded).

  Returns:
    ``{split: {...}, "valid": {...}, "best_test": {...}, "model", "dataset", "task",
    "selected_epoch", "history_exclusion", "<split>/oov_targets", ...}``: the
    recomputed split and its facts plus what training recorded (ranking: ``valid``
    recomputed too, and ``<split>/examples``).
  """
  return evaluate_model(model_dir, data_dir, split, report_path, title, dataset_name)[0]


def evaluate_model(model_dir: str, data_dir: str | None = None, split: str = "test",
                   report_path: str | None = None, title: str = "", dataset_name: str = ""
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """:func:`run`'s result, and for a ranking model the classification curves of ``split``.

  Returns:
    ``(result, curves)``: ``result`` as :func:`run` returns it; ``curves`` is None for
    a retrieval model, else ``{"split", "roc": {"fpr", "tpr", "threshold"},
    "confusion_matrix": [[tn, fp], [fn, tp]], "classes"}`` (:mod:`trainers.ranking_eval`).
  """
  curves = None
  task = model_task(model_dir)
  if task == "ranking":
    from trainers import ranking_eval  # pylint: disable=g-import-not-at-top
    evaluation = ranking_eval.evaluate(model_dir, data_dir=data_dir, split=split)
    recomputed = evaluation["metrics"]
    facts = evaluation["facts"]
    curves = {"split": split, "roc": evaluation["roc"],
              "confusion_matrix": evaluation["confusion_matrix"],
              "classes": list(ranking_eval.CLASSES)}
  else:
    from trainers import evaluate as evaluator  # pylint: disable=g-import-not-at-top
    values, facts = evaluator.evaluate_split(model_dir, data_dir=data_dir, split=split)
    recomputed = {split: _flat_metrics(values, split)}
  trained = {}
  path = os.path.join(model_dir, "metrics.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      trained = json.load(f)
  # Run facts (scalars) and the splits; other mappings (e.g. the best test epoch per
  # metric) are not metrics and would read as extra splits downstream.
  result = {k: v for k, v in trained.items() if not isinstance(v, (Mapping, list))}
  for name in ("valid", "test", "best_test"):
    if isinstance(trained.get(name), Mapping):
      result[name] = _flat_metrics(trained[name], name)
  result.update(recomputed)
  result.update(facts)  # the rule and counts of the recomputation
  result["task"] = task
  if dataset_name:
    result["dataset"] = dataset_name
  source = _data_source(model_dir, data_dir)
  if source:
    result["data_source"] = source  # what the data is (the config's label may differ)
  if report_path:
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w", encoding="utf-8") as f:
      f.write(render_report(result, read_log(model_dir), title=title, curves=curves))
  return result, curves


# ---------------------------------------------------------------------------
# HTML report (the building blocks are components/report_html.py, shared with the
# whole run's report, pipelines/report.py)
# ---------------------------------------------------------------------------


def render_report(result: Mapping[str, Any], log: Sequence[Mapping[str, Any]],
                  title: str = "", curves: Mapping[str, Any] | None = None) -> str:
  """The HTML report of the evaluation: headline numbers, a metrics table, training curves
  (and for a ranking model, ``curves``: the ROC curve and the confusion matrix)."""
  ranking = result.get("task") == "ranking"
  test = result.get("test", {})
  headline = report_html.cards([(f"test {m}", test[m]) for m in HEADLINE if m in test])
  data = result.get("data_source") or result.get("dataset") or "dataset"
  facts = {"model": result.get("model", "model"), "data": data}
  if result.get("dataset", data) != data:
    facts["config label"] = result["dataset"]  # e.g. "ml-1m" for ml-1m-partial
  facts.update({k: result[k] for k in ("selected_epoch", "epochs_run", "seconds_per_epoch",
                                       "sequences_per_second", "examples_per_second",
                                       "history_exclusion")
                if k in result})
  facts.update({k: v for k, v in result.items() if k.endswith(COUNT_SUFFIXES)})
  def fact(v):
    return f"{v:,.2f}" if isinstance(v, float) else str(v)
  facts_html = "".join(f"<li><b>{report_html.esc(k)}</b>: {report_html.esc(fact(v))}</li>"
                       for k, v in facts.items())
  heading = title or f"{facts['model']} on {data}"
  body = (f"{headline}<ul>{facts_html}</ul>"
          f"<h2>Metrics</h2>{report_html.metrics_table(result)}"
          f"<h2>Training curves</h2>{report_html.training_charts(log)}")
  if ranking:
    if curves:
      body += f"<h2>Classification ({report_html.esc(curves['split'])})</h2>{_curves_html(curves)}"
    return report_html.page(
        f"RecML evaluation: {heading}", body,
        "click-through metrics of the selected checkpoint: exact AUC (ties count half), "
        "log loss, accuracy at 0.5, normalised entropy, calibration (mean prediction / "
        "label rate)")
  excluded = {"all": "the whole history excluded",
              "window": "the last max_len history items excluded",
              "none": "history not excluded"}.get(result.get("history_exclusion"),
                                                  "history items excluded")
  return report_html.page(
      f"RecML evaluation: {heading}", body,
      f"full-ranking metrics over all items, {excluded}; out-of-vocabulary targets are "
      "not ranked")


def _curves_html(curves: Mapping[str, Any]) -> str:
  """The ROC curve (with the chance diagonal) and the confusion matrix at 0.5."""
  roc = curves["roc"]
  chart = report_html.svg_line_chart(
      {"ROC": list(zip(roc["fpr"], roc["tpr"])), "chance": [(0.0, 0.0), (1.0, 1.0)]},
      "ROC curve", x_label="false positive rate (y: true positive rate)",
      x_ticks=(0.0, 0.25, 0.5, 0.75, 1.0), markers=False)
  classes = curves["classes"]
  matrix = report_html.table(
      ["label \\ predicted (p >= 0.5)", *classes],
      [[name, *row] for name, row in zip(classes, curves["confusion_matrix"])])
  return f'<div class="charts">{chart}<div>{matrix}</div></div>'


@kfp_step.step("trainer")
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    classification: Output[ClassificationMetrics],
    split: str = "test",
    title: str = "",
    dataset_name: str = "",
):
  """Evaluation at the selected checkpoint, with an HTML run report.

  Args:
    model: the train step's Model (work directory).
    dataset: the dataset (sequence or ranking).
    metrics: ``<split>/<metric>`` values; the file holds every split as JSON.
    report: a self-contained HTML report (metrics table + training curves).
    classification: a ranking model's ROC curve and confusion matrix at 0.5 on
      ``split`` (the KFP/Vertex UIs draw them; the file holds them as JSON); empty
      metadata for a retrieval model.
    split: the split to recompute.
    title: report title.
    dataset_name: the dataset's name, for the report and metadata.
  """
  import json  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  from components import evaluate as step  # pylint: disable=g-import-not-at-top

  result, curves = step.evaluate_model(model.path, dataset.path, split, report.path, title,
                                       dataset_name)
  for name in ("valid", "test", "best_test"):
    for key, value in result.get(name, {}).items():
      metrics.log_metric(f"{name}/{key}", value)
  for key, value in result.items():
    if key.endswith(step.COUNT_SUFFIXES):
      metrics.log_metric(key, value)
  report.metadata.update({k: result[k] for k in ("model", "dataset", "data_source", "task",
                                                 "selected_epoch", "history_exclusion")
                          if k in result})
  report.metadata.update({f"test/{k}": v for k, v in result.get("test", {}).items()
                          if k in step.HEADLINE})
  with open(metrics.path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  if curves:
    roc = curves["roc"]
    classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["threshold"])
    classification.log_confusion_matrix(curves["classes"], curves["confusion_matrix"])
    classification.metadata["split"] = curves["split"]
  with open(classification.path, "w", encoding="utf-8") as f:
    json.dump(curves or {"task": result.get("task"),
                         "note": "no classification metrics for a retrieval model"}, f)
