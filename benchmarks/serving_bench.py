"""Load test of `recml serve` on loopback: naive, single-worker and multi-worker servers.

For each bundle, on 127.0.0.1 and side by side in one run:

- three servers, each driven at every concurrency level by a load generator in separate
  processes (closed loop: C clients on keep-alive connections, each sends its next
  request when the previous one is answered; bounded by --requests and --seconds per
  level, after unmeasured warm-up requests), medians of --runs runs per level:
  `recml serve --naive` (one request at a time, the baseline), `--workers 1` (the
  micro-batched single-worker server) and the multi-worker server (`--workers N`, or
  `recml serve`'s own default without --workers);
- the model alone (no HTTP, `recml serve`'s XLA flags, the same requests) at 1 and 32
  requests per call, on every core: the ceiling each server's QPS at c=32 is compared
  with; and at 32 per call on one core, the share `recml serve` gives its device process
  (shown, not a target);
- start-up of the multi-worker server, process start to the first 200 of /health: cold
  (an empty `--compile-cache` folder) and warm (the same folder again).

The table states the machine, the load average and, per target, met or not met.
Requests are real MovieLens histories: each user's most recent ratings (raw movie ids
and timestamps, oldest first, up to the bundle's max_len), k=10, history excluded.

    .venv/bin/python benchmarks/serving_bench.py \
        --bundle sasrec=/tmp/bundles/sasrec --bundle hstu=/tmp/bundles/hstu \
        --ratings ../shared/datasets/ml-1m-partial/ratings_users1-2999.dat.gz \
        --output benchmarks/results/serving.md

`--quick` checks the script end to end in a few minutes (first bundle, c=1 and 32, one
short run per level); its numbers are not for the results file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVERS = ("naive", "batched", "multi")  # the three servers, in the tables' order
CEILING_BATCH = 32
TARGETS = {"ceiling_fraction": 0.80, "p99_ms": 50.0, "p50_ms_c1": 5.0, "warm_start_s": 10.0,
           "gpu_ceiling_fraction_c128": 0.50}


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
# Load generator (runs in its own processes: `serving_bench.py load ...`)
# ---------------------------------------------------------------------------


def _request_bytes(host: str, path: str, body: bytes) -> bytes:
  return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _load(url: str, bodies: list[bytes], concurrency: int, requests: int,
                seconds: float, warmup: int, sync: bool = False) -> dict:
  """Closed loop over keep-alive HTTP/1.1 connections, one per client.

  Raw asyncio streams on uvloop with pre-built request bytes: the generator shares the
  server's cores, so it must cost little per request (an aiohttp client cost about
  0.3 ms of CPU per request, as much as the server's own parsing). Every client opens its
  connection and is answered at least once before the clock starts (``max(warmup,
  concurrency)`` unmeasured requests), so all connections are accepted first. ``sync``:
  print ``ready`` then and wait for a line on stdin (several generator processes start
  together). Returns the latencies in microseconds and the generator's CPU use.
  """
  parsed = urllib.parse.urlsplit(url)
  host, port = parsed.hostname, parsed.port
  requests_bytes = [_request_bytes(parsed.netloc, parsed.path, b) for b in bodies]
  latencies: list[float] = []
  errors = failed = 0
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
    nonlocal ready, failed
    writer = None
    try:
      reader, writer = await asyncio.open_connection(host, port)
      for i in range(k, max(warmup, concurrency), concurrency):
        await one(reader, writer, i)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
      failed += 1  # counted as an error; the level runs with one client fewer
      print(f"client {k}: {type(e).__name__}: {e}", file=sys.stderr)
      if writer is not None:
        writer.close()
      writer = None
    finally:  # a client that failed must not leave the others waiting
      ready += 1
      if ready == concurrency:
        all_ready.set()
    if writer is None:
      return
    try:
      await go.wait()
      for i in counter:
        if time.perf_counter() > deadline:
          return
        latencies.append(await one(reader, writer, i))
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
      failed += 1
      print(f"client {k}: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
      writer.close()

  tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
  await all_ready.wait()
  if sync:
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
  errors = 0  # warm-up answers do not count
  cpu = time.process_time()
  start = time.perf_counter()
  deadline = start + seconds
  go.set()
  await asyncio.gather(*tasks)
  elapsed = time.perf_counter() - start
  return {"concurrency": concurrency, "errors": errors + failed, "seconds": elapsed,
          "cpu": (time.process_time() - cpu) / elapsed,
          "latencies_us": sorted(round(t * 1e6) for t in latencies)}


def cmd_load(args) -> None:
  with open(args.bodies, encoding="utf-8") as f:
    bodies = [line.encode() for line in f.read().splitlines()]
  import uvloop  # pylint: disable=g-import-not-at-top
  result = uvloop.run(_load(args.url, bodies, args.concurrency, args.requests, args.seconds,
                            args.warmup, args.sync))
  print(json.dumps(result))


def _split(total: int, parts: int) -> list[int]:
  return [total // parts + (i < total % parts) for i in range(parts)]


def load_level(url: str, bodies_file: str, concurrency: int, args) -> dict:
  """One measured run at ``concurrency``: the clients split over ``--load-procs``
  generator processes that start together; their latencies are merged."""
  procs_n = args.load_procs or (1 if (os.cpu_count() or 1) < 8
                                else min(4, math.ceil(concurrency / 32)))
  procs_n = max(1, min(procs_n, concurrency))
  procs = []
  try:
    for c, n in zip(_split(concurrency, procs_n), _split(args.requests, procs_n)):
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "load", "--url", url, "--bodies",
           bodies_file, "--concurrency", str(c), "--requests", str(n), "--seconds",
           str(args.seconds), "--warmup", str(args.warmup), "--sync"],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:
      if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"load generator exited with {p.wait()} (its stderr is above)")
    for p in procs:
      p.stdin.write("go\n")
      p.stdin.flush()
    outs = []
    for p in procs:
      out, _ = p.communicate()
      if p.returncode:
        raise RuntimeError(f"load generator exited with {p.returncode}")
      outs.append(json.loads(out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  latencies = sorted(t for o in outs for t in o["latencies_us"])
  n = len(latencies)
  elapsed = max(o["seconds"] for o in outs)
  pct = lambda q: latencies[min(n - 1, int(q * n))] / 1000 if n else float("nan")  # noqa: E731
  return {"concurrency": concurrency, "requests": n, "seconds": round(elapsed, 2),
          "errors": sum(o["errors"] for o in outs), "qps": n / elapsed,
          "p50_ms": pct(0.50), "p99_ms": pct(0.99), "load_procs": procs_n,
          "load_cpu": max(o["cpu"] for o in outs)}


# ---------------------------------------------------------------------------
# Device ceiling (runs in its own process: `serving_bench.py ceiling ...`)
# ---------------------------------------------------------------------------


def cmd_ceiling(args) -> None:
  """Rows/s of the model alone (no HTTP, `recml serve`'s XLA flags): each request as its
  own call (what the naive server does per request) and 32 requests per call (a full
  micro-batch, length-grouped by the server's plan). The second is the ceiling a server's
  QPS is compared with. The flags do not make XLA single-threaded: its CPU pool has a
  thread per core this process may use, so ``--one-core`` (this process on the last
  core before JAX starts) gives what the server's device process has."""
  if args.one_core and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                             "=false intra_op_parallelism_threads=1").strip()
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  from serving import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from serving import protocol  # pylint: disable=g-import-not-at-top
  from trainers import compile_cache, export  # pylint: disable=g-import-not-at-top
  bundle = export.load_bundle(args.bundle)
  if args.compile_cache:  # the servers' executables: the same shapes, read, not compiled
    compile_cache.use(predictor_lib.compile_cache_dir(bundle.meta, args.compile_cache))
  predictor = predictor_lib.Predictor(bundle, predictor_lib.doubling_buckets(1, CEILING_BATCH))
  predictor.warmup()
  with open(args.bodies, encoding="utf-8") as f:
    rows = [protocol.parse_body(line.encode(), bundle, protocol.Limits())[0]
            for line in f.read().splitlines()[:args.rows]]
  device = jax.devices()[0]
  result = {"backend": jax.default_backend(), "device": device.device_kind}
  for size in (CEILING_BATCH,) if args.one_core else (1, CEILING_BATCH):
    times = []
    for _ in range(args.repeats):
      started = time.perf_counter()
      for i in range(0, len(rows), size):
        predictor_lib.run_rows(predictor, rows[i:i + size])
      times.append(time.perf_counter() - started)
    # the median pass, as the servers' QPS is the median of their runs; the fastest too
    result[f"rows_per_s_batch{size}"] = len(rows) / statistics.median(times)
    result[f"rows_per_s_batch{size}_fastest"] = len(rows) / min(times)
  print(json.dumps(result))


def device_ceiling(bundle: str, bodies_file: str, args, cache: str | None) -> dict:
  """The model alone on every core, and at 32 per call on one core (``one_core_*``)."""
  result = {}
  for one_core in (False, True):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "ceiling", "--bundle",
                          bundle, "--bodies", bodies_file, "--rows", str(args.ceiling_rows)]
                         + (["--compile-cache", cache] if cache else [])
                         + (["--one-core"] if one_core else []),
                         check=True, stdout=subprocess.PIPE, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({f"one_core_{k}": v for k, v in res.items() if "rows_per_s" in k}
                  if one_core else res)
  return result


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------


def serve_options() -> set[str]:
  """The options `recml serve` has in this tree (from its --help)."""
  out = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--help"], cwd=REPO,
                       check=True, capture_output=True, text=True).stdout
  return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def serve_command(bundle: str, server: str, port: int, args, options: set[str],
                  cache: str | None) -> list[str]:
  """`recml serve` for ``server`` (one of :data:`SERVERS`). ``cache``: the root of the
  compile cache (`--compile-cache`), or None for none (`--no-compile-cache`); either only
  where `recml serve` has it (``options``)."""
  cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--bundle", bundle, "--port", str(port),
         "--host", "127.0.0.1", "--max-batch", str(args.max_batch)]
  if server == "naive":
    cmd.append("--naive")
  elif server == "batched" and "--workers" in options:
    cmd += ["--workers", "1"]
  elif server == "multi" and args.workers:
    cmd += ["--workers", str(args.workers)]
  if cache is not None and "--compile-cache" in options:
    cmd += ["--compile-cache", cache]
  elif cache is None and "--no-compile-cache" in options:
    cmd.append("--no-compile-cache")
  return cmd


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: str, lines: int = 20) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def running_server(cmd: list[str], port: int, log_path: str, timeout: float = 600):
  """Starts ``cmd``; yields ``(seconds from process start to the first /health 200, the
  health answer)``; stops it (SIGTERM, then SIGKILL to its process group after 30 s)."""
  with open(log_path, "w", encoding="utf-8") as log:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
  try:
    deadline = started + timeout
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"server exited with {proc.returncode}: {shlex.join(cmd)}\n"
                           f"{_tail(log_path)}")
      try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=5) as r:
          if r.status == 200:
            seconds, health = time.perf_counter() - started, json.loads(r.read())
            break
      except (OSError, ValueError):  # not listening yet, or 503 while compiling
        pass
      if time.perf_counter() > deadline:
        raise TimeoutError(f"server not ready after {timeout:.0f} s: {shlex.join(cmd)}\n"
                           f"{_tail(log_path)}")
      time.sleep(0.05)
    yield seconds, health
  finally:
    stop(proc)


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
  """SIGTERM to the server; SIGKILL to its process group (its workers and device process)
  if anything of it is left ``grace`` seconds later, said on stdout."""
  proc.terminate()
  deadline = time.perf_counter() + grace
  while time.perf_counter() < deadline:
    proc.poll()
    try:
      os.killpg(proc.pid, 0)  # raises once no process of the server's group is left
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    print(f"server {proc.pid}: {'processes of it' if proc.poll() is not None else 'it'} still "
          f"running {grace:.0f} s after SIGTERM; killed", flush=True)
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


def measure(port: int, levels, bodies_file: str, args, label: str) -> list[dict]:
  """Medians over ``--runs`` runs at each concurrency level."""
  url = f"http://127.0.0.1:{port}/predict"
  results = []
  for c in levels:
    runs = []
    for _ in range(args.runs):
      runs.append(load_level(url, bodies_file, c, args))
      print(f"  {label:8s}", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                         for k, v in runs[-1].items()}), flush=True)
    results.append({"concurrency": c, "runs": len(runs),
                    "requests": sum(r["requests"] for r in runs),
                    "errors": sum(r["errors"] for r in runs),
                    "load_cpu": max(r["load_cpu"] for r in runs),
                    "load_procs": runs[0]["load_procs"],
                    **{k: statistics.median_high(r[k] for r in runs)
                       for k in ("qps", "p50_ms", "p99_ms")}})
  return results


def _cache_size(path: str) -> tuple[int, int]:
  files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  return len(files), sum(os.path.getsize(f) for f in files)


def bench_model(name: str, bundle: str, args, options: set[str], tmp: str) -> dict:
  """Every server at every level, the start-up times and the ceiling of one bundle."""
  with open(os.path.join(bundle, "bundle.json"), encoding="utf-8") as f:
    max_len = json.load(f)["max_len"]
  insts = histories(args.ratings, max_len)
  random.Random(0).shuffle(insts)
  bodies_file = os.path.join(tmp, f"{name}-bodies.jsonl")
  with open(bodies_file, "w", encoding="utf-8") as f:
    for inst in insts:
      f.write(json.dumps({"instances": [inst]}) + "\n")
  out: dict = {"rows": [], "notes": []}

  def run(server: str, cache: str | None, startup: list[float] | None = None,
          load: bool = True) -> dict:
    port = _free_port()
    cmd = serve_command(bundle, server, port, args, options, cache)
    print(f"{name} {server}: {shlex.join(cmd[1:])}", flush=True)
    with running_server(cmd, port, os.path.join(tmp, f"{name}-{server}.log")) as (s, health):
      print(f"  ready in {s:.1f}s: {json.dumps(health)}", flush=True)
      if startup is not None:
        startup.append(s)
      if load:
        for r in measure(port, args.concurrency, bodies_file, args, server):
          out["rows"].append({"model": name, "server": server, **r})
    return health

  run("naive", None)
  # Start-up of the multi-worker server: cold with an empty cache, then warm (same cache)
  # --warm-starts times; the last warm server is the one measured. The single-worker
  # server and the model alone then read the same cache (the same shapes: no compiling).
  cache = os.path.join(tmp, f"{name}-compile-cache")
  os.makedirs(cache)
  cold: list[float] = []
  warm: list[float] = []
  has_cache = "--compile-cache" in options
  has_workers = "--workers" in options
  if not has_workers:
    out["notes"].append("`recml serve` has no --workers: the multi-worker server was not "
                        "measured (its start-up is the default server's)")
  health = run("multi", cache, cold, load=has_workers and not has_cache)
  if has_cache:
    for i in range(args.warm_starts):
      health = run("multi", cache, warm, load=has_workers and i == args.warm_starts - 1)
  else:
    out["notes"].append("`recml serve` has no --compile-cache: start-up measured without a "
                        "persistent cache; no warm start")
  out["workers"] = args.workers or health.get("workers") or "default"
  if out["workers"] == 1:
    out["notes"].append(f"the `N workers` server of {name} ran 1 worker (the default on "
                        f"{os.cpu_count()} cores): it is the `1 worker` server")
  out["startup"] = {"cold_s": cold[0], "warm_s": warm, "cache": _cache_size(cache)}
  run("batched", cache)
  out["ceiling"] = device_ceiling(bundle, bodies_file, args, cache if has_cache else None)
  print(f"{name} ceiling: {json.dumps(out['ceiling'])}", flush=True)
  return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _row(rows: list[dict], model: str, server: str, c: int) -> dict | None:
  return next((r for r in rows if (r["model"], r["server"], r["concurrency"])
               == (model, server, c)), None)


def load_table(results: dict, levels) -> str:
  lines = ["| model | concurrency | naive QPS | naive p50 / p99 ms | 1 worker QPS | "
           "1 worker p50 / p99 ms | N workers | N workers QPS | N workers p50 / p99 ms | "
           "errors (naive / 1 / N) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, res in results.items():
    for c in levels:
      cells, errors = [], []
      for server in SERVERS:
        r = _row(res["rows"], name, server, c)
        if server == "multi":
          cells.append(str(res["workers"]))
        if r is None:
          cells += ["n/a", "n/a"]
          errors.append("n/a")
        else:
          cells += [f"{r['qps']:.0f}", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"]
          errors.append(str(r["errors"]))
      lines.append(f"| {name} | {c} | " + " | ".join(cells) + f" | {' / '.join(errors)} |")
  return "\n".join(lines)


def best_ceiling(ceiling: dict) -> float:
  """The model alone at batch 32 (its median pass): on every core or on one, whichever ran
  faster (on a shared 2-core machine either may; the servers are held to the higher)."""
  return max(v for k, v in ceiling.items() if k.endswith(f"rows_per_s_batch{CEILING_BATCH}"))


def _with_fastest(ceiling: dict, key: str) -> str:
  """``median; fastest`` rows/s of one ceiling measurement (``n/a`` when not measured)."""
  if not ceiling.get(key):
    return "n/a"
  fastest = ceiling.get(f"{key}_fastest")
  return f"{ceiling[key]:.0f}" + (f"; {fastest:.0f}" if fastest else "")


def ceiling_table(results: dict) -> str:
  lines = ["| model | model alone, 1 per call (rows/s) | model alone, 32 per call, every core "
           "(rows/s; fastest pass) | same, one core (rows/s; fastest pass) | naive QPS c=32 / "
           "the faster | 1 worker QPS c=32 / the faster | N workers QPS c=32 / the faster |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, res in results.items():
    b1 = res["ceiling"]["rows_per_s_batch1"]
    best = best_ceiling(res["ceiling"])
    cells = []
    for server in SERVERS:
      r = _row(res["rows"], name, server, 32)
      cells.append("n/a" if r is None else f"{r['qps'] / best:.0%} ({r['qps']:.0f})")
    lines.append(f"| {name} | {b1:.0f} | "
                 f"{_with_fastest(res['ceiling'], f'rows_per_s_batch{CEILING_BATCH}')} | "
                 + _with_fastest(res["ceiling"], f"one_core_rows_per_s_batch{CEILING_BATCH}")
                 + " | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def startup_table(results: dict) -> str:
  lines = ["| model | cold start s (empty cache) | warm start s (same cache), median | "
           "warm starts | cache |",
           "|---|---:|---:|---|---:|"]
  for name, res in results.items():
    s = res["startup"]
    files, size = s["cache"]
    warm = f"{statistics.median_high(s['warm_s']):.1f}" if s["warm_s"] else "n/a"
    runs = ", ".join(f"{w:.1f}" for w in s["warm_s"]) or "n/a"
    lines.append(f"| {name} | {s['cold_s']:.1f} | {warm} | {runs} | {files} files, "
                 f"{size / 2**20:.1f} MiB |")
  return "\n".join(lines)


def target_lines(results: dict) -> list[str]:
  """One line per model and target: met, not met or not measured, with the number."""
  out = []

  def line(name: str, what: str, value: float | None, ok: bool | None, shown: str) -> None:
    verdict = "not measured" if ok is None else ("met" if ok else "not met")
    number = "" if value is None else f": {shown}"
    out.append(f"- **{verdict}** ({name}) {what}{number}")

  for name, res in results.items():
    b32 = best_ceiling(res["ceiling"])
    c32, c1 = _row(res["rows"], name, "multi", 32), _row(res["rows"], name, "multi", 1)
    frac = c32 and c32["qps"] / b32
    line(name, f"multi-worker QPS at c=32 ≥ {TARGETS['ceiling_fraction']:.0%} of the model "
         f"alone at batch {CEILING_BATCH}", frac, None if c32 is None
         else frac >= TARGETS["ceiling_fraction"], f"{frac:.0%}" if c32 else "")
    p99 = c32 and c32["p99_ms"]
    line(name, f"multi-worker p99 at c=32 < {TARGETS['p99_ms']:.0f} ms", p99,
         None if c32 is None else p99 < TARGETS["p99_ms"], f"{p99:.1f} ms" if c32 else "")
    p50 = c1 and c1["p50_ms"]
    line(name, f"multi-worker p50 at c=1 < {TARGETS['p50_ms_c1']:.0f} ms", p50,
         None if c1 is None else p50 < TARGETS["p50_ms_c1"], f"{p50:.2f} ms" if c1 else "")
    warm = res["startup"]["warm_s"]
    w = statistics.median_high(warm) if warm else None
    line(name, f"warm restart ready in < {TARGETS['warm_start_s']:.0f} s", w,
         None if w is None else w < TARGETS["warm_start_s"], f"{w:.1f} s" if warm else "")
    if res["ceiling"]["backend"] == "gpu":
      c128 = _row(res["rows"], name, "multi", 128)
      frac = c128 and c128["qps"] / b32
      line(name, f"(GPU) multi-worker QPS at c=128 ≥ "
           f"{TARGETS['gpu_ceiling_fraction_c128']:.0%} of the model alone at batch "
           f"{CEILING_BATCH}", frac, None if c128 is None
           else frac >= TARGETS["gpu_ceiling_fraction_c128"], f"{frac:.0%}" if c128 else "")
  return out


def _cpu_name() -> str:
  with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor()


def report(results: dict, args, load: tuple[float, float], argv: list[str]) -> str:
  first = next(iter(results.values()))
  ceiling = first["ceiling"]
  accel = ("" if ceiling["backend"] == "cpu"
           else f", {ceiling['backend']} device {ceiling['device']}")
  lengths = [len(i["items"]) for i in histories(args.ratings, 10**9)]
  notes = sorted({n for res in results.values() for n in res["notes"]})
  busy = [f"{name} {r['server']} c={r['concurrency']} ({r['load_cpu']:.0%})"
          for name, res in results.items() for r in res["rows"] if r["load_cpu"] >= 0.9]
  if busy:
    notes.append("the load generator used ≥ 90% of a core (a process) at " + ", ".join(busy)
                 + ": those QPS may be the generator's limit, not the server's "
                 "(raise --load-procs)")
  parts = [RESULT_HEADER.format(
      machine=f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores{accel}",
      date=time.strftime("%Y-%m-%d %H:%M"), load_start=load[0], load_end=load[1],
      command=shlex.join([".venv/bin/python", "benchmarks/serving_bench.py", *argv]),
      requests=args.requests, seconds=args.seconds, warmup=args.warmup,
      max_batch=args.max_batch, runs=args.runs, warm_starts=args.warm_starts,
      ceiling_rows=args.ceiling_rows, median_len=statistics.median_high(lengths),
      workers=args.workers or "`recml serve`'s default (no --workers)",
      **{k: v for k, v in TARGETS.items()})]
  if args.quick:
    parts.append("**A `--quick` check (one short run per level): not the benchmark's numbers.**")
  parts += ["## Targets", "\n".join(target_lines(results))]
  if notes:
    parts.append("\n".join(f"Note: {n}." for n in notes))
  parts += ["## Load", load_table(results, args.concurrency),
            "## Model alone, and each server at c=32 as a fraction of it", ceiling_table(results),
            "## Start-up of the multi-worker server", startup_table(results)]
  return "\n\n".join(parts) + "\n"


RESULT_HEADER = """# Serving benchmark (`benchmarks/serving_bench.py`)

Machine: {machine}; {date}; load average (1 min) {load_start:.1f} at the start, \
{load_end:.1f} at the end.
Command: `{command}`.

Server and load generator on 127.0.0.1, each its own process(es). Closed loop: C
concurrent clients on keep-alive connections, each sends its next request when the
previous one is answered (raw asyncio streams on uvloop). Every connection is open and
answered before the clock starts (max(warmup, C) unmeasured requests; warmup = {warmup}).
Per level at most {requests} requests or {seconds:.0f} s; medians of {runs} run(s) per level.
One instance per request: a real ml-1m-partial user history (raw movie ids +
timestamps, up to max_len 200; median user {median_len} ratings), k=10, history excluded.
Bundles: ml-1m-partial, 2 epochs (latency does not depend on quality).

Servers, all `recml serve --max-batch {max_batch}`:
- `naive` = `--naive`: one request at a time in the server process (the device call
  blocks the event loop; same bundle and length buckets).
- `1 worker` = `--workers 1`: one HTTP process, micro-batching in a device process.
- `N workers` = {workers}: N HTTP worker processes, one
  device process.

The model alone runs the same requests with no HTTP and `recml serve`'s XLA flags, 1 and
32 per call (length-grouped by the server's plan), with every core (XLA's CPU pool has a
thread per core); and 32 per call on one core, what the server's device process has (on
N cores: one for the model, N-1 for the HTTP workers). Each is the median of 5 passes
over the same {ceiling_rows} requests (the fastest pass beside it), as each server's QPS is
the median of its runs; the servers are compared with the faster of the two.
Start-up of the `N workers` server is process start to the first 200 of /health: cold
with an empty `--compile-cache` folder, warm with the same folder again (median of {warm_starts});
the `1 worker` server and the model alone start from that folder too.

Targets, for the `N workers` server: QPS at c=32 ≥ {ceiling_fraction:.0%} of the model alone
at batch 32 (the faster); p99 < {p99_ms:.0f} ms at c=32; p50 < {p50_ms_c1:.0f} ms at c=1;
a warm restart ready in < {warm_start_s:.0f} s; on a GPU also QPS at c=128
≥ {gpu_ceiling_fraction_c128:.0%} of the model alone at batch 32."""


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="cmd")
  load = sub.add_parser("load")
  load.add_argument("--url", required=True)
  load.add_argument("--bodies", required=True)
  load.add_argument("--concurrency", type=int, required=True)
  load.add_argument("--requests", type=int, default=10000)
  load.add_argument("--seconds", type=float, default=20)
  load.add_argument("--warmup", type=int, default=20)
  load.add_argument("--sync", action="store_true",
                    help="print 'ready' once connected and warm, start on a line on stdin")
  ceiling = sub.add_parser("ceiling")
  ceiling.add_argument("--bundle", required=True)
  ceiling.add_argument("--bodies", required=True)
  ceiling.add_argument("--rows", type=int, default=2000)
  ceiling.add_argument("--repeats", type=int, default=5)
  ceiling.add_argument("--compile-cache", metavar="DIR", help="as recml serve's")
  ceiling.add_argument("--one-core", action="store_true",
                       help="this process on one core (XLA's pool: one thread)")
  parser.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR")
  parser.add_argument("--ratings", default=os.path.join(
      REPO, "..", "shared", "datasets", "ml-1m-partial", "ratings_users1-2999.dat.gz"))
  parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
  parser.add_argument("--requests", type=int, default=10000, help="per level (bound)")
  parser.add_argument("--seconds", type=float, default=15, help="per level (bound)")
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--max-batch", type=int, default=32)
  parser.add_argument("--workers", type=int,
                      help="HTTP workers of the multi-worker server (default: recml serve's)")
  parser.add_argument("--runs", type=int, default=3, help="runs per level; medians reported")
  parser.add_argument("--warm-starts", type=int, default=3,
                      help="warm start-ups measured per model; median reported")
  parser.add_argument("--ceiling-rows", type=int, default=2000,
                      help="requests the model alone runs per repeat")
  parser.add_argument("--load-procs", type=int,
                      help="load generator processes per level (default: 1 below 8 cores, "
                      "else one per 32 clients up to 4)")
  parser.add_argument("--quick", action="store_true",
                      help="end-to-end check in a few minutes: first bundle, c=1 and 32, one "
                      "short run per level, one warm start")
  parser.add_argument("--output", help="markdown file to write")
  args = parser.parse_args(argv)
  if args.cmd == "load":
    cmd_load(args)
    return 0
  if args.cmd == "ceiling":
    cmd_ceiling(args)
    return 0
  if not args.bundle:
    parser.error("--bundle NAME=DIR is required (once per model)")
  specs = []
  for spec in args.bundle:
    name, sep, bundle = spec.partition("=")
    if not sep or not name or not os.path.isfile(os.path.join(bundle, "bundle.json")):
      parser.error(f"--bundle {spec!r}: expected NAME=DIR with DIR/bundle.json")
    specs.append((name, bundle))
  if not os.path.isfile(args.ratings):
    parser.error(f"--ratings {args.ratings}: no such file")
  if args.warm_starts < 1 or args.runs < 1:
    parser.error("--runs and --warm-starts must be at least 1")
  if args.quick:
    specs = specs[:1]
    args.concurrency, args.runs, args.warm_starts = [1, 32], 1, 1
    args.requests, args.seconds, args.ceiling_rows = 300, 5, 128
  options = serve_options()
  load_start = os.getloadavg()[0]
  results = {}
  with tempfile.TemporaryDirectory(prefix="recml-serving-bench-") as tmp:
    for name, bundle in specs:
      results[name] = bench_model(name, bundle, args, options, tmp)
  md = report(results, args, (load_start, os.getloadavg()[0]), argv)
  print(md)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
