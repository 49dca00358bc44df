"""Local runs that die, and resuming them (issue 10: run liveness, --resume, --run-id reuse).

* A `recml run` killed with SIGKILL during training used to stay RUNNING forever in
  `recml runs list`; `recml run --resume ID` re-uses the finished steps (preprocess is not
  re-run), continues training from the checkpoints, and ends with the test metrics of an
  uninterrupted training on the same data and config.
* Reusing a `--run-id` used to end in a raw FileExistsError traceback.
* A RUNNING run whose pid died, is a zombie or was reused by another process is FAILED.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipelines import cli
from pipelines import local as local_lib
from pipelines import resume as resume_lib
from tests.reliability import run_drills as drills

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ML100K = os.path.join(REPO, "..", "shared", "datasets", "ml-100k")
# 4 epochs of the smoke model: the kill lands after epoch 1's checkpoint, ~3 s before the end.
OVERRIDES = ["--set", "train.epochs=4"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  for var in ("RECML_PIPELINE_ROOT", "RECML_STORE_URI", "RECML_IMAGE_TAG",
              "RECML_IMAGE_REGISTRY"):
    monkeypatch.delenv(var, raising=False)


def _write_run(root, run_id, **fields):
  run_dir = os.path.join(root, run_id)
  os.makedirs(run_dir)
  local_lib.write_manifest(run_dir, {"run_id": run_id, "target": "local",
                                     "started": "2026-01-01T00:00:00+00:00", **fields})
  return run_dir


# ---------------------------------------------------------------------------
# (1) killed during training -> FAILED -> --resume -> same metrics
# ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(not os.path.isdir(ML100K), reason="needs ../shared/datasets/ml-100k")
def test_killed_run_is_failed_and_resumes_to_the_uninterrupted_metrics(tmp_path, capsys):
  from components import train as train_step  # pylint: disable=g-import-not-at-top
  root, run_id = str(tmp_path / "runs"), "smoke-killed"
  killed = drills.kill_during_training(root, run_id, ML100K, OVERRIDES,
                                       str(tmp_path / "killed.log"))
  assert killed["returncode"] == -signal.SIGKILL
  killed_seconds, pid = killed["seconds"], killed["pid"]

  run_dir = os.path.join(root, run_id)
  record = local_lib.read_manifest(run_dir)
  assert record["status"] == "RUNNING" and record["pid"] == pid  # as the kill left it
  [first] = resume_lib.attempts(run_dir)
  assert not os.path.exists(os.path.join(first, "train", "executor_output.json"))  # mid-train

  # -- the listing sees the dead process ----------------------------------------------
  assert cli.main(["runs", "list", "--pipeline-root", root]) == 0
  listing = capsys.readouterr().out
  assert re.search(rf"{run_id}\s+FAILED \(process {pid} died\)", listing), listing
  assert "RUNNING" not in listing
  assert cli.main(["runs", "show", run_id, "--pipeline-root", root]) == 0
  assert f"FAILED (process {pid} died)" in capsys.readouterr().out

  # -- resume: preprocess reused, train continues from epoch 1 --------------------------
  prep_output = os.path.join(first, "preprocess", "executor_output.json")
  before = (os.stat(prep_output).st_mtime_ns, open(prep_output, "rb").read())
  resumed = drills.resume(root, run_id)
  resume_seconds, text, steps = resumed["seconds"], resumed["output"], resumed["steps"]
  assert resumed["returncode"] == 0, text[-3000:]
  assert steps["preprocess"].startswith("reused"), steps
  assert steps["train"].startswith("ran (continued from the partial model"), steps
  assert steps["evaluate"] == "ran" and steps["write-metrics"] == "ran (never cached)"
  assert "resumed from epoch 1 " in text
  assert (os.stat(prep_output).st_mtime_ns, open(prep_output, "rb").read()) == before

  info = local_lib.lineage(run_dir)
  assert info["run"]["status"] == "SUCCEEDED" and len(info["run"]["attempts"]) == 2
  by_step = {s["step"]: s for s in info["steps"]}
  dataset = by_step["preprocess"]["outputs"]["dataset"]["uri"]
  assert dataset.startswith(first + os.sep)  # the first attempt's output, not a re-run
  assert by_step["train"]["inputs"]["dataset"]["uri"] == dataset
  model_dir = by_step["train"]["outputs"]["model"]["uri"]
  assert not model_dir.startswith(first + os.sep)

  # -- the reference: the same training, uninterrupted, on the same data ---------------
  params = info["run"]["parameters"]
  t2 = time.time()
  reference = train_step.run(dataset, str(tmp_path / "reference"), params["model"],
                             params["train_overrides"])["metrics"]
  reference_seconds = time.time() - t2
  with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
    trained = json.load(f)
  assert trained["epochs_run"] == reference["epochs_run"] == 4
  assert trained["selected_epoch"] == reference["selected_epoch"]
  for split in ("valid", "test"):
    for name, value in reference[split].items():
      assert trained[split][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (split, name)
  evaluated = by_step["evaluate"]["outputs"]["metrics"]["metadata"]
  for name in ("hr@10", "ndcg@10", "mrr"):
    assert evaluated[f"test/{name}"] == pytest.approx(reference["test"][name], rel=1e-5)
  print(f"\nkilled after {killed_seconds:.1f} s, resumed in {resume_seconds:.1f} s "
        f"(train alone, uninterrupted: {reference_seconds:.1f} s)", file=sys.stderr)

  # -- resuming what succeeded does nothing ----------------------------------------------
  assert cli.main(["run", "--resume", run_id, "--pipeline-root", root]) == 0
  assert "already SUCCEEDED" in capsys.readouterr().out
  assert len(resume_lib.attempts(run_dir)) == 2


# ---------------------------------------------------------------------------
# (2) a reused --run-id, and --resume's own errors
# ---------------------------------------------------------------------------


def test_reused_run_id_is_a_clear_error_with_exit_2(tmp_path):
  root = str(tmp_path / "runs")
  _write_run(root, "taken", status="SUCCEEDED")
  done = subprocess.run(
      drills.recml("run", "--config", "ml100k_smoke", "--data", str(tmp_path),
             "--pipeline-root", root, "--run-id", "taken"),
      cwd=REPO, env=drills.clean_env(), capture_output=True, text=True, check=False)
  assert done.returncode == 2, done.stderr
  assert "Traceback" not in done.stderr
  assert done.stderr.strip() == (
      f"error: run id taken already exists under {root} (status SUCCEEDED); "
      "use --resume taken to continue it or pick a new --run-id")
  assert sorted(os.listdir(os.path.join(root, "taken"))) == ["run.json"]  # untouched


def test_resume_errors(tmp_path, capsys):
  root = str(tmp_path / "runs")
  for i in range(3):
    _write_run(root, f"r{i}", status="FAILED", started=f"2026-01-0{i + 1}T00:00:00+00:00")
  assert cli.main(["run", "--resume", "nope", "--pipeline-root", root]) == 2
  err = capsys.readouterr().err
  assert f"no run 'nope' under {root}; recent runs: r2, r1, r0" in err
  assert cli.main(["run", "--resume", "r1", "--target", "vertex", "--pipeline-root", root]) == 2
  assert "--resume continues local runs" in capsys.readouterr().err
  assert cli.main(["run", "--resume", "r1", "--set", "train.epochs=3",
                   "--pipeline-root", root]) == 2
  assert "drop --set" in capsys.readouterr().err
  # A run whose process is alive (this test's) is not resumed.
  _write_run(root, "live", status="RUNNING", **local_lib.process_identity())
  assert cli.main(["run", "--resume", "live", "--pipeline-root", root]) == 2
  assert f"still running (process {os.getpid()}" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# (3) liveness: dead, zombie, reused pids, orphaned step processes
# ---------------------------------------------------------------------------


def test_dead_zombie_and_reused_pids_read_as_failed(tmp_path, capsys):
  root = str(tmp_path / "runs")
  proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE)
  started = local_lib.process_start_time(proc.pid)
  assert started == pytest.approx(time.time(), abs=30)
  run_dir = _write_run(root, "r", status="RUNNING", pid=proc.pid, host=socket.gethostname(),
                       pid_started=started)
  assert local_lib.list_runs(root)[0]["status"] == "RUNNING"

  proc.stdin.close()  # the process exits; until it is reaped it is a zombie
  os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
  shown = local_lib.run_status(local_lib.read_manifest(run_dir), run_dir)
  for listed in (local_lib.list_runs(root)[0], shown):
    assert listed["status"] == "FAILED"
    assert listed["status_detail"] == f"process {proc.pid} died"
  proc.wait()
  assert cli.main(["runs", "list", "--pipeline-root", root]) == 0
  assert f"FAILED (process {proc.pid} died)" in capsys.readouterr().out

  # A live pid that started at another time is another process (the pid was reused).
  me = local_lib.process_start_time(os.getpid())
  assert local_lib.process_alive(os.getpid(), me)
  assert not local_lib.process_alive(os.getpid(), me - 5.0)
  assert not local_lib.process_alive(proc.pid, started)


def test_proc_fallback_agrees_with_psutil(monkeypatch):
  psutil = pytest.importorskip("psutil")
  proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE)
  try:
    expected = psutil.Process(proc.pid).create_time()
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` fails: /proc is read
    assert local_lib.process_start_time(proc.pid) == pytest.approx(expected, abs=0.05)
  finally:
    proc.stdin.close()
    proc.wait()
  assert local_lib.process_start_time(proc.pid) is None


def test_orphaned_step_processes_are_reported_and_block_resume(tmp_path, capsys, monkeypatch):
  root = str(tmp_path / "runs")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  run_dir = _write_run(root, "orphaned", status="RUNNING", pid=int(dead.stdout),
                       host=socket.gethostname(), pid_started=time.time() - 10,
                       config_values={}, parameters={})
  # What a step of the dead run looks like: a KFP executor whose input names the run folder.
  step = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()",
                           "--executor_input", json.dumps({"uri": f"{run_dir}/x/train/model"})],
                          stdin=subprocess.PIPE)
  try:
    deadline = time.time() + 10
    while step.pid not in local_lib.step_processes(run_dir) and time.time() < deadline:
      time.sleep(0.05)
    record = local_lib.list_runs(root)[0]
    assert record["status"] == "FAILED" and record["orphans"] == [step.pid]
    assert cli.main(["run", "--resume", "orphaned", "--pipeline-root", root]) == 2
    assert f"its step processes {step.pid} still run" in capsys.readouterr().err
    with monkeypatch.context() as m:  # the /proc scan finds it too
      m.setitem(sys.modules, "psutil", None)
      assert local_lib.step_processes(run_dir) == [step.pid]
  finally:
    step.stdin.close()
    step.wait()
  assert local_lib.step_processes(run_dir) == []
