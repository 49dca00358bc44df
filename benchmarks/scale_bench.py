"""Scale benchmark: a 10M-row item table sharded row-wise over 8 devices, the step time
at 1, 2, 4 and 8 devices, and bf16 against fp32 quality.

Each device count runs in its own process (``--xla_force_host_platform_device_count``
fixes the virtual CPU devices when JAX starts). On this CPU machine the 8 "devices"
share the same 2 cores: the step-time table shows the cost of partitioning
(collectives, per-device launch), not a speed-up.

    .venv/bin/python benchmarks/scale_bench.py                      # tables 1 and 2
    .venv/bin/python benchmarks/scale_bench.py --rows 1000000       # smaller table
    .venv/bin/python benchmarks/scale_bench.py --precision FP32_WORKDIR BF16_WORKDIR

``--precision`` reads two finished ``recml train`` work directories (same config but
``--set dtype=bfloat16``) and adds the quality table. Results: benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "RESULT "


# ----------------------------------------------------------------------------- workers


def _dataset(root: str, vocab: int, max_len: int) -> str:
  """A small sequence dataset whose item vocabulary is ``vocab`` (the table's rows)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trainers import features  # pylint: disable=g-import-not-at-top
  out = os.path.join(root, f"vocab{vocab}")
  if not os.path.exists(os.path.join(out, features.DATASET_INFO_FILE)):
    rng = np.random.default_rng(0)
    events = {u: (list(rng.integers(features.FIRST_ITEM_ID, vocab, max_len + 3)),
                  list(range(max_len + 3))) for u in range(64)}
    features.write_sequence_dataset(out, events, item_vocab_size=vocab, max_len=max_len,
                                    source={"name": f"synthetic-{vocab}"})
  return out


def worker(args) -> dict:
  """Builds SASRec on all visible devices and times train steps on random batches."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trainers import configs, sharding, tasks, train  # pylint: disable=g-import-not-at-top
  data = _dataset(args.tmp, args.rows, args.max_len)
  config = configs.get_config(
      "sasrec", data_dir=data, batch_size=args.batch, max_len=args.max_len,
      embedding_dim=args.dim, num_blocks=1, num_heads=1, optimizer=args.optimizer,
      num_negatives=args.negatives, embedding_sharding=args.kind,
      length_bucket_fractions=())
  task = tasks.for_config(config)
  config = task.prepare()
  mesh = sharding.make_mesh()
  t0 = time.perf_counter()
  built = train.build(config, task, mesh)
  jax.block_until_ready(built.state)
  init_s = time.perf_counter() - t0

  # Bytes each device holds, from the arrays' own shardings.
  per_device: dict[int, int] = {}
  for leaf in jax.tree.leaves(built.state):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  table = built.state["params"]["item_embedding"]["embedding"]
  table_shard = table.addressable_shards[0].data

  rng = np.random.default_rng(1)
  b, l = args.batch, args.max_len

  def batch():
    ids = rng.integers(2, config.model_config.vocab_size, (b, l + 1)).astype(np.int32)
    times = np.broadcast_to(np.arange(l + 1, dtype=np.int64), (b, l + 1))
    return task.device_batch({
        "inputs": ids[:, :-1], "targets": ids[:, 1:],
        "timestamps": times[:, :-1].copy(), "query_timestamps": times[:, 1:].copy(),
        "weights": np.ones((b, l), np.float32)})

  state, step_times = built.state, []
  for i in range(args.warmup + args.steps):
    global_batch = sharding.global_batch(mesh, batch())
    t = time.perf_counter()
    state, loss = built.train_step(state, global_batch)
    loss = float(loss)
    if i >= args.warmup:
      step_times.append(time.perf_counter() - t)
  return {
      "devices": mesh.devices.size, "kind": built.kinds["item_embedding"],
      "rows": int(table.shape[0]), "dim": int(table.shape[1]),
      "table_bytes": int(table.nbytes), "table_shard_shape": list(table_shard.shape),
      "table_bytes_per_device": int(table_shard.nbytes),
      "state_bytes_per_device": sorted(per_device.values()),
      "init_seconds": init_s, "step_seconds": step_times, "loss": loss,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  }


# ----------------------------------------------------------------------------- driver


def run_worker(devices: int, args, **over) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tmp", args.tmp]
  for key, value in {**vars(args), **over}.items():
    if key in ("rows", "dim", "batch", "max_len", "negatives", "steps", "warmup", "kind",
               "optimizer"):
      cmd += [f"--{key.replace('_', '-')}", str(value)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  print(f"  {devices} device(s): {' '.join(cmd[2:])}", flush=True)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
  if proc.returncode or not lines:
    raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len(RESULT):])


def gib(x: float) -> str:
  return f"{x / 2**30:.3f} GiB" if x >= 2**27 else f"{x / 2**20:.2f} MiB"


def big_table_section(args) -> list[str]:
  r = run_worker(8, args, rows=args.rows, dim=64, kind="row", steps=args.big_steps,
                 warmup=1, batch=args.batch, max_len=args.max_len)
  med = statistics.median(r["step_seconds"])
  return [
      "## A 10M-row item table, row-wise over 8 devices", "",
      f"SASRec (1 block, d=64, max_len {args.max_len}, batch {args.batch}, sampled softmax "
      f"with {args.negatives} negatives, {args.optimizer}) with an item table of "
      f"{r['rows']:,} rows x {r['dim']} (fp32), sharded row-wise over 8 virtual CPU "
      "devices by the trainer's own plan; bytes measured from the arrays' shardings "
      "(`addressable_shards`).", "",
      "| | value |", "|---|---|",
      f"| table (global) | {r['rows']:,} x {r['dim']} = {gib(r['table_bytes'])} |",
      f"| table shard per device | {r['table_shard_shape'][0]:,} x "
      f"{r['table_shard_shape'][1]} = {gib(r['table_bytes_per_device'])} |",
      f"| whole train state per device (params + {args.optimizer} state), min-max | "
      f"{gib(min(r['state_bytes_per_device']))} - {gib(max(r['state_bytes_per_device']))} |",
      f"| sharded init (each device its rows) | {r['init_seconds']:.1f} s |",
      f"| train step, median of {len(r['step_seconds'])} | {med:.2f} s |",
      f"| loss after {len(r['step_seconds']) + 1} steps | {r['loss']:.4f} |",
      f"| peak RSS of the process (all 8 devices) | {r['peak_rss_gb']:.1f} GB |", ""]


def steps_section(args) -> list[str]:
  rows = []
  for kind in ("replicated", "row"):
    base = None
    for devices in (1, 2, 4, 8):
      r = run_worker(devices, args, rows=args.small_rows, dim=args.dim, kind=kind,
                     steps=args.steps, warmup=args.warmup)
      med = statistics.median(r["step_seconds"])
      base = base or med
      rows.append(f"| {kind} | {devices} | {med * 1000:.1f} | "
                  f"{min(r['step_seconds']) * 1000:.1f} | {med / base:.2f}x | "
                  f"{gib(r['table_bytes_per_device'])} |")
  return [
      "## Step time at 1, 2, 4 and 8 devices, fixed global batch", "",
      f"SASRec (1 block, d={args.dim}, max_len {args.max_len}, global batch {args.batch}, "
      f"{args.negatives} sampled negatives, item table {args.small_rows:,} rows: "
      f"ml-1m-partial's size), {args.steps} timed steps after {args.warmup} warm-up "
      "steps, one process per device count.", "",
      "**On CPU this shows overhead, not speed-up:** the virtual devices are threads "
      "sharing this machine's 2 cores, so more devices only add partitioning work "
      "(collectives, per-device launches, smaller matmuls). On accelerators each device "
      "brings its own compute and memory.", "",
      "| table sharding | devices | step ms (median) | step ms (min) | vs 1 device | "
      "table bytes / device |", "|---|---|---|---|---|---|", *rows, ""]


def precision_section(fp32_dir: str, bf16_dir: str) -> list[str]:
  runs = {}
  for name, d in (("fp32", fp32_dir), ("bf16", bf16_dir)):
    with open(os.path.join(d, "metrics.json")) as f:
      runs[name] = json.load(f)
    with open(os.path.join(d, "config.json")) as f:
      runs[name]["config"] = json.load(f)
  a, b = runs["fp32"], runs["bf16"]
  lines = ["## bf16 against fp32 quality", "",
           f"{a['model']} on {a['dataset']}, the same config but `dtype` "
           f"({a['config']['model_config'].get('dtype', 'float32')} vs "
           f"{b['config']['model_config'].get('dtype')}), {a['epochs_run']} / "
           f"{b['epochs_run']} epochs; test at the epoch selected on validation "
           f"({a['selected_epoch']} / {b['selected_epoch']}).", "",
           "| metric | fp32 | bf16 | relative |", "|---|---|---|---|"]
  for m in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"):
    x, y = a["test"][m], b["test"][m]
    lines.append(f"| {m} | {x:.4f} | {y:.4f} | {100 * (y - x) / x:+.2f}% |")
  lines.append(f"| s/epoch (median) | {a['seconds_per_epoch']:.1f} | "
               f"{b['seconds_per_epoch']:.1f} | {b['seconds_per_epoch'] / a['seconds_per_epoch']:.2f}x |")
  return lines + [""]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--tmp", default="")
  p.add_argument("--rows", type=int, default=10_000_000, help="rows of the big table")
  p.add_argument("--small-rows", type=int, default=3_708, help="rows in the step-time table")
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--max-len", type=int, default=50)
  p.add_argument("--negatives", type=int, default=128)
  p.add_argument("--optimizer", default="adagrad", choices=("adagrad", "adamw"))
  p.add_argument("--kind", default="row")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--big-steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--skip-big", action="store_true")
  p.add_argument("--precision", nargs=2, metavar=("FP32_WORKDIR", "BF16_WORKDIR"))
  p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "scale.md"))
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  if args.worker:
    print(RESULT + json.dumps(worker(args)), flush=True)
    return
  with tempfile.TemporaryDirectory() as tmp:
    args.tmp = tmp
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Scale benchmark", "",
             f"Run {started} on {platform.machine()} with {os.cpu_count()} CPU cores, no "
             f"accelerator (`benchmarks/scale_bench.py {' '.join(sys.argv[1:])}`).", ""]
    if not args.skip_big:
      lines += big_table_section(args)
    lines += steps_section(args)
    if args.precision:
      lines += precision_section(*args.precision)
  text = "\n".join(lines)
  print(text)
  with open(args.results, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
