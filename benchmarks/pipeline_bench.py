"""Wall time per step of the local pipeline (the README's main job).

Runs `recml run` (or reads the output of a run already made with `--from-log`), takes
every step's wall time and state from the run's record (`runs/<run id>/run.json`, its
`steps`), and writes a table to benchmarks/results/pipeline.md with the run's summary.

    .venv/bin/python benchmarks/pipeline_bench.py --config ml1m_hstu --data ../shared/datasets/ml-1m-partial
    make run DATA=../shared/datasets/ml-1m-partial > run.log; .venv/bin/python benchmarks/pipeline_bench.py --from-log run.log
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RUN_ID = re.compile(r"^run id: (\S+)")
SUMMARY = re.compile(r"^(run \S+: |  test |  valid |gate: |deployed: |report: )")


def step_times(lines, root: str = os.path.join(ROOT, "runs")) -> list[tuple[str, float, str]]:
  """``(task, wall seconds, state)`` of the run whose output ``lines`` are, in run order."""
  run_id = next((m.group(1) for m in map(RUN_ID.match, lines) if m), None)
  if run_id is None:
    raise ValueError("no 'run id:' line in the output")
  with open(os.path.join(root, run_id, "run.json"), encoding="utf-8") as f:
    steps = json.load(f).get("steps") or {}
  return [(name, s["seconds"], s["state"]) for name, s in steps.items()
          if isinstance(s.get("seconds"), (int, float))]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="ml1m_hstu")
  parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared",
                                                     "datasets", "ml-1m-partial"))
  parser.add_argument("--from-log", help="parse the output of a finished `recml run`")
  parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results",
                                                        "pipeline.md"))
  args = parser.parse_args()
  if args.from_log:
    with open(args.from_log, encoding="utf-8", errors="replace") as f:
      lines = f.readlines()
    command = f"(parsed from {os.path.basename(args.from_log)})"
  else:
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--config", args.config,
           "--data", args.data]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode:
      print("\n".join(lines[-40:]), file=sys.stderr)
      return proc.returncode
    command = " ".join(["recml", *cmd[3:]])
  lines = [ANSI.sub("", l.rstrip()) for l in lines]
  steps = step_times(lines)
  summary = [l for l in lines if SUMMARY.match(l)]
  total = sum(s for _, s, _ in steps)
  table = [
      "# Local pipeline: wall time per step",
      "",
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
      f"{os.cpu_count()} CPU cores; {command}",
      "",
      "| step | wall s | status |",
      "|---|---|---|",
      *[f"| {name} | {sec:.1f} | {status} |" for name, sec, status in steps],
      f"| **total** | **{total:.1f}** | |",
      "",
      "```",
      *summary,
      "```",
      "",
  ]
  text = "\n".join(table)
  print(text)
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "w", encoding="utf-8") as f:
    f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
