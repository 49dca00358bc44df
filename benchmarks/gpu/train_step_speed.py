"""Train-step throughput of the project's step function on the device.

Batches come from an npz dump of a sequence dataset (benchmarks/gpu/dump_npz.py); the
vocabulary size and sequence length are read from it unless given.

    python3 benchmarks/gpu/train_step_speed.py --data ml1m.npz --runs sasrec:128 hstu:128
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from trainers import configs, models, tasks, train


def run_spec(text: str) -> tuple[str, int]:
  name, _, batch = text.partition(":")
  if name not in models.MODELS or not batch.isdigit():
    raise argparse.ArgumentTypeError(f"expected MODEL:BATCH with MODEL in {models.MODELS}, "
                                     f"got {text!r}")
  return name, int(batch)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=".devrun/ml1m.npz", help="npz dump (train/* arrays)")
  parser.add_argument("--runs", nargs="+", type=run_spec, default=[("hstu", 128)],
                      metavar="MODEL:BATCH")
  parser.add_argument("--vocab-size", type=int, default=0,
                      help="item table rows (default: the largest id in the dump + 1)")
  parser.add_argument("--epochs", type=int, default=5, help="timed passes (median reported)")
  args = parser.parse_args()

  data = np.load(args.data)
  tr = {k.split("/")[1]: data[k] for k in data.files if k.startswith("train/")}
  n, max_len = tr["inputs"].shape
  vocab = args.vocab_size or int(max(tr["inputs"].max(), tr["targets"].max())) + 1
  for name, bs in args.runs:
    cfg = configs.get_config(name, data_dir=args.data, vocab_size=vocab, batch_size=bs,
                             max_len=max_len)
    model = models.build(name, cfg.model_config)
    tx = train.make_optimizer(cfg)
    task = tasks.Retrieval(cfg)
    params = nn.meta.unbox(task.init(model, jax.random.key(0))["params"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(train.make_train_step(model, tx, task, jax.random.key(1)),
                   donate_argnums=(0,))
    batches = [jax.device_put(task.device_batch(
        {k: v[np.arange(lo, lo + bs) % n] for k, v in tr.items()})) for lo in range(0, n, bs)]
    state, loss = step(state, batches[0])
    loss.block_until_ready()
    times = []
    for _ in range(args.epochs):
      t = time.perf_counter()
      for b in batches:
        state, loss = step(state, b)
      loss.block_until_ready()
      times.append(time.perf_counter() - t)
    med = float(np.median(times))
    print(f"{name} batch {bs} (vocab {vocab}, max_len {max_len}): {med * 1000:.1f} ms/epoch "
          f"({len(batches)} steps), {n / med:,.0f} sequences/s, "
          f"{jax.devices()[0].device_kind}", flush=True)


if __name__ == "__main__":
  main()
