"""Local runs through ``kfp.local`` and their lineage, read back from the local pipeline root.

Layout of a local pipeline root (``runs/`` by default)::

    runs/
      metrics.duckdb                      the default metrics store
      <run id>/
        run.json                          what ran: config, parameters, target, status, times
        pipeline.yaml                     the compiled IR (used to rebuild the lineage)
        report.html                       the run report (pipelines/report.py)
        logs/run.log, logs/<task>.log     what kfp.local and each step printed (run_output.py)
        recml-pipeline-<timestamp>/       kfp.local's run folder
          <task>/executor_output.json     the step's output artifacts (URI, metadata) and values
          <task>/recml_step.json          its fingerprint and state (pipelines/resume.py)
          <task>/<output>                 the artifacts themselves
        recml-pipeline-<timestamp>/       the next attempt, after `recml run --resume`

``run.json`` records the process running the run (``pid``, ``host``, ``pid_started``):
a RUNNING run whose process has died (or whose pid now belongs to another process, told
apart by its start time) reads back as FAILED (:func:`run_status`).

``recml run --resume RUN_ID`` runs a new attempt in the same run directory (same run id,
so the metrics store and the registry see one run): steps completed by an earlier
attempt with the same fingerprint are reused, a killed train step continues from its
checkpoints (:mod:`pipelines.resume`). The lineage is the newest attempt's; the URIs of
reused outputs point into the attempt that produced them.

``lineage(run_dir)`` joins the IR's task graph with each task's executor output: for each
step, its input artifacts (with the producer's URI and metadata), its output artifacts
and its output values.
"""

import datetime
import glob
import json
import os
import socket
import sys
from typing import Any, Mapping

import yaml

RUN_FILE = "run.json"
IR_FILE = "pipeline.yaml"
REPORT_FILE = "report.html"  # the run report (pipelines/report.py)
LOG_DIR = "logs"  # what kfp.local and each step printed (pipelines/run_output.py)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The metrics a run's summary shows (valid/ and test/ of the evaluate step): those of
# the run's task (retrieval: hr@10, ndcg@10, mrr; ranking: auc, logloss).
HEADLINE_METRICS = ("hr@10", "ndcg@10", "mrr", "auc", "logloss")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id(name: str) -> str:
  """``<config name>-<UTC timestamp>``: lowercase, digits and dashes (valid on Vertex too)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
  base = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "recml"
  return f"{base}-{stamp}"


class RunExists(ValueError):
  """``--run-id`` names a run that is already under the local root."""


def process_start_time(pid: int) -> float | None:
  """When process ``pid`` started (seconds since the epoch); None if it is not running.

  A zombie (exited, not yet reaped) is not running. Uses psutil when installed, else
  ``/proc`` (Linux).
  """
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    psutil = None
  if psutil is not None:
    try:
      proc = psutil.Process(pid)
      return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
      return None
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ")"
    with open("/proc/stat", encoding="utf-8") as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
  except (OSError, IndexError, StopIteration, ValueError):
    return None
  if fields[0] == "Z":
    return None
  return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, started: float | None) -> bool:
  """Whether ``pid`` is still the process that started at ``started`` (not a reuse)."""
  now = process_start_time(pid)
  return now is not None and (started is None or abs(now - started) < 1.0)


def process_identity() -> dict[str, Any]:
  """What ``run.json`` records about the process running a run."""
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "pid_started": process_start_time(os.getpid())}


def step_processes(run_dir: str) -> list[int]:
  """Live step processes (KFP executors) working in ``run_dir``, e.g. orphans of a dead run."""
  needle = os.path.abspath(run_dir) + os.sep
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    procs = ((p.info["pid"], p.info["cmdline"] or [])
             for p in psutil.process_iter(["pid", "cmdline"]))
  except ImportError:
    procs = []
    for entry in glob.glob("/proc/[0-9]*/cmdline"):
      try:
        with open(entry, "rb") as f:
          procs.append((int(entry.split("/")[2]), f.read().decode(errors="replace").split("\0")))
      except OSError:
        continue
  found = []
  for pid, cmdline in procs:
    text = " ".join(cmdline)
    if pid != os.getpid() and "executor_input" in text and needle in text:
      found.append(pid)
  return sorted(found)


def run_status(record: Mapping[str, Any], run_dir: str | None = None) -> dict[str, Any]:
  """``record`` with its status as it stands now.

  A RUNNING run whose process (``pid`` started at ``pid_started`` on this host) is gone
  becomes ``FAILED`` with ``status_detail`` "process N died" (plus the step processes
  still working in ``run_dir``, if any: ``orphans``). Runs of other hosts are left as
  recorded.
  """
  out = dict(record)
  pid, host = record.get("pid"), record.get("host")
  if record.get("status") != "RUNNING" or pid is None or host != socket.gethostname():
    return out
  if process_alive(pid, record.get("pid_started")):
    return out
  out["status"] = "FAILED"
  out["status_detail"] = f"process {pid} died"
  orphans = step_processes(run_dir) if run_dir else []
  if orphans:
    out["orphans"] = orphans
    out["status_detail"] += f"; its step processes {', '.join(map(str, orphans))} still run"
  out.setdefault("error", out["status_detail"])
  return out


def status_text(record: Mapping[str, Any]) -> str:
  """``FAILED (process 1234 died)``: the status, with its detail when derived."""
  detail = record.get("status_detail")
  return f"{record.get('status', '')} ({detail})" if detail else str(record.get("status", ""))


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
    from pipelines import run_output  # pylint: disable=g-import-not-at-top
    return local.DockerRunner(network_mode="host", mounts=binds,
                              user=f"{os.getuid()}:{os.getgid()}",
                              environment={"HOME": "/tmp",
                                           **run_output.step_environment(target)})
  raise ValueError(f"{target!r} is not a local target")


def run_local(pipeline_func, parameters: Mapping[str, Any], *, run_id: str, root: str,
              target: str = "local", manifest: Mapping[str, Any] | None = None,
              mounts: list[str] | None = None, resume: bool = False,
              verbose: bool = False) -> dict[str, Any]:
  """Runs the pipeline through ``kfp.local`` under ``root/run_id``.

  The terminal gets one line per step; what the steps print goes to
  ``root/run_id/logs/`` (:mod:`pipelines.run_output`).

  Args:
    pipeline_func: from :func:`pipelines.dag.build_pipeline`.
    parameters: the pipeline's parameter values.
    run_id: the run's id (its folder name).
    root: the local pipeline root.
    target: ``local`` (SubprocessRunner in this venv) or ``local-docker`` (the images).
    manifest: extra facts recorded in ``run.json`` (config, data, ...).
    mounts: ``local-docker`` only: host folders the steps read or write (data, store).
    resume: run a new attempt of the existing run ``run_id``, reusing the steps its
      earlier attempts completed (:mod:`pipelines.resume`).
    verbose: also stream everything kfp.local and the steps print to the terminal.

  Returns:
    The final ``run.json`` content (status, pipeline folder, times).

  Raises:
    RunExists: a new run's id is taken.
  """
  from kfp import compiler, local  # pylint: disable=g-import-not-at-top
  from pipelines import resume as resume_lib  # pylint: disable=g-import-not-at-top
  from pipelines import run_output  # pylint: disable=g-import-not-at-top
  run_dir = os.path.abspath(os.path.join(root, run_id))
  if resume:
    record = read_manifest(run_dir)
    for key in ("error", "finished", "status_detail"):
      record.pop(key, None)
    record.update(status="RUNNING", **dict(manifest or {}))
  else:
    check_new_run(root, run_id)
    try:
      os.makedirs(run_dir, exist_ok=False)
    except FileExistsError:  # a concurrent run took it
      check_new_run(root, run_id)
      raise
    record = {"run_id": run_id, "target": target, "status": "RUNNING", "started": _now(),
              "parameters": dict(parameters), **dict(manifest or {})}
  attempt = {"started": _now(), **process_identity()}
  record.update(process_identity())
  record["attempts"] = [*record.get("attempts", []), attempt]
  compiler.Compiler().compile(pipeline_func, os.path.join(run_dir, IR_FILE))
  write_manifest(run_dir, record)
  # SubprocessRunner steps import the project: make sure they find it.
  paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  if REPO_ROOT not in paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *paths])
  # The whole local root is mounted: the run, the default DuckDB store and the registry.
  local.init(runner=_runner(target, [os.path.dirname(run_dir), *(mounts or [])]),
             pipeline_root=run_dir,
             raise_on_error=True)
  console = run_output.Console(run_dir, record, lambda: write_manifest(run_dir, record),
                               verbose=verbose, resume=resume)
  # The local steps inherit this process's environment; local-docker's get it from _runner.
  env = run_output.step_environment(target) if target == "local" else {}
  try:
    with run_output.patched_environ(env), run_output.quiet_warnings(), console.capture(), \
        resume_lib.step_hook(run_dir, cacheable_components(run_dir), resume=resume,
                             report=console.how, watch=console.watch):
      pipeline_func(**parameters)
    record["status"] = "SUCCEEDED"
  except BaseException as e:  # recorded, then re-raised
    record["status"] = "FAILED"
    record["error"] = run_output.plain(f"{type(e).__name__}: {e}")
    raise
  finally:
    console.finish(record["status"])
    record["finished"] = _now()
    folder = pipeline_folder(run_dir)
    record["pipeline_dir"] = folder
    attempt.update(status=record["status"], finished=record["finished"], pipeline_dir=folder)
    write_manifest(run_dir, record)
    sys.stdout.flush()
  return record


def check_new_run(root: str, run_id: str) -> None:
  """Raises :class:`RunExists` when ``root/run_id`` is taken."""
  run_dir = os.path.join(root, run_id)
  if not os.path.exists(run_dir):
    return
  try:
    status = status_text(run_status(read_manifest(run_dir), run_dir))
  except (OSError, json.JSONDecodeError):
    status = "no readable run.json"
  raise RunExists(f"run id {run_id} already exists under {os.path.abspath(root)} "
                  f"(status {status}); use --resume {run_id} to continue it or pick a "
                  "new --run-id")


def cacheable_components(run_dir: str) -> dict[str, bool]:
  """Component name -> whether the run's IR lets its task be cached."""
  with open(os.path.join(run_dir, IR_FILE), encoding="utf-8") as f:
    spec = yaml.safe_load(f)
  return {task["componentRef"]["name"]: bool(task.get("cachingOptions", {}).get("enableCache"))
          for task in ir_tasks(spec).values()}


def pipeline_folder(run_dir: str) -> str | None:
  """kfp.local's run folder inside a run directory (None before it exists)."""
  found = sorted(p for p in glob.glob(os.path.join(run_dir, "*"))
                 if os.path.isdir(p) and os.path.basename(p) != LOG_DIR)
  return found[-1] if found else None


# ---------------------------------------------------------------------------
# Lineage
# ---------------------------------------------------------------------------


def ir_tasks(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
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
  record = run_status(read_manifest(run_dir), run_dir)
  with open(os.path.join(run_dir, IR_FILE), encoding="utf-8") as f:
    spec = yaml.safe_load(f)
  folder = record.get("pipeline_dir") or pipeline_folder(run_dir)
  tasks = ir_tasks(spec)
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
  order = {n: i for i, n in enumerate(("fingerprint", "preprocess", "train", "evaluate",
                                       "write-metrics", "validate", "bless"))}
  steps.sort(key=lambda s: order.get(s["step"], len(order)))
  return {"run": record, "steps": steps}


def report_path(run_dir: str) -> str | None:
  """The run report of a local run (``<run_dir>/report.html``); None before it is written."""
  path = os.path.join(os.path.abspath(run_dir), REPORT_FILE)
  return path if os.path.isfile(path) else None


def _local_path(uri: str) -> str:
  return uri[len("file://"):] if uri.startswith("file://") else uri


def headline(info: Mapping[str, Any]) -> dict[str, Any]:
  """Headline facts of a lineage: test/valid metrics, gate decision, report path."""
  out: dict[str, Any] = {}
  for step in info["steps"]:
    if step["step"] == "evaluate" and "metrics" in step["outputs"]:
      meta = step["outputs"]["metrics"]["metadata"]
      out.update({k: v for k, v in meta.items()
                  if k.split("/")[-1] in HEADLINE_METRICS
                  and k.split("/")[0] in ("valid", "test")})
      if "report" in step["outputs"]:
        out["report"] = _local_path(step["outputs"]["report"]["uri"])
    if step["step"] == "validate":
      out["decision"] = step["values"].get("Output", "")
      out["gate"] = step["outputs"].get("verdict", {}).get("metadata", {}).get("reason", "")
  return out


def list_runs(root: str) -> list[dict[str, Any]]:
  """The local runs under ``root``, newest first, with their status as of now."""
  runs = []
  for path in glob.glob(os.path.join(root, "*", RUN_FILE)):
    try:
      record = run_status(read_manifest(os.path.dirname(path)), os.path.dirname(path))
    except (OSError, json.JSONDecodeError):
      continue
    runs.append(record)
  runs.sort(key=lambda r: r.get("started", ""), reverse=True)
  return runs
