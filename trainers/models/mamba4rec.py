"""Mamba4Rec (Liu et al., arXiv 2403.03900, 2024): selective state space models for
sequential recommendation.

As in the paper's code (``chengkai-liu/Mamba4Rec``, which wraps ``mamba_ssm.Mamba``)::

    X = LayerNorm(Dropout(E[item]))                       (no positions, no sqrt(d))
    per layer:  H = Mamba(X)
                H = LayerNorm(Dropout(H))        one layer (no residual)
                H = LayerNorm(Dropout(H) + X)    stacked layers
                X = LayerNorm(H + Dropout(W2 Dropout(GELU(W1 H))))

``Mamba`` is the Mamba-1 block: an input projection to ``(x, z)``, a causal depthwise
convolution and SiLU on ``x``, input-dependent ``delta, B, C`` from ``x``, the selective
scan :func:`selective_scan`, gated by ``SiLU(z)``, and an output projection.

Sequences are right-aligned. Left padding is invisible: the convolution sees zeros
there and ``delta = u = 0`` keeps the scan's state exactly 0 through it, so the outputs
at real positions do not depend on how much padding precedes them; padded outputs are 0.

The scan runs over a symbolic length (``jax.export``): ``chunked`` and ``sequential``
directly, ``associative`` by padding the history to ``max_len`` first.

``dtype`` is the computation dtype: with ``bfloat16`` the projections, the convolution
and the feed-forward network run in bf16; parameters, ``delta``, the scan, layer-norm
statistics and the output (float32 for the loss and scoring) stay float32.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainers import features, layers

SCANS = ("associative", "chunked", "sequential")
INITS = ("mamba_ssm", "recbole")


@dataclasses.dataclass(frozen=True)
class Mamba4RecConfig:
  vocab_size: int = 0          # item rows incl. PAD and OOV; set from dataset_info
  max_len: int = 200
  embedding_dim: int = 64
  num_blocks: int = 1
  d_state: int = 32            # N: state size per channel
  d_conv: int = 4              # causal convolution width
  expand: int = 2              # d_inner = expand * embedding_dim
  dropout: float = 0.2
  l2_normalize: bool = False
  dtype: str = "float32"       # computation dtype (layers.DTYPES); parameters stay float32
  scan: str = "chunked"        # selective_scan method (SCANS)
  scan_chunk: int = 8          # steps per chunk (chunked): fastest fwd+bwd on CPU, 200/8
  # "mamba_ssm": its delta initialisation (dt_proj bias = softplus^-1 of a log-uniform
  # dt in [1e-3, 1e-1], weight U(+-dt_rank^-0.5)), the other dense kernels layers.dense's;
  # "recbole": what the paper's code ends up with after RecBole's _init_weights
  # re-initialises every Linear (weights N(0, 0.02), biases 0: dt_proj's too).
  init: str = "mamba_ssm"

  def __post_init__(self):
    layers.compute_dtype(self.dtype, "Mamba4RecConfig")
    if self.scan not in SCANS:
      raise ValueError(f"Mamba4RecConfig: scan must be one of {SCANS}, got {self.scan!r}")
    if self.scan_chunk < 1:
      raise ValueError(f"Mamba4RecConfig: scan_chunk must be >= 1, got {self.scan_chunk}")
    if self.init not in INITS:
      raise ValueError(f"Mamba4RecConfig: init must be one of {INITS}, got {self.init!r}")


# ---------------------------------------------------------------------------
# The selective scan
# ---------------------------------------------------------------------------


def _combine(left, right):
  """Composes two affine maps ``h -> a h + b`` (``left`` first)."""
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def _discretize(u, delta, A, B):
  """``exp(delta A)`` and ``delta B u``: ``[..., d, N]`` each."""
  return (jnp.exp(delta[..., None] * A),
          (delta * u)[..., None] * B[..., None, :])


def _scan_associative(u, delta, A, B, C):
  decay, inputs = _discretize(u, delta, A, B)                     # [b, l, d, N]
  _, h = jax.lax.associative_scan(_combine, (decay, inputs), axis=1)
  return jnp.einsum("bldn,bln->bld", h, C)


def _scan_sequential(u, delta, A, B, C):
  def step(h, xs):
    decay, inputs = _discretize(*xs[:2], A, xs[2])                # [b, d, N]
    h = decay * h + inputs
    return h, jnp.einsum("bdn,bn->bd", h, xs[3])

  h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
  xs = tuple(jnp.swapaxes(t, 0, 1) for t in (u, delta, B, C))     # time-major
  _, y = jax.lax.scan(step, h0, xs)
  return jnp.swapaxes(y, 0, 1)


def _scan_chunked(u, delta, A, B, C, chunk):
  b, length, d = u.shape
  if isinstance(length, int):
    chunk = min(chunk, length)
  chunks = (length + chunk - 1) // chunk
  pad = chunks * chunk - length  # left padding: delta = 0 is the identity step
  a_t = A.T                      # the state is [b, N, d]: channels minor

  def split(t):  # [b, l, k] -> [chunks, b, chunk, k]
    t = jnp.pad(t, ((0, 0), (pad, 0), (0, 0)))
    return jnp.swapaxes(t.reshape(b, chunks, chunk, t.shape[-1]), 0, 1)

  @jax.checkpoint  # the backward pass recomputes a chunk's states from its carry
  def step(h, xs):
    u_c, delta_c, b_c, c_c = xs
    ys = []
    for i in range(chunk):  # unrolled: XLA fuses each step's few elementwise ops
      h = (jnp.exp(delta_c[:, i, None, :] * a_t) * h
           + (delta_c[:, i] * u_c[:, i])[:, None, :] * b_c[:, i, :, None])
      ys.append(jnp.sum(h * c_c[:, i, :, None], axis=1))
    return h, jnp.stack(ys, axis=1)

  h0 = jnp.zeros((b, A.shape[1], d), jnp.float32)
  _, y = jax.lax.scan(step, h0, tuple(split(t) for t in (u, delta, B, C)))
  return jnp.swapaxes(y, 0, 1).reshape(b, chunks * chunk, d)[:, pad:]


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                   C: jax.Array, D: jax.Array, *, method: str = "chunked",
                   chunk: int = 16) -> jax.Array:
  """The Mamba-1 selective scan, causal over time, in float32.

  ``h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t`` (``h_{-1} = 0``) and
  ``y_t = <C_t, h_t> + D u_t``, per channel ``d`` with a state of ``N``.

  Args:
    u, delta: ``[b, l, d]``.
    A: ``[d, N]`` (negative).
    B, C: ``[b, l, N]``.
    D: ``[d]``.
    method: ``associative`` (``lax.associative_scan`` over time; materialises every
      state, ``[b, l, d, N]``), ``chunked`` (``lax.scan`` over chunks of ``chunk``
      steps carrying the state, the steps of a chunk unrolled, each chunk
      rematerialised in the backward pass, which keeps only the chunks' first
      states) or ``sequential`` (``lax.scan`` step by step).
    chunk: steps per chunk (``chunked``).

  Returns:
    ``y``: float32 ``[b, l, d]``.
  """
  u, delta, A, B, C, D = (t.astype(jnp.float32) for t in (u, delta, A, B, C, D))
  if method == "associative":
    y = _scan_associative(u, delta, A, B, C)
  elif method == "chunked":
    y = _scan_chunked(u, delta, A, B, C, chunk)
  elif method == "sequential":
    y = _scan_sequential(u, delta, A, B, C)
  else:
    raise ValueError(f"method must be one of {SCANS}, got {method!r}")
  return y + u * D


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def _linear_init(config: Mamba4RecConfig):
  """Kernel initializer of the dense layers (see ``Mamba4RecConfig.init``)."""
  if config.init == "recbole":
    return nn.initializers.normal(0.02)
  return nn.initializers.xavier_uniform()  # layers.dense's default


def _uniform(bound: float):
  """Initializer: uniform in ``[-bound, bound)`` (PyTorch's default for the convolution)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=1e-1, floor=1e-4):
  """mamba_ssm's: ``softplus^-1(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]``."""
  dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min))
               + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return dt + jnp.log(-jnp.expm1(-dt))


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: ``A[d, n] = -(n + 1)``, stored as ``log(n + 1)``."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=dtype)), shape)


def _causal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """Depthwise causal convolution: ``y_t = bias + sum_k kernel[k] x_{t - K + 1 + k}``."""
  width, length = kernel.shape[0], x.shape[1]
  padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
  return bias + sum(padded[:, k:k + length] * kernel[k] for k in range(width))


class Mamba(nn.Module):
  """The Mamba-1 block: ``[B, L, D]`` -> ``[B, L, D]``; ``valid`` ``[B, L]`` marks items."""

  config: Mamba4RecConfig

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    inner, n = c.expand * c.embedding_dim, c.d_state
    rank = math.ceil(c.embedding_dim / 16)
    linear = _linear_init(c)
    recbole = c.init == "recbole"
    dt_kernel = linear if recbole else _uniform(rank ** -0.5)
    dt_bias = nn.initializers.zeros if recbole else _dt_bias_init
    conv_init = _uniform(c.d_conv ** -0.5)  # PyTorch's Conv1d default (fan-in d_conv)
    # Padding: the convolution sees zeros, and u = delta = 0 keeps the state exactly 0
    # (either alone would), so real positions never see the padded ones.
    mask = valid[..., None]

    xz = layers.dense(2 * inner, (layers.EMBED, layers.MLP), use_bias=False,
                      kernel_init=linear, dtype=dtype, name="in_proj")(x)
    u, z = jnp.split(xz, 2, axis=-1)
    kernel = self.param("conv_kernel",
                        nn.with_logical_partitioning(conv_init, (None, layers.MLP)),
                        (c.d_conv, inner), jnp.float32)
    bias = self.param("conv_bias", nn.with_logical_partitioning(conv_init, (layers.MLP,)),
                      (inner,), jnp.float32)
    u = _causal_conv(jnp.where(mask, u, 0).astype(dtype), kernel.astype(dtype),
                     bias.astype(dtype))
    u = nn.silu(u)
    dt, B, C = jnp.split(
        layers.dense(rank + 2 * n, (layers.MLP, None), use_bias=False, kernel_init=linear,
                     dtype=dtype, name="x_proj")(u), [rank, rank + n], axis=-1)
    dt = layers.dense(inner, (None, layers.MLP), use_bias=False, kernel_init=dt_kernel,
                      dtype=dtype, name="dt_proj")(dt)
    dt_b = self.param("dt_bias", nn.with_logical_partitioning(dt_bias, (layers.MLP,)),
                      (inner,), jnp.float32)
    delta = jnp.where(mask, jax.nn.softplus(dt.astype(jnp.float32) + dt_b), 0)
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, (layers.MLP, None)),
                       (inner, n), jnp.float32)
    d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, (layers.MLP,)),
                        (inner,), jnp.float32)
    y = selective_scan(jnp.where(mask, u, 0), delta, -jnp.exp(a_log), B, C, d_skip,
                       method=c.scan, chunk=c.scan_chunk)
    y = (y * nn.silu(z.astype(jnp.float32))).astype(dtype)
    return layers.dense(c.embedding_dim, (layers.MLP, layers.EMBED), use_bias=False,
                        kernel_init=linear, dtype=dtype, name="out_proj")(y)


class MambaLayer(nn.Module):
  """Mamba, dropout and LayerNorm (residual when stacked), then the feed-forward network.

  With ``last_only`` everything after the Mamba block (position-wise) runs for the last
  position only: ``[B, 1, D]``.
  """

  config: Mamba4RecConfig

  @nn.compact
  def __call__(self, x, valid, deterministic: bool, last_only: bool = False):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    linear = _linear_init(c)
    h = Mamba(c, name="mamba")(x, valid)
    if last_only:
      x, h = x[:, -1:], h[:, -1:]
    h = layers.Dropout(c.dropout)(h, deterministic)
    if c.num_blocks > 1:
      h = h + x
    h = layers.LayerNorm(epsilon=1e-12, dtype=dtype, name="norm")(h)
    f = layers.dense(4 * c.embedding_dim, (layers.EMBED, layers.MLP), dtype=dtype,
                     kernel_init=linear, name="ffn_in")(h)
    f = layers.Dropout(c.dropout)(nn.gelu(f, approximate=False), deterministic)
    f = layers.dense(c.embedding_dim, (layers.MLP, layers.EMBED), dtype=dtype,
                     kernel_init=linear, name="ffn_out")(f)
    f = layers.Dropout(c.dropout)(f, deterministic)
    return layers.LayerNorm(epsilon=1e-12, dtype=dtype, name="ffn_norm")(f + h)


class Mamba4Rec(nn.Module):
  """Maps item histories ``[B, L]`` to user representations ``[B, L, D]``."""

  config: Mamba4RecConfig

  def setup(self):
    c = self.config
    self.item_embedding = layers.ItemEmbedding(c.vocab_size, c.embedding_dim,
                                               normalize=c.l2_normalize)
    self.input_dropout = layers.Dropout(c.dropout)
    self.input_norm = layers.LayerNorm(epsilon=1e-12, dtype=layers.compute_dtype(c.dtype))
    self.blocks = [MambaLayer(c) for _ in range(c.num_blocks)]

  def __call__(self, item_ids: jax.Array, timestamps: jax.Array | None = None,
               query_timestamps: jax.Array | None = None, *,
               deterministic: bool = True, last_only: bool = False) -> jax.Array:
    """``[B, L]`` ids -> ``[B, L, D]``; with ``last_only``, ``[B, 1, D]`` for position L-1.

    ``last_only`` (scoring and serving) runs the final layer's feed-forward part for the
    last position only: the same numbers as ``[:, -1:]`` of the full output.
    """
    del timestamps, query_timestamps  # Mamba4Rec ignores time
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    length = item_ids.shape[-1]
    padded = c.scan == "associative" and not isinstance(length, int)
    if padded:  # associative_scan needs a static length: pad (invisibly) to max_len
      item_ids = jnp.pad(item_ids, ((0, 0), (c.max_len - length, 0)))
    valid = item_ids != features.PAD_ID
    x = self.input_dropout(self.item_embedding(item_ids).astype(dtype), deterministic)
    x = self.input_norm(x)
    for i, block in enumerate(self.blocks):
      last = last_only and i == len(self.blocks) - 1
      x = block(x, valid, deterministic, last_only=last)
    if padded and not last_only:
      x = x[:, -length:]
    x = x * valid[:, -x.shape[1]:, None]
    x = x.astype(jnp.float32)  # float32 out: the loss and scoring
    return layers.l2_normalize(x) if c.l2_normalize else x

  def candidates(self, ids: jax.Array) -> jax.Array:
    return self.item_embedding.candidates(ids).astype(jnp.float32)  # for the loss

  def all_candidates(self) -> jax.Array:
    return self.item_embedding.all_candidates().astype(jnp.float32)  # loss and scoring
