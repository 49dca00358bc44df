"""Drills against a running ``recml serve``: a seeded fuzz-plus-load run, and a kill of
its device process (:func:`kill_drill`, for a server on this machine).

    from tests.reliability.serving_drills import fuzz_and_load
    report = fuzz_and_load("http://127.0.0.1:8080", item_ids=[1000, 1007, ...],
                           max_len=12, max_k=20, max_body_bytes=1 << 20)
    report["status"]    # {200: 1012, 400: 900, 413: 88}; 0 means the connection failed
    report["p50_ms"], report["p99_ms"], report["by_kind"], report["expected"]

Every request is one of :data:`KINDS` (valid requests, unknown items, malformed JSON,
wrong types, huge ids, bad and huge timestamps, empty histories, oversized bodies), drawn
with fixed weights from a seeded generator, and sent ``concurrency`` at a time. Each kind
has the statuses it should get (``EXPECTED``); ``report["unexpected"]`` counts the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from typing import Any, Sequence

import numpy as np

from tests.serving.conftest import request

# kind -> (weight, statuses it should get)
KINDS: dict[str, tuple[int, tuple[int, ...]]] = {
    "valid": (40, (200,)),
    "unknown_items": (8, (200,)),
    "malformed_json": (8, (400,)),
    "wrong_types": (10, (400,)),
    "huge_ids": (8, (200, 400)),      # 2**62 is an unknown id (200); 2**64, 300 chars: 400
    "bad_timestamps": (8, (400,)),
    "huge_timestamps": (5, (200,)),   # int64 unix seconds beyond 2**31, up to 2**63 - 1
    "empty_history": (5, (400,)),
    "oversized": (3, (413,)),
    "too_long": (5, (400,)),
}
EXPECTED = {kind: statuses for kind, (_, statuses) in KINDS.items()}


def _instance(rng: random.Random, item_ids: Sequence[Any], max_len: int, max_k: int,
              t0: int = 1_700_000_000) -> dict[str, Any]:
  n = rng.randint(1, max_len)
  inst: dict[str, Any] = {"items": [rng.choice(item_ids) for _ in range(n)]}
  if rng.random() < 0.7:
    inst["k"] = rng.randint(1, max_k)
  if rng.random() < 0.5:
    inst["exclude_history"] = rng.random() < 0.5
  if rng.random() < 0.6:
    start = t0 + rng.randrange(10**8)
    inst["timestamps"] = sorted(start + rng.randrange(10**7) for _ in range(n))
    inst["query_timestamp"] = inst["timestamps"][-1] + rng.randrange(10**5)
  return inst


def make_body(kind: str, rng: random.Random, item_ids: Sequence[Any], max_len: int,
              max_k: int, max_body_bytes: int) -> bytes:
  """One request body of ``kind`` (see :data:`KINDS`)."""
  inst = _instance(rng, item_ids, max_len, max_k)
  instances = [inst] + [_instance(rng, item_ids, max_len, max_k)
                        for _ in range(rng.randrange(3))]
  if kind == "valid":
    pass
  elif kind == "unknown_items":
    inst["items"][rng.randrange(len(inst["items"]))] = rng.choice(
        ["no-such-item", "<pad>", "<oov>", 10**12, -5, "\u00e9\u4e2d"])
  elif kind == "malformed_json":
    raw = json.dumps({"instances": instances}).encode()
    return rng.choice([raw[:rng.randrange(1, len(raw))], b"\xff\xfe\x00garbage", b"",
                       b'{"instances": [{"items": [NaN]}]}', b"[" * 10_000,
                       raw.replace(b":", b"=", 1)])
  elif kind == "wrong_types":
    key, value = rng.choice([("items", "1000"), ("k", "10"), ("k", 2.0), ("k", True),
                             ("exclude_history", "yes"), ("timestamps", [1.5] * 2),
                             ("items", [[1]]), ("items", [None]), ("query_timestamp", "now")])
    inst[key] = value
    if rng.random() < 0.2:
      return json.dumps({"instances": inst}).encode()
  elif kind == "huge_ids":
    inst["items"][-1] = rng.choice([2**62, 2**64, -2**63, 10**30, "x" * 300])
  elif kind == "bad_timestamps":
    if rng.random() < 0.5:
      inst["query_timestamp"] = rng.choice([-1, 2**63, 2**64 - 1, 1.5])
    else:
      inst["timestamps"] = [rng.choice([-1, -2**40, 2**63])] * len(inst["items"])
  elif kind == "huge_timestamps":
    start = rng.choice([2**31, 2**32 + 12345, 4_102_444_800, 2**62, 2**63 - 10**7])
    inst["timestamps"] = sorted(start + rng.randrange(10**6) for _ in inst["items"])
    inst["query_timestamp"] = min(2**63 - 1, inst["timestamps"][-1] + rng.randrange(10**6))
  elif kind == "empty_history":
    inst["items"] = []
    inst.pop("timestamps", None)
  elif kind == "oversized":
    raw = json.dumps({"instances": instances}).encode()
    return raw + b" " * (max_body_bytes + 1 - len(raw) + rng.randrange(1024))
  elif kind == "too_long":
    inst["items"] = [rng.choice(item_ids) for _ in range(max_len + 1 + rng.randrange(5))]
    inst.pop("timestamps", None)
  else:
    raise ValueError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")
  return json.dumps({"instances": instances}).encode()


async def _drill(url: str, bodies: list[tuple[str, bytes]], concurrency: int,
                 timeout: float) -> list[tuple[str, int, float, str]]:
  import aiohttp  # pylint: disable=g-import-not-at-top
  results: list[tuple[str, int, float, str]] = []
  queue = list(reversed(bodies))
  async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
    async def worker():
      while queue:
        kind, body = queue.pop()
        started = time.perf_counter()
        try:
          async with session.post(url, data=body,
                                  headers={"Content-Type": "application/json"}) as r:
            await r.read()
            status, error = r.status, ""
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
          status, error = 0, f"{type(e).__name__}: {e}"
        results.append((kind, status, time.perf_counter() - started, error))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
  return results


def fuzz_and_load(url: str, item_ids: Sequence[Any], max_len: int, max_k: int,
                  max_body_bytes: int = 1 << 20, n: int = 2000, concurrency: int = 16,
                  seed: int = 0, predict_route: str = "/predict",
                  timeout: float = 60) -> dict[str, Any]:
  """Sends ``n`` seeded requests of every kind, ``concurrency`` at a time; returns
  ``{"requests", "seconds", "rps", "status": {code: count}, "by_kind": {kind: {code:
  count}}, "unexpected": count, "errors": [first few connection errors], "p50_ms",
  "p99_ms"}`` (status 0 = no HTTP answer)."""
  rng = random.Random(seed)
  kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
  bodies = []
  for _ in range(n):
    kind = rng.choices(kinds, weights)[0]
    bodies.append((kind, make_body(kind, rng, item_ids, max_len, max_k, max_body_bytes)))
  started = time.perf_counter()
  results = asyncio.run(_drill(url.rstrip("/") + predict_route, bodies, concurrency,
                               timeout))
  seconds = time.perf_counter() - started
  status: dict[int, int] = {}
  by_kind: dict[str, dict[int, int]] = {}
  for kind, code, _, _ in results:
    status[code] = status.get(code, 0) + 1
    by_kind.setdefault(kind, {})[code] = by_kind.setdefault(kind, {}).get(code, 0) + 1
  latencies = np.array([t for _, _, t, _ in results]) * 1e3
  return {
      "requests": len(results),
      "seconds": round(seconds, 3),
      "rps": round(len(results) / seconds, 1),
      "status": dict(sorted(status.items())),
      "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
      "unexpected": sum(code not in EXPECTED[kind] for kind, code, _, _ in results),
      "errors": [e for _, _, _, e in results if e][:5],
      "p50_ms": round(float(np.percentile(latencies, 50)), 2),
      "p99_ms": round(float(np.percentile(latencies, 99)), 2),
  }


def kill_drill(url: str, body: dict[str, Any], threads: int = 3, pause: float = 0.05,
               timeout: float = 120) -> dict[str, Any]:
  """SIGKILLs the device process of a server on this machine (``device_pid`` of its
  health route) while ``threads`` clients post ``body`` in a loop (every ``pause`` s);
  returns when the health route is ready with a new device process, or after ``timeout``.

  Returns ``{"old_pid", "new_pid", "restarts", "recovery_seconds" (kill -> ready again),
  "status": {code: count}, "answers": [(status, JSON, headers)] of the requests sent
  after the kill}`` (status 0 = no HTTP answer).
  """
  def call(method, route, data=None):
    try:
      return request(method, url + route, data, with_headers=True)
    except OSError as e:
      return 0, {"error": f"{type(e).__name__}: {e}"}, {}

  status, health, _ = call("GET", "/health")
  if status != 200:
    raise RuntimeError(f"the server is not ready: {status} {health}")
  old_pid = health["device_pid"]
  data = json.dumps(body).encode()
  answers: list[tuple[float, int, Any, dict]] = []
  stop = threading.Event()

  def hammer():  # requests in flight and arriving while the device is down
    while not stop.is_set():
      sent = time.monotonic()
      code, answer, headers = call("POST", "/predict", data)
      answers.append((sent, code, answer, dict(headers)))
      time.sleep(pause)

  workers = [threading.Thread(target=hammer, daemon=True) for _ in range(threads)]
  for w in workers:
    w.start()
  time.sleep(10 * pause)
  killed = time.monotonic()
  os.kill(old_pid, signal.SIGKILL)
  try:
    while time.monotonic() < killed + timeout:
      status, health, _ = call("GET", "/health")
      if status == 200 and health["device_pid"] != old_pid:
        break
      time.sleep(0.05)
    recovery = time.monotonic() - killed
  finally:
    stop.set()
    for w in workers:
      w.join(60)
  after = [(code, answer, headers) for sent, code, answer, headers in answers
           if sent >= killed]
  counts: dict[int, int] = {}
  for code, _, _ in after:
    counts[code] = counts.get(code, 0) + 1
  ready = status == 200 and health["device_pid"] != old_pid
  return {"old_pid": old_pid, "new_pid": health["device_pid"] if ready else None,
          "restarts": health.get("device_restarts") if ready else None,
          "recovery_seconds": round(recovery, 2) if ready else None,
          "status": dict(sorted(counts.items())), "answers": after}
