"""Pieces shared by the models: the item embedding (and the per-feature tables of the
ranking models built from it), positions, masks.

Parameters carry *logical* axis names (``vocab``, ``embed``, ``mlp``, ``heads``,
...); :mod:`trainers.sharding` places them on the mesh. An embedding table (axes
``vocab``, ``embed``) is sharded by its plan, and its lookups go through
:func:`trainers.sharding.lookup`, so sharding a table is a plan, not a model change.
"""

from __future__ import annotations

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


def keep_mask(rng: Array, shape: tuple[int, ...], keep: float) -> Array:
  """Bernoulli(``keep``) mask from a counter-based hash keyed by two threefry words.

  Element ``i`` keeps iff ``fmix32(fmix32(i + s0) ^ s1) < keep * 2**32``. This is
  ~25x cheaper on CPU than ``jax.random.bernoulli`` (threefry's 20 rounds per
  element dominated the train step) and statistically ample for dropout.
  """
  seeds = jax.random.bits(rng, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  h = _fmix32(_fmix32(index + seeds[0]) ^ seeds[1])
  return h < jnp.uint32(min(int(keep * 2**32), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout with :func:`keep_mask` (the project's one dropout)."""

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = keep_mask(self.make_rng("dropout"), x.shape, keep)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


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


def dense(features_: int, axes: tuple[str, str], *, use_bias: bool = True,
          kernel_init: Callable = nn.initializers.xavier_uniform(),
          dtype: Any = None, name: str | None = None) -> nn.Dense:
  """A Dense layer whose kernel carries logical axis names.

  Its parameters are float32; it computes in ``dtype`` (inputs, kernel and bias cast to
  it; None: the promoted dtype of inputs and parameters).
  """
  return nn.Dense(
      features_, use_bias=use_bias, name=name, dtype=dtype, param_dtype=jnp.float32,
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
    """Embeddings of items as ranking candidates (normalised if configured)."""
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
