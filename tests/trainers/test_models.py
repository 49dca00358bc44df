"""Model behaviour: causality, padding, time bias, logical axis names."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers import configs, layers, models
from trainers.models import hstu

NAMES = ("sasrec", "hstu", "hstu-large")


def _init(name, **over):
  cfg = configs.get_config(name, smoke=True, vocab_size=30, **over).model_config
  model = models.build(name, cfg)
  d = jnp.zeros((1, cfg.max_len), jnp.int32)
  variables = model.init(jax.random.key(0), d, d, d)
  return cfg, model, nn.meta.unbox(variables["params"]), variables


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, 30, (3, cfg.max_len)).astype(np.int32)
  ids[1, :5] = 0  # left padding
  ts = np.cumsum(rng.integers(1, 10_000, (3, cfg.max_len)), axis=1).astype(np.int32)
  return ids, ts, np.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
  """Changing the item at position t changes no output before t (and does change t)."""
  cfg, model, params, _ = _init(name)
  ids, ts, qts = _batch(cfg)
  out = model.apply({"params": params}, ids, ts, qts)
  for t in (7, cfg.max_len // 2, cfg.max_len - 1):
    changed = ids.copy()
    changed[:, t] = np.where(ids[:, t] == 2, 3, 2)
    out2 = model.apply({"params": params}, changed, ts, qts)
    np.testing.assert_allclose(out2[:, :t], out[:, :t], atol=1e-6)
    assert np.abs(np.asarray(out2[:, t] - out[:, t])).max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_padding_outputs_zero_and_outputs_unit_length(name):
  cfg, model, params, _ = _init(name)
  ids, ts, qts = _batch(cfg)
  out = np.asarray(model.apply({"params": params}, ids, ts, qts))
  assert np.all(out[1, :5] == 0)
  norms = np.linalg.norm(out[ids != 0], axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_last_only_equals_last_position_of_the_full_output(name):
  """The scoring/serving path (final block for the last query only) is the same model."""
  cfg, model, params, _ = _init(name)
  ids, ts, qts = _batch(cfg)
  full = np.asarray(model.apply({"params": params}, ids, ts, qts))
  last = np.asarray(model.apply({"params": params}, ids, ts, qts, last_only=True))
  assert last.shape == (3, 1, full.shape[-1])
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_can_be_trimmed(name):
  """Right-aligned positions and a fixed attention scale: a history scores the same in any
  padded length >= its own, which is what lets serving run short histories short."""
  cfg, model, params, _ = _init(name)
  ids, ts, qts = _batch(cfg)
  ids[:, :cfg.max_len // 2] = 0
  full = np.asarray(model.apply({"params": params}, ids, ts, qts, last_only=True))
  cut = slice(cfg.max_len // 2, None)
  short = np.asarray(model.apply({"params": params}, ids[:, cut], ts[:, cut], qts[:, cut],
                                 last_only=True))
  np.testing.assert_allclose(short, full, atol=2e-6)


def test_hstu_time_bias_uses_query_times_and_buckets_logarithmically():
  b = hstu.time_buckets(jnp.array([0, 1, 2, 10, 1000, -1000, 10**9]), 128, 0.301)
  assert list(np.asarray(b)) == [0, 0, 2, 7, 22, 22, 68]
  assert int(hstu.time_buckets(jnp.array([2**31 - 1]), 50, 0.301)[0]) == 50  # clipped
  cfg, model, params, _ = _init("hstu")
  ids, ts, qts = _batch(cfg)
  out = model.apply({"params": params}, ids, ts, qts)
  out_late = model.apply({"params": params}, ids, ts, qts + 10**7)
  assert np.abs(np.asarray(out - out_late)).max() > 1e-4
  cfg2, model2, params2, _ = _init("hstu", time_bias=False)
  a = model2.apply({"params": params2}, ids, ts, qts)
  b = model2.apply({"params": params2}, ids, ts, qts + 10**7)
  np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_item_table_carries_logical_axes(name):
  _, _, params, variables = _init(name)
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["item_embedding"]["embedding"]) == (layers.VOCAB, layers.EMBED)
  table = np.asarray(params["item_embedding"]["embedding"])
  assert table.shape[0] == layers.padded_rows(30) == 64  # aligned rows: even row-wise shards
  np.testing.assert_array_equal(table[30:], 0.0)        # padding rows are zero


def test_presets_match_the_papers_settings():
  s = configs.get_config("sasrec").model_config
  h = configs.get_config("hstu").model_config
  hl = configs.get_config("hstu-large").model_config
  assert (s.max_len, s.embedding_dim, s.num_blocks, s.num_heads, s.dropout) == (200, 50, 2, 1, 0.2)
  assert (h.num_blocks, h.num_heads, h.attention_dim, h.linear_dim) == (2, 1, 50, 50)
  assert (hl.num_blocks, hl.num_heads, hl.attention_dim, hl.linear_dim) == (8, 2, 25, 25)
  assert s.l2_normalize and h.l2_normalize
  t = configs.get_config("hstu")
  assert (t.batch_size, t.learning_rate, t.beta1, t.beta2) == (128, 1e-3, 0.9, 0.98)
  assert (t.num_negatives, t.temperature) == (128, 0.05)


def test_overrides_and_round_trip():
  cfg = configs.apply_overrides(configs.get_config("hstu"),
                                ["num_blocks=4", "model.dropout=0.1", "epochs=3", "loss=softmax"])
  assert cfg.model_config.num_blocks == 4 and cfg.model_config.dropout == 0.1
  assert cfg.epochs == 3 and cfg.loss == "softmax"
  again = configs.TrainConfig.from_dict(cfg.to_dict())
  assert again == cfg
  # config.json files from before log_every_steps was removed still load.
  assert configs.TrainConfig.from_dict({**cfg.to_dict(), "log_every_steps": 50}) == cfg
  with pytest.raises(ValueError, match="unknown setting 'bogus'"):
    configs.apply_overrides(cfg, ["bogus=1"])
  with pytest.raises(ValueError, match="key=value"):
    configs.apply_overrides(cfg, ["epochs"])
  with pytest.raises(ValueError, match="loss must be one of"):
    configs.apply_overrides(cfg, ["loss=bpr"])
  with pytest.raises(ValueError, match="unknown model"):
    configs.get_config("gru4rec")


def test_windowed_dropout_mask_is_the_whole_arrays_mask_cut_into_blocks():
  rng = jax.random.key(3)
  whole = np.asarray(layers.keep_mask(rng, (2, 3, 7, 11), 0.8))
  for start, shape in (((0, 0, 0, 0), (2, 3, 2, 5)), ((0, 1, 4, 6), (2, 2, 3, 5))):
    block = np.asarray(layers.keep_mask(rng, shape, 0.8, ((2, 3, 7, 11), start)))
    cut = tuple(slice(s, s + n) for s, n in zip(start, shape))
    np.testing.assert_array_equal(block, whole[cut])


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
@pytest.mark.parametrize("last_only", [False, True])
def test_attention_in_causal_blocks_equals_one_block(monkeypatch, name, last_only):
  """HSTU and SASRec at L = 130 (three query blocks) give the outputs and gradients of
  the same model scored as one [L, L] block, dropout on (the same mask cut into blocks)."""
  cfg, model, params, _ = _init(name, max_len=130)
  ids, ts, qts = _batch(cfg)
  assert len(layers.causal_blocks(cfg.max_len)) == 3

  def run(p):
    out = model.apply({"params": p}, ids, ts, qts, deterministic=last_only,
                      last_only=last_only, rngs={"dropout": jax.random.key(5)})
    return out, jnp.sum(out * jnp.arange(out.shape[-1]))

  blocked, grad_blocked = run(params)[0], jax.grad(lambda p: run(p)[1])(params)
  monkeypatch.setattr(layers, "ATTENTION_BLOCK", 10**6)
  assert len(layers.causal_blocks(cfg.max_len)) == 1
  whole, grad_whole = run(params)[0], jax.grad(lambda p: run(p)[1])(params)
  np.testing.assert_allclose(blocked, whole, atol=2e-6)
  for a, b in zip(jax.tree.leaves(grad_blocked), jax.tree.leaves(grad_whole)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_norm_equals_flax_layer_norm_with_gradients(dtype):
  """layers.LayerNorm (closed-form backward) against nn.LayerNorm: values and gradients
  with respect to the input, the scale and the bias."""
  x = jax.random.normal(jax.random.key(0), (4, 7, 50)) * 3 + 1
  ref, ours = nn.LayerNorm(epsilon=1e-8, dtype=dtype), layers.LayerNorm(epsilon=1e-8, dtype=dtype)
  p = ref.init(jax.random.key(1), x)
  p = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), p)
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x))
  tol = 1e-5 if dtype is None else 3e-2
  assert ref.apply(p, x).dtype == ours.apply(p, x).dtype
  np.testing.assert_allclose(np.float32(ours.apply(p, x)), np.float32(ref.apply(p, x)), atol=tol)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(p, x)),
                  jax.tree.leaves(jax.grad(loss(ref), argnums=(0, 1))(p, x))):
    np.testing.assert_allclose(a, b, atol=tol * 10, rtol=tol)
