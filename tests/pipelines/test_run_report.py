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
