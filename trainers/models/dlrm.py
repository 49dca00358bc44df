"""DLRM v2 (DLRM-DCNv2) and DCN-V2: click probability from dense and categorical features.

The network, for a batch of the ranking contract (:mod:`trainers.input_pipeline`)::

    dense, dense_missing --bottom MLP--> v   (no bottom MLP, and no v, when Nd == 0)
    sparse, multi_hot/*  --one table per feature--> e_1 .. e_F   (layers.FeatureEmbeddings)
    x0 = [v, e_1, .., e_F]                                        (flat concatenation)
    interaction:  dcnv2   x_{l+1} = x0 * (W x_l + b) + x_l, W full or low rank U V^T
                  dot     [v, <t_i, t_j> for i < j] over t = (v, e_1, .., e_F)   (DLRM)
                  concat  x0
    structure:    stacked   h = deep_mlp(interaction)                 (deep_mlp may be empty)
                  parallel  h = [interaction, deep_mlp(x0)]
    logit = Dense(1)(top_mlp(h))                                      ([B] float32)

MLPs are Dense -> BatchNorm (``batch_norm``) -> ReLU -> Dropout (``dropout``), as in
FuxiCTR; batch norm and dropout apply to the deep and top MLPs only (not to the bottom
MLP, whose every layer ends in a ReLU, as in MLPerf). The top MLP's widths exclude
the logit layer, which is always there.

Batch norm keeps its statistics in the ``batch_stats`` collection. Training calls
``apply({"params": p, "batch_stats": s}, batch, deterministic=False,
rngs={"dropout": r}, mutable=["batch_stats"])``: batch statistics over the rows whose
``weight`` is > 0 (padding rows do not count), running averages updated with momentum
0.9 (PyTorch's 0.1). Evaluation and serving call ``deterministic=True`` with no
mutable collection and use the running averages. Without ``batch_norm`` there is no
``batch_stats`` collection.

Embedding L2 (``embedding_l2``, :meth:`DLRM.regularization`): ``l2 / 2 * sum(W**2)``
over every row of every embedding table, added to the batch's mean loss at each step.
This is FuxiCTR's ``embedding_regularizer`` (``BaseModel.add_regularization``
penalises the whole ``embedding_layer`` parameters, not only the rows looked up in
the batch), so BARS's tuned values carry over unchanged.

``dtype`` is the computation dtype: with ``bfloat16`` the embeddings (looked up in
float32) are cast to bf16 and the MLPs, cross layers and dot interaction run in bf16;
parameters, batch-norm statistics, the regulariser and the logit layer (float32 logits
for the loss and scoring) stay float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trainers import layers

INTERACTIONS = ("dcnv2", "dot", "concat")
STRUCTURES = ("stacked", "parallel")


@dataclasses.dataclass(frozen=True)
class DLRMConfig:
  """A ranking model; see the module docstring for the network each field shapes."""

  TASK: ClassVar[str] = "ranking"

  # Set at train time from the dataset (like SASRec's vocab_size):
  vocab_sizes: tuple[int, ...] = ()   # rows of each categorical feature's table, in
                                      # batch["sparse"] order (incl. PAD 0 and OOV 1)
  num_dense: int = 0                  # Nd: dense features (0: no bottom MLP)
  multi_hot: tuple[tuple[str, int], ...] = ()  # (name, vocab size) of multi-hot features
  # embeddings
  embed_dim: int = 16
  embed_dims: tuple[int, ...] = ()    # per categorical feature; () = embed_dim for all
  embed_init_stddev: float = 0.02     # truncated normal
  multi_hot_pooling: str = "mean"     # or "sum"; padding (0) ids are left out
  embedding_l2: float = 0.0           # lambda of the whole-table L2 (see module docstring)
  # towers
  bottom_mlp: tuple[int, ...] = (64, 16)  # () feeds [dense, dense_missing] in as they are
  interaction: str = "dcnv2"          # INTERACTIONS
  cross_layers: int = 3
  cross_rank: int = 0                 # 0 = full-rank W; r > 0 = U V^T with U, V d x r
  structure: str = "stacked"          # STRUCTURES
  deep_mlp: tuple[int, ...] = ()
  top_mlp: tuple[int, ...] = (64, 32)  # hidden widths; the logit layer is added
  batch_norm: bool = False
  dropout: float = 0.0
  dtype: str = "float32"              # computation dtype (layers.DTYPES); params stay float32

  def __post_init__(self):
    for name in ("vocab_sizes", "embed_dims", "bottom_mlp", "deep_mlp", "top_mlp"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    object.__setattr__(self, "multi_hot", tuple((str(n), int(v)) for n, v in self.multi_hot))
    checks = [
        (self.interaction in INTERACTIONS,
         f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}"),
        (self.structure in STRUCTURES,
         f"structure must be one of {STRUCTURES}, got {self.structure!r}"),
        (self.multi_hot_pooling in layers.POOLINGS,
         f"multi_hot_pooling must be one of {layers.POOLINGS}, got {self.multi_hot_pooling!r}"),
        (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
        (self.dtype in layers.DTYPES,
         f"dtype must be one of {layers.DTYPES}, got {self.dtype!r}"),
        (self.embedding_l2 >= 0, f"embedding_l2 must be >= 0, got {self.embedding_l2}"),
        (self.num_dense >= 0, f"num_dense must be >= 0, got {self.num_dense}"),
        (self.cross_layers >= 0, f"cross_layers must be >= 0, got {self.cross_layers}"),
        (self.cross_rank >= 0, f"cross_rank must be >= 0 (0 = full rank), got {self.cross_rank}"),
        (self.embed_dim >= 1 and all(d >= 1 for d in self.embed_dims),
         f"embedding dims must be >= 1, got embed_dim={self.embed_dim}, "
         f"embed_dims={self.embed_dims}"),
        (all(w >= 1 for w in self.bottom_mlp + self.deep_mlp + self.top_mlp),
         "MLP widths must be >= 1"),
        (all(v >= 2 for v in self.vocab_sizes) and all(v >= 2 for _, v in self.multi_hot),
         f"vocabulary sizes must be >= 2 (PAD and OOV rows), got {self.vocab_sizes} "
         f"and multi_hot {self.multi_hot}"),
        (not self.embed_dims or not self.vocab_sizes
         or len(self.embed_dims) == len(self.vocab_sizes),
         f"embed_dims has {len(self.embed_dims)} entries for {len(self.vocab_sizes)} "
         f"categorical features"),
        (all("/" not in n for n, _ in self.multi_hot),
         f"multi-hot feature names may not contain '/': {[n for n, _ in self.multi_hot]}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"DLRMConfig: {message}")
    if self.interaction == "dot":
      dims = set(self.feature_dims)
      if len(dims) > 1 or (self.embed_dims and self.embed_dims[0] != self.embed_dim):
        raise ValueError(f"DLRMConfig: the dot interaction needs one embedding width; got "
                         f"embed_dim={self.embed_dim}, embed_dims={self.embed_dims}")
      if self.num_dense and (not self.bottom_mlp or self.bottom_mlp[-1] != self.embed_dim):
        raise ValueError(f"DLRMConfig: the dot interaction needs the bottom MLP to end in "
                         f"embed_dim={self.embed_dim}; got bottom_mlp={self.bottom_mlp}")

  @property
  def feature_dims(self) -> tuple[int, ...]:
    """The embedding width of each categorical feature (``embed_dims`` or ``embed_dim``)."""
    return self.embed_dims or (self.embed_dim,) * len(self.vocab_sizes)


class MLP(nn.Module):
  """Dense -> [BatchNorm] -> ReLU -> [Dropout] per layer; ``activate_last=False`` leaves
  the last layer linear. ``mask`` ``[B, 1]`` marks the rows batch statistics count.
  Computes in ``dtype``; batch-norm statistics are float32."""

  widths: tuple[int, ...]
  batch_norm: bool = False
  dropout: float = 0.0
  activate_last: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               mask: jax.Array | None = None) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = layers.dense(width, (layers.EMBED, layers.MLP), dtype=self.dtype,
                       name=f"dense_{i}")(x)
      if i == len(self.widths) - 1 and not self.activate_last:
        break
      if self.batch_norm:
        x = nn.BatchNorm(
            use_running_average=deterministic, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, (layers.MLP,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (layers.MLP,)),
            name=f"norm_{i}")(x, mask=None if deterministic else mask)
      x = nn.relu(x)
      x = layers.Dropout(self.dropout)(x, deterministic)
    return x


class CrossNetwork(nn.Module):
  """DCN-V2 cross layers: ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``.

  ``rank == 0``: ``W_l`` full (``w_<l>``, kernel ``[d, d]``); ``rank > 0``:
  ``W_l = U_l V_l^T`` (``v_<l>`` kernel ``[d, r]`` without bias, then ``u_<l>``
  kernel ``[r, d]`` with the bias ``b_l``), TorchRec's ``LowRankCrossNet``. Computes
  in ``dtype``.
  """

  num_layers: int
  rank: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array) -> jax.Array:
    d = x0.shape[-1]
    x = x0
    for i in range(self.num_layers):
      if self.rank:
        h = layers.dense(self.rank, (layers.EMBED, layers.MLP), use_bias=False,
                         dtype=self.dtype, name=f"v_{i}")(x)
        h = layers.dense(d, (layers.MLP, layers.EMBED), dtype=self.dtype, name=f"u_{i}")(h)
      else:
        h = layers.dense(d, (layers.EMBED, layers.MLP), dtype=self.dtype, name=f"w_{i}")(x)
      x = x0 * h + x
    return x


def dot_interaction(vectors: jax.Array) -> jax.Array:
  """``[B, F, D]`` -> ``[B, F(F-1)/2]``: ``<t_i, t_j>`` for ``i < j`` (row-major order)."""
  f = vectors.shape[1]
  gram = jnp.einsum("bfd,bgd->bfg", vectors, vectors)
  rows, cols = np.triu_indices(f, k=1)
  return gram[:, rows, cols]


def embedding_l2(params: Mapping[str, Any], l2: float) -> jax.Array:
  """``l2 / 2 * sum(W**2)`` over every table under ``params["embeddings"]``."""
  if not l2:
    return jnp.zeros((), jnp.float32)
  tables = jax.tree.leaves(nn.meta.unbox(params["embeddings"]))
  return 0.5 * l2 * sum(jnp.sum(jnp.square(t)) for t in tables)


def _batch_array(batch: Mapping[str, Any], key: str) -> jax.Array:
  if key not in batch:
    raise ValueError(f"the ranking batch has no {key!r} (it has {sorted(batch)})")
  return jnp.asarray(batch[key])


class DLRM(nn.Module):
  """Maps a ranking batch (dict of arrays) to click logits ``[B]``."""

  config: DLRMConfig

  @nn.compact
  def __call__(self, batch: Mapping[str, Any], deterministic: bool = True) -> jax.Array:
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    # A dataset without single-valued categorical features may carry no "sparse".
    sparse = _batch_array(batch, "sparse") if c.vocab_sizes or "sparse" in batch else None
    mask = None
    if not deterministic and "weight" in batch:
      mask = (jnp.asarray(batch["weight"]) > 0)[:, None]
    parts = []
    if c.num_dense:
      dense = _batch_array(batch, "dense")
      missing = _batch_array(batch, "dense_missing")
      if dense.shape[-1] != c.num_dense or missing.shape != dense.shape:
        raise ValueError(f"batch['dense'] {dense.shape} / batch['dense_missing'] "
                         f"{missing.shape}: the model has num_dense={c.num_dense}")
      x = jnp.concatenate([dense, missing], axis=-1).astype(dtype)
      parts.append(MLP(c.bottom_mlp, dtype=dtype, name="bottom")(x, deterministic)
                   if c.bottom_mlp else x)
    multi_hot = {name: _batch_array(batch, f"multi_hot/{name}") for name, _ in c.multi_hot}
    embedded = layers.FeatureEmbeddings(
        c.vocab_sizes, c.feature_dims,
        multi_hot=tuple((name, vocab, c.embed_dim) for name, vocab in c.multi_hot),
        pooling=c.multi_hot_pooling, stddev=c.embed_init_stddev,
        name="embeddings")(sparse, multi_hot)
    embedded = [e.astype(dtype) for e in embedded]  # looked up in float32
    x0 = jnp.concatenate(parts + embedded, axis=-1)

    if c.interaction == "dcnv2":
      interaction = CrossNetwork(c.cross_layers, c.cross_rank, dtype, name="cross")(x0)
    elif c.interaction == "dot":
      pairs = dot_interaction(jnp.stack(parts + embedded, axis=1))
      interaction = jnp.concatenate(parts + [pairs], axis=-1)
    else:
      interaction = x0

    deep = MLP(c.deep_mlp, c.batch_norm, c.dropout, dtype=dtype, name="deep")
    if c.structure == "parallel":
      h = jnp.concatenate([interaction, deep(x0, deterministic, mask)], axis=-1)
    else:
      h = deep(interaction, deterministic, mask)
    h = MLP(c.top_mlp, c.batch_norm, c.dropout, dtype=dtype, name="top")(h, deterministic,
                                                                         mask)
    # The logit layer in float32: float32 logits for the loss and scoring.
    h = h.astype(jnp.float32)
    return layers.dense(1, (layers.MLP, layers.EMBED), name="logit")(h)[..., 0]

  def regularization(self, batch: Mapping[str, Any] | None = None) -> jax.Array:
    """The loss's regulariser: :func:`embedding_l2` of the bound params (``batch`` unused:
    the penalty covers whole tables, see the module docstring)."""
    del batch
    return embedding_l2(self.variables["params"], self.config.embedding_l2)


# Registry presets (trainers/models/__init__.py): DLRMConfig overrides.
PRESETS: dict[str, dict[str, Any]] = {
    # MLPerf Training DLRM-DCNv2 (torchrec_dlrm reference, Criteo 1TB multi-hot).
    "dlrm-v2": dict(embed_dim=128, bottom_mlp=(512, 256, 128), interaction="dcnv2",
                    cross_layers=3, cross_rank=512, structure="stacked", deep_mlp=(),
                    top_mlp=(1024, 1024, 512, 256)),
    # BARS Frappe_x1 DCN-V2 (FuxiCTR DCNv2_frappe_x1_007_c207b717): parallel, 4 full-rank
    # cross layers, DNN 400x3 with batch norm and dropout 0.4, embedding_regularizer 0.05,
    # embeddings initialised N(0, 1e-4).
    "dcnv2": dict(embed_dim=10, embed_init_stddev=1e-4, embedding_l2=0.05, bottom_mlp=(),
                  interaction="dcnv2", cross_layers=4, cross_rank=0, structure="parallel",
                  deep_mlp=(400, 400, 400), top_mlp=(), batch_norm=True, dropout=0.4),
    # The original DLRM's dot interaction with its Criteo-Kaggle shapes
    # (dlrm_s_pytorch: sparse 16, bottom 13-512-256-64-16, top 512-256-1).
    "dlrm": dict(embed_dim=16, bottom_mlp=(512, 256, 64, 16), interaction="dot",
                 structure="stacked", deep_mlp=(), top_mlp=(512, 256)),
}

# Recommended trainer settings (TrainConfig fields) per preset.
# dlrm-v2: MLPerf reference optimiser (Adagrad, lr 0.005, accumulators from 0) and
#   global batch 65,536, one epoch.
# dcnv2: BARS/FuxiCTR -- Adam lr 1e-3 (PyTorch betas 0.9/0.999), batch 4096, gradient
#   norm clipped at 10, early stopping on validation AUC with patience 2, seed 2021.
#   FuxiCTR multiplies the learning rate by 0.1 at every evaluation that does not
#   improve (reduce_lr_on_plateau, down to 1e-6): lr_decay_on_plateau=0.1.
# dlrm: the dcnv2 settings (the original DLRM trains with SGD, which TrainConfig lacks).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "dlrm-v2": dict(optimizer="adagrad", learning_rate=0.005, batch_size=65536,
                    eval_batch_size=65536, epochs=1, selection_metric="auc"),
    "dcnv2": dict(optimizer="adamw", learning_rate=1e-3, beta1=0.9, beta2=0.999,
                  weight_decay=0.0, grad_clip_norm=10.0, batch_size=4096,
                  eval_batch_size=4096, epochs=100, patience=2, selection_metric="auc",
                  lr_decay_on_plateau=0.1, seed=2021),
    "dlrm": dict(optimizer="adamw", learning_rate=1e-3, beta1=0.9, beta2=0.999,
                 weight_decay=0.0, grad_clip_norm=10.0, batch_size=4096,
                 eval_batch_size=4096, epochs=100, patience=2, selection_metric="auc",
                 lr_decay_on_plateau=0.1),
}

# Tiny shapes of each preset for smoke tests (same interaction and structure).
SMOKE_OVERRIDES: dict[str, dict[str, Any]] = {
    "dlrm-v2": dict(embed_dim=8, bottom_mlp=(16, 8), cross_rank=4, top_mlp=(16, 8)),
    "dcnv2": dict(embed_dim=8, deep_mlp=(16, 16)),
    "dlrm": dict(embed_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 8)),
}
