"""Ranking (CTR) quality on frappe_x1 against the published BARS numbers.

Preprocesses ../shared/datasets/frappe_x1 with the project's Beam + tf.transform step
(its own train/valid/test files: the BARS Frappe_x1 split), then trains each model
with several seeds, each in a fresh process (`recml train`), and reports test AUC and
log loss at the epoch selected on validation AUC: every seed, then mean and sample
standard deviation. Prints a Markdown table and writes benchmarks/results/ranking.md.

    .venv/bin/python benchmarks/ranking_quality.py                  # dcnv2 3 seeds, dlrm 1
    .venv/bin/python benchmarks/ranking_quality.py --models dcnv2:1 --seeds 2021

Published (BARS, FuxiCTR; test at the best validation epoch, embedding 10, Adam 1e-3,
batch 4096, early stopping on validation AUC with patience 2): DCN-V2 0.9845 / 0.1491
(5-seed mean 0.98382 / 0.15204, AUC std 0.00043), DLRM (concat) 0.9840 / 0.1444.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys

from train_bench import ROOT, SHARED, train  # the same fresh-process runner

DATA = os.path.join(SHARED, "frappe_x1")
PUBLISHED = {  # model: (test AUC, test log loss, 5-seed mean AUC, 5-seed mean log loss)
    "dcnv2": (0.9845, 0.1491, 0.98382, 0.15204),
    "dlrm": (0.9840, 0.1444, None, None),
}
NOTES = {
    "dcnv2": "BARS DCN-V2 setting: parallel, 4 full-rank cross layers, DNN 400x3, BN, "
             "dropout 0.4, embedding 10, embedding L2 0.05, Adam 1e-3, batch 4096",
    "dlrm": "original DLRM dot interaction (BARS's DLRM row uses concatenation, top MLP 400x3)",
}


def preprocess(out_root: str) -> str:
  out = os.path.join(out_root, "data", "frappe_x1")
  if not os.path.exists(os.path.join(out, "dataset_info.json")):
    cmd = [sys.executable, "-m", "pipelines.cli", "preprocess", "--task", "ranking",
           "--input", DATA, "--output", out, "--label", "label"]
    subprocess.run(cmd, cwd=ROOT, check=True)
  return out


def spread(values: list[float]) -> str:
  mean = statistics.fmean(values)
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.4f} ± {sd:.4f}"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["dcnv2", "dlrm:1"],
                      help="MODEL or MODEL:N (only the first N of --seeds)")
  parser.add_argument("--seeds", nargs="+", type=int, default=[2021, 2022, 2023])
  parser.add_argument("--epochs", type=int, default=100,
                      help="upper bound; early stopping on validation AUC ends runs")
  parser.add_argument("--set", dest="extra", action="append", default=[],
                      help="extra KEY=VALUE for every run")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "bench-ranking"))
  parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results",
                                                        "ranking.md"))
  args = parser.parse_args()

  data = preprocess(args.out)
  lines = [
      "# Ranking quality: frappe_x1",
      "",
      f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
      f"{platform.machine()} with {os.cpu_count()} CPU cores (`{' '.join(sys.argv)}`).",
      "Data: ../shared/datasets/frappe_x1 (BARS Frappe_x1 split 7:2:1; train negatives' item "
      "ids re-drawn by the split's rule, see the data README), preprocessed by "
      "`recml preprocess --task ranking` (10 categorical fields, vocabularies with min count 2).",
      "Protocol: model selected on validation AUC (early stopping, patience 2); test AUC and "
      "log loss at that epoch; exact AUC (ties count one half).",
      "",
      "| model | seed | selected epoch | epochs run | test AUC | test log loss | valid AUC | "
      "s/epoch | examples/s |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  summary = ["", "| model | seeds | test AUC (mean ± sd) | test log loss (mean ± sd) | "
             "published AUC / log loss | published 5-seed mean |", "|---|---|---|---|---|---|"]
  for spec in args.models:
    model, _, count = spec.partition(":")
    seeds = args.seeds[:int(count)] if count else args.seeds
    aucs, lls = [], []
    for seed in seeds:
      workdir = os.path.join(args.out, f"{model}-seed{seed}")
      print(f"== {model} seed {seed} -> {workdir}", flush=True)
      m = train(model, data, workdir, args.epochs, args.extra + [f"seed={seed}"])
      aucs.append(m["test"]["auc"])
      lls.append(m["test"]["logloss"])
      lines.append(f"| {model} | {seed} | {m['selected_epoch']} | {m['epochs_run']} | "
                   f"{m['test']['auc']:.4f} | {m['test']['logloss']:.4f} | "
                   f"{m['valid']['auc']:.4f} | {m['seconds_per_epoch']:.1f} | "
                   f"{m['examples_per_second']:.0f} |")
    pub = PUBLISHED.get(model)
    published = f"{pub[0]} / {pub[1]}" if pub else "—"
    mean5 = f"{pub[2]} / {pub[3]}" if pub and pub[2] else "—"
    summary.append(f"| {model} | {len(seeds)} | {spread(aucs)} | {spread(lls)} | "
                   f"{published} | {mean5} |")
  models = [spec.partition(":")[0] for spec in args.models]
  lines += summary + ["", "Settings:"] + [f"- `{m}`: {NOTES[m]}" for m in models if m in NOTES]
  text = "\n".join(lines) + "\n"
  print(text, flush=True)
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "w") as f:
    f.write(text)
  print(f"wrote {args.results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
