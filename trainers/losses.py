"""Retrieval losses over (normalised) user and item embeddings, at every position.

``user``: ``[B, L, D]`` representations; ``targets``: ``[B, L]`` next items;
``weights``: ``[B, L]`` (0 at padding). ``table``: ``[V, D]`` candidate
embeddings (already L2-normalised when the model normalises). Negatives are drawn
uniformly from ``[low, V)`` (``low`` = first real item, so PAD and OOV are never
drawn); a negative equal to the position's target is masked out, as in the HSTU
paper's code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainers import features

_MASKED = -1e9


def _weighted_mean(per_position: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sample_negatives(rng: jax.Array, shape_bl: tuple[int, int], num_negatives: int,
                     vocab_size: int, sharing: str = "position",
                     low: int = features.FIRST_ITEM_ID) -> jax.Array:
  """Uniform negative ids, broadcastable to ``[B, L, N]``.

  ``sharing``: ``position`` draws fresh negatives for every position
  (``[B, L, N]``), ``sequence`` one set per sequence (``[B, 1, N]``), ``batch``
  one set for the whole batch (``[1, 1, N]``).
  """
  b, l = shape_bl
  shape = {"position": (b, l, num_negatives), "sequence": (b, 1, num_negatives),
           "batch": (1, 1, num_negatives)}[sharing]
  return jax.random.randint(rng, shape, low, vocab_size)


def sampled_softmax_loss(user: jax.Array, targets: jax.Array, weights: jax.Array,
                         table: jax.Array, negatives: jax.Array,
                         temperature: float = 0.05) -> jax.Array:
  """Sampled softmax with the given negatives (see :func:`sample_negatives`).

  ``loss = mean_w[ logsumexp([s_pos, s_neg_1..N] / T) - s_pos / T ]`` where
  ``s`` is the dot product and negatives equal to the target are excluded.
  """
  pos = jnp.sum(user * jnp.take(table, targets, axis=0), axis=-1)            # [B, L]
  neg_emb = jnp.take(table, negatives, axis=0)                                # [b, l, N, D]
  if negatives.shape[0] == 1 and negatives.shape[1] == 1:                     # batch-shared
    neg = jnp.einsum("bld,nd->bln", user, neg_emb[0, 0])
  elif negatives.shape[1] == 1:                                               # per sequence
    neg = jnp.einsum("bld,bnd->bln", user, neg_emb[:, 0])
  else:                                                                       # per position
    neg = jnp.einsum("bld,blnd->bln", user, neg_emb)
  neg = jnp.where(negatives == targets[..., None], _MASKED, neg / temperature)
  pos = pos / temperature
  logits = jnp.concatenate([pos[..., None], neg], axis=-1)
  per_position = jax.nn.logsumexp(logits, axis=-1) - pos
  return _weighted_mean(per_position, weights)


def softmax_loss(user: jax.Array, targets: jax.Array, weights: jax.Array,
                 table: jax.Array, temperature: float = 0.05,
                 low: int = features.FIRST_ITEM_ID) -> jax.Array:
  """Full softmax cross-entropy over all real items (PAD and OOV columns masked)."""
  logits = jnp.einsum("bld,vd->blv", user, table) / temperature
  logits = logits.at[..., :low].set(_MASKED)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return _weighted_mean(log_z - pos, weights)
