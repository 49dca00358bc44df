"""``recml run | compile | schedule | runs``: parsing and dry runs (no cloud calls)."""

import json

import pytest
import yaml

from pipelines import cli

CLOUD = ["--project", "my-project", "--region", "us-central1",
         "--pipeline-root", "gs://bucket/root", "--store-uri", "bq://my-project.recml.metrics",
         "--service-account", "runner@my-project.iam.gserviceaccount.com",
         "--image-registry", "us-central1-docker.pkg.dev/my-project/recml"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  for var in ("RECML_PROJECT", "RECML_REGION", "RECML_PIPELINE_ROOT", "RECML_STORE_URI",
              "RECML_SERVICE_ACCOUNT", "RECML_IMAGE_REGISTRY", "RECML_KFP_HOST"):
    monkeypatch.delenv(var, raising=False)


def run_json(capsys, argv):
  assert cli.main(argv) == 0
  return json.loads(capsys.readouterr().out)


def test_parser_knows_the_commands():
  parser = cli.build_parser()
  args = parser.parse_args(["run", "--config", "ml100k_smoke", "--data", "/d",
                            "--set", "train.epochs=1", "--set", "gate.k=50"])
  assert (args.target, args.overrides, args.data) == ("local", ["train.epochs=1", "gate.k=50"], "/d")
  args = parser.parse_args(["schedule", "create", "--cron", "0 3 * * 1", "--target", "kfp",
                            "--time-zone", "Europe/Paris"])
  assert (args.schedule_command, args.cron, args.time_zone) == ("create", "0 3 * * 1", "Europe/Paris")
  args = parser.parse_args(["schedule", "pause", "projects/p/locations/l/schedules/1"])
  assert args.action == "pause"
  args = parser.parse_args(["runs", "show", "abc"])
  assert args.run == "abc"
  with pytest.raises(SystemExit):
    parser.parse_args(["run", "--target", "cloud"])


def test_run_vertex_dry_run_prints_the_request(capsys, tmp_path):
  out = tmp_path / "ir.yaml"
  req = run_json(capsys, ["run", "--config", "ml1m_hstu", "--target", "vertex",
                          "--data", "gs://bucket/ml-1m", "--dry-run", "--run-id", "hstu-1",
                          "--output", str(out), "--set", "train.epochs=3", *CLOUD])
  assert req["job_id"] == "hstu-1" and req["template_path"] == str(out)
  assert req["pipeline_root"] == "gs://bucket/root"
  assert req["parameter_values"]["model"] == "hstu"
  assert "epochs=3" in req["parameter_values"]["train_overrides"]
  assert req["train_worker_pool_specs"][0]["machine_spec"] == {
      "machine_type": "ct5lp-hightpu-4t", "tpu_topology": "2x2"}
  assert req["labels"]["recml-run"] == "hstu-1"
  assert yaml.safe_load(out.read_text())["pipelineInfo"]["name"] == "recml-pipeline"


def test_run_vertex_with_dataflow(capsys, tmp_path):
  req = run_json(capsys, ["run", "--config", "ml1m_sasrec", "--target", "vertex",
                          "--data", "bq://my-project.events.ratings", "--dry-run",
                          "--set", "preprocess.runner=dataflow",
                          "--output", str(tmp_path / "ir.yaml"), *CLOUD])
  assert "--runner=DataflowRunner" in req["parameter_values"]["beam_args"]


def test_remote_targets_need_cloud_data_and_settings(capsys, tmp_path):
  assert cli.main(["run", "--config", "ml1m_sasrec", "--target", "vertex", "--dry-run",
                   "--data", "/local/path", *CLOUD]) == 2
  assert "gs://" in capsys.readouterr().err
  assert cli.main(["run", "--config", "ml1m_sasrec", "--target", "vertex", "--dry-run",
                   "--data", "gs://b/x", "--output", str(tmp_path / "x.yaml")]) == 2
  assert "store" in capsys.readouterr().err


def test_schedule_dry_runs(capsys, tmp_path):
  req = run_json(capsys, ["schedule", "create", "--config", "ml1m_sasrec", "--target", "vertex",
                          "--cron", "0 3 * * 1", "--time-zone", "Europe/Paris",
                          "--max-concurrent-runs", "2", "--data", "gs://bucket/ml-1m",
                          "--dry-run", "--output", str(tmp_path / "s.yaml"), *CLOUD])
  assert req["cron"] == "TZ=Europe/Paris 0 3 * * 1"
  assert req["max_concurrent_run_count"] == 2
  assert req["pipeline_job"]["parameter_values"]["run_id"] == ""
  req = run_json(capsys, ["schedule", "create", "--config", "ml1m_sasrec", "--target", "kfp",
                          "--cron", "0 3 * * 1", "--data", "gs://bucket/ml-1m", "--dry-run",
                          "--kfp-host", "http://127.0.0.1:8080",
                          "--output", str(tmp_path / "k.yaml"), *CLOUD])
  assert req["cron_expression"] == "0 0 3 * * 1" and req["max_concurrency"] == 1
  req = run_json(capsys, ["schedule", "delete", "sched-1", "--target", "kfp", "--dry-run",
                          "--kfp-host", "http://h"])
  assert req == {"kind": "kfp.delete_schedule", "schedule": "sched-1", "host": "http://h"}
  assert cli.main(["schedule", "create", "--cron", "0 3 * *", "--data", "gs://b/x",
                   "--dry-run", "--output", str(tmp_path / "bad.yaml"), *CLOUD]) == 2


def test_compile_command(capsys, tmp_path):
  out = tmp_path / "p.yaml"
  assert cli.main(["compile", "--config", "ml100k_smoke", "--target", "kfp",
                   "--output", str(out)]) == 0
  ir = yaml.safe_load(out.read_text())
  assert ir["root"]["inputDefinitions"]["parameters"]["max_len"]["defaultValue"] == 50


def test_local_dry_run_and_missing_data(capsys, tmp_path):
  req = run_json(capsys, ["run", "--config", "ml100k_smoke", "--data", str(tmp_path),
                          "--pipeline-root", str(tmp_path / "runs"), "--dry-run",
                          "--run-id", "smoke-1"])
  assert req["parameters"]["store_uri"] == f"duckdb:///{tmp_path}/runs/metrics.duckdb"
  assert req["pipeline_root"] == str(tmp_path / "runs" / "smoke-1")
  assert cli.main(["run", "--config", "ml100k_smoke", "--data", str(tmp_path / "nope"),
                   "--dry-run"]) == 2
  assert "no such" in capsys.readouterr().err


def test_runs_list_empty(capsys, tmp_path):
  assert cli.main(["runs", "list", "--pipeline-root", str(tmp_path)]) == 0
  assert "no runs" in capsys.readouterr().out
