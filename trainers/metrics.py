"""Ranking and binary-classification metrics as mergeable sums.

Each metric is a pair of functions: one turns a batch into a dict of sums (plain
arrays, so they add across batches, hosts and devices with ``+``/``psum``), the
other turns the merged sums into values. ``merge`` adds two states.

Ranking (one held-out target per user, full ranking over the candidates):
``g`` = candidates scoring strictly above the target, ``t`` = other candidates
tied with it. Ties are broken uniformly at random and the metrics are their
exact expectation, so a constant scorer gets chance-level values rather than a
lucky or unlucky rank::

    HR@K   = P(rank <= K)                 = clip((K - g) / (t + 1), 0, 1)
    NDCG@K = E[1/log2(rank + 1); rank<=K] = sum_{r=g+1}^{min(g+t+1, K)} 1/log2(r+1) / (t+1)
    MRR    = E[1/rank]                    = sum_{r=g+1}^{g+t+1} 1/r / (t+1)

HR@K equals Recall@K with a single target. Targets that are not candidates
(ids below ``first_candidate``: padding, the out-of-vocabulary bucket) are not
ranked: they weigh 0 and are counted apart (``oov_targets``, see :func:`counts`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

State = dict[str, jax.Array]
# Sums that are counts, not per-target metrics: ``compute`` leaves them out.
COUNT_KEYS = ("count", "oov_targets")


def merge(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> State:
  """Adds two metric states key by key (missing keys count as zero)."""
  return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def rank_counts(scores: jax.Array, targets: jax.Array, history: jax.Array | None = None,
                first_candidate: int = 0) -> tuple[jax.Array, jax.Array]:
  """``(g, t)`` per row: candidates strictly above the target, and tied with it.

  Args:
    scores: ``[B, V]`` scores of every id.
    targets: ``[B]`` target ids.
    history: optional ``[B, L]`` ids to exclude (0 = padding).
    first_candidate: ids below it are never candidates.
  """
  target_scores = jnp.take_along_axis(scores, targets[:, None], axis=1)
  b = scores.shape[0]
  excluded = jnp.zeros(scores.shape, bool).at[:, :first_candidate].set(True)
  if history is not None:
    excluded = excluded.at[jnp.arange(b)[:, None], history].set(True)
  excluded = excluded.at[jnp.arange(b), targets].set(True)  # the target is not its own rival
  greater = jnp.sum((scores > target_scores) & ~excluded, axis=1)
  ties = jnp.sum((scores == target_scores) & ~excluded, axis=1)
  # A NaN target score compares false with everything: rank it last, not first.
  candidates = jnp.sum(~excluded, axis=1)
  greater = jnp.where(jnp.isnan(target_scores[:, 0]), candidates, greater)
  return greater, ties


def _ranks_table(n: int) -> tuple[np.ndarray, np.ndarray]:
  r = np.arange(1, n + 1, dtype=np.float64)
  # prefix[i] = sum over ranks 1..i
  dcg = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(r + 1.0))])
  rr = np.concatenate([[0.0], np.cumsum(1.0 / r)])
  return dcg, rr


def ranking_sums(greater: jax.Array, ties: jax.Array, weights: jax.Array,
                 ks: Sequence[int], num_candidates: int) -> State:
  """Sums of expected HR@K, NDCG@K and MRR over rows (weighted, 0 = padding row)."""
  dcg, rr = _ranks_table(num_candidates + 1)
  dcg, rr = jnp.asarray(dcg, jnp.float32), jnp.asarray(rr, jnp.float32)
  g = greater.astype(jnp.int32)
  t1 = (ties + 1).astype(jnp.int32)
  last = g + t1                                  # worst possible rank
  w = weights.astype(jnp.float32)
  out = {"count": jnp.sum(w),
         "mrr": jnp.sum(w * (rr[last] - rr[g]) / t1)}
  for k in ks:
    hr = jnp.clip((k - g) / t1, 0.0, 1.0)
    ndcg = (dcg[jnp.clip(last, 0, k)] - dcg[jnp.clip(g, 0, k)]) / t1
    out[f"hr@{k}"] = jnp.sum(w * hr)
    out[f"ndcg@{k}"] = jnp.sum(w * ndcg)
  return out


def ranking_metrics(scores: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                    history: jax.Array | None = None, ks: Sequence[int] = (10, 50, 200),
                    first_candidate: int = 0) -> State:
  """Batch sums of HR@K, NDCG@K, MRR for full ranking (see module docstring).

  Rows whose target is below ``first_candidate`` weigh 0; their weight goes to
  ``oov_targets``. ``count`` is the weight of the ranked targets.
  """
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  ranked = targets >= first_candidate
  g, t = rank_counts(scores, targets, history, first_candidate)
  out = ranking_sums(g, t, jnp.where(ranked, weights, 0.0), ks,
                     scores.shape[1] - first_candidate)
  out["oov_targets"] = jnp.sum(jnp.where(ranked, 0.0, weights))
  return out


def compute(state: Mapping[str, jax.Array]) -> dict[str, float]:
  """Means from summed states: every key but the counts divided by ``count``."""
  count = float(state["count"])
  if count == 0:
    oov = float(state.get("oov_targets", 0))
    raise ValueError("no examples were evaluated (count is 0" +
                     (f"; all {oov:.0f} targets are out of vocabulary)" if oov else ")"))
  return {k: float(v) / count for k, v in sorted(state.items()) if k not in COUNT_KEYS}


def counts(state: Mapping[str, jax.Array]) -> dict[str, int]:
  """``ranked_targets`` (the weight of the ranked rows) and ``oov_targets`` of a state."""
  return {"ranked_targets": int(round(float(state.get("count", 0)))),
          "oov_targets": int(round(float(state.get("oov_targets", 0))))}


# ---------------------------------------------------------------------------
# Binary classification (CTR): AUC from score histograms, accuracy, log loss.
# ---------------------------------------------------------------------------


def binary_sums(probs: jax.Array, labels: jax.Array, weights: jax.Array | None = None,
                num_bins: int = 10_000, eps: float = 1e-7) -> State:
  """Mergeable sums for AUC (histograms of predicted probabilities per class),
  accuracy at 0.5 and log loss."""
  probs = jnp.asarray(probs, jnp.float32).reshape(-1)
  labels = jnp.asarray(labels, jnp.float32).reshape(-1)
  w = jnp.ones_like(probs) if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
  bins = jnp.clip((probs * num_bins).astype(jnp.int32), 0, num_bins - 1)
  pos_hist = jnp.zeros(num_bins, jnp.float32).at[bins].add(w * labels)
  neg_hist = jnp.zeros(num_bins, jnp.float32).at[bins].add(w * (1 - labels))
  p = jnp.clip(probs, eps, 1 - eps)
  logloss = -(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p))
  correct = ((probs >= 0.5) == (labels >= 0.5)).astype(jnp.float32)
  return {"count": jnp.sum(w), "pos_hist": pos_hist, "neg_hist": neg_hist,
          "logloss": jnp.sum(w * logloss), "correct": jnp.sum(w * correct)}


def binary_compute(state: Mapping[str, jax.Array]) -> dict[str, float]:
  """AUC (pairs within a bin count one half), accuracy, log loss."""
  pos = np.asarray(state["pos_hist"], np.float64)
  neg = np.asarray(state["neg_hist"], np.float64)
  count = float(state["count"])
  if count == 0:
    raise ValueError("no examples were evaluated (count is 0)")
  neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
  n_pos, n_neg = pos.sum(), neg.sum()
  auc = float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg)) if n_pos and n_neg \
      else float("nan")
  return {"auc": auc, "accuracy": float(state["correct"]) / count,
          "logloss": float(state["logloss"]) / count}
