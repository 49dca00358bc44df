"""HTML building blocks of the reports: inline SVG charts, tables, the page around them.

Two reports use them: the evaluate step's (:mod:`components.evaluate`, an artifact the
KFP and Vertex UIs show) and the whole run's (:mod:`pipelines.report`, written after a
local run). Everything is inline (SVG, CSS): no scripts and no external assets, so a
page opens offline and inside the UIs.
"""

import datetime
import html
import os
from typing import Any, Mapping, Sequence

METRIC_ORDER = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr",
                "auc", "logloss", "accuracy", "ne", "calibration", "label_rate", "count")
HEADLINE = ("hr@10", "ndcg@10", "mrr", "auc", "logloss")  # those of each task that exist
# Per task: the metrics drawn per epoch (valid and test) and the throughput's log key.
TRAINING_CURVES = {
    "retrieval": ((("ndcg@10", "NDCG@10"), ("hr@10", "HR@10")), "sequences_per_second",
                  "sequences/s"),
    "ranking": ((("auc", "AUC"), ("logloss", "Log loss")), "examples_per_second",
                "examples/s"),
}
SPLIT_LABELS = {"valid": "validation (selected epoch)", "test": "test (selected checkpoint)",
                "best_test": "test, best epoch (for comparison with papers only)"}
COLORS = ("#1a73e8", "#d93025", "#188038", "#f9ab00", "#9334e6", "#12b5cb")
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#202124;max-width:1140px}
table{border-collapse:collapse;margin:8px 0 12px}td,th{border:1px solid #dadce0;padding:4px 10px;text-align:right}
th:first-child,td.l,th.l{text-align:left}th{background:#f8f9fa}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{border:1px solid #dadce0;border-radius:8px;padding:10px 18px}.v{font-size:24px}.k{color:#5f6368}
.charts{display:flex;flex-wrap:wrap;gap:8px}small,.note{color:#5f6368}h2{margin:22px 0 6px}
.blessed{color:#188038}.tie{color:#b06000}.rejected,.failed{color:#d93025}
.chain{display:flex;flex-wrap:wrap;align-items:stretch;gap:6px}.chain .card{max-width:200px;overflow-wrap:anywhere}
.chain .arrow{align-self:center;font-size:20px;color:#5f6368}code{font-size:90%}
"""


def esc(value: Any) -> str:
  return html.escape(str(value))


def number(value: Any, digits: int = 4) -> str:
  """Counts with thousands separators, other numbers with ``digits`` decimals."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  return f"{value:,.{digits}f}"


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The metric names of some ``{name: value}`` rows: the usual order, then the rest."""
  present = {m for row in rows for m in row}
  return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], ids: Sequence[str] = (),
          left: int = 1, digits: int = 4) -> str:
  """A table of escaped text; numbers formatted by :func:`number` (``digits`` decimals).

  The first ``left`` columns are labels (left-aligned), the others values. ``ids`` (one
  per row, optional) become the rows' ``id`` attributes, for links and tests.
  """
  head = "".join(f'<th class="l">{esc(h)}</th>' if j < left else f"<th>{esc(h)}</th>"
                 for j, h in enumerate(header))
  body = []
  for i, row in enumerate(rows):
    row_id = f' id="{esc(ids[i])}"' if i < len(ids) and ids[i] else ""
    cells = "".join(f'<td class="l">{esc(c)}</td>' if j < left
                    else f"<td>{esc(number(c, digits))}</td>" for j, c in enumerate(row))
    body.append(f"<tr{row_id}>{cells}</tr>")
  return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def metrics_table(result: Mapping[str, Any]) -> str:
  """Metrics at K: one row per split present (``valid``, ``test``, ``best_test``)."""
  splits = [s for s in SPLIT_LABELS if isinstance(result.get(s), Mapping)]
  names = metric_names([result[s] for s in splits])
  rows = [[SPLIT_LABELS[s], *(result[s].get(m, "-") for m in names)] for s in splits]
  return table(["split", *names], rows, ids=[f"metrics-{s}" for s in splits])


def cards(items: Sequence[tuple[str, Any]], css: Sequence[str] = ()) -> str:
  """Headline numbers as cards: ``(label, value)``; ``css`` classes per card value."""
  out = []
  for i, (label, value) in enumerate(items):
    cls = f" {css[i]}" if i < len(css) and css[i] else ""
    out.append(f'<div class="card"><div class="v{cls}">{esc(number(value))}</div>'
               f'<div class="k">{esc(label)}</div></div>')
  return f'<div class="cards">{"".join(out)}</div>'


def svg_line_chart(series: Mapping[str, Sequence[tuple[float, float]]], title: str,
                   width: int = 460, height: int = 240, x_label: str = "epoch",
                   x_ticks: Sequence[float] | None = None, markers: bool = True) -> str:
  """A self-contained SVG line chart: one polyline per named series of (x, y) points.

  ``x_ticks``: the labelled x values (default: up to 8 of the points' x values);
  ``markers``: a dot (with its value as a tooltip) at each point.
  """
  points = [p for s in series.values() for p in s]
  pad_l, pad_r, pad_t, pad_b = 52, 12, 24, 34
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'role="img" aria-label="{esc(title)}">',
         f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{esc(title)}</text>']
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
  ticks = x_ticks if x_ticks is not None else sorted(set(xs))[:: max(1, len(set(xs)) // 8)]
  for x in ticks:
    out.append(f'<text x="{sx(x):.1f}" y="{pad_t + plot_h + 14}" text-anchor="middle" '
               f'font-size="10">{x:g}</text>')
  out.append(f'<text x="{pad_l + plot_w / 2}" y="{height - 4}" text-anchor="middle" '
             f'font-size="10">{esc(x_label)}</text>')
  for i, (name, pts) in enumerate(series.items()):
    color = COLORS[i % len(COLORS)]
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
    for x, y in pts if markers else ():
      out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                 f'<title>{esc(name)} {esc(x_label)} {x:g}: {y:.5g}</title></circle>')
    out.append(f'<text x="{pad_l + 8}" y="{pad_t + 14 + 13 * i}" font-size="11" '
               f'fill="{color}">{esc(name)}</text>')
  out.append("</svg>")
  return "".join(out)


def svg_bar_chart(bars: Sequence[tuple[str, float]], title: str, unit: str = "s",
                  width: int = 720, bar_height: int = 20) -> str:
  """A self-contained horizontal SVG bar chart: one labelled bar per ``(name, value)``."""
  pad_l, pad_r, pad_t, gap = 130, 70, 24, 6
  height = pad_t + len(bars) * (bar_height + gap) + 8
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'role="img" aria-label="{esc(title)}">',
         f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{esc(title)}</text>']
  top = max((v for _, v in bars), default=0.0) or 1.0
  plot_w = width - pad_l - pad_r
  for i, (name, value) in enumerate(bars):
    y = pad_t + i * (bar_height + gap)
    w = max(value, 0.0) / top * plot_w
    out.append(f'<text x="{pad_l - 6}" y="{y + bar_height * 0.7:.1f}" text-anchor="end" '
               f'font-size="12">{esc(name)}</text>')
    out.append(f'<rect x="{pad_l}" y="{y}" width="{w:.1f}" height="{bar_height}" '
               f'fill="{COLORS[0]}"><title>{esc(name)}: {value:.1f} {esc(unit)}</title></rect>')
    out.append(f'<text x="{pad_l + w + 4:.1f}" y="{y + bar_height * 0.7:.1f}" '
               f'font-size="12">{value:,.1f} {esc(unit)}</text>')
  out.append("</svg>")
  return "".join(out)


def curve(log: Sequence[Mapping[str, Any]], *keys: str) -> list[tuple[float, float]]:
  """``(epoch, value)`` of a nested key of the training log (``"valid", "hr@10"``)."""
  pts = []
  for row in log:
    value: Any = row
    for key in keys:
      value = value.get(key) if isinstance(value, Mapping) else None
    if isinstance(value, (int, float)) and "epoch" in row:
      pts.append((float(row["epoch"]), float(value)))
  return pts


def log_task(log: Sequence[Mapping[str, Any]]) -> str:
  """The task of a training log: ``ranking`` when it reports examples/s, else retrieval."""
  return "ranking" if any("examples_per_second" in row for row in log) else "retrieval"


def training_charts(log: Sequence[Mapping[str, Any]], task: str | None = None) -> str:
  """The training curves of a ``log.jsonl``: loss, the task's two headline metrics on
  valid and test (NDCG@10 and HR@10; AUC and log loss), and throughput.

  ``task``: ``retrieval`` or ``ranking``; default: :func:`log_task`.
  """
  pairs, rate_key, rate_label = TRAINING_CURVES[task or log_task(log)]
  charts = [svg_line_chart({"train loss": curve(log, "train_loss")}, "Training loss")]
  for name, label in pairs:
    charts.append(svg_line_chart({f"valid {name}": curve(log, "valid", name),
                                  f"test {name}": curve(log, "test", name)},
                                 f"{label} per epoch"))
  charts.append(svg_line_chart({rate_label: curve(log, rate_key)}, "Throughput"))
  return f'<div class="charts">{"".join(charts)}</div>'


def data_label(source: Mapping[str, Any]) -> str:
  """What the data is called, from ``dataset_info.json``'s ``source``: its input's name.

  ``/data/ml-1m-partial`` -> ``ml-1m-partial``; a single file keeps its folder's name
  (``ml-100k/u.data``); ``bq://p.d.t`` -> ``p.d.t``.
  """
  uri = str(source.get("input") or "").rstrip("/")
  if not uri:
    return ""
  if uri.startswith("bq://"):
    return uri[len("bq://"):]
  parts = uri.split("://", 1)[-1].split("/")
  files = source.get("files") or []
  if len(parts) > 1 and len(files) == 1 and files[0].rstrip("/") == uri:
    return "/".join(parts[-2:])
  return parts[-1]


def link(uri: str, text: str = "", base: str | None = None) -> str:
  """A link to a local path or URI that opens in a browser.

  Local paths become relative to ``base`` (the folder of the page) when given, so the
  page keeps working when the run folder moves with its root; a local path that does
  not exist is shown as text. ``gs://`` opens the Cloud Console; other URIs are text.
  """
  if not uri:
    return esc(text or "-")
  label = esc(text or uri)
  path = uri[len("file://"):] if uri.startswith("file://") else uri
  if "://" not in path:
    path = os.path.abspath(path)
    if not os.path.exists(path):  # e.g. an artifact that is only metadata
      return f'<span title="{esc(path)} (no file)">{label}</span>'
    href = os.path.relpath(path, base) if base else "file://" + path
    return f'<a href="{esc(href)}" title="{esc(path)}">{label}</a>'
  if uri.startswith("gs://"):
    return (f'<a href="https://console.cloud.google.com/storage/browser/{esc(uri[5:])}">'
            f"{label}</a>")
  return label


def page(title: str, body: str, subtitle: str = "") -> str:
  """A whole HTML document around ``body``: title, generation time, the shared style."""
  generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  note = f"generated {generated}" + (f"; {subtitle}" if subtitle else "")
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{esc(title)}</h1>
<small>{esc(note)}</small>
{body}
</body></html>
"""
