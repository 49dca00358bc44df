"""Losses against direct numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers import losses


def numpy_sampled_softmax(user, targets, weights, table, negatives, temperature):
  b, l, _ = user.shape
  nb, g, n = negatives.shape
  size = -(-l // g)
  negatives = np.broadcast_to(negatives, (b, g, n))[:, np.arange(l) // size]
  total, count = 0.0, 0.0
  for i in range(b):
    for j in range(l):
      if weights[i, j] == 0:
        continue
      pos = user[i, j] @ table[targets[i, j]] / temperature
      negs = [user[i, j] @ table[n] / temperature for n in negatives[i, j] if n != targets[i, j]]
      logits = np.array([pos] + negs, np.float64)
      total += weights[i, j] * (np.log(np.exp(logits - logits.max()).sum()) + logits.max() - pos)
      count += weights[i, j]
  return total / count


@pytest.mark.parametrize("sharing,group", [("position", 1), ("group", 2), ("group", 3),
                                           ("sequence", 1), ("column", 1), ("batch", 1)])
def test_sampled_softmax_equals_numpy(sharing, group):
  rng = np.random.default_rng(0)
  b, l, d, v, n = 3, 7, 8, 12, 6
  user = rng.normal(size=(b, l, d)).astype(np.float32)
  table = rng.normal(size=(v, d)).astype(np.float32)
  targets = rng.integers(2, v, (b, l))
  weights = (rng.uniform(size=(b, l)) > 0.3).astype(np.float32)
  negatives = np.asarray(losses.sample_negatives(jax.random.key(1), (b, l), n, v, sharing, group))
  negatives = negatives.copy()
  negatives.flat[0] = targets.flat[0]  # a negative equal to the target is excluded
  got = losses.sampled_softmax_loss(jnp.asarray(user), jnp.asarray(targets), jnp.asarray(weights),
                                    jnp.asarray(table), jnp.asarray(negatives), 0.5)
  want = numpy_sampled_softmax(user, targets, weights, table, negatives, 0.5)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_negatives_are_uniform_over_real_items():
  neg = np.asarray(losses.sample_negatives(jax.random.key(0), (64, 50), 128, 20, "position"))
  assert neg.shape == (64, 50, 128) and neg.min() == 2 and neg.max() == 19
  counts = np.bincount(neg.ravel(), minlength=20)[2:]
  assert counts.std() / counts.mean() < 0.02
  assert losses.sample_negatives(jax.random.key(0), (4, 7), 9, 20, "sequence").shape == (4, 1, 9)
  assert losses.sample_negatives(jax.random.key(0), (4, 7), 9, 20, "group", 3).shape == (4, 3, 9)
  assert losses.sample_negatives(jax.random.key(0), (4, 7), 9, 20, "batch").shape == (1, 1, 9)


def test_full_softmax_equals_numpy():
  rng = np.random.default_rng(3)
  user = rng.normal(size=(2, 3, 4)).astype(np.float32)
  table = rng.normal(size=(9, 4)).astype(np.float32)
  targets = rng.integers(2, 9, (2, 3))
  weights = np.ones((2, 3), np.float32)
  logits = np.einsum("bld,vd->blv", user, table).astype(np.float64) / 0.1
  logits[..., :2] = -np.inf
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.mean(lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
  got = losses.softmax_loss(jnp.asarray(user), jnp.asarray(targets), jnp.asarray(weights),
                            jnp.asarray(table), 0.1)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_fixed_normalizer_weighs_positions_equally_across_batches():
  """With a constant normalizer, a batch's loss is the sum of its positions' losses over it,
  so two batches of different sizes add up to the loss of their union."""
  rng = np.random.default_rng(5)
  user = rng.normal(size=(4, 6, 8)).astype(np.float32)
  table = rng.normal(size=(12, 8)).astype(np.float32)
  targets = rng.integers(2, 12, (4, 6))
  weights = np.ones((4, 6), np.float32)
  weights[2:, :4] = 0  # the second half of the batch is short
  negatives = np.asarray(losses.sample_negatives(jax.random.key(2), (4, 6), 5, 12, "group", 2))
  args = lambda sl: (jnp.asarray(user[sl]), jnp.asarray(targets[sl]), jnp.asarray(weights[sl]),
                     jnp.asarray(table), jnp.asarray(negatives[sl]), 0.5)
  whole = losses.sampled_softmax_loss(*args(slice(0, 4)), normalizer=24.0)
  parts = (losses.sampled_softmax_loss(*args(slice(0, 2)), normalizer=24.0)
           + losses.sampled_softmax_loss(*args(slice(2, 4)), normalizer=24.0))
  assert float(whole) == pytest.approx(float(parts), rel=1e-6)
  mean = losses.sampled_softmax_loss(*args(slice(0, 4)))
  assert float(whole) == pytest.approx(float(mean) * weights.sum() / 24.0, rel=1e-6)


def test_binary_cross_entropy_equals_numpy_weighted_mean_plus_regularizer():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=12).astype(np.float32) * 4
  labels = rng.integers(0, 2, 12).astype(np.float32)
  weights = np.r_[np.ones(9), np.zeros(3)].astype(np.float32)  # 3 padding rows
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per_row = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  want = np.sum(weights * per_row) / 9
  got = losses.binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  assert float(got) == pytest.approx(want, rel=1e-5)
  reg = losses.binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(weights), regularization=jnp.float32(0.25))
  assert float(reg) == pytest.approx(want + 0.25, rel=1e-5)
  # Far-out logits stay finite (no log of a rounded-to-1 probability).
  extreme = losses.binary_cross_entropy(jnp.asarray([60.0, -60.0]), jnp.asarray([0.0, 1.0]))
  assert float(extreme) == pytest.approx(60.0, rel=1e-6)


def _numpy_logits(user, targets, table, negatives, temperature):
  """Per valid position: (positive logit, [negative logits], [negative ids])."""
  b, l, _ = user.shape
  nb, g, n = negatives.shape
  size = -(-l // g)
  negatives = np.broadcast_to(negatives, (b, g, n))[:, np.arange(l) // size]
  for i in range(b):
    for j in range(l):
      pos = float(user[i, j] @ table[targets[i, j]]) / temperature
      negs = [float(user[i, j] @ table[k]) / temperature for k in negatives[i, j]]
      yield i, j, pos, negs, list(negatives[i, j])


def test_gbce_equals_the_gsasrec_formula_in_numpy():
  """gSASRec's own recipe in float64: p = sigmoid(s_pos), transformed logit
  log(1 / (p^-beta - 1)), then BCE with targets [1, 0, ..., 0], mean over 1 + N."""
  rng = np.random.default_rng(7)
  b, l, d, v, n = 3, 5, 6, 40, 4
  user = rng.normal(size=(b, l, d)).astype(np.float32)
  table = rng.normal(size=(v, d)).astype(np.float32)
  targets = rng.integers(2, v, (b, l))
  weights = (rng.uniform(size=(b, l)) > 0.2).astype(np.float32)
  negatives = np.asarray(losses.sample_negatives(jax.random.key(4), (b, l), n, v, "group", 2))
  beta = losses.gbce_beta(n, v - 2, 0.75)
  alpha = n / (v - 3)
  assert beta == pytest.approx(alpha * (0.75 * (1 - 1 / alpha) + 1 / alpha))
  total = 0.0
  sig = lambda x: 1 / (1 + np.exp(-x))
  for i, j, pos, negs, ids in _numpy_logits(user, targets, table, negatives, 0.5):
    transformed = np.log(1.0 / (sig(pos) ** -beta - 1.0))
    terms = [-np.log(sig(transformed))]
    terms += [-np.log(1 - sig(s)) for s, k in zip(negs, ids) if k != targets[i, j]]
    total += weights[i, j] * sum(terms) / (1 + n)
  want = total / weights.sum()
  got = losses.gbce_loss(jnp.asarray(user), jnp.asarray(targets), jnp.asarray(weights),
                         jnp.asarray(table), jnp.asarray(negatives), beta, 0.5)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # t = 0 is plain binary cross-entropy (beta 1); t = 1 fully calibrated (beta = alpha).
  assert losses.gbce_beta(n, v - 2, 0.0) == pytest.approx(1.0)
  assert losses.gbce_beta(n, v - 2, 1.0) == pytest.approx(alpha)


def test_in_batch_negatives_follow_the_batch_target_counts():
  targets = np.array([[5, 5, 5, 7, 0, 0], [5, 9, 9, 7, 7, 7]])
  weights = (targets > 0).astype(np.float32)
  weights[1, 0] = 0  # a padding position's id is never drawn
  neg = np.asarray(losses.sample_in_batch(jax.random.key(0), jnp.asarray(targets),
                                          jnp.asarray(weights), 4000, "batch"))
  assert neg.shape == (1, 1, 4000)
  counts = np.bincount(neg.ravel(), minlength=10)
  want = np.bincount(targets[weights > 0], minlength=10) / weights.sum()
  np.testing.assert_allclose(counts / 4000, want, atol=0.03)
  assert counts[0] == 0
  assert losses.sample_in_batch(jax.random.key(0), jnp.asarray(targets), jnp.asarray(weights),
                                3, "group", 4).shape == (2, 2, 3)


def test_mixed_negatives_logq_corrected_softmax_equals_numpy():
  rng = np.random.default_rng(11)
  b, l, d, v = 2, 6, 5, 15
  user = rng.normal(size=(b, l, d)).astype(np.float32)
  table = rng.normal(size=(v, d)).astype(np.float32)
  targets = rng.integers(2, v, (b, l))
  weights = np.ones((b, l), np.float32)
  weights[0, :2] = 0
  uniform = np.asarray(losses.sample_negatives(jax.random.key(1), (b, l), 3, v, "sequence"))
  in_batch = np.asarray(losses.sample_in_batch(jax.random.key(2), jnp.asarray(targets),
                                               jnp.asarray(weights), 2, "sequence"))
  negatives = np.concatenate([uniform, in_batch], axis=-1)
  counts = np.bincount(targets[weights > 0], minlength=v)
  q = (3 * np.where(np.arange(v) >= 2, 1 / (v - 2), 0) + 2 * counts / counts.sum()) / 5
  log_q = np.asarray(losses.mixed_log_q(jnp.asarray(targets), jnp.asarray(weights), 3, 2, v))
  np.testing.assert_allclose(np.exp(log_q[2:]), q[2:], rtol=1e-6)
  total = 0.0
  for i, j, pos, negs, ids in _numpy_logits(user, targets, table, negatives, 0.5):
    pos -= np.log(q[targets[i, j]])
    logits = [pos] + [s - np.log(q[k]) for s, k in zip(negs, ids) if k != targets[i, j]]
    total += weights[i, j] * (np.log(np.sum(np.exp(logits))) - pos)
  want = total / weights.sum()
  got = losses.sampled_softmax_loss(jnp.asarray(user), jnp.asarray(targets), jnp.asarray(weights),
                                    jnp.asarray(table), jnp.asarray(negatives), 0.5,
                                    log_q=jnp.asarray(log_q))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_cloze_loss_on_gathered_masked_positions_equals_the_full_loss():
  """Scoring only the masked positions (tasks.masked_positions_only) gives the loss of
  every position weighted by the mask, for the full softmax and the sampled one."""
  from trainers import tasks
  rng = np.random.default_rng(2)
  b, l, d, v = 8, 30, 6, 25
  user = rng.normal(size=(b, l, d)).astype(np.float32)
  table = rng.normal(size=(v, d)).astype(np.float32)
  targets = rng.integers(2, v, (b, l))
  weights = (rng.uniform(size=(b, l)) < 0.2).astype(np.float32)
  weights[:, 0] = 0
  weights[3] = 0  # a row with nothing masked
  got_user, got_targets, got_weights = tasks.masked_positions_only(
      jnp.asarray(user), jnp.asarray(targets), jnp.asarray(weights), 0.2)
  k = got_user.shape[1]
  assert k < b * l // 2 and int(weights.sum()) <= k
  assert float(got_weights.sum()) == weights.sum()
  full = losses.softmax_loss(jnp.asarray(user), jnp.asarray(targets), jnp.asarray(weights),
                             jnp.asarray(table), 0.5, normalizer=float(b * l))
  gathered = losses.softmax_loss(got_user, got_targets, got_weights, jnp.asarray(table), 0.5,
                                 normalizer=float(b * l))
  assert float(gathered) == pytest.approx(float(full), rel=1e-6)
  # Brute force: the weighted positions' cross-entropy summed in numpy.
  logits = np.einsum("bld,vd->blv", user, table).astype(np.float64) / 0.5
  logits[..., :2] = -np.inf
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  assert float(gathered) == pytest.approx(float((ce * weights).sum() / (b * l)), rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_full_softmax_value_and_gradients_equal_numpy_with_padding_and_chunks(chunk):
  """The chunked cross-entropy (weighted positions gathered, scored ``chunk`` at a time,
  logits recomputed in the backward pass) against numpy's float64 value and analytic
  gradients: padding positions, a chunk size that does not divide the positions, table
  rows past ``high`` masked, and a constant normalizer."""
  rng = np.random.default_rng(11)
  b, l, d, v, high, temperature = 3, 10, 5, 17, 15, 0.2
  user = rng.normal(size=(b, l, d)).astype(np.float32)
  table = rng.normal(size=(v, d)).astype(np.float32)
  targets = rng.integers(2, high, (b, l))
  weights = np.ones((b, l), np.float32)
  weights[0, :6] = 0   # left padding
  weights[2] = 0       # a row of padding only
  for normalizer in (None, 40.0):
    value, (du, dtable) = jax.value_and_grad(
        lambda u, t: losses.softmax_loss(u, jnp.asarray(targets), jnp.asarray(weights), t,
                                         temperature, normalizer=normalizer, high=high,
                                         chunk=chunk), argnums=(0, 1))(
        jnp.asarray(user), jnp.asarray(table))
    logits = np.einsum("bld,vd->blv", user.astype(np.float64), table) / temperature
    logits[..., :2] = -np.inf
    logits[..., high:] = -np.inf
    top = logits.max(-1, keepdims=True)
    p = np.exp(logits - top)
    p /= p.sum(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    denom = normalizer or weights.sum()
    assert float(value) == pytest.approx((ce * weights).sum() / denom, rel=1e-5)
    onehot = np.eye(v)[targets]
    dlogits = (p - onehot) * (weights / denom / temperature)[..., None]
    np.testing.assert_allclose(np.asarray(du), np.einsum("blv,vd->bld", dlogits, table),
                               rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dtable), np.einsum("blv,bld->vd", dlogits, user),
                               rtol=2e-4, atol=1e-6)
    assert not np.asarray(du)[2].any()  # padding positions get no gradient
