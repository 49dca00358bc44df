"""Submission and schedule requests: what would be sent to Vertex AI and KFP."""

import pytest

from pipelines import config as config_lib
from pipelines import schedules, submit
from pipelines.env import Env

ENV = Env(project="my-project", region="europe-west4", pipeline_root="gs://bucket/root",
          service_account="runner@my-project.iam.gserviceaccount.com",
          image_registry="europe-west4-docker.pkg.dev/my-project/recml",
          kfp_host="http://127.0.0.1:8080", experiment="recml-weekly")
PARAMS = {"data_uri": "gs://bucket/ml-1m", "max_len": 200}


@pytest.mark.parametrize("five, six", [
    ("0 3 * * 1", "0 0 3 * * 1"),
    ("*/15 * * * *", "0 */15 * * * *"),
    ("30  2 1,15 * MON-FRI", "0 30 2 1,15 * MON-FRI"),
])
def test_kfp_cron_is_six_fields_seconds_first(five, six):
  assert schedules.to_kfp_cron(five) == six


@pytest.mark.parametrize("bad", ["0 3 * *", "0 0 3 * * 1", "", "0 3 * * 1;rm"])
def test_cron_must_have_five_fields(bad):
  with pytest.raises(ValueError):
    schedules.to_kfp_cron(bad)


def test_vertex_cron_carries_the_time_zone():
  assert schedules.to_vertex_cron("0 3 * * 1", "Europe/Paris") == "TZ=Europe/Paris 0 3 * * 1"
  assert schedules.to_vertex_cron("0 3 * * 1") == "TZ=UTC 0 3 * * 1"
  with pytest.raises(ValueError, match="time zone"):
    schedules.to_vertex_cron("0 3 * * 1", "Mars/Olympus")


def test_vertex_job_request():
  req = submit.vertex_job_request(template_path="/tmp/p.yaml", run_id="ml1m-sasrec-1",
                                  parameters=PARAMS, env=ENV, labels={"a": "b"})
  assert req == {
      "kind": "vertex.PipelineJob", "project": "my-project", "location": "europe-west4",
      "display_name": "ml1m-sasrec-1", "job_id": "ml1m-sasrec-1",
      "template_path": "/tmp/p.yaml", "pipeline_root": "gs://bucket/root",
      "parameter_values": PARAMS, "labels": {"a": "b"}, "enable_caching": None,
      "service_account": "runner@my-project.iam.gserviceaccount.com", "network": None}


def test_vertex_needs_project_and_gcs_root():
  with pytest.raises(ValueError, match="RECML_PROJECT"):
    submit.vertex_job_request(template_path="p", run_id="r", parameters={}, env=Env(),
                              labels={})
  local_root = Env(project="p", region="r", pipeline_root="/tmp/runs")
  with pytest.raises(ValueError, match="gs://"):
    submit.vertex_job_request(template_path="p", run_id="r", parameters={}, env=local_root,
                              labels={})


def test_vertex_labels_are_sanitized():
  labels = submit.vertex_labels({"Team": "Rec ML", "9lives": "x" * 80})
  assert labels["team"] == "rec-ml"
  assert labels["l9lives"] == "x" * 63
  config = config_lib.load_config("ml100k_smoke")
  labels = submit.run_labels(config, "ml100k-smoke-20250101-000000-000", "vertex")
  assert labels["recml-model"] == "sasrec" and labels["purpose"] == "smoke"


def test_vertex_schedule_request():
  job = submit.vertex_job_request(template_path="/tmp/p.yaml", run_id="recml-weekly",
                                  parameters=PARAMS, env=ENV, labels={})
  req = schedules.vertex_schedule_request(display_name="recml-weekly", job=job,
                                          cron="0 3 * * 1", time_zone="Europe/Paris",
                                          max_concurrent_runs=2)
  assert req["cron"] == "TZ=Europe/Paris 0 3 * * 1"
  assert req["max_concurrent_run_count"] == 2
  assert req["service_account"] == ENV.service_account
  assert "job_id" not in req["pipeline_job"]  # every scheduled run gets its own
  assert req["pipeline_job"]["parameter_values"] == PARAMS
  with pytest.raises(ValueError):
    schedules.vertex_schedule_request(display_name="x", job=job, cron="0 3 * * 1",
                                      max_concurrent_runs=0)


def test_kfp_run_and_recurring_run_requests():
  run = submit.kfp_run_request(package_path="/tmp/p.yaml", run_id="recml-weekly",
                               parameters=PARAMS, env=ENV)
  assert run["host"] == "http://127.0.0.1:8080"
  assert run["experiment_name"] == "recml-weekly"
  assert run["pipeline_root"] == "gs://bucket/root"
  req = schedules.kfp_recurring_run_request(display_name="recml-weekly", run=run,
                                            cron="0 3 * * 1", time_zone="Europe/Paris",
                                            max_concurrent_runs=3)
  assert req["cron_expression"] == "0 0 3 * * 1"
  assert req["max_concurrency"] == 3
  assert req["time_zone"] == "Europe/Paris"
  assert "CRON_SCHEDULE_TIMEZONE" in req["time_zone_note"]
  assert req["params"] == PARAMS and req["pipeline_package_path"] == "/tmp/p.yaml"
  with pytest.raises(ValueError, match="kfp_host"):
    submit.kfp_run_request(package_path="p", run_id="r", parameters={}, env=Env())


def test_dataflow_args_come_from_the_env():
  args = config_lib.dataflow_args(ENV, "img:1", "run-1")
  assert "--runner=DataflowRunner" in args
  assert "--project=my-project" in args and "--region=europe-west4" in args
  assert "--temp_location=gs://bucket/root/dataflow/tmp" in args
  assert "--sdk_container_image=img:1" in args
  assert f"--service_account_email={ENV.service_account}" in args
  with pytest.raises(ValueError, match="project"):
    config_lib.dataflow_args(Env(), "img", "r")
