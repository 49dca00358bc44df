"""ROC curve and confusion matrix of a ranking state against brute-force references.

The references are loops over rows and thresholds (and over positive/negative pairs for
the AUC), independent of the cumulative sums of ``trainers.ranking_eval``.
"""

import numpy as np
import pytest

from trainers import metrics, ranking_eval


def _state(n, levels, seed, unit_weights=False):
  """Logits on ``levels`` distinct values (ties when few), correlated labels, weights in
  {0 (padding), 0.5, 1, 3} (or all 1)."""
  rng = np.random.default_rng(seed)
  logits = rng.integers(-levels // 2, levels // 2 + 1, n).astype(np.float32) * 12 / levels
  labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-logits))).astype(np.float32)
  weights = (np.ones(n, np.float32) if unit_weights
             else rng.choice(np.array([0.0, 0.5, 1.0, 3.0], np.float32), n))
  return metrics.binary_state(logits, labels, weights, logits=True)


def _brute_auc(state):
  s, y, w = (np.asarray(state[k], np.float64) for k in ("logits", "labels", "weights"))
  num = den = 0.0
  for i in np.flatnonzero((y == 1) & (w > 0)):
    for j in np.flatnonzero((y == 0) & (w > 0)):
      pair = w[i] * w[j]
      num += pair * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
      den += pair
  return num / den


def _rates_at(state, threshold):
  """(fpr, tpr) of 'p >= threshold', by a loop over the rows."""
  tp = fp = pos = neg = 0.0
  for z, y, w in zip(*(np.asarray(state[k], np.float64) for k in ("logits", "labels",
                                                                  "weights"))):
    p = 0.5 * (1 + np.tanh(0.5 * z))  # the module's sigmoid, to the last bit
    pos += w * y
    neg += w * (1 - y)
    if p >= threshold:
      tp += w * y
      fp += w * (1 - y)
  return fp / neg, tp / pos


def _check_monotone(roc):
  fpr, tpr, thr = (np.asarray(roc[k]) for k in ("fpr", "tpr", "threshold"))
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  assert np.all(np.diff(thr) < 0)
  return fpr, tpr, thr


@pytest.mark.parametrize("levels", [3, 12, 400])
def test_full_curve_area_is_the_exact_auc_with_ties(levels):
  state = _state(400, levels, seed=levels)
  roc = ranking_eval.roc_curve(state, max_points=10**6)
  fpr, tpr, thr = _check_monotone(roc)
  distinct = len(np.unique(state["logits"][state["weights"] > 0]))
  assert len(fpr) == distinct + 1
  assert np.trapezoid(tpr, fpr) == pytest.approx(_brute_auc(state), abs=1e-12)
  for i in (1, len(thr) // 2, len(thr) - 1):
    assert (fpr[i], tpr[i]) == pytest.approx(_rates_at(state, thr[i]), abs=1e-12)
  assert _rates_at(state, thr[0]) == (0.0, 0.0)  # nothing is predicted a click


def test_thinned_curve_keeps_points_of_the_full_curve():
  state = _state(20_000, 100_000, seed=1)
  full = ranking_eval.roc_curve(state, max_points=10**6)
  thin = ranking_eval.roc_curve(state, max_points=200)
  fpr, tpr, thr = _check_monotone(thin)
  assert 150 <= len(fpr) <= 200 < len(full["fpr"])
  index = {t: i for i, t in enumerate(full["threshold"])}
  for f, t, h in zip(fpr, tpr, thr):
    i = index[h]
    assert (full["fpr"][i], full["tpr"][i]) == (f, t)
  exact = metrics.binary_compute(state)["auc"]
  assert np.trapezoid(full["tpr"], full["fpr"]) == pytest.approx(exact, abs=1e-12)
  assert abs(np.trapezoid(tpr, fpr) - exact) < 2e-3


@pytest.mark.parametrize("unit_weights", [True, False])
def test_confusion_matrix_counts_and_accuracy(unit_weights):
  state = _state(500, 9, seed=3, unit_weights=unit_weights)
  matrix = ranking_eval.confusion_matrix(state)
  want = np.zeros((2, 2))
  for z, y, w in zip(state["logits"], state["labels"], state["weights"]):
    want[int(y), int(1 / (1 + np.exp(-np.float64(z))) >= 0.5)] += w
  np.testing.assert_allclose(matrix, want, rtol=0, atol=1e-9)
  assert np.sum(matrix) == pytest.approx(state["weights"].sum())
  assert (matrix[0][0] + matrix[1][1]) / np.sum(matrix) == pytest.approx(
      metrics.binary_compute(state)["accuracy"], abs=1e-12)
  if unit_weights:
    assert all(isinstance(v, int) for row in matrix for v in row)
    assert np.sum(matrix) == 500


def test_saturated_probabilities_tie():
  """Logits beyond float64's sigmoid resolution give equal probabilities: one point per
  probability, so each threshold reproduces its point."""
  state = metrics.binary_state([-60, -50, -1, 0, 40, 50, 50], [0, 1, 0, 1, 1, 0, 1],
                               logits=True)
  roc = ranking_eval.roc_curve(state, max_points=100)
  _, _, thr = _check_monotone(roc)
  assert len(thr) == 5  # p = 1 (three rows), sigmoid(0), sigmoid(-1), p = 0 (two), start
  for f, t, h in zip(roc["fpr"], roc["tpr"], thr):
    assert (f, t) == pytest.approx(_rates_at(state, h), abs=1e-12)


def test_one_class_has_no_roc_curve():
  state = metrics.binary_state([0.1, -2.0, 3.0], [1, 1, 1], logits=True)
  with pytest.raises(ValueError, match="0 negative"):
    ranking_eval.roc_curve(state)
  with pytest.raises(ValueError, match="max_points"):
    ranking_eval.roc_curve(_state(10, 3, seed=0), max_points=1)
