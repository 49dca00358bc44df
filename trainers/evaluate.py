"""Full-ranking evaluation: every real item is a candidate, history items excluded.

The user representation is the model output at the last position of the
history; scores are dot products with every candidate embedding. Metrics are
the exact tie-aware expectations of :mod:`trainers.metrics`. Also home to the
most-popular-item baseline, evaluated under the same protocol.

Which items leave the ranking (``TrainConfig.exclude_history``, recorded as
``history_exclusion`` in ``metrics.json``): ``all`` (default) every item of the
user before the target (the examples' ``seen_items``, not truncated to
``max_len``); ``window`` the last ``max_len`` items the model reads (the HSTU
code's rule); ``none``. Padding and the OOV id are never candidates, and a
target equal to the OOV id (a rare item with ``--min-item-count`` > 1) is not
ranked: it weighs 0 and is counted (``<split>/oov_targets``, next to
``<split>/ranked_targets``). A dataset written before ``seen_items`` existed
gets ``window`` instead of ``all``, with a warning; re-run ``recml preprocess``
to exclude the whole history.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from trainers import configs, features, metrics, models, tasks
from trainers.checkpoints import load_config_dict, restore_selected
from trainers.input_pipeline import Batch, SequenceData, model_batch

log = logging.getLogger("recml.evaluate")


def make_score_fn(model) -> Callable[[Any, Batch], jax.Array]:
  """``(params, batch) -> [B, V]`` scores of every id for the last history position."""

  def score(params, batch):
    def fwd(m, b):
      user = m(b["history"], b["timestamps"], b["query_timestamps"], deterministic=True,
               last_only=True)
      return user[:, -1], m.all_candidates()
    user, table = model.apply({"params": params}, batch, method=fwd)
    return (user @ table.T)[:, :model.config.vocab_size]  # the table's padding rows dropped

  return score


def make_metrics_step(ks: Iterable[int], rule: str) -> Callable[[jax.Array, Batch], Any]:
  """A ``(scores, batch) -> metric sums`` step excluding the items of ``rule``.

  ``all`` scatters the batch's ``seen_items`` (a power-of-two width: a few
  compilations of this small function, not of the model) into the mask.
  """
  return _metrics_step(tuple(ks), configs.history_exclusion(rule))


@functools.lru_cache(maxsize=None)
def _metrics_step(ks: tuple[int, ...], rule: str):  # one jitted function per (ks, rule)
  key = {"all": "seen_items", "window": "history", "none": None}[rule]

  @jax.jit
  def sums(scores, target, weight, excluded):
    return metrics.ranking_metrics(scores, target, weight, excluded, ks,
                                   features.FIRST_ITEM_ID)

  def step(scores, batch):
    return sums(scores, batch["target"], batch["weight"], batch[key] if key else None)

  return step


def make_eval_step(model, config: configs.TrainConfig, put=None):
  """A ``(params, batch) -> metric sums`` for one batch (jitted scoring, then metrics).

  ``put``: turns a numpy batch into the (global, sharded) arrays the jitted functions
  take (the trainer's mesh); None hands them numpy.
  """
  score = jax.jit(make_score_fn(model))
  metric_step = make_metrics_step(config.top_ks, config.exclude_history)
  put = put or (lambda b: b)

  def eval_step(params, batch):
    batch = put(model_batch(batch))
    return metric_step(score(params, batch), batch)

  return eval_step


def eval_sums(eval_step, params, data: SequenceData) -> dict[str, Any]:
  """The merged per-batch sums of one split (host numpy)."""
  state: dict[str, Any] = {}
  for batch in data.batches():
    state = metrics.merge(state, eval_step(params, batch))
  return jax.device_get(state)


def run_eval(eval_step, params, data: SequenceData) -> dict[str, float]:
  """Merges the per-batch sums of one split and returns the means."""
  return metrics.compute(eval_sums(eval_step, params, data))


@functools.lru_cache(maxsize=None)
def _warn_window_fallback(where: str) -> None:
  log.warning("%s was written without %r (by an older `recml preprocess`): evaluation "
              "excludes only the last max_len history items (history_exclusion: window), "
              "not the whole history; re-run `recml preprocess` to exclude it all",
              where, features.SEEN_ITEMS)


def applied_exclusion(rule: Any, data: SequenceData) -> str:
  """The rule ``data`` is evaluated with: ``rule``, but ``window`` for ``all`` on a
  dataset without ``seen_items`` (its eval batches carry the window; warns once)."""
  rule = configs.history_exclusion(rule)
  if rule == "all" and not data.has_seen_items:
    _warn_window_fallback(os.path.dirname(data.files[0]))
    return "window"
  return rule


def target_counts(data: SequenceData) -> dict[str, int]:
  """``ranked_targets`` and ``oov_targets`` of a split, counted from its examples."""
  ranked = oov = 0.0
  for batch in data.batches():
    in_vocab = batch["target"] >= features.FIRST_ITEM_ID
    ranked += float(batch["weight"][in_vocab].sum())
    oov += float(batch["weight"][~in_vocab].sum())
  return {"ranked_targets": int(ranked), "oov_targets": int(oov)}


def evaluation_facts(rule: Any, data: Mapping[str, SequenceData]) -> dict[str, Any]:
  """What ``metrics.json`` states about the protocol: ``history_exclusion`` (the rule
  applied; ``all, window`` when splits differ) and ``<split>/ranked_targets`` and
  ``<split>/oov_targets`` for each split of ``data``."""
  applied = sorted({applied_exclusion(rule, d) for d in data.values()})
  facts: dict[str, Any] = {"history_exclusion": ", ".join(applied)}
  for split, d in data.items():
    facts.update({f"{split}/{k}": v for k, v in target_counts(d).items()})
  return facts


def load_model(workdir: str, which: str = "best"):
  """Rebuilds ``(config, model, params)`` from a work directory's config and checkpoint."""
  if which != "best":
    raise ValueError("only the selected ('best') checkpoint can be loaded")
  config = configs.TrainConfig.from_dict(load_config_dict(workdir))
  model = models.build(config.model, config.model_config)
  task = tasks.Retrieval(config)
  params, meta = restore_selected(workdir,
                                  lambda: task.init(model, jax.random.key(0))["params"])
  return config, model, params, meta


def evaluate_split(workdir: str, data_dir: str | None = None, split: str = features.TEST,
                   batch_size: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
  """``(metrics, facts)`` of a trained work directory's selected checkpoint on ``split``.

  ``facts``: ``history_exclusion`` and ``<split>/ranked_targets``, ``<split>/oov_targets``.
  """
  config, model, params, _ = load_model(workdir)
  data_dir = data_dir or config.data_dir
  data = SequenceData(data_dir, split, batch_size or config.eval_batch_size,
                      config.model_config.max_len)
  rule = applied_exclusion(config.exclude_history, data)
  step = make_eval_step(model, config.replace(exclude_history=rule))
  state = eval_sums(step, params, data)
  facts = {"history_exclusion": rule,
           **{f"{split}/{k}": v for k, v in metrics.counts(state).items()}}
  return metrics.compute(state), facts


def evaluate(workdir: str, data_dir: str | None = None, split: str = features.TEST,
             batch_size: int | None = None) -> dict[str, float]:
  """Metrics of a trained work directory's selected checkpoint on ``split``."""
  return evaluate_split(workdir, data_dir, split, batch_size)[0]


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
                        ks: Iterable[int] = (10, 50, 200), exclude_history: Any = "all",
                        batch_size: int = 512) -> dict[str, float]:
  """Scores every user's candidates by training-set popularity, under the same rules
  (``exclude_history`` as in TrainConfig; OOV targets are not ranked)."""
  info = features.load_dataset_info(data_dir)
  counts = jnp.asarray(item_counts(data_dir, info.item_vocab_size), jnp.float32)
  data = SequenceData(data_dir, split, batch_size, max_len)
  metric_step = make_metrics_step(ks, applied_exclusion(exclude_history, data))
  scores = jnp.broadcast_to(counts, (batch_size, counts.shape[0]))
  state: dict[str, Any] = {}
  for batch in data.batches():
    state = metrics.merge(state, metric_step(scores, batch))
  return metrics.compute(jax.device_get(state))


def dataset_name(data_dir: str) -> str:
  """The source's name, else its input folder's (a file's parent), else the dataset dir's."""
  source_info = features.read_dataset_json(data_dir).get("source") or {}  # either task
  if source_info.get("name"):
    return str(source_info["name"])
  source = str(source_info.get("input") or "").rstrip("/")
  if source and "*" not in source:
    base = os.path.basename(source)
    return base if "." not in base else os.path.basename(os.path.dirname(source))
  return os.path.basename(os.path.normpath(data_dir))
