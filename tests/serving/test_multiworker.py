"""`recml serve --workers 2`: two HTTP worker processes, one device process.

The server is the real CLI in a subprocess on the tiny bundles of conftest.py. Requests
reach both workers (the health route names the worker that answered); the scores are
the trainer's; malformed bodies get 400s with the reason from every worker and never a
5xx; a killed device process gives 503s then answers again; a killed worker is
restarted while the other one serves; SIGTERM stops every process.
"""
# pylint: disable=redefined-outer-name  (pytest fixtures)

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.reliability import test_serving_faults as faults
from tests.reliability.serving_drills import KINDS, fuzz_and_load, kill_drill
from tests.serving import test_bad_requests, test_parity
from tests.serving.conftest import MAX_LEN, free_port, request

pytestmark = pytest.mark.integration
WORKERS = 2
K = 20


def raw_ids(dataset: str) -> list[int]:
  return faults.raw_ids(dataset)


@pytest.fixture(scope="module")
def multi(bundles, tmp_path_factory):
  """model name -> a ready `recml serve --workers 2` (started on first use)."""
  started = {}

  def get(name: str) -> faults.CliServer:
    if name not in started:
      log = str(tmp_path_factory.mktemp(f"multi-{name}") / "serve.log")
      started[name] = faults.CliServer(bundles[name], log, max_restarts=3, workers=WORKERS)
    started[name].wait_ready()
    return started[name]
  yield get
  for server in started.values():
    if server.proc.poll() is None:
      assert server.stop() == 0, server.read_log()[-3000:]


def call(conn: http.client.HTTPConnection, method: str, route: str, body=None):
  """``(status, JSON, headers)`` over a keep-alive connection (always the same worker)."""
  data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
  conn.request(method, route, body=data, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  return response.status, json.loads(response.read() or b"null"), response.headers


class Client:
  """Posts each request on a new keep-alive connection: requests spread over the
  workers, and (without urllib's ``Connection: close``) take the fast path."""

  def __init__(self, port: int):
    self.port = port

  def post(self, body):
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
    try:
      return call(conn, "POST", "/predict", body)[:2]
    finally:
      conn.close()


def worker_connections(port: int, workers: int = WORKERS, tries: int = 400
                       ) -> dict[int, http.client.HTTPConnection]:
  """worker pid -> a keep-alive connection it answers (new connections until every
  worker has answered one: the kernel spreads them over the workers' sockets)."""
  conns: dict[int, http.client.HTTPConnection] = {}
  for _ in range(tries):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, health, _ = call(conn, "GET", "/health")
    assert status == 200, health
    if health["worker_pid"] in conns:
      conn.close()
    else:
      conns[health["worker_pid"]] = conn
    if len(conns) == workers:
      return conns
  raise AssertionError(f"only workers {sorted(conns)} answered {tries} connections")


def children(pid: int) -> set[int]:
  """The processes ``pid`` spawned with multiprocessing (the workers, the device
  process; not multiprocessing's resource tracker), from Linux's /proc."""
  out = set()
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children", encoding="utf-8") as f:
      for child in f.read().split():
        try:
          with open(f"/proc/{child}/cmdline", "rb") as cmd:
            if b"spawn_main" in cmd.read():
              out.add(int(child))
        except OSError:  # ended meanwhile
          pass
  return out


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
  """The processes of ``pids`` still running after ``timeout`` seconds."""
  deadline = time.monotonic() + timeout
  while pids and time.monotonic() < deadline:
    pids = {p for p in pids if os.path.exists(f"/proc/{p}")}
    time.sleep(0.1)
  return pids


def wait_all_ready(server, device_pid=None, timeout: float = 60) -> dict[int, dict]:
  """worker pid -> its health once every worker is ready (on ``device_pid`` if given)."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      conns = worker_connections(server.port)
      healths = {pid: call(c, "GET", "/health")[1] for pid, c in conns.items()}
      for c in conns.values():
        c.close()
      if device_pid is None or all(h["device_pid"] == device_pid for h in healths.values()):
        return healths
    except AssertionError:
      pass
    assert time.monotonic() < deadline, server.read_log()[-3000:]
    time.sleep(0.2)


def thread_cores(pid: int) -> dict[str, set[str]]:
  """thread name -> the CPU lists (``Cpus_allowed_list``) of that process's threads of
  that name, from Linux's /proc."""
  out: dict[str, set[str]] = {}
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/status", encoding="utf-8") as f:
      status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    out.setdefault(status["Name"], set()).add(status["Cpus_allowed_list"])
  return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_device_process_and_its_xla_threads_keep_to_one_core_off_the_workers(multi):
  server = multi("sasrec")
  health = server.wait_ready()
  device_core = str(max(os.sched_getaffinity(0)))
  device = thread_cores(health["device_pid"])
  eigen = [name for name in device if "Eigen" in name]
  assert eigen, device  # XLA's CPU pool threads are there to be checked
  assert set().union(*device.values()) == {device_core}, device  # every thread, XLA's too
  pids = children(server.proc.pid) - {health["device_pid"]}
  assert len(pids) == WORKERS
  for pid in pids:  # the workers keep off it
    for cores in set().union(*thread_cores(pid).values()):
      assert device_core not in cores.replace("-", ",").split(","), (pid, cores)


def test_requests_spread_over_the_workers(multi):
  server = multi("sasrec")
  seen = {}
  for _ in range(40):  # a new connection each
    status, health = request("GET", server.url + "/health")
    assert status == 200 and health["workers"] == WORKERS, health
    seen[health["worker_pid"]] = seen.get(health["worker_pid"], 0) + 1
  assert len(seen) == WORKERS, seen
  assert set(seen) <= children(server.proc.pid)
  assert health["device_pid"] in children(server.proc.pid) - set(seen)
  status, meta = request("GET", server.url + "/v1/metadata")
  assert status == 200 and meta["workers"] == WORKERS and meta["max_len"] == MAX_LEN


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_served_scores_equal_trainer_scores(name, trained, dataset, multi):
  """test_parity's check (the training forward pass as reference), through two workers."""
  test_parity.test_served_scores_equal_trainer_scores(
      name, dataset, lambda n: (trained[n], Client(multi(n).port)))


def test_concurrent_answers_equal_one_at_a_time(multi, dataset):
  """Rows of concurrent requests from both workers share device calls; each answer is
  the one the request gets alone."""
  server = multi("hstu")
  ids = raw_ids(dataset)
  rng = np.random.default_rng(3)
  bodies = []
  for i in range(48):
    n = int(rng.integers(1, MAX_LEN + 1))
    ts = (1_700_000_000 + np.cumsum(rng.integers(1, 10**5, n))).tolist()
    bodies.append({"instances": [{"items": [int(x) for x in rng.choice(ids, n)],
                                  "timestamps": ts, "query_timestamp": ts[-1] + 60,
                                  "k": int(rng.integers(1, K + 1)),
                                  "exclude_history": bool(i % 2)}]})
  client = Client(server.port)
  alone = [client.post(b) for b in bodies]
  _, before = request("GET", server.url + "/v1/metadata")
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    together = list(pool.map(client.post, bodies * 3))
  _, after = request("GET", server.url + "/v1/metadata")
  for (s1, a), (s2, b) in zip(alone * 3, together):
    assert s1 == s2 == 200, (a, b)
    assert a["predictions"][0]["items"] == b["predictions"][0]["items"]
    np.testing.assert_allclose(a["predictions"][0]["scores"], b["predictions"][0]["scores"],
                               rtol=1e-5, atol=1e-6)
  rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
  assert rows == len(bodies) * 3 and batches < rows  # some calls held several requests


def test_bad_requests_get_400_with_the_reason_from_every_worker(multi):
  server = multi("sasrec")
  conns = worker_connections(server.port)
  for conn in conns.values():
    for body, message in test_bad_requests.MALFORMED:
      data = body if isinstance(body, bytes) else json.dumps(body).encode()
      want = 400
      if len(data) > faults.MAX_BODY:  # this server's limit: too large comes first
        want, message = 413, "payload too large"
      status, answer, _ = call(conn, "POST", "/predict", data)
      assert status == want and message in answer["error"], (body[:100], answer)
    big = b'{"instances": []}' + b" " * faults.MAX_BODY
    status, answer, _ = call(conn, "POST", "/predict", big)
    assert status == 413 and "payload too large" in answer["error"], answer
    status, answer, _ = call(conn, "POST", "/predict", {"instances": [test_bad_requests.OK]})
    assert status == 200 and len(answer["predictions"][0]["items"]) == 10, answer
    conn.close()


def test_fuzz_and_load_never_answers_5xx(multi, dataset):
  server = multi("sasrec")
  report = fuzz_and_load(server.url, raw_ids(dataset), MAX_LEN, K, faults.MAX_BODY, n=1200,
                         concurrency=16, seed=11)
  print(json.dumps(report))
  assert report["requests"] == 1200
  assert not [s for s in report["status"] if s >= 500 or s == 0], report
  assert report["unexpected"] == 0, report
  assert set(report["by_kind"]) == set(KINDS)


def test_killed_device_process_gives_503_then_recovers(multi, dataset):
  server = multi("sasrec")
  ids = raw_ids(dataset)
  body = {"instances": [{"items": ids[:5], "k": K}, {"items": ids[10:12], "k": 5}]}
  status, before = server.post(body)
  assert status == 200, before
  restarts = server.wait_ready()["device_restarts"]

  drill = kill_drill(server.url, body, threads=4)
  answers = drill.pop("answers")
  print(f"device process killed; ready again after {drill['recovery_seconds']}s: {drill}")
  assert drill["recovery_seconds"] is not None and drill["recovery_seconds"] < 60, drill
  assert drill["restarts"] == restarts + 1
  assert set(drill["status"]) <= {200, 503}, drill  # never a 500, never a hang
  unavailable = [(a, h) for s, a, h in answers if s == 503]
  assert unavailable, "no request saw the downtime"
  for answer, headers in unavailable:
    assert "device process" in answer["error"] and int(headers["Retry-After"]) >= 1
  assert any("SIGKILL" in a["error"] for a, _ in unavailable)

  healths = wait_all_ready(server, drill["new_pid"])  # every worker found the new one
  assert len(healths) == WORKERS
  conns = worker_connections(server.port)
  for conn in conns.values():  # the same answers as before the kill, from every worker
    status, after, _ = call(conn, "POST", "/predict", body)
    assert status == 200
    for a, b in zip(after["predictions"], before["predictions"]):
      assert a["items"] == b["items"]
      np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)
    conn.close()
  log = server.read_log()
  assert f"pid {drill['old_pid']}) died (killed by signal SIGKILL)" in log, log[-2000:]
  assert f"device process restarted: pid {drill['new_pid']}" in log


def test_killed_worker_is_restarted_while_the_other_serves(multi, dataset):
  server = multi("sasrec")
  body = {"instances": [{"items": raw_ids(dataset)[:4]}]}
  conns = worker_connections(server.port)
  victim, survivor = sorted(conns)
  device_pid = call(conns[survivor], "GET", "/health")[1]["device_pid"]
  os.kill(victim, signal.SIGKILL)
  for _ in range(20):  # the other worker goes on answering on its connection
    status, answer, _ = call(conns[survivor], "POST", "/predict", body)
    assert status == 200, answer
  conns[survivor].close()
  conns[victim].close()

  deadline = time.monotonic() + 60
  while True:  # a new worker takes the dead one's place, on the same device process
    healths = wait_all_ready(server)
    if victim not in healths:
      break
    assert time.monotonic() < deadline, server.read_log()[-3000:]
    time.sleep(0.2)
  (new,) = set(healths) - {survivor}
  assert new in children(server.proc.pid) and survivor in healths
  assert {h["device_pid"] for h in healths.values()} == {device_pid}
  log = server.read_log()
  assert f"(pid {victim}) died (killed by signal SIGKILL)" in log, log[-2000:]
  assert f"restarted: pid {new}" in log, log[-2000:]
  assert request("POST", server.url + "/predict", json.dumps(body).encode())[0] == 200


def test_sigterm_stops_every_process(multi):
  server = multi("sasrec")
  pids = children(server.proc.pid)
  assert len(pids) == WORKERS + 1  # the workers and the device process
  assert server.stop() == 0, server.read_log()[-3000:]
  assert not wait_gone(pids)


def test_gives_up_after_max_restarts(bundles, tmp_path):
  """With ``--max-restarts 0``, the first death of the device process makes the master
  exit 1 with the reason, and take its workers with it."""
  server = faults.CliServer(bundles["sasrec"], str(tmp_path / "serve.log"), max_restarts=0,
                            workers=WORKERS)
  try:
    pid = server.wait_ready()["device_pid"]
    workers = children(server.proc.pid) - {pid}
    os.kill(pid, signal.SIGKILL)
    assert server.proc.wait(60) == 1
  finally:
    if server.proc.poll() is None:
      server.proc.kill()
  error = [line for line in server.read_log().splitlines() if line.startswith("error:")]
  assert error and f"pid {pid}) died (killed by signal SIGKILL)" in error[-1], error
  assert "giving up after 0 restarts" in error[-1], error
  assert len(workers) == WORKERS and not wait_gone(workers)


def test_unloadable_bundle_exits_nonzero_with_the_reason(bundles, tmp_path):
  corrupt = faults._corrupt_weights_matching_digest  # pylint: disable=protected-access
  bundle, reasons = corrupt(bundles["sasrec"], tmp_path)
  out = subprocess.run(faults.serve_args(bundle, free_port(), workers=WORKERS),
                       cwd=faults.REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert error and all(r in error[-1] for r in reasons), error

