"""Ranking and binary-classification metrics from mergeable states.

Each metric is a pair of functions: one turns a batch into a state, the other
turns the merged states into values. Ranking states are dicts of sums (plain
arrays, so they add across batches, hosts and devices with ``+``/``psum``;
``merge`` adds two states). Binary (CTR) states hold the predictions, labels and
weights themselves and merge by concatenation (``binary_merge``), so that AUC is
exact rather than binned.

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
ArrayLike = jax.Array | np.ndarray
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
# Binary classification (CTR): exact AUC, log loss, accuracy, NE, calibration.
# ---------------------------------------------------------------------------

BinaryState = dict[str, np.ndarray]
_BINARY_KINDS = ("logits", "probs")
PROB_EPS = 1e-7  # probabilities (not logits) are clipped to [eps, 1 - eps] for log loss


def binary_state(predictions: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None,
                 *, logits: bool = False) -> BinaryState:
  """The exact-metric state of a batch: its predictions, labels and weights (host numpy).

  States merge by concatenation (:func:`binary_merge`), across batches, hosts and
  devices, so :func:`binary_compute` is exact. Pass ``logits=True`` with logits
  (exact log loss, and no ties from float32 probabilities saturating at 0 or 1);
  otherwise ``predictions`` are probabilities. Rows of weight 0 (padding) count for
  nothing. ``labels`` are 0/1 (a soft label ``y`` counts as ``y`` positive and
  ``1 - y`` negative).
  """
  kind = "logits" if logits else "probs"
  preds = np.asarray(predictions, np.float32).reshape(-1)
  labels = np.asarray(labels, np.float32).reshape(-1)
  weights = (np.ones_like(preds) if weights is None
             else np.asarray(weights, np.float32).reshape(-1))
  if not preds.shape == labels.shape == weights.shape:
    raise ValueError(f"binary_state: {preds.size} predictions, {labels.size} labels and "
                     f"{weights.size} weights")
  bad = (labels < 0) | (labels > 1) | np.isnan(labels)
  if bad.any():
    raise ValueError(f"binary_state: {int(bad.sum())} label(s) outside [0, 1], "
                     f"e.g. {labels[bad][:3].tolist()}")
  if (weights < 0).any() or np.isnan(weights).any():
    raise ValueError("binary_state: weights must be >= 0 (0 = padding row)")
  return {kind: preds, "labels": labels, "weights": weights}


def binary_merge(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> BinaryState:
  """Concatenates two states (an empty mapping is the identity)."""
  if not a:
    return dict(b)
  if not b:
    return dict(a)
  if set(a) != set(b):
    raise ValueError(f"binary_merge: cannot merge a state of {sorted(a)} with one of "
                     f"{sorted(b)} (logits and probabilities do not mix)")
  return {k: np.concatenate([np.asarray(a[k]), np.asarray(b[k])]) for k in a}


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
  """Exact ROC AUC: the weighted Mann-Whitney statistic with midranks.

  ``P(score+ > score-) + P(score+ == score-) / 2`` over (positive, negative) pairs
  weighted by the product of their weights: after sorting by score, each group of
  tied scores contributes ``pos_g * (neg_below + neg_g / 2)``. NaN if a class has no
  weight or a weighted score is NaN.
  """
  scores = np.asarray(scores, np.float64)
  pos = np.asarray(weights, np.float64) * np.asarray(labels, np.float64)
  neg = np.asarray(weights, np.float64) * (1.0 - np.asarray(labels, np.float64))
  keep = (pos > 0) | (neg > 0)
  scores, pos, neg = scores[keep], pos[keep], neg[keep]
  total_pos, total_neg = pos.sum(), neg.sum()
  if total_pos == 0 or total_neg == 0 or np.isnan(scores).any():
    return float("nan")
  order = np.argsort(scores, kind="stable")
  scores, pos, neg = scores[order], pos[order], neg[order]
  starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
  pos_g, neg_g = np.add.reduceat(pos, starts), np.add.reduceat(neg, starts)
  neg_below = np.cumsum(neg_g) - neg_g
  return float(np.sum(pos_g * (neg_below + 0.5 * neg_g)) / (total_pos * total_neg))


def binary_compute(state: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Exact metrics of a merged state (float64).

  ``auc`` (:func:`weighted_auc`), ``logloss`` (weighted mean cross-entropy; from
  logits exactly, from probabilities clipped to ``[PROB_EPS, 1 - PROB_EPS]``),
  ``accuracy`` (prediction ``p >= 0.5``, i.e. logit ``>= 0``, against label ``>= 0.5``),
  ``ne`` (normalised entropy: log loss / the entropy of the label rate), ``calibration``
  (mean prediction / label rate), ``label_rate`` and ``count`` (the summed weight).
  Undefined values (one class only, a NaN prediction) are NaN.
  """
  kind = next((k for k in _BINARY_KINDS if k in state), None)
  if kind is None:
    raise ValueError(f"binary_compute: the state has no predictions (keys {sorted(state)})")
  preds = np.asarray(state[kind], np.float64)
  labels = np.asarray(state["labels"], np.float64)
  w = np.asarray(state["weights"], np.float64)
  count = float(w.sum())
  if count == 0:
    raise ValueError("no examples were evaluated (count is 0)")
  with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN rows of weight 0
    return _binary_values(kind, preds, labels, w, count)


def _binary_values(kind: str, preds: np.ndarray, labels: np.ndarray, w: np.ndarray,
                   count: float) -> dict[str, float]:
  if kind == "logits":
    probs = 0.5 * (1.0 + np.tanh(0.5 * preds))  # sigmoid without overflow
    # -log sigmoid(z) = softplus(-z), -log(1 - sigmoid(z)) = softplus(z)
    per_row = labels * np.logaddexp(0.0, -preds) + (1 - labels) * np.logaddexp(0.0, preds)
    predicted_pos = preds >= 0
  else:
    probs = preds
    p = np.clip(preds, PROB_EPS, 1 - PROB_EPS)
    per_row = -(labels * np.log(p) + (1 - labels) * np.log1p(-p))
    predicted_pos = preds >= 0.5
  # A zero weight removes a row even where its prediction is inf or NaN.
  logloss = float(np.sum(np.where(w > 0, w * per_row, 0.0)) / count)
  correct = predicted_pos == (labels >= 0.5)
  accuracy = (float("nan") if np.isnan(preds[w > 0]).any()
              else float(np.sum(w * correct) / count))
  rate = float(np.sum(w * labels) / count)
  entropy = (-(rate * np.log(rate) + (1 - rate) * np.log1p(-rate))
             if 0 < rate < 1 else float("nan"))
  mean_pred = float(np.sum(np.where(w > 0, w * probs, 0.0)) / count)
  return {"auc": weighted_auc(preds, labels, w),
          "logloss": logloss,
          "accuracy": accuracy,
          "ne": logloss / entropy,
          "calibration": mean_pred / rate if rate > 0 else float("nan"),
          "label_rate": rate,
          "count": count}
