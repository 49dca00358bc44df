"""The train loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: setup, mesh, input, model + sharding plan + state + step
functions, checkpoint restore, eval setup, loop, summary. A run resumes from
its work directory by itself: re-running the same command after a crash
continues from the last completed epoch and ends with the same parameters as
an uninterrupted run (data order and randomness are functions of seed, epoch
and step only). Raising ``epochs`` continues a run; any other change of the config
is refused before anything is written (:func:`trainers.checkpoints.check_resume`).

Outputs in ``workdir``: ``config.json``, ``log.jsonl`` (one JSON object per
epoch), ``metrics.json`` (the selected epoch's valid/test metrics, best test per
metric, timing), ``checkpoints/{latest,best}``, ``tb/`` (TensorBoard).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from typing import Any

from absl import logging as absl_logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorboardX
import tqdm

from trainers import configs, distributed, features, models, planner, sharding, tasks
from trainers.checkpoints import (METRICS_FILE, Checkpoints, abstract_tree, best_meta,
                                  check_resume, save_config)
from trainers.evaluate import dataset_name

log = logging.getLogger("recml.train")
LOG_FILE = "log.jsonl"


def make_optimizer(config: configs.TrainConfig) -> optax.GradientTransformation:
  """The config's optimizer; with ``lr_decay_on_plateau`` < 1 its learning rate is a
  hyper-parameter in the optimizer state (:func:`decay_learning_rate` lowers it)."""

  def build(learning_rate):
    if config.optimizer == "adagrad":
      opt = optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=1e-8)
    else:
      opt = optax.adamw(learning_rate, b1=config.beta1, b2=config.beta2,
                        weight_decay=config.weight_decay)
    if config.grad_clip_norm > 0:
      return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
    return opt

  if config.lr_decay_on_plateau < 1.0:
    return optax.inject_hyperparams(build)(learning_rate=config.learning_rate)
  return build(config.learning_rate)


def decay_learning_rate(state: dict[str, Any], config: configs.TrainConfig) -> float:
  """Multiplies the state's learning rate by ``lr_decay_on_plateau`` (not below
  ``min_learning_rate``) and returns the new rate: FuxiCTR's reduce-on-plateau, applied
  after each evaluation that does not improve the selection metric."""
  hyper = state["opt_state"].hyperparams
  rate = max(float(hyper["learning_rate"]) * config.lr_decay_on_plateau,
             config.min_learning_rate)
  hyper["learning_rate"] = jnp.asarray(rate, hyper["learning_rate"].dtype)
  return rate


def make_train_step(model, tx, task: tasks.Task, base_rng: jax.Array, loss=None):
  """``(state, batch) -> (state, loss)``; randomness is folded from the step number.

  ``state``: ``step``, ``params``, ``opt_state`` and, for models with other variable
  collections (batch-norm statistics), ``model_state``. ``loss``: ``task.loss`` or a
  wrapper of it with the same signature (:func:`trainers.sharding.planned_loss`).
  """
  loss = loss or task.loss

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    (loss_value, model_state), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(
        model, state["params"], state.get("model_state"), batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if "model_state" in state:
      new["model_state"] = model_state
    return new, loss_value

  return train_step


@dataclasses.dataclass
class Built:
  """What :func:`build` returns: the model, its sharding plan, the initial sharded state
  and the jitted train step ``(state, global batch) -> (state, loss)``.

  The state is in the train form (table-wise tables packed, :class:`sharding.Layout`);
  :meth:`model_form` gives the model's own tree (checkpoints, evaluation), and
  :meth:`train_form` takes it back.
  """

  model: Any
  plan: planner.Plan
  tables: list[sharding.Table]
  kinds: dict[str, str]
  layout: sharding.Layout
  state: Any
  state_shardings: Any
  train_step: Any
  _to_model: Any = None
  _to_train: Any = None

  def model_form(self, state):
    return self._to_model(state) if self.layout else state

  def train_form(self, state):
    return self._to_train(state) if self.layout else state


def build(config: configs.TrainConfig, task: tasks.Task, mesh) -> Built:
  """The model, optimizer and sharding plan of ``config`` on ``mesh``, the initial state
  (each device initialises only its shards) and the jitted train step. ``task`` must be
  prepared (:meth:`trainers.tasks.Task.prepare`)."""
  model = models.build(config.model, config.model_config)
  tx = make_optimizer(config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  n_dev = mesh.devices.size
  boxed = jax.eval_shape(lambda: task.init(model, init_rng))
  tables = sharding.find_tables(boxed["params"])
  plan = plan_tables(config, task, tables, n_dev)
  kinds = {t.name: plan.kind(t.name) for t in tables}
  for t in tables:
    sharding.check_kind(t, kinds[t.name], n_dev)
  layout = sharding.Layout(tables, kinds, {t.name: plan.device(t.name) for t in tables
                                           if kinds[t.name] == "table"}, n_dev)

  def init_model_form():
    variables = {k: nn.meta.unbox(v) for k, v in task.init(model, init_rng).items()}
    params = variables.pop("params")
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(params)}
    if variables:  # batch-norm statistics and other non-trained collections
      state["model_state"] = variables
    return state

  def init_state():  # the optimizer's slots are initialised on the packed params
    state = init_model_form()
    params = layout.pack(state["params"])
    return {**state, "params": params, "opt_state": tx.init(params)}

  state_shardings = sharding.state_shardings(mesh, jax.eval_shape(init_state), kinds,
                                             tables)
  state = jax.jit(init_state, out_shardings=state_shardings)()
  loss = sharding.planned_loss(task.loss, mesh, kinds, layout)
  train_step = jax.jit(make_train_step(model, tx, task, train_rng, loss),
                       in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  built = Built(model, plan, tables, kinds, layout, state, state_shardings, train_step)
  if layout:
    model_shardings = sharding.state_shardings(
        mesh, jax.eval_shape(init_model_form), kinds, tables)
    built._to_model = jax.jit(layout.unpack, out_shardings=model_shardings)
    built._to_train = jax.jit(layout.pack, out_shardings=state_shardings)
  return built


def _reached(results: dict[str, dict[str, float]], target) -> bool:
  split, metric, op, value = target
  if metric not in results[split]:
    raise ValueError(f"stop_at: {split} has no metric {metric!r}; it has "
                     f"{sorted(results[split])}")
  got = results[split][metric]
  return got >= value if op == ">=" else got <= value


def still_stopped(meta: dict[str, Any], config: configs.TrainConfig) -> bool:
  """Whether a restored run that had stopped stays stopped under ``config``, whose
  ``patience`` and ``stop_at`` may differ from the run's own: a target stop holds while
  the evaluation that met it meets ``stop_at`` as set now, an early stop while its
  evaluations without improvement reach ``patience`` (0: never). A run that no longer
  holds continues from its checkpoint, as if it had never stopped."""
  if not meta.get("stopped"):
    return False
  target = configs.parse_stop_at(config.stop_at)
  if meta.get("target_epoch"):
    met = next(e for e in meta["history"] if e["epoch"] == meta["target_epoch"])
    if target is not None and _reached(met, target):
      return True
  return bool(config.patience) and meta["stale_evals"] >= config.patience


def _better(value: float, best: float | None, lower: bool = False) -> bool:
  return best is None or (value < best if lower else value > best)


def train_and_evaluate(config: configs.TrainConfig, workdir: str) -> dict[str, Any]:
  """Trains ``config`` on ``config.data_dir``, evaluating and checkpointing in ``workdir``.

  Returns:
    The content of ``workdir/metrics.json``.
  """
  # ----------------------------------------------------------------- setup
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
  if not config.data_dir:
    raise ValueError("config.data_dir is empty: pass the dataset directory (--data)")
  distributed.initialize()  # joins the job's other processes, if any (from the environment)
  primary = distributed.is_primary()  # only process 0 writes logs, metrics and the plan
  task = tasks.for_config(config)
  config = task.prepare()  # the model's vocabulary sizes come from the dataset
  # The work directory's own run continues only with its config (checked before any write).
  record = check_resume(workdir, config)
  if (record is not None and still_stopped(record, config)
      and config.epochs > record["epoch"]):
    log.warning("%s stopped after epoch %d (%s): more epochs continue nothing; a larger "
                "--set patience (its evaluations without improvement: %d) or another "
                "stop_at does", workdir, record["epoch"],
                f"target {config.stop_at}" if record.get("target_epoch") else
                f"patience {config.patience}", record["stale_evals"])
  if primary:
    save_config(workdir, config.to_json())
  _sync("config")
  if task.name == "retrieval" and config.max_len > task.info.max_len:
    log.warning("model max_len %d exceeds the dataset's %d: sequences are at most %d long",
                config.max_len, task.info.max_len, task.info.max_len)

  # ----------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.num_devices)
  n_dev = mesh.devices.size
  if config.batch_size % n_dev or config.eval_batch_size % n_dev:
    raise ValueError(f"batch sizes ({config.batch_size}, {config.eval_batch_size}) must be "
                     f"divisible by the {n_dev} devices")

  # ----------------------------------------------------------------- input
  train_data = task.train_data()
  eval_data = task.eval_data()
  eval_facts = task.facts(eval_data)  # protocol facts: exclusion rule, counts
  num_train = task.num_train()
  steps_per_epoch = math.ceil(num_train / config.batch_size)
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

  # ----------------------------------------------------------------- model, sharding, step
  built = build(config, task, mesh)
  model, state, kinds, tables = built.model, built.state, built.kinds, built.tables
  if primary:
    print(built.plan.format_table(), flush=True)
    built.plan.save(workdir)  # sharding_plan.{json,txt}, next to the checkpoints
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  train_step = built.train_step
  evaluator = task.make_evaluator(model, put=lambda b: sharding.global_batch(mesh, b))

  # ----------------------------------------------------------------- checkpoint restore
  ckpt = Checkpoints(workdir)
  meta: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "stale_evals": 0,
                          "stopped": False}
  # Checkpoints hold the model's own tree (any mesh or plan restores them).
  restored = ckpt.restore_latest(abstract_tree(built.model_form(state)))
  if restored is not None:
    state, meta = restored
    log.info("resumed from epoch %d (step %d)", meta["epoch"], int(state["step"]))
    ckpt.check_best(meta, task.selected(state))
    state = built.train_form(state)
    if meta["stopped"] and not still_stopped(meta, config):
      log.warning("continuing a run that had stopped after epoch %d (patience %d, "
                  "stop_at %r now)", meta["epoch"], config.patience, config.stop_at)
      meta["stopped"] = False
      meta.pop("target_epoch", None)
  # The log is rewritten from the checkpoint, dropping epochs that were logged but not saved.
  if primary:
    with open(os.path.join(workdir, LOG_FILE), "w") as f:
      f.writelines(json.dumps(e) + "\n" for e in meta["history"])

  # ----------------------------------------------------------------- eval setup
  tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb")) if primary else None
  metric_name = config.selection_metric
  target = configs.parse_stop_at(config.stop_at)
  if target is not None and target[0] not in eval_data:
    raise ValueError(f"stop_at {config.stop_at!r}: no split {target[0]!r}; the splits "
                     f"evaluated are {sorted(eval_data)}")

  def evaluate_all(variables) -> dict[str, dict[str, float]]:
    with sharding.use_plan(mesh, kinds):  # traced on the first call: sharded lookups
      return {split: evaluator(variables, data) for split, data in eval_data.items()}

  # ----------------------------------------------------------------- loop
  show_bar = sys.stderr.isatty()
  epoch = meta["epoch"]
  while epoch < config.epochs and not meta["stopped"]:
    epoch += 1
    t0 = time.perf_counter()
    losses_sum, loss_count, sequences = 0.0, 0, 0
    bar = tqdm.tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}",
                    disable=not show_bar, leave=False, unit="step")
    pending = None
    for batch in train_data.batches(epoch, config.seed, config.max_steps_per_epoch):
      sequences += task.count(batch)
      state, loss = train_step(state, sharding.global_batch(mesh, task.device_batch(batch)))
      if pending is not None:  # read the previous loss: keeps the device a step ahead
        losses_sum += float(pending)
        loss_count += 1
      pending = loss
      bar.update(1)
      if show_bar and loss_count:
        bar.set_postfix(loss=f"{losses_sum / loss_count:.4f}",
                        seq_s=f"{sequences / (time.perf_counter() - t0):.0f}")
    losses_sum += float(pending)
    loss_count += 1
    bar.close()
    if not math.isfinite(losses_sum):
      raise FloatingPointError(
          f"training diverged in epoch {epoch} (loss is {losses_sum / loss_count}); "
          f"lower learning_rate (now {config.learning_rate}) or set grad_clip_norm")
    train_seconds = time.perf_counter() - t0
    entry: dict[str, Any] = {
        "epoch": epoch, "step": int(state["step"]),
        "train_loss": losses_sum / loss_count,
        "epoch_seconds": train_seconds,
        f"{task.unit}_per_second": sequences / train_seconds,
    }
    if epoch % config.eval_every == 0 or epoch == config.epochs:
      t1 = time.perf_counter()
      results = evaluate_all(task.selected(built.model_form(state)))
      entry.update(results, eval_seconds=time.perf_counter() - t1)
      value = results[features.VALID][metric_name]
      if _better(value, (meta["best"] or {}).get("value"), config.selection_lower_is_better):
        meta["best"] = {"epoch": epoch, "value": value, **results}
        meta["stale_evals"] = 0
      else:
        meta["stale_evals"] += 1
        if config.lr_decay_on_plateau < 1.0:
          entry["learning_rate"] = decay_learning_rate(state, config)
        if config.patience and meta["stale_evals"] >= config.patience:
          meta["stopped"] = True
      if target is not None and _reached(results, target):
        meta["stopped"] = True
        meta["target_epoch"] = epoch
        entry["target_reached"] = config.stop_at
    meta["history"].append(entry)
    meta["epoch"] = epoch
    if primary:
      _log_epoch(entry, metric_name, tb, workdir, task.unit, epochs=config.epochs)
    # latest (whose record names the best epoch) first, then best: a kill in between
    # leaves a record that check_best repairs from the latest state on resume.
    saved = built.model_form(state)
    ckpt.save_latest(epoch, saved, meta)
    if meta["best"] is not None and meta["best"]["epoch"] == epoch:
      ckpt.save_best(epoch, task.selected(saved), best_meta(meta["best"]))
  ckpt.wait()
  ckpt.close()
  if tb is not None:
    tb.close()

  # ----------------------------------------------------------------- summary
  summary = _summary(config, meta, num_params, steps_per_epoch, task.unit)
  summary.update(task.info_facts())
  summary["dataset"] = dataset_name(config.data_dir)
  summary.update(eval_facts)
  summary.update(num_devices=n_dev, num_processes=jax.process_count(),
                 sharding={t.name: kinds[t.name] for t in tables})
  # Written once every checkpoint is durable, atomically: it names the selected epoch.
  if primary:
    metrics_path = os.path.join(workdir, METRICS_FILE)
    with open(f"{metrics_path}.tmp", "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(f"{metrics_path}.tmp", metrics_path)
  _sync("metrics")
  return summary


def _sync(name: str) -> None:
  """Waits for every process (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"recml-train-{name}")


def plan_tables(config: configs.TrainConfig, task: tasks.Task,
                tables: list[sharding.Table], num_devices: int) -> planner.Plan:
  """The sharding plan of the model's embedding tables: the planner's choice under
  ``device_memory_gb`` (``embedding_sharding="auto"``), or the configured kind for
  every table; ``sharding_pins`` win either way."""
  specs = [planner.TableSpec(
      name=t.name, rows=t.rows, dim=t.dim, param_bytes=np.dtype(t.dtype).itemsize,
      optimizer_bytes=4 if config.optimizer == "adagrad" else 8,
      lookups_per_sample=task.lookups_per_sample(t.name)) for t in tables]
  pins = config.pins()
  unknown = sorted(set(pins) - {t.name for t in tables})
  if unknown:
    raise ValueError(f"sharding_pins name {unknown}, not tables of {config.model}; its "
                     f"tables: {[t.name for t in tables]}")
  if config.embedding_sharding != "auto":
    for t in tables:  # a clear error before the planner's
      sharding.check_kind(t, pins.get(t.name, config.embedding_sharding), num_devices)
  kinds = (sharding.KINDS if config.embedding_sharding == "auto"
           else (config.embedding_sharding,))
  return planner.plan_tables(
      specs, num_devices, budget_bytes=int(config.device_memory_gb * 2**30),
      batch_size=config.batch_size, pins=pins, kinds=kinds)


def _log_epoch(entry: dict[str, Any], metric_name: str, tb, workdir: str,
               unit: str = "sequences", epochs: int = 0) -> None:
  with open(os.path.join(workdir, LOG_FILE), "a") as f:
    f.write(json.dumps(entry) + "\n")
  text = (f"epoch {entry['epoch']:3d}/{epochs}  loss {entry['train_loss']:.4f}  "
          f"{entry['epoch_seconds']:.1f}s  {entry[f'{unit}_per_second']:.0f} {unit}/s")
  if features.VALID in entry:
    text += (f"  valid {metric_name} {entry[features.VALID][metric_name]:.4f}"
             f"  test {metric_name} {entry[features.TEST][metric_name]:.4f}")
  print(text, flush=True)
  step = entry["step"]
  tb.add_scalar("train/loss", entry["train_loss"], step)
  tb.add_scalar(f"train/{unit}_per_second", entry[f"{unit}_per_second"], step)
  for split in (features.VALID, features.TEST):
    for name, value in entry.get(split, {}).items():
      tb.add_scalar(f"{split}/{name.replace('@', '_at_')}", value, step)  # TB's tag charset
  tb.flush()


def _summary(config, meta, num_params: int, steps_per_epoch: int,
             unit: str = "sequences") -> dict[str, Any]:
  history = meta["history"]
  best = meta["best"]
  if best is None:
    raise RuntimeError("training ended without an evaluation")
  evaluated = [e for e in history if features.TEST in e]
  best_test, best_test_epoch = {}, {}
  for name in best[features.TEST]:
    pick = min if name in configs.LOWER_IS_BETTER else max
    top = pick(evaluated, key=lambda e: e[features.TEST][name])
    best_test[name] = top[features.TEST][name]
    best_test_epoch[name] = top["epoch"]
  # The first epoch includes compilation; the median over epochs is the steady state.
  epoch_seconds = [e["epoch_seconds"] for e in history]
  rates = [e[f"{unit}_per_second"] for e in history]
  return {
      "model": config.model,
      "task": config.task,
      "selected_epoch": best["epoch"],
      "selection_metric": f"valid {config.selection_metric}",
      features.VALID: best[features.VALID],
      features.TEST: best[features.TEST],
      "best_test": best_test,
      "best_test_epoch": best_test_epoch,
      "best_test_note": "best test value per metric over evaluated epochs "
                        "(chosen on test: for comparison with papers only)",
      "epochs_run": meta["epoch"],
      "early_stopped": bool(meta["stopped"]),
      "stop_at": config.stop_at or None,
      "target_epoch": meta.get("target_epoch"),
      "steps": history[-1]["step"],
      "steps_per_epoch": steps_per_epoch,
      "seconds_per_epoch": statistics.median(epoch_seconds),
      "first_epoch_seconds": epoch_seconds[0],
      f"{unit}_per_second": statistics.median(rates),
      "eval_seconds": statistics.median([e["eval_seconds"] for e in evaluated]),
      "num_params": num_params,
      "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
  }
