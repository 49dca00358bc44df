"""Exact binary (CTR) metrics against brute-force numpy references."""

import numpy as np
import pytest

from trainers import metrics


def brute_force_auc(scores, labels, weights):
  """Every (positive, negative) pair, weighted by w+ * w-: 1 if ordered, 1/2 if tied."""
  num = den = 0.0
  for i in np.flatnonzero(labels == 1):
    for j in np.flatnonzero(labels == 0):
      pair = weights[i] * weights[j]
      num += pair * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
      den += pair
  return num / den


def sample(n, levels, seed):
  """Logits on ``levels`` distinct values (many ties), labels correlated with them,
  weights in {0 (padding), 0.5, 1, 3}."""
  rng = np.random.default_rng(seed)
  logits = rng.integers(-levels // 2, levels // 2 + 1, n).astype(np.float32) / 2
  labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-np.clip(logits, -30, 30)))).astype(np.float32)
  weights = rng.choice(np.array([0.0, 0.5, 1.0, 3.0], np.float32), n)
  return logits, labels, weights


@pytest.mark.parametrize("levels", [2, 5, 40, 10_000])
def test_auc_equals_brute_force_pairs_with_ties_and_weights(levels):
  logits, labels, weights = sample(400, levels, seed=levels)
  got = metrics.binary_compute(metrics.binary_state(logits, labels, weights, logits=True))
  assert got["auc"] == pytest.approx(brute_force_auc(logits, labels, weights), abs=1e-12)
  # Probabilities that keep the order and the ties of the scores: the same AUC.
  probs = 1 / (1 + np.exp(-logits.astype(np.float64) / 5000))
  assert metrics.binary_compute(metrics.binary_state(probs, labels, weights))["auc"] == \
      pytest.approx(got["auc"], abs=1e-12)


def test_auc_unweighted_and_extremes():
  labels = np.array([1, 0, 1, 0, 1, 0], np.float32)
  perfect = np.array([3, 1, 2, 0, 5, -1], np.float32)
  assert metrics.weighted_auc(perfect, labels, np.ones(6)) == 1.0
  assert metrics.weighted_auc(-perfect, labels, np.ones(6)) == 0.0
  assert metrics.weighted_auc(np.zeros(6), labels, np.ones(6)) == 0.5  # all tied
  assert np.isnan(metrics.weighted_auc(perfect, np.ones(6), np.ones(6)))  # one class


def test_merged_in_chunks_equals_whole():
  logits, labels, weights = sample(1000, 30, seed=1)
  whole = metrics.binary_compute(metrics.binary_state(logits, labels, weights, logits=True))
  state = {}
  for lo, hi in ((0, 1), (1, 333), (333, 334), (334, 1000)):  # uneven chunks, "devices"
    state = metrics.binary_merge(state, metrics.binary_state(
        logits[lo:hi], labels[lo:hi], weights[lo:hi], logits=True))
  assert metrics.binary_compute(state) == whole


def test_logloss_ne_calibration_accuracy_equal_numpy():
  logits, labels, weights = sample(500, 10_000, seed=3)
  logits = logits / 500  # in [-5, 5], few ties
  z, y, w = (a.astype(np.float64) for a in (logits, labels, weights))
  p = 1 / (1 + np.exp(-z))
  rate = np.sum(w * y) / np.sum(w)
  logloss = np.sum(w * -(y * np.log(p) + (1 - y) * np.log(1 - p))) / np.sum(w)
  entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
  want = {"logloss": logloss, "ne": logloss / entropy,
          "calibration": np.sum(w * p) / np.sum(w) / rate, "label_rate": rate,
          "accuracy": np.sum(w * ((p >= 0.5) == (y == 1))) / np.sum(w), "count": np.sum(w)}
  for kind, preds in (("logits", logits), ("probs", p.astype(np.float32))):
    got = metrics.binary_compute(metrics.binary_state(preds, labels, weights,
                                                      logits=kind == "logits"))
    for key, value in want.items():
      assert got[key] == pytest.approx(value, rel=1e-6), (kind, key)
  # A constant predictor at the label rate has NE 1 and calibration 1.
  const = np.full(500, np.log(rate / (1 - rate)), np.float32)
  got = metrics.binary_compute(metrics.binary_state(const, labels, weights, logits=True))
  assert got["ne"] == pytest.approx(1.0, rel=1e-6)
  assert got["calibration"] == pytest.approx(1.0, rel=1e-6)


def test_extreme_logits_are_exact_and_padding_rows_count_for_nothing():
  logits = np.array([40.0, -40.0, 30.0, np.inf, np.nan], np.float32)
  labels = np.array([1, 0, 0, 0, 1], np.float32)
  weights = np.array([1, 1, 1, 0, 0], np.float32)
  got = metrics.binary_compute(metrics.binary_state(logits, labels, weights, logits=True))
  # -log(1 - sigmoid(30)) = softplus(30), where float32 probabilities would round to 1.
  want = (np.log1p(np.exp(-40.0)) * 2 + 30.0 + np.log1p(np.exp(-30.0))) / 3
  assert got["logloss"] == pytest.approx(want, rel=1e-12)
  assert got["auc"] == 1.0 and got["count"] == 3.0
  clipped = metrics.binary_compute(metrics.binary_state([1.0, 0.0], [0, 0]))
  assert clipped["logloss"] == pytest.approx(-np.log(metrics.PROB_EPS) / 2, rel=1e-6)


def test_nan_predictions_show_as_nan_and_bad_input_is_refused():
  got = metrics.binary_compute(metrics.binary_state([0.1, np.nan, 0.3], [1, 0, 0]))
  assert np.isnan(got["auc"]) and np.isnan(got["logloss"]) and np.isnan(got["accuracy"])
  one_class = metrics.binary_compute(metrics.binary_state([0.2, 0.4], [1, 1]))
  assert np.isnan(one_class["auc"]) and np.isnan(one_class["ne"])
  with pytest.raises(ValueError, match="no examples"):
    metrics.binary_compute(metrics.binary_state([0.2], [1], [0]))
  with pytest.raises(ValueError, match="outside"):
    metrics.binary_state([0.2, 0.3], [1, 2])
  with pytest.raises(ValueError, match="2 predictions, 3 labels"):
    metrics.binary_state([0.2, 0.3], [1, 0, 1])
  with pytest.raises(ValueError, match=">= 0"):
    metrics.binary_state([0.2], [1], [-1])
  with pytest.raises(ValueError, match="do not mix"):
    metrics.binary_merge(metrics.binary_state([0.2], [1]),
                         metrics.binary_state([0.2], [1], logits=True))
