"""Training runs on several virtual CPU devices, for tests/trainers/test_sharding.py.

Run as a script in a fresh process: the device count must be set (``XLA_FLAGS``) before
JAX starts, and the pytest process has one device. Each scenario prints one JSON line
(``RESULT {...}``) that the test reads.

    python -m tests.trainers.sharding_runs DEVICES SCENARIO DATA WORKDIR [ARGS...]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys


def _setup(devices: int) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"


def config(model: str, data: str, **overrides):
  from trainers import configs  # pylint: disable=g-import-not-at-top
  if model == "sasrec":
    base = dict(embedding_dim=16, batch_size=32, eval_batch_size=64, num_negatives=16,
                learning_rate=3e-3)
  else:  # dcnv2 with 16-wide tables: column-wise splits them over 8 devices
    base = dict(embed_dim=16, batch_size=256, eval_batch_size=512, learning_rate=3e-3)
  return configs.get_config(model, smoke=True, data_dir=data, **{
      "epochs": 2, "max_steps_per_epoch": 4, **base, **overrides})


def train(model: str, data: str, workdir: str, fresh: bool = True, **overrides):
  """Trains and returns ``(per-epoch train losses, final params as numpy)``."""
  from trainers import train as trainer  # pylint: disable=g-import-not-at-top
  if fresh:
    shutil.rmtree(workdir, ignore_errors=True)
  trainer.train_and_evaluate(config(model, data, **overrides), workdir)
  return losses(workdir), final_params(workdir)


def losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "log.jsonl")) as f:
    return [json.loads(line)["train_loss"] for line in f]


def final_params(workdir: str):
  """The latest checkpoint's params, as saved (whatever mesh wrote them), gathered into
  host numpy on every process."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  out = mngr.restore(mngr.latest_step(),
                     args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True),
                      out.state["params"])


def max_diff(a, b) -> float:
  """The largest absolute difference between two params trees.

  Two kinds of parameter have a gradient that is zero in exact arithmetic, and Adam
  turns its rounding noise into full-size steps of either sign, so they are left out:
  SASRec's key bias (the middle third of ``qkv/bias``: a softmax does not change when
  every logit of a row moves by the same amount) and the biases of DCNv2's deep layers
  (batch norm subtracts them again). Every other parameter is compared.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  gaps = []
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    name, d = jax.tree_util.keystr(path), np.abs(x - y)
    if re.search(r"\['deep'\]\['dense_\d+'\]\['bias'\]$", name):
      continue
    if name.endswith("['qkv']['bias']"):
      third = d.shape[0] // 3
      d = np.concatenate([d[:third], d[2 * third:]])
    gaps.append(float(d.max()) if d.size else 0.0)
  return max(gaps)


def equivalence(model: str, data: str, workdir: str) -> dict:
  """One device, then 8 devices with each table sharding: losses and parameter gaps."""
  ref_losses, ref = train(model, data, f"{workdir}/one", num_devices=1)
  out = {"reference": ref_losses}
  for kind in ("replicated", "table", "row", "column"):
    got_losses, got = train(model, data, f"{workdir}/{kind}", embedding_sharding=kind)
    plan = json.load(open(f"{workdir}/{kind}/sharding_plan.json"))
    out[kind] = {"losses": got_losses, "param_gap": max_diff(ref, got),
                 "kinds": sorted({t["kind"] for t in plan["tables"]})}
  return out


def hlo(rows: int = 4096, dim: int = 16, batch: int = 64, length: int = 20) -> dict:
  """Collectives of a compiled lookup (forward and backward) of a row-wise table through
  :func:`trainers.sharding.lookup`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from trainers import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  table = jax.device_put(jnp.ones((rows, dim)), NamedSharding(mesh, P("data", None)))
  ids = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(0, rows, (batch, length)),
                                   jnp.int32), NamedSharding(mesh, P("data")))

  def collectives(take):
    def loss(t, i):  # forward and backward
      return jnp.sum(jnp.sin(take(t, i)))
    text = jax.jit(jax.value_and_grad(loss)).lower(table, ids).compile().as_text()
    return [(op, shape) for shape, op in re.findall(
        r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
        r"(?:-start)?\(", text)]

  def planned(t, i):
    with sharding.use_plan(mesh, {"table": "row"}):
      return sharding.lookup(t, i, "table")

  return {"rows": rows, "dim": dim, "collectives": collectives(planned)}


def reshard(model: str, data: str, workdir: str) -> dict:
  """Two epochs on 8 devices (row-wise), resumed for a third on 1 device (replicated)
  and on 4 (table-wise), and the uninterrupted three-epoch run on 8."""
  full_losses, full = train(model, data, f"{workdir}/full", epochs=3,
                            embedding_sharding="row")
  out = {"uninterrupted": full_losses}
  for devices in (1, 4):
    part = f"{workdir}/on{devices}"
    train(model, data, part, epochs=2, embedding_sharding="row")
    got_losses, got = train(model, data, part, fresh=False, epochs=3, num_devices=devices,
                            embedding_sharding="replicated" if devices == 1 else "table")
    out[f"resumed_on_{devices}"] = {"losses": got_losses, "param_gap": max_diff(full, got)}
  return out


def budget(data: str, workdir: str) -> dict:
  """SASRec with a 12-wide item table (no column split over 8) under a per-device budget
  smaller than the replicated table: the planner must shard it row-wise."""
  from trainers import layers  # pylint: disable=g-import-not-at-top
  rows = layers.padded_rows(50)
  replicated_bytes = rows * 12 * (4 + 8)
  train("sasrec", data, workdir, embedding_dim=12, num_heads=1,
        device_memory_gb=(replicated_bytes // 2) / 2**30)
  plan = json.load(open(f"{workdir}/sharding_plan.json"))
  return {"plan": plan, "replicated_bytes": replicated_bytes}


def multiprocess(model: str, data: str, workdir: str) -> dict:
  """This process's part of a multi-process run (RECML_* variables name the others)."""
  import jax  # pylint: disable=g-import-not-at-top
  got_losses, got = train(model, data, workdir, fresh=False, embedding_sharding="row")
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    np.savez(f"{workdir}/params.npz", **{
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(got)})
  return {"losses": got_losses, "processes": jax.process_count(),
          "devices": jax.device_count()}


def main(argv: list[str]) -> None:
  devices, scenario = int(argv[1]), argv[2]
  _setup(devices)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  fn = {"equivalence": equivalence, "hlo": hlo, "reshard": reshard, "budget": budget,
        "multiprocess": multiprocess}[scenario]
  print("RESULT " + json.dumps(fn(*argv[3:])), flush=True)


if __name__ == "__main__":
  main(sys.argv)
