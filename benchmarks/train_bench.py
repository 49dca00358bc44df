"""Training benchmark: quality and speed of each model on real MovieLens data.

For each data set: preprocess it with the project's Beam step, evaluate the
most-popular-item baseline under the same protocol, then train each model in a
fresh process (`recml train`) and read its metrics.json and peak memory.
Prints a Markdown table and writes it to benchmarks/results/train.md.

    .venv/bin/python benchmarks/train_bench.py                        # everything
    .venv/bin/python benchmarks/train_bench.py --datasets ml-100k --models sasrec --epochs 5

Reference (the HSTU paper's PyTorch code on this 2-core machine, ml-1m-partial,
40 epochs; ../shared/notes/reference-runs.md): SASRec 31.9 s/epoch, HR@10 0.2601,
NDCG@10 0.1456; HSTU 30.0 s/epoch, HR@10 0.2918, NDCG@10 0.1670; HSTU-large 70.7 s/epoch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
DATASETS = {"ml-1m-partial": os.path.join(SHARED, "ml-1m-partial"),
            "ml-100k": os.path.join(SHARED, "ml-100k")}
REFERENCE = {  # ml-1m-partial, test at the last of 40 epochs; s/epoch
    "sasrec": {"hr@10": 0.2601, "ndcg@10": 0.1456, "hr@50": 0.5095, "ndcg@50": 0.2007,
               "mrr": 0.1256, "seconds_per_epoch": 31.9},
    "hstu": {"hr@10": 0.2918, "ndcg@10": 0.1670, "hr@50": 0.5458, "ndcg@50": 0.2226,
             "mrr": 0.1435, "seconds_per_epoch": 30.0},
    "hstu-large": {"seconds_per_epoch": 70.7},
}
COLUMNS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")


def preprocess(name: str, out_root: str) -> str:
  from components import preprocess as prep  # pylint: disable=g-import-not-at-top
  out = os.path.join(out_root, "data", name)
  if not os.path.exists(os.path.join(out, "dataset_info.json")):
    prep.run(DATASETS[name], out)
  return out


def train(model: str, data: str, workdir: str, epochs: int, extra: list[str],
          compile_cache: str | None = None) -> dict:
  """Runs `recml train` in a fresh process; returns metrics.json plus peak RSS. Every step
  compiles (`--no-compile-cache`) unless ``compile_cache`` names a cache folder."""
  cache = ["--compile-cache", compile_cache] if compile_cache else ["--no-compile-cache"]
  cmd = [sys.executable, "-m", "pipelines.cli", "train", "--data", data, "--model", model,
         "--workdir", workdir, "--epochs", str(epochs)] + cache + [
             a for s in extra for a in ("--set", s)]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  for line in proc.stdout:
    if line.startswith("epoch"):
      print(f"  [{model}] {line.rstrip()}", flush=True)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode})")
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  metrics["peak_rss_gb"] = usage.ru_maxrss / 2**20
  metrics["wall_seconds"] = time.perf_counter() - t0
  return metrics


def fmt_row(label: str, epoch, m: dict, extra: str = "") -> str:
  cells = " | ".join(f"{m[c]:.4f}" if c in m else "—" for c in COLUMNS)
  return f"| {label} | {epoch} | {cells} |{extra}"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
  parser.add_argument("--models", nargs="+", default=["sasrec", "hstu", "hstu-large"])
  parser.add_argument("--epochs", type=int, default=100)
  parser.add_argument("--large-epochs", type=int, default=30,
                      help="epochs for hstu-large (4x the cost per epoch)")
  parser.add_argument("--set", dest="extra", action="append", default=[])
  parser.add_argument("--speed", action="store_true",
                      help="timing only: short runs evaluated once, speed table only "
                           "(run on an otherwise idle machine)")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "bench"))
  parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results",
                                                        "train.md"))
  args = parser.parse_args()

  from trainers import evaluate  # pylint: disable=g-import-not-at-top
  lines = [
      "# Training benchmark",
      "",
      f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
      f"{platform.machine()} with {os.cpu_count()} CPU cores (`{' '.join(sys.argv)}`).",
      "Protocol: leave-one-out by time; model selected on validation NDCG@10, test reported "
      "at that epoch; full ranking over all items, history excluded; ties broken at random "
      "in expectation. `best test` = best test value per metric over epochs (chosen on "
      "test; for comparison with papers that report it).",
      "",
  ]
  for name in args.datasets:
    data = preprocess(name, args.out)
    lines += [f"## {name}", "",
              "| model | epoch | " + " | ".join(COLUMNS) + " |",
              "|---|---|" + "---|" * len(COLUMNS)]
    if args.speed:
      lines = lines[:-3]
    else:
      pop = evaluate.popularity_baseline(data)
      lines.append(fmt_row("most popular (test)", "—", pop))
    speed = ["", "| model | epochs run | s/epoch (median) | first epoch s | sequences/s | "
             "eval s | peak RSS GB | wall s |", "|---|---|---|---|---|---|---|---|"]
    for model in args.models:
      epochs = args.large_epochs if model == "hstu-large" else args.epochs
      workdir = os.path.join(args.out, f"{name}-{model}")
      print(f"== {name} {model} ({epochs} epochs) -> {workdir}", flush=True)
      extra = args.extra + ([f"eval_every={epochs + 1}"] if args.speed else [])
      if args.speed and os.path.exists(workdir):
        shutil.rmtree(workdir)  # a timing run never resumes
      m = train(model, data, workdir, epochs, extra)
      ref = REFERENCE.get(model, {})
      if not args.speed:
        lines.append(fmt_row(f"{model} (test @ selected)", m["selected_epoch"], m["test"]))
        lines.append(fmt_row(f"{model} (valid @ selected)", m["selected_epoch"], m["valid"]))
        lines.append(fmt_row(f"{model} (best test)", "per metric", m["best_test"]))
        if name == "ml-1m-partial" and "hr@10" in ref:
          lines.append(fmt_row(f"{model} reference (test @ epoch 39)", 39, ref))
      speed.append(f"| {model} | {m['epochs_run']} | {m['seconds_per_epoch']:.2f} | "
                   f"{m['first_epoch_seconds']:.1f} | {m['sequences_per_second']:.0f} | "
                   f"{m['eval_seconds']:.2f} | {m['peak_rss_gb']:.2f} | {m['wall_seconds']:.0f} |")
      if name == "ml-1m-partial" and model in REFERENCE:
        r = REFERENCE[model]["seconds_per_epoch"]
        speed[-1] += f" reference {r} s/epoch: {r / m['seconds_per_epoch']:.1f}x faster"
    lines += speed + [""]
    print("\n".join(lines), flush=True)
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
