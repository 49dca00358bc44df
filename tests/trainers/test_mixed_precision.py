"""Mixed precision (model ``dtype="bfloat16"``): bf16 computation with float32
parameters, optimizer state, loss and outputs, checked against the float32 model on the
same parameters and batches (the reference), for SASRec, HSTU and DCN-V2 (smoke presets).

XLA:CPU has no bf16 matmul: its compiler rounds the operands to bf16 and then multiplies
in f32, so the dot dtypes are read from the program JAX hands XLA (StableHLO); the
compiled module is checked for the bf16 roundings it keeps (GPUs and TPUs run the bf16
dots natively).
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers import configs, evaluate, export, features, layers, models, tasks, train
from trainers.input_pipeline import model_batch

NAMES = ("sasrec", "hstu", "dcnv2")
VOCAB, N_DENSE, VOCABS = 60, 3, (12, 30, 7)


def _config(name, dtype):
  if name == "dcnv2":
    return configs.get_config(name, smoke=True, dtype=dtype, vocab_sizes=VOCABS,
                              num_dense=N_DENSE, learning_rate=3e-3)
  return configs.get_config(name, smoke=True, dtype=dtype, vocab_size=VOCAB)


def _batch(config, seed=0):
  """A learnable device batch of ``config``'s shapes (cyclic item walks; clicks from a
  logistic model of the features)."""
  rng = np.random.default_rng(seed)
  b = config.batch_size
  if config.task == "ranking":
    dense = rng.normal(size=(b, N_DENSE)).astype(np.float32)
    sparse = np.stack([rng.integers(2, v, b) for v in VOCABS], 1).astype(np.int32)
    logit = dense @ np.array([1.5, -1.0, 0.5]) + np.where(sparse[:, 0] % 2, 1.5, -1.5)
    return {"dense": dense, "dense_missing": np.zeros_like(dense), "sparse": sparse,
            "label": (rng.random(b) < 1 / (1 + np.exp(-logit))).astype(np.float32),
            "weight": np.ones(b, np.float32)}
  length = config.max_len
  start = rng.integers(0, VOCAB - 2, (b, 1))
  walk = features.FIRST_ITEM_ID + (start + 3 * np.arange(length + 1)) % (VOCAB - 2)
  walk[: b // 4, : length // 2] = features.PAD_ID  # some left padding
  times = 1_000_000 + 3600 * np.arange(length + 1)[None].repeat(b, 0).astype(np.int64)
  targets = walk[:, 1:].astype(np.int32)
  return model_batch({
      "inputs": walk[:, :-1].astype(np.int32), "targets": targets,
      "weights": (walk[:, :-1] != features.PAD_ID).astype(np.float32),
      "timestamps": times[:, :-1], "query_timestamps": times[:, 1:]})


def _init(config, task, model, rng):
  """The model's boxed variables (``task.init``, which for ranking reads the dataset's
  description: there is none here, so a batch stands in)."""
  if config.task == "ranking":
    return model.init({"params": rng, "dropout": rng}, _batch(config), deterministic=True)
  return task.init(model, rng)


@functools.lru_cache(maxsize=None)
def _float32_variables(name):
  config = _config(name, "float32")
  task, model = tasks.for_config(config), models.build(name, config.model_config)
  boxed = jax.jit(lambda r: _init(config, task, model, r))(jax.random.key(0))
  return {k: nn.meta.unbox(v) for k, v in boxed.items()}


@functools.lru_cache(maxsize=None)
def _setup(name, dtype):
  """``(config, task, model, state, jitted train step)``; both dtypes start from the
  float32 model's initial variables (the same parameters: see
  :func:`test_bf16_model_initialises_float32_parameters`)."""
  config = _config(name, dtype)
  task = tasks.for_config(config)
  model = models.build(name, config.model_config)
  tx = train.make_optimizer(config)
  variables = dict(_float32_variables(name))
  params = variables.pop("params")
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  if variables:
    state["model_state"] = variables
  step = jax.jit(train.make_train_step(model, tx, task, jax.random.key(1)))
  return config, task, model, state, step


def _loss_and_grad(name, dtype, params, batch):
  _, task, model, state, _ = _setup(name, dtype)
  fn = jax.value_and_grad(
      lambda p, b: task.loss(model, p, state.get("model_state"), b, jax.random.key(2))[0])
  return jax.jit(fn)(params, batch)


def _forward(name, dtype):
  """``(variables, batch) -> outputs`` of the evaluation forward pass, and its arguments."""
  config, _, model, state, _ = _setup(name, dtype)
  batch = _batch(config)
  variables = {"params": state["params"], **state.get("model_state", {})}
  if config.task == "ranking":
    return (lambda v, b: model.apply(v, b, deterministic=True)), variables, batch
  return ((lambda v, b: model.apply(v, b["inputs"], b["timestamps"], b["query_timestamps"])),
          variables, batch)


def _dot_operand_dtypes(stablehlo: str) -> list[str]:
  """The operand element type of every ``dot_general``/``convolution`` (both operands
  must agree)."""
  out = []
  for line in stablehlo.splitlines():
    if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
      lhs, rhs = re.search(r":\s*\(tensor<(?:\d+x)*(\w+)>, tensor<(?:\d+x)*(\w+)>\)", line).groups()
      assert lhs == rhs, line
      out.append(lhs)
  return out


def _reduction_dtypes(stablehlo: str) -> list[str]:
  """The operand element type of every ``reduce`` (sums and maxima)."""
  return [re.search(r":\s*\(tensor<(?:\d+x)*(\w+)>", line).group(1)
          for line in stablehlo.splitlines() if "stablehlo.reduce(" in line]


def _cosine(a, b) -> float:
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- config
def test_dtype_is_a_validated_model_field_set_with_overrides():
  for name in ("sasrec", "hstu", "dlrm-v2"):
    config = configs.get_config(name)
    assert config.model_config.dtype == "float32"
    for key in ("dtype", "model.dtype"):
      changed = configs.apply_overrides(config, [f"{key}=bfloat16"])
      assert changed.model_config.dtype == "bfloat16"
      assert configs.TrainConfig.from_dict(changed.to_dict()).model_config.dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"Config: dtype must be one of .*'float16'"):
      configs.apply_overrides(config, ["dtype=float16"])
  # Older config.json files have no dtype: they load as float32.
  old = configs.get_config("sasrec").to_dict()
  del old["model_config"]["dtype"]
  assert configs.TrainConfig.from_dict(old).model_config.dtype == "float32"
  assert layers.compute_dtype("bfloat16") == jnp.bfloat16


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("name", NAMES)
def test_bf16_model_initialises_float32_parameters(name):
  config, task, model, _, _ = _setup(name, "bfloat16")
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(_init(config, task, model, r)),
                          jax.random.key(0))
  want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      _float32_variables(name))
  assert shapes == want
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", NAMES)
def test_bf16_step_keeps_parameters_optimizer_state_and_loss_float32(name):
  config, _, _, state, step = _setup(name, "bfloat16")
  new, loss = step(state, _batch(config))
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  floats = [x for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  for part in ("params", "opt_state") + (("model_state",) if "model_state" in new else ()):
    leaves = jax.tree.leaves(new[part])
    assert leaves and all(x.dtype != jnp.bfloat16 for x in leaves), part
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["params"]),
                                                    jax.tree.leaves(new["params"]))]
  assert all(moved)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_program_multiplies_in_bf16_and_float32_program_has_no_bf16(name):
  # The evaluation forward pass. Matmuls: SASRec qkv, q.k, attention.v, out, 2 FFN (one block);
  # HSTU uvqk, q.k, attention.v, out; DCN-V2 4 cross layers, 2 deep layers, and the
  # float32 logit layer.
  expected_bf16, expected_f32 = {"sasrec": (6, 0), "hstu": (4, 0), "dcnv2": (6, 1)}[name]
  for dtype in ("bfloat16", "float32"):
    fn, variables, batch = _forward(name, dtype)
    lowered = jax.jit(fn).lower(variables, batch)
    dots = _dot_operand_dtypes(lowered.as_text())
    # Layer-norm statistics, the softmax's maximum and sum, L2 norms: float32 always.
    reductions = _reduction_dtypes(lowered.as_text())
    assert "bf16" not in reductions
    assert name == "dcnv2" or "f32" in reductions
    executable = lowered.compile()
    compiled = executable.as_text()
    if dtype == "bfloat16":
      assert (dots.count("bf16"), dots.count("f32")) == (expected_bf16, expected_f32)
      assert re.search(r"\bbf16\[", compiled)
    else:
      assert dots == ["f32"] * (expected_bf16 + expected_f32)
      assert not re.search(r"\bbf16\[", compiled)
    out = executable(variables, batch)
    assert out.dtype == jnp.float32  # user representations / logits


@pytest.mark.parametrize("name", NAMES)
def test_bf16_loss_and_gradient_match_float32_on_the_same_parameters(name):
  config, _, _, state, _ = _setup(name, "float32")
  batch = _batch(config, seed=1)
  loss32, grad32 = _loss_and_grad(name, "float32", state["params"], batch)
  loss16, grad16 = _loss_and_grad(name, "bfloat16", state["params"], batch)
  assert {x.dtype for x in jax.tree.leaves(grad16)} == {jnp.dtype(jnp.float32)}
  assert abs(float(loss16) / float(loss32) - 1) < 5e-3  # measured: <= 3.3e-4
  assert _cosine(grad16, grad32) > 0.999  # measured: >= 0.99968
  # ... and they do differ: the bf16 program really computes in bf16.
  assert float(loss16) != float(loss32)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_training_reduces_the_loss_as_float32_does(name):
  steps, losses = 25, {}
  for dtype in ("float32", "bfloat16"):
    config, _, _, state, step = _setup(name, dtype)
    batches = [_batch(config, seed=s) for s in range(5)]
    trace = []
    for i in range(steps):
      state, loss = step(state, batches[i % len(batches)])
      trace.append(float(loss))
    losses[dtype] = trace
  for dtype, trace in losses.items():
    assert np.mean(trace[-5:]) < 0.8 * np.mean(trace[:5]), (dtype, trace)
  drop32 = np.mean(losses["float32"][:5]) - np.mean(losses["float32"][-5:])
  drop16 = np.mean(losses["bfloat16"][:5]) - np.mean(losses["bfloat16"][-5:])
  assert abs(drop16 - drop32) < 0.1 * drop32, losses


# ----------------------------------------------------------------------------- serving
@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_exported_bf16_model_serves_the_trainers_bf16_scores(name):
  """A bundle is built from the model config: a bf16 model serves in bf16, with the
  scores of the trainer's scoring function (float32 scores)."""
  config, _, model, state, _ = _setup(name, "bfloat16")
  batch = _batch(config)
  batch = {"history": batch["inputs"][:8], "timestamps": batch["timestamps"][:8],
           "query_timestamps": batch["query_timestamps"][:8]}
  want = np.array(jax.jit(evaluate.make_score_fn(model))(state["params"], batch))
  exported, leaves, _ = export.export_model(model, state["params"], config.max_len, 10,
                                            platforms=("cpu",))
  exclude = np.zeros_like(batch["history"])
  scores, ids = exported.call(tuple(leaves), batch["history"], batch["timestamps"],
                              batch["query_timestamps"], exclude)
  assert scores.dtype == jnp.float32
  want[:, :features.FIRST_ITEM_ID] = -np.inf
  np.testing.assert_allclose(scores, np.take_along_axis(want, np.asarray(ids), 1),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(scores, -np.sort(-want, axis=1)[:, :10], rtol=1e-6, atol=1e-6)
  # ... and they are bf16 scores, not the float32 model's.
  model32 = models.build(name, dataclasses.replace(config.model_config, dtype="float32"))
  want32 = np.asarray(jax.jit(evaluate.make_score_fn(model32))(state["params"], batch))
  assert not np.allclose(want32[:, features.FIRST_ITEM_ID:],
                         want[:, features.FIRST_ITEM_ID:], rtol=1e-6, atol=1e-6)


def test_bf16_matmul_and_its_gradients_match_a_float32_numpy_reference():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 40, 96)), jnp.bfloat16)   # [..., K]: leading axes kept
  w = jnp.asarray(rng.normal(size=(96, 72)) / 10, jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(3, 40, 72)), jnp.bfloat16)
  y, vjp = jax.vjp(jax.jit(layers.bf16_matmul), x, w)
  dx, dw = vjp(g)
  assert (y.dtype, dx.dtype, dw.dtype, y.shape, dx.shape, dw.shape) == (
      jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, (3, 40, 72), x.shape, w.shape)
  f = lambda a: np.asarray(a, np.float32)  # noqa: E731
  ref_y = f(x) @ f(w)
  ref_dx = f(g) @ f(w).T
  ref_dw = f(x).reshape(-1, 96).T @ f(g).reshape(-1, 72)
  for got, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
    # float32 accumulation: only the result's rounding to bfloat16 (2**-8 relative)
    np.testing.assert_allclose(f(got), ref, rtol=2**-7, atol=2**-7 * np.abs(ref).max())


def test_bf16_dense_layer_goes_through_bf16_matmul_and_float32_through_dot_general():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16)), jnp.float32)
  for dtype, routed in ((jnp.bfloat16, True), (jnp.float32, False)):
    layer = layers.dense(4, (layers.EMBED, layers.MLP), dtype=dtype)
    params = nn.meta.unbox(layer.init(jax.random.key(0), x))
    text = jax.jit(layer.apply).lower(params, x).as_text()
    # bf16_matmul's dot: bfloat16 operands, float32 result (the accumulation)
    accumulates = re.search(r"dot_general.*\(tensor<8x16xbf16>, tensor<16x4xbf16>\) -> "
                            r"tensor<8x4xf32>", text)
    assert bool(accumulates) == routed, text[-2000:]
    kernel = np.asarray(params["params"]["kernel"], np.float32)
    np.testing.assert_allclose(np.asarray(layer.apply(params, x), np.float32),
                               np.asarray(x) @ kernel, rtol=2e-2, atol=2e-2)
