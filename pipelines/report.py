"""The run report: one self-contained HTML page that tells a whole local run.

``write_run_report(run_dir)`` writes ``<run_dir>/report.html`` after a local run (``recml
run`` calls it at the end), from what the run folder holds:

* the data: the preprocess step's ``dataset_info.json`` (rows read, kept, quarantined by
  reason; users; items; examples per split), named by its source (``ml-1m-partial``),
  with its identity (``dataset_id``) and the input's fingerprint;
* the step timings: ``run.json``'s ``steps`` (state, wall time, key numbers and log of
  each step, recorded by :mod:`pipelines.run_output`) or, for runs recorded without
  them, the times at which kfp.local's task folders recorded each step's end
  (:func:`step_timings`), as a bar chart;
* training curves (the train step's ``log.jsonl``) and metrics at K (the evaluate
  step's output);
* the gate: its verdict and reason (the validate step's output), and this run's and
  the champion's numbers side by side (the metrics store);
* the deployed version (the deploy step's record) or why nothing was deployed;
* the lineage, input fingerprint -> dataset -> model -> bundle -> deployment, with each
  step's outputs, as links relative to the run folder (they open in a browser).

The page has no scripts and no external assets (inline CSS and SVG: the building blocks
are :mod:`components.report_html`, shared with the evaluate step's report). A part the
run folder cannot supply (a step that did not run, an unreadable file) is rendered as a
note saying why, never left out silently.
"""

import datetime
import json
import os
import re
from typing import Any, Mapping

from components import report_html
from components.report_html import esc, number
from pipelines import local as local_lib

# The chain the lineage section draws: (label, step, output artifact).
CHAIN = (("input fingerprint", "fingerprint", "manifest"), ("dataset", "preprocess", "dataset"),
         ("model", "train", "model"), ("bundle", "export", "bundle"),
         ("deployment", "deploy", "deployment"))


def _read_json(path: str) -> Any:
  """A JSON file; ValueError naming the file when it is not JSON."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON: {e}") from e


def _path(uri: str) -> str:
  return uri[len("file://"):] if uri.startswith("file://") else uri


def _time(text: Any) -> datetime.datetime | None:
  try:
    return datetime.datetime.fromisoformat(str(text))
  except ValueError:
    return None


def _note(text: str) -> str:
  return f'<p class="note">{esc(text)}</p>'


# ---------------------------------------------------------------------------
# What the run folder holds
# ---------------------------------------------------------------------------


def step_timings(run_dir: str, record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
  """Each step's state and wall time, and where they come from.

  ``run.json``'s ``steps`` mapping when it has one (:mod:`pipelines.run_output` records
  it: ``{step: {"state", "seconds", "text", "log", ...}}``). Otherwise they are derived
  from the newest attempt's task folders: kfp.local runs the tasks one at a time, and
  each task folder's ``recml_step.json`` (else ``executor_output.json``) is written when
  the step ends, so a step took from the previous step's end (the attempt's start for
  the first) to its own.

  Returns:
    ``([{"step", "state", "seconds", "summary", "log"}], source)``, in the order the
    steps ran; ``seconds`` is None for steps that did not run, ``log`` a path relative
    to the run folder or empty.
  """
  steps = record.get("steps")
  if isinstance(steps, Mapping) and steps:
    out = []
    for name, entry in steps.items():
      entry = entry if isinstance(entry, Mapping) else {}
      seconds = entry.get("seconds")
      summary = entry.get("text") or entry.get("error") or entry.get("summary") or ""
      if isinstance(summary, Mapping):
        summary = ", ".join(f"{k} {number(v)}" for k, v in summary.items() if v is not None)
      out.append({"step": str(name), "state": str(entry.get("state", "")),
                  "seconds": float(seconds) if isinstance(seconds, (int, float)) else None,
                  "summary": str(summary), "log": str(entry.get("log") or "")})
    return out, f"{local_lib.RUN_FILE} (steps)"
  folder = record.get("pipeline_dir") or local_lib.pipeline_folder(run_dir)
  if not folder or not os.path.isdir(folder):
    return [], "no pipeline folder"
  ends = []
  for task in os.listdir(folder):
    for name, state in (("recml_step.json", None), ("executor_output.json", "done")):
      path = os.path.join(folder, task, name)
      if os.path.isfile(path):
        if state is None:
          try:
            step = _read_json(path)
            state = "reused" if step.get("reused_from") else str(step.get("state", "done"))
          except ValueError:
            state = "unknown (unreadable recml_step.json)"
        ends.append((os.path.getmtime(path), task, state))
        break
  ends.sort()
  previous = _attempt_start(folder, record)
  previous = ends[0][0] if previous is None and ends else previous or 0.0
  out = []
  for end, task, state in ends:
    out.append({"step": task, "state": state, "seconds": max(end - previous, 0.0),
                "summary": "", "log": ""})
    previous = end
  return out, "file times of the task folders (each step from the previous one's end)"


def _attempt_start(folder: str, record: Mapping[str, Any]) -> float | None:
  """When the attempt's pipeline started (seconds since the epoch).

  kfp.local names its folder ``<pipeline>-%Y-%m-%d-%H-%M-%S-%f`` in local time when it
  starts; else the attempt's ``started`` in ``run.json`` (to the second, before compiling).
  """
  found = re.search(r"(\d{4}(-\d\d){5}-\d{6})$", os.path.basename(folder.rstrip(os.sep)))
  if found:
    return datetime.datetime.strptime(found.group(1), "%Y-%m-%d-%H-%M-%S-%f").timestamp()
  attempts = record.get("attempts") or [record]
  started = _time(attempts[-1].get("started"))
  return started.timestamp() if started else None


def _dataset_info(steps: Mapping[str, Mapping[str, Any]]):
  """The preprocess step's ``DatasetInfo`` (``RankingInfo`` for the ranking task) and its
  folder."""
  from trainers import features, ranking_features  # pylint: disable=g-import-not-at-top
  out = steps.get("preprocess", {}).get("outputs", {}).get("dataset")
  if not out:
    raise LookupError("the preprocess step recorded no dataset")
  folder = _path(out["uri"])
  path = os.path.join(folder, features.DATASET_INFO_FILE)
  record = _read_json(path)
  try:
    if record.get("task") == ranking_features.TASK:
      return ranking_features.RankingInfo.from_dict(record), folder
    return features.DatasetInfo.from_dict(record), folder
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e


def _store_rows(store_uri: str, run_ids: list[str]) -> dict[str, dict[str, dict[str, float]]]:
  """``{run_id: {split: {"ndcg@10": value}}}`` from the metrics store (gate rows left out)."""
  from components import metrics_store  # pylint: disable=g-import-not-at-top
  if store_uri.startswith("duckdb:///") and not os.path.exists(store_uri[len("duckdb:///"):]):
    raise FileNotFoundError(f"metrics store {store_uri} not found")
  store = metrics_store.open_store(store_uri)
  out: dict[str, dict[str, dict[str, float]]] = {}
  for run_id in run_ids:
    for r in store.rows(run_id):
      if r.metric != metrics_store.BLESSED_METRIC:
        out.setdefault(run_id, {}).setdefault(r.split, {})[r.name] = r.value
  return out


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _data_section(steps, run_dir: str) -> tuple[str, dict[str, Any]]:
  # pylint: disable=g-import-not-at-top
  from components.preprocess import step as preprocess_step
  from trainers import features
  # pylint: enable=g-import-not-at-top
  try:
    info, folder = _dataset_info(steps)
  except (LookupError, OSError, ValueError) as e:
    return _note(f"no data statistics: {e}"), {}
  source = info.source
  label = report_html.data_label(source)
  ranking = getattr(info, "task", "") == "ranking"
  summary = _ranking_rows(info) if ranking else preprocess_step.summary_rows(info)
  read = max((info.rows if ranking else info.counts).get("rows_read", 0), 1)
  rows, ids = [], []
  for key, text, n in summary:
    share = (f"{n / read:.2%}" if key.startswith(("rows_", "quarantined:")) else "")
    rows.append([text, n, share])
    ids.append(f"data-{key}")
  facts = [("data", label), ("input", source.get("input", "")),
           ("format", source.get("format", "")), ("dataset_id", source.get("dataset_id", "")),
           ("input fingerprint", source.get("fingerprint", ""))]
  if ranking:
    facts += [("label", info.label), ("dense features", len(info.dense)),
              ("categorical features", len(info.categorical)),
              ("split", (info.params.get("split") or {}).get("kind", ""))]
  else:
    facts += [("timestamps", f"input unit {info.source_timestamp_unit}, stored as seconds"),
              ("max_len", info.max_len),
              ("min item count", info.params.get("min_item_count", ""))]
  facts_html = "".join(f'<li><b>{esc(k)}</b>: <span id="data-{esc(k.replace(" ", "_"))}">'
                       f"{esc(number(v))}</span></li>" for k, v in facts)
  info_path = os.path.join(folder, features.DATASET_INFO_FILE)
  body = (f"<ul>{facts_html}</ul>"
          + report_html.table(["", "count", "of rows read"], rows, ids=ids)
          + f'<p class="note">from {report_html.link(info_path, _short(info_path, run_dir), run_dir)}'
          "</p>")
  return body, {"label": label, "dataset_id": source.get("dataset_id", ""),
                "folder": folder}


def _ranking_rows(info) -> list[tuple[str, str, int]]:
  """A ranking dataset's counts as ``(key, label, count)`` (rows, quarantine, examples)."""
  r = info.rows
  return [("rows_read", "rows read", r.get("rows_read", 0)),
          ("rows_kept", "rows kept", r.get("rows_kept", 0)),
          ("rows_quarantined", "rows quarantined", r.get("rows_quarantined", 0)),
          *[(f"quarantined:{kind}", f"quarantined: {kind}", n)
            for kind, n in sorted(info.quarantine.items())],
          *[(f"examples:{s}", f"{s} examples (label rate {info.label_rate.get(s, 0):.4f})", n)
            for s, n in info.counts.items()]]


def _timings_section(run_dir, record) -> tuple[str, float | None]:
  timings, source = step_timings(run_dir, record)
  if not timings:
    return _note(f"no step timings: {source}"), None
  bars = [(t["step"], t["seconds"]) for t in timings if t["seconds"] is not None]
  total = sum(v for _, v in bars)
  rows = []
  for t in timings:
    log = (report_html.link(os.path.join(run_dir, t["log"]), "log", run_dir)
           if t["log"] and os.path.exists(os.path.join(run_dir, t["log"])) else "")
    seconds = "-" if t["seconds"] is None else f"{t['seconds']:,.1f}"
    rows.append(f'<tr id="step-{esc(t["step"])}"><td class="l">{esc(t["step"])}</td>'
                f'<td class="l">{esc(t["state"])}</td><td>{seconds}</td>'
                f'<td class="l">{esc(t["summary"])}</td><td class="l">{log}</td></tr>')
  table = ('<table><tr><th class="l">step</th><th class="l">state</th><th>seconds</th>'
           '<th class="l">summary</th><th class="l">log</th></tr>' + "".join(rows) + "</table>")
  chart = report_html.svg_bar_chart(bars, f"Step wall time (total {total:,.1f} s)")
  return f'<div id="timings-chart">{chart}</div>' + table + _note(f"source: {source}"), total


def _gate_section(run, steps, run_id) -> tuple[str, dict[str, Any]]:
  validate = steps.get("validate", {})
  verdict = validate.get("outputs", {}).get("verdict", {}).get("metadata", {})
  decision = validate.get("values", {}).get("Output") or verdict.get("decision")
  if not decision:
    status = local_lib.status_text(run)
    return _note(f"no gate verdict (validate: {_state(run, steps, 'validate')}; "
                 f"run {status})"), {}
  champion = verdict.get("champion_run_id")
  gate_split, _, gate_name = str(verdict.get("metric", "")).partition("/")
  head = (f'<p id="gate-verdict"><b class="{esc(decision)}">{esc(decision.upper())}</b>: '
          f"{esc(verdict.get('reason', ''))}</p>")
  by_run, problem = {}, ""
  store_uri = run.get("store_uri") or run.get("parameters", {}).get("store_uri", "")
  try:
    by_run = _store_rows(store_uri, [run_id] + ([champion] if champion else []))
  except Exception as e:  # pylint: disable=broad-except
    problem = f"metrics store {store_uri or '(none recorded)'} unreadable: {e}"
  mine = {s: dict(v) for s, v in by_run.get(run_id, {}).items()}
  theirs = {s: dict(v) for s, v in by_run.get(champion, {}).items()} if champion else {}
  if gate_name and "candidate_value" in verdict:  # what the gate compared, at least
    mine.setdefault(gate_split, {}).setdefault(gate_name, verdict["candidate_value"])
    if champion and "champion_value" in verdict:
      theirs.setdefault(gate_split, {}).setdefault(gate_name, verdict["champion_value"])
  splits = [gate_split] + [s for s in ("valid", "test") if s != gate_split]
  splits = [s for s in splits if s in mine or s in theirs]
  names = report_html.metric_names([v for s in splits for v in (mine.get(s, {}),
                                                                  theirs.get(s, {}))])
  rows, ids = [], []
  for split in splits:
    a, b = mine.get(split, {}), theirs.get(split, {})
    rows.append([split, f"this run ({run_id})", *(a.get(m, "-") for m in names)])
    ids.append(f"gate-run-{split}")
    if champion:
      rows.append([split, f"champion ({champion})", *(b.get(m, "-") for m in names)])
      rows.append([split, "difference", *(f"{a[m] - b[m]:+.4f}" if m in a and m in b else "-"
                                         for m in names)])
      ids += [f"gate-champion-{split}", f"gate-difference-{split}"]
  header = ["split", "run", *(f"{m} (gate)" if m == gate_name else m for m in names)]
  notes = [f"the gate compares {gate_split} {gate_name}"
           + (f", relative tolerance {run.get('parameters', {}).get('gate_tolerance')}"
              if run.get("parameters", {}).get("gate_tolerance") is not None else "")
           + (f"; {gate_split} {run['parameters']['gate_guard_metric']} may veto a blessing "
              "(guard)" if run.get("parameters", {}).get("gate_guard_metric") else "")]
  if not champion:
    notes.append("no champion: no run of this model on this dataset_id was blessed before")
  elif verdict.get("threshold") is not None:
    notes.append(f"blessed above {verdict['threshold']:.6g}, rejected below "
                 f"{verdict.get('reject_threshold', float('nan')):.6g}")
  if problem:
    notes.append(problem)
  body = (head + report_html.table(header, rows, ids=ids, left=2)
          + "".join(_note(n) for n in notes))
  return body, {"decision": decision, "champion": champion}


def _deploy_section(run, steps, decision: str | None, run_dir: str) -> tuple[str, str]:
  deploy = steps.get("deploy", {})
  record = deploy.get("outputs", {}).get("deployment", {}).get("metadata", {})
  if deploy.get("status") == "done" and record.get("version"):
    registry_path = record.get("path", "")
    facts = [("version", record["version"]), ("registry path", registry_path),
             ("deployed at", record.get("deployed_at", "")), ("run", record.get("run_id", ""))]
    items = "".join(
        f"<li><b>{esc(k)}</b>: "
        + (report_html.link(v, v, run_dir) if k == "registry path" else f"<span>{esc(v)}</span>")
        + "</li>" for k, v in facts)
    return (f'<p id="deployed-version">deployed as version <b>{esc(record["version"])}</b> '
            f"of the local registry</p><ul>{items}</ul>"), str(record["version"])
  if decision and decision != "blessed":
    why = f"the gate decided {decision}: only a blessed model is deployed"
  elif decision == "blessed":
    why = f"the deploy step did not complete (run {local_lib.status_text(run)})"
  else:
    why = f"the run ended before the gate (run {local_lib.status_text(run)})"
  return f'<p id="deployed-version">not deployed: {esc(why)}</p>', "none"


def _state(run: Mapping[str, Any], steps, name: str) -> str:
  """A step's state: run.json's (``failed``, ``not run``, ...) when recorded, else the lineage's."""
  recorded = run.get("steps")
  if isinstance(recorded, Mapping) and recorded:  # it names every step that started
    entry = recorded.get(name)
    return str(entry.get("state") or "?") if isinstance(entry, Mapping) else "not run"
  return steps.get(name, {}).get("status", "not run")


def _lineage_section(run, steps, run_dir: str) -> str:
  boxes = []
  for label, step, output in CHAIN:
    entry = steps.get(step, {})
    art = entry.get("outputs", {}).get(output)
    if art is None:
      detail = esc(_state(run, steps, step))
    else:
      meta = art.get("metadata", {})
      extra = {"fingerprint": meta.get("digest", ""),
               "preprocess": entry.get("values", {}).get("Output", ""),
               "train": f"epoch {meta.get('selected_epoch', '?')}",
               "export": meta.get("format", ""),
               "deploy": f"version {meta.get('version', '?')}"}[step]
      detail = (f"<code>{esc(str(extra)[:23] + ('...' if len(str(extra)) > 23 else ''))}</code>"
                f"<br>{report_html.link(art['uri'], os.path.basename(_path(art['uri'])), run_dir)}")
    boxes.append(f'<div class="card" id="lineage-{esc(step)}"><div class="k">{esc(label)}</div>'
                 f"{detail}</div>")
  chain = '<span class="arrow">&rarr;</span>'.join(boxes)
  rows = []
  for entry in steps.values():
    links = ", ".join(report_html.link(art["uri"], key, run_dir)
                      for key, art in entry["outputs"].items())
    values = ", ".join(f"{k} = {v}" for k, v in entry.get("values", {}).items())
    status = _state(run, steps, entry["step"])
    if entry.get("condition"):  # the DAG's only condition: the gate's verdict
      status += " (if blessed)" if "blessed" in entry["condition"] else " (conditional)"
    rows.append(f'<tr><td class="l">{esc(entry["step"])}</td><td class="l">{esc(status)}</td>'
                f'<td class="l">{links or "-"}</td><td class="l">{esc(values)}</td></tr>')
  table = ('<table><tr><th class="l">step</th><th class="l">status</th>'
           '<th class="l">outputs</th><th class="l">values</th></tr>'
           + "".join(rows) + "</table>")
  return (f'<div class="chain">{chain}</div>{table}'
          + _note("links open the artifacts (folders and files) relative to this page"))


def _short(uri: str, run_dir: str) -> str:
  """A local path relative to the run folder when inside it; the URI otherwise."""
  path = _path(uri)
  if "://" in path:
    return path
  rel = os.path.relpath(os.path.abspath(path), run_dir)
  return path if rel.startswith(os.pardir) else rel


def render_run_report(run_dir: str) -> str:
  """The run report of a local run folder, as an HTML document."""
  from components import evaluate  # pylint: disable=g-import-not-at-top
  run_dir = os.path.abspath(run_dir)
  info = local_lib.lineage(run_dir)
  run, steps = info["run"], {s["step"]: s for s in info["steps"]}
  run_id = run.get("run_id") or os.path.basename(run_dir)

  data_html, data = _data_section(steps, run_dir)
  timings_html, total = _timings_section(run_dir, run)
  gate_html, gate = _gate_section(run, steps, run_id)
  deploy_html, version = _deploy_section(run, steps, gate.get("decision"), run_dir)

  metrics: dict[str, Any] = {}
  evaluation = steps.get("evaluate", {}).get("outputs", {}).get("metrics")
  metrics_html = _note(f"no metrics (evaluate: {_state(run, steps, 'evaluate')})")
  if evaluation:
    try:
      metrics = _read_json(_path(evaluation["uri"]))
      if not isinstance(metrics, Mapping):
        raise ValueError(f"{_path(evaluation['uri'])}: not a JSON object")
      metrics_html = report_html.metrics_table(metrics)
    except (OSError, ValueError) as e:
      metrics = {}
      metrics_html = _note(f"no metrics: {e}")
  model = steps.get("train", {}).get("outputs", {}).get("model")
  log = evaluate.read_log(_path(model["uri"])) if model else []
  curves_html = (report_html.training_charts(log) if log
                 else _note(f"no training log (train: {_state(run, steps, 'train')})"))

  test = metrics.get("test", {}) if isinstance(metrics.get("test"), Mapping) else {}
  decision = gate.get("decision") or "-"
  status = local_lib.status_text(run)
  numbers = [(f"test {m}", test[m]) for m in report_html.HEADLINE if m in test]
  headline = report_html.cards(
      [("status", status), *numbers, ("gate", decision), ("deployed version", version),
       ("wall time", f"{total:,.1f} s" if total is not None else "-")],
      css=["failed" if run.get("status") == "FAILED" else "", *[""] * len(numbers), decision])
  model_name = run.get("parameters", {}).get("model") or metrics.get("model", "model")
  data_name = data.get("label") or metrics.get("data_source") or run.get("parameters", {}).get(
      "dataset_name", "")
  facts = [("run", run_id), ("status", status), ("config", run.get("config", "")),
           ("target", run.get("target", "")), ("started", run.get("started", "")),
           ("finished", run.get("finished", "")), ("attempts", len(run.get("attempts", [])) or 1)]
  label = run.get("parameters", {}).get("dataset_name")
  if label and label != data_name:
    facts.append(("config's dataset label", label))
  if run.get("error"):
    facts.append(("error", run["error"]))
  facts_html = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in facts)
  config = run.get("config_values")
  config_html = (f"<details><summary>configuration</summary><pre>"
                 f"{esc(json.dumps(config, indent=2, sort_keys=True))}</pre></details>"
                 if config else "")
  body = (f"{headline}<ul>{facts_html}</ul>{config_html}"
          f'<h2 id="gate">Gate: this run against the champion</h2>{gate_html}'
          f'<h2 id="deployment">Deployment</h2>{deploy_html}'
          f'<h2 id="data">Data</h2>{data_html}'
          f'<h2 id="timings">Step timings</h2>{timings_html}'
          f'<h2 id="metrics">{"Metrics" if metrics.get("task") == "ranking" else "Metrics at K"}'
          f"</h2>{metrics_html}"
          f'<h2 id="curves">Training curves</h2>{curves_html}'
          f'<h2 id="lineage">Lineage</h2>{_lineage_section(run, steps, run_dir)}')
  return report_html.page(f"RecML run {run_id}: {model_name} on {data_name}", body,
                          f"run folder {run_dir}")


def write_run_report(run_dir: str) -> str:
  """Writes ``<run_dir>/report.html`` (:func:`render_run_report`); returns its path.

  Raises:
    FileNotFoundError: ``run_dir`` holds no ``run.json`` (not a local run folder).
  """
  manifest = os.path.join(run_dir, local_lib.RUN_FILE)
  if not os.path.isfile(manifest):
    raise FileNotFoundError(f"{manifest} not found: {run_dir} is not a local run folder")
  path = os.path.join(os.path.abspath(run_dir), local_lib.REPORT_FILE)
  page = render_run_report(run_dir)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(path + ".tmp", path)
  return path
