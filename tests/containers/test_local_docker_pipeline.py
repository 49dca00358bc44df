"""The smoke DAG with `--target local-docker`: every step runs in its image through
kfp.local.DockerRunner (container tier; the images come from infra/build_images.sh)."""

import json
import os

import pytest

from pipelines import cli
from pipelines import local as local_lib

ML100K = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "ml-100k")
pytestmark = pytest.mark.container


@pytest.mark.skipif(not os.path.isdir(ML100K), reason="needs ../shared/datasets/ml-100k")
def test_smoke_pipeline_in_the_images(built, tmp_path, capsys, monkeypatch):
  from components import metrics_store  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("RECML_STORE_URI", raising=False)
  monkeypatch.delenv("RECML_PIPELINE_ROOT", raising=False)
  root = tmp_path / "runs"
  assert cli.main(["run", "--config", "ml100k_smoke", "--data", os.path.abspath(ML100K),
                   "--pipeline-root", str(root), "--run-id", "docker-smoke",
                   "--target", "local-docker"]) == 0
  out = capsys.readouterr().out
  assert "run id: docker-smoke" in out and "report:" in out

  info = local_lib.lineage(str(root / "docker-smoke"))
  steps = {s["step"]: s for s in info["steps"]}
  assert info["run"]["status"] == "SUCCEEDED"
  assert all(steps[n]["status"] == "done" for n in
             ("preprocess", "train", "evaluate", "write-metrics", "validate", "bless",
              "export", "deploy"))
  dataset = steps["preprocess"]["outputs"]["dataset"]
  assert dataset["metadata"]["num_users"] == 943
  assert dataset["metadata"]["item_vocab_size"] == 1682 + 2
  model = steps["train"]["outputs"]["model"]
  for name in ("checkpoints", "config.json", "dataset_info.json", "metrics.json", "log.jsonl"):
    assert os.path.exists(os.path.join(model["uri"], name)), name
  metrics = steps["evaluate"]["outputs"]["metrics"]["metadata"]
  assert metrics["valid/ndcg@10"] > 0.01
  assert steps["validate"]["values"]["Output"] == "blessed"

  store = metrics_store.open_store(f"duckdb:///{root}/metrics.duckdb")
  rows = {(r.split, r.metric, r.k): r for r in store.rows("docker-smoke")}
  assert rows[("valid", "ndcg", 10)].value == pytest.approx(metrics["valid/ndcg@10"])
  assert rows[("valid", "blessed", None)].value == 1.0
  current = json.load(open(root / "registry" / "current.json"))
  assert current["run_id"] == "docker-smoke"
