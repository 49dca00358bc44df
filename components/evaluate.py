"""Evaluate step: full-ranking metrics at the selected checkpoint, plus an HTML run report.

``run`` recomputes the metrics of a split (``test`` by default) from the model's best
checkpoint (``trainers.evaluate.evaluate``), merges them with what training recorded
(validation metrics at the selected epoch, the best test epoch for comparison with
papers) and renders a self-contained HTML report: headline numbers, a metrics table
and training curves as inline SVG (no scripts, no CDN; it opens offline and inside the
KFP/Vertex UIs).
"""


import datetime
import html
import json
import os
from typing import Any, Mapping, Sequence

from kfp.dsl import HTML, Input, Metrics, Model, Dataset, Output

from components import kfp_step

METRIC_ORDER = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")
HEADLINE = ("hr@10", "ndcg@10", "mrr")
COUNT_SUFFIXES = ("/ranked_targets", "/oov_targets")  # run facts: targets per split
REPORT_FILE = "report.html"


def read_log(model_dir: str) -> list[dict[str, Any]]:
  """The per-epoch training log (``log.jsonl``), oldest first; empty when absent."""
  path = os.path.join(model_dir, "log.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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
  if report_path:
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w", encoding="utf-8") as f:
      f.write(render_report(result, read_log(model_dir), title=title))
  return result


# ---------------------------------------------------------------------------
# HTML report
# ---------------------------------------------------------------------------


def svg_line_chart(series: Mapping[str, Sequence[tuple[float, float]]], title: str,
                   width: int = 460, height: int = 240) -> str:
  """A self-contained SVG line chart: one polyline per named series of (x, y) points."""
  colors = ("#1a73e8", "#d93025", "#188038", "#f9ab00", "#9334e6", "#12b5cb")
  points = [p for s in series.values() for p in s]
  pad_l, pad_r, pad_t, pad_b = 52, 12, 24, 34
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'role="img" aria-label="{html.escape(title)}">',
         f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">'
         f'{html.escape(title)}</text>']
  if not points:
    out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
               'font-size="12" fill="#666">no data</text></svg>')
    return "".join(out)
  xs, ys = [p[0] for p in points], [p[1] for p in points]
  x0, x1 = min(xs), max(xs)
  y0, y1 = min(ys), max(ys)
  if x1 == x0:
    x0, x1 = x0 - 1, x1 + 1
  if y1 == y0:
    y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
  plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

  def sx(x):
    return pad_l + (x - x0) / (x1 - x0) * plot_w

  def sy(y):
    return pad_t + (1 - (y - y0) / (y1 - y0)) * plot_h

  out.append(f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" '
             'fill="none" stroke="#ccc"/>')
  for i in range(5):  # y grid and labels
    y = y0 + (y1 - y0) * i / 4
    out.append(f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
               'stroke="#eee"/>')
    out.append(f'<text x="{pad_l - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" '
               f'font-size="10">{y:.4g}</text>')
  for x in sorted(set(xs))[:: max(1, len(set(xs)) // 8)]:
    out.append(f'<text x="{sx(x):.1f}" y="{pad_t + plot_h + 14}" text-anchor="middle" '
               f'font-size="10">{x:g}</text>')
  out.append(f'<text x="{pad_l + plot_w / 2}" y="{height - 4}" text-anchor="middle" '
             'font-size="10">epoch</text>')
  for i, (name, pts) in enumerate(series.items()):
    color = colors[i % len(colors)]
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
    for x, y in pts:
      out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                 f'<title>{html.escape(name)} epoch {x:g}: {y:.5g}</title></circle>')
    out.append(f'<text x="{pad_l + 8}" y="{pad_t + 14 + 13 * i}" font-size="11" '
               f'fill="{color}">{html.escape(name)}</text>')
  out.append("</svg>")
  return "".join(out)


def _curve(log: Sequence[Mapping[str, Any]], *keys: str) -> list[tuple[float, float]]:
  pts = []
  for row in log:
    value: Any = row
    for key in keys:
      value = value.get(key) if isinstance(value, Mapping) else None
    if isinstance(value, (int, float)) and "epoch" in row:
      pts.append((float(row["epoch"]), float(value)))
  return pts


def render_report(result: Mapping[str, Any], log: Sequence[Mapping[str, Any]],
                  title: str = "") -> str:
  """The HTML run report: headline numbers, a metrics table and training curves."""
  esc = html.escape
  splits = [s for s in ("valid", "test", "best_test") if isinstance(result.get(s), Mapping)]
  names = [m for m in METRIC_ORDER if any(m in result[s] for s in splits)]
  names += sorted({m for s in splits for m in result[s]} - set(names))
  labels = {"valid": "validation (selected epoch)", "test": "test (selected checkpoint)",
            "best_test": "test, best epoch (for comparison with papers only)"}
  rows = "".join(
      "<tr><th>{}</th>{}</tr>".format(
          esc(labels.get(s, s)),
          "".join(f"<td>{result[s][m]:.4f}</td>" if m in result[s] else "<td>-</td>"
                  for m in names))
      for s in splits)
  table = (f"<table><tr><th>split</th>{''.join(f'<th>{esc(m)}</th>' for m in names)}</tr>"
           f"{rows}</table>")
  test = result.get("test", {})
  cards = "".join(f'<div class="card"><div class="v">{test[m]:.4f}</div>'
                  f'<div class="k">test {esc(m)}</div></div>'
                  for m in HEADLINE if m in test)
  facts = {k: result[k] for k in ("model", "dataset", "selected_epoch", "epochs_run",
                                  "seconds_per_epoch", "sequences_per_second",
                                  "history_exclusion") if k in result}
  facts.update({k: v for k, v in result.items() if k.endswith(COUNT_SUFFIXES)})
  def fact(v):
    return f"{v:,.2f}" if isinstance(v, float) else str(v)
  facts_html = "".join(f"<li><b>{esc(k)}</b>: {esc(fact(v))}</li>" for k, v in facts.items())
  charts = [
      svg_line_chart({"train loss": _curve(log, "train_loss")}, "Training loss"),
      svg_line_chart({"valid ndcg@10": _curve(log, "valid", "ndcg@10"),
                      "test ndcg@10": _curve(log, "test", "ndcg@10")}, "NDCG@10 per epoch"),
      svg_line_chart({"valid hr@10": _curve(log, "valid", "hr@10"),
                      "test hr@10": _curve(log, "test", "hr@10")}, "HR@10 per epoch"),
      svg_line_chart({"sequences/s": _curve(log, "sequences_per_second")}, "Throughput"),
  ]
  excluded = {"all": "the whole history excluded",
              "window": "the last max_len history items excluded",
              "none": "history not excluded"}.get(result.get("history_exclusion"),
                                                  "history items excluded")
  generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  heading = esc(title or f"{result.get('model', 'model')} on {result.get('dataset', 'dataset')}")
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RecML run report: {heading}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#202124}}
table{{border-collapse:collapse;margin:12px 0}}td,th{{border:1px solid #dadce0;padding:4px 10px;text-align:right}}
th:first-child{{text-align:left}}.cards{{display:flex;gap:12px}}
.card{{border:1px solid #dadce0;border-radius:8px;padding:10px 18px}}.v{{font-size:24px}}.k{{color:#5f6368}}
.charts{{display:flex;flex-wrap:wrap;gap:8px}}small{{color:#5f6368}}
</style></head><body>
<h1>RecML run report: {heading}</h1>
<small>generated {generated}; full-ranking metrics over all items, {esc(excluded)};
out-of-vocabulary targets are not ranked</small>
<div class="cards">{cards}</div>
<ul>{facts_html}</ul>
<h2>Metrics</h2>{table}
<h2>Training curves</h2><div class="charts">{''.join(charts)}</div>
</body></html>
"""


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
  report.metadata.update({k: result[k] for k in ("model", "dataset", "selected_epoch",
                                                 "history_exclusion") if k in result})
  report.metadata.update({f"test/{k}": v for k, v in result.get("test", {}).items()
                          if k in step.HEADLINE})
  with open(metrics.path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
