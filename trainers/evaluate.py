"""Full-ranking evaluation: every real item is a candidate, history items excluded.

The user representation is the model output at the last position of the
history; scores are dot products with every candidate embedding. Metrics are
the exact tie-aware expectations of :mod:`trainers.metrics`. Also home to the
most-popular-item baseline, evaluated under the same protocol.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from trainers import configs, features, metrics, models
from trainers.checkpoints import Checkpoints, load_config_dict
from trainers.input_pipeline import Batch, SequenceData


def make_score_fn(model) -> Callable[[Any, Batch], jax.Array]:
  """``(params, batch) -> [B, V]`` scores of every id for the last history position."""

  def score(params, batch):
    def fwd(m, b):
      user = m(b["history"], b["timestamps"], b["query_timestamps"], deterministic=True,
               last_only=True)
      return user[:, -1], m.all_candidates()
    user, table = model.apply({"params": params}, batch, method=fwd)
    return user @ table.T

  return score


def make_eval_step(model, config: configs.TrainConfig):
  """A jitted ``(params, batch) -> metric sums`` for one batch."""
  score = make_score_fn(model)

  @jax.jit
  def eval_step(params, batch):
    scores = score(params, batch)
    history = batch["history"] if config.exclude_history else None
    return metrics.ranking_metrics(scores, batch["target"], batch["weight"], history,
                                   config.top_ks, features.FIRST_ITEM_ID)

  return eval_step


def run_eval(eval_step, params, data: SequenceData) -> dict[str, float]:
  """Merges the per-batch sums of one split and returns the means."""
  state: dict[str, Any] = {}
  for batch in data.batches():
    state = metrics.merge(state, eval_step(params, batch))
  return metrics.compute(jax.device_get(state))


def load_model(workdir: str, which: str = "best"):
  """Rebuilds ``(config, model, params)`` from a work directory's config and checkpoint."""
  if which != "best":
    raise ValueError("only the selected ('best') checkpoint can be loaded")
  config = configs.TrainConfig.from_dict(load_config_dict(workdir))
  model = models.build(config.model, config.model_config)
  length = config.model_config.max_len
  dummy = jnp.zeros((1, length), jnp.int32)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), dummy, dummy, dummy)["params"])
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  abstract = nn.meta.unbox(abstract)
  ckpt = Checkpoints(workdir, async_save=False)
  try:
    params, meta = ckpt.restore_best(abstract)
  finally:
    ckpt.close()
  return config, model, params, meta


def evaluate(workdir: str, data_dir: str | None = None, split: str = features.TEST,
             batch_size: int | None = None) -> dict[str, float]:
  """Metrics of a trained work directory's selected checkpoint on ``split``."""
  config, model, params, _ = load_model(workdir)
  data_dir = data_dir or config.data_dir
  data = SequenceData(data_dir, split, batch_size or config.eval_batch_size,
                      config.model_config.max_len)
  return run_eval(make_eval_step(model, config), params, data)


# ---------------------------------------------------------------------------
# Most-popular baseline
# ---------------------------------------------------------------------------


def item_counts(data_dir: str, vocab_size: int) -> np.ndarray:
  """Occurrences of each item in the training sequences (no validation/test targets)."""
  counts = np.zeros(vocab_size, np.float64)
  data = SequenceData(data_dir, features.TRAIN, 1024, max_len=1, cache=False)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for serialized in data._records.batch(4096).as_numpy_iterator():  # pylint: disable=protected-access
    ex = tf.io.parse_example(serialized, features.feature_spec(features.TRAIN))
    np.add.at(counts, ex[features.ITEM_IDS].flat_values.numpy(), 1)
  return counts


def popularity_baseline(data_dir: str, split: str = features.TEST, max_len: int = 200,
                        ks: Iterable[int] = (10, 50, 200), exclude_history: bool = True,
                        batch_size: int = 512) -> dict[str, float]:
  """Scores every user's candidates by training-set popularity."""
  info = features.load_dataset_info(data_dir)
  counts = jnp.asarray(item_counts(data_dir, info.item_vocab_size), jnp.float32)
  ks = tuple(ks)

  @jax.jit
  def step(batch):
    scores = jnp.broadcast_to(counts, (batch["target"].shape[0], counts.shape[0]))
    history = batch["history"] if exclude_history else None
    return metrics.ranking_metrics(scores, batch["target"], batch["weight"], history, ks,
                                   features.FIRST_ITEM_ID)

  state: dict[str, Any] = {}
  for batch in SequenceData(data_dir, split, batch_size, max_len).batches():
    state = metrics.merge(state, step(batch))
  return metrics.compute(jax.device_get(state))


def dataset_name(data_dir: str) -> str:
  """The source's name, else its input folder's (a file's parent), else the dataset dir's."""
  info = features.load_dataset_info(data_dir)
  if info.source.get("name"):
    return str(info.source["name"])
  source = str(info.source.get("input") or "").rstrip("/")
  if source and "*" not in source:
    base = os.path.basename(source)
    return base if "." not in base else os.path.basename(os.path.dirname(source))
  return os.path.basename(os.path.normpath(data_dir))
