"""Drills on local pipeline runs, shared by the reliability tests and
``benchmarks/reliability_bench.py``.

    killed = kill_during_training(root, "smoke-killed", data, ["--set", "train.epochs=4"], log)
    resumed = resume(root, "smoke-killed")     # {"returncode", "seconds", "steps", "output"}
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recml(*argv: str) -> list[str]:
  """The ``recml`` command line run with this interpreter."""
  return [sys.executable, "-m", "pipelines.cli", *argv]


def clean_env() -> dict[str, str]:
  """This process's environment without the variables that would redirect a run."""
  return {k: v for k, v in os.environ.items()
          if k not in ("RECML_PIPELINE_ROOT", "RECML_STORE_URI")}


def tail(path: str, n: int = 3000) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()[-n:]


def kill_during_training(root: str, run_id: str, data: str, overrides: Sequence[str],
                         log: str, config: str = "ml100k_smoke",
                         timeout: float = 600) -> dict[str, Any]:
  """Starts ``recml run`` and SIGKILLs its whole process group (recml and its step
  processes) once the train step's first ``latest`` checkpoint is final.

  Returns ``{"pid", "seconds" (start -> kill), "returncode"}``.
  """
  started = time.time()
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(
        recml("run", "--config", config, "--data", data, "--pipeline-root", root,
              "--run-id", run_id, *overrides),
        cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True)
  pattern = os.path.join(root, run_id, "*", "train", "model", "checkpoints", "latest", "*")
  while not [p for p in glob.glob(pattern) if os.path.basename(p).isdigit()]:
    if proc.poll() is not None:
      raise RuntimeError(f"the run ended before training checkpointed:\n{tail(log)}")
    if time.time() - started > timeout:
      os.killpg(proc.pid, signal.SIGKILL)
      raise TimeoutError(f"no checkpoint after {timeout:.0f} s:\n{tail(log)}")
    time.sleep(0.1)
  os.killpg(proc.pid, signal.SIGKILL)
  return {"pid": proc.pid, "seconds": time.time() - started, "returncode": proc.wait()}


def resume(root: str, run_id: str) -> dict[str, Any]:
  """``recml run --resume RUN_ID``: ``{"returncode", "seconds", "steps" ({step: how}),
  "output"}``."""
  started = time.time()
  done = subprocess.run(recml("run", "--resume", run_id, "--pipeline-root", root),
                        cwd=REPO, env=clean_env(), capture_output=True, text=True,
                        check=False)
  return {"returncode": done.returncode, "seconds": time.time() - started,
          "steps": dict(re.findall(r"^step ([\w-]+): (.*)$", done.stdout, re.M)),
          "output": done.stdout + done.stderr}
