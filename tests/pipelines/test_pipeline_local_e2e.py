"""The whole DAG through kfp.local on MovieLens-100K (integration tier, ~3 min on 2 cores).

Two runs of the smoke config: the first model is blessed (no champion yet), exported and
deployed to the local registry, where `recml serve` answers it; a second, deliberately
crippled run (learning rate 1e-9, one epoch) is measured, recorded and rejected by the
gate, so its bless, export and deploy steps never run.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pipelines import cli
from pipelines import local as local_lib

ML100K = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "ml-100k")
pytestmark = pytest.mark.integration


def _serve_registry_and_query(registry, items):
  """Starts `recml serve` on the registry's current model; returns one prediction."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--registry", registry,
                           "--port", str(port), "--max-batch", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 180
    while time.time() < deadline:
      assert proc.poll() is None, "recml serve exited"
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        time.sleep(0.5)
    body = json.dumps({"instances": [{"items": items, "k": 5}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
      return json.loads(r.read())["predictions"][0]
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def _run(root, run_id, *extra):
  return cli.main(["run", "--config", "ml100k_smoke", "--data", ML100K,
                   "--pipeline-root", str(root), "--run-id", run_id, *extra])


@pytest.mark.skipif(not os.path.isdir(ML100K), reason="needs ../shared/datasets/ml-100k")
def test_two_runs_champion_blessed_crippled_rejected(tmp_path, capsys, monkeypatch):
  from components import metrics_store  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("RECML_STORE_URI", raising=False)
  monkeypatch.delenv("RECML_PIPELINE_ROOT", raising=False)
  root = tmp_path / "runs"

  # -- run 1: the first model is blessed ---------------------------------------------
  assert _run(root, "smoke-good") == 0
  out = capsys.readouterr().out
  assert "run id: smoke-good" in out and "report:" in out
  info = local_lib.lineage(str(root / "smoke-good"))
  steps = {s["step"]: s for s in info["steps"]}
  assert info["run"]["status"] == "SUCCEEDED"
  assert all(steps[n]["status"] == "done" for n in
             ("preprocess", "train", "evaluate", "write-metrics", "validate", "bless"))

  dataset = steps["preprocess"]["outputs"]["dataset"]
  assert dataset["metadata"]["num_users"] == 943
  assert dataset["metadata"]["item_vocab_size"] == 1682 + 2
  assert os.path.exists(os.path.join(dataset["uri"], "dataset_info.json"))
  model = steps["train"]["outputs"]["model"]
  for name in ("checkpoints", "config.json", "dataset_info.json", "metrics.json", "log.jsonl"):
    assert os.path.exists(os.path.join(model["uri"], name)), name
  assert model["metadata"]["model"] == "sasrec" and model["metadata"]["dataset"] == "ml-100k"
  assert steps["train"]["inputs"]["dataset"]["uri"] == dataset["uri"]
  metrics = steps["evaluate"]["outputs"]["metrics"]["metadata"]
  assert metrics["valid/ndcg@10"] > 0.01  # a random ranker gets ~0.003
  report = steps["evaluate"]["outputs"]["report"]["uri"]
  page = open(report, encoding="utf-8").read()
  assert page.count("<svg") == 4 and "<script" not in page
  assert os.path.exists(root / "smoke-good" / "report.html")
  assert steps["validate"]["values"]["Output"] == "blessed"
  blessing = json.load(open(os.path.join(steps["bless"]["outputs"]["blessing"]["uri"],
                                         "blessing.json")))
  assert blessing["model_uri"] == model["uri"] and blessing["run_id"] == "smoke-good"

  # export + deploy: the bundle is the local registry's current model, and it answers
  assert steps["export"]["status"] == "done" and steps["deploy"]["status"] == "done"
  bundle = steps["export"]["outputs"]["bundle"]
  assert bundle["metadata"]["model"] == "sasrec" and bundle["metadata"]["max_len"] == 50
  registry = str(root / "registry")
  current = json.load(open(os.path.join(registry, "current.json")))
  assert current["run_id"] == "smoke-good" and current["version"] == "0001"
  assert current["source"] == os.path.abspath(bundle["uri"].replace("file://", ""))
  prediction = _serve_registry_and_query(registry, [1, 2, 3, 50])  # raw MovieLens ids
  assert len(prediction["items"]) == 5 and len(prediction["scores"]) == 5
  assert not {1, 2, 3, 50} & set(prediction["items"])  # history excluded

  store = metrics_store.open_store(f"duckdb:///{root}/metrics.duckdb")
  rows = {(r.split, r.metric, r.k): r for r in store.rows("smoke-good")}
  assert rows[("valid", "ndcg", 10)].value == pytest.approx(metrics["valid/ndcg@10"])
  assert rows[("test", "hr", 10)].model_uri == model["uri"]
  assert rows[("valid", "blessed", None)].value == 1.0

  # -- run 2: deliberately crippled, recorded, rejected -------------------------------
  assert _run(root, "smoke-bad", "--set", "train.learning_rate=1e-9",
              "--set", "train.epochs=1") == 0
  out = capsys.readouterr().out
  assert "gate: rejected" in out
  steps = {s["step"]: s for s in local_lib.lineage(str(root / "smoke-bad"))["steps"]}
  assert steps["validate"]["values"]["Output"] == "rejected"
  assert steps["bless"]["status"] == "skipped"
  assert steps["export"]["status"] == "skipped" and steps["deploy"]["status"] == "skipped"
  current = json.load(open(os.path.join(registry, "current.json")))
  assert current["run_id"] == "smoke-good"  # the rejected model is not deployed
  bad = {(r.split, r.metric, r.k): r.value for r in store.rows("smoke-bad")}
  assert bad[("valid", "ndcg", 10)] < rows[("valid", "ndcg", 10)].value
  assert bad[("valid", "blessed", None)] == 0.0
  champion = store.champion(dataset["metadata"]["dataset_id"], "sasrec", "ndcg", 10,
                            split="valid")
  assert champion.run_id == "smoke-good"

  # -- the CLI's views of both --------------------------------------------------------
  assert cli.main(["runs", "list", "--pipeline-root", str(root)]) == 0
  listing = capsys.readouterr().out
  assert "smoke-good" in listing and "smoke-bad" in listing
  assert cli.main(["runs", "show", "smoke-bad", "--pipeline-root", str(root)]) == 0
  shown = capsys.readouterr().out
  assert "bless: skipped" in shown and "train.model" in shown and "ndcg@10" in shown
