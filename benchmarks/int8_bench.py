"""int8 embedding tables against float32: bundle size, resident memory, test quality.

For SASRec and HSTU trained on ml-1m-partial and DCNv2 on frappe_x1, exports each
trained model twice (``recml export`` and ``recml export --quantize int8``, i.e.
:func:`trainers.export.export_bundle`) and reports side by side:

* the bundle's size on disk, the embedding tables' bytes (float32 against int8 values
  plus their float16 scales) and the ratio;
* resident memory: the RSS growth of a fresh process (JAX already started) that loads
  the bundle (``load``), then puts its weights on the device and compiles and runs its
  function at batch 1 (``ready``), median of ``--rss-repeats`` processes; and the bytes
  of the weights it holds;
* quality on the test split, computed by running each EXPORTED bundle's function (not
  the trainer's parameters) with the protocol of :mod:`trainers.evaluate`: full
  ranking over every item, the user's whole history excluded (``exclude_history``),
  metric sums from :func:`trainers.evaluate.make_metrics_step`; the retrieval bundles
  are exported with ``max_k`` = every item (and no ids excluded in the function), so
  their scores of all items are the full score matrix the metrics need. DCNv2: exact
  AUC and log loss (:func:`trainers.metrics.binary_compute`) of the bundle's click
  probabilities. Also the agreement of the two bundles' top 10 (history excluded) and
  their largest score difference, and, as a check, the trainer's own test metrics
  (``metrics.json``) which the float32 bundle reproduces.

Targets (issue 14): HR@10 and NDCG@10 within 0.5% (relative) of float32, AUC within
0.001, embedding bytes / >= 3.5.

    .venv/bin/python benchmarks/int8_bench.py                      # the three models
    .venv/bin/python benchmarks/int8_bench.py --model sasrec=/tmp/prec/float32
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from trainers import configs, evaluate, export, features, metrics
from trainers.checkpoints import load_config_dict
from trainers.input_pipeline import RankingData, SequenceData, model_batch
# pylint: enable=wrong-import-position

KS = (10,)
REL_TARGET = 0.005   # HR@10, NDCG@10: relative loss
AUC_TARGET = 0.001   # absolute AUC loss
RATIO_TARGET = 3.5


def _latest(pattern: str) -> str | None:
  found = sorted(glob.glob(os.path.join(ROOT, pattern)))
  return found[-1] if found else None


def default_models() -> dict[str, str | None]:
  return {
      "sasrec": "/tmp/prec/float32",
      "hstu": _latest("runs/ml1m-hstu-*/recml-pipeline-*/train/model"),
      "dcnv2": _latest("runs/frappe-dcnv2-*/recml-pipeline-*/train/model"),
  }


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Resident memory (a fresh process per measurement)
# ---------------------------------------------------------------------------


def _rss() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_child(path: str) -> None:
  """``--rss BUNDLE``: prints ``{"load", "ready", "weights"}`` bytes as JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  from serving import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  jax.jit(lambda x: x + 1)(np.zeros(4, np.float32)).block_until_ready()  # JAX started
  before = _rss()
  bundle = export.load_bundle(path)
  loaded = _rss()
  length = () if bundle.task == export.RANKING else (bundle.max_len,)
  predictor = predictor_lib.make_predictor(bundle, (1,), length or None)
  predictor.warmup(repeats=1)
  ready = _rss()
  print(json.dumps({"load": loaded - before, "ready": ready - before,
                    "weights": int(sum(w.nbytes for w in bundle.weights))}))


def resident(path: str, repeats: int) -> dict[str, float]:
  runs = []
  for _ in range(repeats):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss", path],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ---------------------------------------------------------------------------
# Quality: the exported functions over the test split
# ---------------------------------------------------------------------------


def _calls(paths: dict[str, str]):
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for name, path in paths.items():
    bundle = export.load_bundle(path)
    out[name] = (bundle, jax.jit(bundle.exported.call),
                 tuple(jax.device_put(w) for w in bundle.weights))
  return out


def retrieval_quality(paths: dict[str, str], config, data_dir: str) -> dict:
  """Test metrics of each bundle, top-10 agreement and largest score gap vs the first."""
  calls = _calls(paths)
  data = SequenceData(data_dir, features.TEST, config.eval_batch_size,
                      config.model_config.max_len)
  rule = evaluate.applied_exclusion(config.exclude_history, data)
  metric_step = evaluate.make_metrics_step(KS, rule)
  vocab = config.model_config.vocab_size
  states = {name: {} for name in calls}
  agree, rows, gap, scale = 0.0, 0, 0.0, 0.0
  for step, batch in enumerate(data.batches()):
    b = model_batch(batch)
    keep = batch["weight"] > 0
    tops, fulls = {}, {}
    for name, (bundle, call, weights) in calls.items():
      if bundle.max_k != vocab - features.FIRST_ITEM_ID:
        raise ValueError(f"{bundle.path}: max_k {bundle.max_k} is not every item")
      scores, ids = call(weights, b["history"], b["timestamps"], b["query_timestamps"],
                         np.zeros_like(b["history"]))
      full = np.full((len(keep), vocab), -np.inf, np.float32)
      np.put_along_axis(full, np.asarray(ids), np.asarray(scores), axis=1)
      states[name] = metrics.merge(states[name], metric_step(full, b))
      served = full.copy()
      np.put_along_axis(served, batch["history"], -np.inf, axis=1)  # as a request would
      tops[name] = np.argsort(-served[keep], axis=1, kind="stable")[:, :10]
      fulls[name] = full[keep, features.FIRST_ITEM_ID:]
    first, *others = list(calls)
    for name in others:
      agree += sum(len(set(a) & set(o)) / 10 for a, o in zip(tops[first], tops[name]))
      gap = max(gap, float(np.abs(fulls[name] - fulls[first]).max()))
    scale = max(scale, float(np.abs(fulls[first]).max()))
    rows += int(keep.sum())
    if step % 5 == 0:
      log(f"  test batch {step + 1}: {rows} users")
  out = {name: metrics.compute(s) for name, s in states.items()}
  return {"metrics": out, "top10_agreement": agree / max(rows, 1) / max(len(calls) - 1, 1),
          "max_score_gap": gap, "max_abs_score": scale, "users": rows, "exclusion": rule}


def ranking_quality(paths: dict[str, str], config, data_dir: str) -> dict:
  """Test AUC / log loss of each bundle's probabilities, and the largest gap."""
  calls = _calls(paths)
  data = RankingData(data_dir, features.TEST, config.eval_batch_size)
  states = {name: {} for name in calls}
  gap, rows, first = 0.0, 0, None
  for batch in data.batches():
    keep = batch["weight"] > 0
    probs = {}
    for name, (bundle, call, weights) in calls.items():
      p = np.asarray(call(weights, *[batch[n] for n in bundle.input_names]))[keep]
      probs[name] = p
      states[name] = metrics.binary_merge(states[name], metrics.binary_state(
          p, batch["label"][keep], batch["weight"][keep]))
    first = first or next(iter(probs))
    gap = max([gap] + [float(np.abs(p - probs[first]).max()) for p in probs.values()])
    rows += int(keep.sum())
  return {"metrics": {name: metrics.binary_compute(s) for name, s in states.items()},
          "max_prob_gap": gap, "rows": rows}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def bench_model(name: str, workdir: str, data_dir: str | None, out_root: str,
                rss_repeats: int) -> dict:
  config = configs.TrainConfig.from_dict(load_config_dict(workdir))
  data_dir = data_dir or config.data_dir
  ranking = config.task == export.RANKING
  # retrieval: every item's score (the full ranking); ranking bundles have no k
  max_k = (export.DEFAULT_MAX_K if ranking else
           config.model_config.vocab_size - features.FIRST_ITEM_ID)
  paths, records = {}, {}
  for scheme in export.QUANTIZE:
    path = os.path.join(out_root, f"{name}-{scheme}")
    started = time.perf_counter()
    records[scheme] = export.export_bundle(workdir, path, data_dir=data_dir,
                                           max_k=max_k,
                                           quantize=scheme)
    log(f"{name}: exported {scheme} in {time.perf_counter() - started:.1f} s")
    paths[scheme] = path
  started = time.perf_counter()
  quality = (ranking_quality if ranking else retrieval_quality)(paths, config, data_dir)
  log(f"{name}: test split through both bundles in {time.perf_counter() - started:.1f} s")
  memory = {}
  for scheme, path in paths.items():
    memory[scheme] = resident(path, rss_repeats)
    log(f"{name}: {scheme} resident {memory[scheme]}")
  trainer = {}
  metrics_file = os.path.join(workdir, "metrics.json")
  if os.path.exists(metrics_file):
    with open(metrics_file, encoding="utf-8") as f:
      trainer = json.load(f).get("test", {})
  return {"name": name, "workdir": workdir, "data": data_dir, "ranking": ranking,
          "dim": records[export.INT8]["quantization"]["tables"][0]["dim"],
          "records": records, "disk": {s: dir_bytes(p) for s, p in paths.items()},
          "quality": quality, "memory": memory, "trainer": trainer}


def _mb(n: float) -> str:
  return f"{n / 2**20:.2f} MB"


def _rel(new: float, old: float) -> str:
  return f"{(new - old) / old * 100:+.2f}%"


def report(results: list[dict], skipped: list[str], seconds: float) -> str:
  lines = [
      "# int8 embedding tables: size, memory and quality against float32",
      "",
      f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
      f"{platform.machine()} with {os.cpu_count()} CPU cores, CPU backend "
      f"(`{' '.join(sys.argv)}`, {seconds:.0f} s).",
      "",
      "Scheme (`recml export --quantize int8`, `trainers/quantize.py`): every embedding "
      "table (logical axes (vocab, embed)) stored as int8 with a float16 scale per group "
      "of `rows_per_scale` rows (symmetric, scale = max |x| / 127 rounded up: every value "
      "within half a step), dequantized inside the exported function; all other "
      "parameters float32. `rows_per_scale` is the smallest power of two at which the "
      "table's bytes shrink >= 3.5x: one row for dim >= 14, two rows for dim 10.",
      "",
      "## Size",
      "",
      "| model | tables | dim | rows_per_scale | embedding bytes fp32 | int8 + scales | "
      "ratio | bundle on disk fp32 | int8 | weights held fp32 | int8 |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    q = r["records"][export.INT8]["quantization"]
    sizes = q["embedding_bytes"]
    groups = sorted({t["rows_per_scale"] for t in q["tables"]})
    lines.append(
        f"| {r['name']} | {len(q['tables'])} | {r['dim']} | {', '.join(map(str, groups))} | "
        f"{sizes['float32']:,} | {sizes['stored']:,} | **{sizes['ratio']:.2f}x** "
        f"({'meets' if sizes['ratio'] >= RATIO_TARGET else 'misses'} 3.5x) | "
        f"{_mb(r['disk']['none'])} | {_mb(r['disk']['int8'])} | "
        f"{_mb(r['memory']['none']['weights'])} | {_mb(r['memory']['int8']['weights'])} |")
  lines += [
      "",
      "## Resident memory",
      "",
      "RSS growth of a fresh process after `load_bundle` (load) and after putting the "
      "weights on the device and compiling and running batch 1 (ready); median of the "
      "repeats. The weights held (above) are exact; RSS is coarse. At load the int8 "
      "bundles hold about 1 MB less (SASRec, HSTU). `ready` is dominated by the compiled "
      "code and moved by a few MB, either way, between two runs on this shared 2-core "
      "machine: for tables under 1 MB the saving there is within that noise.",
      "",
      "| model | load fp32 | load int8 | ready fp32 | ready int8 |",
      "|---|---|---|---|---|",
  ]
  for r in results:
    m = r["memory"]
    lines.append(f"| {r['name']} | {_mb(m['none']['load'])} | {_mb(m['int8']['load'])} | "
                 f"{_mb(m['none']['ready'])} | {_mb(m['int8']['ready'])} |")
  lines += ["", "## Quality on the test split (the exported functions)", ""]
  retrieval = [r for r in results if not r["ranking"]]
  if retrieval:
    lines += [
        "Full ranking over every item, the whole history excluded (`history_exclusion` "
        "below), metrics of trainers/metrics.py. Trainer: `metrics.json` of the work "
        "directory (the selected epoch), which the float32 bundle reproduces.",
        "",
        "| model | users | HR@10 trainer | HR@10 fp32 | HR@10 int8 | change | NDCG@10 trainer "
        "| NDCG@10 fp32 | NDCG@10 int8 | change | top-10 agreement | max score gap | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in retrieval:
      q, t = r["quality"], r["trainer"]
      m32, m8 = q["metrics"]["none"], q["metrics"]["int8"]
      ok = all((m32[k] - m8[k]) / m32[k] <= REL_TARGET for k in ("hr@10", "ndcg@10"))
      lines.append(
          f"| {r['name']} | {q['users']} | {t.get('hr@10', float('nan')):.4f} | "
          f"{m32['hr@10']:.4f} | {m8['hr@10']:.4f} | {_rel(m8['hr@10'], m32['hr@10'])} | "
          f"{t.get('ndcg@10', float('nan')):.4f} | {m32['ndcg@10']:.4f} | "
          f"{m8['ndcg@10']:.4f} | {_rel(m8['ndcg@10'], m32['ndcg@10'])} | "
          f"{q['top10_agreement'] * 100:.1f}% | {q['max_score_gap']:.4f} (of "
          f"{q['max_abs_score']:.3f}) | {'met' if ok else 'MISSED'} (<= 0.5% loss) |")
    lines.append("")
    lines.append("History exclusion: " + ", ".join(
        f"{r['name']} `{r['quality']['exclusion']}`" for r in retrieval) + ".")
    lines.append("")
  ranking = [r for r in results if r["ranking"]]
  if ranking:
    lines += [
        "| model | rows | AUC trainer | AUC fp32 | AUC int8 | change | log loss fp32 | "
        "log loss int8 | max probability gap | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ranking:
      q, t = r["quality"], r["trainer"]
      m32, m8 = q["metrics"]["none"], q["metrics"]["int8"]
      ok = m32["auc"] - m8["auc"] <= AUC_TARGET
      lines.append(
          f"| {r['name']} | {q['rows']} | {t.get('auc', float('nan')):.5f} | "
          f"{m32['auc']:.5f} | {m8['auc']:.5f} | {m8['auc'] - m32['auc']:+.6f} | "
          f"{m32['logloss']:.5f} | {m8['logloss']:.5f} | {q['max_prob_gap']:.5f} | "
          f"{'met' if ok else 'MISSED'} (<= 0.001 loss) |")
    lines += ["", "AUC from the bundles' float32 probabilities (the trainer's from logits: "
              "saturated probabilities may tie)."]
  lines += ["", "DCNv2's cross and DNN layers (about 1.5 MB) stay float32, so its bundle "
            "shrinks by the tables' saving only."] if ranking else []
  lines += ["", "Models:"]
  lines += [f"- `{r['name']}`: {r['workdir']} (data {r['data']})" for r in results]
  lines += [f"- not run: {s}" for s in skipped]
  return "\n".join(lines) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", action="append", metavar="NAME=WORKDIR[,DATA]",
                      help="a trained work directory (default: SASRec /tmp/prec/float32, "
                      "the latest runs/ml1m-hstu-* and runs/frappe-dcnv2-* pipeline runs); "
                      "DATA defaults to its config's data_dir")
  parser.add_argument("--rss-repeats", type=int, default=3)
  parser.add_argument("--out", help="bundle folder (default: a temporary one)")
  parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results",
                                                        "int8.md"))
  parser.add_argument("--rss", help=argparse.SUPPRESS)  # child mode
  args = parser.parse_args()
  if args.rss:
    rss_child(args.rss)
    return 0
  models: dict[str, tuple[str | None, str | None]] = {
      k: (v, None) for k, v in default_models().items()}
  if args.model:
    models = {}
    for spec in args.model:
      name, _, rest = spec.partition("=")
      workdir, _, data = rest.partition(",")
      models[name] = (workdir, data or None)
  started = time.perf_counter()
  results, skipped = [], []
  with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
    out_root = args.out or tmp
    for name, (workdir, data) in models.items():
      if not workdir or not os.path.exists(os.path.join(workdir, "config.json")):
        skipped.append(f"{name}: no trained work directory ({workdir})")
        log(f"{name}: skipped, no work directory {workdir}")
        continue
      log(f"{name}: {workdir}")
      results.append(bench_model(name, workdir, data, out_root, args.rss_repeats))
  text = report(results, skipped, time.perf_counter() - started)
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "w", encoding="utf-8") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
