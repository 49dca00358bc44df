"""Sequential models benchmark: every next-item model trained to convergence, side by side.

For each data set (ml-1m-partial, ml-100k) and each variant below, `recml train` runs in a
fresh process with early stopping (validation NDCG@10 every ``--eval-every`` epochs,
``--patience`` evaluations without improvement, at most ``--max-epochs``); test metrics
are read at the selected epoch. Runs resume from their work directory, so the benchmark
may be stopped and restarted (a finished run is read, not retrained). Each run's
``metrics.json`` is copied to ``benchmarks/results/sequential/``, from which the table in
``benchmarks/results/sequential.md`` is written.

    .venv/bin/python benchmarks/sequential_bench.py                      # everything
    .venv/bin/python benchmarks/sequential_bench.py --datasets ml-100k --variants mamba4rec
    .venv/bin/python benchmarks/sequential_bench.py --table-only         # rewrite the table
    .venv/bin/python benchmarks/sequential_bench.py --speed              # idle machine: timing
    .venv/bin/python benchmarks/sequential_bench.py --peer --peer-batches 500  # RecBole

``--speed`` times ``--speed-epochs`` epochs of every variant on ml-1m-partial (no
evaluation) and compares s/epoch with the HSTU paper's code run on this machine
(SASRec 31.9, HSTU 30.0, HSTU-large 70.7 s/epoch; the reference figures of
``train_bench.py``). Quality runs share the machine with other work, so their s/epoch is
not a speed figure; the speed table is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys

from train_bench import DATASETS, REFERENCE, ROOT, preprocess, train

RESULTS = os.path.join(ROOT, "benchmarks", "results")
RUNS = os.path.join(RESULTS, "sequential")
# variant -> (model, --set overrides, what it is)
VARIANTS = {
    "sasrec-sampled128": ("sasrec", [], "SASRec, sampled softmax, 128 uniform negatives "
                          "(one set per position index, shared by the batch)"),
    "sasrec-s128-group8": ("sasrec", ["negative_sharing=group"],
                           "SASRec, sampled softmax, 128 negatives shared by 8 consecutive "
                           "positions (the default before `column`)"),
    "sasrec-ce": ("sasrec", ["loss=softmax"],
                  "SASRec, full-softmax cross-entropy over cosine similarities / 0.05"),
    "sasrec-ce-dot": ("sasrec", ["loss=softmax", "l2_normalize=False", "temperature=1.0"],
                      "SASRec, full-softmax cross-entropy over raw dot products "
                      "(Klenitskiy & Vasilev's SASRec+)"),
    "sasrec-ce-dot-d64": ("sasrec", ["loss=softmax", "l2_normalize=False", "temperature=1.0",
                                     "embedding_dim=64", "ffn_dim=64", "dropout=0.1"],
                          "SASRec-CE-dot at Klenitskiy & Vasilev's ML-1M shapes: d=64, "
                          "dropout 0.1"),
    "sasrec-ce-dot-drop0.3": ("sasrec", ["loss=softmax", "l2_normalize=False",
                                         "temperature=1.0", "dropout=0.3"],
                              "SASRec-CE-dot with dropout 0.3 (d=64 at 0.1 overfit early)"),
    "sasrec-gbce": ("sasrec", ["loss=gbce", "num_negatives=256", "l2_normalize=False",
                               "temperature=1.0"],
                    "SASRec, gBCE with 256 negatives, t=0.75 (gSASRec)"),
    "bert4rec": ("bert4rec", [], "BERT4Rec, cloze (mask 0.2), dropout 0.1, full-softmax "
                 "cross-entropy"),
    "bert4rec-drop0.2": ("bert4rec", ["dropout=0.2", "attention_dropout=0.2"],
                         "BERT4Rec as `bert4rec`, dropout 0.2 (the preset before 0.1)"),
    "mamba4rec": ("mamba4rec", [], "Mamba4Rec, 1 layer, d=64, full-softmax cross-entropy"),
    "hstu": ("hstu", [], "HSTU, sampled softmax, 128 negatives"),
    "hstu-group8": ("hstu", ["negative_sharing=group"],
                    "HSTU, sampled softmax, 128 negatives shared by 8 consecutive positions"),
    "hstu-large": ("hstu-large", [], "HSTU-large (8 blocks, 2 heads), sampled softmax"),
}
COLUMNS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr")
KEEP = ("model", "dataset", "epochs_run", "selected_epoch", "early_stopped", "test", "valid",
        "seconds_per_epoch", "sequences_per_second", "eval_seconds", "peak_rss_gb",
        "wall_seconds", "num_params")


def run_file(dataset: str, variant: str) -> str:
  return os.path.join(RUNS, f"{dataset}-{variant}.json")


def finished(workdir: str, max_epochs: int, patience: int) -> dict | None:
  """The run's metrics.json when it is done: ran ``max_epochs``, or stopped early with
  at least ``patience`` evaluations without improvement (a run stopped with less
  patience resumes and continues)."""
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    m = json.load(f)
  with open(os.path.join(workdir, "log.jsonl")) as f:
    if sum(1 for _ in f) > m.get("epochs_run", 0):
      return None  # the run continued past this record (more patience) and is unfinished
  with open(os.path.join(workdir, "config.json")) as f:
    run_patience = json.load(f).get("patience", 0)
  stopped = m.get("early_stopped") and 0 < patience <= run_patience
  return m if stopped or m.get("epochs_run", 0) >= max_epochs else None


def time_to(log_path: str, metric: str, value: float) -> dict | None:
  """Training + evaluation seconds until the first evaluation with test ``metric`` >=
  ``value`` (from the run's log.jsonl), or None if it never got there."""
  seconds = 0.0
  with open(log_path) as f:
    for line in f:
      entry = json.loads(line)
      seconds += entry.get("epoch_seconds", 0.0) + entry.get("eval_seconds", 0.0)
      if entry.get("test", {}).get(metric, -1.0) >= value:
        return {"epoch": entry["epoch"], "seconds": seconds, metric: entry["test"][metric]}
  return None


def partial(workdir: str) -> dict | None:
  """A record of an unfinished run from its log.jsonl: the evaluation with the best
  validation NDCG@10 so far (what the trainer would select if it stopped now)."""
  path = os.path.join(workdir, "log.jsonl")
  if not os.path.exists(path):
    return None
  log = [json.loads(line) for line in open(path)]
  evals = [e for e in log if "valid" in e]
  if not evals:
    return None
  best = max(evals, key=lambda e: e["valid"]["ndcg@10"])
  seconds = sorted(e["epoch_seconds"] for e in log[1:]) or [log[0]["epoch_seconds"]]
  return {"epochs_run": log[-1]["epoch"], "selected_epoch": best["epoch"],
          "early_stopped": False, "test": best["test"], "valid": best["valid"],
          "seconds_per_epoch": seconds[len(seconds) // 2],
          "sequences_per_second": None, "peak_rss_gb": None, "num_params": None,
          "running": True, "log": log}


def record(name: str, variant: str, metrics: dict, workdir: str) -> dict:
  """Writes a finished run's record (its metrics.json's numbers and its log)."""
  out = {k: metrics.get(k) for k in KEEP}
  out["log"] = [json.loads(line) for line in open(os.path.join(workdir, "log.jsonl"))]
  with open(run_file(name, variant), "w") as f:
    json.dump(out, f, indent=1)
  return out


def record_existing(args) -> None:
  """Records every run of the work directory without running anything: finished runs
  as they ended, unfinished ones that have evaluated as :func:`partial` (the table shows
  them as stopped; a later quality run resumes and replaces them)."""
  os.makedirs(RUNS, exist_ok=True)
  for name in args.datasets:
    for variant in args.variants:
      workdir = os.path.join(args.out, name, variant)
      done = finished(workdir, args.max_epochs, args.patience)
      if done is not None:
        kept = {}
        if os.path.exists(run_file(name, variant)):  # the quality run's own measurements
          with open(run_file(name, variant)) as f:
            kept = {k: v for k, v in json.load(f).items() if k == "peak_rss_gb"}
        record(name, variant, {**done, **kept}, workdir)
      elif (r := partial(workdir)) is not None:
        with open(run_file(name, variant), "w") as f:
          json.dump(r, f, indent=1)


def quality(args) -> None:
  os.makedirs(RUNS, exist_ok=True)
  for name in args.datasets:
    data = preprocess(name, args.out)
    pop_file = run_file(name, "most-popular")
    if not os.path.exists(pop_file):
      from trainers import evaluate  # pylint: disable=g-import-not-at-top
      with open(pop_file, "w") as f:
        json.dump({"test": evaluate.popularity_baseline(data)}, f, indent=1)
    for variant in args.variants:
      model, sets, _ = VARIANTS[variant]
      workdir = os.path.join(args.out, name, variant)
      done = finished(workdir, args.max_epochs, args.patience)
      if done is None:
        print(f"== {name} {variant}: up to {args.max_epochs} epochs -> {workdir}", flush=True)
        done = train(model, data, workdir, args.max_epochs,
                     sets + [f"eval_every={args.eval_every}", f"patience={args.patience}"])
      r = record(name, variant, done, workdir)
      print(f"   {variant}: selected epoch {r['selected_epoch']} of "
            f"{r['epochs_run']}, test " + ", ".join(
                f"{k} {r['test'][k]:.4f}" for k in COLUMNS), flush=True)


def speed(args) -> list[str]:
  data = preprocess("ml-1m-partial", args.out)
  rows = ["| variant | s/epoch (median) | sequences/s | first epoch s | peak RSS GB | "
          "reference s/epoch | ours / reference |", "|---|---|---|---|---|---|---|"]
  for variant in args.variants:
    model, sets, _ = VARIANTS[variant]
    workdir = os.path.join(args.out, "speed", variant)
    shutil.rmtree(workdir, ignore_errors=True)  # a timing run never resumes
    m = train(model, data, workdir, args.speed_epochs,
              sets + [f"eval_every={args.speed_epochs + 1}"])
    ref = REFERENCE.get(model, {}).get("seconds_per_epoch") if variant != "sasrec-ce" else None
    ratio = f"{m['seconds_per_epoch'] / ref:.2f}x" if ref else "—"
    rows.append(f"| {variant} | {m['seconds_per_epoch']:.2f} | "
                f"{m['sequences_per_second']:.0f} | {m['first_epoch_seconds']:.1f} | "
                f"{m['peak_rss_gb']:.2f} | {ref or '—'} | {ratio} |")
    print(rows[-1], flush=True)
  return rows


# RecBole model -> our variant of the same kind and loss (full-softmax CE over dot products)
PEERS = {"SASRec": "sasrec-ce-dot", "BERT4Rec": "bert4rec"}


def peer(args) -> list[str]:
  """RecBole side by side: each RecBole model trains ``--peer-batches`` batches (0 = one
  full epoch) on ml-1m-partial, then our model of the same kind trains from scratch,
  evaluating every epoch, until its test HR@10 reaches RecBole's (``stop_at``): first
  compiling every step (an empty compile cache), then again from scratch with that cache
  warm (what a second run of the same shapes does). All run here, one after the other;
  the table compares RecBole's training seconds with ours (training + evaluation,
  compilation included) to the same test HR@10."""
  import recbole_peer  # pylint: disable=g-import-not-at-top
  data = preprocess("ml-1m-partial", args.out)
  rows = ["| model | RecBole: batches of 128 prefixes | RecBole train s | RecBole test HR@10 | "
          "RecBole NDCG@10 | ours: variant | ours: epoch reached | ours: s to reach "
          "(train + eval), compiling / compile cache warm | ours: process wall s | "
          "ours / RecBole time, compiling / warm |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for name, variant in PEERS.items():
    r = recbole_peer.run(name, batches=args.peer_batches,
                         workdir=os.path.join(args.out, "recbole"))
    target = r["test"]["hit@10"]
    model, sets, _ = VARIANTS[variant]
    cache = os.path.join(args.out, "peer", f"{variant}-compile-cache")
    shutil.rmtree(cache, ignore_errors=True)
    runs = []
    for attempt in ("cold", "warm"):
      workdir = os.path.join(args.out, "peer", f"{variant}-{args.peer_batches}-{attempt}")
      shutil.rmtree(workdir, ignore_errors=True)  # timed from scratch
      m = train(model, data, workdir, args.max_epochs,
                sets + ["eval_every=1", "patience=0", f"stop_at=test/hr@10>={target}"],
                compile_cache=cache)
      runs.append((time_to(os.path.join(workdir, "log.jsonl"), "hr@10", target), m))
    (reached, m), (warm, _) = runs
    ours = [x["seconds"] if x else float("nan") for x in (reached, warm)]
    batches = r["batches"] if not r["full_epoch"] else f"{r['batches_per_epoch']} (full epoch)"
    rows.append(f"| {name} | {batches} of {r['batches_per_epoch']} | {r['train_seconds']:.0f} | "
                f"{target:.4f} | {r['test']['ndcg@10']:.4f} | {variant} | "
                f"{reached['epoch'] if reached else 'not reached'} | "
                f"{ours[0]:.0f} / {ours[1]:.0f} | {m['wall_seconds']:.0f} | "
                f"{ours[0] / r['train_seconds']:.3f}x / {ours[1] / r['train_seconds']:.3f}x |")
    print(rows[-1], flush=True)
  return rows


def _fmt(value, digits=4):
  return "—" if value is None else f"{value:.{digits}f}"


def table(args, speed_rows: list[str] | None, peer_rows: list[str] | None = None) -> str:
  lines = [
      "# Sequential models: quality at convergence and speed",
      "",
      f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
      f"{platform.machine()} with {os.cpu_count()} CPU cores by "
      "`benchmarks/sequential_bench.py` (runs: `benchmarks/results/sequential/*.json`).",
      "Protocol: leave-one-out by time; full ranking over every item, the user's history "
      f"excluded; validation NDCG@10 every {args.eval_every} epochs, early stopping after "
      f"{args.patience} evaluations without improvement (at most {args.max_epochs} epochs); "
      "test reported at the selected epoch. s/epoch here is from runs that shared the "
      "machine with other work: the speed table below is the timing.",
      "",
      "Variants: " + "; ".join(f"`{k}` {v[2]}" for k, v in VARIANTS.items()) + ".",
  ]
  for name in DATASETS:
    rows = []
    for variant in ("most-popular",) + tuple(VARIANTS):
      path = run_file(name, variant)
      if not os.path.exists(path):
        continue
      with open(path) as f:
        r = json.load(f)
      cells = " | ".join(_fmt(r["test"].get(k)) for k in COLUMNS)
      if variant == "most-popular":
        rows.append(f"| most popular | — | — | {cells} | — | — | — |")
        continue
      state = "early stop" if r["early_stopped"] else f"cap {args.max_epochs}"
      if r.get("running"):  # it resumes while its work directory is here
        resumes = os.path.exists(os.path.join(args.out, name, variant, "log.jsonl"))
        state = "not converged: stopped here" + (", resumes" if resumes else
                                                 "; its work directory is gone")
      params = format(r["num_params"], ",") if r["num_params"] else "—"
      rows.append(f"| {variant} | {r['selected_epoch']} / {r['epochs_run']} ({state}) | "
                  f"{params} | {cells} | {_fmt(r['seconds_per_epoch'], 2)} | "
                  f"{_fmt(r['sequences_per_second'], 0)} | {_fmt(r['peak_rss_gb'], 2)} |")
    if rows:
      lines += ["", f"## {name}", "",
                "| variant | selected / run | params | " + " | ".join(COLUMNS)
                + " | s/epoch | sequences/s | peak RSS GB |",
                "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|---|"] + rows
  if peer_rows:
    lines += ["", "## Side by side with RecBole (ml-1m-partial, full-softmax CE, max length "
              "200, batch 128)", "",
              "RecBole trains on every prefix of every sequence as its own example (3,740 "
              "batches per epoch here); our models train on whole sequences (24 batches per "
              "epoch). RecBole ran the stated number of batches; our model of the same kind "
              "then trained from scratch on the same machine, the benchmark's other work "
              "stopped, evaluating every epoch until its test HR@10 reached RecBole's: once "
              "compiling every step, and once more from scratch with JAX's compile cache "
              "warm from the first (`recml train --compile-cache`, on by default).", ""]
    lines += peer_rows
  if speed_rows:
    lines += ["", "## Speed on an idle machine (ml-1m-partial, 24 steps of 128 per epoch)", ""]
    lines += speed_rows
  return "\n".join(lines) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--max-epochs", type=int, default=300)
  parser.add_argument("--eval-every", type=int, default=5)
  parser.add_argument("--patience", type=int, default=5)
  parser.add_argument("--speed", action="store_true", help="timing runs only (idle machine)")
  # Each new train shape (length bucket, last partial batch) compiles when it first
  # appears, up to epoch ~3; the median of 8 epochs is the steady state.
  parser.add_argument("--speed-epochs", type=int, default=8)
  parser.add_argument("--table-only", action="store_true")
  parser.add_argument("--peer", action="store_true",
                      help="RecBole SASRec/BERT4Rec side by side: time to the same test HR@10")
  parser.add_argument("--peer-batches", type=int, default=500,
                      help="RecBole batches per model; 0 = one full epoch (~34/56 min here)")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "seq"))
  args = parser.parse_args()
  speed_file = os.path.join(RUNS, "speed.md")
  peer_file = os.path.join(RUNS, "recbole.md")
  if args.speed:
    os.makedirs(RUNS, exist_ok=True)
    with open(speed_file, "w") as f:
      f.write("\n".join(speed(args)) + "\n")
  elif args.peer:
    os.makedirs(RUNS, exist_ok=True)
    with open(peer_file, "w") as f:
      f.write("\n".join(peer(args)) + "\n")
  elif not args.table_only:
    quality(args)
  else:
    record_existing(args)
  speed_rows = open(speed_file).read().splitlines() if os.path.exists(speed_file) else None
  peer_rows = open(peer_file).read().splitlines() if os.path.exists(peer_file) else None
  text = table(args, speed_rows, peer_rows)
  with open(os.path.join(RESULTS, "sequential.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
