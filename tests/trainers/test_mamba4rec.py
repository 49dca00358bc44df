"""Mamba4Rec: the selective scan against a numpy loop, causality, invisible left
padding, the scoring path, export with a symbolic length, bf16, parameter count."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers import evaluate, export, features, layers
from trainers.models.mamba4rec import Mamba4Rec, Mamba4RecConfig, selective_scan

# (method, chunk): chunks that divide the length, do not, and exceed it
SCAN_CASES = [("sequential", 1), ("associative", 1), ("chunked", 4), ("chunked", 5),
              ("chunked", 32)]


def _scan_inputs(b=2, length=12, d=6, n=4, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(b, length, d))
  delta = np.log1p(np.exp(rng.normal(size=(b, length, d))))     # softplus: > 0
  a = -np.exp(rng.normal(size=(d, n)))
  bb, cc = rng.normal(size=(b, length, n)), rng.normal(size=(b, length, n))
  dd = rng.normal(size=(d,))
  return u, delta, a, bb, cc, dd


def _numpy_scan(u, delta, a, bb, cc, dd):
  """The recurrence, one step at a time, in float64."""
  b, length, d = u.shape
  y = np.zeros_like(u)
  for i in range(b):
    h = np.zeros((d, a.shape[1]))
    for t in range(length):
      h = np.exp(delta[i, t][:, None] * a) * h + (delta[i, t] * u[i, t])[:, None] * bb[i, t]
      y[i, t] = h @ cc[i, t] + dd * u[i, t]
  return y


@pytest.mark.parametrize("method,chunk", SCAN_CASES)
def test_selective_scan_equals_a_sequential_numpy_loop(method, chunk):
  args = _scan_inputs()
  want = _numpy_scan(*args)
  got = selective_scan(*(jnp.asarray(x, jnp.float32) for x in args), method=method,
                       chunk=chunk)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,chunk", [("associative", 1), ("chunked", 5)])
def test_selective_scan_gradients_equal_the_sequential_scans(method, chunk):
  args = [jnp.asarray(x, jnp.float32) for x in _scan_inputs(seed=1)]
  weights = jnp.asarray(np.random.default_rng(2).normal(size=args[0].shape), jnp.float32)

  def loss(how, size):
    return lambda *a: jnp.sum(selective_scan(*a, method=how, chunk=size) * weights)

  argnums = (0, 1, 2, 3, 4, 5)  # u, delta, A, B, C, D
  want = jax.grad(loss("sequential", 1), argnums)(*args)
  got = jax.grad(loss(method, chunk), argnums)(*args)
  for name, g, w in zip(("u", "delta", "A", "B", "C", "D"), got, want):
    assert np.abs(np.asarray(w)).max() > 1e-3, name  # a gradient that can differ
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def _config(**over):
  base = dict(vocab_size=30, max_len=20, embedding_dim=16, d_state=4, dropout=0.2,
              scan_chunk=4)
  return Mamba4RecConfig(**{**base, **over})


def _init(**over):
  """Config, model, params and the jitted ``apply(params, ids, last_only=False)``."""
  cfg = _config(**over)
  model = Mamba4Rec(cfg)
  ids = jnp.full((1, 8), 2, jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])
  rng = np.random.default_rng(0)  # trained-like: nonzero biases, so LayerNorm(0) != 0
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
      if path[-1].key == "bias" else x, params)
  apply = jax.jit(lambda p, ids, last_only=False: model.apply({"params": p}, ids,
                                                              last_only=last_only),
                  static_argnames="last_only")
  return cfg, model, params, apply


def _ids(cfg, pad=5, seed=0):
  ids = np.random.default_rng(seed).integers(2, cfg.vocab_size, (3, cfg.max_len))
  ids[1, :pad] = features.PAD_ID
  return ids.astype(np.int32)


@pytest.mark.parametrize("blocks", [1, 2])
def test_causality(blocks):
  """Changing the item at position t changes no output before t (and does change t)."""
  cfg, model, params, apply = _init(num_blocks=blocks)
  ids = _ids(cfg)
  out = np.asarray(apply(params, ids))
  for t in (6, 13, cfg.max_len - 1):
    changed = ids.copy()
    changed[:, t] = np.where(ids[:, t] == 2, 3, 2)
    out2 = np.asarray(apply(params, changed))
    np.testing.assert_allclose(out2[:, :t], out[:, :t], atol=1e-6)
    assert np.abs(out2[:, t] - out[:, t]).max(axis=-1).min() > 1e-3


@pytest.mark.parametrize("scan", ["chunked", "associative"])
def test_left_padding_is_invisible(scan):
  """More left padding leaves the outputs at real positions as they were; padded
  positions output 0. Two layers: the second sees the first's padded outputs."""
  cfg, model, params, apply = _init(scan=scan, num_blocks=2)
  ids = _ids(cfg, pad=3)[:, 7:]                                   # 13 long, row 1 all real
  longer = np.pad(ids, ((0, 0), (cfg.max_len - ids.shape[1], 0)))  # 7 more padding
  short = np.asarray(apply(params, ids))
  long_ = np.asarray(apply(params, longer))
  np.testing.assert_allclose(long_[:, -ids.shape[1]:], short, atol=1e-5)
  assert np.all(long_[:, :-ids.shape[1]] == 0)
  row = _ids(cfg, pad=5)[1:2]
  out = np.asarray(apply(params, row))
  assert np.all(out[0, :5] == 0) and np.all(np.abs(out[0, 5:]).max(axis=-1) > 0.1)


@pytest.mark.parametrize("blocks", [1, 2])
def test_last_only_equals_last_position_of_the_full_output(blocks):
  cfg, model, params, apply = _init(num_blocks=blocks, l2_normalize=True)
  ids = _ids(cfg)
  full = np.asarray(apply(params, ids))
  last = np.asarray(apply(params, ids, last_only=True))
  assert last.shape == (3, 1, cfg.embedding_dim)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(full[ids != 0], axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("scan", ["chunked", "associative"])  # sequential: a plain lax.scan
def test_export_with_a_symbolic_length_serves_the_direct_scores(scan):
  """The exported function (batch and history length symbolic) at two lengths returns
  the top-k of the scores of the model applied directly."""
  cfg, model, params, apply = _init(scan=scan)
  exported, weights, _ = export.export_model(model, params, cfg.max_len, max_k=5,
                                             platforms=("cpu",))
  score = jax.jit(evaluate.make_score_fn(model))
  for length in (7, cfg.max_len):  # 7: not a multiple of the chunk (4)
    ids = _ids(cfg, pad=2)[:, -length:]
    times = np.zeros(ids.shape + (2,), np.int32)
    top, top_ids = exported.call(tuple(weights), ids, times, times, np.zeros_like(ids))
    want = np.array(score(params, {"history": ids, "timestamps": times,
                                   "query_timestamps": times}))
    want[:, :features.FIRST_ITEM_ID] = -np.inf
    assert top.shape == (3, 5)
    np.testing.assert_allclose(top, np.take_along_axis(want, np.asarray(top_ids), 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(top, -np.sort(-want, axis=1)[:, :5], rtol=1e-5, atol=1e-5)


def test_bfloat16_is_close_to_float32():
  cfg, model, params, apply = _init(num_blocks=2)
  ids = _ids(cfg)
  out32 = np.asarray(apply(params, ids))
  bf16 = Mamba4Rec(dataclasses.replace(cfg, dtype="bfloat16"))
  out16 = jax.jit(bf16.apply)({"params": params}, ids)
  assert out16.dtype == jnp.float32
  out16 = np.asarray(out16)
  err = np.abs(out16 - out32)
  assert err.max() > 1e-4        # it does compute in bf16 ...
  assert err.max() < 0.15 and err.mean() < 0.02  # ... and stays close (LayerNorm'd, ~1)
  assert np.all(out16[1, :5] == 0)


def test_parameter_count_of_the_paper_config():
  """1 layer, d 64, d_state 32, d_conv 4, expand 2 on ML-1M's 3,706 items, counted by hand."""
  d, n, k, vocab = 64, 32, 4, 3706
  inner, rank = 2 * d, math.ceil(d / 16)
  per_layer = (d * 2 * inner                 # in_proj, no bias
               + k * inner + inner           # depthwise conv + bias
               + inner * (rank + 2 * n)      # x_proj, no bias
               + rank * inner + inner        # dt_proj + its bias
               + inner * n + inner           # A_log, D
               + inner * d                   # out_proj, no bias
               + 2 * d                       # LayerNorm after Mamba
               + d * 4 * d + 4 * d + 4 * d * d + d  # FFN
               + 2 * d)                      # FFN LayerNorm
  want = layers.padded_rows(vocab) * d + 2 * d + per_layer  # table, input LayerNorm
  cfg = Mamba4RecConfig(vocab_size=vocab)
  assert (cfg.num_blocks, cfg.embedding_dim, cfg.d_state, cfg.d_conv, cfg.expand,
          cfg.dropout, cfg.max_len) == (1, 64, 32, 4, 2, 0.2, 200)
  variables = jax.eval_shape(Mamba4Rec(cfg).init, jax.random.key(0),
                             jnp.zeros((1, 8), jnp.int32))
  got = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(variables["params"])))
  assert got == want == 3712 * 64 + 128 + 72_128


def test_initialisation():
  """S4D-real A, D = 1, delta at init log-uniform in [1e-3, 1e-1] (mamba_ssm), or
  softplus(0) with RecBole's re-initialisation (the paper's code)."""
  _, _, params, _ = _init()
  mamba = params["blocks_0"]["mamba"]
  np.testing.assert_allclose(-np.exp(mamba["A_log"]), -np.arange(1, 5)[None].repeat(32, 0))
  np.testing.assert_array_equal(mamba["D"], 1.0)
  dt = np.log1p(np.exp(np.asarray(mamba["dt_bias"])))
  assert dt.min() >= 1e-3 - 1e-9 and dt.max() <= 1e-1 + 1e-9 and dt.std() > 1e-3
  _, _, params, _ = _init(init="recbole")
  np.testing.assert_array_equal(params["blocks_0"]["mamba"]["dt_bias"], 0.0)
  assert abs(np.std(params["blocks_0"]["mamba"]["in_proj"]["kernel"]) - 0.02) < 0.004
  with pytest.raises(ValueError, match="scan"):
    _config(scan="parallel")
