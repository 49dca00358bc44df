"""Losses: retrieval losses over (normalised) user and item embeddings at every
position, and binary cross-entropy for ranking (CTR) models (:func:`binary_cross_entropy`).

Retrieval:

``user``: ``[B, L, D]`` representations; ``targets``: ``[B, L]`` next items;
``weights``: ``[B, L]`` (0 at padding). ``table``: ``[V, D]`` candidate
embeddings (already L2-normalised when the model normalises). Negatives are drawn
uniformly from ``[low, V)`` (``low`` = first real item, so PAD and OOV are never
drawn); a negative equal to the position's target is masked out, as in the HSTU
paper's code.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from trainers import features

_MASKED = -1e9


def _weighted_mean(per_position: jax.Array, weights: jax.Array,
                   normalizer: float | None = None) -> jax.Array:
  """``sum(w * loss) / sum(w)``, or ``/ normalizer`` when given (a constant, so that a
  position weighs the same whichever batch it falls in, e.g. with length buckets)."""
  return _normalized(jnp.sum(per_position * weights), weights, normalizer)


def _normalized(total: jax.Array, weights: jax.Array, normalizer: float | None) -> jax.Array:
  """A weighted sum over ``normalizer``, or over ``sum(weights)`` (at least 1)."""
  if normalizer is not None:
    return total / normalizer
  return total / jnp.maximum(jnp.sum(weights), 1.0)


def sample_negatives(rng: jax.Array, shape_bl: tuple[int, int], num_negatives: int,
                     vocab_size: int, sharing: str = "group", group: int = 8,
                     low: int = features.FIRST_ITEM_ID) -> jax.Array:
  """Uniform negative ids ``[b, g, N]``; positions share a set within a group.

  ``sharing``: ``position`` draws fresh negatives for every position (``g = L``,
  the HSTU code), ``group`` one set per ``group`` consecutive positions
  (``g = ceil(L / group)``), ``sequence`` one set per sequence (``g = 1``),
  ``column`` one set per position index, shared by the batch's sequences (``b = 1,
  g = L``: each position of a sequence still has its own set), ``batch`` one set for
  the whole batch (``b = g = 1``).
  """
  b, g = _negative_shape(shape_bl, sharing, group)
  return jax.random.randint(rng, (b, g, num_negatives), low, vocab_size)


def _negative_shape(shape_bl: tuple[int, int], sharing: str, group: int) -> tuple[int, int]:
  b, l = shape_bl
  g = {"position": l, "group": -(-l // max(group, 1)), "sequence": 1, "column": l,
       "batch": 1}[sharing]
  return (1 if sharing in ("batch", "column") else b), g


def sample_in_batch(rng: jax.Array, targets: jax.Array, weights: jax.Array,
                    num_negatives: int, sharing: str = "group", group: int = 8) -> jax.Array:
  """Negative ids ``[b, g, N]`` drawn from the batch's own targets: a uniformly chosen
  valid position (``weights > 0``) each, so an item is drawn in proportion to its count
  among the batch's targets (its popularity). Shapes as :func:`sample_negatives`."""
  b, g = _negative_shape(targets.shape, sharing, group)
  cdf = jnp.cumsum((weights.reshape(-1) > 0).astype(jnp.float32))
  u = jax.random.uniform(rng, (b, g, num_negatives)) * cdf[-1]
  index = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), cdf.shape[0] - 1)
  return targets.reshape(-1)[index]


def mixed_log_q(targets: jax.Array, weights: jax.Array, num_uniform: int, num_in_batch: int,
                vocab_size: int, low: int = features.FIRST_ITEM_ID) -> jax.Array:
  """``[vocab_size]`` log-probability that one negative draw of the mix (``num_uniform``
  uniform over ``[low, vocab_size)``, ``num_in_batch`` from :func:`sample_in_batch`) is
  each id: the logQ correction of a sampled softmax with that mix."""
  valid = (weights > 0).astype(jnp.float32)
  counts = jnp.zeros((vocab_size,), jnp.float32).at[targets.reshape(-1)].add(valid.reshape(-1))
  total = num_uniform + num_in_batch
  uniform = jnp.where(jnp.arange(vocab_size) >= low, 1.0 / (vocab_size - low), 0.0)
  q = (num_uniform * uniform + num_in_batch * counts / jnp.maximum(jnp.sum(valid), 1.0)) / total
  return jnp.log(jnp.maximum(q, 1e-30))


def _sampled_logits(user, targets, table, negatives, temperature, log_q=None):
  """``(pos [B, L], neg [B, L, N])`` logits / temperature; negatives equal to the target
  are masked; with ``log_q`` (``[V]``), every logit is corrected by ``- log_q[id]``."""
  b, l, _ = user.shape
  pos, neg, _ = _grouped_logits(user, targets, jnp.ones_like(targets, jnp.float32), table,
                                negatives, temperature, log_q)
  neg = jnp.swapaxes(neg, 2, 3).reshape(b, -1, neg.shape[2])[:, :l]              # [B, L, N]
  return pos.reshape(b, -1)[:, :l], neg


def _positive_logits(user, targets, table, temperature, log_q=None):
  """``(take, pos [B, L])``: the lookup of candidate rows (``table`` a ``[V, D]`` array or
  a function of ids) and the targets' logits / temperature, logQ-corrected if given."""
  take = table if callable(table) else lambda ids: jnp.take(table, ids, axis=0)
  pos = jnp.sum(user * take(targets), axis=-1) / temperature
  if log_q is not None:
    pos = pos - log_q[targets]
  return take, pos


def _grouped_logits(user, targets, weights, table, negatives, temperature, log_q=None):
  """``(pos [B, g, S], neg [B, g, N, S], weights [B, g, S])``: the logits of
  :func:`_sampled_logits` with the positions in the groups that share negatives
  (``S = ceil(L / g)`` consecutive positions; the padding past ``L`` weighs 0).

  Negatives before positions (``[.., N, S]``): the layout in which the ``g`` batched
  matmuls run fastest on CPU (the loss's forward and backward ~20% faster than in
  ``[.., S, N]``).
  """
  b, l, d = user.shape
  nb, g, n = negatives.shape
  size = -(-l // g)
  pad = g * size - l
  take, pos = _positive_logits(user, targets, table, temperature, log_q)            # [B, L]
  group = lambda x: jnp.pad(x, ((0, 0), (0, pad))).reshape(b, g, size)
  grouped = jnp.pad(user, ((0, 0), (0, pad), (0, 0))).reshape(b, g, size, d)
  if nb == 1:  # shared by the batch: nothing broadcast to B before the matmul
    neg = jnp.einsum("gnd,bgsd->bgns", take(negatives[0]), grouped) / temperature  # [B, g, N, S]
  else:
    neg = jnp.einsum("bgnd,bgsd->bgns", take(negatives), grouped) / temperature    # [B, g, N, S]
  if log_q is not None:
    neg = neg - log_q[negatives][..., None]
  neg_ids = jnp.broadcast_to(negatives, (b, g, n))[..., None]
  neg = jnp.where(neg_ids == group(targets)[:, :, None, :], _MASKED, neg)
  return group(pos), neg, group(weights)


def sampled_softmax_loss(user: jax.Array, targets: jax.Array, weights: jax.Array,
                         table: jax.Array | Callable[[jax.Array], jax.Array],
                         negatives: jax.Array, temperature: float = 0.05,
                         normalizer: float | None = None,
                         log_q: jax.Array | None = None) -> jax.Array:
  """Sampled softmax with the given negatives (see :func:`sample_negatives`).

  ``table``: the ``[V, D]`` candidate embeddings, or a function from ids to their
  embeddings (a model's sharded lookup).

  ``loss = mean_w[ logsumexp([s_pos, s_neg_1..N] / T) - s_pos / T ]`` where
  ``s`` is the dot product and negatives equal to the target are excluded.
  Position ``l`` uses the negatives of group ``l * g // L`` (``g`` groups of
  ``ceil(L / g)`` consecutive positions), so the logits are ``g`` batched matmuls.
  ``log_q`` (``[V]``, :func:`mixed_log_q`): the negatives' sampling log-probabilities,
  subtracted from every logit (logQ correction; a constant for uniform sampling).
  """
  if negatives.shape[0] == 1:  # shared by the batch (``column``, ``batch``)
    pos, neg, weights = _shared_logits(user, targets, weights, table, negatives, temperature,
                                       log_q)
    per_position = jnp.logaddexp(pos, jax.nn.logsumexp(neg, axis=1)) - pos
    return _weighted_mean(per_position, weights, normalizer)
  pos, neg, weights = _grouped_logits(user, targets, weights, table, negatives, temperature,
                                      log_q)
  logits = jnp.concatenate([pos[:, :, None], neg], axis=2)
  per_position = jax.nn.logsumexp(logits, axis=2) - pos
  return _weighted_mean(per_position, weights, normalizer)


def _shared_logits(user, targets, weights, table, negatives, temperature, log_q=None):
  """``(pos [g, M], neg [g, N, M], weights [g, M])`` for negatives ``[1, g, N]`` shared
  by the batch: group ``j``'s positions of every sequence (``M = B * S``, ``S =
  ceil(L / g)``) in one matmul ``[N, D] x [D, M]``, ``N`` rows gathered per group.
  Positions last: the logsumexp over ``N`` and its backward run faster on CPU than in
  :func:`_grouped_logits`'s layout (loss forward and backward at B = 128, L = 200,
  ``column``: 37 against 52 ms; ``group`` of 8 in that layout: 143 ms)."""
  b, l, d = user.shape
  _, g, n = negatives.shape
  size = -(-l // g)
  pad = g * size - l

  def columns(x):  # [B, L, ...] -> [g, B * S, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    x = jnp.swapaxes(x.reshape((b, g, size) + x.shape[2:]), 0, 1)
    return x.reshape((g, b * size) + x.shape[3:])

  take, pos = _positive_logits(user, targets, table, temperature, log_q)            # [B, L]
  neg = jnp.einsum("gnd,gmd->gnm", take(negatives[0]), columns(user)) / temperature  # [g, N, M]
  if log_q is not None:
    neg = neg - log_q[negatives[0]][..., None]
  neg = jnp.where(negatives[0][:, :, None] == columns(targets)[:, None, :], _MASKED, neg)
  return columns(pos), neg, columns(weights)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
  """gBCE's positive exponent ``beta = alpha (t (1 - 1/alpha) + 1/alpha)`` with
  ``alpha = N / (num_items - 1)`` the negative sampling rate (Petrov & Macdonald,
  RecSys 2023): ``t = 0`` gives 1 (plain BCE), ``t = 1`` gives ``alpha`` (fully
  calibrated to the full-softmax probabilities)."""
  alpha = num_negatives / max(num_items - 1, 1)
  return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(user: jax.Array, targets: jax.Array, weights: jax.Array,
              table: jax.Array | Callable[[jax.Array], jax.Array], negatives: jax.Array,
              beta: float, temperature: float = 1.0,
              normalizer: float | None = None) -> jax.Array:
  """Generalised binary cross-entropy (gSASRec): per position, the mean over its
  ``1 + N`` logits of ``-log sigmoid(s_pos)^beta`` and ``-log(1 - sigmoid(s_neg))``.

  gSASRec transforms the positive probability to ``p^beta`` and applies BCE; in log space
  that is ``beta * softplus(-s_pos)``, computed here directly (no clamping). Negatives
  equal to the target are left out of the sum (they still count in the ``1 + N``).
  ``beta`` from :func:`gbce_beta`: 1 (``t = 0``) is plain BCE with sampled negatives.
  """
  pos, neg = _sampled_logits(user, targets, table, negatives, temperature)
  per_position = (beta * jax.nn.softplus(-pos) + jnp.sum(jax.nn.softplus(neg), axis=-1)) / (
      1 + neg.shape[-1])
  return _weighted_mean(per_position, weights, normalizer)


def softmax_loss(user: jax.Array, targets: jax.Array, weights: jax.Array,
                 table: jax.Array, temperature: float = 0.05,
                 low: int = features.FIRST_ITEM_ID, normalizer: float | None = None,
                 high: int | None = None, chunk: int = 512) -> jax.Array:
  """Full softmax cross-entropy over the real items ``[low, high)`` of ``table`` (PAD,
  OOV and the table's padding rows from ``high`` on are masked).

  The weighted positions are gathered first and scored ``chunk`` at a time
  (:func:`_chunked_cross_entropy`), so neither the ``[B, L, V]`` logits nor their
  gradient exist at once, and padding positions (weight 0) cost nothing: only as many
  chunks run as the batch has weighted positions.
  """
  d = user.shape[-1]
  u = user.reshape(-1, d)
  t = targets.reshape(-1).astype(jnp.int32)
  w = weights.reshape(-1).astype(jnp.float32)
  n = u.shape[0]
  chunk = max(1, min(chunk, n))
  order = jnp.argsort(w <= 0, stable=True)  # the weighted positions first, in order
  pad = (-n) % chunk
  u, t, w = (jnp.pad(x[order], ((0, pad),) + ((0, 0),) * (x.ndim - 1)) for x in (u, t, w))
  high = table.shape[0] if high is None else high
  total = _chunked_cross_entropy(u, t, w, table, temperature, low, high, chunk)
  return _normalized(total, w, normalizer)


def _chunk_logits(u: jax.Array, table: jax.Array, temperature: float, low: int,
                  high: int) -> jax.Array:
  logits = jnp.dot(u, table.T, preferred_element_type=jnp.float32) / temperature
  column = jnp.arange(table.shape[0])
  return jnp.where((column >= low) & (column < high), logits, _MASKED)


def _chunks(w: jax.Array, chunk: int) -> jax.Array:
  """How many chunks hold the weighted rows (they come first)."""
  return (jnp.count_nonzero(w > 0) + chunk - 1) // chunk


def _block(i, u, t, w, table, temperature, low, high, chunk):
  """Block ``i`` of :func:`_chunked_cross_entropy`: its rows, targets and weights, its
  ``[chunk, V]`` logits, their logsumexp and the block's weighted loss sum."""
  uc, tc, wc = (jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk) for x in (u, t, w))
  logits = _chunk_logits(uc, table, temperature, low, high)
  lse = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
  return uc, tc, wc, logits, lse, jnp.sum(wc * (lse - pos))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_cross_entropy(u: jax.Array, t: jax.Array, w: jax.Array, table: jax.Array,
                           temperature: float, low: int, high: int, chunk: int) -> jax.Array:
  """``sum(w * (logsumexp(logits) - logits[t]))`` over rows ``u`` ``[n, D]`` (weighted
  rows first, ``n`` a multiple of ``chunk``), one ``[chunk, V]`` block of logits at a
  time; rows past the last weighted one are never scored. Differentiated, the forward
  pass also computes the gradients while it holds each block
  (:func:`_chunked_cross_entropy_fwd`)."""
  def body(i, acc):
    return acc + _block(i, u, t, w, table, temperature, low, high, chunk)[-1]
  return jax.lax.fori_loop(0, _chunks(w, chunk), body, jnp.zeros((), jnp.float32))


def _chunked_cross_entropy_fwd(u, t, w, table, temperature, low, high, chunk):
  """The loss and its gradients of ``u`` and ``table`` in one pass over the blocks: the
  loss is the last operation, so ``d loss / d logits = w * (softmax - one hot) / T`` is
  known while a block of logits is at hand. Three ``[chunk, D] x [D, V]`` products a
  block (the logits, then the two gradients) instead of four when the backward pass
  recomputes the logits; the residuals are the gradients, ``[n, D]`` and ``[V, D]``."""
  def body(i, carry):
    total, du, dtable = carry
    uc, tc, wc, logits, lse, loss = _block(i, u, t, w, table, temperature, low, high, chunk)
    p = jnp.exp(logits - lse[:, None])
    p = p.at[jnp.arange(chunk), tc].add(-1.0)                  # softmax - one hot
    dlogits = p * (wc / temperature)[:, None]                  # [chunk, V]
    du = jax.lax.dynamic_update_slice_in_dim(du, dlogits @ table, i * chunk, 0)
    return total + loss, du, dtable + dlogits.T @ uc
  total, du, dtable = jax.lax.fori_loop(
      0, _chunks(w, chunk), body,
      (jnp.zeros((), jnp.float32), jnp.zeros_like(u), jnp.zeros_like(table)))
  return total, (du, dtable, w)


def _chunked_cross_entropy_bwd(temperature, low, high, chunk, residuals, g):
  del temperature, low, high, chunk  # in the residuals already
  du, dtable, w = residuals
  return g * du, None, jnp.zeros_like(w), g * dtable


_chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None,
                         regularization: jax.Array | float = 0.0) -> jax.Array:
  """Weighted mean of the sigmoid cross-entropy of ``logits`` ``[B]`` against ``labels``
  ``[B]`` (0/1, or soft labels in [0, 1]), plus ``regularization`` (e.g. the model's
  embedding L2). ``weights`` ``[B]``: 0 on padding rows; the mean is over their sum."""
  labels = labels.astype(logits.dtype)
  per_row = optax.sigmoid_binary_cross_entropy(logits, labels)
  if weights is None:
    weights = jnp.ones_like(per_row)
  return _weighted_mean(per_row, weights.astype(per_row.dtype)) + regularization
