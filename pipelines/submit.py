"""Submitting a compiled pipeline to Vertex AI Pipelines or a KFP API server.

Each submission is built first as a plain dict by a pure ``*_request`` function (what
``--dry-run`` prints and the tests assert on), then sent by a small function that only
maps the dict onto the client library (``aiplatform.PipelineJob`` / ``kfp.Client``).
"""

import re
from typing import Any, Mapping

from pipelines.env import Env

_LABEL_RE = re.compile(r"[^a-z0-9_-]")


def vertex_labels(labels: Mapping[str, Any]) -> dict[str, str]:
  """Labels as Vertex accepts them: lowercase ``[a-z0-9_-]``, at most 63 characters."""
  out = {}
  for key, value in labels.items():
    k = _LABEL_RE.sub("-", str(key).lower())[:63]
    if not k or not k[0].isalpha():
      k = ("l" + k)[:63]
    out[k] = _LABEL_RE.sub("-", str(value).lower())[:63]
  return out


def run_labels(config: Mapping[str, Any], run_id: str, target: str) -> dict[str, str]:
  """The labels of a run: the config's, plus what identifies it."""
  base = {"recml-config": config["name"], "recml-model": config["train"]["model"],
          "recml-target": target, "recml-run": run_id}
  return vertex_labels({**base, **config.get("labels", {})})


def vertex_job_request(*, template_path: str, run_id: str, parameters: Mapping[str, Any],
                       env: Env, labels: Mapping[str, str],
                       enable_caching: bool | None = None) -> dict[str, Any]:
  """The ``aiplatform.PipelineJob`` arguments of one Vertex AI run.

  Args:
    template_path: the compiled IR YAML (local path, gs:// or an Artifact Registry URL).
    run_id: becomes the job id (and display name).
    parameters: runtime parameter values.
    env: project, region, gs:// pipeline root, service account, network.
    labels: job labels (already valid Vertex labels).
    enable_caching: None keeps the per-step settings compiled into the IR (the
      metrics and gate steps are never cached; a True here would cache them too).
  """
  env.require("project", "region", "pipeline_root", target="vertex")
  if not env.pipeline_root.startswith("gs://"):
    raise ValueError(f"Vertex AI needs a gs:// pipeline root, got {env.pipeline_root!r}")
  return {
      "kind": "vertex.PipelineJob",
      "project": env.project,
      "location": env.region,
      "display_name": run_id,
      "job_id": run_id,
      "template_path": template_path,
      "pipeline_root": env.pipeline_root,
      "parameter_values": dict(parameters),
      "labels": dict(labels),
      "enable_caching": enable_caching,
      "service_account": env.service_account or None,
      "network": env.network or None,
  }


def submit_vertex(request: Mapping[str, Any]) -> str:
  """Submits a :func:`vertex_job_request`; returns the job's resource name."""
  from google.cloud import aiplatform  # pylint: disable=g-import-not-at-top
  aiplatform.init(project=request["project"], location=request["location"])
  job = aiplatform.PipelineJob(
      display_name=request["display_name"],
      template_path=request["template_path"],
      job_id=request["job_id"],
      pipeline_root=request["pipeline_root"],
      parameter_values=request["parameter_values"],
      labels=request["labels"],
      enable_caching=request["enable_caching"],
      project=request["project"],
      location=request["location"],
  )
  job.submit(service_account=request["service_account"], network=request["network"])
  return job.resource_name


def kfp_run_request(*, package_path: str, run_id: str, parameters: Mapping[str, Any],
                    env: Env, enable_caching: bool | None = None) -> dict[str, Any]:
  """The ``kfp.Client.create_run_from_pipeline_package`` arguments of one KFP run.

  Args:
    package_path: the compiled IR YAML.
    run_id: the run name.
    parameters: runtime parameter values.
    env: KFP host, experiment, pipeline root, service account.
    enable_caching: None keeps the per-step settings compiled into the IR.
  """
  env.require("kfp_host", target="kfp")
  return {
      "kind": "kfp.Run",
      "host": env.kfp_host,
      "pipeline_file": package_path,
      "arguments": dict(parameters),
      "run_name": run_id,
      "experiment_name": env.experiment,
      "pipeline_root": env.pipeline_root or None,
      "enable_caching": enable_caching,
      "service_account": env.service_account or None,
  }


def submit_kfp(request: Mapping[str, Any]) -> str:
  """Submits a :func:`kfp_run_request`; returns the KFP run id."""
  import kfp  # pylint: disable=g-import-not-at-top
  client = kfp.Client(host=request["host"])
  result = client.create_run_from_pipeline_package(
      pipeline_file=request["pipeline_file"],
      arguments=request["arguments"],
      run_name=request["run_name"],
      experiment_name=request["experiment_name"],
      pipeline_root=request["pipeline_root"],
      enable_caching=request["enable_caching"],
      service_account=request["service_account"],
  )
  return result.run_id
