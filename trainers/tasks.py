"""What differs between the two tasks one train loop serves.

``train_and_evaluate`` (:mod:`trainers.train`) is one loop: input, state, jitted
step, evaluation, selection, checkpoints, summary. A :class:`Task` supplies the
parts that depend on what is learned:

* ``retrieval`` -- next-item sequence models (SASRec, BERT4Rec, Mamba4Rec, HSTU):
  sequence batches, sampled/full softmax or gBCE over the item table (BERT4Rec: over
  masked positions), full-ranking HR/NDCG/MRR;
* ``ranking`` -- click-through-rate models (DLRM v2, DCNv2): rows of dense and
  categorical features, binary cross-entropy, exact AUC / log loss / NE.

A task names its batch source, its model inputs for initialisation, its loss,
its evaluation, the tree that the selected ("best") checkpoint holds, and the
numbers it adds to ``metrics.json``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from trainers import configs, features, losses, metrics
from trainers.input_pipeline import Batch, RankingData, SequenceData, model_batch


class Task:
  """The task-specific half of training; see the module docstring."""

  name = ""
  unit = "examples"          # what a row of a batch is, for rates ("sequences/s")

  def __init__(self, config: configs.TrainConfig):
    self.config = config

  # -- data ------------------------------------------------------------------
  def prepare(self) -> configs.TrainConfig:
    """Reads the dataset's description and returns the config with the model's
    data-dependent fields (vocabulary sizes) filled in."""
    raise NotImplementedError

  def train_data(self):
    raise NotImplementedError

  def eval_data(self) -> dict[str, Any]:
    raise NotImplementedError

  def num_train(self) -> int:
    raise NotImplementedError

  def count(self, batch: Batch) -> int:
    """Real (non-padding) examples in a train batch."""
    raise NotImplementedError

  # -- model -----------------------------------------------------------------
  def init(self, model, rng: jax.Array) -> Mapping[str, Any]:
    """The model's boxed variables (``params`` and any other collection)."""
    raise NotImplementedError

  def loss(self, model, params, model_state, batch: Batch, rng: jax.Array
           ) -> tuple[jax.Array, Any]:
    """``(loss, new model_state)`` of a train batch (``model_state``: collections
    other than ``params``, e.g. batch-norm statistics; None when the model has none)."""
    raise NotImplementedError

  def device_batch(self, batch: Batch) -> Batch:
    """What the jitted train step takes for ``batch``."""
    return batch

  def lookups_per_sample(self, table: str) -> float:
    """Ids an example looks up in ``table`` (the sharding planner's traffic estimate)."""
    raise NotImplementedError

  # -- evaluation ------------------------------------------------------------
  def make_evaluator(self, model, put=None):
    """``(variables, data) -> {metric: value}``; ``variables`` as :meth:`selected`.

    ``put``: turns a numpy batch into the (global, sharded) arrays the jitted
    functions take; None hands them numpy.
    """
    raise NotImplementedError

  def selected(self, state: Mapping[str, Any]) -> Any:
    """The tree a best checkpoint holds and evaluation takes."""
    raise NotImplementedError

  def facts(self, eval_data: Mapping[str, Any]) -> dict[str, Any]:
    """Protocol facts for ``metrics.json``."""
    return {}

  def info_facts(self) -> dict[str, Any]:
    """Dataset numbers for ``metrics.json``."""
    return {}


# ---------------------------------------------------------------------------
# Retrieval: next-item prediction over the whole catalogue
# ---------------------------------------------------------------------------


class Retrieval(Task):
  """Sequence models scored against every item (see :mod:`trainers.evaluate`)."""

  name = "retrieval"
  unit = "sequences"

  def prepare(self):
    import dataclasses  # pylint: disable=g-import-not-at-top
    self.info = features.load_dataset_info(self.config.data_dir)
    model_config = dataclasses.replace(self.config.model_config,
                                       vocab_size=self.info.item_vocab_size)
    self.config = self.config.replace(model_config=model_config)
    return self.config

  def train_data(self):
    c = self.config
    return SequenceData(
        c.data_dir, features.TRAIN, c.batch_size, c.max_len, c.shuffle_buffer,
        length_buckets=tuple(int(f * c.max_len) for f in c.length_bucket_fractions),
        bucket_window=c.bucket_window)

  def eval_data(self):
    c = self.config
    return {split: SequenceData(c.data_dir, split, c.eval_batch_size, c.max_len)
            for split in (features.VALID, features.TEST)}

  def num_train(self):
    return self.info.num_examples[features.TRAIN]

  def count(self, batch):
    return int(np.count_nonzero(batch["weights"].any(axis=1)))

  def init(self, model, rng):
    dummy = jnp.zeros((1, self.config.max_len), jnp.int32)
    return model.init(rng, dummy, dummy, dummy)

  def device_batch(self, batch):
    return model_batch(batch)

  def loss(self, model, params, model_state, batch, rng):
    """Next-item loss at every position; a cloze model (its config has ``mask_rate``,
    BERT4Rec) instead predicts the items at randomly masked positions of the sequence
    (the targets), the mask drawn from the step's ``rng``."""
    c = self.config
    normalizer = (float(c.batch_size * c.max_len) if c.loss_normalization == "fixed"
                  else None)
    dropout_rng, negatives_rng = jax.random.split(rng)
    vocab = c.model_config.vocab_size
    targets, weights = batch["targets"], batch["weights"]
    mask_rate = getattr(c.model_config, "mask_rate", 0.0)
    if mask_rate:
      from trainers.models import bert4rec  # pylint: disable=g-import-not-at-top
      masked = bert4rec.mask_positions(jax.random.fold_in(rng, 1), weights, mask_rate)
      weights = weights * masked

    def fwd(m, b):
      if mask_rate:
        user = m.cloze(b["targets"], masked, deterministic=False)
      else:
        user = m(b["inputs"], b["timestamps"], b["query_timestamps"], deterministic=False)
      return user, (m.all_candidates() if c.loss == "softmax" else None)

    user, table = model.apply({"params": params}, batch, method=fwd,
                              rngs={"dropout": dropout_rng})
    if mask_rate:
      user, targets, weights = masked_positions_only(user, targets, weights, mask_rate)
    if c.loss == "softmax":
      value = losses.softmax_loss(user, targets, weights, table, c.temperature,
                                  normalizer=normalizer, high=vocab)
      return value, model_state
    num_uniform = c.num_negatives - c.in_batch_negatives
    negatives = losses.sample_negatives(negatives_rng, targets.shape, num_uniform, vocab,
                                        c.negative_sharing, c.negative_group)
    log_q = None
    if c.in_batch_negatives:
      in_batch = losses.sample_in_batch(jax.random.fold_in(negatives_rng, 1), targets,
                                        weights, c.in_batch_negatives, c.negative_sharing,
                                        c.negative_group)
      negatives = jnp.concatenate([negatives, in_batch], axis=-1)
      log_q = losses.mixed_log_q(targets, weights, num_uniform, c.in_batch_negatives, vocab)
    # Candidate rows through the model's (sharded) lookup, not a gather of the table.
    take = lambda ids: model.apply({"params": params}, ids, method="candidates")
    if c.loss == "gbce":
      beta = losses.gbce_beta(c.num_negatives, vocab - features.FIRST_ITEM_ID, c.gbce_t)
      value = losses.gbce_loss(user, targets, weights, take, negatives, beta, c.temperature,
                               normalizer)
    else:
      value = losses.sampled_softmax_loss(user, targets, weights, take, negatives,
                                          c.temperature, normalizer, log_q)
    return value, model_state

  def lookups_per_sample(self, table):
    # inputs and targets at every position, plus each position's share of its negatives
    c = self.config
    sharers = {"position": 1, "group": max(c.negative_group, 1), "sequence": c.max_len,
               "column": c.batch_size, "batch": c.batch_size * c.max_len}[c.negative_sharing]
    negatives = c.num_negatives / sharers if c.loss != "softmax" else 0
    return c.max_len * (2 + negatives)

  def make_evaluator(self, model, put=None):
    from trainers import evaluate  # pylint: disable=g-import-not-at-top
    step = evaluate.make_eval_step(model, self.config, put)
    return lambda params, data: evaluate.run_eval(step, params, data)

  def selected(self, state):
    return state["params"]

  def facts(self, eval_data):
    from trainers import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.evaluation_facts(self.config.exclude_history, eval_data)

  def info_facts(self):
    return {"num_items": self.info.num_items, "num_users": self.info.num_users}


# ---------------------------------------------------------------------------
# Ranking: click probability of a row of dense and categorical features
# ---------------------------------------------------------------------------


class Ranking(Task):
  """CTR models: binary cross-entropy, exact AUC / log loss (:mod:`trainers.metrics`)."""

  name = "ranking"
  unit = "examples"

  def prepare(self):
    import dataclasses  # pylint: disable=g-import-not-at-top
    from trainers import ranking_features  # pylint: disable=g-import-not-at-top
    self.info = info = ranking_features.load_info(self.config.data_dir)
    model_config = dataclasses.replace(
        self.config.model_config,
        vocab_sizes=tuple(f.vocab_size for f in info.scalar_categorical),
        num_dense=len(info.dense),
        multi_hot=tuple((f.name, f.vocab_size) for f in info.multi_hot))
    self.config = self.config.replace(model_config=model_config)
    return self.config

  def train_data(self):
    c = self.config
    return RankingData(c.data_dir, features.TRAIN, c.batch_size, c.shuffle_buffer)

  def eval_data(self):
    c = self.config
    return {split: RankingData(c.data_dir, split, c.eval_batch_size)
            for split in (features.VALID, features.TEST)}

  def num_train(self):
    return int(self.info.counts[features.TRAIN])

  def count(self, batch):
    return int(np.count_nonzero(batch["weight"]))

  def example_batch(self) -> Batch:
    """A one-row batch of the dataset's shapes (initialisation, export)."""
    info, nd = self.info, len(self.info.dense)
    batch = {"dense": np.zeros((1, nd), np.float32),
             "dense_missing": np.zeros((1, nd), np.float32),
             "sparse": np.ones((1, len(info.scalar_categorical)), np.int32),
             "label": np.zeros((1,), np.float32), "weight": np.ones((1,), np.float32)}
    for f in info.multi_hot:
      batch[f"multi_hot/{f.name}"] = np.zeros((1, f.multi_hot), np.int32)
    return batch

  def init(self, model, rng):
    return model.init({"params": rng, "dropout": rng}, self.example_batch(),
                      deterministic=True)

  def loss(self, model, params, model_state, batch, rng):
    variables = {"params": params, **(model_state or {})}
    mutable = list(model_state or {})
    out = model.apply(variables, batch, deterministic=False, rngs={"dropout": rng},
                      mutable=mutable or False)  # [] would still return (out, {})
    logits, new_state = out if mutable else (out, model_state)
    value = losses.binary_cross_entropy(
        logits, batch["label"], batch["weight"],
        regularization=model.apply(variables, method=model.regularization))
    return value, (dict(new_state) if mutable else model_state)

  def make_logits(self, model):
    """``(variables, batch) -> [B]`` logits, jitted (evaluation and serving mode)."""
    @jax.jit
    def logits(variables, batch):
      return model.apply(variables, batch, deterministic=True)

    return logits

  def lookups_per_sample(self, table):
    widths = {f"multi_hot_{f.name}": f.multi_hot for f in self.info.multi_hot}
    return float(widths.get(table.rsplit("/", 1)[-1], 1))

  def make_evaluator(self, model, put=None):
    logits = self.make_logits(model)
    if put is not None:  # every process reads the whole (replicated) logits
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      sharded = logits
      logits = lambda v, b: multihost_utils.process_allgather(sharded(v, put(b)), tiled=True)

    def evaluate(variables, data: RankingData) -> dict[str, float]:
      return metrics.binary_compute(binary_state(logits, variables, data))

    return evaluate

  def selected(self, state):
    return {"params": state["params"], **state.get("model_state", {})}

  def facts(self, eval_data):
    return {f"{split}/examples": int(self.info.counts[split]) for split in eval_data}

  def info_facts(self):
    return {"label_rate": dict(self.info.label_rate),
            "num_features": {"dense": len(self.info.dense),
                             "categorical": len(self.info.categorical)}}


def binary_state(logits, variables, data: RankingData) -> dict[str, np.ndarray]:
  """The merged exact-metric state of one split (host numpy, padding rows dropped)."""
  state: dict[str, Any] = {}
  for batch in data.batches():
    keep = batch["weight"] > 0
    state = metrics.binary_merge(state, metrics.binary_state(
        np.asarray(logits(variables, batch))[keep], batch["label"][keep],
        batch["weight"][keep], logits=True))
  return state


def masked_positions_only(user: jax.Array, targets: jax.Array, weights: jax.Array,
                          rate: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The positions of a cloze batch that carry weight, gathered into ``[1, K, ...]``.

  Only the masked ~``rate`` of the positions are scored, so the loss (a full softmax:
  a ``[positions, V]`` matmul) is computed for them alone. ``K`` is static: the expected
  count plus 4 standard deviations plus one forced mask per row; a batch with more
  weighted positions (odds below 1e-4 when every position is real) drops the excess from
  its loss. Positions past the count weigh 0.
  """
  b, l, d = user.shape
  n = b * l
  k = min(n, int(np.ceil(rate * n + 4 * np.sqrt(n * rate * (1 - rate)) + b)))
  flat = weights.reshape(n)
  index = jnp.flatnonzero(flat > 0, size=k, fill_value=0)
  keep = jnp.arange(k) < jnp.count_nonzero(flat > 0)
  return (user.reshape(n, d)[index][None], targets.reshape(n)[index][None],
          jnp.where(keep, flat[index], 0.0)[None])


def for_config(config: configs.TrainConfig) -> Task:
  """The task of ``config.model``."""
  return {"retrieval": Retrieval, "ranking": Ranking}[config.task](config)
