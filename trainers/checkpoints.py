"""Orbax checkpoints of a work directory: ``latest`` for resuming, ``best`` for selection.

Layout::

    WORKDIR/checkpoints/latest/<epoch>/   state (params, optimizer, step) + meta JSON
    WORKDIR/checkpoints/best/<epoch>/     params + meta JSON of the selected epoch
    WORKDIR/config.json                   the exact TrainConfig (model rebuilt from it)
    WORKDIR/metrics.json                  the run's summary, naming the selected epoch

Saves are atomic (Orbax writes to a temporary directory and renames), so a run
killed mid-save resumes from the previous complete checkpoint. The metadata
handed to a save is a deep copy: Orbax serialises it in the background while the
train loop goes on changing its own record.

Which epoch is selected is recorded three times: in the latest checkpoint's meta
(``best.epoch``), as the best checkpoint's step (and its meta's ``epoch``), and in
``metrics.json`` (``selected_epoch``). They agree because the two managers never
save at the same time (each save first waits for the other manager's), the
loop saves ``latest`` before ``best``, and ``metrics.json`` is written after every
save is durable. A kill between the latest and the best save of one epoch leaves
a best checkpoint older than the record; the resumed run re-writes it from the
latest state (:meth:`Checkpoints.check_best`). Loading a best checkpoint
(:meth:`Checkpoints.restore_best`) checks that the three agree.

``config.json`` is checked before a run writes anything (:func:`check_resume`):
the work directory's run continues only with its own config, ``epochs`` aside
(:data:`trainers.configs.RESUMABLE_FIELDS`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from trainers import configs

log = logging.getLogger("recml.checkpoints")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


class WorkdirConflict(ValueError):
  """A work directory whose run is not the one asked for (or whose records disagree)."""


def _checkpoint_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints", name)


class Checkpoints:
  """The two checkpoint managers of a work directory."""

  def __init__(self, workdir: str, async_save: bool = True):
    self.workdir = workdir
    def manager(name: str) -> ocp.CheckpointManager:
      return ocp.CheckpointManager(
          _checkpoint_dir(workdir, name),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, enable_async_checkpointing=async_save))
    self.latest = manager("latest")
    self.best = manager("best")

  def save_latest(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves the train state and a snapshot of ``meta`` (the caller may change it at once)."""
    self.best.wait_until_finished()
    self.latest.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(copy.deepcopy(meta))))

  def save_best(self, epoch: int, params: Any, meta: dict[str, Any]) -> None:
    """Saves the selected epoch's params and a snapshot of ``meta`` (with its ``epoch``)."""
    if meta.get("epoch") != epoch:
      raise ValueError(f"best checkpoint meta names epoch {meta.get('epoch')}, saving {epoch}")
    self.latest.wait_until_finished()
    self.best.save(epoch, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(copy.deepcopy(meta))))

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    step = self.latest.latest_step()
    if step is None:
      return None
    out = _restore(self.latest, step, "state", abstract_state)
    return out.state, out.meta

  def restore_best(self, abstract_params: Any) -> tuple[Any, dict[str, Any]]:
    """The selected epoch's params and meta, after checking that every record names it."""
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(
          f"no best checkpoint under {self.best.directory}: was the run evaluated at least once?")
    out = _restore(self.best, step, "params", abstract_params)
    check_selected_epoch(self.workdir, step, out.meta)
    return out.params, out.meta

  def check_best(self, meta: dict[str, Any], params: Any) -> None:
    """Makes the best checkpoint hold the epoch that ``meta`` (the latest checkpoint's
    record, whose state has ``params``) selected.

    Repairs the one state an interrupted run can leave (the selected epoch is the
    latest one and its best save did not complete); raises on any other mismatch.
    """
    selected = (meta.get("best") or {}).get("epoch")
    have = self.best.latest_step()
    if selected == have:
      return
    if selected is not None and selected == meta["epoch"]:
      log.warning("checkpoints/best holds epoch %s, the run selected epoch %d (a save cut "
                  "short): re-writing it from the latest checkpoint", have, selected)
      self.save_best(selected, params, best_meta(meta["best"]))
      self.best.wait_until_finished()
      return
    raise WorkdirConflict(
        f"{self.best.directory} holds epoch {have} but the latest checkpoint selected epoch "
        f"{selected}, whose params are gone: the work directory was changed by hand; "
        "train again in a new --workdir.")

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _restore(manager: ocp.CheckpointManager, step: int, item: str, abstract: Any):
  """``manager``'s ``step`` (``item`` and ``meta``) restored into ``abstract``'s shapes.

  Checkpoints written before embedding tables had a multiple of
  ``trainers.layers.ROW_ALIGNMENT`` rows hold shorter tables: they are restored with
  Orbax's zero padding (the rows past the vocabulary are zero by construction). Any
  other difference cannot occur: the work directory's config is checked first
  (:func:`check_resume`).
  """
  def restore(strict: bool):
    return manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(abstract, strict=strict)},
        meta=ocp.args.JsonRestore()))
  try:
    return restore(strict=True)
  except ValueError as e:
    if "not compatible with the stored shape" not in str(e):
      raise
    log.warning("%s/%d holds embedding tables without row padding (written by an older "
                "version): padding them with zero rows", manager.directory, step)
    return restore(strict=False)


def restore_selected(workdir: str, init_fn) -> tuple[Any, dict[str, Any]]:
  """The selected checkpoint's tree and meta, shaped by ``init_fn()`` (a model's boxed
  ``init``, only traced: nothing is computed)."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  abstract = nn.meta.unbox(jax.eval_shape(init_fn))
  ckpt = Checkpoints(workdir, async_save=False)
  try:
    return ckpt.restore_best(abstract)
  finally:
    ckpt.close()


def best_meta(best: dict[str, Any]) -> dict[str, Any]:
  """The best checkpoint's meta from the run record's ``best`` entry (epoch + metrics)."""
  return {k: v for k, v in best.items() if k != "value"}


def abstract_tree(tree: Any) -> Any:
  """Shapes, dtypes and shardings of ``tree`` (what a restore needs)."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def latest_meta(workdir: str) -> dict[str, Any] | None:
  """The latest checkpoint's run record (``epoch``, ``history``, ``best``, ``stopped``),
  read without writing anything; None when there is no checkpoint."""
  path = _checkpoint_dir(workdir, "latest")
  if not os.path.isdir(path):
    return None
  # (read_only=True would log two warnings per call; create=False writes nothing either)
  mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = mngr.latest_step()
    if step is None:
      return None
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  finally:
    mngr.close()


def check_selected_epoch(workdir: str, step: int, meta: dict[str, Any]) -> None:
  """Raises unless the best checkpoint ``step``, its ``meta``, the latest checkpoint's
  record and ``metrics.json`` (those that exist) name the same epoch."""
  named = {"checkpoints/best step": step, "checkpoints/best meta": meta.get("epoch")}
  record = latest_meta(workdir)
  if record is not None:
    named["checkpoints/latest record"] = (record.get("best") or {}).get("epoch")
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if os.path.exists(metrics_path):
    with open(metrics_path, encoding="utf-8") as f:
      named[METRICS_FILE] = json.load(f).get("selected_epoch")
  if len(set(named.values())) > 1:
    raise WorkdirConflict(
        f"{workdir}: the selected epoch differs between "
        + ", ".join(f"{k} ({v})" for k, v in named.items())
        + ": the run was interrupted or its files were changed; re-run `recml train` with "
        "the same arguments to repair it.")


def check_resume(workdir: str, config: configs.TrainConfig) -> dict[str, Any] | None:
  """Checks, writing nothing, that ``config`` may run in ``workdir``.

  A work directory without a checkpoint takes any config. One with checkpoints
  continues only the run of its ``config.json``: fields other than
  :data:`trainers.configs.RESUMABLE_FIELDS` must be equal, and ``epochs`` may not
  go below the epochs already run.

  Returns:
    The latest checkpoint's run record, or None when there is none.

  Raises:
    WorkdirConflict: naming each differing field with its old and new value, and
      what to do instead.
  """
  meta = latest_meta(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if meta is None:
    return None
  if not os.path.exists(path):
    raise WorkdirConflict(f"{workdir} holds checkpoints (epoch {meta['epoch']}) but no "
                          f"{CONFIG_FILE}, so which run they belong to is unknown: use a new "
                          "--workdir.")
  try:
    old = configs.TrainConfig.from_dict(load_config_dict(workdir))
  except (TypeError, ValueError, KeyError) as e:
    raise WorkdirConflict(f"{path} is not a readable TrainConfig ({e}): use a new "
                          "--workdir.") from e
  done, stopped = meta["epoch"], bool(meta.get("stopped"))
  if stopped and meta.get("target_epoch"):
    status = f"a run that reached its stop_at target at epoch {done}"
  elif stopped:
    status = f"a run that stopped early (no improvement) after epoch {done}"
  elif done >= old.epochs:
    status = f"a finished run ({done} of {old.epochs} epochs)"
  else:
    status = f"a run interrupted after epoch {done} of {old.epochs}"
  fixed = {k: v for k, v in configs.config_differences(old, config).items()
           if k not in configs.RESUMABLE_FIELDS}
  if fixed:
    listing = "; ".join(f"{k}: {o!r} in {CONFIG_FILE}, {n!r} now" for k, (o, n) in fixed.items())
    if stopped:
      advice = "use a new --workdir to train with the new settings"
    elif done >= old.epochs:
      advice = ("use a new --workdir to train with the new settings, or re-run with the "
                "run's own settings and a larger --epochs to continue it")
    else:
      advice = ("use a new --workdir to train with the new settings, or re-run with the "
                "run's own settings to resume it (only --epochs may change)")
    raise WorkdirConflict(f"{workdir} holds {status} whose config differs: {listing}. Its "
                          f"checkpoints belong to its own config; {advice}.")
  if config.epochs < done:
    raise WorkdirConflict(f"{workdir} holds {status}: epochs={config.epochs} is below the "
                          f"{done} epochs already run; pass --epochs {done} or more.")
  return meta


def save_config(workdir: str, config_json: str) -> None:
  """Writes ``config.json`` atomically (a temporary file renamed over it)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config_json + "\n")
  os.replace(tmp, path)


def load_config_dict(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training work directory?")
  with open(path) as f:
    return json.load(f)
