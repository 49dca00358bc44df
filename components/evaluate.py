"""Evaluate step: full-ranking metrics at the selected checkpoint, plus an HTML run report.

``run`` recomputes the metrics of a split (``test`` by default) from the model's best
checkpoint (``trainers.evaluate.evaluate``), merges them with what training recorded
(validation metrics at the selected epoch, the best test epoch for comparison with
papers) and renders a self-contained HTML report: headline numbers, a metrics table
and training curves as inline SVG (no scripts, no CDN; it opens offline and inside the
KFP/Vertex UIs). The data is named by what it is (``data_source``, from
``dataset_info.json``: ``ml-1m-partial``), not only by the config's label. The whole
run's report (data, timings, gate, deployment, lineage) is :mod:`pipelines.report`.
"""


import json
import os
from typing import Any, Mapping, Sequence

from kfp.dsl import HTML, Input, Metrics, Model, Dataset, Output

from components import kfp_step, report_html
from components.report_html import HEADLINE

COUNT_SUFFIXES = ("/ranked_targets", "/oov_targets")  # run facts: targets per split


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
        return report_html.data_label(features.load_dataset_info(folder).source)
      except FileNotFoundError:
        continue
  return ""


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
    data_dir: the sequence dataset (defaults to the one recorded in config.json).
    split: the split to recompute (``test`` or ``valid``).
    report_path: where to write the HTML report (skipped when None).
    title: report title (e.g. the run id).
    dataset_name: the dataset's name (default: what training recorded).

  Returns:
    ``{split: {...}, "valid": {...}, "best_test": {...}, "model", "dataset",
    "selected_epoch", "history_exclusion", "<split>/oov_targets", ...}``: the
    recomputed split and its facts plus what training recorded.
  """
  from trainers import evaluate as evaluator  # pylint: disable=g-import-not-at-top
  values, facts = evaluator.evaluate_split(model_dir, data_dir=data_dir, split=split)
  recomputed = _flat_metrics(values, split)
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
  result[split] = recomputed
  result.update(facts)  # the rule and counts of the recomputation
  if dataset_name:
    result["dataset"] = dataset_name
  source = _data_source(model_dir, data_dir)
  if source:
    result["data_source"] = source  # what the data is (the config's label may differ)
  if report_path:
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w", encoding="utf-8") as f:
      f.write(render_report(result, read_log(model_dir), title=title))
  return result


# ---------------------------------------------------------------------------
# HTML report (the building blocks are components/report_html.py, shared with the
# whole run's report, pipelines/report.py)
# ---------------------------------------------------------------------------


def render_report(result: Mapping[str, Any], log: Sequence[Mapping[str, Any]],
                  title: str = "") -> str:
  """The HTML report of the evaluation: headline numbers, a metrics table, training curves."""
  test = result.get("test", {})
  headline = report_html.cards([(f"test {m}", test[m]) for m in HEADLINE if m in test])
  data = result.get("data_source") or result.get("dataset") or "dataset"
  facts = {"model": result.get("model", "model"), "data": data}
  if result.get("dataset", data) != data:
    facts["config label"] = result["dataset"]  # e.g. "ml-1m" for ml-1m-partial
  facts.update({k: result[k] for k in ("selected_epoch", "epochs_run", "seconds_per_epoch",
                                       "sequences_per_second", "history_exclusion")
                if k in result})
  facts.update({k: v for k, v in result.items() if k.endswith(COUNT_SUFFIXES)})
  def fact(v):
    return f"{v:,.2f}" if isinstance(v, float) else str(v)
  facts_html = "".join(f"<li><b>{report_html.esc(k)}</b>: {report_html.esc(fact(v))}</li>"
                       for k, v in facts.items())
  excluded = {"all": "the whole history excluded",
              "window": "the last max_len history items excluded",
              "none": "history not excluded"}.get(result.get("history_exclusion"),
                                                  "history items excluded")
  heading = title or f"{facts['model']} on {data}"
  body = (f"{headline}<ul>{facts_html}</ul>"
          f"<h2>Metrics</h2>{report_html.metrics_table(result)}"
          f"<h2>Training curves</h2>{report_html.training_charts(log)}")
  return report_html.page(
      f"RecML evaluation: {heading}", body,
      f"full-ranking metrics over all items, {excluded}; out-of-vocabulary targets are "
      "not ranked")


@kfp_step.step("trainer")
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    split: str = "test",
    title: str = "",
    dataset_name: str = "",
):
  """Full-ranking evaluation at the selected checkpoint, with an HTML run report.

  Args:
    model: the train step's Model (work directory).
    dataset: the sequence dataset.
    metrics: ``<split>/<metric>`` values; the file holds every split as JSON.
    report: a self-contained HTML report (metrics table + training curves).
    split: the split to recompute.
    title: report title.
    dataset_name: the dataset's name, for the report and metadata.
  """
  import json  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  from components import evaluate as step  # pylint: disable=g-import-not-at-top

  result = step.run(model.path, dataset.path, split, report.path, title, dataset_name)
  for name in ("valid", "test", "best_test"):
    for key, value in result.get(name, {}).items():
      metrics.log_metric(f"{name}/{key}", value)
  for key, value in result.items():
    if key.endswith(step.COUNT_SUFFIXES):
      metrics.log_metric(key, value)
  report.metadata.update({k: result[k] for k in ("model", "dataset", "data_source",
                                                 "selected_epoch", "history_exclusion")
                          if k in result})
  report.metadata.update({f"test/{k}": v for k, v in result.get("test", {}).items()
                          if k in step.HEADLINE})
  with open(metrics.path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
