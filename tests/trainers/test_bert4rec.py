"""BERT4Rec: cloze masking, the [MASK] scoring path against a numpy forward pass,
bidirectionality, left padding, export with a symbolic length, bf16, parameter count."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers import export, features, layers, sharding
from trainers.models.bert4rec import BERT4Rec, BERT4RecConfig, mask_positions

VOCAB, MAX_LEN = 30, 12
TINY = BERT4RecConfig(vocab_size=VOCAB, max_len=MAX_LEN, embedding_dim=8, num_heads=2,
                      ffn_dim=16)


@functools.lru_cache(maxsize=None)
def _model(config=TINY, scale=0.0):
  """``(model, params)``; ``scale`` > 0 redraws every parameter from N(0, scale) (biases,
  layer-norm scales and the item bias included), so that the numpy reference checks each
  one's role with numbers well away from zero."""
  model = BERT4Rec(config)
  d = jnp.zeros((1, config.max_len), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), d, d, d)["params"])
  if scale:
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1)
    leaves = [jnp.asarray(rng.normal(0, scale, x.shape), jnp.float32) for x in leaves]
    params = jax.tree.unflatten(treedef, leaves)
  return model, params


def _ids(batch=3, length=MAX_LEN, pad=(0, 4, 0), seed=0):
  ids = np.random.default_rng(seed).integers(features.FIRST_ITEM_ID, VOCAB,
                                             (batch, length)).astype(np.int32)
  for row, n in enumerate(pad):
    ids[row, :n] = features.PAD_ID
  return ids


def _cloze(params, tokens, masked, model=None, **kw):
  model = model or _model()[0]
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(masked),
                                method="cloze", **kw))


# ----------------------------------------------------------------------------- numpy
def _ln(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-12) * p["scale"] + p["bias"]


def _gelu(x):  # BERT's tanh form
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _reference_scores(params, tokens, masked, config=TINY):
  """``[B, L, rows]`` logits of the paper's model, written out in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, length = tokens.shape
  d, h = config.embedding_dim, config.num_heads
  valid = (tokens != 0) | masked
  x = p["item_embedding"]["embedding"][tokens] * (tokens != 0)[..., None]
  x[masked] = p["mask_embedding"]
  x = _ln(x + p["position_embedding"]["embedding"][config.max_len - length:], p["input_norm"])
  for i in range(config.num_blocks):
    blk = p[f"blocks_{i}"]
    q, k, v = np.split(_dense(x, blk["attention"]["qkv"]), 3, axis=-1)
    heads = []
    for j in range(h):
      cols = slice(j * d // h, (j + 1) * d // h)
      logits = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / np.sqrt(d // h)
      logits = np.where(valid[:, None, :], logits, -np.inf)  # bidirectional, valid keys
      w = np.exp(logits - logits.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ v[..., cols])
    x = _ln(x + _dense(np.concatenate(heads, -1), blk["attention"]["out"]),
            blk["attention_norm"])
    x = _ln(x + _dense(_gelu(_dense(x, blk["ffn_in"])), blk["ffn_out"]), blk["ffn_norm"])
  out = _ln(_gelu(_dense(x, p["head"])), p["head_norm"])
  scores = out @ p["item_embedding"]["embedding"].T + p["bias"]
  return scores * valid[..., None]


# ----------------------------------------------------------------------------- masking
def test_mask_positions_is_deterministic_never_masks_padding_and_has_the_rate():
  rate, b, length = 0.2, 4000, 50
  rng = np.random.default_rng(0)
  n_valid = rng.integers(0, length + 1, b)
  n_valid[:50] = 0
  n_valid[50:100] = 1
  weights = (np.arange(length)[None] >= length - n_valid[:, None]).astype(np.float32)
  fn = jax.jit(mask_positions, static_argnums=2)
  masked = np.asarray(fn(jax.random.key(7), weights, rate))
  np.testing.assert_array_equal(np.asarray(fn(jax.random.key(7), weights, rate)), masked)
  assert (np.asarray(fn(jax.random.key(8), weights, rate)) != masked).mean() > 0.1
  assert not (masked & (weights == 0)).any()                      # never padding
  count = masked.sum(1)
  assert (count[n_valid > 0] >= 1).all() and (count[n_valid == 0] == 0).all()
  np.testing.assert_array_equal(masked[50:100], weights[50:100] > 0)  # the one item
  # binomial draws at rate, plus the forced last position where nothing was drawn
  n = n_valid[n_valid > 0]
  p_none = (1 - rate) ** n
  mean = np.sum(n * rate + p_none)
  sigma = np.sqrt(np.sum(n * rate * (1 - rate) + p_none * (1 - p_none)))
  assert abs(count.sum() - mean) < 5 * sigma, (count.sum(), mean, sigma)


def test_mask_positions_forces_the_last_valid_position_and_rate_one_masks_all():
  weights = np.array([[0, 0, 1, 1, 1], [1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], np.float32)
  none = np.asarray(mask_positions(jax.random.key(0), weights, 0.0))
  np.testing.assert_array_equal(none, [[0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
  every = np.asarray(mask_positions(jax.random.key(0), weights, 1.0))
  np.testing.assert_array_equal(every, weights > 0)


# ----------------------------------------------------------------------------- scoring
def test_mask_scoring_path_equals_the_numpy_forward_pass():
  model, params = _model(scale=0.3)
  hist = _ids()
  user = np.asarray(model.apply({"params": params}, hist, last_only=True))
  assert user.shape == (3, 1, TINY.embedding_dim + 1) and user.dtype == np.float32
  # __call__ = cloze over the history shifted left with [MASK] in the last column
  tokens = np.concatenate([hist[:, 1:], np.zeros_like(hist[:, :1])], 1)
  masked = np.zeros(hist.shape, bool)
  masked[:, -1] = True
  np.testing.assert_allclose(user[:, -1], _cloze(params, tokens, masked)[:, -1], atol=1e-6)
  full = np.asarray(model.apply({"params": params}, hist))
  np.testing.assert_allclose(user[:, 0], full[:, -1], atol=2e-6)   # last_only == slice
  # score = user . [E, bias], the paper's logits
  table = np.asarray(model.apply({"params": params}, method="all_candidates"))
  assert table.shape == (layers.padded_rows(VOCAB), TINY.embedding_dim + 1)
  want = _reference_scores(params, tokens, masked)[:, -1]
  np.testing.assert_allclose(user[:, -1] @ table.T, want, rtol=1e-5, atol=1e-5)  # float32: ~2e-7
  assert np.abs(want).max() > 1.0  # well away from zero: the check has teeth
  ids = np.array([[2, 5], [29, 0]])
  np.testing.assert_array_equal(
      np.asarray(model.apply({"params": params}, ids, method="candidates")), table[ids])


def test_cloze_equals_the_numpy_forward_pass_at_every_position():
  """Masks anywhere, one on a PAD token (valid all the same); the item under a mask is
  not seen."""
  model, params = _model(scale=0.3)
  tokens = _ids(seed=1)
  masked = np.zeros(tokens.shape, bool)
  masked[0, [2, 7]] = masked[1, [3, 10]] = masked[2, -1] = True  # [1, 3] is PAD
  table = np.asarray(model.apply({"params": params}, method="all_candidates"))
  got = _cloze(params, tokens, masked) @ table.T
  np.testing.assert_allclose(got, _reference_scores(params, tokens, masked),
                             rtol=1e-5, atol=1e-5)  # float32: ~2e-7
  assert np.all(got[1, :3] == 0) and np.abs(got[1, 3]).max() > 0.1
  hidden = tokens.copy()
  hidden[masked] = np.where(tokens[masked] == 2, 3, 2)
  np.testing.assert_allclose(_cloze(params, hidden, masked), _cloze(params, tokens, masked),
                             atol=1e-6)


def test_the_oldest_item_of_a_full_window_drops_out_for_the_mask():
  model, params = _model(scale=0.3)
  hist = _ids(pad=(0, 0, 0))
  changed = hist.copy()
  changed[:, 0] = np.where(hist[:, 0] == 2, 3, 2)
  a = np.asarray(model.apply({"params": params}, hist, last_only=True))
  np.testing.assert_array_equal(
      np.asarray(model.apply({"params": params}, changed, last_only=True)), a)
  changed[:, 1] = np.where(hist[:, 1] == 2, 3, 2)
  assert np.abs(np.asarray(model.apply({"params": params}, changed, last_only=True)) - a
                ).max() > 1e-3


def test_attention_is_bidirectional():
  """An earlier item changes the last output, and a later item an earlier one (a causal
  model would leave the earlier output alone)."""
  _, params = _model(scale=0.3)
  tokens = _ids(pad=(0, 0, 0))
  masked = np.zeros(tokens.shape, bool)
  masked[:, 5] = True
  base = _cloze(params, tokens, masked)
  for changed_at, seen_at in ((2, MAX_LEN - 1), (MAX_LEN - 1, 2), (MAX_LEN - 1, 5)):
    changed = tokens.copy()
    changed[:, changed_at] = np.where(tokens[:, changed_at] == 2, 3, 2)
    diff = np.abs(_cloze(params, changed, masked)[:, seen_at] - base[:, seen_at])
    assert (diff.max(-1) > 1e-4).all(), (changed_at, seen_at, diff.max(-1))  # causal: 0


def test_left_padding_leaves_real_positions_unchanged():
  model, params = _model(scale=0.3)
  tokens = _ids(pad=(6, 8, 11))
  masked = np.zeros(tokens.shape, bool)
  masked[:, -2] = True
  full = _cloze(params, tokens, masked)
  short = _cloze(params, tokens[:, 5:], masked[:, 5:])
  np.testing.assert_allclose(short, full[:, 5:], atol=1e-5)
  assert np.all(full[:, :6] == 0)                        # padding outputs are zero
  # the scoring path: a history in any length that keeps one left pad
  hist = _ids(pad=(6, 8, 11))
  want = np.asarray(model.apply({"params": params}, hist, last_only=True))
  got = np.asarray(model.apply({"params": params}, hist[:, 5:], last_only=True))
  np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- serving
def test_export_with_a_symbolic_length_serves_the_top_k_of_direct_scoring():
  model, params = _model(scale=0.3)
  exported, leaves, _ = export.export_model(model, params, MAX_LEN, max_k=5,
                                            platforms=("cpu",))
  table = np.asarray(model.apply({"params": params}, method="all_candidates"))
  for length in (MAX_LEN, 7):
    hist = _ids(length=length, pad=(0, 2, 5), seed=length)
    times = np.zeros(hist.shape + (2,), np.int32)
    scores, ids = exported.call(tuple(leaves), hist, times, times, np.zeros_like(hist))
    user = np.asarray(model.apply({"params": params}, hist, last_only=True))[:, -1]
    want = (user @ table.T)[:, :VOCAB]
    want[:, :features.FIRST_ITEM_ID] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-want, axis=1)[:, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ids, np.argsort(-want, axis=1, kind="stable")[:, :5])


# ----------------------------------------------------------------------------- config
def test_bf16_runs_close_to_float32():
  model16 = BERT4Rec(dataclasses.replace(TINY, dtype="bfloat16"))
  _, params = _model(scale=0.3)
  tokens = _ids(pad=(0, 4, 9))
  masked = mask_positions(jax.random.key(3), tokens != 0, 0.3)
  want = _cloze(params, tokens, masked)
  got = _cloze(params, tokens, masked, model=model16)
  assert got.dtype == np.float32
  err = np.abs(got - want)
  assert err.max() < 0.02 and err.mean() < 0.003, (err.max(), err.mean())  # ~2e-3, 2e-4
  assert err.max() > 1e-4  # it did compute in bf16


def test_parameter_count_of_the_default_config():
  config = BERT4RecConfig(vocab_size=3706)
  assert BERT4RecConfig.CLOZE and (config.max_len, config.mask_rate) == (200, 0.2)
  model = BERT4Rec(config)
  d = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), d)["params"]))
  got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  dim, ffn, rows = 64, 256, 3712  # 3,706 rows padded to a multiple of 64
  ln = 2 * dim
  block = (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + ln \
      + (dim * ffn + ffn) + (ffn * dim + dim) + ln
  want = rows * dim + 200 * dim + dim + ln + 2 * block + (dim * dim + dim) + ln + rows
  assert got == want == 358_528


def test_logical_axes_and_config_checks():
  model, _ = _model()
  d = jnp.zeros((1, MAX_LEN), jnp.int32)
  boxed = model.init(jax.random.key(0), d)["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["bias"]) == (layers.VOCAB,)
  assert tuple(specs["mask_embedding"]) == (layers.EMBED,)
  # the item table is the only embedding table (sharding, int8 export)
  assert [t.name for t in sharding.find_tables(boxed)] == ["item_embedding"]
  with pytest.raises(ValueError, match="dtype must be one of"):
    BERT4RecConfig(dtype="float16")
  with pytest.raises(ValueError, match="multiple of num_heads"):
    BERT4RecConfig(embedding_dim=10, num_heads=3)


def test_l2_normalize_makes_the_user_part_unit_length():
  model, params = _model(dataclasses.replace(TINY, l2_normalize=True))
  out = np.asarray(model.apply({"params": params}, _ids()))
  np.testing.assert_allclose(np.linalg.norm(out[:, -1, :-1], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(out[:, -1, -1], 1.0)
  table = np.asarray(model.apply({"params": params}, method="all_candidates"))
  np.testing.assert_allclose(np.linalg.norm(table[2:VOCAB, :-1], axis=-1), 1.0, atol=1e-5)
