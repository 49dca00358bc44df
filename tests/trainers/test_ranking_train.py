"""The ranking task through the one train loop: learning, selection, resume.

The dataset is written here in the ranking contract (trainers/ranking_features.py)
from a known click model, so the best achievable AUC (that of the true
probabilities) is an independent reference.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trainers import configs, metrics, ranking_features, train

N_DENSE, VOCABS = 3, (12, 30, 7, 50)  # values per categorical feature (ids 2..)


def _write(data_dir: str, seed: int = 0, sizes=(3000, 800, 800)) -> dict[str, np.ndarray]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  w_dense = rng.normal(size=N_DENSE)
  w_cat = [rng.normal(scale=1.0, size=v) for v in VOCABS]
  truth = {}
  for split, n in zip(ranking_features.SPLITS, sizes):
    dense = rng.normal(size=(n, N_DENSE)).astype(np.float32)
    cats = np.stack([rng.integers(0, v, n) for v in VOCABS], axis=1)
    logit = dense @ w_dense + sum(w[c] for w, c in zip(w_cat, cats.T)) - 0.5
    prob = 1 / (1 + np.exp(-logit))
    label = (rng.random(n) < prob).astype(np.float32)
    truth[split] = (prob, label)
    os.makedirs(os.path.join(data_dir, split))
    path = os.path.join(data_dir, split, "part-00000-of-00001.tfrecord.gz")
    with tf.io.TFRecordWriter(path, "GZIP") as f:
      for i in range(n):
        ex = tf.train.Example(features=tf.train.Features(feature={
            "label": tf.train.Feature(float_list=tf.train.FloatList(value=[label[i]])),
            "dense": tf.train.Feature(float_list=tf.train.FloatList(value=dense[i])),
            "dense_missing": tf.train.Feature(float_list=tf.train.FloatList(
                value=[0.0] * N_DENSE)),
            "sparse": tf.train.Feature(int64_list=tf.train.Int64List(
                value=cats[i] + ranking_features.FIRST_ID)),
        }))
        f.write(ex.SerializeToString())
  info = ranking_features.RankingInfo(
      label="label",
      dense=[ranking_features.DenseFeature(f"d{j}", 0.0, 1.0) for j in range(N_DENSE)],
      categorical=[ranking_features.CategoricalFeature(f"c{j}", "hash", v + 2, buckets=v)
                   for j, v in enumerate(VOCABS)],
      counts=dict(zip(ranking_features.SPLITS, sizes)),
      label_rate={s: float(truth[s][1].mean()) for s in truth}, quarantine={}, rows={},
      source={"name": "synthetic-clicks"}, params={})
  info.save(data_dir)
  return truth


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
  data = str(tmp_path_factory.mktemp("clicks"))
  return data, _write(data)


def _config(data, **overrides):
  return configs.get_config("dcnv2", smoke=True, data_dir=data, **{
      "epochs": 4, "batch_size": 256, "learning_rate": 3e-3, "embedding_l2": 0.0,
      "patience": 0, **overrides})


def test_ranking_learns_towards_the_true_click_model(clicks, tmp_path):
  data, truth = clicks
  summary = train.train_and_evaluate(_config(data, epochs=6), str(tmp_path / "w"))
  prob, label = truth["test"]
  bayes = metrics.binary_compute(metrics.binary_state(prob, label))
  assert summary["task"] == "ranking" and summary["selection_metric"] == "valid auc"
  assert summary["test"]["count"] == 800
  # The true probabilities rank best; the model gets close on 3,000 rows.
  assert summary["test"]["auc"] > bayes["auc"] - 0.06, (summary["test"], bayes)
  assert summary["test"]["auc"] > 0.7
  assert summary["examples_per_second"] > 0
  assert summary["label_rate"]["test"] == pytest.approx(label.mean())


def test_ranking_resume_equals_an_uninterrupted_run(clicks, tmp_path):
  """Batch-norm statistics, dropout, Adam state and a decayed learning rate all
  continue: 2 + 2 epochs end where 4 epochs do."""
  data, _ = clicks
  config = _config(data, lr_decay_on_plateau=0.5, selection_metric="logloss")
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  part = str(tmp_path / "part")
  train.train_and_evaluate(config.replace(epochs=2), part)
  resumed = train.train_and_evaluate(config, part)
  for key in ("valid", "test", "selected_epoch", "steps"):
    assert resumed[key] == whole[key], key
  logs = [[json.loads(l) for l in open(os.path.join(d, "log.jsonl"))]
          for d in (str(tmp_path / "whole"), part)]
  assert [e["train_loss"] for e in logs[0]] == [e["train_loss"] for e in logs[1]]
  assert [e.get("learning_rate") for e in logs[0]] == [e.get("learning_rate") for e in logs[1]]
  # Selection on log loss picks the epoch with the lowest validation log loss.
  best = min(logs[0], key=lambda e: e["valid"]["logloss"])
  assert whole["selected_epoch"] == best["epoch"]


def test_learning_rate_decays_after_each_stale_evaluation(clicks, tmp_path):
  data, _ = clicks
  # A large learning rate: validation AUC peaks early, later evaluations are stale.
  config = _config(data, epochs=5, learning_rate=3e-2, lr_decay_on_plateau=0.1,
                   min_learning_rate=1e-4)
  train.train_and_evaluate(config, str(tmp_path / "w"))
  log = [json.loads(l) for l in open(tmp_path / "w" / "log.jsonl")]
  assert sum("learning_rate" in e for e in log) >= 2, log
  rate, best = 3e-2, None
  for e in log:  # the rule, replayed from the logged validation AUCs
    value = e["valid"]["auc"]
    if best is None or value > best:
      best = value
      assert "learning_rate" not in e
    else:
      rate = max(rate * 0.1, 1e-4)
      assert e["learning_rate"] == pytest.approx(rate)
