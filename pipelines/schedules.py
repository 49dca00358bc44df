"""Recurring retraining: Vertex AI ``PipelineJobSchedule`` and KFP recurring runs.

Users write one standard 5-field cron expression (``"0 3 * * 1"``: Mondays 03:00) and a
time zone. The two back ends differ:

* Vertex AI takes the 5 fields with a ``TZ=<IANA zone>`` prefix
  (``"TZ=Europe/Paris 0 3 * * 1"``), plus ``max_concurrent_run_count``.
* KFP takes 6 fields, seconds first (``"0 0 3 * * 1"``), and ``max_concurrency``. A KFP
  recurring run has no time-zone field: the scheduled-workflow controller evaluates
  cron in its own zone (``CRON_SCHEDULE_TIMEZONE`` on the ``ml-pipeline-scheduledworkflow``
  deployment, UTC by default); the request records the zone the user meant and the CLI
  prints that note.

Requests are built by pure functions (``--dry-run`` prints them, tests assert on them);
the ``*_create/list/pause/resume/delete`` functions only call the client libraries.
"""

import re
from typing import Any, Mapping

from pipelines.env import Env

_FIELD = re.compile(r"^[\d*/,\-A-Za-z?LW#]+$")
KFP_TIME_ZONE_NOTE = (
    "KFP evaluates cron in the scheduled-workflow controller's time zone "
    "(CRON_SCHEDULE_TIMEZONE on deployment ml-pipeline-scheduledworkflow; UTC by default)")


def check_cron(expr: str) -> str:
  """Validates a standard 5-field cron expression; returns it normalized (single spaces)."""
  fields = expr.split()
  if len(fields) != 5:
    raise ValueError(f"expected a 5-field cron expression (minute hour day month weekday), "
                     f"got {len(fields)} fields: {expr!r}")
  for field in fields:
    if not _FIELD.match(field):
      raise ValueError(f"bad cron field {field!r} in {expr!r}")
  return " ".join(fields)


def to_kfp_cron(expr: str) -> str:
  """5-field cron -> KFP's 6 fields, seconds first: ``"0 3 * * 1"`` -> ``"0 0 3 * * 1"``."""
  return "0 " + check_cron(expr)


def check_time_zone(time_zone: str) -> str:
  """Validates an IANA zone name (``Europe/Paris``, ``UTC``)."""
  import zoneinfo  # pylint: disable=g-import-not-at-top
  try:
    zoneinfo.ZoneInfo(time_zone)
  except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
    raise ValueError(f"unknown time zone {time_zone!r} (use an IANA name such as "
                     "'Europe/Paris' or 'UTC')") from e
  return time_zone


def to_vertex_cron(expr: str, time_zone: str = "UTC") -> str:
  """``"0 3 * * 1"``, ``"Europe/Paris"`` -> ``"TZ=Europe/Paris 0 3 * * 1"``."""
  return f"TZ={check_time_zone(time_zone)} {check_cron(expr)}"


# ---------------------------------------------------------------------------
# Vertex AI
# ---------------------------------------------------------------------------


def vertex_schedule_request(*, display_name: str, job: Mapping[str, Any], cron: str,
                            time_zone: str = "UTC",
                            max_concurrent_runs: int = 1) -> dict[str, Any]:
  """The arguments of ``PipelineJob(...).create_schedule(...)``.

  Args:
    display_name: the schedule's name.
    job: a :func:`pipelines.submit.vertex_job_request` (each scheduled run's job).
    cron: 5-field cron.
    time_zone: IANA zone the cron is meant in.
    max_concurrent_runs: runs of this schedule allowed at once.
  """
  if max_concurrent_runs < 1:
    raise ValueError("max_concurrent_runs must be >= 1")
  job = dict(job)
  job.pop("job_id", None)  # each scheduled run gets its own id
  return {
      "kind": "vertex.PipelineJobSchedule",
      "display_name": display_name,
      "cron": to_vertex_cron(cron, time_zone),
      "max_concurrent_run_count": int(max_concurrent_runs),
      "service_account": job.get("service_account"),
      "network": job.get("network"),
      "pipeline_job": job,
  }


def _vertex_init(env: Env):
  from google.cloud import aiplatform  # pylint: disable=g-import-not-at-top
  env.require("project", "region", target="vertex")
  aiplatform.init(project=env.project, location=env.region)
  return aiplatform


def vertex_create(request: Mapping[str, Any]) -> str:
  """Creates a :func:`vertex_schedule_request`; returns the schedule's resource name."""
  from google.cloud import aiplatform  # pylint: disable=g-import-not-at-top
  job = request["pipeline_job"]
  aiplatform.init(project=job["project"], location=job["location"])
  pipeline_job = aiplatform.PipelineJob(
      display_name=job["display_name"], template_path=job["template_path"],
      pipeline_root=job["pipeline_root"], parameter_values=job["parameter_values"],
      labels=job["labels"], enable_caching=job["enable_caching"],
      project=job["project"], location=job["location"])
  schedule = pipeline_job.create_schedule(
      cron=request["cron"], display_name=request["display_name"],
      max_concurrent_run_count=request["max_concurrent_run_count"],
      service_account=request["service_account"], network=request["network"])
  return schedule.resource_name


def vertex_list(env: Env) -> list[dict[str, Any]]:
  aiplatform = _vertex_init(env)
  return [{"name": s.resource_name, "display_name": s.display_name, "cron": s.cron,
           "state": getattr(s.state, "name", str(s.state))}
          for s in aiplatform.PipelineJobSchedule.list(order_by="create_time desc")]


def vertex_action(env: Env, schedule_id: str, action: str) -> None:
  """``pause`` / ``resume`` / ``delete`` a schedule (id or full resource name)."""
  aiplatform = _vertex_init(env)
  schedule = aiplatform.PipelineJobSchedule.get(schedule_id=schedule_id)
  getattr(schedule, action)()


# ---------------------------------------------------------------------------
# KFP
# ---------------------------------------------------------------------------


def kfp_recurring_run_request(*, display_name: str, run: Mapping[str, Any], cron: str,
                              time_zone: str = "UTC",
                              max_concurrent_runs: int = 1) -> dict[str, Any]:
  """The arguments of ``kfp.Client.create_recurring_run``.

  Args:
    display_name: the recurring run's name.
    run: a :func:`pipelines.submit.kfp_run_request` (package, arguments, host, ...).
    cron: 5-field cron, converted to KFP's 6 fields.
    time_zone: the zone the cron is meant in (see the module docstring).
    max_concurrent_runs: KFP's ``max_concurrency``.
  """
  if max_concurrent_runs < 1:
    raise ValueError("max_concurrent_runs must be >= 1")
  return {
      "kind": "kfp.RecurringRun",
      "host": run["host"],
      "experiment_name": run["experiment_name"],
      "job_name": display_name,
      "description": f"cron {check_cron(cron)} ({check_time_zone(time_zone)})",
      "cron_expression": to_kfp_cron(cron),
      "time_zone": time_zone,
      "time_zone_note": KFP_TIME_ZONE_NOTE,
      "max_concurrency": int(max_concurrent_runs),
      "no_catchup": True,
      "enabled": True,
      "pipeline_package_path": run["pipeline_file"],
      "params": dict(run["arguments"]),
      "pipeline_root": run["pipeline_root"],
      "enable_caching": run["enable_caching"],
      "service_account": run["service_account"],
  }


def _kfp_client(host: str):
  import kfp  # pylint: disable=g-import-not-at-top
  return kfp.Client(host=host)


def kfp_create(request: Mapping[str, Any]) -> str:
  """Creates a :func:`kfp_recurring_run_request`; returns the recurring run id."""
  client = _kfp_client(request["host"])
  experiment = client.create_experiment(name=request["experiment_name"])
  recurring = client.create_recurring_run(
      experiment_id=experiment.experiment_id, job_name=request["job_name"],
      description=request["description"], cron_expression=request["cron_expression"],
      max_concurrency=request["max_concurrency"], no_catchup=request["no_catchup"],
      params=request["params"], pipeline_package_path=request["pipeline_package_path"],
      enabled=request["enabled"], pipeline_root=request["pipeline_root"],
      enable_caching=request["enable_caching"], service_account=request["service_account"])
  return recurring.recurring_run_id


def kfp_list(env: Env) -> list[dict[str, Any]]:
  env.require("kfp_host", target="kfp")
  response = _kfp_client(env.kfp_host).list_recurring_runs(page_size=100)
  out = []
  for r in response.recurring_runs or []:
    cron = getattr(getattr(getattr(r, "trigger", None), "cron_schedule", None), "cron", "")
    out.append({"name": r.recurring_run_id, "display_name": r.display_name, "cron": cron,
                "state": str(r.status)})
  return out


def kfp_action(env: Env, recurring_run_id: str, action: str) -> None:
  """``pause`` / ``resume`` / ``delete`` a KFP recurring run."""
  env.require("kfp_host", target="kfp")
  client = _kfp_client(env.kfp_host)
  method = {"pause": client.disable_recurring_run, "resume": client.enable_recurring_run,
            "delete": client.delete_recurring_run}[action]
  method(recurring_run_id)
