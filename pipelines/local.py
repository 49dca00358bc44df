"""Local runs through ``kfp.local`` and their lineage, read back from the local pipeline root.

Layout of a local pipeline root (``runs/`` by default)::

    runs/
      metrics.duckdb                      the default metrics store
      <run id>/
        run.json                          what ran: config, parameters, target, status, times
        pipeline.yaml                     the compiled IR (used to rebuild the lineage)
        recml-pipeline-<timestamp>/       kfp.local's run folder
          <task>/executor_output.json     the step's output artifacts (URI, metadata) and values
          <task>/<output>                 the artifacts themselves

``lineage(run_dir)`` joins the IR's task graph with each task's executor output: for each
step, its input artifacts (with the producer's URI and metadata), its output artifacts
and its output values.
"""

import datetime
import glob
import json
import os
import sys
from typing import Any, Mapping

import yaml

RUN_FILE = "run.json"
IR_FILE = "pipeline.yaml"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id(name: str) -> str:
  """``<config name>-<UTC timestamp>``: lowercase, digits and dashes (valid on Vertex too)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
  base = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "recml"
  return f"{base}-{stamp}"


def write_manifest(run_dir: str, manifest: Mapping[str, Any]) -> None:
  path = os.path.join(run_dir, RUN_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, default=str)
  os.replace(path + ".tmp", path)


def read_manifest(run_dir: str) -> dict[str, Any]:
  with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as f:
    return json.load(f)


def _runner(target: str, mounts: list[str]):
  from kfp import local  # pylint: disable=g-import-not-at-top
  if target == "local":
    return local.SubprocessRunner(use_venv=False)
  if target == "local-docker":
    from docker import types  # pylint: disable=g-import-not-at-top
    binds = [types.Mount(target=p, source=p, type="bind") for p in sorted(set(mounts))]
    # Steps run as the invoking user (as `docker run --user $(id -u):$(id -g)` would), so
    # what they write into the bind-mounted folders is the user's; HOME is a scratch dir.
    return local.DockerRunner(network_mode="host", mounts=binds,
                              user=f"{os.getuid()}:{os.getgid()}",
                              environment={"HOME": "/tmp"})
  raise ValueError(f"{target!r} is not a local target")


def run_local(pipeline_func, parameters: Mapping[str, Any], *, run_id: str, root: str,
              target: str = "local", manifest: Mapping[str, Any] | None = None,
              mounts: list[str] | None = None) -> dict[str, Any]:
  """Runs the pipeline through ``kfp.local`` under ``root/run_id``.

  Args:
    pipeline_func: from :func:`pipelines.dag.build_pipeline`.
    parameters: the pipeline's parameter values.
    run_id: the run's id (its folder name).
    root: the local pipeline root.
    target: ``local`` (SubprocessRunner in this venv) or ``local-docker`` (the images).
    manifest: extra facts recorded in ``run.json`` (config, data, ...).
    mounts: ``local-docker`` only: host folders the steps read or write (data, store).

  Returns:
    The final ``run.json`` content (status, pipeline folder, times).
  """
  from kfp import compiler, local  # pylint: disable=g-import-not-at-top
  run_dir = os.path.abspath(os.path.join(root, run_id))
  os.makedirs(run_dir, exist_ok=False)
  compiler.Compiler().compile(pipeline_func, os.path.join(run_dir, IR_FILE))
  record = {"run_id": run_id, "target": target, "status": "RUNNING", "started": _now(),
            "parameters": dict(parameters), **dict(manifest or {})}
  write_manifest(run_dir, record)
  # SubprocessRunner steps import the project: make sure they find it.
  paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  if REPO_ROOT not in paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *paths])
  # The whole local root is mounted: the run, the default DuckDB store and the registry.
  local.init(runner=_runner(target, [os.path.dirname(run_dir), *(mounts or [])]),
             pipeline_root=run_dir,
             raise_on_error=True)
  try:
    pipeline_func(**parameters)
    record["status"] = "SUCCEEDED"
  except BaseException as e:  # recorded, then re-raised
    record["status"] = "FAILED"
    record["error"] = f"{type(e).__name__}: {e}"
    raise
  finally:
    record["finished"] = _now()
    folder = pipeline_folder(run_dir)
    record["pipeline_dir"] = folder
    write_manifest(run_dir, record)
    sys.stdout.flush()
  return record


def pipeline_folder(run_dir: str) -> str | None:
  """kfp.local's run folder inside a run directory (None before it exists)."""
  found = sorted(p for p in glob.glob(os.path.join(run_dir, "*")) if os.path.isdir(p))
  return found[-1] if found else None


# ---------------------------------------------------------------------------
# Lineage
# ---------------------------------------------------------------------------


def _tasks(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Every task of the IR (nested condition DAGs flattened), by task name."""
  out: dict[str, dict[str, Any]] = {}

  def walk(dag: Mapping[str, Any], condition: str | None) -> None:
    for name, task in dag.get("tasks", {}).items():
      component = spec["components"].get(task["componentRef"]["name"], {})
      if "dag" in component:
        walk(component["dag"], task.get("triggerPolicy", {}).get("condition", condition))
      else:
        out[name] = {**task, "condition": condition}

  walk(spec["root"]["dag"], None)
  return out


def _executor_output(folder: str, task: str) -> dict[str, Any] | None:
  path = os.path.join(folder, task, "executor_output.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _artifacts(output: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
  arts = {}
  for key, value in (output or {}).get("artifacts", {}).items():
    items = value.get("artifacts", [])
    if items:
      arts[key] = {"uri": items[0].get("uri", ""), "metadata": items[0].get("metadata", {})}
  return arts


def lineage(run_dir: str) -> dict[str, Any]:
  """Each step of a local run: status, inputs (with producers), outputs, values."""
  record = read_manifest(run_dir)
  with open(os.path.join(run_dir, IR_FILE), encoding="utf-8") as f:
    spec = yaml.safe_load(f)
  folder = record.get("pipeline_dir") or pipeline_folder(run_dir)
  tasks = _tasks(spec)
  outputs = {name: _executor_output(folder, name) if folder else None for name in tasks}
  steps = []
  for name, task in tasks.items():
    out = outputs[name]
    inputs = {}
    for key, ref in task.get("inputs", {}).get("artifacts", {}).items():
      src = ref.get("taskOutputArtifact")
      if src:
        art = _artifacts(outputs.get(src["producerTask"])).get(src["outputArtifactKey"], {})
        inputs[key] = {"from": f"{src['producerTask']}.{src['outputArtifactKey']}",
                       "uri": art.get("uri", "")}
    status = "done" if out is not None else ("skipped" if task["condition"] else "not run")
    steps.append({"step": name, "status": status, "condition": task["condition"],
                  "inputs": inputs, "outputs": _artifacts(out),
                  "values": (out or {}).get("parameterValues", {})})
  order = {n: i for i, n in enumerate(("preprocess", "train", "evaluate", "write-metrics",
                                       "validate", "bless"))}
  steps.sort(key=lambda s: order.get(s["step"], len(order)))
  return {"run": record, "steps": steps}


def report_path(run_dir: str) -> str | None:
  """The evaluate step's HTML report of a local run."""
  info = lineage(run_dir)
  for step in info["steps"]:
    if step["step"] == "evaluate" and "report" in step["outputs"]:
      return _local_path(step["outputs"]["report"]["uri"])
  return None


def _local_path(uri: str) -> str:
  return uri[len("file://"):] if uri.startswith("file://") else uri


def headline(info: Mapping[str, Any]) -> dict[str, Any]:
  """Headline facts of a lineage: test/valid metrics, gate decision, report path."""
  out: dict[str, Any] = {}
  for step in info["steps"]:
    if step["step"] == "evaluate" and "metrics" in step["outputs"]:
      meta = step["outputs"]["metrics"]["metadata"]
      out.update({k: v for k, v in meta.items()
                  if k.split("/")[-1] in ("hr@10", "ndcg@10", "mrr")
                  and k.split("/")[0] in ("valid", "test")})
      if "report" in step["outputs"]:
        out["report"] = _local_path(step["outputs"]["report"]["uri"])
    if step["step"] == "validate":
      out["decision"] = step["values"].get("Output", "")
      out["gate"] = step["outputs"].get("verdict", {}).get("metadata", {}).get("reason", "")
  return out


def list_runs(root: str) -> list[dict[str, Any]]:
  """The local runs under ``root``, newest first."""
  runs = []
  for path in glob.glob(os.path.join(root, "*", RUN_FILE)):
    try:
      record = read_manifest(os.path.dirname(path))
    except (OSError, json.JSONDecodeError):
      continue
    runs.append(record)
  runs.sort(key=lambda r: r.get("started", ""), reverse=True)
  return runs
