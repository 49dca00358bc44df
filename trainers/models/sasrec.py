"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item history.

Pre-LayerNorm blocks of multi-head causal self-attention and a position-wise
feed-forward network, learned absolute positions, dropout. The output at
position ``t`` is the user representation after seeing items ``<= t``; with
``l2_normalize`` it is unit-length, as are the item candidates (the HSTU paper's
SASRec baseline with sampled softmax).

``dtype`` is the computation dtype: with ``bfloat16`` the dense layers, attention
matmuls and the residual stream run in bf16, while parameters, layer-norm statistics,
the attention softmax and the output (user representations, float32 for the loss and
scoring) stay float32.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainers import layers


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  vocab_size: int = 0          # item rows incl. PAD and OOV; set from dataset_info
  max_len: int = 200
  embedding_dim: int = 50
  num_blocks: int = 2
  num_heads: int = 1
  ffn_dim: int = 50
  dropout: float = 0.2
  l2_normalize: bool = True
  dtype: str = "float32"       # computation dtype (layers.DTYPES); parameters stay float32

  def __post_init__(self):
    layers.compute_dtype(self.dtype, "SASRecConfig")


class CausalSelfAttention(nn.Module):
  """Multi-head softmax attention; ``mask`` is ``[B, 1, L, L]`` (True = may attend).

  Computed in causal query blocks (:func:`trainers.layers.causal_blocks`): a block of
  queries scores only the keys up to its last query, about half the work of the whole
  ``[L, L]`` at L = 200, with the same numbers at every valid position (the keys left
  out are masked for the whole block) and the same dropout mask. With ``last_only``
  only the last position queries (keys and values stay ``L`` long) and the output is
  ``[B, 1, D]``. ``causal=False`` (BERT4Rec: any ``mask``) scores every key in one block.
  """

  config: SASRecConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, last_only: bool = False):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    b, length, d = x.shape
    h = c.num_heads
    qkv = layers.dense(3 * d, (layers.EMBED, layers.HEADS), dtype=dtype, name="qkv")(x)
    q, k, v = (t.reshape(b, length, h, d // h) for t in jnp.split(qkv, 3, axis=-1))
    if self.causal:
      blocks = layers.causal_blocks(length, last_only=last_only)
    else:
      blocks = [(slice(-1, None) if last_only else slice(None), slice(None))]
    weights = []
    for rows, keys in blocks:
      # Scores and softmax in float32 whatever the computation dtype.
      logits = jnp.einsum("bihd,bjhd->bhij", q[:, rows], k[:, keys],
                          preferred_element_type=jnp.float32) / jnp.sqrt(float(d // h))
      logits = jnp.where(mask[:, :, rows, keys], logits, jnp.finfo(logits.dtype).min)
      weights.append(jax.nn.softmax(logits, axis=-1).astype(dtype))
    queries = 1 if last_only else length
    weights = layers.Dropout(c.dropout)(
        weights, deterministic,
        blocks_of=layers.attention_blocks_of(blocks, b, h, queries, length))
    out = [jnp.einsum("bhij,bjhd->bihd", w, v[:, keys]) for w, (_, keys) in zip(weights, blocks)]
    out = (jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]).reshape(b, queries, d)
    return layers.dense(d, (layers.HEADS, layers.EMBED), dtype=dtype, name="out")(out)


class _Block(nn.Module):
  config: SASRecConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, last_only: bool = False):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    h = layers.LayerNorm(epsilon=1e-8, dtype=dtype)(x)  # statistics in float32
    h = CausalSelfAttention(c)(h, mask, deterministic, last_only)
    if last_only:
      x = x[:, -1:]
    x = x + layers.Dropout(c.dropout)(h, deterministic)
    h = layers.LayerNorm(epsilon=1e-8, dtype=dtype)(x)
    h = layers.dense(c.ffn_dim, (layers.EMBED, layers.MLP), dtype=dtype)(h)
    h = layers.Dropout(c.dropout)(nn.relu(h), deterministic)
    h = layers.dense(c.embedding_dim, (layers.MLP, layers.EMBED), dtype=dtype)(h)
    return x + layers.Dropout(c.dropout)(h, deterministic)


class SASRec(nn.Module):
  """Maps item histories ``[B, L]`` to user representations ``[B, L, D]``."""

  config: SASRecConfig

  def setup(self):
    c = self.config
    self.item_embedding, self.position_embedding, self.input_dropout = (
        layers.input_modules(c))
    self.blocks = [_Block(c) for _ in range(c.num_blocks)]
    self.final_norm = layers.LayerNorm(epsilon=1e-8)

  def __call__(self, item_ids: jax.Array, timestamps: jax.Array | None = None,
               query_timestamps: jax.Array | None = None, *,
               deterministic: bool = True, last_only: bool = False) -> jax.Array:
    """``[B, L]`` ids -> ``[B, L, D]``; with ``last_only``, ``[B, 1, D]`` for position L-1.

    ``last_only`` (scoring and serving) runs the final block for the last position only:
    the same numbers as ``[:, -1:]`` of the full output, with the final block's attention
    and feed-forward work cut by a factor of L.
    """
    del timestamps, query_timestamps  # SASRec ignores time
    c = self.config
    x, valid = layers.embed_sequence(self.item_embedding, self.position_embedding,
                                     self.input_dropout, item_ids, deterministic,
                                     layers.compute_dtype(c.dtype))
    mask = layers.causal_mask(valid)
    for i, block in enumerate(self.blocks):
      last = last_only and i == len(self.blocks) - 1
      x = block(x, mask, deterministic, last_only=last)
      x = x * valid[:, -x.shape[1]:, None]
    if last_only:
      x = x[:, -1:]
    x = self.final_norm(x.astype(jnp.float32))  # float32 out: the loss and scoring
    return layers.l2_normalize(x) if c.l2_normalize else x

  def candidates(self, ids: jax.Array) -> jax.Array:
    return self.item_embedding.candidates(ids).astype(jnp.float32)  # for the loss

  def all_candidates(self) -> jax.Array:
    return self.item_embedding.all_candidates().astype(jnp.float32)  # loss and scoring
