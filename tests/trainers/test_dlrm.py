"""DLRM / DCN-V2: the forward pass against a numpy re-computation from the module's own
parameters (embeddings, bottom MLP, cross layers, dot interaction, towers), batch norm,
the embedding regulariser, the presets, and a tiny model learning a separable task."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainers import configs, layers, losses, metrics, models
from trainers.models import dlrm

VOCABS = (6, 9, 4)


def make_batch(cfg, b=8, seed=0, padding=0):
  """A ranking batch of ``cfg``'s shapes; the last ``padding`` rows weigh 0."""
  rng = np.random.default_rng(seed)
  nd = cfg.num_dense
  batch = {
      "dense": rng.normal(size=(b, nd)).astype(np.float32),
      "dense_missing": (rng.uniform(size=(b, nd)) < 0.3).astype(np.float32),
      "sparse": np.stack([rng.integers(1, v, b) for v in cfg.vocab_sizes]
                         or [np.zeros(b)], 1)[:, :len(cfg.vocab_sizes)].astype(np.int32),
      "label": rng.integers(0, 2, b).astype(np.float32),
      "weight": np.r_[np.ones(b - padding), np.zeros(padding)].astype(np.float32),
  }
  for name, vocab in cfg.multi_hot:
    ids = rng.integers(1, vocab, (b, 4)).astype(np.int32)
    ids[rng.uniform(size=ids.shape) < 0.4] = 0  # padding
    ids[0] = 0                                  # an all-padding row
    batch[f"multi_hot/{name}"] = ids
  return batch


def init(cfg, batch, seed=0):
  """The model and its unboxed variables (jitted: one compile beats eager op-by-op here)."""
  model = dlrm.DLRM(cfg)
  variables = jax.jit(lambda r, b: model.init(r, b, deterministic=True))(
      {"params": jax.random.key(seed), "dropout": jax.random.key(1)}, batch)
  return model, {k: nn.meta.unbox(v) for k, v in variables.items()}


def run(model, variables, batch=None, **kwargs):
  """``model.apply(variables, batch, **kwargs)``, jitted."""
  if batch is None:
    return jax.jit(functools.partial(model.apply, **kwargs))(variables)
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, batch)


# ----------------------------------------------------------------------------- numpy reference
def np_mlp(p, x, n, activate_last=True):
  for i in range(n):
    x = x @ np.asarray(p[f"dense_{i}"]["kernel"]) + np.asarray(p[f"dense_{i}"]["bias"])
    if i < n - 1 or activate_last:
      x = np.maximum(x, 0)
  return x


def np_embeddings(p, cfg, batch):
  out = [np.asarray(p[f"sparse_{i}"]["embedding"])[batch["sparse"][:, i]]
         for i in range(len(cfg.vocab_sizes))]
  for name, _ in cfg.multi_hot:
    ids = batch[f"multi_hot/{name}"]
    table = np.asarray(p[f"multi_hot_{name}"]["embedding"])
    rows = []
    for row in ids:
      present = [table[i] for i in row if i != 0]
      total = np.sum(present, axis=0) if present else np.zeros(table.shape[1])
      rows.append(total / max(len(present), 1) if cfg.multi_hot_pooling == "mean" else total)
    out.append(np.array(rows))
  return out


def np_cross(p, x0, layers_, rank):
  x = x0
  for i in range(layers_):
    if rank:
      w = np.asarray(p[f"v_{i}"]["kernel"]) @ np.asarray(p[f"u_{i}"]["kernel"])  # V U
      b = np.asarray(p[f"u_{i}"]["bias"])
    else:
      w, b = np.asarray(p[f"w_{i}"]["kernel"]), np.asarray(p[f"w_{i}"]["bias"])
    x = x0 * (x @ w + b) + x  # x_{l+1} = x0 * (W x_l + b) + x_l (row vectors)
  return x


def np_dot(vectors):
  f = len(vectors)
  return np.stack([np.sum(vectors[i] * vectors[j], axis=1)
                   for i in range(f) for j in range(i + 1, f)], axis=1)


def np_forward(params, cfg, batch):
  parts = []
  if cfg.num_dense:
    x = np.concatenate([batch["dense"], batch["dense_missing"]], axis=1)
    parts.append(np_mlp(params["bottom"], x, len(cfg.bottom_mlp)) if cfg.bottom_mlp else x)
  embedded = np_embeddings(params["embeddings"], cfg, batch)
  x0 = np.concatenate(parts + embedded, axis=1)
  if cfg.interaction == "dcnv2":
    inter = np_cross(params["cross"], x0, cfg.cross_layers, cfg.cross_rank)
  elif cfg.interaction == "dot":
    inter = np.concatenate(parts + [np_dot(parts + embedded)], axis=1)
  else:
    inter = x0
  deep = params.get("deep", {})
  if cfg.structure == "parallel":
    h = np.concatenate([inter, np_mlp(deep, x0, len(cfg.deep_mlp))], axis=1)
  else:
    h = np_mlp(deep, inter, len(cfg.deep_mlp))
  h = np_mlp(params.get("top", {}), h, len(cfg.top_mlp))
  return (h @ np.asarray(params["logit"]["kernel"]) + np.asarray(params["logit"]["bias"]))[:, 0]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("rank,structure,num_dense", [
    (0, "stacked", 0), (3, "stacked", 3), (0, "parallel", 3), (3, "parallel", 0)])
def test_dcnv2_forward_equals_numpy(rank, structure, num_dense):
  cfg = dlrm.DLRMConfig(vocab_sizes=VOCABS, num_dense=num_dense, multi_hot=(("tags", 7),),
                        embed_dim=4, embed_dims=(4, 3, 5), bottom_mlp=(8, 6),
                        interaction="dcnv2", cross_layers=3, cross_rank=rank,
                        structure=structure, deep_mlp=(10, 7), top_mlp=(5,))
  batch = make_batch(cfg)
  model, variables = init(cfg, batch)
  params = variables["params"]
  # Make biases and embeddings large enough that every term shows in the output.
  params = jax.tree.map(lambda a: a + 0.1 * np.random.default_rng(a.size).normal(size=a.shape),
                        params)
  got = np.asarray(run(model, {"params": params}, batch))
  want = np_forward(jax.tree.map(np.asarray, params), cfg, batch)
  assert got.shape == (8,)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert ("bottom" in params) == (num_dense > 0)
  assert set(params["cross"]) == ({f"{k}_{i}" for k in "uv" for i in range(3)} if rank
                                  else {f"w_{i}" for i in range(3)})
  d = (6 if num_dense else 0) + 4 + 3 + 5 + 4  # bottom output, 3 tables, pooled tags
  assert params["cross"]["v_0" if rank else "w_0"]["kernel"].shape == (d, rank or d)


@pytest.mark.parametrize("num_dense", [0, 2])
def test_dot_interaction_equals_numpy(num_dense):
  cfg = dlrm.DLRMConfig(vocab_sizes=VOCABS, num_dense=num_dense, multi_hot=(("tags", 5),),
                        embed_dim=4, bottom_mlp=(6, 4), interaction="dot", top_mlp=(8, 3))
  batch = make_batch(cfg, seed=3)
  model, variables = init(cfg, batch)
  params = jax.tree.map(lambda a: a + 0.2 * np.random.default_rng(a.size).normal(size=a.shape),
                        variables["params"])
  got = np.asarray(run(model, {"params": params}, batch))
  np.testing.assert_allclose(got, np_forward(jax.tree.map(np.asarray, params), cfg, batch),
                             rtol=2e-4, atol=2e-5)
  # F = 3 sparse + 1 multi-hot (+ the dense vector): F(F-1)/2 pairs (+ the dense vector).
  f = 4 + (num_dense > 0)
  top_in = params["top"]["dense_0"]["kernel"].shape[0]
  assert top_in == f * (f - 1) // 2 + (4 if num_dense else 0)


def test_dot_interaction_function():
  v = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(dlrm.dot_interaction(jnp.asarray(v))),
                             np_dot([v[:, i] for i in range(5)]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_feature_embeddings_lookup_and_pooling(pooling):
  cfg = dlrm.DLRMConfig(vocab_sizes=VOCABS, multi_hot=(("tags", 7), ("genres", 4)),
                        embed_dim=3, multi_hot_pooling=pooling)
  batch = make_batch(cfg, b=6, seed=5)
  module = layers.FeatureEmbeddings(VOCABS, (3, 3, 3), multi_hot=(("tags", 7, 3), ("genres", 4, 3)),
                                    pooling=pooling)
  mh = {n: batch[f"multi_hot/{n}"] for n in ("tags", "genres")}
  variables = module.init(jax.random.key(0), batch["sparse"], mh)
  params = nn.meta.unbox(variables["params"])
  got = module.apply({"params": params}, batch["sparse"], mh)
  want = np_embeddings(jax.tree.map(np.asarray, params), cfg, batch)
  assert len(got) == 5
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(got[3][0]), 0.0)  # all-padding row pools to 0
  # Every table is (vocab, embed): one rule shards them all row-wise.
  specs = nn.get_partition_spec(variables)["params"]
  assert {tuple(s["embedding"]) for s in specs.values()} == {(layers.VOCAB, layers.EMBED)}
  # 9 ids in a table padded to the row alignment with zero rows (even row-wise shards).
  assert params["sparse_1"]["embedding"].shape == (layers.ROW_ALIGNMENT, 3)
  np.testing.assert_array_equal(np.asarray(params["sparse_1"]["embedding"])[9:], 0.0)


def test_feature_embeddings_refuse_mismatched_batches():
  module = layers.FeatureEmbeddings(VOCABS, (2, 2, 2), multi_hot=(("tags", 5, 2),))
  with pytest.raises(ValueError, match="2 features, the model 3 tables"):
    module.init(jax.random.key(0), np.ones((2, 2), np.int32), {"tags": np.ones((2, 3), np.int32)})
  with pytest.raises(ValueError, match="no multi-hot feature 'tags'"):
    module.init(jax.random.key(0), np.ones((2, 3), np.int32), {})


def test_batch_norm_statistics_skip_padding_rows_and_eval_uses_running_averages():
  cfg = dlrm.DLRMConfig(vocab_sizes=VOCABS, num_dense=2, embed_dim=4, bottom_mlp=(),
                        structure="parallel", deep_mlp=(6,), top_mlp=(), batch_norm=True)
  padded = make_batch(cfg, b=10, padding=3, seed=7)
  real = {k: v[:7] for k, v in padded.items()}
  model, variables = init(cfg, padded)
  assert set(variables) == {"params", "batch_stats"}
  rng = {"dropout": jax.random.key(0)}
  out_p, new_p = run(model, variables, padded, deterministic=False, rngs=rng,
                     mutable=["batch_stats"])
  out_r, new_r = run(model, variables, real, deterministic=False, rngs=rng,
                     mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(out_p)[:7], np.asarray(out_r), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(new_r)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # Evaluation normalises with the running averages: (x - mean) / sqrt(var + eps).
  stats = {"batch_stats": jax.tree.map(lambda a: a + 0.5, variables["batch_stats"])}
  p = jax.tree.map(np.asarray, variables["params"])
  x0 = np.concatenate([real["dense"], real["dense_missing"]]
                      + np_embeddings(p["embeddings"], cfg, real), axis=1)
  h = x0 @ p["deep"]["dense_0"]["kernel"] + p["deep"]["dense_0"]["bias"]
  s = jax.tree.map(np.asarray, stats["batch_stats"])["deep"]["norm_0"]
  h = (h - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["deep"]["norm_0"]["scale"] \
      + p["deep"]["norm_0"]["bias"]
  h = np.concatenate([np_cross(p["cross"], x0, cfg.cross_layers, 0), np.maximum(h, 0)], axis=1)
  want = (h @ p["logit"]["kernel"] + p["logit"]["bias"])[:, 0]
  got = run(model, {"params": variables["params"], **stats}, real)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training():
  cfg = dlrm.DLRMConfig(vocab_sizes=VOCABS, embed_dim=4, deep_mlp=(16,), dropout=0.5)
  batch = make_batch(cfg)
  model, variables = init(cfg, batch)
  a = run(model, variables, batch)
  b = run(model, variables, batch, deterministic=False, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(np.asarray(a), np.asarray(run(model, variables, batch)))
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_embedding_regularizer_is_half_l2_of_whole_tables():
  cfg = dlrm.DLRMConfig(vocab_sizes=VOCABS, num_dense=1, multi_hot=(("tags", 5),),
                        embed_dim=3, embedding_l2=0.05)
  batch = make_batch(cfg)
  model, variables = init(cfg, batch)
  tables = [np.asarray(t, np.float64) for t in jax.tree.leaves(variables["params"]["embeddings"])]
  assert len(tables) == 4
  want = 0.05 / 2 * sum(np.sum(t ** 2) for t in tables)
  got = run(model, variables, batch, method=model.regularization)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Only the tables get a gradient, every row of them (not just the looked-up rows).
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, method=model.regularization)))(
      variables["params"])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    on_table = path[0].key == "embeddings"
    table = variables["params"]
    for k in path:
      table = table[k.key]
    np.testing.assert_allclose(np.asarray(g), 0.05 * np.asarray(table) if on_table else 0,
                               rtol=1e-5, atol=1e-12)
  no_l2 = dataclasses.replace(cfg, embedding_l2=0.0)
  assert float(run(dlrm.DLRM(no_l2), variables, method="regularization")) == 0.0


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="bottom MLP to end in embed_dim=8"):
    dlrm.DLRMConfig(num_dense=3, embed_dim=8, bottom_mlp=(16, 4), interaction="dot")
  with pytest.raises(ValueError, match="interaction must be one of"):
    dlrm.DLRMConfig(interaction="cross")
  with pytest.raises(ValueError, match="embed_dims has 2 entries for 3"):
    dlrm.DLRMConfig(vocab_sizes=VOCABS, embed_dims=(2, 2))
  with pytest.raises(ValueError, match="one embedding width"):
    dlrm.DLRMConfig(vocab_sizes=VOCABS, embed_dims=(2, 2, 3), interaction="dot")
  cfg = dlrm.DLRMConfig(vocab_sizes=[5, 6], bottom_mlp=[4], multi_hot=[["a", 3]])  # from JSON
  assert cfg.vocab_sizes == (5, 6) and cfg.multi_hot == (("a", 3),) and cfg.bottom_mlp == (4,)
  model = dlrm.DLRM(dlrm.DLRMConfig(vocab_sizes=VOCABS, num_dense=2))
  batch = make_batch(dlrm.DLRMConfig(vocab_sizes=VOCABS, num_dense=3))
  with pytest.raises(ValueError, match="num_dense=2"):
    model.init(jax.random.key(0), batch)


@pytest.mark.parametrize("name", ["dlrm-v2", "dcnv2", "dlrm"])
def test_presets_build_and_train_settings_are_config_fields(name):
  over = dict(vocab_sizes=VOCABS, num_dense=2, **dlrm.SMOKE_OVERRIDES[name])
  cfg = models.model_config(name, **over)
  assert getattr(type(cfg), "TASK") == "ranking"
  batch = make_batch(cfg, b=4)
  model, variables = init(cfg, batch)
  assert run(model, variables, batch).shape == (4,)
  fields = {f.name for f in dataclasses.fields(configs.TrainConfig)}
  assert set(dlrm.TRAIN_PRESETS[name]) <= fields
  assert dlrm.TRAIN_PRESETS[name]["optimizer"] in configs.OPTIMIZERS
  full = models.model_config(name)
  assert {k: getattr(full, k) for k in dlrm.PRESETS[name]} == dlrm.PRESETS[name]


def test_dlrm_v2_preset_has_the_mlperf_shapes():
  cfg = models.model_config("dlrm-v2", vocab_sizes=(10,) * 26, num_dense=13)
  model = dlrm.DLRM(cfg)
  batch = make_batch(cfg, b=2)
  shapes = jax.tree.map(lambda a: a.shape,
                        nn.meta.unbox(jax.eval_shape(lambda: model.init(
                            jax.random.key(0), batch))["params"]))
  assert [shapes["bottom"][f"dense_{i}"]["kernel"] for i in range(3)] == [
      (26, 512), (512, 256), (256, 128)]
  d = 27 * 128
  assert shapes["cross"]["v_2"]["kernel"] == (d, 512)
  assert shapes["cross"]["u_2"]["kernel"] == (512, d)
  assert [shapes["top"][f"dense_{i}"]["kernel"][1] for i in range(4)] + [
      shapes["logit"]["kernel"][1]] == [1024, 1024, 512, 256, 1]
  assert shapes["embeddings"]["sparse_25"]["embedding"] == (layers.padded_rows(10), 128)


def test_tiny_model_learns_a_separable_task():
  """Label = sign of a function of a dense value and two categorical ids; AUC > 0.95."""
  rng = np.random.default_rng(0)
  n = 3000
  dense = rng.normal(size=(n, 2)).astype(np.float32)
  sparse = np.stack([rng.integers(2, v, n) for v in (12, 8, 5)], 1).astype(np.int32)
  w0, w1 = rng.normal(size=12) * 2, rng.normal(size=8) * 2
  score = 1.5 * dense[:, 0] + w0[sparse[:, 0]] + w1[sparse[:, 1]] * np.sign(dense[:, 1])
  data = {"dense": dense, "dense_missing": np.zeros_like(dense), "sparse": sparse,
          "label": (score > np.median(score)).astype(np.float32),
          "weight": np.ones(n, np.float32)}
  train = {k: v[:2000] for k, v in data.items()}
  test = {k: v[2000:] for k, v in data.items()}
  cfg = dlrm.DLRMConfig(vocab_sizes=(12, 8, 5), num_dense=2, embed_dim=8, bottom_mlp=(16, 8),
                        cross_layers=2, structure="parallel", deep_mlp=(32, 16), top_mlp=(),
                        batch_norm=True, dropout=0.1, embedding_l2=1e-4)
  model, variables = init(cfg, {k: v[:4] for k, v in train.items()})
  tx = optax.adam(1e-2)
  params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, batch, rng):
    def loss_fn(p):
      logits, new = model.apply({"params": p, **stats}, batch, deterministic=False,
                                rngs={"dropout": rng}, mutable=["batch_stats"])
      reg = model.apply({"params": p}, method=model.regularization)
      return losses.binary_cross_entropy(logits, batch["label"], batch["weight"], reg), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), dict(new), opt, loss

  for i in range(300):
    idx = np.random.default_rng(i).integers(0, 2000, 256)
    params, stats, opt, loss = step(params, stats, opt, {k: v[idx] for k, v in train.items()},
                                    jax.random.key(i))
  logits = run(model, {"params": params, **stats}, test)
  got = metrics.binary_compute(metrics.binary_state(logits, test["label"], logits=True))
  assert got["auc"] > 0.95, got
  assert got["logloss"] < 0.35, got


def test_multi_hot_only_dataset_needs_no_sparse_array():
  cfg = dlrm.DLRMConfig(num_dense=2, multi_hot=(("tags", 7),), embed_dim=4, bottom_mlp=(4,))
  batch = make_batch(cfg, b=5)
  del batch["sparse"]
  model, variables = init(cfg, batch)
  assert set(variables["params"]["embeddings"]) == {"multi_hot_tags"}
  assert run(model, variables, batch).shape == (5,)
