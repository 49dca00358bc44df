"""Ranking and binary metrics against brute-force numpy references."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from trainers import metrics


def brute_force_ranking(scores, targets, history, first, ks):
  """Averages HR/NDCG/RR over every position the target can take among its ties."""
  out = {f"{m}@{k}": [] for m in ("hr", "ndcg") for k in ks}
  out["mrr"] = []
  for row, target in enumerate(targets):
    excluded = set(range(first)) | set(int(h) for h in history[row] if h != 0)
    excluded.discard(int(target))
    s = scores[row, target]
    rivals = [j for j in range(scores.shape[1]) if j not in excluded and j != target]
    above = sum(scores[row, j] > s for j in rivals)
    tied = sum(scores[row, j] == s for j in rivals)
    ranks = [above + 1 + i for i in range(tied + 1)]  # equally likely
    for k in ks:
      out[f"hr@{k}"].append(np.mean([r <= k for r in ranks]))
      out[f"ndcg@{k}"].append(np.mean([1 / math.log2(r + 1) if r <= k else 0 for r in ranks]))
    out["mrr"].append(np.mean([1 / r for r in ranks]))
  return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("levels", [3, 7, 1000])
def test_ranking_metrics_equal_brute_force_with_ties(levels):
  rng = np.random.default_rng(levels)
  b, v, first, ks = 40, 60, 2, (1, 5, 10, 50)
  scores = rng.integers(0, levels, (b, v)).astype(np.float32)  # few levels: many ties
  targets = rng.integers(first, v, b)
  history = rng.integers(0, v, (b, 8))
  history[:, :3] = 0  # padding
  history[0, -1] = targets[0]  # a target that is also in the history is still ranked
  got = metrics.compute(metrics.ranking_metrics(
      jnp.asarray(scores), jnp.asarray(targets), history=jnp.asarray(history), ks=ks,
      first_candidate=first))
  want = brute_force_ranking(scores, targets, history, first, ks)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-5), key


def test_no_ties_matches_argsort_rank():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(16, 100)).astype(np.float32)
  targets = rng.integers(0, 100, 16)
  ranks = 1 + (scores > scores[np.arange(16), targets][:, None]).sum(1)
  got = metrics.compute(metrics.ranking_metrics(jnp.asarray(scores), jnp.asarray(targets),
                                                ks=(10,)))
  assert got["hr@10"] == pytest.approx(np.mean(ranks <= 10))
  assert got["ndcg@10"] == pytest.approx(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0)))
  assert got["mrr"] == pytest.approx(np.mean(1 / ranks))


def test_constant_scores_give_chance_level():
  v = 101  # 100 candidates after excluding id 0
  got = metrics.compute(metrics.ranking_metrics(
      jnp.zeros((4, v)), jnp.array([1, 5, 50, 100]), ks=(10,), first_candidate=1))
  assert got["hr@10"] == pytest.approx(0.10)
  assert got["mrr"] == pytest.approx(sum(1 / r for r in range(1, 101)) / 100)


def test_nan_scores_rank_last():
  scores = jnp.full((2, 30), jnp.nan)  # a diverged model must not look perfect
  got = metrics.compute(metrics.ranking_metrics(scores, jnp.array([3, 4]), ks=(10,)))
  assert got["hr@10"] == 0.0 and got["mrr"] == pytest.approx(1 / 30, rel=1e-5)


def test_merge_of_batches_equals_whole_and_weights_drop_rows():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(30, 50)).astype(np.float32)
  targets = rng.integers(0, 50, 30)
  whole = metrics.ranking_metrics(jnp.asarray(scores), jnp.asarray(targets))
  parts = {}
  for lo in range(0, 30, 7):
    parts = metrics.merge(parts, metrics.ranking_metrics(
        jnp.asarray(scores[lo:lo + 7]), jnp.asarray(targets[lo:lo + 7])))
  a, b = metrics.compute(whole), metrics.compute(parts)
  assert a == pytest.approx(b)
  # a padding row with weight 0 changes nothing
  padded = metrics.ranking_metrics(
      jnp.asarray(np.vstack([scores, np.zeros((1, 50), np.float32)])),
      jnp.asarray(np.append(targets, 0)), weights=jnp.asarray(np.append(np.ones(30), 0.0)))
  assert metrics.compute(padded) == pytest.approx(a)


def test_compute_refuses_empty_state():
  with pytest.raises(ValueError, match="no examples"):
    metrics.compute({"count": 0.0, "mrr": 0.0})


def test_binary_metrics_equal_brute_force():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, 500)
  probs = np.clip(0.3 * labels + rng.uniform(size=500) * 0.7, 0, 1).astype(np.float32)
  pos, neg = probs[labels == 1], probs[labels == 0]
  auc = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
  logloss = -np.mean(labels * np.log(np.clip(probs, 1e-7, 1)) +
                     (1 - labels) * np.log(np.clip(1 - probs, 1e-7, 1)))
  state = metrics.binary_merge(metrics.binary_state(probs[:200], labels[:200]),
                               metrics.binary_state(probs[200:], labels[200:]))
  got = metrics.binary_compute(state)
  assert got["auc"] == pytest.approx(auc, abs=1e-12)  # exact, not binned
  assert got["logloss"] == pytest.approx(logloss, rel=1e-5)
  assert got["accuracy"] == pytest.approx(np.mean((probs >= 0.5) == labels))
