"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer trained by cloze.

"BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
Transformer". A fraction of the items of a sequence is replaced by a learned ``[MASK]``
vector and predicted from both sides; at inference ``[MASK]`` follows the history and
its position is scored.

As in the paper and its code (BERT's): item + learned position embeddings (no
``sqrt(d)`` scale), LayerNorm, dropout; post-LN blocks ``x = LN(x + Dropout(MHA(x)))``,
``x = LN(x + Dropout(FFN(x)))`` with a GELU (tanh form) feed-forward network; every
valid position attends to every valid one. The output layer is the original code's
``LN(GELU(W h + b))`` followed by the item table (tied) plus a per-item bias. So that
a score stays a dot product (the models' contract), user vectors are ``[h, 1]`` and
candidates ``[E[item], bias[item]]`` (``D + 1`` wide); with ``l2_normalize`` ``h`` and
``E[item]`` are unit-length (the bias column is not). All weights start from a
truncated normal of stddev 0.02 (BERT's ``initializer_range``).

``dtype`` is the computation dtype: with ``bfloat16`` the dense layers, attention
matmuls and the residual stream run in bf16, while parameters, layer-norm statistics,
the attention softmax, the output layer and the output stay float32.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainers import features, layers
from trainers.models import sasrec

_EPS = 1e-12  # BERT's layer-norm epsilon


@dataclasses.dataclass(frozen=True)
class BERT4RecConfig:
  vocab_size: int = 0          # item rows incl. PAD and OOV; set from dataset_info
  max_len: int = 200
  embedding_dim: int = 64
  num_blocks: int = 2
  num_heads: int = 2
  ffn_dim: int = 256
  # BERT's 0.1 (the paper's ML-1M setting, and Klenitskiy & Vasilev's): on ml-1m-partial
  # it selected a better validation NDCG@10 than 0.2 (benchmarks/results/sequential.md)
  dropout: float = 0.1         # hidden dropout (embeddings, residual branches)
  attention_dropout: float = 0.1
  mask_rate: float = 0.2       # cloze: the fraction of items replaced by [MASK]
  l2_normalize: bool = False
  dtype: str = "float32"       # computation dtype (layers.DTYPES); parameters stay float32

  CLOZE = True  # trained by cloze (``mask_positions`` + ``BERT4Rec.cloze``), not next-item

  def __post_init__(self):
    layers.compute_dtype(self.dtype, "BERT4RecConfig")
    if self.embedding_dim % self.num_heads:
      raise ValueError(f"BERT4RecConfig: embedding_dim {self.embedding_dim} is not a "
                       f"multiple of num_heads {self.num_heads}")


def mask_positions(rng: jax.Array, weights: jax.Array, rate: float) -> jax.Array:
  """Cloze positions ``[B, L]`` bool: each position with ``weights > 0`` independently
  with probability ``rate`` (:func:`trainers.layers.keep_mask`), never a padding one;
  a row with a valid position and no draw gets its last valid position, so every
  sequence contributes. A function of ``rng`` alone (resume stays exact)."""
  valid = weights > 0
  drawn = layers.keep_mask(rng, weights.shape, rate) & valid
  # the last valid position: valid, and no valid position after it
  after = jnp.cumsum(valid[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]
  last = valid & (after == 1)
  return drawn | (last & ~jnp.any(drawn, axis=1, keepdims=True))


def _dense(features_: int, axes: tuple[str, str], dtype, name: str) -> nn.Dense:
  return layers.dense(features_, axes, kernel_init=layers.truncated_normal(0.02),
                      dtype=dtype, name=name)


class _Block(nn.Module):
  """Post-LN Transformer block (bidirectional attention over the valid keys)."""

  config: BERT4RecConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, last_only: bool = False):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    # sasrec's attention with a non-causal mask; its ``dropout`` is on the weights
    attention = sasrec.CausalSelfAttention(
        sasrec.SASRecConfig(num_heads=c.num_heads, dropout=c.attention_dropout,
                            dtype=c.dtype), causal=False, name="attention")
    h = attention(x, mask, deterministic, last_only)
    if last_only:
      x = x[:, -1:]
    x = layers.LayerNorm(epsilon=_EPS, dtype=dtype, name="attention_norm")(
        x + layers.Dropout(c.dropout)(h, deterministic))
    h = _dense(c.ffn_dim, (layers.EMBED, layers.MLP), dtype, "ffn_in")(x)
    h = _dense(c.embedding_dim, (layers.MLP, layers.EMBED), dtype, "ffn_out")(
        jax.nn.gelu(h, approximate=True))
    return layers.LayerNorm(epsilon=_EPS, dtype=dtype, name="ffn_norm")(
        x + layers.Dropout(c.dropout)(h, deterministic))


class BERT4Rec(nn.Module):
  """Maps item histories ``[B, L]`` to user representations ``[B, L, D + 1]``."""

  config: BERT4RecConfig

  def setup(self):
    c = self.config
    self.item_embedding, self.position_embedding, self.input_dropout = (
        layers.input_modules(c))
    self.mask_embedding = self.param(
        "mask_embedding", nn.with_logical_partitioning(layers.truncated_normal(0.02),
                                                       (layers.EMBED,)),
        (c.embedding_dim,), jnp.float32)
    self.input_norm = layers.LayerNorm(epsilon=_EPS)
    self.blocks = [_Block(c) for _ in range(c.num_blocks)]
    self.head = _dense(c.embedding_dim, (layers.EMBED, layers.EMBED), jnp.float32, None)
    self.head_norm = layers.LayerNorm(epsilon=_EPS)
    self.bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, (layers.VOCAB,)),
        (layers.padded_rows(c.vocab_size),), jnp.float32)

  def encode(self, tokens: jax.Array, masked: jax.Array, *, deterministic: bool = True,
             last_only: bool = False) -> jax.Array:
    """The encoder's output ``[B, L, D]`` (``[B, 1, D]`` with ``last_only``: the final
    block runs for the last position only), in the computation dtype.

    ``tokens`` ``[B, L]`` int32; at ``masked`` positions the ``[MASK]`` vector replaces
    the item (such a position is valid even if its token is PAD).
    """
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    valid = (tokens != features.PAD_ID) | masked
    x = jnp.where(masked[..., None], self.mask_embedding, self.item_embedding(tokens))
    x = self.input_norm(x + self.position_embedding(tokens.shape[-1])[None]).astype(dtype)
    x = self.input_dropout(x, deterministic)
    mask = valid[:, None, None, :]  # [B, 1, 1, L]: any query, the valid keys
    for i, block in enumerate(self.blocks):
      x = block(x, mask, deterministic, last_only=last_only and i == len(self.blocks) - 1)
    if last_only:
      x, valid = x[:, -1:], valid[:, -1:]
    return x * valid[..., None].astype(x.dtype)

  def cloze(self, tokens: jax.Array, masked: jax.Array, *, deterministic: bool = True,
            last_only: bool = False) -> jax.Array:
    """``[B, L, D + 1]`` float32 user vectors ``[h, 1]`` (zero at padding) of the
    encoder over ``tokens`` with ``[MASK]`` at ``masked``; ``h . E[i] + bias[i]`` is the
    logit of item ``i`` at a position."""
    x = self.encode(tokens, masked, deterministic=deterministic, last_only=last_only)
    valid = ((tokens != features.PAD_ID) | masked)[:, -x.shape[1]:, None]
    h = self.head_norm(jax.nn.gelu(self.head(x.astype(jnp.float32)), approximate=True))
    if self.config.l2_normalize:
      h = layers.l2_normalize(h)
    return jnp.concatenate([h, jnp.ones_like(h[..., :1])], axis=-1) * valid

  def __call__(self, item_ids: jax.Array, timestamps: jax.Array | None = None,
               query_timestamps: jax.Array | None = None, *,
               deterministic: bool = True, last_only: bool = False) -> jax.Array:
    """Next-item inference: ``[MASK]`` after the history, at position L-1.

    The history shifts left by one (its oldest item drops out: with no left padding,
    L-1 items are used) so that the length stays L and ``[MASK]`` sits where training
    puts the most recent item. Only the last position's output predicts the next item
    (the others are the encodings of the history's items).
    """
    del timestamps, query_timestamps  # BERT4Rec ignores time
    pad = jnp.full_like(item_ids[:, :1], features.PAD_ID)
    tokens = jnp.concatenate([item_ids[:, 1:], pad], axis=1)
    masked = jnp.zeros(tokens.shape, bool).at[:, -1].set(True)
    return self.cloze(tokens, masked, deterministic=deterministic, last_only=last_only)

  def candidates(self, ids: jax.Array) -> jax.Array:
    """``[..., D + 1]``: ``[E[id], bias[id]]``."""
    emb = self.item_embedding.candidates(ids).astype(jnp.float32)
    return jnp.concatenate([emb, jnp.take(self.bias, ids)[..., None]], axis=-1)

  def all_candidates(self) -> jax.Array:
    """``[padded_rows, D + 1]``: the item table with the bias column."""
    table = self.item_embedding.all_candidates().astype(jnp.float32)
    return jnp.concatenate([table, self.bias[:, None]], axis=-1)
