"""Training work directories (issue 10): resuming, checkpoint records, int64 times.

* ``config.json`` was overwritten before the restore, so a resume with another
  hyper-parameter (``--set learning_rate=0.05``) silently continued checkpoints
  trained under the old one. Now it is refused before anything is written, naming
  each field with its old and new value; raising ``epochs`` alone continues the run
  and ends where an uninterrupted run of that many epochs ends.
* ``save_latest`` handed Orbax the live ``meta`` dict, serialised in the background
  while the loop changed it.
* ``metrics.json``, the best checkpoint and the latest checkpoint's record could name
  different epochs (a best save cut short by a kill); loading now checks them and a
  resumed run repairs the one state a kill can leave.
* Timestamps were cast to int32 in the input pipeline: large ones wrapped, and HSTU's
  time bias was wrong for gaps of 2**31 units or more.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from tests.trainers.conftest import write_cyclic_dataset
from trainers import checkpoints, configs, evaluate, features, models, train
from trainers.input_pipeline import SequenceData, model_batch
from trainers.models import hstu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS = 4


def _config(data, epochs, **over):
  return configs.get_config("hstu", smoke=True, data_dir=data, epochs=epochs, **over)


def _tree(workdir):
  """Every file of a work directory with its bytes (what 'nothing written' compares)."""
  out = {}
  for d, _, names in os.walk(workdir):
    for n in names:
      path = os.path.join(d, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def _latest(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  mngr.close()
  return out.state, out.meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 4-epoch run, and a 2-epoch run (kept) then continued to 4."""
  root = tmp_path_factory.mktemp("runs")
  data = write_cyclic_dataset(root / "data")
  straight, resumed, two = (str(root / n) for n in ("straight", "resumed", "two"))
  train.train_and_evaluate(_config(data, EPOCHS), straight)
  train.train_and_evaluate(_config(data, 2), resumed)
  shutil.copytree(resumed, two)
  train.train_and_evaluate(_config(data, EPOCHS), resumed)
  return {"data": data, "straight": straight, "resumed": resumed, "two": two}


# ---------------------------------------------------------------------------
# (1) a resume with another config is refused before anything is written
# ---------------------------------------------------------------------------


def test_resume_with_another_learning_rate_is_refused_and_writes_nothing(runs, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(runs["two"], workdir)
  before = _tree(workdir)
  with pytest.raises(checkpoints.WorkdirConflict) as err:
    train.train_and_evaluate(_config(runs["data"], 2, learning_rate=0.05), workdir)
  message = str(err.value)
  assert "learning_rate: 0.001 in config.json, 0.05 now" in message
  assert "finished run (2 of 2 epochs)" in message
  assert "new --workdir" in message and "larger --epochs" in message
  assert _tree(workdir) == before  # config.json byte-identical, no file touched

  # a different model, and a model field: each named, old and new
  with pytest.raises(checkpoints.WorkdirConflict, match="model: 'hstu' in config.json, "
                                                        "'sasrec' now"):
    train.train_and_evaluate(
        configs.get_config("sasrec", smoke=True, data_dir=runs["data"], epochs=2), workdir)
  with pytest.raises(checkpoints.WorkdirConflict, match=r"model\.num_blocks: 1 .*, 2 now"):
    train.train_and_evaluate(_config(runs["data"], 2, num_blocks=2), workdir)
  # fewer epochs than were run
  with pytest.raises(checkpoints.WorkdirConflict, match="pass --epochs 2 or more"):
    train.train_and_evaluate(_config(runs["data"], 1), workdir)
  assert _tree(workdir) == before


def test_cli_set_on_a_finished_run_exits_2_and_says_what_to_do(runs, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(runs["two"], workdir)
  before = _tree(workdir)
  out = subprocess.run(
      [sys.executable, "-m", "pipelines.cli", "train", "--data", runs["data"], "--model",
       "hstu", "--smoke", "--workdir", workdir, "--epochs", "2",
       "--set", "learning_rate=0.05"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "recml train:" in out.stderr and "learning_rate: 0.001 in config.json, 0.05 now" \
      in out.stderr
  assert "new --workdir" in out.stderr
  assert _tree(workdir) == before


def _at_epoch_1(workdir, cfg):
  """A work directory holding ``cfg``'s config and a real checkpoint of epoch 1."""
  checkpoints.save_config(workdir, cfg.to_json())
  ckpt = checkpoints.Checkpoints(workdir, async_save=False)
  ckpt.save_latest(1, {"w": jnp.zeros(3)}, {"epoch": 1, "history": [], "best": None,
                                            "stale_evals": 0, "stopped": False})
  ckpt.close()


def test_interrupted_run_is_resumed_only_with_its_own_config(tmp_path):
  """A work directory at epoch 1 of 3 (a real checkpoint): the refusal says how to resume."""
  cfg = _config(str(tmp_path / "data"), 3)
  workdir = str(tmp_path / "w")
  _at_epoch_1(workdir, cfg)
  assert checkpoints.check_resume(workdir, cfg.replace(epochs=5))["epoch"] == 1
  with pytest.raises(checkpoints.WorkdirConflict) as err:
    checkpoints.check_resume(workdir, cfg.replace(seed=7, batch_size=16))
  message = str(err.value)
  assert "interrupted after epoch 1 of 3" in message
  assert "batch_size: 32 in config.json, 16 now" in message and "seed: 42" in message
  assert "to resume it (only --epochs may change)" in message


def test_resume_ignores_a_folder_spelled_two_ways_and_fields_the_loss_never_reads(
    tmp_path, monkeypatch):
  """Full softmax draws no negatives, so a changed negative-sampling default does not
  block resuming a softmax run; the data folder given relative or absolute is one folder.
  A sampled-softmax run is still refused on its negatives."""
  (tmp_path / "data").mkdir()
  monkeypatch.chdir(tmp_path)
  cfg = _config("data", 3).replace(loss="softmax", negative_sharing="group")
  workdir = str(tmp_path / "w")
  _at_epoch_1(workdir, cfg)
  now = cfg.replace(data_dir=str(tmp_path / "data"), negative_sharing="column",
                    num_negatives=512, epochs=5)
  assert checkpoints.check_resume(workdir, now)["epoch"] == 1
  with pytest.raises(checkpoints.WorkdirConflict, match="data_dir: 'data' in config.json"):
    checkpoints.check_resume(workdir, now.replace(data_dir=str(tmp_path)))
  with pytest.raises(checkpoints.WorkdirConflict, match="loss: 'softmax' in config.json"):
    checkpoints.check_resume(workdir, now.replace(loss="sampled_softmax"))
  sampled = str(tmp_path / "s")
  _at_epoch_1(sampled, cfg.replace(loss="sampled_softmax"))
  with pytest.raises(checkpoints.WorkdirConflict,
                     match="negative_sharing: 'group' in config.json, 'column' now"):
    checkpoints.check_resume(sampled, now.replace(loss="sampled_softmax"))


# ---------------------------------------------------------------------------
# (2) raising epochs continues the run: the uninterrupted run's params and metrics
# ---------------------------------------------------------------------------


def test_raising_epochs_continues_to_the_uninterrupted_result(runs):
  a_state, a_meta = _latest(runs["straight"])
  b_state, b_meta = _latest(runs["resumed"])
  assert int(a_state["step"]) == int(b_state["step"]) > 0
  for x, y in zip(jax.tree.leaves(a_state["params"]), jax.tree.leaves(b_state["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [e["train_loss"] for e in a_meta["history"]] == [e["train_loss"] for e in b_meta["history"]]
  a, b = (json.load(open(os.path.join(runs[k], "metrics.json"))) for k in ("straight", "resumed"))
  for key in ("selected_epoch", "valid", "test", "best_test", "best_test_epoch", "epochs_run",
              "steps"):
    assert a[key] == b[key], key
  assert b["epochs_run"] == EPOCHS
  # config.json records the new epochs: the same bytes as the uninterrupted run's
  assert open(os.path.join(runs["resumed"], "config.json")).read() == \
      open(os.path.join(runs["straight"], "config.json")).read()


# ---------------------------------------------------------------------------
# (3) the metadata handed to an async save is a snapshot
# ---------------------------------------------------------------------------


def test_saved_meta_is_the_value_at_save_time(tmp_path):
  ckpt = checkpoints.Checkpoints(str(tmp_path))
  meta = {"epoch": 1, "history": [{"epoch": 1, "train_loss": 2.5}], "best": None}
  want = json.loads(json.dumps(meta))
  big = {"w": jnp.ones(4_000_000)}  # a save long enough for the loop to move on
  ckpt.save_latest(1, big, meta)
  meta["epoch"] = 2                                       # what the loop does next
  meta["history"].append({"epoch": 2, "train_loss": 1.0})
  meta["history"][0]["train_loss"] = -1.0
  best = {"epoch": 1, "valid": {"mrr": 0.5}}
  ckpt.save_best(1, big, best)
  best["valid"]["mrr"] = 0.0
  ckpt.wait()
  ckpt.close()
  assert checkpoints.latest_meta(str(tmp_path)) == want
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints" / "best"))
  saved = mngr.restore(1, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  assert saved == {"epoch": 1, "valid": {"mrr": 0.5}}


# ---------------------------------------------------------------------------
# (4) metrics.json, the best checkpoint and the run record name the same epoch
# ---------------------------------------------------------------------------


def _best_step(workdir):
  return ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "best")).latest_step()


def test_selected_epoch_is_the_same_everywhere_and_a_mismatch_is_caught(runs, tmp_path):
  for name in ("straight", "resumed"):
    workdir = runs[name]
    selected = json.load(open(os.path.join(workdir, "metrics.json")))["selected_epoch"]
    _, _, _, meta = evaluate.load_model(workdir)
    assert selected == meta["epoch"] == _best_step(workdir) == \
        checkpoints.latest_meta(workdir)["best"]["epoch"]

  tampered = str(tmp_path / "tampered")
  shutil.copytree(runs["straight"], tampered)
  path = os.path.join(tampered, "metrics.json")
  metrics = json.load(open(path))
  selected = metrics["selected_epoch"]
  metrics["selected_epoch"] = selected - 1
  json.dump(metrics, open(path, "w"))
  with pytest.raises(checkpoints.WorkdirConflict,
                     match=rf"checkpoints/best step \({selected}\).*metrics.json "
                           rf"\({selected - 1}\)"):
    evaluate.load_model(tampered)


def test_best_save_cut_short_is_repaired_on_resume(runs, tmp_path):
  """A kill after the latest save and before the best save of the selected epoch: the
  best checkpoint is missing that epoch. Re-running the same command re-writes it."""
  workdir = str(tmp_path / "w")
  shutil.copytree(runs["straight"], workdir)
  selected = json.load(open(os.path.join(workdir, "metrics.json")))["selected_epoch"]
  assert selected == EPOCHS  # the last epoch: its params are the latest state's
  shutil.rmtree(os.path.join(workdir, "checkpoints", "best", str(selected)))
  with pytest.raises((checkpoints.WorkdirConflict, FileNotFoundError)):
    evaluate.load_model(workdir)

  summary = train.train_and_evaluate(_config(runs["data"], EPOCHS), workdir)
  assert summary["selected_epoch"] == selected == _best_step(workdir)
  # the repaired checkpoint reproduces the selected epoch's test metrics
  again = evaluate.evaluate(workdir, split="test")
  assert again == pytest.approx(summary["test"], abs=1e-6)


# ---------------------------------------------------------------------------
# (5) timestamps are int64 end to end; HSTU's time bias depends on gaps only
# ---------------------------------------------------------------------------

MAX_LEN, VOCAB = 8, 20
SECONDS_2030 = 1_893_456_000


def _events(base, scale, seed=0):
  """Users with gaps from a second to years (times ``scale`` units)."""
  rng = np.random.default_rng(seed)
  events = {}
  for u in range(12):
    n = int(rng.integers(3, 2 * MAX_LEN))
    gaps = rng.choice([1, 60, 3_600, 86_400, 10**7, 10**8], n) * rng.integers(1, 9, n)
    ts = base + scale * np.cumsum(gaps)
    events[u] = ([int(x) for x in rng.integers(2, VOCAB, n)], [int(t) for t in ts])
  return events


def _reference_bias(cfg, params, times, query_times):
  """rab in numpy: int64 gaps, float64 log (the model's formula, no 32-bit arithmetic)."""
  w = params["relative_bias"]
  length = times.shape[1]
  offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
  pos = np.asarray(w["position_weights"])[offsets + cfg.max_len - 1]
  gaps = np.abs(query_times[:, :, None].astype(np.int64) - times[:, None, :].astype(np.int64))
  buckets = np.clip(np.floor(np.log(np.maximum(gaps, 1).astype(np.float64))
                             / cfg.time_bucket_divisor), 0, cfg.num_time_buckets)
  return pos[None] + np.asarray(w["time_weights"])[buckets.astype(np.int64)]


def test_time_gaps_are_exact_for_any_int64_times():
  rng = np.random.default_rng(0)
  for low, high in [(0, 2**31), (10**12, 2 * 10**12), (-2**50, 2**50), (2**62, 2**62 + 2**54)]:
    t = np.sort(rng.integers(low, high, (4, 16), dtype=np.int64), axis=1)
    q = t + rng.integers(0, 2**40, t.shape)
    words = model_batch({"timestamps": t, "query_timestamps": q})
    got = np.asarray(jax.jit(hstu.time_gaps)(words["query_timestamps"], words["timestamps"]))
    exact = (q[:, :, None] - t[:, None, :]).astype(np.float64)
    # float32 rounding of the gap itself (one rounding below 2**48, two above)
    np.testing.assert_allclose(got, exact, rtol=2**-23, atol=0)


def test_int64_times_reach_the_model_and_only_gaps_matter(tmp_path):
  variants = {"2030 s": (SECONDS_2030, 1), "2030 s + 1e12": (SECONDS_2030 + 10**12, 1),
              "2030 us": (SECONDS_2030 * 10**6, 10**6)}
  cfg = configs.get_config("hstu", smoke=True, vocab_size=VOCAB, max_len=MAX_LEN).model_config
  model = models.build("hstu", cfg)
  dummy = jnp.zeros((1, MAX_LEN), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), dummy, dummy, dummy)["params"])
  rng = np.random.default_rng(1)  # a time bias large enough to move the scores
  params["relative_bias"]["time_weights"] = jnp.asarray(
      rng.normal(size=params["relative_bias"]["time_weights"].shape), jnp.float32)
  score = jax.jit(evaluate.make_score_fn(model))
  bias = jax.jit(lambda p, t, q: model.apply(
      {"params": p}, t, q, MAX_LEN, method=lambda m, t, q, n: m.relative_bias(t, q, n)))

  scores = {}
  for name, (base, scale) in variants.items():
    events = _events(base, scale)
    data = str(tmp_path / name.replace(" ", "_"))
    features.write_sequence_dataset(data, events, item_vocab_size=VOCAB, max_len=MAX_LEN)
    batch = next(SequenceData(data, features.VALID, 16, MAX_LEN).batches())
    assert batch["timestamps"].dtype == batch["query_timestamps"].dtype == np.int64
    # the batch holds the written int64 times (the validation query: the target's time)
    for row, user in enumerate(sorted(events)):
      _, ts = events[user]
      n = min(len(ts) - 2, MAX_LEN)
      np.testing.assert_array_equal(batch["timestamps"][row, MAX_LEN - n:], ts[-2 - n:-2])
      assert batch["query_timestamps"][row, -1] == ts[-2]

    words = model_batch(batch)
    got = np.asarray(bias(params, words["timestamps"], words["query_timestamps"]))
    want = _reference_bias(cfg, params, batch["timestamps"], batch["query_timestamps"])
    valid = batch["history"] != features.PAD_ID
    attended = valid[:, :, None] & valid[:, None, :] & np.tril(np.ones((MAX_LEN,) * 2, bool))
    np.testing.assert_allclose(got[attended], want[attended], rtol=0, atol=1e-6)
    scores[name] = np.asarray(score(params, words))[valid.any(1)]

  np.testing.assert_array_equal(scores["2030 s"], scores["2030 s + 1e12"])
  assert np.abs(scores["2030 s"] - scores["2030 us"]).max() > 1e-3  # the unit matters
