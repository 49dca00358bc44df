"""Fault drills: bad input, killed runs, killed and unloadable servers, racing writers.

Each drill injects a real fault (garbage rows in a real file, SIGKILL, flipped bytes,
concurrent writers) and measures what was lost and how long recovery took. The table
goes to benchmarks/results/reliability.md.

    .venv/bin/python benchmarks/reliability_bench.py                 # every drill, ~6 min
    .venv/bin/python benchmarks/reliability_bench.py --drills serving store

Drills:
* ``preprocess``: ml-100k rows with 5% garbage of every kind (non-numeric and 26-digit ids,
  timestamps above 2^63, negative, non-numeric, millisecond rows among seconds, ...):
  rows quarantined vs injected, clean rows lost, users/items vs a plain-Python reference.
* ``resume``: ``recml run`` (ml100k_smoke, 4 epochs) SIGKILLed after the first training
  checkpoint, then ``recml run --resume``; its test metrics against an uninterrupted
  training on the same dataset.
* ``serving``: ``recml serve`` on a missing and on a corrupt bundle (exit code, seconds to
  exit); the device process SIGKILLed under load (seconds until ready, statuses seen);
  a 2,000-request fuzz plus load (statuses; 5xx must be 0).
* ``store``: 8 threads and 4 processes writing the same run's metrics to one DuckDB
  file; rows per key (must be 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ML100K = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "ml-100k")
DRILLS = ("preprocess", "resume", "serving", "store")


def drill_preprocess(work: str) -> list[list[str]]:
  from tests.reliability.test_preprocess_faults import measure_faults  # pylint: disable=g-import-not-at-top
  m = measure_faults(os.path.join(work, "preprocess"), rows=10_000, fraction=0.05)
  kinds = ", ".join(f"{k} {n}" for k, n in sorted(m["injected_by_kind"].items()))
  return [
      ["preprocess: garbage rows", f"{m['injected']} of {m['rows']} rows ({kinds})",
       f"quarantined {m['quarantined']} / injected {m['injected']}; clean rows lost "
       f"{m['lost']}; users {m['users']} (reference {m['users_expected']}), items "
       f"{m['items']} (reference {m['items_expected']})", f"{m['seconds']:.1f} s step"],
  ]


def drill_resume(work: str) -> list[list[str]]:
  from components import train as train_step  # pylint: disable=g-import-not-at-top
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  from tests.reliability import run_drills  # pylint: disable=g-import-not-at-top
  root, run_id = os.path.join(work, "runs"), "drill-killed"
  killed = run_drills.kill_during_training(root, run_id, ML100K, ["--set", "train.epochs=4"],
                                           os.path.join(work, "killed.log"))
  status = local_lib.run_status(local_lib.read_manifest(os.path.join(root, run_id)),
                                os.path.join(root, run_id))
  status = f"{status['status']} ({status.get('status_detail', '')})"
  resumed = run_drills.resume(root, run_id)
  if resumed["returncode"] != 0:
    raise RuntimeError(resumed["output"][-3000:])
  info = local_lib.lineage(os.path.join(root, run_id))
  steps = {s["step"]: s for s in info["steps"]}
  dataset = steps["preprocess"]["outputs"]["dataset"]["uri"]
  with open(os.path.join(steps["train"]["outputs"]["model"]["uri"], "metrics.json"),
            encoding="utf-8") as f:
    got = json.load(f)["test"]
  params = info["run"]["parameters"]
  started = time.time()
  want = train_step.run(dataset, os.path.join(work, "uninterrupted"), params["model"],
                        params["train_overrides"])["metrics"]["test"]
  reference_seconds = time.time() - started
  diff = max(abs(got[k] - want[k]) for k in want)
  reused = sorted(s for s, how in resumed["steps"].items() if how.startswith("reused"))
  return [
      ["run killed in training (SIGKILL)", f"after {killed['seconds']:.1f} s",
       f"`runs list`: {status}", "-"],
      ["`recml run --resume`", f"reused: {', '.join(reused)}; train: "
       f"{resumed['steps'].get('train', '?').split(' of ')[0]})",
       f"test metrics vs uninterrupted training: max |diff| {diff:.1e} over {len(want)}",
       f"{resumed['seconds']:.1f} s (uninterrupted train step alone: "
       f"{reference_seconds:.1f} s)"],
  ]


def _exit_drill(bundle: str, log: str) -> tuple[int, float, str]:
  from tests.reliability.test_serving_faults import CliServer  # pylint: disable=g-import-not-at-top
  started = time.monotonic()
  server = CliServer(bundle, log)
  code = server.proc.wait(120)
  lines = [l for l in server.read_log().splitlines() if l.strip()]
  reason = (lines[-1] if lines else "").replace(os.path.dirname(bundle) + os.sep, "")
  return code, time.monotonic() - started, reason[:110]


def drill_serving(work: str, kills: int = 3) -> list[list[str]]:
  # pylint: disable=g-import-not-at-top
  from tests.reliability.serving_drills import fuzz_and_load, kill_drill
  from tests.reliability.test_serving_faults import CliServer, K, MAX_BODY, raw_ids
  from tests.serving.conftest import MAX_LEN, export_tiny, train_tiny, write_dataset
  # pylint: enable=g-import-not-at-top
  data = write_dataset(os.path.join(work, "serve-data"))
  model = train_tiny(data, os.path.join(work, "serve-hstu"), "hstu")
  bundle = export_tiny(model, data, os.path.join(work, "bundle"))
  rows = []
  code, seconds, reason = _exit_drill(os.path.join(work, "no-bundle"),
                                      os.path.join(work, "missing.log"))
  rows.append(["serve a missing bundle", "path does not exist",
               f"exit {code}: {reason}", f"{seconds:.1f} s to exit"])
  corrupt = os.path.join(work, "corrupt")
  shutil.copytree(bundle, corrupt)
  with open(os.path.join(corrupt, "weights.npz"), "r+b") as f:
    f.seek(os.path.getsize(f.name) // 2)
    f.write(b"\xff" * 16)
  code, seconds, reason = _exit_drill(corrupt, os.path.join(work, "corrupt.log"))
  rows.append(["serve a corrupt bundle", "16 bytes of weights.npz flipped",
               f"exit {code}: {reason}", f"{seconds:.1f} s to exit"])

  server = CliServer(bundle, os.path.join(work, "serve.log"), max_restarts=kills + 1)
  try:
    server.wait_ready()
    ids = raw_ids(data)
    body = {"instances": [{"items": ids[:5], "k": K}, {"items": ids[10:12], "k": 5}]}
    recovery, statuses, after = [], {}, {}
    for _ in range(kills):
      drill = kill_drill(server.url, body)
      recovery.append(drill["recovery_seconds"])
      for code, n in drill["status"].items():
        statuses[code] = statuses.get(code, 0) + n
      code, _ = server.post(body)
      after[code] = after.get(code, 0) + 1
    rows.append(["device process SIGKILLed under load", f"{kills} kills, 3 clients posting",
                 f"statuses from the kill until ready: {_codes(statuses)}; first request "
                 f"after ready: {_codes(after)}",
                 f"ready again after {statistics.median(recovery):.1f} s (median; "
                 f"{', '.join(f'{r:.1f}' for r in recovery)})"])
    report = fuzz_and_load(server.url, ids, MAX_LEN, K, MAX_BODY, n=2000, concurrency=16)
    fives = sum(n for code, n in report["status"].items() if code >= 500 or code == 0)
    rows.append(["fuzz + load, concurrency 16", f"{report['requests']} requests, "
                 f"{len(report['by_kind'])} kinds", f"{_codes(report['status'])}; 5xx or "
                 f"no answer: {fives}; unexpected: {report['unexpected']}",
                 f"{report['rps']:.0f} req/s, p50 {report['p50_ms']} ms, "
                 f"p99 {report['p99_ms']} ms"])
  finally:
    if server.proc.poll() is None:
      server.stop()
  return rows


def _codes(status) -> str:
  return ", ".join(f"{code}: {n}" for code, n in sorted(status.items()))


def drill_store(work: str) -> list[list[str]]:
  import duckdb  # pylint: disable=g-import-not-at-top
  from tests.reliability import test_data_identity as identity  # pylint: disable=g-import-not-at-top
  from components import metrics_store  # pylint: disable=g-import-not-at-top
  path = os.path.join(work, "store", "metrics.duckdb")
  uri, go = f"duckdb:///{path}", os.path.join(work, "go")
  env = {**os.environ, "PYTHONPATH": ROOT}
  procs = [subprocess.Popen([sys.executable, "-c", identity.PROCESS_WRITER.format(repo=ROOT),
                             uri, str(100 + p), go], env=env) for p in range(4)]
  while len([f for f in os.listdir(work) if f.startswith("go.ready.")]) < len(procs):
    time.sleep(0.01)
  started = time.monotonic()
  open(go, "w", encoding="utf-8").close()
  threads = [threading.Thread(target=lambda w=w: [
      metrics_store.open_store(uri).write(identity.rows_of(w, r))
      for r in range(identity.ROUNDS)]) for w in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  codes = [p.wait() for p in procs]
  seconds = time.monotonic() - started
  con = duckdb.connect(path, read_only=True)
  counts = [c for (c,) in con.execute(
      "SELECT count(*) FROM metrics GROUP BY run_id, split, metric, k").fetchall()]
  con.close()
  writes = 12 * identity.ROUNDS
  return [["metrics store: 8 threads + 4 processes", f"{writes} writes of the same "
           f"{len(identity.KEYS)} keys (exit codes {sorted(set(codes))})",
           f"{len(counts)} keys, rows per key: max {max(counts)}, duplicates "
           f"{sum(counts) - len(counts)}", f"{seconds:.1f} s"]]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--drills", nargs="+", choices=DRILLS, default=list(DRILLS))
  parser.add_argument("--kills", type=int, default=3, help="device-process kills (median)")
  parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results",
                                                        "reliability.md"))
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory(prefix="recml-drills-") as work:
    for name in args.drills:
      started = time.time()
      print(f"drill {name} ...", file=sys.stderr, flush=True)
      folder = os.path.join(work, name)
      os.makedirs(folder)
      rows += (drill_serving(folder, args.kills) if name == "serving"
               else globals()[f"drill_{name}"](folder))
      print(f"drill {name}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
  revision = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
  lines = [
      "# Reliability drills", "",
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, revision "
      f"`{revision}`, {platform.machine()}, {os.cpu_count()} CPU cores; "
      f"`{' '.join(['benchmarks/reliability_bench.py', *sys.argv[1:]])}`", "",
      "| drill | fault injected | outcome | time |", "|---|---|---|---|",
      *[f"| {' | '.join(r)} |" for r in rows], "",
      "While the device process is down, requests get 503 with `Retry-After` (by design: "
      "the client retries); the few 200s in that window were batches already computed "
      "when the kill landed. 5xx in the fuzz row counts every status >= 500 and every "
      "request with no HTTP answer. Rows lost = clean rows of the input missing from "
      "the dataset (a plain-Python reference of the clean rows), must be 0.", ""]
  text = "\n".join(lines)
  print(text)
  with open(args.results, "w", encoding="utf-8") as f:
    f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
