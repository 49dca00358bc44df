"""Trains with the project's own model/loss/step/eval code on arrays dumped from the tf.data pipeline.

    python3 benchmarks/gpu/train_quality.py --dataset_dir DATASET_DIR --npz ml1m.npz \\
        sasrec:100:5 hstu:100:5 hstu:100:5:dropout=0.1

``DATASET_DIR`` is the dataset the npz was dumped from (benchmarks/gpu/dump_npz.py); only
its ``dataset_info.json`` is read (the item vocabulary size), so a directory holding that
one file is enough on a machine without the data.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import NamedTuple, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trainers import configs, evaluate, features, metrics, models, train


class RunSpec(NamedTuple):
  model: str
  epochs: int
  every: int
  overrides: tuple[str, ...]   # ``key=value`` as ``recml train --set`` takes them


def run_spec(text: str) -> RunSpec:
  """``MODEL:EPOCHS:EVAL_EVERY[:KEY=VALUE...]`` -> RunSpec."""
  name, *rest = text.split(":")
  if len(rest) < 2:
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected MODEL:EPOCHS:EVAL_EVERY[:KEY=VALUE...]")
  try:
    epochs, every = int(rest[0]), int(rest[1])
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: EPOCHS and EVAL_EVERY must be integers") from None
  overrides = tuple(rest[2:])
  bad = [o for o in overrides if "=" not in o]
  if bad:
    raise argparse.ArgumentTypeError(f"{text!r}: overrides must be KEY=VALUE, got {bad}")
  return RunSpec(name, epochs, every, overrides)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset_dir", required=True,
                      help="dataset directory (or one holding its dataset_info.json); "
                           "gives the item vocabulary size")
  parser.add_argument("--npz", default=".devrun/ml1m.npz",
                      help="arrays written by benchmarks/gpu/dump_npz.py (default: %(default)s)")
  parser.add_argument("runs", nargs="+", type=run_spec, metavar="MODEL:EPOCHS:EVAL_EVERY[:K=V...]",
                      help="a run: model preset, epochs, evaluation period in epochs, and "
                           "config overrides (e.g. dropout=0.1)")
  return parser.parse_args(argv)


def run(spec: RunSpec, vocab_size: int, tr, va, te) -> None:
  name, epochs, every, over = spec
  cfg = configs.apply_overrides(
      configs.get_config(name, data_dir="x", vocab_size=vocab_size, epochs=epochs), over)
  model = models.build(name, cfg.model_config); tx = train.make_optimizer(cfg)
  d = jnp.zeros((1, cfg.max_len), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.split(jax.random.key(cfg.seed))[0], d, d, d)["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  step = jax.jit(train.make_train_step(model, tx, cfg, jax.random.key(1)), donate_argnums=(0,))
  ev = evaluate.make_eval_step(model, cfg)
  def evaluate_split(p, s):
    st = {}
    for lo in range(0, len(s["target"]), 512):
      st = metrics.merge(st, ev(p, {k: v[lo:lo+512] for k, v in s.items()}))
    return metrics.compute(jax.device_get(st))
  n = len(tr["inputs"]); B = cfg.batch_size; best = None; t0 = time.time()
  for e in range(1, epochs + 1):
    perm = np.random.default_rng([cfg.seed, e]).permutation(n)
    perm = np.concatenate([perm, -np.ones((-n) % B, int)])
    tot = 0
    for lo in range(0, len(perm), B):
      idx = perm[lo:lo+B]
      batch = {k: np.where((idx >= 0)[:, None], v[np.maximum(idx, 0)], 0).astype(v.dtype) for k, v in tr.items()}
      state, loss = step(state, batch); tot += float(loss)
    if e % every == 0:
      v, t = evaluate_split(state["params"], va), evaluate_split(state["params"], te)
      if best is None or v["ndcg@10"] > best[1]["ndcg@10"]: best = (e, v, t)
      print(f"{name} {list(over)} epoch {e} loss {tot/(len(perm)//B):.4f} valid ndcg@10 {v['ndcg@10']:.4f} test hr@10 {t['hr@10']:.4f} ndcg@10 {t['ndcg@10']:.4f} [{time.time()-t0:.0f}s]", flush=True)
  if best is not None:
    print("SELECTED", name, list(over), best[0], json.dumps({k: round(x, 4) for k, x in best[2].items()}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  vocab_size = features.load_dataset_info(args.dataset_dir).item_vocab_size
  data = np.load(args.npz)
  def split(s): return {k.split("/")[1]: data[k] for k in data.files if k.startswith(s + "/")}
  tr, va, te = split("train"), split("valid"), split("test")
  for spec in args.runs:
    run(spec, vocab_size, tr, va, te)


if __name__ == "__main__":
  main()
