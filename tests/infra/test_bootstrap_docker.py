"""infra/bootstrap_docker.sh's engine start and `stop`, with a stand-in `dockerd` (a real
process that keeps its pid file and exits on SIGTERM, as dockerd does), so that the
machine's own Docker engine is left alone. Fast."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run by bash directly (not through env), so that its process name is the file's: dockerd.
STUB_DOCKERD = f"""#!{shutil.which("bash")}
# Stand-in engine: writes --pidfile, removes it when stopped (SIGTERM), like dockerd.
for a in "$@"; do case "$a" in --pidfile=*) pidfile=${{a#--pidfile=}} ;; esac; done
echo $$ > "$pidfile"
trap 'rm -f "$pidfile"; exit 0' TERM
while :; do sleep 0.1; done
"""
# `docker info` answers while the stand-in engine runs.
STUB_DOCKER = """#!/usr/bin/env bash
pid=$(cat "$RECML_CACHE_DIR/dockerd.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null || exit 1
[ "${2:-}" = --format ] && echo "stub, overlay2"
exit 0
"""
STUBS = {"dockerd": STUB_DOCKERD, "docker": STUB_DOCKER,
         "pgrep": "#!/bin/sh\nexit 1\n",  # no other engine on this (stand-in) machine
         "sudo": '#!/bin/sh\nexec "$@"\n'}


def _alive(pid: int) -> bool:
  """Whether pid is a running process (a zombie counts as stopped)."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return state != "Z"


@pytest.fixture
def machine(tmp_path):
  """Runs bootstrap_docker.sh with the stand-ins first on PATH; stops what is left after."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in STUBS.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  cache = tmp_path / "cache"
  env = dict(os.environ, RECML_CACHE_DIR=str(cache), PATH=f"{bin_dir}:{os.environ['PATH']}")

  def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "infra/bootstrap_docker.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)

  run.pidfile = cache / "dockerd.pid"
  yield run
  if run.pidfile.exists():
    try:
      os.kill(int(run.pidfile.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def test_start_records_the_engine_and_stop_stops_it(machine):
  started = machine("--engine-only")
  assert started.returncode == 0, started.stderr
  assert "Docker engine ready" in started.stderr
  pid = int(machine.pidfile.read_text())
  assert _alive(pid)
  assert pathlib.Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"

  again = machine("--engine-only")  # idempotent: the running engine is kept
  assert again.returncode == 0 and "a Docker engine is running" in again.stderr
  assert int(machine.pidfile.read_text()) == pid and _alive(pid)

  stopped = machine("stop")
  assert stopped.returncode == 0, stopped.stderr
  assert f"stopping dockerd (pid {pid})" in stopped.stderr and "dockerd stopped" in stopped.stderr
  deadline = time.monotonic() + 10
  while _alive(pid) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(pid) and not machine.pidfile.exists()

  nothing = machine("stop")
  assert nothing.returncode == 0
  assert "no engine started by this script is running" in nothing.stderr


def test_stop_leaves_a_process_that_is_not_its_engine_alone(machine):
  # A stale pid file whose pid now belongs to another process (here: this test).
  machine.pidfile.parent.mkdir(parents=True)
  machine.pidfile.write_text(f"{os.getpid()}\n")
  result = machine("stop")
  assert result.returncode == 0, result.stderr
  assert "no engine started by this script is running" in result.stderr
  assert not machine.pidfile.exists()  # the stale file goes, the process stays


def test_unknown_argument_is_refused(machine):
  result = machine("restart")
  assert result.returncode == 1
  assert "unknown argument restart" in result.stderr and "stop" in result.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_docker_stop_runs_the_stop_subcommand():
  # Under `make test` the test runs in a sub-make: drop the parent's flags and its
  # "Entering directory" lines.
  env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
  out = subprocess.run(["make", "--no-print-directory", "-n", "docker-stop"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=True, env=env).stdout
  assert out.strip() == "bash infra/bootstrap_docker.sh stop"
