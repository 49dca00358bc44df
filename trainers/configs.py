"""Experiment configs: one frozen dataclass for training plus the model's own config.

Presets (``get_config(name)``) state how to run them and what they reach:

* ``sasrec``     -- ML-1M setting of the HSTU paper's SASRec baseline: 2 blocks, 1 head,
  d=50, dropout 0.2, sampled softmax with 128 negatives at temperature 0.05.
  ml-1m-partial on 2 CPU cores: see benchmarks/results/train.md for s/epoch and HR@10.
* ``hstu``       -- 2 blocks, 1 head, d_qk = d_v = 50.
* ``hstu-large`` -- 8 blocks, 2 heads, d_qk = d_v = 25.

Every preset has a smoke variant (``smoke=True``) used by the tests: a tiny model
that trains a few steps in seconds.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any, Iterable

from trainers import models

LOSSES = ("sampled_softmax", "softmax", "gbce")
OPTIMIZERS = ("adamw", "adagrad")
# Selection metrics of the ranking (CTR) task; the retrieval task selects on hr/ndcg@K, mrr.
RANKING_SELECTION = ("auc", "logloss", "ne", "accuracy")
LOWER_IS_BETTER = frozenset({"logloss", "ne"})
NEGATIVE_SHARING = ("position", "group", "sequence", "column", "batch")
# Items excluded from evaluation rankings: the user's whole history before the target
# ("all"), only the last max_len items the model reads ("window", the HSTU code), none.
HISTORY_EXCLUSION = ("all", "window", "none")
# How embedding tables are placed: the planner, or one kind of trainers.sharding.KINDS.
EMBEDDING_SHARDING = ("auto", "replicated", "table", "row", "column")


def history_exclusion(value: Any) -> str:
  """``exclude_history`` as a rule name; older configs' booleans: True -> "all", False -> "none"."""
  if isinstance(value, bool):
    return "all" if value else "none"
  if value not in HISTORY_EXCLUSION:
    raise ValueError(f"exclude_history must be one of {HISTORY_EXCLUSION} (or a boolean), "
                     f"got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything ``train_and_evaluate`` needs, besides the work directory."""

  model: str = "sasrec"
  model_config: Any = None            # the model's frozen config (see trainers.models)
  data_dir: str = ""
  # optimisation: AdamW as in the HSTU paper's code (Adam when weight_decay is 0), or
  # Adagrad (MLPerf DLRM-DCNv2; accumulators start at 0, as in torch.optim.Adagrad)
  optimizer: str = "adamw"
  epochs: int = 100
  batch_size: int = 128
  learning_rate: float = 1e-3
  beta1: float = 0.9
  beta2: float = 0.98
  weight_decay: float = 0.0
  grad_clip_norm: float = 0.0         # 0 disables clipping
  # After each evaluation without improvement, learning rate *= this (1 = constant), not
  # below min_learning_rate (FuxiCTR's reduce_lr_on_plateau: 0.1, 1e-6).
  lr_decay_on_plateau: float = 1.0
  min_learning_rate: float = 1e-6
  # loss: sampled softmax over num_negatives negatives, full softmax cross-entropy over
  # every item, or gBCE (gSASRec's calibrated binary cross-entropy, sampled negatives)
  loss: str = "sampled_softmax"
  num_negatives: int = 128
  # Of the num_negatives, how many are drawn from the batch's own targets (in proportion
  # to their counts there) rather than uniformly; the sampled softmax is logQ-corrected.
  in_batch_negatives: int = 0
  temperature: float = 0.05
  gbce_t: float = 0.75                # gBCE calibration t in [0, 1] (0 = plain BCE)
  # How a batch's loss is averaged: over its valid positions ("positions"), or summed and
  # divided by batch_size * max_len ("fixed"), so that every position weighs the same
  # whatever batch it lands in (length buckets make batches of very different sizes).
  loss_normalization: str = "fixed"
  # Which positions share a set of negatives: every position draws its own (`position`,
  # the HSTU code: a [B, L, N, D] gather and a batched mat-vec, ~3x the step on CPU),
  # groups of `negative_group` consecutive positions (`group`: a [B, L/g, N, D] gather,
  # batched matmuls), a whole sequence (`sequence`: loses quality), one position index
  # across the batch (`column`: every position of a sequence has its own set, N rows
  # gathered per position index, one [N, D] x [D, B] matmul each: the loss ~4x cheaper
  # than `group` on CPU) or the batch (`batch`).
  negative_sharing: str = "column"
  negative_group: int = 8
  # evaluation, selection, early stopping
  eval_every: int = 1                 # epochs
  eval_batch_size: int = 256
  top_ks: tuple[int, ...] = (10, 50, 200)
  exclude_history: str = "all"       # see HISTORY_EXCLUSION
  # On the validation split; "" = the task's default (ndcg@10 for retrieval, auc for ranking).
  selection_metric: str = ""
  patience: int = 10                  # evaluations without improvement before stopping; 0 = never
  # Time to quality (MLPerf style): "SPLIT/METRIC>=VALUE" (or "<="), e.g. "valid/hr@10>=0.2";
  # training stops after the first evaluation where it holds. "" = never.
  stop_at: str = ""
  # input
  shuffle_buffer: int = 100_000
  # Train batches are truncated to the smallest of these fractions of max_len (and
  # max_len itself) that holds their longest sequence, after sorting windows of
  # `bucket_window` batches by length; () pads every batch to max_len.
  length_bucket_fractions: tuple[float, ...] = (0.25, 0.5)
  bucket_window: int = 8
  # devices and sharding (trainers.sharding, trainers.planner); these place arrays and
  # do not change the math, so a run may resume on another mesh or plan
  num_devices: int = 0                # devices of the mesh; 0 = every device of every process
  # Embedding tables: "auto" (the planner chooses per table), or one of
  # trainers.sharding.KINDS for every table ("replicated", "table", "row", "column").
  embedding_sharding: str = "auto"
  sharding_pins: tuple[str, ...] = ()  # "TABLE=KIND" (e.g. item_embedding=row): pinned choices
  device_memory_gb: float = 0.0       # the planner's per-device budget for tables; 0 = no limit
  # bookkeeping
  seed: int = 42
  max_steps_per_epoch: int = 0        # 0 = whole epoch; >0 caps it (smoke tests)

  def __post_init__(self):
    if self.model_config is None:
      object.__setattr__(self, "model_config", models.model_config(self.model))
    checks = [
        (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
        (self.negative_sharing in NEGATIVE_SHARING,
         f"negative_sharing must be one of {NEGATIVE_SHARING}, got {self.negative_sharing!r}"),
        (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
        (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
        (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
        (self.num_negatives >= 1, f"num_negatives must be >= 1, got {self.num_negatives}"),
        (0 <= self.in_batch_negatives <= self.num_negatives,
         f"in_batch_negatives must lie in [0, num_negatives={self.num_negatives}], "
         f"got {self.in_batch_negatives}"),
        (not (self.loss == "gbce" and self.in_batch_negatives),
         "loss gbce calibrates uniform negatives; set in_batch_negatives=0"),
        (0.0 <= self.gbce_t <= 1.0, f"gbce_t must lie in [0, 1], got {self.gbce_t}"),
        (self.negative_group >= 1, f"negative_group must be >= 1, got {self.negative_group}"),
        (self.loss_normalization in ("positions", "fixed"),
         f"loss_normalization must be 'positions' or 'fixed', got {self.loss_normalization!r}"),
        (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
        (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
        (0.0 < self.lr_decay_on_plateau <= 1.0,
         f"lr_decay_on_plateau must lie in (0, 1], got {self.lr_decay_on_plateau}"),
        (self.optimizer in OPTIMIZERS,
         f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
        (self.embedding_sharding in EMBEDDING_SHARDING,
         f"embedding_sharding must be one of {EMBEDDING_SHARDING}, "
         f"got {self.embedding_sharding!r}"),
        (self.num_devices >= 0, f"num_devices must be >= 0, got {self.num_devices}"),
        (self.device_memory_gb >= 0,
         f"device_memory_gb must be >= 0, got {self.device_memory_gb}"),
    ]
    if isinstance(self.sharding_pins, str):  # --set sharding_pins=item_embedding=row
      object.__setattr__(self, "sharding_pins", (self.sharding_pins,))
    object.__setattr__(self, "sharding_pins", tuple(self.sharding_pins))
    self.pins()  # checks their form
    parse_stop_at(self.stop_at)  # checks its form
    object.__setattr__(self, "exclude_history", history_exclusion(self.exclude_history))
    for ok, message in checks:
      if not ok:
        raise ValueError(message)
    if self.task == "ranking":
      object.__setattr__(self, "selection_metric", self.selection_metric or "auc")
      if self.selection_metric not in RANKING_SELECTION:
        raise ValueError(f"selection_metric {self.selection_metric!r} is not a ranking "
                         f"metric; choose one of {RANKING_SELECTION}")
      return
    object.__setattr__(self, "selection_metric", self.selection_metric or "ndcg@10")
    name, _, k = self.selection_metric.partition("@")
    if name not in ("hr", "ndcg", "mrr") or (k and int(k) not in self.top_ks):
      raise ValueError(f"selection_metric {self.selection_metric!r} is not among the "
                       f"computed metrics (hr@K / ndcg@K for K in {self.top_ks}, mrr)")

  @property
  def task(self) -> str:
    """``retrieval`` (next-item sequence models) or ``ranking`` (CTR models)."""
    return models.task_of(self.model)

  def pins(self) -> dict[str, str]:
    """``sharding_pins`` as ``{table: kind}``."""
    out = {}
    for pin in self.sharding_pins:
      table, sep, kind = str(pin).partition("=")
      if not sep or not table.strip() or kind.strip() not in EMBEDDING_SHARDING[1:]:
        raise ValueError(f"sharding_pins entry {pin!r} is not TABLE=KIND with KIND one of "
                         f"{EMBEDDING_SHARDING[1:]}")
      out[table.strip()] = kind.strip()
    return out

  @property
  def selection_lower_is_better(self) -> bool:
    return self.selection_metric in LOWER_IS_BETTER

  @property
  def max_len(self) -> int:
    return self.model_config.max_len

  def replace(self, **changes: Any) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["model_config"] = dataclasses.asdict(self.model_config)
    d["top_ks"] = list(self.top_ks)
    d["length_bucket_fractions"] = list(self.length_bucket_fractions)
    d["sharding_pins"] = list(self.sharding_pins)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    d = dict(d)
    # Legacy key: config.json files written before the unused ``log_every_steps``
    # field was removed still carry it; it never changed a number, so drop it.
    d.pop("log_every_steps", None)
    d["model_config"] = models.config_from_dict(d["model"], d.get("model_config") or {})
    for key in ("top_ks", "length_bucket_fractions", "sharding_pins"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)


# Fields that may change when a run resumes from its work directory. Every other field
# of TrainConfig and of the model's config (model, data, optimisation, loss, evaluation,
# selection, input, seed) is the run's identity: its checkpoints continue only that
# config. ``epochs`` extends a run (data order and randomness are functions of seed,
# epoch and step, so the result equals an uninterrupted run of that many epochs). The
# mesh and sharding fields place the same arrays on other devices (a checkpoint restores
# onto any mesh or plan; float sums may round differently). ``patience`` and ``stop_at``
# decide when a run stops: a run they stopped continues once they no longer hold
# (:func:`trainers.train.still_stopped`).
RESUMABLE_FIELDS = frozenset({"epochs", "num_devices", "embedding_sharding", "sharding_pins",
                              "device_memory_gb", "stop_at", "patience"})


# Fields a loss never reads: under full-softmax cross-entropy no negatives are drawn, and
# gbce_t is gBCE's alone. A difference in them cannot change a run.
UNUSED_BY_LOSS = {
    "softmax": frozenset({"num_negatives", "in_batch_negatives", "negative_sharing",
                          "negative_group", "gbce_t"}),
    "sampled_softmax": frozenset({"gbce_t"}),
}


def _same_path(a: Any, b: Any) -> bool:
  return (isinstance(a, str) and isinstance(b, str) and bool(a) and bool(b)
          and os.path.realpath(a) == os.path.realpath(b))


def config_differences(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
  """``{field: (old value, new value)}`` of the fields that differ, as JSON values.

  Model fields are named ``model.KEY`` (as ``--set`` takes them); they are not listed
  when the model itself differs. Not differences: ``data_dir`` spelled two ways for one
  folder (relative to the working directory, or through a link), and fields the loss of
  both configs never reads (:data:`UNUSED_BY_LOSS`).
  """
  a, b = json.loads(old.to_json()), json.loads(new.to_json())
  a_model, b_model = a.pop("model_config"), b.pop("model_config")
  unused = UNUSED_BY_LOSS.get(a.get("loss"), frozenset()) if a.get("loss") == b.get("loss") \
      else frozenset()
  diffs = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
           if a.get(k) != b.get(k) and k not in unused
           and not (k == "data_dir" and _same_path(a[k], b[k]))}
  if "model" not in diffs:
    diffs.update({f"model.{k}": (a_model.get(k), b_model.get(k))
                  for k in sorted(a_model.keys() | b_model.keys())
                  if a_model.get(k) != b_model.get(k)})
  return diffs


def parse_stop_at(text: str) -> tuple[str, str, str, float] | None:
  """``"valid/hr@10>=0.2"`` -> ``("valid", "hr@10", ">=", 0.2)``; ``""`` -> None."""
  if not text:
    return None
  op = ">=" if ">=" in text else "<=" if "<=" in text else None
  where, _, value = text.partition(op) if op else ("", "", "")
  split, _, metric = where.strip().partition("/")
  try:
    number = float(value)
  except ValueError:
    number = None
  if op is None or not split or not metric or number is None:
    raise ValueError(f"stop_at must read SPLIT/METRIC>=VALUE or SPLIT/METRIC<=VALUE "
                     f"(e.g. valid/hr@10>=0.2), got {text!r}")
  return split, metric.strip(), op, number


def get_config(model: str = "sasrec", *, smoke: bool = False, **overrides: Any) -> TrainConfig:
  """A preset for ``model``; ``smoke=True`` gives the tiny variant used by tests.

  ``overrides`` may name fields of TrainConfig or of the model's config.
  """
  model_fields = {f.name for f in dataclasses.fields(type(models.model_config(model)))}
  model_over = {k: v for k, v in overrides.items() if k in model_fields}
  train_over = {k: v for k, v in overrides.items() if k not in model_fields}
  train_over = {**models.train_preset(model), **train_over}
  if models.task_of(model) == "ranking":
    from trainers.models import dlrm  # pylint: disable=g-import-not-at-top
    if smoke:
      model_over = {**dlrm.SMOKE_OVERRIDES.get(model, {}), **model_over}
      train_over = {**train_over, "epochs": 2, "batch_size": 256, "eval_batch_size": 1024,
                    "patience": 0, **{k: v for k, v in overrides.items()
                                      if k not in model_fields}}
    return TrainConfig(model=model, model_config=models.model_config(model, **model_over),
                       **train_over)
  if smoke:
    model_over = {"max_len": 20, "embedding_dim": 16, "num_blocks": 1, **model_over}
    if model == "hstu-large":
      model_over = {"num_heads": 2, "attention_dim": 8, "linear_dim": 8, **model_over}
    train_over = {"epochs": 2, "batch_size": 32, "num_negatives": 16, "eval_batch_size": 64,
                  "patience": 0, "length_bucket_fractions": (), **train_over}
  return TrainConfig(model=model, model_config=models.model_config(model, **model_over),
                     **train_over)


def _parse_value(text: str) -> Any:
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: TrainConfig, assignments: Iterable[str]) -> TrainConfig:
  """Applies ``key=value`` strings (``--set``). Keys name TrainConfig fields or,
  bare or as ``model.KEY``, fields of the model config."""
  train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_config"}
  model_fields = {f.name for f in dataclasses.fields(type(config.model_config))}
  train_changes, model_changes = {}, {}
  for item in assignments:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--set expects key=value, got {item!r}")
    value = _parse_value(raw)
    bare = key.removeprefix("model.")
    if key.startswith("model.") or (key not in train_fields and bare in model_fields):
      if bare not in model_fields:
        raise ValueError(f"unknown model setting {bare!r} for {config.model}; "
                         f"known: {', '.join(sorted(model_fields))}")
      model_changes[bare] = value
    elif key in train_fields:
      if key == "model":
        raise ValueError("choose the model with --model, not --set model=...")
      tuples = ("top_ks", "length_bucket_fractions", "sharding_pins")
      if key == "sharding_pins" and isinstance(value, str):
        value = [v for v in value.split(",") if v]  # --set sharding_pins=a=row,b=column
      train_changes[key] = tuple(value) if key in tuples else value
    else:
      raise ValueError(f"unknown setting {key!r}; known: "
                       f"{', '.join(sorted(train_fields | model_fields))}")
  new_model = dataclasses.replace(config.model_config, **model_changes)
  return dataclasses.replace(config, model_config=new_model, **train_changes)
