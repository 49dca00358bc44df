"""The train loop: learning, smoke presets, resume after a kill, outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from trainers import configs, evaluate, train

METRIC_KEYS = {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"}


def test_loss_falls_and_beats_popularity(cyclic_data, tmp_path):
  cfg = configs.get_config("sasrec", smoke=True, data_dir=cyclic_data, epochs=6,
                           learning_rate=3e-3)
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
  assert [e["epoch"] for e in log] == list(range(1, 7))
  assert log[-1]["train_loss"] < 0.6 * log[0]["train_loss"]
  popular = evaluate.popularity_baseline(cyclic_data, max_len=20, ks=(10, 50, 200))
  assert summary["valid"]["ndcg@10"] > 2 * popular["ndcg@10"]
  # outputs of the contract
  saved = json.load(open(tmp_path / "metrics.json"))
  assert saved == json.loads(json.dumps(summary))
  for key in ("model", "dataset", "selected_epoch", "epochs_run", "seconds_per_epoch",
              "sequences_per_second"):
    assert key in saved
  assert set(saved["valid"]) == set(saved["test"]) == set(saved["best_test"]) == METRIC_KEYS
  assert saved["dataset"] == "cyclic" and saved["epochs_run"] == 6
  assert all(saved["best_test"][k] >= saved["test"][k] for k in METRIC_KEYS)
  assert os.listdir(tmp_path / "tb")
  # the selected checkpoint reproduces the selected epoch's test metrics
  again = evaluate.evaluate(str(tmp_path), split="test")
  assert again == pytest.approx(saved["test"], abs=1e-6)


@pytest.mark.parametrize("name", ["sasrec", "hstu", "hstu-large", "bert4rec", "mamba4rec"])
def test_smoke_presets_train(name, cyclic_data, tmp_path):
  cfg = configs.get_config(name, smoke=True, data_dir=cyclic_data, epochs=1,
                           max_steps_per_epoch=3)
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["steps"] == 3 and np.isfinite(summary["valid"]["mrr"])


def test_early_stopping_on_validation(cyclic_data, tmp_path):
  cfg = configs.get_config("sasrec", smoke=True, data_dir=cyclic_data, epochs=30,
                           learning_rate=0.0 + 1e-9, patience=2)
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["early_stopped"] and summary["epochs_run"] < 30


def test_an_early_stopped_run_continued_with_more_patience_equals_an_uninterrupted_run(
    cyclic_data, tmp_path):
  """patience=1 stops a run whose validation never improves after epoch 2; resumed with
  patience=0 to 5 epochs, it ends with the parameters of a run that never stopped."""
  cfg = lambda **kw: configs.get_config("sasrec", smoke=True, data_dir=cyclic_data,
                                        learning_rate=1e-9, **kw)
  straight = train.train_and_evaluate(cfg(epochs=5, patience=0), str(tmp_path / "straight"))
  stopped = train.train_and_evaluate(cfg(epochs=5, patience=1), str(tmp_path / "cont"))
  assert stopped["early_stopped"] and stopped["epochs_run"] == 2
  again = train.train_and_evaluate(cfg(epochs=5, patience=1), str(tmp_path / "cont"))
  assert again["epochs_run"] == 2  # the same patience: still stopped, nothing trained
  resumed = train.train_and_evaluate(cfg(epochs=5, patience=0), str(tmp_path / "cont"))
  assert not resumed["early_stopped"] and resumed["epochs_run"] == straight["epochs_run"] == 5
  (a, meta_a), (b, meta_b) = (_final_params(str(tmp_path / d)) for d in ("straight", "cont"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [e["epoch"] for e in meta_b["history"]] == [1, 2, 3, 4, 5]


def test_stop_at_ends_after_the_first_evaluation_that_meets_the_target(cyclic_data, tmp_path):
  """A run to 12 epochs without a target is the reference: with ``stop_at`` set to the
  value its log reaches at epoch 4, training ends after that epoch's evaluation."""
  full = train.train_and_evaluate(configs.get_config(
      "sasrec", smoke=True, data_dir=cyclic_data, epochs=12, patience=0), str(tmp_path / "full"))
  log = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
  hr = [e["valid"]["hr@10"] for e in log]
  first = next(i for i, v in enumerate(hr) if v >= hr[3]) + 1  # epoch where it first holds
  assert full["stop_at"] is None and full["epochs_run"] == 12
  summary = train.train_and_evaluate(configs.get_config(
      "sasrec", smoke=True, data_dir=cyclic_data, epochs=12, patience=0,
      stop_at=f"valid/hr@10>={hr[3]}"), str(tmp_path / "target"))
  assert summary["epochs_run"] == summary["target_epoch"] == first <= 4
  assert summary["early_stopped"]
  for bad in ("valid/hr@10>0.2", "hr@10>=0.2", "valid/hr@10>=high"):
    with pytest.raises(ValueError, match="stop_at must read"):
      configs.get_config("sasrec", smoke=True, stop_at=bad)
  with pytest.raises(ValueError, match="no metric 'hr@7'"):
    train.train_and_evaluate(configs.get_config(
        "sasrec", smoke=True, data_dir=cyclic_data, epochs=1, stop_at="valid/hr@7>=0.1"),
        str(tmp_path / "bad"))


def _train_cmd(data, workdir, epochs):
  return [sys.executable, "-m", "pipelines.cli", "train", "--data", data, "--model", "hstu",
          "--workdir", workdir, "--smoke", "--epochs", str(epochs)]


def _final_params(workdir):
  path = os.path.join(workdir, "checkpoints", "latest")
  mngr = ocp.CheckpointManager(path)
  out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return out.state, out.meta


def test_killed_and_resumed_run_equals_uninterrupted(cyclic_data, tmp_path):
  epochs = 6
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  subprocess.run(_train_cmd(cyclic_data, straight, epochs), check=True, capture_output=True)

  proc = subprocess.Popen(_train_cmd(cyclic_data, resumed, epochs),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  latest = os.path.join(resumed, "checkpoints", "latest")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
    if done and int(max(done, key=int)) >= 2:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = int(max((d for d in os.listdir(latest) if d.isdigit()), key=int))
  assert 2 <= killed_at < epochs

  out = subprocess.run(_train_cmd(cyclic_data, resumed, epochs), check=True,
                       capture_output=True, text=True)
  assert "resumed from epoch" in out.stderr

  a_state, a_meta = _final_params(straight)
  b_state, b_meta = _final_params(resumed)
  assert int(a_state["step"]) == int(b_state["step"])
  for (path, x), (_, y) in zip(
      sorted(_flatten(a_state["params"]).items()), sorted(_flatten(b_state["params"]).items())):
    np.testing.assert_array_equal(x, y, err_msg=path)
  assert [e["train_loss"] for e in a_meta["history"]] == [e["train_loss"] for e in b_meta["history"]]
  log = [json.loads(l) for l in open(os.path.join(resumed, "log.jsonl"))]
  assert [e["epoch"] for e in log] == list(range(1, epochs + 1))


@pytest.mark.parametrize("name,overrides", [
    ("bert4rec", {}),                                   # cloze masks from seed and step
    ("mamba4rec", {}),
    ("sasrec", {"loss": "gbce"}),
    ("sasrec", {"in_batch_negatives": 8}),
])
def test_resumed_run_equals_uninterrupted(name, overrides, cyclic_data, tmp_path):
  """Two epochs, then resumed to four from the work directory, equal four straight: the
  masks, negatives and dropout are functions of seed and step, not of the process."""
  cfg = lambda epochs: configs.get_config(name, smoke=True, data_dir=cyclic_data,
                                          epochs=epochs, max_steps_per_epoch=3, **overrides)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(cfg(4), straight)
  train.train_and_evaluate(cfg(2), resumed)
  train.train_and_evaluate(cfg(4), resumed)
  a_state, a_meta = _final_params(straight)
  b_state, b_meta = _final_params(resumed)
  assert int(a_state["step"]) == int(b_state["step"]) == 12
  for (path, x), (_, y) in zip(
      sorted(_flatten(a_state["params"]).items()), sorted(_flatten(b_state["params"]).items())):
    np.testing.assert_array_equal(x, y, err_msg=path)
  losses = [e["train_loss"] for e in a_meta["history"]]
  assert losses == [e["train_loss"] for e in b_meta["history"]]
  assert len(set(losses)) == 4 and all(np.isfinite(losses))


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def test_missing_data_dir_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="--data"):
    train.train_and_evaluate(configs.get_config("sasrec", smoke=True), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="recml preprocess"):
    train.train_and_evaluate(configs.get_config("sasrec", smoke=True, data_dir=str(tmp_path)),
                             str(tmp_path / "w"))


def test_second_run_reads_every_compiled_step_from_the_compile_cache(cyclic_data, tmp_path):
  """`recml train --compile-cache DIR`: the first run writes its executables there; a
  second run of the same config compiles nothing new (no entry added) and ends with the
  same metrics. `--no-compile-cache` writes none, not even under the default root."""
  cache = str(tmp_path / "cache")
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
  metrics = []
  for run in ("a", "b"):
    out = subprocess.run(_train_cmd(cyclic_data, str(tmp_path / run), 2)
                         + ["--compile-cache", cache], check=True, capture_output=True,
                         text=True, env=env)
    entries = sorted(os.listdir(cache))
    if run == "a":
      first = entries
      assert "compile cache: " + cache + " (0 executables)" in out.stderr
      assert len(first) >= 2  # the train step and the evaluation, at least
    else:
      assert f"compile cache: {cache} ({len(first)} executables)" in out.stderr
      assert entries == first
    with open(os.path.join(tmp_path, run, "metrics.json")) as f:
      metrics.append(json.load(f))
  assert metrics[0]["test"] == metrics[1]["test"]
  subprocess.run(_train_cmd(cyclic_data, str(tmp_path / "c"), 1) + ["--no-compile-cache"],
                 check=True, capture_output=True, env=env)
  assert not os.path.exists(tmp_path / "xdg")
