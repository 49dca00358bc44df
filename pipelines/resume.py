"""Resuming a local run: step fingerprints, reuse of completed steps, partial outputs.

kfp.local runs each attempt of a run in a new folder of the run directory
(``<run dir>/recml-pipeline-<time>/<task>/``) and re-executes every step. While a local
run is under :func:`step_hook`, every step kfp.local dispatches (one call of
``kfp.local.task_dispatcher.run_single_task_implementation``, the function that runs one
task from its executor input) records ``<task>/recml_step.json``::

    {"state": "running" | "done" | "failed", "fingerprint": "<sha256>",
     "files": [<output artifact paths that exist when the step is done>],
     "reused_from": "<task folder of an earlier attempt>"}   # reused steps only

The fingerprint hashes the component spec and executor (image, command, the component's
source), the input parameter values and, for input artifacts, their type, metadata and a
sha256 of their files (not their URIs, which name the attempt that produced them).

When resuming (``recml run --resume RUN_ID``), a step is **reused** when an earlier
attempt completed it (``state: done`` and its ``executor_output.json``) with the same
fingerprint and the output files it wrote still exist: its recorded outputs (artifacts
at their URIs in that attempt, output values) are returned to kfp.local without running
it, and a copy of its ``executor_output.json`` goes into the new attempt's task folder,
so the new attempt's lineage is complete. Everything else **runs**. Steps the DAG marks never-cached
(side effects or reads of the outside world: the metrics store, the raw data) always run,
since their inputs do not tell whether what they read changed.

A step in :data:`RESUMABLE_OUTPUTS` that had started in an earlier attempt with the same
fingerprint but did not finish (killed, or failed) gets that attempt's partial output moved into
its new output path first: the train step's Model artifact is the trainer's work
directory, and the trainer resumes from the Orbax checkpoints it finds there.
"""

import contextlib
import functools
import hashlib
import inspect
import json
import os
import shutil
from typing import Any, Callable, Iterator, Mapping

from components import fingerprint as data_fingerprint
from pipelines import local as local_lib

STEP_FILE = "recml_step.json"
EXECUTOR_OUTPUT = "executor_output.json"
# task -> output artifacts a re-run continues from (the trainer's work directory:
# components/train.py passes the Model artifact's path as `workdir`).
RESUMABLE_OUTPUTS = {"train": ("model",)}
_DIGESTS: dict[tuple[str, tuple[Any, ...]], str] = {}


def _local_path(uri: str) -> str | None:
  """The local path of a file:// or plain URI; None for remote ones (gs://, ...)."""
  if uri.startswith("file://"):
    return uri[len("file://"):]
  return None if "://" in uri else uri


def path_digest(path: str) -> str:
  """sha256 over the relative names and contents of a file or a folder's files.

  Memoised on the files' names, sizes and modification times: the model directory is
  an input of several steps of a run.
  """
  if os.path.isfile(path):
    files = [("", path)]
  else:
    files = []
    for folder, dirs, names in os.walk(path):
      dirs.sort()
      files += [(os.path.relpath(os.path.join(folder, n), path), os.path.join(folder, n))
                for n in sorted(names)]
  stats = tuple((rel, os.stat(full).st_size, os.stat(full).st_mtime_ns) for rel, full in files)
  key = (os.path.abspath(path), stats)
  if key not in _DIGESTS:
    h = hashlib.sha256()
    for rel, full in files:
      h.update(rel.encode() + b"\0")
      h.update(data_fingerprint.sha256_file(full).encode())
    _DIGESTS[key] = h.hexdigest()
  return _DIGESTS[key]


def _artifact_key(artifact) -> dict[str, Any]:
  path = _local_path(artifact.uri)
  if path is None:
    content = artifact.uri  # remote: the URI is all we can know cheaply
  elif os.path.exists(path):
    content = path_digest(path)
  else:
    content = "missing"
  return {"type": artifact.schema_title, "metadata": artifact.metadata, "content": content}


def fingerprint(component_spec, executor_spec, arguments: Mapping[str, Any]) -> str:
  """sha256 of a task's component, executor and resolved inputs (artifacts by content)."""
  from kfp import dsl  # pylint: disable=g-import-not-at-top

  def value(v):
    if isinstance(v, dsl.Artifact):
      return _artifact_key(v)
    if isinstance(v, list) and v and isinstance(v[0], dsl.Artifact):
      return [_artifact_key(a) for a in v]
    return v

  h = hashlib.sha256()
  h.update(component_spec.SerializeToString(deterministic=True))
  h.update(executor_spec.SerializeToString(deterministic=True))
  inputs = {k: value(v) for k, v in arguments.items()}
  h.update(json.dumps(inputs, sort_keys=True, default=str).encode())
  return h.hexdigest()


def read_step(task_root: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(task_root, STEP_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _write_step(task_root: str, record: Mapping[str, Any]) -> None:
  os.makedirs(task_root, exist_ok=True)
  path = os.path.join(task_root, STEP_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def attempts(run_dir: str) -> list[str]:
  """The run's attempt folders (kfp.local's pipeline folders), newest first."""
  found = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n != local_lib.LOG_DIR]
  return sorted((p for p in found if os.path.isdir(p)), reverse=True)


def completed(run_dir: str, task: str, fp: str,
              exclude: str = "") -> tuple[str, dict[str, Any]] | None:
  """The task folder and record of ``task`` done with fingerprint ``fp``, newest first."""
  for attempt in attempts(run_dir):
    if attempt == exclude:
      continue
    record = read_step(os.path.join(attempt, task))
    if record and record.get("state") == "done" and record.get("fingerprint") == fp:
      origin = record.get("reused_from") or os.path.join(attempt, task)
      if os.path.exists(os.path.join(origin, EXECUTOR_OUTPUT)):
        return origin, record
  return None


def _files(outputs: Mapping[str, Any]) -> list[str]:
  """The local paths of the output artifacts that exist (metadata-only ones do not)."""
  from kfp import dsl  # pylint: disable=g-import-not-at-top
  paths = []
  for out in outputs.values():
    for art in out if isinstance(out, list) else [out]:
      path = _local_path(art.uri) if isinstance(art, dsl.Artifact) else None
      if path is not None and os.path.exists(path):
        paths.append(path)
  return sorted(paths)


def unfinished(run_dir: str, task: str, fp: str, exclude: str = "") -> str | None:
  """The newest earlier task folder where ``task`` started with ``fp`` but never finished."""
  for attempt in attempts(run_dir):
    if attempt == exclude:
      continue
    record = read_step(os.path.join(attempt, task))
    if record and record.get("state") != "done" and record.get("fingerprint") == fp:
      return os.path.join(attempt, task)
  return None


def _reuse(origin: str, files: list[str], task_root: str, fp: str, component_spec,
           arguments: Mapping[str, Any]) -> dict[str, Any] | None:
  """The outputs recorded in ``origin``, as kfp.local returns them (None if files are gone)."""
  # pylint: disable=g-import-not-at-top
  from kfp.local import executor_input_utils, executor_output_utils
  # pylint: enable=g-import-not-at-top
  if not all(os.path.exists(p) for p in files):
    return None
  executor_input = executor_input_utils.construct_executor_input(
      component_spec=component_spec, arguments=dict(arguments), task_root=origin,
      block_input_artifact=False)
  outputs = executor_output_utils.get_outputs_for_task(executor_input, component_spec)
  os.makedirs(task_root, exist_ok=True)
  shutil.copyfile(os.path.join(origin, EXECUTOR_OUTPUT), os.path.join(task_root, EXECUTOR_OUTPUT))
  _write_step(task_root, {"state": "done", "fingerprint": fp, "files": files,
                          "reused_from": origin})
  return outputs


def _short(path: str, run_dir: str) -> str:
  return os.path.relpath(path, run_dir)


def dispatch(original: Callable[..., Any], run_dir: str, cacheable: Mapping[str, bool],
             resume: bool, report: Callable[[str, str], None],
             **kw) -> tuple[dict[str, Any], Any]:
  """Runs (or reuses) one task; the arguments are ``run_single_task_implementation``'s.

  ``report(task, how)`` is told how the task was done: ``ran``, ``ran (never cached)``,
  ``reused (<task folder>)``, ... or ``failed``.
  """
  # pylint: disable=g-import-not-at-top
  from kfp.local import executor_input_utils, status
  # pylint: enable=g-import-not-at-top
  component = kw["component_name"]
  task = executor_input_utils.get_local_task_resource_name(component)
  attempt = os.path.join(kw["pipeline_root"], kw["pipeline_resource_name"])
  task_root = os.path.join(attempt, task)
  fp = fingerprint(kw["component_spec"], kw["executor_spec"], kw["arguments"])
  how = "ran"
  if resume and not cacheable.get(component, False):
    how = "ran (never cached)"
  elif resume:
    if any((read_step(os.path.join(a, task)) or {}).get("state") == "done"
           for a in attempts(run_dir) if a != attempt):
      how = "ran (its inputs or code changed)"
    found = completed(run_dir, task, fp, exclude=attempt)
    if found:
      origin, record = found
      outputs = _reuse(origin, record.get("files", []), task_root, fp, kw["component_spec"],
                       kw["arguments"])
      if outputs is not None:
        report(task, f"reused ({_short(origin, run_dir)})")
        return outputs, status.Status.SUCCESS
      how = f"ran (the outputs of {_short(origin, run_dir)} are gone)"
    previous = unfinished(run_dir, task, fp, exclude=attempt)
    moved = []
    for name in RESUMABLE_OUTPUTS.get(task, ()) if previous else ():
      if os.path.exists(os.path.join(previous, name)):
        os.makedirs(task_root, exist_ok=True)
        shutil.move(os.path.join(previous, name), os.path.join(task_root, name))
        moved.append(name)
    if moved:
      how = f"ran (continued from the partial {', '.join(moved)} of {_short(previous, run_dir)})"
  _write_step(task_root, {"state": "running", "fingerprint": fp})
  outputs, task_status = original(**kw)
  done = task_status == status.Status.SUCCESS
  _write_step(task_root, {"state": "done" if done else "failed", "fingerprint": fp,
                          "files": _files(outputs) if done else []})
  report(task, how if done else "failed")
  return outputs, task_status


def _print(task: str, how: str) -> None:
  print(f"step {task}: {how}", flush=True)


def _no_watch(task: str):  # pylint: disable=unused-argument
  return contextlib.nullcontext(lambda outputs, ok: None)


@contextlib.contextmanager
def step_hook(run_dir: str, cacheable: Mapping[str, bool], resume: bool = False,
              report: Callable[[str, str], None] | None = None,
              watch: Callable[[str], Any] | None = None) -> Iterator[None]:
  """Routes kfp.local's task executions through :func:`dispatch` inside the block.

  Args:
    run_dir: the run directory (kfp.local's pipeline root).
    cacheable: component name (``comp-train``) -> whether the DAG lets it be cached.
    resume: reuse completed steps of earlier attempts; otherwise only record.
    report: called as ``report(task, how)`` once per step (``("train", "ran")``);
      default: printed (``step train: ran``) when resuming.
    watch: ``watch(task)`` is a context manager around each step (reused or run),
      entered before it starts; it yields ``done(outputs, ok)``, called with the
      step's outputs when it ends without raising (:mod:`pipelines.run_output`).
  """
  # pylint: disable=g-import-not-at-top
  from kfp.local import executor_input_utils, status, task_dispatcher
  # pylint: enable=g-import-not-at-top
  original = task_dispatcher.run_single_task_implementation
  signature = inspect.signature(original)
  report = report or (_print if resume else lambda task, how: None)
  watch = watch or _no_watch

  @functools.wraps(original)
  def hooked(*args, **kwargs):
    kw = signature.bind(*args, **kwargs).arguments
    task = executor_input_utils.get_local_task_resource_name(kw["component_name"])
    with watch(task) as done:
      outputs, task_status = dispatch(original, run_dir, cacheable, resume, report, **kw)
      done(outputs, task_status == status.Status.SUCCESS)
    return outputs, task_status

  task_dispatcher.run_single_task_implementation = hooked
  try:
    yield
  finally:
    task_dispatcher.run_single_task_implementation = original
