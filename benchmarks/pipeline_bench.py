"""Wall time per step of the local pipeline (the README's main job).

Runs `recml run` (or reads the log of a run already made with `--from-log`), takes the
start and end of every task from kfp.local's log lines, and writes a table to
benchmarks/results/pipeline.md with the run's headline metrics.

    .venv/bin/python benchmarks/pipeline_bench.py --config ml1m_hstu --data ../shared/datasets/ml-1m-partial
    make run DATA=../shared/datasets/ml-1m-partial > run.log; .venv/bin/python benchmarks/pipeline_bench.py --from-log run.log
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
START = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - Executing task '([^']+)'")
END = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - Task '([^']+)' finished with status (\w+)")


def _seconds(stamp: str) -> float:
  h, m, s = stamp.split(":")
  return int(h) * 3600 + int(m) * 60 + float(s)


def step_times(lines) -> list[tuple[str, float, str]]:
  """``(task, wall seconds, status)`` in order of completion."""
  started, out = {}, []
  for raw in lines:
    line = ANSI.sub("", raw.strip())
    if m := START.match(line):
      started[m.group(2)] = _seconds(m.group(1))
    elif m := END.match(line):
      t0 = started.get(m.group(2))
      if t0 is not None:
        out.append((m.group(2), (_seconds(m.group(1)) - t0) % 86400, m.group(3)))
  return out


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
  steps = step_times(lines)
  summary = [ANSI.sub("", l.rstrip()) for l in lines
             if re.match(r"^(run id:|  \S+/\S+ +\d|  gate:|report:)", ANSI.sub("", l))]
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
