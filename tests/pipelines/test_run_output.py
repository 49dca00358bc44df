"""What `recml run` prints: one line per step, full logs per step, a summary at the end.

The integration test runs the smoke config as a person would (``recml run`` in a
subprocess, output to a pipe) and checks the output against its budget and against the
run's own records and the raw data; the unit tests drive the console and its parsers with
real streams, the trainer's real epoch line and kfp.local's real warning.
"""

import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

from pipelines import cli
from pipelines import local as local_lib
from pipelines import resume as resume_lib
from pipelines import run_output

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ML100K = os.path.join(REPO, "..", "shared", "datasets", "ml-100k")
STEPS = ("fingerprint", "preprocess", "train", "evaluate", "write-metrics", "validate",
         "bless", "export", "deploy")
LINE_BUDGET = 60
NOISE = ("warning", "traceback", "illegal", "cuinit", "prism", "non-python base image",
         "unable to initialize backend")


# ---------------------------------------------------------------------------
# The smoke run, end to end
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """``recml run`` of ml100k_smoke (one epoch) in a subprocess: its output and run folder."""
  if not os.path.isdir(ML100K):
    pytest.skip("needs ../shared/datasets/ml-100k")
  root = str(tmp_path_factory.mktemp("quiet") / "runs")
  env = {k: v for k, v in os.environ.items()
         if k not in ("RECML_PIPELINE_ROOT", "RECML_STORE_URI", "RECML_REGISTRY",
                      "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  done = subprocess.run(
      [sys.executable, "-m", "pipelines.cli", "run", "--config", "ml100k_smoke",
       "--data", ML100K, "--pipeline-root", root, "--run-id", "quiet",
       "--set", "train.epochs=1"],
      cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=900)
  return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
          "root": root, "run_dir": os.path.join(root, "quiet")}


@pytest.mark.integration
def test_smoke_run_prints_one_line_per_step_and_a_summary(smoke_run):
  out, err = smoke_run["stdout"], smoke_run["stderr"]
  assert smoke_run["returncode"] == 0, (out + err)[-3000:]
  lines = (out + err).splitlines()
  assert len(lines) <= LINE_BUDGET, "\n".join(lines)
  assert err == ""
  for word in NOISE:
    assert word not in (out + err).lower(), word
  assert lines[0].startswith("run id: quiet")

  # One "done" line per step, in the DAG's order, with its wall time.
  done = [re.match(r"^\d\d:\d\d:\d\d ([\w-]+) +done +(\S+)", line) for line in lines]
  assert [m.group(1) for m in done if m] == list(STEPS)
  record = local_lib.read_manifest(smoke_run["run_dir"])
  for m in filter(None, done):
    assert m.group(2) == run_output.duration(record["steps"][m.group(1)]["seconds"])

  # The numbers on those lines against the raw data (u.data: user, item, rating, time).
  with open(os.path.join(ML100K, "u.data"), encoding="utf-8") as f:
    rows = [line.split("\t") for line in f if line.strip()]
  users, items = len({r[0] for r in rows}), len({r[1] for r in rows})
  assert (f"{len(rows):,} rows read: {len(rows):,} kept, 0 quarantined; "
          f"{users:,} users, {items:,} items") in out
  train = next(line for line in lines if re.search(r" train +done ", line))
  assert "1 epoch, best 1: valid ndcg@10 " in train
  assert re.search(r" train +epoch 1/1  loss \d+\.\d{4}  [\d,]+ sequences/s  valid ndcg@10 ",
                   out)

  # The summary: status, headline metrics (as recorded, 4 significant digits), gate,
  # deployment, the report and the logs.
  info = local_lib.lineage(smoke_run["run_dir"])
  head = local_lib.headline(info)
  assert f"run quiet: SUCCEEDED in " in out
  for split in ("test", "valid"):
    line = next(l for l in lines if l.startswith(f"  {split} "))
    for name in ("hr@10", "ndcg@10", "mrr"):  # a retrieval run's headline metrics
      assert f"{name} {head[f'{split}/{name}']:.4g}" in line, (name, line)
  assert f"gate: blessed ({head['gate']})" in out
  deployed = json.load(open(os.path.join(smoke_run["root"], "registry", "current.json")))
  assert f"deployed: version {deployed['version']} ({deployed['path']})" in out
  report = re.search(r"^report: (.+)$", out, re.M).group(1)
  assert report == os.path.join(smoke_run["run_dir"], "report.html") and os.path.isfile(report)
  assert f"logs: {os.path.join(smoke_run['run_dir'], 'logs')}{os.sep}" in out


@pytest.mark.integration
def test_smoke_run_logs_every_step_and_records_its_timings(smoke_run):
  assert smoke_run["returncode"] == 0
  logs = os.path.join(smoke_run["run_dir"], "logs")
  assert sorted(os.listdir(logs)) == sorted([f"{s}.log" for s in STEPS] + ["run.log"])
  [attempt] = resume_lib.attempts(smoke_run["run_dir"])  # logs/ is not an attempt
  assert attempt == local_lib.pipeline_folder(smoke_run["run_dir"])
  train_log = open(os.path.join(logs, "train.log"), encoding="utf-8").read()
  assert "Got executor_input" in train_log  # what the terminal no longer shows
  assert re.search(r"^ *epoch +1/1  loss ", train_log, re.M)
  everything = "".join(open(os.path.join(logs, n), encoding="utf-8").read()
                       for n in os.listdir(logs)).lower()
  for word in ("illegal", "cuinit", "prism", "non-python base image",
               "unable to initialize backend", "have no effect in the current local runner"):
    assert word not in everything, word

  record = local_lib.read_manifest(smoke_run["run_dir"])
  steps = record["steps"]
  assert list(steps) == list(STEPS)
  assert all(s["state"] == "done" and s["how"] == "ran" and s["seconds"] > 0 for s in
             steps.values())
  started = [s["started"] for s in steps.values()]
  assert started == sorted(started) and started[0] >= record["started"]
  wall = (datetime.datetime.fromisoformat(record["finished"])
          - datetime.datetime.fromisoformat(record["started"])).total_seconds()
  assert sum(s["seconds"] for s in steps.values()) <= wall + 2
  dataset = next(s for s in local_lib.lineage(smoke_run["run_dir"])["steps"]
                 if s["step"] == "preprocess")["outputs"]["dataset"]["metadata"]
  assert steps["preprocess"]["summary"] == {
      "rows_read": dataset["rows/rows_read"], "rows_kept": dataset["rows/rows_kept"],
      "rows_quarantined": 0, "users": dataset["num_users"], "items": dataset["num_items"],
      "dataset_id": dataset["dataset_id"]}
  assert steps["validate"]["summary"]["decision"] == "blessed"
  assert steps["deploy"]["summary"]["version"] == "0001"


@pytest.mark.integration
def test_runs_show_rounds_numbers_and_prints_the_config_on_request(smoke_run, capsys):
  assert smoke_run["returncode"] == 0
  assert cli.main(["runs", "show", "quiet", "--pipeline-root", smoke_run["root"]]) == 0
  shown = capsys.readouterr().out
  assert not re.search(r"\d\.\d{6,}", shown), "a number with more than 4 significant digits"
  assert re.search(r"^train: done  [\d.]+s$", shown, re.M)
  assert "hyperparameters = (" in shown and "--config prints them" in shown
  report = re.search(r"^report: (.+)$", shown, re.M).group(1)
  assert report.endswith(".html") and os.path.isfile(report)

  assert cli.main(["runs", "show", "quiet", "--config", "--pipeline-root",
                   smoke_run["root"]]) == 0
  full = capsys.readouterr().out
  config = local_lib.read_manifest(smoke_run["run_dir"])["config_values"]
  assert f"    epochs: {config['train']['epochs']}" in full
  assert "hyperparameters.learning_rate = 0.005" in full
  assert "hyperparameters.model.embedding_dim = 32" in full


# ---------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------


def _console(tmp_path, **kw):
  record, saved = {}, []
  term = io.StringIO()
  console = run_output.Console(str(tmp_path), record, lambda: saved.append(
      json.loads(json.dumps(record))), stream=term, **kw)
  return console, record, saved, term


def test_console_sends_a_step_to_its_log_and_prints_two_lines(tmp_path):
  console, record, saved, term = _console(tmp_path)
  with console.watch("deploy") as done:
    print("    lots of output", flush=True)
    print("warning from the step", file=sys.stderr)
    console.how("deploy", "ran")
    done({"deployment": {"metadata": {"version": "0007", "path": "/r/0007"}}}, True)
  lines = term.getvalue().splitlines()
  assert len(lines) == 2 and lines[0].endswith("deploy        running")
  assert re.search(r"deploy        done +\d+\.\ds  version 0007$", lines[1])
  log = (tmp_path / "logs" / "deploy.log").read_text()
  assert log == "    lots of output\nwarning from the step\n"
  entry = record["steps"]["deploy"]
  assert entry["state"] == "done" and entry["how"] == "ran" and entry["log"] == "logs/deploy.log"
  assert entry["summary"] == {"version": "0007", "path": "/r/0007"}
  assert [s["steps"]["deploy"]["state"] for s in saved] == ["running", "done"]


def test_console_verbose_streams_and_failure_shows_the_logs_tail(tmp_path):
  console, record, _, term = _console(tmp_path, verbose=True)
  with console.watch("fingerprint") as done:
    print("streamed")
    done({}, True)
  assert "streamed\n" in term.getvalue()

  console, record, _, term = _console(tmp_path / "quiet")
  with pytest.raises(RuntimeError):
    with console.watch("train"):
      print("Traceback (most recent call last):\nValueError: bad setting 'x'")
      raise RuntimeError("Task \x1b[96m'train'\x1b[0m finished with status FAILURE")
  text = term.getvalue()
  assert "train         FAILED after" in text and "    ValueError: bad setting 'x'" in text
  assert record["steps"]["train"]["state"] == "failed"
  assert record["steps"]["train"]["error"] == "ValueError: bad setting 'x'"  # from its log


def test_resumed_runs_print_how_each_step_was_done(tmp_path):
  """The lines tests/reliability/run_drills.py reads: ``step <task>: <how>``."""
  console, _, _, term = _console(tmp_path, resume=True)
  with console.watch("preprocess") as done:
    console.how("preprocess", "reused (recml-pipeline-1/preprocess)")
    done({}, True)
  assert "\nstep preprocess: reused (recml-pipeline-1/preprocess)\n" in "\n" + term.getvalue()
  assert "preprocess    reused" in term.getvalue()


def _epoch_line(workdir, epoch, total, valid=None):
  """The trainer's own line (trainers/train.py _log_epoch), from its code."""
  from trainers import train  # pylint: disable=g-import-not-at-top

  class Board:
    def add_scalar(self, *a):
      pass

    def flush(self):
      pass

  entry = {"epoch": epoch, "step": epoch, "train_loss": 5.5, "epoch_seconds": 2.0,
           "sequences_per_second": 1234.0}
  if valid is not None:
    entry.update(valid={"ndcg@10": valid}, test={"ndcg@10": valid})
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train._log_epoch(entry, "ndcg@10", Board(), workdir,  # pylint: disable=protected-access
                     epochs=total)
  return out.getvalue()


def test_training_progress_from_the_trainers_epoch_lines(tmp_path):
  console, _, _, term = _console(tmp_path)
  with console.watch("train") as done:
    for epoch in range(1, 61):
      print("    " + _epoch_line(str(tmp_path), epoch, 60,
                              0.1 + epoch / 1000 if epoch % 5 == 0 else None),
            end="")
    done({}, True)
  progress = [l for l in term.getvalue().splitlines() if " epoch " in l]
  # Not a terminal: the first epoch and every 12th (60 / PROGRESS_LINES), nothing else.
  assert [int(re.search(r"epoch (\d+)/60", l).group(1)) for l in progress] == [
      1, 12, 24, 36, 48, 60]
  assert "loss 5.5000  1,234 sequences/s" in progress[1]
  assert progress[1].endswith("valid ndcg@10 0.1100 (epoch 10)  eta " +
                              progress[1].rsplit("eta ", 1)[1])
  assert "valid ndcg@10 0.1600" in progress[-1] and "eta" not in progress[-1]


def test_step_environment_and_the_kfp_warning():
  from kfp.local import subprocess_task_handler  # pylint: disable=g-import-not-at-top
  env = run_output.step_environment("local-docker", environ={})
  assert env == {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  assert run_output.step_environment("local-docker", environ={"JAX_PLATFORMS": "cuda"})[
      "JAX_PLATFORMS"] == "cuda"
  handler = subprocess_task_handler.SubprocessTaskHandler.__new__(
      subprocess_task_handler.SubprocessTaskHandler)
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with run_output.quiet_warnings():
      handler.validate_image("recml-trainer:0.1.0")
      warnings.warn("another warning", RuntimeWarning)
    handler.validate_image("recml-trainer:0.1.0")
  assert [str(w.message)[:21] for w in seen] == ["another warning", "You may be attemping "]


def test_numbers_are_read_as_people_read_them():
  assert [run_output.number(v) for v in (943.0, 100000, 0.05179883162012029, 4.3398, 0.0,
                                         12345.67, "0001")] == [
      "943", "100,000", "0.0518", "4.34", "0", "12,346", "0001"]
