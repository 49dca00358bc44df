"""What ``recml run`` prints on a local target, and where everything else goes.

The terminal gets a line when a step starts and one when it ends (its wall time and key
numbers: rows and users for preprocess, epochs and the validation metric for train, ...),
a progress line while training (epoch/total, loss, sequences/s), and at the end the run's
summary (:func:`summary_lines`). On a terminal the start and progress lines are rewritten
in place, so each step leaves one line. What kfp.local and the steps print goes to::

    runs/<run id>/logs/run.log       kfp.local's own lines (pipeline start, skipped steps)
    runs/<run id>/logs/<step>.log    everything the step printed: its executor input, the
                                     TensorFlow / JAX / Beam logs, the trainer's epoch lines

``recml run -v`` streams all of it to the terminal as well. Each step's state, start
time, wall time and key numbers go into ``run.json`` as they happen::

    "steps": {"train": {"state": "done", "started": "2026-...+00:00", "seconds": 22.7,
                        "how": "ran", "log": "logs/train.log",
                        "summary": {"epochs": 2, "best_epoch": 2, ...},
                        "text": "2 epochs, best 2: valid ndcg@10 0.0518; 4.34 s/epoch"}}

with states ``running``, ``done``, ``reused`` (resumed runs), ``failed``, ``skipped`` (the
gate did not bless the model) and ``not run`` (an earlier step failed).

The known noise is silenced where it starts rather than filtered: :func:`step_environment`
keeps TensorFlow's and JAX's accelerator probes quiet on hosts without an accelerator,
and :func:`quiet_warnings` drops kfp.local's warning that our images are not Python
images (the ``local`` target runs the steps' code in this environment on purpose).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import io
import math
import os
import re
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, TextIO

from pipelines import local as local_lib

LOG_DIR = local_lib.LOG_DIR
RUN_LOG = "run.log"
# The trainer's epoch line (trainers/train.py): "epoch  3/60  loss 5.1234  9.9s  2067 sequences/s
# [valid ndcg@10 0.1234  test ndcg@10 0.1200]".
EPOCH_LINE = re.compile(
    r"^epoch\s+(?P<epoch>\d+)/(?P<total>\d+)\s+loss\s+(?P<loss>\S+)\s+\S+s\s+(?P<rate>\d+)\s+"
    r"(?P<unit>\w+)/s(?:\s+valid\s+(?P<metric>\S+)\s+(?P<value>\S+))?")
RESUMED = re.compile(r"resumed from epoch \d+.*$")  # the trainer continuing from checkpoints
PROGRESS_LINES = 5  # progress lines per training when the output is not a terminal
TAIL_LINES = 15     # lines of a failed step's log shown on the terminal
NAME_WIDTH = 13     # "write-metrics"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
  """``text`` without terminal colour codes (kfp.local colours task names in its errors)."""
  return ANSI.sub("", text)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def duration(seconds: float) -> str:
  """``0.4s``, ``12.3s``, ``14m05s``, ``1h02m``."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes}m{secs:02d}s"
  return f"{minutes // 60}h{minutes % 60:02d}m"


def number(value: Any) -> str:
  """A number as people read it: counts with separators, others to 4 significant digits."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, int) or (math.isfinite(value) and value == int(value)
                                and abs(value) >= 1):
    return f"{int(value):,}"
  if math.isfinite(value) and abs(value) >= 1000:
    return f"{value:,.0f}"
  return f"{value:.4g}"


# ---------------------------------------------------------------------------
# Where the noise starts
# ---------------------------------------------------------------------------


def host_accelerator() -> str | None:
  """``gpu`` or ``tpu`` when this host has one (its device files), else None."""
  if glob.glob("/dev/nvidia[0-9]*"):
    return "gpu"
  if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
    return "tpu"
  return None


def step_environment(target: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """Environment variables for the steps of a local run that keep the accelerator probes quiet.

  Without an accelerator (``local`` on a host without one; ``local-docker``, whose
  containers get no device), JAX is told to use the CPU (``JAX_PLATFORMS=cpu``: no probe
  for a TPU or GPU backend) and TensorFlow, which the steps use for input pipelines only,
  logs nothing below FATAL (its failures still raise; what it would log here is the
  failed ``cuInit`` of its CUDA probe and oneDNN notices). With one, TensorFlow keeps its
  errors. Variables already set in ``environ`` win.
  """
  environ = os.environ if environ is None else environ
  cpu_only = target == "local-docker" or host_accelerator() is None
  wanted = {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"} if cpu_only else {
      "TF_CPP_MIN_LOG_LEVEL": "2"}
  return {k: environ.get(k, v) for k, v in wanted.items()}


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
  """``os.environ`` with ``values`` set inside the block (the ``local`` steps inherit it)."""
  before = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for key, value in before.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
  """Drops kfp.local's "custom or non-Python base image" warning inside the block.

  ``SubprocessRunner`` warns for every step whose image name lacks "python"; the
  ``local`` target runs our steps' code in this environment (which has their
  dependencies) by design, so the warning never applies to them.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"You may be attem\w* to run a task that uses custom or "
                            r"non-Python base image")
    yield


# ---------------------------------------------------------------------------
# Key numbers of each step, from its outputs
# ---------------------------------------------------------------------------


def _metadata(outputs: Mapping[str, Any], name: str) -> dict[str, Any]:
  art = outputs.get(name)
  if isinstance(art, Mapping):  # a lineage entry ({"uri", "metadata"})
    return dict(art.get("metadata") or {})
  return dict(getattr(art, "metadata", None) or {})


def _int(value: Any) -> Any:
  return int(value) if isinstance(value, float) and value == int(value) else value


def step_summary(task: str, outputs: Mapping[str, Any]) -> dict[str, Any]:
  """A step's key numbers, from its outputs (kfp.local's artifacts or lineage entries)."""
  if task == "fingerprint":
    meta = _metadata(outputs, "manifest")
    return {"digest": meta.get("digest"), "entries": _int(meta.get("entries")),
            "kind": meta.get("kind")}
  if task == "preprocess":
    meta = _metadata(outputs, "dataset")
    out = {key: _int(meta.get(f"rows/{key}")) for key in ("rows_read", "rows_kept",
                                                          "rows_quarantined")}
    if meta.get("task") == "ranking":  # CTR rows: examples per split, no users or items
      out.update({f"examples/{s}": _int(meta.get(f"examples/{s}"))
                  for s in ("train", "valid", "test")}, dataset_id=meta.get("dataset_id"))
      return out
    out.update(users=_int(meta.get("num_users")), items=_int(meta.get("num_items")),
               dataset_id=meta.get("dataset_id"))
    return out
  if task == "train":
    meta = _metadata(outputs, "model")
    metric = (meta.get("hyperparameters") or {}).get("selection_metric", "ndcg@10")
    return {"epochs": _int(meta.get("epochs_run")), "best_epoch": _int(meta.get("selected_epoch")),
            f"valid/{metric}": meta.get(f"valid/{metric}"),
            "seconds_per_epoch": meta.get("seconds_per_epoch")}
  if task == "evaluate":
    meta = _metadata(outputs, "metrics")
    return {f"test/{name}": meta[f"test/{name}"] for name in local_lib.HEADLINE_METRICS
            if f"test/{name}" in meta}
  if task == "validate":
    meta = _metadata(outputs, "verdict")
    return {k: meta.get(k) for k in ("decision", "metric", "candidate_value",
                                     "champion_run_id", "champion_value") if k in meta}
  if task == "export":
    meta = _metadata(outputs, "bundle")
    return {k: _int(meta.get(k)) for k in ("format_version", "platforms", "max_k") if k in meta}
  if task == "deploy":
    meta = _metadata(outputs, "deployment")
    return {k: meta.get(k) for k in ("version", "path") if k in meta}
  return {}


def summary_text(task: str, summary: Mapping[str, Any]) -> str:
  """The step's finish line text: ``100,000 rows read: ...``."""
  s = {k: v for k, v in summary.items() if v is not None}
  if task == "fingerprint" and "digest" in s:
    entries = s.get("entries")
    what = f"{number(entries)} file{'s' if entries != 1 else ''}, " if s.get("kind") == "files" \
        else ""
    return f"{what}{str(s['digest'])[:19]}"
  if task == "preprocess" and "rows_read" in s and "examples/train" in s:  # ranking
    return (f"{number(s['rows_read'])} rows read: {number(s.get('rows_kept'))} kept, "
            f"{number(s.get('rows_quarantined'))} quarantined; "
            + "/".join(number(s.get(f"examples/{x}")) for x in ("train", "valid", "test"))
            + f" train/valid/test examples ({s.get('dataset_id')})")
  if task == "preprocess" and "rows_read" in s:
    return (f"{number(s['rows_read'])} rows read: {number(s.get('rows_kept'))} kept, "
            f"{number(s.get('rows_quarantined'))} quarantined; {number(s.get('users'))} users, "
            f"{number(s.get('items'))} items ({s.get('dataset_id')})")
  if task == "train" and "epochs" in s:
    metric = next((k for k in s if k.startswith("valid/")), None)
    text = f"{s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}, best {s.get('best_epoch')}"
    if metric:
      text += f": valid {metric.split('/', 1)[1]} {number(s[metric])}"
    if "seconds_per_epoch" in s:
      text += f"; {s['seconds_per_epoch']:.3g} s/epoch"
    return text
  if task == "evaluate":
    return "test " + "  ".join(f"{k.split('/', 1)[1]} {number(v)}" for k, v in s.items())
  if task == "validate" and "decision" in s:
    text = f"{s['decision']}: {s.get('metric', '')} {number(s.get('candidate_value'))}"
    if "champion_run_id" in s:
      return text + f" vs champion {s['champion_run_id']} {number(s.get('champion_value'))}"
    return text + " (no champion yet)"
  if task == "export" and "format_version" in s:
    top = f"top {s['max_k']}, " if "max_k" in s else ""  # a ranking bundle scores rows
    return f"bundle format {s['format_version']}, {top}for {s.get('platforms')}"
  if task == "deploy" and "version" in s:
    return f"version {s['version']}"
  return ", ".join(f"{k} {number(v)}" for k, v in s.items())


# ---------------------------------------------------------------------------
# The terminal and the logs
# ---------------------------------------------------------------------------


class LogStream(io.TextIOBase):
  """A text stream into a log file; optionally echoed, and told each complete line."""

  def __init__(self, path: str, echo: TextIO | None = None,
               on_line: Callable[[str], None] | None = None):
    super().__init__()
    self.path = path
    self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._echo = echo
    self._on_line = on_line
    self._partial = ""

  @property
  def encoding(self) -> str:
    return "utf-8"

  def writable(self) -> bool:
    return True

  def isatty(self) -> bool:
    return False

  def write(self, text: str) -> int:
    self._file.write(text)
    if self._echo is not None:
      self._echo.write(text)
    if self._on_line is not None:
      *lines, self._partial = (self._partial + text).split("\n")
      for line in lines:
        self._on_line(line)
    if "\n" in text:
      self.flush()
    return len(text)

  def flush(self) -> None:
    if not self._file.closed:
      self._file.flush()
    if self._echo is not None:
      self._echo.flush()

  def close(self) -> None:
    if self._partial and self._on_line is not None:
      self._on_line(self._partial)
    self._partial = ""
    if not self._file.closed:
      self._file.close()
    super().close()


ERROR_LINE = re.compile(r"^\s*((?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b.*)$")


def tail(path: str, n: int) -> list[str]:
  """The last ``n`` non-blank lines of a log, without colour codes or kfp's indent."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = [plain(line.rstrip()) for line in f if line.strip() and not line.startswith("---")]
  except OSError:
    return []
  return [line[4:] if line.startswith("    ") else line for line in lines[-n:]]


def error_line(path: str) -> str | None:
  """The last exception line (``ValueError: ...``) a step's log holds."""
  found = [m.group(1) for m in map(ERROR_LINE.match, tail(path, 200)) if m]
  return found[-1] if found else None


class Console:
  """One line per step on the terminal; each step's output in ``logs/<step>.log``.

  Use :meth:`capture` around the whole pipeline call and pass :meth:`watch` and
  :meth:`how` to :func:`pipelines.resume.step_hook`.

  Args:
    run_dir: the run folder (``logs/`` is created in it).
    record: the run's ``run.json`` content; its ``steps`` mapping is rewritten.
    save: writes ``record`` to ``run.json``.
    verbose: echo everything the steps and kfp.local print.
    resume: a resumed attempt: print how each step was done (``step train: reused
      (...)``, the lines :mod:`pipelines.resume` prints).
    stream: the terminal (default: ``sys.stdout`` when created).
  """

  def __init__(self, run_dir: str, record: dict[str, Any], save: Callable[[], None], *,
               verbose: bool = False, resume: bool = False, stream: TextIO | None = None):
    self.run_dir = run_dir
    self.logs = os.path.join(run_dir, LOG_DIR)
    os.makedirs(self.logs, exist_ok=True)
    self.term = stream or sys.stdout
    self.verbose, self.resume = verbose, resume
    isatty = getattr(self.term, "isatty", None)
    self.live = bool(isatty and isatty()) and not verbose  # rewrite lines in place
    self.record, self.save = record, save
    self.steps: dict[str, dict[str, Any]] = {}
    record["steps"] = self.steps
    self._open = False  # a live line is on the terminal

  # -- terminal ------------------------------------------------------------------

  def _write(self, text: str, live: bool = False) -> None:
    clear = "\r\033[K" if self._open else ""
    if live and self.live:  # one row, or "\r" would not take it back
      width = shutil.get_terminal_size((100, 24)).columns - 1
      self.term.write(f"{clear}{text[:width]}")
      self._open = True
    else:
      self.term.write(f"{clear}{text}\n")
      self._open = False
    self.term.flush()

  def line(self, task: str, text: str, live: bool = False) -> None:
    """``12:03:04 train         <text>``."""
    self._write(f"{time.strftime('%H:%M:%S')} {task:<{NAME_WIDTH}} {text}".rstrip(), live)

  # -- the run ---------------------------------------------------------------------

  @contextlib.contextmanager
  def capture(self) -> Iterator[None]:
    """Sends what is printed inside the block (kfp.local's own lines) to ``logs/run.log``."""
    stream = LogStream(os.path.join(self.logs, RUN_LOG),
                       echo=self.term if self.verbose else None)
    try:
      with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        yield
    finally:
      stream.close()

  def how(self, task: str, how: str) -> None:
    """``step_hook``'s report: how ``task`` was done (ran, reused, ...)."""
    self.steps.setdefault(task, {})["how"] = how
    if self.resume:
      self._write(f"step {task}: {how}")

  @contextlib.contextmanager
  def watch(self, task: str) -> Iterator[Callable[[Mapping[str, Any], bool], None]]:
    """Around one step: its start and finish lines, its log, its entry in ``run.json``."""
    log = os.path.join(self.logs, f"{task}.log")
    entry = {"state": "running", "started": _now(), "log": os.path.relpath(log, self.run_dir)}
    self.steps[task] = entry
    self.save()
    self.line(task, "running", live=True)
    t0 = time.monotonic()
    progress = _Progress(self, task)
    stream = LogStream(log, echo=self.term if self.verbose else None, on_line=progress)
    ended: dict[str, Any] = {}
    try:
      with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        yield lambda outputs, ok: ended.update(outputs=outputs, ok=ok)
    except BaseException as e:
      stream.close()
      error = ("interrupted" if isinstance(e, KeyboardInterrupt)
               else error_line(log) or f"{type(e).__name__}: {e}")
      self._failed(task, entry, time.monotonic() - t0, log, error)
      raise
    stream.close()
    seconds = time.monotonic() - t0
    if not ended.get("ok"):
      self._failed(task, entry, seconds, log, error_line(log) or "the step failed")
      return
    summary = step_summary(task, ended.get("outputs") or {})
    state = "reused" if entry.get("how", "").startswith("reused") else "done"
    entry.update(state=state, seconds=round(seconds, 3), summary=summary,
                 text=summary_text(task, summary))
    self.save()
    self.line(task, f"{state:<7}{duration(seconds):>8}  {entry['text']}")

  def _failed(self, task: str, entry: dict[str, Any], seconds: float, log: str,
              error: str) -> None:
    entry.update(state="failed", seconds=round(seconds, 3), error=plain(error))
    self.save()
    self.line(task, f"FAILED after {duration(seconds)}; its log: {log}")
    if not self.verbose:
      for text in tail(log, TAIL_LINES):
        self._write(f"    {text}")

  def finish(self, status: str) -> None:
    """Records the steps that did not run (skipped by the gate, or after a failure)."""
    import yaml  # pylint: disable=g-import-not-at-top
    try:
      with open(os.path.join(self.run_dir, local_lib.IR_FILE), encoding="utf-8") as f:
        tasks = local_lib.ir_tasks(yaml.safe_load(f))
    except (OSError, yaml.YAMLError):
      tasks = {}
    decision = (self.steps.get("validate", {}).get("summary") or {}).get("decision")
    skipped = []
    for task, spec in tasks.items():
      if task in self.steps:
        continue
      if status == "SUCCEEDED" and spec.get("condition"):
        reason = f"gate: {decision}" if decision else "its condition was false"
        self.steps[task] = {"state": "skipped", "summary": {}, "text": reason}
        skipped.append(task)
      else:
        self.steps[task] = {"state": "not run", "summary": {}, "text": ""}
    self.save()
    if skipped:
      self.line(", ".join(skipped), f"skipped ({self.steps[skipped[0]]['text']})")


class _Progress:
  """Reads a step's output lines for progress: the trainer's epochs and its resume."""

  def __init__(self, console: Console, task: str):
    self.console, self.task = console, task
    self.first: tuple[int, float] | None = None  # (epoch, time) of the first epoch seen
    self.valid = ("", 0)  # the last validation metric seen, and its epoch

  def __call__(self, line: str) -> None:
    text = line.strip()
    m = EPOCH_LINE.match(text)
    if m is None:
      found = RESUMED.search(text)
      if found:
        self.console.line(self.task, found.group(0))
      return
    epoch, total, now = int(m["epoch"]), int(m["total"]), time.monotonic()
    if m["metric"]:
      self.valid = (f"  valid {m['metric']} {m['value']}", epoch)
    eta = ""
    if self.first is None:
      self.first = (epoch, now)
    elif epoch > self.first[0] and total > epoch:
      per_epoch = (now - self.first[1]) / (epoch - self.first[0])
      eta = f"  eta {duration(per_epoch * (total - epoch))}"
    valid = self.valid[0] + (f" (epoch {self.valid[1]})" if self.valid[1] != epoch else "")
    text = (f"epoch {epoch}/{total}  loss {m['loss']}  {int(m['rate']):,} {m['unit']}/s"
            f"{valid if self.valid[0] else ''}{eta}")
    every = max(1, math.ceil(total / PROGRESS_LINES))
    if self.console.live:
      self.console.line(self.task, text, live=True)
    elif epoch == self.first[0] or epoch % every == 0:
      self.console.line(self.task, text)


# ---------------------------------------------------------------------------
# The end of a run
# ---------------------------------------------------------------------------


def summary_lines(run_dir: str, report: str | None = None,
                  report_error: str | None = None) -> list[str]:
  """The run's summary: status, headline metrics, gate, deployment, report, logs."""
  info = local_lib.lineage(run_dir)
  run, head = info["run"], local_lib.headline(info)
  steps = run.get("steps") or {}
  attempt = (run.get("attempts") or [{}])[-1]
  took = ""
  try:
    start, end = (datetime.datetime.fromisoformat(attempt[k]) for k in ("started", "finished"))
    took = f" in {duration((end - start).total_seconds())}"
  except (KeyError, TypeError, ValueError):
    pass
  lines = [f"run {run['run_id']}: {local_lib.status_text(run)}{took}"]
  for split in ("test", "valid"):
    values = [(k.split("/", 1)[1], v) for k, v in head.items() if k.startswith(f"{split}/")]
    order = {name: i for i, name in enumerate(local_lib.HEADLINE_METRICS)}
    values.sort(key=lambda kv: order.get(kv[0], len(order)))
    if values:
      lines.append(f"  {split:<6}" + "  ".join(f"{k} {number(v)}" for k, v in values))
  failed = [name for name, s in steps.items() if s.get("state") == "failed"]
  if failed:
    lines.append(f"failed step: {failed[0]} ({steps[failed[0]].get('error', '')}); its log: "
                 f"{os.path.join(run_dir, steps[failed[0]].get('log', ''))}")
    lines.append(f"continue it: recml run --resume {run['run_id']}")
  if head.get("decision"):
    lines.append(f"gate: {head['decision']} ({head.get('gate', '')})")
  deploy = steps.get("deploy", {})
  if deploy.get("state") in ("done", "reused"):
    where = (deploy.get("summary") or {}).get("path", "")
    lines.append(f"deployed: version {(deploy.get('summary') or {}).get('version')}"
                 + (f" ({where})" if where else ""))
  elif head.get("decision"):
    lines.append(f"deployed: nothing (gate: {head['decision']}; the registry keeps its "
                 "current model)")
  if report:
    lines.append(f"report: {report}")
  elif report_error:
    lines.append(f"report: not written ({report_error}; see "
                 f"{os.path.join(run_dir, LOG_DIR, RUN_LOG)})")
  lines.append(f"logs: {os.path.join(run_dir, LOG_DIR)}{os.sep}")
  return lines
