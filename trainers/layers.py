"""Pieces shared by the models: the item embedding (and the per-feature tables of the
ranking models built from it), positions, masks.

Parameters carry *logical* axis names (``vocab``, ``embed``, ``mlp``, ``heads``,
...); :mod:`trainers.sharding` places them on the mesh. An embedding table (axes
``vocab``, ``embed``) is sharded by its plan, and its lookups go through
:func:`trainers.sharding.lookup`, so sharding a table is a plan, not a model change.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainers import features, sharding

Array = jax.Array

# Logical axis names used by parameters and activations (defined with the mesh rules).
VOCAB = sharding.VOCAB
EMBED = sharding.EMBED
MLP = sharding.MLP
HEADS = sharding.HEADS
POSITION = sharding.POSITION
BUCKETS = sharding.BUCKETS

# Embedding tables have a multiple of this many rows (zero rows past ``vocab_size``,
# never looked up), so that one shape shards row-wise over 1, 2, 4, ..., 64 devices and
# a checkpoint restores onto any of them.
ROW_ALIGNMENT = 64


def padded_rows(vocab_size: int) -> int:
  """Rows of a table of ``vocab_size`` ids: rounded up to :data:`ROW_ALIGNMENT`."""
  return -(-vocab_size // ROW_ALIGNMENT) * ROW_ALIGNMENT


def truncated_normal(stddev: float = 0.02) -> Callable:
  return nn.initializers.truncated_normal(stddev=stddev)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  """Unit-length rows; zero rows stay zero with a finite gradient (no sqrt at 0)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _fmix32(h: Array) -> Array:
  """MurmurHash3's 32-bit finaliser: a bijective avalanche mix."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def keep_mask(rng: Array, shape: tuple[int, ...], keep: float,
              window: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> Array:
  """Bernoulli(``keep``) mask from a counter-based hash keyed by two threefry words.

  Element ``i`` keeps iff ``fmix32(fmix32(i + s0) ^ s1) < keep * 2**32``. This is
  ~25x cheaper on CPU than ``jax.random.bernoulli`` (threefry's 20 rounds per
  element dominated the train step) and statistically ample for dropout.

  ``window``: ``(whole_shape, start)``: the mask is the block at ``start`` of the
  mask of a ``whole_shape`` array (``i`` is the element's index in the whole array),
  so that an array computed block by block is dropped as it would be whole.
  """
  seeds = jax.random.bits(rng, (2,), jnp.uint32)
  if window is None:
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  else:
    whole, start = window
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
      position = jax.lax.broadcasted_iota(jnp.uint32, shape, axis) + jnp.uint32(start[axis])
      index, stride = index + position * jnp.uint32(stride), stride * whole[axis]
  h = _fmix32(_fmix32(index + seeds[0]) ^ seeds[1])
  return h < jnp.uint32(min(int(keep * 2**32), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout with :func:`keep_mask` (the project's one dropout)."""

  rate: float

  @nn.compact
  def __call__(self, x: Array | list[Array], deterministic: bool,
               blocks_of: tuple[tuple[int, ...], list[tuple[int, ...]]] | None = None
               ) -> Array | list[Array]:
    """``x`` dropped; or ``x`` a list of blocks of one array, ``blocks_of`` ``(its shape,
    [each block's start])``: each block dropped as its part of the whole array would be
    (one mask, however the array is cut: :func:`keep_mask`'s ``window``)."""
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    rng = self.make_rng("dropout")
    if blocks_of is None:
      return jnp.where(keep_mask(rng, x.shape, keep), x / keep, jnp.zeros_like(x))
    whole, starts = blocks_of
    return [jnp.where(keep_mask(rng, block.shape, keep, (whole, start)), block / keep,
                      jnp.zeros_like(block)) for block, start in zip(x, starts)]


# Computation dtypes a model config's ``dtype`` may name. Parameters, optimizer state
# and the loss stay float32 whatever it says (mixed precision).
DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str, owner: str = "") -> jnp.dtype:
  """The computation dtype a model config's ``dtype`` field names (:data:`DTYPES`).

  Raises:
    ValueError: naming the field (and ``owner``, the config class) for any other value.
  """
  if name not in DTYPES:
    prefix = f"{owner}: " if owner else ""
    raise ValueError(f"{prefix}dtype must be one of {DTYPES}, got {name!r}")
  return jnp.dtype(name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def layer_norm(x: jax.Array, epsilon: float, dtype) -> jax.Array:
  """``nn.LayerNorm(epsilon, use_scale=False, use_bias=False, dtype=dtype)(x)``: the same
  numbers (statistics in float32), with the backward pass written out.

  The backward pass is the closed form ``(g - mean(g) - y mean(g y)) / sigma`` rather
  than autodiff through the fast-variance formula. Measured on a 2-core CPU, the SASRec
  train step is unchanged within noise (6.55 s/epoch either way).
  """
  return _layer_norm_fwd(x, epsilon, dtype)[0]


def _layer_norm_fwd(x, epsilon, dtype):
  stats = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(stats, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(jax.lax.square(stats), axis=-1, keepdims=True)
                    - jax.lax.square(mean))
  mul = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * mul
  return y.astype(dtype), (y, mul, jnp.zeros((0,), x.dtype))


def _layer_norm_bwd(epsilon, dtype, res, g):
  del epsilon, dtype
  y, mul, x_dtype = res
  g = g.astype(y.dtype)
  dx = mul * (g - jnp.mean(g, axis=-1, keepdims=True)
              - y * jnp.mean(g * y, axis=-1, keepdims=True))
  return (dx.astype(x_dtype.dtype),)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """``nn.LayerNorm`` (same parameters ``scale`` and ``bias``, same numbers up to float
  rounding) over :func:`layer_norm`'s closed-form backward pass."""

  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    y = layer_norm(x, self.epsilon, jnp.float32)
    return (y * scale + bias).astype(dtype)


def _plain_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[M, K] @ [K, N]`` accumulated in float32, the result in ``a``'s dtype."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [..., K] @ w [K, N]`` for bfloat16 operands, in the one form XLA's CPU backend
  runs at its bfloat16 rate: a plain-layout dot accumulated in float32.

  On this project's CPU (AVX512-BF16, jax 0.10.2), ``[2048, 1024] x [1024, 1024]`` ran at
  twice the float32 rate only so; a bfloat16 result, or the transposed contractions of
  the usual backward (``g @ w.T``, ``x.T @ g``), ran at the float32 rate or below. So the
  backward here transposes its operands explicitly (behind an optimization barrier, so
  that the transpose is not folded back into the dot) and runs plain dots too.
  """
  return _plain_matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def _bf16_matmul_fwd(x, w):
  return bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(res, g):
  x, w = res
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]).astype(x.dtype)
  dx = _plain_matmul(g2, jax.lax.optimization_barrier(w.T)).reshape(x.shape)
  dw = _plain_matmul(jax.lax.optimization_barrier(x2.T), g2)
  return dx, dw.astype(w.dtype)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """``jax.lax.dot_general`` for :func:`dense`: on CPU, a Dense layer's bfloat16
  contraction (the input's last axis with the kernel's first, no batch axes) goes through
  :func:`bf16_matmul`; anything else (and every contraction on GPU and TPU, whose
  libraries accumulate bfloat16 in float32 and take transposed operands as they are) is
  ``dot_general`` itself."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  if (jax.default_backend() == "cpu" and lhs.dtype == jnp.bfloat16
      and rhs.dtype == jnp.bfloat16 and rhs.ndim == 2
      and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and batch == ((), ()) and preferred_element_type in (None, jnp.bfloat16)):
    return bf16_matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def dense(features_: int, axes: tuple[str, str], *, use_bias: bool = True,
          kernel_init: Callable = nn.initializers.xavier_uniform(),
          dtype: Any = None, name: str | None = None) -> nn.Dense:
  """A Dense layer whose kernel carries logical axis names.

  Its parameters are float32; it computes in ``dtype`` (inputs, kernel and bias cast to
  it; None: the promoted dtype of inputs and parameters); in bfloat16 through
  :func:`bf16_matmul` (float32 accumulation).
  """
  return nn.Dense(
      features_, use_bias=use_bias, name=name, dtype=dtype, param_dtype=jnp.float32,
      dot_general=dense_dot_general,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


class ItemEmbedding(nn.Module):
  """The item table. The one module every model uses for item ids.

  Row ``features.PAD_ID`` is padding; lookups of it return zeros. The table's
  axes are (``vocab``, ``embed``); it has :func:`padded_rows` rows, those past
  ``vocab_size`` zero and never looked up (so that it shards evenly row-wise). Lookups
  go through :func:`trainers.sharding.lookup` under the table's name (its module path).

  Attributes:
    vocab_size: ids, including padding and OOV.
    features: embedding width.
    normalize: return L2-normalised vectors (the HSTU paper's setting).
  """

  vocab_size: int
  features: int
  normalize: bool = False
  stddev: float = 0.02

  def setup(self):
    rows = padded_rows(self.vocab_size)

    def init(key, shape, dtype=jnp.float32):
      # The first vocab_size rows are drawn as for an unpadded table; the rest are zero.
      del shape
      table = truncated_normal(self.stddev)(key, (self.vocab_size, self.features), dtype)
      return jnp.pad(table, ((0, rows - self.vocab_size), (0, 0)))

    self.table = self.param("embedding", nn.with_logical_partitioning(init, (VOCAB, EMBED)),
                            (rows, self.features), jnp.float32)

  def _lookup(self, ids: Array) -> Array:
    return sharding.lookup(self.table, ids, "/".join(self.scope.path))

  def __call__(self, ids: Array) -> Array:
    """Raw (unnormalised) embeddings of ``ids``, zero at padding."""
    emb = self._lookup(ids)
    return emb * (ids != features.PAD_ID)[..., None].astype(emb.dtype)

  def candidates(self, ids: Array) -> Array:
    """Embeddings of items as ranking candidates (normalised if configured).

    With more ids than rows (a sampled softmax's negatives: ~400k draws from a few
    thousand items), each row is normalised once and the rows are gathered from the
    result: the same numbers as normalising every gathered row, at a fraction of the
    work (forward and backward), and the gather's result, larger than the table, is
    no bigger than before.
    """
    if self.normalize and ids.size > self.table.shape[0]:
      table = l2_normalize(self._lookup(jnp.arange(self.table.shape[0])))
      return jnp.take(table, ids, axis=0, mode="clip")
    emb = self._lookup(ids)
    return l2_normalize(emb) if self.normalize else emb

  def all_candidates(self) -> Array:
    """The whole table as candidates: ``[padded_rows(vocab_size), features]``; scores of
    the rows past ``vocab_size`` must be dropped (they are padding)."""
    return l2_normalize(self.table) if self.normalize else self.table


POOLINGS = ("mean", "sum")


class FeatureEmbeddings(nn.Module):
  """One :class:`ItemEmbedding` table per categorical feature (the ranking models' input).

  Every table has the axes (``vocab``, ``embed``) and row ``features.PAD_ID`` = 0
  looks up zeros (a present value is never 0; 1 is out-of-vocabulary). Tables are
  named ``sparse_<i>`` (``i``: the feature's position in ``batch["sparse"]``) and
  ``multi_hot_<name>``.

  Attributes:
    vocab_sizes: rows of each single-valued feature's table (incl. PAD and OOV).
    dims: embedding width of each single-valued feature (same length).
    multi_hot: ``(name, vocab_size, dim)`` of each multi-valued feature, pooled over
      its non-padding ids.
    pooling: ``mean`` or ``sum`` over a multi-hot row's ids; an all-padding row
      pools to zeros.
    stddev: truncated-normal initialisation scale of every table.
  """

  vocab_sizes: tuple[int, ...]
  dims: tuple[int, ...]
  multi_hot: tuple[tuple[str, int, int], ...] = ()
  pooling: str = "mean"
  stddev: float = 0.02

  @nn.compact
  def __call__(self, sparse: Array | None, multi_hot: Any = None) -> list[Array]:
    """``sparse`` ``[B, Nc]`` and ``{name: [B, M]}`` -> ``Nc + len(multi_hot)`` arrays ``[B, d]``.

    Ids must lie in ``[0, vocab_size)``; JAX's gather fills out-of-range rows with NaN.
    ``sparse`` may be None when there are no single-valued features.
    """
    if sparse is None:
      if self.vocab_sizes:
        raise ValueError(f"the batch has no 'sparse' ids for the {len(self.vocab_sizes)} "
                         "tables (vocab_sizes)")
    elif sparse.shape[-1] != len(self.vocab_sizes):
      raise ValueError(f"batch['sparse'] has {sparse.shape[-1]} features, the model "
                       f"{len(self.vocab_sizes)} tables (vocab_sizes)")
    out = [ItemEmbedding(v, d, stddev=self.stddev, name=f"sparse_{i}")(sparse[..., i])
           for i, (v, d) in enumerate(zip(self.vocab_sizes, self.dims))]
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    multi_hot = multi_hot or {}
    for name, vocab, dim in self.multi_hot:
      if name not in multi_hot:
        raise ValueError(f"the batch has no multi-hot feature {name!r} "
                         f"(it has {sorted(multi_hot)})")
      ids = multi_hot[name]
      pooled = jnp.sum(ItemEmbedding(vocab, dim, stddev=self.stddev,
                                     name=f"multi_hot_{name}")(ids), axis=-2)
      if self.pooling == "mean":
        count = jnp.sum(ids != features.PAD_ID, axis=-1, keepdims=True)
        pooled = pooled / jnp.maximum(count, 1).astype(pooled.dtype)
      out.append(pooled)
    return out


class PositionEmbedding(nn.Module):
  """Learned absolute positions for right-aligned sequences.

  Sequences are padded on the left, so position ``L-1`` is always the most
  recent item: a position embedding encodes recency.
  """

  max_len: int
  features: int

  @nn.compact
  def __call__(self, length: int) -> Array:
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(truncated_normal(0.02), (POSITION, EMBED)),
        (self.max_len, self.features), jnp.float32)
    return table[self.max_len - length:]


def input_modules(config: Any) -> tuple[ItemEmbedding, PositionEmbedding, Dropout]:
  """The input block's modules, for a sequential model's ``setup``.

  ``config`` has ``vocab_size``, ``max_len``, ``embedding_dim``, ``l2_normalize`` and
  ``dropout``. Assign them as ``self.item_embedding, self.position_embedding,
  self.input_dropout``: those attribute names are the parameter paths that checkpoints
  and serving bundles hold.
  """
  return (ItemEmbedding(config.vocab_size, config.embedding_dim,
                        normalize=config.l2_normalize),
          PositionEmbedding(config.max_len, config.embedding_dim),
          Dropout(config.dropout))


# HSTU's causal attention is computed in blocks of about this many queries; a block's queries
# attend only the keys up to its last query, so the keys that every query of a block
# masks are never scored (L = 200 in blocks of 50: 10/16 of the L x L scores).
ATTENTION_BLOCK = 50


def causal_blocks(length: Any, last_only: bool = False) -> list[tuple[slice, slice]]:
  """``(queries, keys)`` slices of causal attention over ``length`` positions.

  Query block ``[s, e)`` attends keys ``[0, e)``: the keys after ``e`` are masked for
  all of its queries, so leaving them out changes no weight that a query may attend
  (their weights are exactly zero). ``last_only``: the last query over every key. A
  symbolic ``length`` (``jax.export``) or one up to :data:`ATTENTION_BLOCK` is one block.
  """
  if last_only:
    return [(slice(-1, None), slice(None))]
  if not isinstance(length, int) or length <= ATTENTION_BLOCK:
    return [(slice(None), slice(None))]
  n = -(-length // ATTENTION_BLOCK)
  bounds = [t * length // n for t in range(n + 1)]
  return [(slice(s, e), slice(0, e)) for s, e in zip(bounds[:-1], bounds[1:])]


def attention_blocks_of(blocks: list[tuple[slice, slice]], batch: int, heads: int,
                        queries: Any, length: Any):
  """:class:`Dropout`'s ``blocks_of`` for attention weights computed in ``blocks``
  (:func:`causal_blocks`): each block's place in the whole ``[B, H, queries, L]`` weights
  (``queries``: ``L``, or 1 for the last query only), so that the dropout mask is the
  one the whole array would get."""
  first = length - queries  # the first query's position
  starts = [0 if rows.start is None else (rows.start if rows.start >= 0 else length + rows.start)
            for rows, _ in blocks]
  return (batch, heads, queries, length), [(0, 0, s - first, 0) for s in starts]


def causal_mask(valid: Array) -> Array:
  """``[B, 1, L, L]`` boolean: query i may attend to key j iff j <= i and j is valid."""
  length = valid.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None, None] & valid[:, None, None, :]


def embed_sequence(item_emb: ItemEmbedding, pos_emb: PositionEmbedding, dropout: Dropout,
                   item_ids: Array, deterministic: bool,
                   dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """Shared input block: ``E[item] * sqrt(d) + P[pos]``, dropout, zeroed padding.

  The sum is formed from the float32 tables and then cast to the computation ``dtype``.

  Returns:
    (``[B, L, D]`` embeddings in ``dtype``, ``[B, L]`` validity mask).
  """
  valid = item_ids != features.PAD_ID
  x = item_emb(item_ids) * jnp.sqrt(float(item_emb.features))
  x = (x + pos_emb(item_ids.shape[-1])[None]).astype(dtype)
  x = dropout(x, deterministic)
  return x * valid[..., None], valid
