"""The ranking task through the one DAG: configs, the Vertex request, and a local run.

The end-to-end test (integration tier, ~4 min on 2 cores) runs the frappe_dcnv2 config
on the head of ../shared/datasets/frappe_x1 (3,000 / 1,000 / 1,000 rows) twice: the
first model is blessed and deployed; a deliberately worse one (one epoch at a learning
rate of 1e-9) is measured, recorded and not deployed. The evaluate step's
ClassificationMetrics artifact is checked against the metrics store: its ROC curve's
trapezoid area against the exact AUC, its confusion matrix against the test rows and
the accuracy.
"""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from pipelines import cli
from pipelines import config as config_lib
from pipelines import local as local_lib

FRAPPE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets",
                      "frappe_x1")
FRAPPE_COLUMNS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost",
                  "weather", "country", "city"]
CLOUD = ["--project", "my-project", "--region", "us-central1",
         "--pipeline-root", "gs://bucket/root", "--store-uri", "bq://my-project.recml.metrics",
         "--image-registry", "us-central1-docker.pkg.dev/my-project/recml"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  for var in ("RECML_PROJECT", "RECML_REGION", "RECML_PIPELINE_ROOT", "RECML_STORE_URI",
              "RECML_SERVICE_ACCOUNT", "RECML_IMAGE_REGISTRY", "RECML_KFP_HOST"):
    monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------
# Configs and the request they make
# ---------------------------------------------------------------------------


def test_ranking_configs_make_ranking_parameters():
  from components.preprocess import ctr_step  # pylint: disable=g-import-not-at-top
  frappe = config_lib.pipeline_parameters(config_lib.load_config("frappe_dcnv2"),
                                          data_uri="/d", store_uri="duckdb:///m")
  assert frappe["task"] == "ranking" and frappe["model"] == "dcnv2"
  assert frappe["ranking"] == {
      "label": "label", "dense": [], "categorical": FRAPPE_COLUMNS, "multi_hot": [],
      "multi_hot_separator": "|", "hash_buckets": [], "min_count": ["2"], "split": "files",
      "split_seed": 0}
  assert (frappe["gate_metric"], frappe["gate_k"], frappe["gate_guard_metric"],
          frappe["gate_split"], frappe["gate_tolerance"]) == ("auc", 0, "logloss", "valid", 0.001)
  assert not any(o.startswith("max_len=") for o in frappe["train_overrides"])

  criteo = config_lib.pipeline_parameters(config_lib.load_config("criteo_dlrm_v2"),
                                          data_uri="/d", store_uri="duckdb:///m")
  assert criteo["data_format"] == "criteo" and criteo["model"] == "dlrm-v2"
  assert criteo["ranking"]["split_ratios"] == [0.8, 0.1, 0.1]
  assert "batch_size=128" in criteo["train_overrides"]
  # Every ranking parameter is a keyword of the CTR step (nothing is dropped on the way).
  for params in (frappe["ranking"], criteo["ranking"]):
    inspect.signature(ctr_step.run).bind("in", "out", **params)

  sequence = config_lib.pipeline_parameters(config_lib.load_config("ml100k_smoke"),
                                            data_uri="/d", store_uri="duckdb:///m")
  assert (sequence["task"], sequence["ranking"], sequence["gate_guard_metric"]) == (
      "sequence", {}, "")
  assert "max_len=50" in sequence["train_overrides"]


def test_ranking_models_are_the_registrys_without_importing_jax():
  from trainers import models  # pylint: disable=g-import-not-at-top
  assert config_lib.RANKING_MODELS == tuple(
      m for m in models.MODELS if models.task_of(m) == "ranking")
  probe = ("import os, sys; from pipelines import config; config.load_config('frappe_dcnv2'); "
           "print('jax' in sys.modules, os.environ.get('TF_CPP_MIN_LOG_LEVEL'))")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                        text=True, check=True)
  assert done.stdout.split() == ["False", "None"]  # local steps' quiet environment intact


def test_settings_of_the_other_task_are_refused():
  with pytest.raises(ValueError, match=r"preprocess\.max_len apply to the sequence task"):
    config_lib.load_config("frappe_dcnv2", ["preprocess.max_len=50"])
  with pytest.raises(ValueError, match=r"preprocess\.label apply to the ranking task"):
    config_lib.load_config("ml100k_smoke", ["preprocess.label=click"])
  with pytest.raises(ValueError, match="'dcnv2' is a ranking model"):
    config_lib.load_config("frappe_dcnv2", ["preprocess.task=sequence"])
  with pytest.raises(ValueError, match="gate.k"):
    config_lib.load_config("frappe_dcnv2", ["gate.k=-1"])
  config = config_lib.load_config("frappe_dcnv2", ["gate.k=null"])
  assert config_lib.pipeline_parameters(config, data_uri="/d", store_uri="s")["gate_k"] == 0


def test_vertex_request_and_ir_carry_the_ranking_gate_and_preprocessing(capsys, tmp_path):
  out = tmp_path / "ir.yaml"
  assert cli.main(["run", "--config", "frappe_dcnv2", "--target", "vertex", "--data",
                   "gs://bucket/frappe_x1", "--dry-run", "--run-id", "frappe-1",
                   "--output", str(out), *CLOUD]) == 0
  request = json.loads(capsys.readouterr().out)
  values = request["parameter_values"]
  assert (values["gate_metric"], values["gate_k"], values["gate_guard_metric"]) == (
      "auc", 0, "logloss")
  assert values["task"] == "ranking" and values["data_uri"] == "gs://bucket/frappe_x1"
  assert values["ranking"]["categorical"] == FRAPPE_COLUMNS
  assert values["ranking"]["label"] == "label" and values["ranking"]["split"] == "files"

  ir = yaml.safe_load(out.read_text())
  defaults = {k: v.get("defaultValue") for k, v in
              ir["root"]["inputDefinitions"]["parameters"].items()}
  for key in ("gate_metric", "gate_k", "gate_guard_metric", "task", "ranking"):
    assert defaults[key] == values[key], key
  tasks = ir["root"]["dag"]["tasks"]
  prep = tasks["preprocess"]["inputs"]["parameters"]
  assert prep["task"] == {"componentInputParameter": "task"}
  assert prep["ranking"] == {"componentInputParameter": "ranking"}
  gate = tasks["validate"]["inputs"]["parameters"]
  assert gate["metric"] == {"componentInputParameter": "gate_metric"}
  assert gate["guard_metric"] == {"componentInputParameter": "gate_guard_metric"}
  evaluate = ir["components"][tasks["evaluate"]["componentRef"]["name"]]
  assert evaluate["outputDefinitions"]["artifacts"]["classification"]["artifactType"] == {
      "schemaTitle": "system.ClassificationMetrics", "schemaVersion": "0.0.1"}


# ---------------------------------------------------------------------------
# The whole DAG, locally
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frappe_head(tmp_path_factory):
  """The first 3,000 / 1,000 / 1,000 rows of frappe_x1's train / valid / test files."""
  if not os.path.isdir(FRAPPE):
    pytest.skip(f"{FRAPPE} is absent (the shared data sets are not on this machine)")
  root = tmp_path_factory.mktemp("frappe-head")
  for split, rows in (("train", 3000), ("valid", 1000), ("test", 1000)):
    with open(os.path.join(FRAPPE, f"{split}.csv"), encoding="utf-8") as f:
      lines = [next(f) for _ in range(rows + 1)]  # with the header
    (root / f"{split}.csv").write_text("".join(lines), encoding="utf-8")
  return str(root)


def _run(root, data, run_id, *extra):
  return cli.main(["run", "--config", "frappe_dcnv2", "--data", data,
                   "--pipeline-root", str(root), "--run-id", run_id,
                   "--set", "train.batch_size=256", *extra])


def _steps(run_dir):
  return {s["step"]: s for s in local_lib.lineage(str(run_dir))["steps"]}


@pytest.mark.integration
def test_ranking_dag_blesses_deploys_then_rejects_a_worse_model(frappe_head, tmp_path, capsys):
  from components import metrics_store  # pylint: disable=g-import-not-at-top
  root = tmp_path / "runs"

  # -- run 1: the first ranking model on this data is blessed and deployed ----------
  assert _run(root, frappe_head, "rank-good", "--set", "train.epochs=2") == 0
  out = capsys.readouterr().out
  steps = _steps(root / "rank-good")
  assert all(steps[n]["status"] == "done" for n in (
      "preprocess", "train", "evaluate", "write-metrics", "validate", "bless", "export",
      "deploy"))
  assert steps["validate"]["values"]["Output"] == "blessed"
  dataset_id = steps["preprocess"]["values"]["Output"]
  assert dataset_id.startswith("ds-")
  assert steps["preprocess"]["outputs"]["dataset"]["metadata"]["examples/test"] == 1000
  registry = json.load(open(root / "registry" / "current.json", encoding="utf-8"))
  assert (registry["run_id"], registry["version"]) == ("rank-good", "0001")

  # The store: the run's AUC / log loss rows on its dataset identity, as evaluated.
  store = metrics_store.open_store(f"duckdb:///{root}/metrics.duckdb")
  rows = {(r.split, r.metric, r.k): r for r in store.rows("rank-good")}
  evaluated = steps["evaluate"]["outputs"]["metrics"]["metadata"]
  for split in ("valid", "test"):
    for name in ("auc", "logloss", "accuracy", "ne", "calibration"):
      row = rows[(split, name, None)]
      assert row.dataset_id == dataset_id and row.model == "dcnv2"
      assert row.value == pytest.approx(evaluated[f"{split}/{name}"], abs=1e-12)
  assert rows[("valid", "blessed", None)].value == 1.0
  # Evaluation recomputed the selected checkpoint: it equals what training recorded.
  trained = json.load(open(os.path.join(steps["train"]["outputs"]["model"]["uri"],
                                        "metrics.json"), encoding="utf-8"))
  for split in ("valid", "test"):
    assert rows[(split, "auc", None)].value == pytest.approx(trained[split]["auc"], abs=1e-9)
    assert rows[(split, "logloss", None)].value == pytest.approx(trained[split]["logloss"],
                                                                 rel=1e-6)
  test_auc, valid_auc = rows[("test", "auc", None)].value, rows[("valid", "auc", None)].value
  assert 0.6 < test_auc <= 1.0  # learned something in 2 epochs (a constant scorer: 0.5)

  # The ClassificationMetrics artifact: a monotone ROC curve whose area is the AUC, and
  # a confusion matrix of the 1,000 test rows whose diagonal is the accuracy.
  meta = steps["evaluate"]["outputs"]["classification"]["metadata"]
  points = meta["confidenceMetrics"]
  fpr = np.array([p["falsePositiveRate"] for p in points])
  tpr = np.array([p["recall"] for p in points])
  thresholds = np.array([p["confidenceThreshold"] for p in points])
  assert 50 <= len(points) <= 200
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  assert np.all(np.diff(thresholds) < 0)
  assert abs(np.trapezoid(tpr, fpr) - test_auc) < 0.01
  matrix = [r["row"] for r in meta["confusionMatrix"]["rows"]]
  assert [s["displayName"] for s in meta["confusionMatrix"]["annotationSpecs"]] == [
      "no click", "click"]
  assert sum(map(sum, matrix)) == 1000
  assert (matrix[0][0] + matrix[1][1]) / 1000 == pytest.approx(
      rows[("test", "accuracy", None)].value)
  assert matrix[1][0] + matrix[1][1] == round(1000 * rows[("test", "label_rate", None)].value)

  # The report and the summary speak AUC / log loss.
  page = open(steps["evaluate"]["outputs"]["report"]["uri"], encoding="utf-8").read()
  assert "AUC per epoch" in page and "ROC curve" in page and "<script" not in page
  assert f"test  auc {test_auc:.4f}" in out
  assert "gate: blessed" in out and "deployed: version 0001" in out

  # -- run 2: the same data, a worse model: recorded, not deployed ------------------
  assert _run(root, frappe_head, "rank-bad", "--set", "train.epochs=1",
              "--set", "train.learning_rate=1e-9") == 0
  out = capsys.readouterr().out
  steps = _steps(root / "rank-bad")
  decision = steps["validate"]["values"]["Output"]
  assert decision in ("rejected", "tie")
  assert steps["validate"]["outputs"]["verdict"]["metadata"]["champion_run_id"] == "rank-good"
  assert steps["preprocess"]["values"]["Output"] == dataset_id  # the same data identity
  assert steps["deploy"]["status"] == "skipped" and f"gate: {decision}" in out
  rows = {(r.split, r.metric, r.k): r for r in store.rows("rank-bad")}
  assert rows[("valid", "auc", None)].value <= valid_auc * (1 + 0.001)  # worse, or a tie
  assert rows[("valid", "blessed", None)].value in (0.0, 0.5)
  registry = json.load(open(root / "registry" / "current.json", encoding="utf-8"))
  assert (registry["run_id"], registry["version"]) == ("rank-good", "0001")
