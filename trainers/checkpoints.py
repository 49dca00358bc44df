"""Orbax checkpoints of a work directory: ``latest`` for resuming, ``best`` for selection.

Layout::

    WORKDIR/checkpoints/latest/<epoch>/   state (params, optimizer, step) + meta JSON
    WORKDIR/checkpoints/best/<epoch>/     params + meta JSON of the selected epoch
    WORKDIR/config.json                   the exact TrainConfig (model rebuilt from it)

Saves are atomic (Orbax writes to a temporary directory and renames), so a run
killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class Checkpoints:
  """The two checkpoint managers of a work directory."""

  def __init__(self, workdir: str, async_save: bool = True):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    def manager(name: str) -> ocp.CheckpointManager:
      return ocp.CheckpointManager(
          os.path.join(root, name),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, enable_async_checkpointing=async_save))
    self.latest = manager("latest")
    self.best = manager("best")

  def save_latest(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
    self.latest.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def save_best(self, epoch: int, params: Any, meta: dict[str, Any]) -> None:
    self.best.save(epoch, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    step = self.latest.latest_step()
    if step is None:
      return None
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def restore_best(self, abstract_params: Any) -> tuple[Any, dict[str, Any]]:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(
          f"no best checkpoint under {self.best.directory}: was the run evaluated at least once?")
    out = self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
    return out.params, out.meta

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def abstract_tree(tree: Any) -> Any:
  """Shapes, dtypes and shardings of ``tree`` (what a restore needs)."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_config(workdir: str, config_json: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config_json + "\n")


def load_config_dict(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training work directory?")
  with open(path) as f:
    return json.load(f)
