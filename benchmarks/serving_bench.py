"""Load test of `recml serve` on loopback: QPS and p50/p99 latency vs a naive server.

For each bundle, starts `recml serve --bundle B` (micro-batched) and `recml serve --naive`
(one request at a time, the baseline) on 127.0.0.1, waits for the health route, and
drives each with a load generator in a separate process (aiohttp client, closed loop:
C workers, each sends its next request when the previous one is answered) at every
concurrency level. Bounded: at most --requests requests and --seconds seconds per level,
after --warmup requests that are not measured.

Requests are real MovieLens histories: each user's most recent ratings (raw movie ids and
timestamps, oldest first, up to the bundle's max_len), k=10, history excluded.

    .venv/bin/python benchmarks/serving_bench.py \
        --bundle sasrec=/tmp/bundles/sasrec --bundle hstu=/tmp/bundles/hstu \
        --ratings ../shared/datasets/ml-1m-partial/ratings_users1-2999.dat.gz \
        --output benchmarks/results/serving.md
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def histories(ratings: str, max_len: int, limit: int = 2000) -> list[dict]:
  """``user::item::rating::ts`` lines -> instances with items and timestamps, oldest first."""
  users: dict[str, list[tuple[int, int]]] = {}
  opener = gzip.open if ratings.endswith(".gz") else open
  with opener(ratings, "rt", encoding="latin-1") as f:
    for line in f:
      user, item, _, ts = line.strip().split("::")
      users.setdefault(user, []).append((int(ts), int(item)))
  out = []
  for events in list(users.values())[:limit]:
    events.sort()
    events = events[-max_len:]
    out.append({"items": [i for _, i in events], "timestamps": [t for t, _ in events],
                "query_timestamp": events[-1][0] + 60, "k": 10})
  return out


# ---------------------------------------------------------------------------
# Load generator (runs in its own process: `serving_bench.py load ...`)
# ---------------------------------------------------------------------------


def _request_bytes(host: str, path: str, body: bytes) -> bytes:
  return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _load(url: str, bodies: list[bytes], concurrency: int, requests: int,
                seconds: float, warmup: int) -> dict:
  """Closed loop over keep-alive HTTP/1.1 connections, one per client.

  Raw asyncio streams on uvloop with pre-built request bytes: the generator shares the
  server's two cores, so it must cost little per request (an aiohttp client cost about
  0.3 ms of CPU per request, as much as the server's own parsing).
  """
  parsed = urllib.parse.urlsplit(url)
  host, port = parsed.hostname, parsed.port
  requests_bytes = [_request_bytes(parsed.netloc, parsed.path, b) for b in bodies]
  latencies: list[float] = []
  errors = 0
  counter = iter(range(requests))

  async def one(reader, writer, i: int) -> float:
    nonlocal errors
    t = time.perf_counter()
    writer.write(requests_bytes[i % len(requests_bytes)])
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
      name, _, value = line.partition(b":")
      if name.strip().lower() == b"content-length":
        length = int(value)
    await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
      errors += 1
    return time.perf_counter() - t

  ready = 0
  all_ready, go = asyncio.Event(), asyncio.Event()
  deadline = float("inf")

  async def client(k: int) -> None:
    nonlocal ready
    try:
      reader, writer = await asyncio.open_connection(host, port)
      for i in range(k, warmup, concurrency):  # connections opened, caches warm
        await one(reader, writer, i)
    finally:  # a client that failed must not leave the others waiting
      ready += 1
      if ready == concurrency:
        all_ready.set()
    try:
      await go.wait()
      for i in counter:
        if time.perf_counter() > deadline:
          return
        latencies.append(await one(reader, writer, i))
    finally:
      writer.close()

  tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
  await all_ready.wait()
  errors = 0  # warm-up answers do not count
  start = time.perf_counter()
  deadline = start + seconds
  go.set()
  await asyncio.gather(*tasks)
  elapsed = time.perf_counter() - start
  latencies.sort()
  n = len(latencies)
  pct = lambda q: latencies[min(n - 1, int(q * n))] * 1000  # noqa: E731
  return {"concurrency": concurrency, "requests": n, "errors": errors, "seconds": elapsed,
          "qps": n / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def cmd_load(args) -> None:
  with open(args.bodies, encoding="utf-8") as f:
    bodies = [line.encode() for line in f.read().splitlines()]
  import uvloop  # pylint: disable=g-import-not-at-top
  result = uvloop.run(_load(args.url, bodies, args.concurrency, args.requests, args.seconds,
                            args.warmup))
  print(json.dumps(result))


# ---------------------------------------------------------------------------
# Device ceiling (runs in its own process: `serving_bench.py ceiling ...`)
# ---------------------------------------------------------------------------


def cmd_ceiling(args) -> None:
  """Rows/s of the model alone (no HTTP, one XLA thread, as `recml serve`): each request
  as its own call (what the naive server does per request) and 32 requests per call (a
  full micro-batch, length-grouped by the server's plan). Their ratio bounds what
  batching can give on this machine, whatever the HTTP layer costs."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                             "=false intra_op_parallelism_threads=1").strip()
  sys.path.insert(0, REPO)
  from serving import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from serving import protocol  # pylint: disable=g-import-not-at-top
  from trainers import export  # pylint: disable=g-import-not-at-top
  bundle = export.load_bundle(args.bundle)
  predictor = predictor_lib.Predictor(bundle, (1, 2, 4, 8, 16, 32))
  predictor.warmup()
  with open(args.bodies, encoding="utf-8") as f:
    rows = [protocol.parse_body(line.encode(), bundle, protocol.Limits())[0]
            for line in f.read().splitlines()[:args.rows]]
  result = {}
  for size in (1, 32):
    times = []
    for _ in range(args.repeats):
      started = time.perf_counter()
      for i in range(0, len(rows), size):
        predictor_lib.run_rows(predictor, rows[i:i + size])
      times.append(time.perf_counter() - started)
    result[f"rows_per_s_batch{size}"] = len(rows) / sorted(times)[len(times) // 2]
  print(json.dumps(result))


def device_ceiling(bundle: str, bodies_file: str) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "ceiling", "--bundle", bundle,
                        "--bodies", bodies_file], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_ready(port: int, proc, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"server exited with {proc.returncode}")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
        if r.status == 200:
          return
    except OSError:
      pass
    time.sleep(0.5)
  raise TimeoutError("server not ready")


def run_server(bundle: str, naive: bool, levels, bodies_file: str, args) -> list[dict]:
  port = _free_port()
  cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--bundle", bundle, "--port", str(port),
         "--host", "127.0.0.1", "--max-batch", str(args.max_batch)] + (["--naive"] if naive else [])
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_ready(port, proc)
    results = []
    for c in levels:
      runs = []
      for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "load", "--url",
             f"http://127.0.0.1:{port}/predict", "--bodies", bodies_file, "--concurrency",
             str(c), "--requests", str(args.requests), "--seconds", str(args.seconds),
             "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout))
        print(("naive  " if naive else "batched"), json.dumps(runs[-1]), flush=True)
      median = lambda key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
      results.append({"concurrency": c, "runs": len(runs),
                      "requests": sum(r["requests"] for r in runs),
                      "errors": sum(r["errors"] for r in runs),
                      **{k: median(k) for k in ("qps", "p50_ms", "p99_ms")}})
    return results
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def table(rows: list[dict]) -> str:
  lines = ["| model | server | concurrency | requests (all runs) | QPS | p50 ms | p99 ms | errors "
           "| QPS vs naive |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  naive = {(r["model"], r["concurrency"]): r["qps"] for r in rows if r["server"] == "naive"}
  for r in rows:
    ratio = r["qps"] / naive[(r["model"], r["concurrency"])]
    lines.append(f"| {r['model']} | {r['server']} | {r['concurrency']} | {r['requests']} | "
                 f"{r['qps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | "
                 f"{ratio:.2f}x |")
  return "\n".join(lines)


def ceiling_table(ceilings: dict, rows: list[dict]) -> str:
  lines = ["| model | model alone, 1 request per call (rows/s) | model alone, 32 per call "
           "(rows/s) | batching gain, model alone | naive server QPS at c=32 | "
           "batched QPS at c=32 if HTTP were free | that / naive |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, c in ceilings.items():
    naive = [r["qps"] for r in rows if r["model"] == name and r["server"] == "naive"
             and r["concurrency"] == 32]
    naive_qps = naive[0] if naive else float("nan")
    b1, b32 = c["rows_per_s_batch1"], c["rows_per_s_batch32"]
    lines.append(f"| {name} | {b1:.0f} | {b32:.0f} | {b32 / b1:.2f}x | {naive_qps:.0f} | "
                 f"{b32:.0f} | {b32 / naive_qps:.2f}x |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="cmd")
  load = sub.add_parser("load")
  load.add_argument("--url", required=True)
  load.add_argument("--bodies", required=True)
  load.add_argument("--concurrency", type=int, required=True)
  load.add_argument("--requests", type=int, default=2000)
  load.add_argument("--seconds", type=float, default=20)
  load.add_argument("--warmup", type=int, default=20)
  ceiling = sub.add_parser("ceiling")
  ceiling.add_argument("--bundle", required=True)
  ceiling.add_argument("--bodies", required=True)
  ceiling.add_argument("--rows", type=int, default=640)
  ceiling.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR")
  parser.add_argument("--ratings", default=os.path.join(
      REPO, "..", "shared", "datasets", "ml-1m-partial", "ratings_users1-2999.dat.gz"))
  parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--requests", type=int, default=2000, help="per level (bound)")
  parser.add_argument("--seconds", type=float, default=15, help="per level (bound)")
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--max-batch", type=int, default=32)
  parser.add_argument("--runs", type=int, default=3, help="runs per level; medians reported")
  parser.add_argument("--output", help="markdown file to write")
  args = parser.parse_args(argv)
  if args.cmd == "load":
    cmd_load(args)
    return 0
  if args.cmd == "ceiling":
    cmd_ceiling(args)
    return 0
  rows, ceilings = [], {}
  import tempfile  # pylint: disable=g-import-not-at-top
  for spec in args.bundle:
    name, _, bundle = spec.partition("=")
    with open(os.path.join(bundle, "bundle.json"), encoding="utf-8") as f:
      max_len = json.load(f)["max_len"]
    insts = histories(args.ratings, max_len)
    random.Random(0).shuffle(insts)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
      for inst in insts:
        f.write(json.dumps({"instances": [inst]}) + "\n")
      bodies_file = f.name
    for naive in (True, False):
      for r in run_server(bundle, naive, args.concurrency, bodies_file, args):
        rows.append({"model": name, "server": "naive" if naive else "batched", **r})
    ceilings[name] = device_ceiling(bundle, bodies_file)
    print("ceiling", name, json.dumps(ceilings[name]), flush=True)
    os.unlink(bodies_file)
  md = table(rows) + "\n\n" + ceiling_table(ceilings, rows)
  print(md)
  if args.output:
    lengths = [len(i["items"]) for i in histories(args.ratings, 10**9)]
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(RESULT_HEADER.format(
          machine=f"{platform.machine()}, {os.cpu_count()} cores, load average "
                  f"{os.getloadavg()[0]:.1f} at the end",
          date=time.strftime("%Y-%m-%d"), requests=args.requests, seconds=args.seconds,
          warmup=args.warmup, max_batch=args.max_batch, runs=args.runs,
          median_len=sorted(lengths)[len(lengths) // 2]))
      f.write(md + "\n")
  return 0


RESULT_HEADER = """# Serving benchmark (`benchmarks/serving_bench.py`)

Machine: {machine}; {date}. Server and load generator on 127.0.0.1, each its own
process. Medians of {runs} runs per level. Closed loop: C concurrent clients on keep-alive connections, each sends its next
request when the previous one is answered (raw asyncio streams on uvloop, about 0.05 ms
of CPU per request); per level at most {requests} requests or {seconds:.0f} s, after {warmup}
unmeasured warm-up requests. One instance per request: a real ml-1m-partial user history
(raw movie ids + timestamps, up to max_len 200; median user {median_len} ratings; 16% of
the requests fit length 32, 23% 64, 23% 128, 39% need 200), k=10, history excluded.
`naive` = `recml serve --naive`: one request at a time in the server process (batch of 1,
the device call blocks the event loop; same bundle and length buckets). `batched` =
`recml serve --max-batch {max_batch}`: micro-batching in a device process, rows grouped by
length bucket, calls planned from the costs measured at warm-up. Bundles: ml-1m-partial,
2 epochs (latency does not depend on quality), exported with the last-position-only
final block and a symbolic history length.

The second table runs the model alone (no HTTP, one XLA thread, the real requests): as
one call per request, and 32 requests per call. Its last column is what the batched
server would reach if parsing and answering HTTP cost nothing and ran elsewhere.

"""

if __name__ == "__main__":
  sys.exit(main())
