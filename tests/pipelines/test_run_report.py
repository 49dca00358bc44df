"""The reports: the evaluate step's HTML, the shared building blocks, and the run report.

The run report is rendered from a real run folder: one run of the smoke config through
kfp.local (integration tier, ~1 min on 2 cores), gated against a champion recorded
beforehand by the real write_metrics and validate steps, so that every section has
something to show. Its numbers are checked against the files they come from, and a
headless Chromium shows what a person sees.
"""

import datetime
import html.parser
import json
import os
import re
import shutil
import subprocess

import pytest

from components import bless, evaluate, report_html
from pipelines import local as local_lib
from pipelines import report

ML100K = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "ml-100k")
RESULT = {"model": "sasrec", "dataset": "ml-1m", "data_source": "ml-1m-partial",
          "selected_epoch": 2,
          "valid": {"hr@10": 0.1, "ndcg@10": 0.05, "mrr": 0.04},
          "test": {"hr@10": 0.09, "ndcg@10": 0.045, "mrr": 0.035},
          "best_test": {"hr@10": 0.095, "ndcg@10": 0.047, "mrr": 0.036}}
LOG = [{"epoch": e, "step": 10 * e, "train_loss": 5.0 - e, "sequences_per_second": 100.0,
        "valid": {"hr@10": 0.05 * e, "ndcg@10": 0.02 * e}, "test": {"hr@10": 0.04 * e}}
       for e in (1, 2)]
# The champion recorded before the run: worse than any trained model (a random ranker
# gets valid NDCG@10 ~0.003 on ml-100k), so the run is blessed and deployed.
CHAMPION = "champion-0"
CHAMPION_METRICS = {"valid": {"hr@10": 0.004, "ndcg@10": 0.002, "mrr": 0.003},
                    "test": {"hr@10": 0.005, "ndcg@10": 0.0025, "mrr": 0.0031}}


class _Page(html.parser.HTMLParser):
  """The text of an HTML page; the text and table cells of every element with an id."""

  VOID = ("br", "meta", "img", "input", "hr", "link")

  def __init__(self, page: str):
    super().__init__()
    self.text: list[str] = []
    self.by_id: dict[str, dict[str, list[str]]] = {}
    self._open: list[tuple[str, str | None]] = []
    self.feed(page)

  def handle_starttag(self, tag, attrs):
    ident = dict(attrs).get("id")
    if ident:
      self.by_id[ident] = {"text": [], "cells": []}
    if tag == "td":
      for _, i in self._open:
        if i:
          self.by_id[i]["cells"].append("")
    if tag not in self.VOID:
      self._open.append((tag, ident))

  def handle_endtag(self, tag):
    while self._open and self._open.pop()[0] != tag:
      pass

  def handle_data(self, data):
    self.text.append(data)
    for depth, (_, i) in enumerate(self._open):
      if i:
        self.by_id[i]["text"].append(data)
        if any(t == "td" for t, _ in self._open[depth + 1:]):
          self.by_id[i]["cells"][-1] += data

  def cells(self, ident: str) -> list[str]:
    return [c.strip() for c in self.by_id[ident]["cells"]]

  def plain(self, ident: str) -> str:
    return re.sub(r"\s+", " ", "".join(self.by_id[ident]["text"])).strip()


# ---------------------------------------------------------------------------
# The evaluate step's report and the shared building blocks (unit tier)
# ---------------------------------------------------------------------------


def test_evaluate_report_is_self_contained_and_names_the_real_data():
  page = evaluate.render_report(RESULT, LOG, title="run-1")
  assert page.startswith("<!DOCTYPE html>")
  assert "<script" not in page and not re.search(r"(src|href)=\"https?://", page)
  assert page.count("<svg") == 4 and "<polyline" in page
  assert "0.0450" in page and "best epoch" in page and "run-1" in page
  text = "".join(_Page(page).text)
  assert "data: ml-1m-partial" in text and "config label: ml-1m" in text


def test_evaluate_report_without_log_still_renders():
  page = evaluate.render_report({"test": {"ndcg@10": 0.1}}, [])
  assert "no data" in page and "0.1000" in page


def test_flat_metrics_accepts_both_shapes():
  assert evaluate._flat_metrics({"hr@10": 1}, "test") == {"hr@10": 1.0}  # pylint: disable=protected-access
  assert evaluate._flat_metrics({"test": {"hr@10": 1}}, "test") == {"hr@10": 1.0}  # pylint: disable=protected-access


def test_bless_record(tmp_path):
  record = bless.run(str(tmp_path), "/models/1", "run-1", {"blessed": True})
  saved = json.loads((tmp_path / bless.BLESSING_FILE).read_text())
  assert saved["model_uri"] == "/models/1" and saved["gate"] == {"blessed": True}
  assert record["run_id"] == "run-1"


def test_bar_chart_bars_are_proportional():
  values = [("a", 2.5), ("b", 10.0), ("c", 0.0), ("d", 7.25)]
  svg = report_html.svg_bar_chart(values, "t", width=720)
  widths = [float(w) for w in re.findall(r'<rect x="130" y="\d+" width="([\d.]+)"', svg)]
  plot = 720 - 130 - 70  # the chart's label and value margins
  assert widths == pytest.approx([v / 10.0 * plot for _, v in values], abs=0.05)
  assert [f"{v:,.1f} s" for _, v in values] == re.findall(r">([\d.,]+ s)</text>", svg)


@pytest.mark.parametrize("source, label", [
    ({"input": "/data/ml-1m-partial/", "files": ["/data/ml-1m-partial/ratings.dat"]},
     "ml-1m-partial"),
    ({"input": "/data/ml-100k/u.data", "files": ["/data/ml-100k/u.data"]}, "ml-100k/u.data"),
    ({"input": "gs://bucket/events/ml-1m"}, "ml-1m"),
    ({"input": "bq://proj.ds.events"}, "proj.ds.events"),
    ({}, ""),
])
def test_data_label_names_the_input(source, label):
  assert report_html.data_label(source) == label


def _task(folder, name, mtime, record=None):
  os.makedirs(os.path.join(folder, name))
  path = os.path.join(folder, name, "recml_step.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record or {"state": "done"}, f)
  os.utime(path, (mtime, mtime))


def test_step_timings_from_task_folder_times(tmp_path):
  """Without run.json's steps, each step runs from the previous step's end to its own."""
  folder = tmp_path / "recml-pipeline-2026-01-01-00-00-00-250000"  # kfp.local: local time
  start = datetime.datetime(2026, 1, 1, 0, 0, 0, 250000).timestamp()
  ends = {"fingerprint": 2.5, "preprocess": 14.0, "train": 40.25, "evaluate": 49.0}
  for name, end in ends.items():
    _task(str(folder), name, start + end,
          {"state": "done", "reused_from": "x"} if name == "preprocess" else None)
  record = {"attempts": [{"started": "2025-12-31T23:59:59+00:00"}], "pipeline_dir": str(folder)}
  timings, source = report.step_timings(str(tmp_path), record)
  assert [t["step"] for t in timings] == list(ends)
  assert [t["seconds"] for t in timings] == pytest.approx([2.5, 11.5, 26.25, 8.75])
  assert [t["state"] for t in timings] == ["done", "reused", "done", "done"]
  assert "file times" in source
  # a folder not named by kfp.local: the attempt's start in run.json
  renamed = tmp_path / "attempt"
  os.rename(folder, renamed)
  started = datetime.datetime.fromisoformat("2025-12-31T23:59:59+00:00").timestamp()
  timings, _ = report.step_timings(str(tmp_path), {**record, "pipeline_dir": str(renamed)})
  assert timings[0]["seconds"] == pytest.approx(start + 2.5 - started)


def test_step_timings_prefer_run_json_steps(tmp_path):
  """run.json's steps as pipelines/run_output.py records them."""
  record = {"steps": {
      "preprocess": {"state": "done", "started": "2026-01-01T00:00:00+00:00", "seconds": 12.5,
                     "log": "logs/preprocess.log", "summary": {"users": 943},
                     "text": "943 users"},
      "train": {"state": "failed", "seconds": 3.25, "error": "ValueError: x"},
      "bless": {"state": "not run", "summary": {}, "text": ""}}}
  timings, source = report.step_timings(str(tmp_path), record)
  assert timings == [
      {"step": "preprocess", "state": "done", "seconds": 12.5, "summary": "943 users",
       "log": "logs/preprocess.log"},
      {"step": "train", "state": "failed", "seconds": 3.25, "summary": "ValueError: x",
       "log": ""},
      {"step": "bless", "state": "not run", "seconds": None, "summary": "", "log": ""}]
  assert source == "run.json (steps)"


def test_write_run_report_needs_a_run_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="run.json not found"):
    report.write_run_report(str(tmp_path))


# ---------------------------------------------------------------------------
# The run report of a real run (integration tier)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  return smoke_run_in(tmp_path_factory.mktemp("report") / "runs")


def smoke_run_in(root):
  """One smoke run through kfp.local, gated against a champion recorded before it."""
  # pylint: disable=g-import-not-at-top
  from components import fingerprint, validate, write_metrics
  from pipelines import cli, config as config_lib
  # pylint: enable=g-import-not-at-top
  if not os.path.isdir(ML100K):
    pytest.fail(f"{ML100K} not found: the run report tests need ../shared/datasets/ml-100k")
  store_uri = f"duckdb:///{root}/metrics.duckdb"
  pre = config_lib.load_config("ml100k_smoke", [])["preprocess"]
  dataset_id = fingerprint.dataset_identity(
      fingerprint.compute(os.path.abspath(ML100K))["digest"], max_len=pre["max_len"],
      min_item_count=pre["min_item_count"], timestamp_unit=pre["timestamp_unit"] or "auto",
      data_format=pre["format"] or "")
  write_metrics.run(store_uri, CHAMPION, None, "sasrec", "ml-100k", CHAMPION_METRICS,
                    model_uri="/models/champion-0", dataset_id=dataset_id)
  assert validate.run(store_uri, CHAMPION, "ml-100k", "sasrec",
                      dataset_id=dataset_id)["decision"] == "blessed"
  with pytest.MonkeyPatch.context() as mp:
    for var in ("RECML_STORE_URI", "RECML_PIPELINE_ROOT", "RECML_REGISTRY"):
      mp.delenv(var, raising=False)
    assert cli.main(["run", "--config", "ml100k_smoke", "--data", ML100K,
                     "--pipeline-root", str(root), "--run-id", "smoke-report"]) == 0
  return smoke_run_facts(str(root / "smoke-report"), dataset_id)


def smoke_run_facts(run_dir, dataset_id):
  root = os.path.dirname(run_dir)
  path = report.write_run_report(run_dir)
  info = local_lib.lineage(run_dir)
  return {"dir": run_dir, "path": path, "page": open(path, encoding="utf-8").read(),
          "steps": {s["step"]: s for s in info["steps"]}, "run": info["run"],
          "store": f"{root}/metrics.duckdb", "dataset_id": dataset_id}


def _uri(step, output):
  return step["outputs"][output]["uri"].replace("file://", "")


@pytest.mark.integration
def test_run_report_numbers_equal_their_sources(smoke_run):
  import duckdb  # pylint: disable=g-import-not-at-top
  page, steps, run_dir = smoke_run["page"], smoke_run["steps"], smoke_run["dir"]
  doc = _Page(page)
  assert smoke_run["path"] == os.path.join(run_dir, "report.html")
  assert local_lib.report_path(run_dir) == smoke_run["path"]
  assert "<script" not in page and not re.search(r"(src|href)=\"https?://", page)

  # data statistics: dataset_info.json, as the preprocess step wrote it
  info = json.load(open(os.path.join(_uri(steps["preprocess"], "dataset"),
                                     "dataset_info.json")))
  counts = info["counts"]
  for key in ("rows_read", "rows_kept", "rows_quarantined"):
    assert doc.cells(f"data-{key}")[1] == f"{counts[key]:,}", key
  assert doc.cells("data-users")[1] == f"{info['num_users']:,}" == "943"
  assert doc.cells("data-items")[1] == f"{info['item_vocab_size'] - 2:,}" == "1,682"
  for split, n in info["num_examples"].items():
    assert doc.cells(f"data-examples:{split}")[1] == f"{n:,}"
  assert doc.plain("data-data") == "ml-100k"
  assert doc.plain("data-dataset_id") == info["source"]["dataset_id"] == smoke_run["dataset_id"]
  assert doc.plain("data-input_fingerprint") == info["source"]["fingerprint"]

  # the gate: the verdict, this run's and the champion's rows of the store side by side
  verdict = steps["validate"]["outputs"]["verdict"]["metadata"]
  assert verdict["decision"] == "blessed" and verdict["champion_run_id"] == CHAMPION
  assert doc.plain("gate-verdict") == f"BLESSED: {verdict['reason']}"
  with duckdb.connect(smoke_run["store"], read_only=True) as con:
    stored = con.execute("SELECT run_id, split, metric, k, value FROM metrics "
                         "WHERE metric != 'blessed'").fetchall()
  header = [h for h in re.findall(r"<th[^>]*>([^<]*)</th>",
                                  page.split('id="gate-verdict"')[1])][:9]
  names = [h.replace(" (gate)", "") for h in header[2:]]
  assert "ndcg@10 (gate)" in header
  for run_id, who in ((smoke_run["run"]["run_id"], "run"), (CHAMPION, "champion")):
    for split in ("valid", "test"):
      shown = dict(zip(names, doc.cells(f"gate-{who}-{split}")[2:]))
      expected = {(m if k is None else f"{m}@{k}"): v for r, s, m, k, v in stored
                  if r == run_id and s == split}
      assert shown == {n: f"{expected[n]:.4f}" if n in expected else "-" for n in names}, who
  for split in ("valid", "test"):  # differences where both runs have the metric
    both = zip(doc.cells(f"gate-run-{split}")[2:], doc.cells(f"gate-champion-{split}")[2:],
               doc.cells(f"gate-difference-{split}")[2:])
    for mine, theirs, diff in both:
      if theirs == "-":
        assert diff == "-"
      else:
        assert float(diff) == pytest.approx(float(mine) - float(theirs), abs=2e-4)
  assert len([c for c in doc.cells("gate-champion-valid") if c != "-"]) == 2 + 3

  # the deployment: the deploy step's record, the registry's current model
  deployment = steps["deploy"]["outputs"]["deployment"]["metadata"]
  current = json.load(open(os.path.join(os.path.dirname(run_dir), "registry", "current.json")))
  assert current["version"] == deployment["version"] == "0001"
  assert doc.plain("deployed-version") == "deployed as version 0001 of the local registry"

  # metrics at K: the evaluate step's output
  metrics = json.load(open(_uri(steps["evaluate"], "metrics")))
  names = [h for h in re.findall(r"<th[^>]*>([^<]*)</th>",
                                 page.split('id="metrics"')[1])][1:8]
  for split in ("valid", "test", "best_test"):
    assert doc.cells(f"metrics-{split}")[1:] == [f"{metrics[split][m]:.4f}" for m in names]

  # step timings: run.json's steps, every step in the order it ran, with its wall time
  ran = ["fingerprint", "preprocess", "train", "evaluate", "write-metrics", "validate",
         "bless", "export", "deploy"]
  recorded = smoke_run["run"]["steps"]
  assert list(recorded) == ran
  for step in ran:
    cells = doc.cells(f"step-{step}")
    assert cells[:3] == [step, "done", f"{recorded[step]['seconds']:,.1f}"], step
    assert cells[3] == recorded[step]["text"]
  total = sum(recorded[s]["seconds"] for s in ran)
  assert f"Step wall time (total {total:,.1f} s)" in page
  # the same, derived from the task folders' file times (runs recorded without steps)
  derived, _ = report.step_timings(run_dir, {k: v for k, v in smoke_run["run"].items()
                                             if k != "steps"})
  assert [t["step"] for t in derived] == ran
  for t in derived:  # the steps' own clocks vs. the file times
    assert t["seconds"] == pytest.approx(recorded[t["step"]]["seconds"], abs=0.5), t

  # training curves: one point per epoch of log.jsonl
  log = evaluate.read_log(_uri(steps["train"], "model"))
  curves = page.split('id="curves"')[1]
  assert curves.count("<svg") == 4 and len(log) == 2
  loss = re.search(r"<polyline[^>]*points=\"([^\"]+)\"", curves).group(1)
  assert len(loss.split()) == len(log)

  # lineage: fingerprint -> dataset -> model -> bundle -> deployment, links that resolve
  for step in ("fingerprint", "preprocess", "train", "export", "deploy"):
    assert f'id="lineage-{step}"' in page
  lineage = page.split('id="lineage"')[1]
  hrefs = re.findall(r'href="([^"]+)"', lineage)
  assert len(hrefs) >= 12
  for href in hrefs:
    assert os.path.exists(os.path.join(run_dir, href)), href


def _chromium():
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if not found:
    pytest.fail("chromium not found: infra/test.sh installs it (apt-get install chromium)")
  return [found, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
          "--no-first-run", "--disable-background-networking", "--disable-component-update",
          "--disable-sync"]


@pytest.mark.integration
def test_run_report_in_headless_chromium(smoke_run, tmp_path):
  """The report as a person sees it: drawn, and showing the verdict, data and timings."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  url = "file://" + smoke_run["path"]
  shot = tmp_path / "report.png"
  subprocess.run([*_chromium(), f"--user-data-dir={tmp_path / 'profile'}",
                  "--window-size=1200,3000", f"--screenshot={shot}", url],
                 check=True, capture_output=True, timeout=180)
  img = Image.open(shot)
  assert img.format == "PNG" and img.size == (1200, 3000)
  rgb = img.convert("RGB")
  colours = rgb.getcolors(maxcolors=1 << 20)
  assert colours is not None and len(colours) > 20  # text, bars and curves, not one colour
  non_white = sum(n for n, c in colours if c != (255, 255, 255))
  assert non_white > 0.02 * 1200 * 3000
  # the step timing bars (#1a73e8) are drawn
  assert sum(n for n, c in colours if c == (0x1a, 0x73, 0xe8)) > 2000

  dom = subprocess.run([*_chromium(), f"--user-data-dir={tmp_path / 'profile2'}",
                        "--dump-dom", url], check=True, capture_output=True, text=True,
                       timeout=180).stdout
  shown = _Page(dom)  # the page as Chromium parsed it
  verdict = smoke_run["steps"]["validate"]["outputs"]["verdict"]["metadata"]
  assert shown.plain("gate-verdict") == f"BLESSED: {verdict['reason']}"
  assert shown.cells("gate-champion-valid")[:2] == ["valid", f"champion ({CHAMPION})"]
  assert shown.cells("data-rows_read")[:2] == ["rows read", "100,000"]
  assert shown.cells("data-users")[:2] == ["users with examples", "943"]
  assert shown.cells("data-rows_quarantined")[:2] == ["rows quarantined", "0"]
  assert "Step wall time (total" in shown.plain("timings-chart")
  recorded = smoke_run["run"]["steps"]
  for step in ("preprocess", "train", "evaluate", "deploy"):
    assert shown.cells(f"step-{step}")[:3] == [step, "done",
                                               f"{recorded[step]['seconds']:,.1f}"], step
  assert shown.plain("deployed-version") == "deployed as version 0001 of the local registry"


@pytest.mark.integration
def test_run_report_of_a_run_that_failed_before_the_gate(smoke_run, tmp_path):
  """A run that died in training: the data and timings it has, and why the rest is missing."""
  source = smoke_run["run"]["pipeline_dir"]
  run_dir = tmp_path / "runs" / "died-in-train"
  folder = run_dir / os.path.basename(source)
  for task in ("fingerprint", "preprocess"):  # the steps that completed
    shutil.copytree(os.path.join(source, task), folder / task)
  shutil.copy(os.path.join(smoke_run["dir"], "pipeline.yaml"), run_dir)
  record = json.load(open(os.path.join(smoke_run["dir"], "run.json")))
  steps = {k: record["steps"][k] for k in ("fingerprint", "preprocess")}
  steps["train"] = {"state": "failed", "seconds": 3.5, "error": "RuntimeError: out of memory"}
  record.update(run_id="died-in-train", status="FAILED", pipeline_dir=str(folder),
                error="RuntimeError: out of memory", steps=steps)
  (run_dir / "run.json").write_text(json.dumps(record))

  doc = _Page(open(report.write_run_report(str(run_dir)), encoding="utf-8").read())
  text = re.sub(r"\s+", " ", "".join(doc.text))
  info = json.load(open(os.path.join(_uri(smoke_run["steps"]["preprocess"], "dataset"),
                                     "dataset_info.json")))
  assert doc.cells("data-rows_read")[1] == f"{info['counts']['rows_read']:,}"
  assert doc.cells("step-train")[:3] == ["train", "failed", "3.5"]
  assert "no gate verdict (validate: not run; run FAILED)" in text
  assert doc.plain("deployed-version") == "not deployed: the run ended before the gate (run FAILED)"
  assert "no metrics (evaluate: not run)" in text
  assert "no training log (train: failed)" in text
  assert doc.cells("step-train")[3] == "RuntimeError: out of memory"
  assert "not run" in doc.plain("lineage-export") and "not run" in doc.plain("lineage-deploy")
  assert "error: RuntimeError: out of memory" in text
