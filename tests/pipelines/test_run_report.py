"""The evaluate step's HTML report and the bless record (no training needed)."""

import json
import re

from components import bless, evaluate

RESULT = {"model": "sasrec", "dataset": "ml-100k", "selected_epoch": 2,
          "valid": {"hr@10": 0.1, "ndcg@10": 0.05, "mrr": 0.04},
          "test": {"hr@10": 0.09, "ndcg@10": 0.045, "mrr": 0.035},
          "best_test": {"hr@10": 0.095, "ndcg@10": 0.047, "mrr": 0.036}}
LOG = [{"epoch": e, "step": 10 * e, "train_loss": 5.0 - e, "sequences_per_second": 100.0,
        "valid": {"hr@10": 0.05 * e, "ndcg@10": 0.02 * e}, "test": {"hr@10": 0.04 * e}}
       for e in (1, 2)]


def test_report_is_self_contained():
  page = evaluate.render_report(RESULT, LOG, title="run-1")
  assert page.startswith("<!DOCTYPE html>")
  assert "<script" not in page and not re.search(r"(src|href)=\"https?://", page)
  assert page.count("<svg") == 4 and "<polyline" in page
  assert "0.0450" in page and "best epoch" in page and "run-1" in page


def test_report_without_log_still_renders():
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


def test_report_renders_in_headless_chromium(tmp_path):
  """The report as a person sees it: curves and table drawn (not a blank page)."""
  import shutil
  import subprocess

  import pytest
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if not chromium:
    pytest.skip("chromium not installed (infra/test.sh installs it)")
  log = [{"epoch": e, "step": 10 * e, "train_loss": 5.0 / e, "sequences_per_second": 100.0 + e,
          "valid": {"hr@10": 0.05 * e, "ndcg@10": 0.02 * e},
          "test": {"hr@10": 0.04 * e, "ndcg@10": 0.015 * e}} for e in range(1, 9)]
  page = tmp_path / "report.html"
  page.write_text(evaluate.render_report(RESULT, log, title="run-1"))
  shot = tmp_path / "shot.png"
  subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                  f"--screenshot={shot}", page.as_uri()],
                 check=True, capture_output=True, timeout=120)
  from PIL import Image
  img = Image.open(shot).convert("RGB")
  assert img.size == (1200, 1600)
  colours = img.getcolors(maxcolors=1 << 20)
  assert colours is not None and len(colours) > 20  # text, axes and curves, not one colour
  non_white = sum(n for n, c in colours if c != (255, 255, 255))
  assert non_white > 0.01 * img.size[0] * img.size[1]
