"""Full-softmax cross-entropy, forward and backward: the [B, L, V] logits materialised
against `trainers.losses.softmax_loss` (weighted positions gathered, scored a chunk at a
time, logits recomputed in the backward pass).

Shapes of SASRec on ml-1m-partial (B=128, L=200, D=50, V=3,617 items), at three fractions
of weighted (non-padding) positions. Each cell: the median of --repeats timed calls of
the jitted value-and-gradient, after one compiling call; the maximum gradient difference
between the two says they compute the same thing.

    python benchmarks/loss_bench.py --output benchmarks/results/loss.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from trainers import losses  # pylint: disable=g-import-not-at-top,wrong-import-position


def materialised(user, targets, weights, table, temperature, low=2):
  """The whole [B, L, V] logits at once (the implementation before the chunked one)."""
  logits = jnp.einsum("bld,vd->blv", user, table) / temperature
  logits = jnp.where(jnp.arange(table.shape[0]) >= low, logits, -1e9)
  ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
      logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def timed(fn, args, repeats: int) -> tuple[float, tuple]:
  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  out = jax.block_until_ready(step(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--length", type=int, default=200)
  parser.add_argument("--dim", type=int, default=50)
  parser.add_argument("--items", type=int, default=3617)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--output", help="markdown file to write")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  b, l, d, v = args.batch, args.length, args.dim, args.items
  user = jnp.asarray(rng.normal(size=(b, l, d)).astype(np.float32) * 0.1)
  table = jnp.asarray(rng.normal(size=(v, d)).astype(np.float32) * 0.1)
  targets = jnp.asarray(rng.integers(2, v, (b, l)).astype(np.int32))
  rows = ["| weighted positions | materialised ms | chunked ms | chunked / materialised | "
          "max gradient difference |", "|---:|---:|---:|---:|---:|"]
  for fraction in (1.0, 0.75, 0.5):
    lengths = np.maximum(1, np.round(rng.uniform(2 * fraction - 1, 1, b) * l)) \
        if fraction < 1 else np.full(b, l)
    weights = jnp.asarray((np.arange(l)[None] >= (l - lengths)[:, None]).astype(np.float32))
    data = (user, table)
    old, (old_value, old_grads) = timed(
        lambda u, t: materialised(u, targets, weights, t, 0.05), data, args.repeats)
    new, (new_value, new_grads) = timed(
        lambda u, t: losses.softmax_loss(u, targets, weights, t, 0.05), data, args.repeats)
    diff = max(float(jnp.abs(a - c).max()) for a, c in zip(old_grads, new_grads))
    assert abs(float(old_value) - float(new_value)) < 1e-4 * abs(float(old_value))
    rows.append(f"| {float(weights.mean()):.0%} | {old * 1e3:.0f} | {new * 1e3:.0f} | "
                f"{new / old:.2f}x | {diff:.1e} |")
    print(rows[-1], flush=True)
  text = "\n".join([
      "# Full-softmax cross-entropy: materialised logits against chunks",
      "",
      f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
      f"{platform.machine()} with {os.cpu_count()} CPU cores, {jax.default_backend()}, "
      f"jax {jax.__version__} (`benchmarks/loss_bench.py`).",
      f"Forward and backward (value and gradients of user and table), B={b}, L={l}, D={d}, "
      f"V={v} (SASRec on ml-1m-partial); medians of {args.repeats} calls.",
      "", *rows, ""])
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
