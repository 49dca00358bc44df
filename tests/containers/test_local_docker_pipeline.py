"""The smoke DAG with `--target local-docker`: every step runs in its image through
kfp.local.DockerRunner (container tier; the images come from infra/build_images.sh)."""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
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

  _serving_image_answers(built["serving"], current["path"])


def _serving_image_answers(image: str, bundle: str) -> None:
  """The deployed bundle in the serving image, on the Vertex AI custom-container contract
  (routes and port from AIP_* variables), answers as the bundle does in this process."""
  from serving import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from serving import protocol  # pylint: disable=g-import-not-at-top
  from trainers import export  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  name = f"recml-serving-test-{port}"
  subprocess.run(
      ["docker", "run", "-d", "--rm", "--network", "host", "--name", name,
       "-v", f"{bundle}:/bundle:ro", "-e", f"AIP_HTTP_PORT={port}",
       "-e", "AIP_HEALTH_ROUTE=/v1/endpoints/e/deployedModels/m",
       "-e", "AIP_PREDICT_ROUTE=/v1/endpoints/e/deployedModels/m:predict",
       image, "recml", "serve", "--bundle", "/bundle", "--max-batch", "4"],
      check=True, capture_output=True)
  base = f"http://127.0.0.1:{port}/v1/endpoints/e/deployedModels/m"
  try:
    deadline = time.time() + 300
    while True:
      try:
        with urllib.request.urlopen(base, timeout=5) as r:
          if r.status == 200:
            break
      except (urllib.error.URLError, ConnectionError):
        pass
      if time.time() > deadline:
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        raise AssertionError(f"serving container not ready:\n{logs.stdout}{logs.stderr}")
      time.sleep(1)
    body = {"instances": [{"items": [1, 2, 50, 181], "k": 5},
                          {"items": ["nope", 7], "exclude_history": False}]}
    request = urllib.request.Request(base + ":predict", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
      answer = json.loads(r.read())
    loaded = export.load_bundle(bundle)
    predictor = predictor_lib.Predictor(loaded, (1, 2))
    rows = protocol.parse_body(json.dumps(body).encode(), loaded, protocol.Limits())
    for row, got, (scores, ids) in zip(rows, answer["predictions"],
                                       predictor_lib.run_rows(predictor, rows)):
      assert got["items"] == loaded.raw_ids(ids[:row.k])
      np.testing.assert_allclose(got["scores"], scores[:row.k], rtol=1e-5, atol=1e-6)
    assert len(answer["predictions"][0]["items"]) == 5
    assert len(answer["predictions"][1]["items"]) == 10
  finally:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
