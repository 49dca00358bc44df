"""HSTU (Zhai et al., ICML 2024, arXiv 2402.17152): Hierarchical Sequential Transduction Units.

Per block, with ``X`` the ``[B, L, D]`` input::

    U, V, Q, K = split(SiLU(LayerNorm(X) @ W_uvqk))
    A          = SiLU(Q K^T + rab) / L      (causal, no softmax)
    Y          = X + W_o(Dropout(U * LayerNorm(A V)))

``rab`` is a relative attention bias from the position offset ``j - i`` and from
log-bucketed time gaps ``query_time_i - time_j``, where ``query_time_i`` is the
time at which position ``i``'s prediction is made (the next event's timestamp
in training, the target's at evaluation, the request time when serving). Times are
int32 ``[B, L]`` or, for int64 times, int32 words ``[B, L, 2]`` of their offsets from a
per-sequence reference (:func:`trainers.features.time_words`); gaps are computed
word by word (:func:`time_gaps`), so they never overflow. No
feed-forward network. Layer norms inside the block have no learned scale, as in
the paper's code.

``dtype`` is the computation dtype: with ``bfloat16`` the projections, the attention
(``rab`` cast once, the SiLU scores and both matmuls) and the residual stream run in
bf16, as under the paper code's bf16 autocast; parameters, layer-norm statistics, the
time gaps and buckets, and the output (user representations, float32 for the loss and
scoring) stay float32.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainers import features, layers


@dataclasses.dataclass(frozen=True)
class HSTUConfig:
  vocab_size: int = 0          # item rows incl. PAD and OOV; set from dataset_info
  max_len: int = 200
  embedding_dim: int = 50
  num_blocks: int = 2
  num_heads: int = 1
  attention_dim: int = 50      # d_qk per head
  linear_dim: int = 50         # d_v per head
  dropout: float = 0.2         # input and pre-W_o dropout
  attention_dropout: float = 0.0
  num_time_buckets: int = 128
  time_bucket_divisor: float = 0.301   # bucket = floor(ln(max(|dt|, 1)) / divisor)
  position_bias: bool = True
  time_bias: bool = True
  l2_normalize: bool = True
  dtype: str = "float32"       # computation dtype (layers.DTYPES); parameters stay float32

  def __post_init__(self):
    layers.compute_dtype(self.dtype, "HSTUConfig")


def _time_words(times: jax.Array) -> jax.Array:
  """``[B, L, 2]`` (high, low) words as they come, or those of int32 ``[B, L]`` times."""
  if times.ndim == 3:
    return times
  times = times.astype(jnp.int32)
  bits = features.TIME_WORD_BITS
  return jnp.stack([times >> bits, times & ((1 << bits) - 1)], axis=-1)


def time_gaps(query_timestamps: jax.Array, timestamps: jax.Array) -> jax.Array:
  """float32 ``[B, Lq, L]`` gaps ``query_timestamps[:, i] - timestamps[:, j]``.

  The high and low words are subtracted separately in int32 (the low words' gap is
  below 2**24, exact in float32), then combined in float32: nothing overflows, and the
  gap's relative error is below 2**-23 (one rounding below 2**48, two above).
  """
  q, t = _time_words(query_timestamps), _time_words(timestamps)
  high = q[:, :, None, 0] - t[:, None, :, 0]
  low = q[:, :, None, 1] - t[:, None, :, 1]
  return high.astype(jnp.float32) * float(1 << features.TIME_WORD_BITS) + low.astype(jnp.float32)


def time_buckets(dt: jax.Array, num_buckets: int, divisor: float) -> jax.Array:
  """Log-bucketed absolute time gaps (seconds) in ``[0, num_buckets]``."""
  dt = jnp.maximum(jnp.abs(dt).astype(jnp.float32), 1.0)
  return jnp.clip(jnp.floor(jnp.log(dt) / divisor), 0, num_buckets).astype(jnp.int32)


class RelativeBias(nn.Module):
  """``rab[b, i, j]``: learned bias from ``j - i`` and the bucketed time gap."""

  config: HSTUConfig

  @nn.compact
  def __call__(self, timestamps: jax.Array | None, query_timestamps: jax.Array | None,
               length: int, queries: slice = slice(None), keys: slice = slice(None)
               ) -> jax.Array:
    """``[B or 1, Lq, Lk]`` bias of the ``queries`` and ``keys`` (slices of ``length``)."""
    c = self.config
    positions = jnp.arange(length)
    offsets = positions[keys][None, :] - positions[queries][:, None]  # j - i
    bias = jnp.zeros((1,) + offsets.shape, jnp.float32)
    if c.position_bias:
      pos_w = self.param(
          "position_weights",
          nn.with_logical_partitioning(layers.truncated_normal(0.02), (layers.POSITION,)),
          (2 * c.max_len - 1,), jnp.float32)
      bias = bias + pos_w[offsets + c.max_len - 1][None]
    if c.time_bias and timestamps is not None:
      ts_w = self.param(
          "time_weights",
          nn.with_logical_partitioning(layers.truncated_normal(0.02), (layers.BUCKETS,)),
          (c.num_time_buckets + 1,), jnp.float32)
      if query_timestamps is None:
        query_timestamps = timestamps
      dt = time_gaps(query_timestamps[:, queries], timestamps[:, keys])
      bias = bias + ts_w[time_buckets(dt, c.num_time_buckets, c.time_bucket_divisor)]
    return bias


class HSTUBlock(nn.Module):
  config: HSTUConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, rabs: list[jax.Array],
               blocks: list[tuple[slice, slice]], deterministic: bool,
               last_only: bool = False) -> jax.Array:
    """``[B, L, D]`` -> ``[B, L, D]``; with ``last_only`` ``[B, 1, D]`` (last query only).

    ``blocks``: :func:`trainers.layers.causal_blocks` (for ``last_only``, the last query's);
    ``rabs``: each block's relative bias; ``mask``: ``[B, 1, L, L]``.
    """
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    b, length, _ = x.shape
    h, dqk, dv = c.num_heads, c.attention_dim, c.linear_dim
    normed = layers.layer_norm(x, 1e-6, dtype)
    uvqk = layers.dense(2 * h * dv + 2 * h * dqk, (layers.EMBED, layers.MLP),
                        use_bias=False, kernel_init=layers.truncated_normal(0.02),
                        dtype=dtype, name="uvqk")(normed)
    uvqk = nn.silu(uvqk)
    u, v, q, k = jnp.split(uvqk, [h * dv, 2 * h * dv, 2 * h * dv + h * dqk], axis=-1)
    if last_only:
      x, u = x[:, -1:], u[:, -1:]
    queries = x.shape[1]
    # Heads first ([B, H, L, d]): plain batched matmuls, no transposes of the [L, L] scores.
    q, k, v = (t.reshape(b, length, h, t.shape[-1] // h).transpose(0, 2, 1, 3)
               for t in (q, k, v))
    attn = []
    for (rows, keys), rab in zip(blocks, rabs):
      scores = jnp.einsum("bhid,bhjd->bhij", q[:, :, rows], k[:, :, keys]) + rab[:, None]
      # Divide by the configured max length, not the padded one: the scale must not
      # depend on how a batch was padded (length buckets, serving batch shapes).
      attn.append(nn.silu(scores) / c.max_len * mask[:, :, rows, keys])
    attn = layers.Dropout(c.attention_dropout)(
        attn, deterministic, blocks_of=layers.attention_blocks_of(blocks, b, h, queries, length))
    out = [jnp.einsum("bhij,bhjd->bhid", a, v[:, :, keys]) for a, (_, keys) in zip(attn, blocks)]
    out = jnp.concatenate(out, axis=2) if len(out) > 1 else out[0]
    out = out.transpose(0, 2, 1, 3).reshape(b, queries, h * dv)
    out = layers.layer_norm(out, 1e-6, dtype)
    out = layers.Dropout(c.dropout)(u * out, deterministic)
    return x + layers.dense(c.embedding_dim, (layers.MLP, layers.EMBED), dtype=dtype,
                            name="out")(out)


class HSTU(nn.Module):
  """Maps item histories ``[B, L]`` (and their times) to user representations ``[B, L, D]``."""

  config: HSTUConfig

  def setup(self):
    c = self.config
    self.item_embedding, self.position_embedding, self.input_dropout = (
        layers.input_modules(c))
    self.relative_bias = RelativeBias(c)
    self.blocks = [HSTUBlock(c) for _ in range(c.num_blocks)]

  def __call__(self, item_ids: jax.Array, timestamps: jax.Array | None = None,
               query_timestamps: jax.Array | None = None, *,
               deterministic: bool = True, last_only: bool = False) -> jax.Array:
    """``[B, L]`` ids -> ``[B, L, D]``; with ``last_only``, ``[B, 1, D]`` for position L-1.

    ``last_only`` (scoring and serving) runs the final block for the last query only:
    the same numbers as ``[:, -1:]`` of the full output.
    """
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    x, valid = layers.embed_sequence(self.item_embedding, self.position_embedding,
                                     self.input_dropout, item_ids, deterministic, dtype)
    mask = layers.causal_mask(valid).astype(dtype)
    length = item_ids.shape[-1]

    def biases(blocks):  # computed once, shared by the blocks
      return [self.relative_bias(timestamps, query_timestamps, length, rows, keys
                                 ).astype(dtype) for rows, keys in blocks]

    blocks = layers.causal_blocks(length)
    rabs = biases(blocks)
    for i, block in enumerate(self.blocks):
      if last_only and i == len(self.blocks) - 1:
        last = layers.causal_blocks(length, last_only=True)
        x = block(x, mask, biases(last), last, deterministic, last_only=True)
      else:
        x = block(x, mask, rabs, blocks, deterministic)
      x = x * valid[:, -x.shape[1]:, None]
    if last_only:
      x = x[:, -1:]
    x = x.astype(jnp.float32)  # float32 out: the loss and scoring
    return layers.l2_normalize(x) if c.l2_normalize else x

  def candidates(self, ids: jax.Array) -> jax.Array:
    return self.item_embedding.candidates(ids).astype(jnp.float32)  # for the loss

  def all_candidates(self) -> jax.Array:
    return self.item_embedding.all_candidates().astype(jnp.float32)  # loss and scoring
