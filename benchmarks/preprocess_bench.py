"""Benchmark of the preprocessing step against a naive Beam + tf.transform pipeline.

Usage (from the repository root)::

    .venv/bin/python benchmarks/preprocess_bench.py            # 3 runs each, writes
                                                               # benchmarks/results/preprocess.md
    .venv/bin/python benchmarks/preprocess_bench.py --runs 5 --datasets ml-100k

Every measurement runs in a fresh subprocess that first imports Beam, TensorFlow
and tf.transform, then times the work alone ("after imports"): wall time, CPU
time (user + system of the process, steadier than wall time on a shared
machine), events/s, and peak resident memory (``ru_maxrss``) both in total and
above the post-import baseline. Medians over ``--runs``. The naive baseline is
measured in the same session: ReadFromText -> parse to dicts -> tf.transform
AnalyzeAndTransformDataset on instance dicts (item and user vocabularies) ->
GroupByKey per user -> ``features.user_examples`` -> WriteToTFRecord, all on
the DirectRunner in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = {
    "ml-1m-partial": "ml-1m-partial",
    "ml-100k": "ml-100k",
}
RESULTS = os.path.join(ROOT, "benchmarks", "results", "preprocess.md")


def _shared_datasets() -> str:
  return os.path.join(os.path.dirname(ROOT), "shared", "datasets")


# ---------------------------------------------------------------------------
# The naive pipeline (baseline)
# ---------------------------------------------------------------------------


def naive_pipeline(input_path: str, output_dir: str, max_len: int = 200) -> int:
  """Per-element Beam + tf.transform: what a first implementation looks like."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
  import tensorflow_transform.beam as tft_beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils  # pylint: disable=g-import-not-at-top
  from components.preprocess import sources  # pylint: disable=g-import-not-at-top
  from trainers import features  # pylint: disable=g-import-not-at-top

  path = sources.resolve_input(input_path)[0][0]
  sep = "::" if path.endswith((".dat", ".dat.gz")) else "\t"

  def parse(line):
    u, i, _, t = line.split(sep)
    return {"user": u, "item": i, "timestamp": int(t)}

  metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec({
      "user": tf.io.FixedLenFeature([], tf.string),
      "item": tf.io.FixedLenFeature([], tf.string),
      "timestamp": tf.io.FixedLenFeature([], tf.int64)}))

  def preprocessing_fn(inputs):
    return {"item_id": tft.compute_and_apply_vocabulary(inputs["item"]) + 2,
            "user_id": tft.compute_and_apply_vocabulary(inputs["user"]),
            "timestamp": tf.identity(inputs["timestamp"])}

  def examples(kv):
    user, events = kv
    events = sorted(events)
    yield from features.user_examples(int(user), [e[1] for e in events],
                                      [e[0] for e in events], max_len)

  options = PipelineOptions(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
  with beam.Pipeline(options=options) as p:
    with tft_beam.Context(temp_dir=os.path.join(output_dir, "tmp")):
      rows = (p | beam.io.ReadFromText(path) | beam.Map(parse))
      (transformed, _), transform_fn = (
          (rows, metadata) | tft_beam.AnalyzeAndTransformDataset(preprocessing_fn))
      _ = transform_fn | tft_beam.WriteTransformFn(output_dir)
    recs = (transformed
            | beam.Map(lambda d: (int(d["user_id"]), (int(d["timestamp"]), int(d["item_id"]))))
            | beam.GroupByKey()
            | beam.FlatMap(examples))
    for split in features.SPLITS:
      _ = (recs | f"Only{split}" >> beam.Filter(lambda kv, s=split: kv[0] == s)
           | f"Bytes{split}" >> beam.Map(lambda kv: kv[1])
           | f"Write{split}" >> beam.io.WriteToTFRecord(
               os.path.join(output_dir, split, "part"), file_name_suffix=".tfrecord.gz"))
  return 0


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def _child(impl: str, input_path: str, output_dir: str) -> None:
  import resource  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  import apache_beam  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import tensorflow_transform.beam  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from components.preprocess import run, sources  # pylint: disable=g-import-not-at-top
  # Importing the runner's worker modules is part of imports too.
  import apache_beam.runners.portability.fn_api_runner  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  sources.resolve_input(input_path)
  t0, c0 = time.perf_counter(), time.process_time()
  if impl == "recml":
    events = run(input_path, output_dir).counts["rows_read"]
  else:
    naive_pipeline(input_path, output_dir)
    events = None
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "events": events,
                                "peak_mb": peak / 1024, "peak_above_imports_mb":
                                (peak - base_rss) / 1024}))


def measure(impl: str, input_path: str) -> dict:
  out = tempfile.mkdtemp(prefix=f"bench_{impl}_")
  try:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", impl, input_path, out],
        cwd=ROOT, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
      if line.startswith("RESULT "):
        return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{impl} on {input_path} failed:\n{proc.stderr[-3000:]}")
  finally:
    shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
  parser.add_argument("--data-root", default=_shared_datasets())
  parser.add_argument("--no-naive", action="store_true", help="skip the baseline")
  parser.add_argument("--output", default=RESULTS, help="markdown file to (re)write")
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _child(*args.child)
    return 0

  impls = ["recml"] + ([] if args.no_naive else ["naive"])
  rows = []
  medians: dict[tuple[str, str], dict] = {}
  for name in args.datasets:
    path = os.path.join(args.data_root, DATASETS.get(name, name))
    if not os.path.exists(path):
      print(f"skip {name}: {path} not found", file=sys.stderr)
      continue
    events = None
    for impl in impls:
      results = []
      for i in range(args.runs):
        r = measure(impl, path)
        results.append(r)
        events = r["events"] or events
        print(f"{name} {impl} run {i + 1}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s "
              f"peak {r['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
      med = {k: statistics.median(r[k] for r in results)
             for k in ("wall", "cpu", "peak_mb", "peak_above_imports_mb")}
      med["walls"] = [r["wall"] for r in results]
      medians[(name, impl)] = med
    for impl in impls:
      med = medians[(name, impl)]
      naive = medians.get((name, "naive"))
      ratio = (f"{naive['wall'] / med['wall']:.2f}x" if naive and impl == "recml" else "")
      rows.append(
          f"| {name} | {impl} | {events:,} | {med['wall']:.2f} | {med['cpu']:.2f} | "
          f"{events / med['wall']:,.0f} | {med['peak_mb']:.0f} | "
          f"{med['peak_above_imports_mb']:.0f} | {ratio} |")

  header = (
      "| dataset | pipeline | events | wall s (median) | CPU s | events/s (wall) | "
      "peak RSS MB | peak above imports MB | speed-up vs naive |\n"
      "|---|---|---:|---:|---:|---:|---:|---:|---:|")
  table = header + "\n" + "\n".join(rows)
  machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
             "jobs while measuring), Python " + platform.python_version())
  doc = (
      "# Preprocessing benchmark\n\n"
      "Made by `benchmarks/preprocess_bench.py` (`make bench`). Times are after imports, "
      f"medians of {args.runs} runs, each in a fresh process; DirectRunner in memory, "
      "one worker. `naive` is the per-element Beam + tf.transform pipeline in the "
      "script (ReadFromText, instance dicts, GroupByKey per event), measured in the "
      "same session.\n\n"
      f"Machine: {machine}. Measured {time.strftime('%Y-%m-%d')}.\n\n" + table + "\n")
  print(table)
  if args.output:
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    notes = ""
    if os.path.exists(args.output):
      with open(args.output, encoding="utf-8") as f:
        old = f.read()
      marker = "\n## Notes"
      if marker in old:
        notes = old[old.index(marker):]
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(doc + notes)
  return 0


if __name__ == "__main__":
  sys.exit(main())
