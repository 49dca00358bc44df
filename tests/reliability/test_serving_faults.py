"""`recml serve` under faults: bad bundles, a killed device process, hostile input.

Issue 10: a missing or corrupt bundle left the server up answering 503 forever; a dead
device process made it answer 500 forever; GCS blob names could write outside the
download folder; timestamps above int32 were refused; a too-large body got a 400.
The server here is the real CLI in a subprocess (`python -m pipelines.cli serve`) on
a tiny HSTU bundle; faults are real (files edited on disk, SIGKILL).
"""
# pylint: disable=redefined-outer-name  (pytest fixtures)

import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pipelines import cli
from serving import device as device_lib
from serving import registry as registry_lib
from tests.reliability.serving_drills import KINDS, fuzz_and_load, kill_drill
from tests.serving.conftest import MAX_LEN, export_tiny, free_port, request, train_tiny
from tests.serving.conftest import dataset  # pylint: disable=unused-import  (a fixture)
from trainers import evaluate, features
from trainers.input_pipeline import model_batch

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_BODY = 65536
K = 20


@pytest.fixture(scope="module")
def hstu(dataset, tmp_path_factory):
  """(training work directory, bundle directory) of a tiny HSTU."""
  workdir = train_tiny(dataset, str(tmp_path_factory.mktemp("faults-hstu")), "hstu")
  return workdir, export_tiny(workdir, dataset,
                              str(tmp_path_factory.mktemp("faults-bundle") / "bundle"))


def serve_args(bundle: str, port: int, max_restarts: int = 1,
               workers: int | None = None) -> list[str]:
  return [sys.executable, "-m", "pipelines.cli", "serve", "--bundle", bundle, "--port",
          str(port), "--max-batch", "4", "--length-buckets", "4,8",
          "--max-body-bytes", str(MAX_BODY), "--max-restarts", str(max_restarts)] + (
              ["--workers", str(workers)] if workers else [])


class CliServer:
  """`recml serve` in a subprocess; its stderr (the log) goes to ``log``."""

  def __init__(self, bundle: str, log: str, max_restarts: int = 1, workers: int | None = None):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = log
    with open(log, "w", encoding="utf-8") as err:
      self.proc = subprocess.Popen(serve_args(bundle, self.port, max_restarts, workers),
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)

  def health(self):
    try:
      return request("GET", self.url + "/health")
    except OSError:
      return 0, None

  def wait_ready(self, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      assert self.proc.poll() is None, f"recml serve exited: {self.read_log()[-2000:]}"
      status, body = self.health()
      if status == 200:
        return body
      time.sleep(0.2)
    raise TimeoutError(self.read_log()[-2000:])

  def post(self, body, headers: bool = False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request("POST", self.url + "/predict", data, with_headers=headers)

  def read_log(self) -> str:
    with open(self.log, encoding="utf-8") as f:
      return f.read()

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(60)


@pytest.fixture(scope="module")
def server(hstu, tmp_path_factory):
  """The CLI server on the HSTU bundle (the last test of this module ends it)."""
  s = CliServer(hstu[1], str(tmp_path_factory.mktemp("serve-log") / "serve.log"))
  try:
    s.wait_ready()
    yield s
  finally:
    if s.proc.poll() is None:
      assert s.stop() == 0, s.read_log()[-2000:]  # SIGTERM: a clean exit


def raw_ids(dataset_dir: str) -> list[int]:
  return [int(v) for v in features.load_item_vocab(dataset_dir)[features.FIRST_ITEM_ID:]]


# ---------------------------------------------------------------------------
# An unloadable bundle: exit non-zero with the reason, do not serve
# ---------------------------------------------------------------------------


def _flip_bytes(path) -> bytes:
  """Inverts 16 bytes in the middle of a file; returns its new content."""
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
  path.write_bytes(data)
  return bytes(data)


def _missing(bundle, tmp):
  del bundle
  return str(tmp / "no-such-bundle"), ["no-such-bundle", "does not exist"]


def _missing_file(bundle, tmp):
  shutil.copytree(bundle, tmp / "b")
  os.remove(tmp / "b" / "model.stablehlo")
  return str(tmp / "b"), ["model.stablehlo", "missing"]


def _digest_mismatch(bundle, tmp):
  shutil.copytree(bundle, tmp / "b")
  _flip_bytes(tmp / "b" / "weights.npz")
  return str(tmp / "b"), ["weights.npz", "sha256"]


def _corrupt_weights_matching_digest(bundle, tmp):
  """Corrupt weights that pass the digest check (re-recorded): only loading finds out."""
  shutil.copytree(bundle, tmp / "b")
  data = _flip_bytes(tmp / "b" / "weights.npz")
  meta = json.loads((tmp / "b" / "bundle.json").read_text())
  meta["sha256"]["weights.npz"] = hashlib.sha256(data).hexdigest()
  (tmp / "b" / "bundle.json").write_text(json.dumps(meta))
  return str(tmp / "b"), ["cannot load the bundle", "weights.npz is unreadable"]


@pytest.mark.parametrize("make", [_missing, _missing_file, _digest_mismatch,
                                  _corrupt_weights_matching_digest])
def test_unloadable_bundle_exits_nonzero_with_the_reason(make, hstu, tmp_path):
  bundle, reasons = make(hstu[1], tmp_path)
  started = time.monotonic()
  try:  # before: it kept serving (health 500/503 forever), so this timed out
    out = subprocess.run(serve_args(bundle, free_port()), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
  except subprocess.TimeoutExpired:
    pytest.fail("recml serve is still running 120 s after starting on a bad bundle")
  seconds = time.monotonic() - started
  assert out.returncode != 0, out.stderr[-2000:]
  error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert error, out.stderr[-2000:]
  for reason in reasons:
    assert reason in error[-1], error
  print(f"{make.__name__}: exit {out.returncode} after {seconds:.1f}s: {error[-1][:200]}")


# ---------------------------------------------------------------------------
# A killed device process: 503 + Retry-After meanwhile, then answers again
# ---------------------------------------------------------------------------


def test_killed_device_process_is_restarted(server, dataset, record_property):
  ids = raw_ids(dataset)
  body = {"instances": [{"items": ids[:5], "k": K}, {"items": ids[10:12], "k": 5}]}
  status, before = server.post(body)
  assert status == 200, before
  restarts = server.wait_ready()["device_restarts"]

  drill = kill_drill(server.url, body)  # before: 500 for every request, for ever
  answers = drill.pop("answers")
  print(f"device process killed; ready again after {drill['recovery_seconds']}s: {drill}")
  assert drill["recovery_seconds"] is not None and drill["recovery_seconds"] < 60, drill
  record_property("recovery_seconds", drill["recovery_seconds"])
  assert drill["restarts"] == restarts + 1
  assert set(drill["status"]) <= {200, 503}, drill  # never a 500
  unavailable = [(a, h) for s, a, h in answers if s == 503]
  assert unavailable, "no request saw the downtime"
  for answer, headers in unavailable:
    assert "device process" in answer["error"] and int(headers["Retry-After"]) >= 1
  assert any("SIGKILL" in a["error"] for a, _ in unavailable)

  status, after = server.post(body)  # the same answers as before the kill
  assert status == 200
  for a, b in zip(after["predictions"], before["predictions"]):
    assert a["items"] == b["items"]
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)
  log = server.read_log()
  assert f"pid {drill['old_pid']}) died (killed by signal SIGKILL)" in log, log[-2000:]
  assert f"device process restarted: pid {drill['new_pid']}" in log


def test_restart_backoff_is_exponential_and_bounded():
  backoff = device_lib.Backoff(first=0.5, cap=30.0)
  assert [backoff.delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


# ---------------------------------------------------------------------------
# Request size, hostile input, load
# ---------------------------------------------------------------------------


def test_oversized_body_is_413(server, dataset, capsys):
  raw = json.dumps({"instances": [{"items": raw_ids(dataset)[:3]}]}).encode()
  at_limit = raw + b" " * (MAX_BODY - len(raw))
  assert server.post(at_limit)[0] == 200
  status, answer = server.post(at_limit + b" ")
  assert status == 413 and f"> {MAX_BODY}" in answer["error"], answer  # before: 400

  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # chunked: no
  try:                                                                    # Content-Length
    conn.request("POST", "/predict", body=iter([raw, b" " * MAX_BODY]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413, response.read()
  finally:
    conn.close()

  with pytest.raises(SystemExit):
    cli.main(["serve", "--help"])
  assert "larger ones get 413" in " ".join(capsys.readouterr().out.split())


def test_fuzz_and_load_never_answers_5xx(server, dataset):
  report = fuzz_and_load(server.url, raw_ids(dataset), MAX_LEN, K, MAX_BODY, n=2000,
                         concurrency=16, seed=7)
  print(json.dumps(report))
  assert report["requests"] == 2000
  assert not [s for s in report["status"] if s >= 500 or s == 0], report
  assert report["unexpected"] == 0, report
  assert set(report["by_kind"]) == set(KINDS)
  assert {200, 400, 413} <= set(report["status"])


@pytest.mark.parametrize("name", ["a//b", "../x", "/etc/passwd", "a/../../x", "a/./b", "..",
                                  "a/..", "", "a\0b", "vocab//", "a/../"])
def test_hostile_blob_names_are_refused(name, tmp_path):
  with pytest.raises(ValueError, match="unsafe blob name"):
    registry_lib.safe_relpath(name)
  listed = "bundles/v1/" + name  # as listed under the bundle's prefix
  if name:
    with pytest.raises(ValueError, match="unsafe blob name"):
      registry_lib.blob_path(str(tmp_path), "bundles/v1/", listed)
  else:  # the prefix itself: a folder placeholder, nothing to write
    assert registry_lib.blob_path(str(tmp_path), "bundles/v1/", listed) is None


def test_blob_names_map_inside_the_destination(tmp_path):
  dest = str(tmp_path / "dest")
  os.makedirs(dest)
  os.symlink(str(tmp_path), os.path.join(dest, "link"))  # a link that leaves dest
  root = os.path.realpath(dest)
  cases = {
      "bundles/v1/model.stablehlo": os.path.join(root, "model.stablehlo"),
      "bundles/v1/vocab/items.txt": os.path.join(root, "vocab", "items.txt"),
      "bundles/v1/a..b/..c": os.path.join(root, "a..b", "..c"),
      "bundles/v1/": None, "bundles/v1/vocab/": None,
  }
  for name, want in cases.items():
    assert registry_lib.blob_path(dest, "bundles/v1/", name) == want, name
  for name in ("bundles/v1//etc/passwd", "bundles/v1/../v2/x", "bundles/v1/a/../../../x",
               "bundles/v10/x", "other/model.stablehlo", "bundles/v1/link/escape"):
    with pytest.raises(ValueError, match="blob"):
      registry_lib.blob_path(dest, "bundles/v1/", name)
  # the reference for the mapped ones: inside dest once resolved (what the old rule missed:
  # os.path.join(dest, "/etc/passwd") is /etc/passwd)
  for want in filter(None, cases.values()):
    assert os.path.commonpath([root, os.path.realpath(want)]) == root


# ---------------------------------------------------------------------------
# int64 timestamps: accepted, and the served scores are the trainer's
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_scores(hstu):
  """``(max_len, scores)``: ``scores(history, times, query_times)`` ``[B, max_len]`` ->
  ``[B, V]``, the training forward of the HSTU (every position, padded to max_len) at the
  last position. int64 times go through the trainer's conversion (``model_batch``, as in
  training and evaluation); int32 ones straight in (the model's plain int32 path)."""
  config, model, params, _ = evaluate.load_model(hstu[0])

  @jax.jit
  def forward(params, history, times, query_times):
    def fwd(m):
      scores = m(history, times, query_times)[:, -1] @ m.all_candidates().T
      return scores[:, :m.config.vocab_size]  # rows past the vocabulary are padding
    return model.apply({"params": params}, method=fwd)

  def scores(history, times, query_times):
    if times.dtype == np.int64:
      batch = model_batch({"timestamps": times, "query_timestamps": query_times})
      times, query_times = batch["timestamps"], batch["query_timestamps"]
    return np.array(forward(params, history, times, query_times))
  return config.model_config.max_len, scores


@pytest.mark.parametrize("base", [1_900_000_000, 2**31 + 5, 2**32 + 99, 4_102_444_800],
                         ids=["2030", "2^31+5", "2^32+99", "2100"])
def test_int64_timestamps_match_the_trainer(base, server, trainer_scores, dataset):
  max_len, trainer_scores = trainer_scores
  vocab = features.load_item_vocab(dataset)
  rng = np.random.default_rng(base % 1000)
  instances, rows = [], []
  for n in [1, 2, 3, 5, 8, 12] * 2:
    items = rng.integers(features.FIRST_ITEM_ID, len(vocab), n)
    ts = base + np.cumsum(rng.integers(1, 10**6, n))          # gaps: seconds to days
    query = int(ts[-1] + rng.integers(1, 10**6))
    instances.append({"items": [int(vocab[i]) for i in items], "timestamps": ts.tolist(),
                      "query_timestamp": query, "k": K, "exclude_history": False})
    row = np.zeros((3, max_len), np.int64)                    # right-aligned, 0-padded
    row[0, max_len - n:], row[1, max_len - n:] = items, ts
    row[2, max_len - n:] = np.append(ts[1:], query)           # next event, then the query
    rows.append(row)
  history, times, query_times = np.stack(rows, axis=1)
  history = history.astype(np.int32)
  want = trainer_scores(history, times, query_times)
  # the reference for the trainer's int64 path: the same users 30 years earlier, as plain
  # int32 times (no conversion), give the same scores (only gaps matter)
  shift = base - 950_000_000
  moved = trainer_scores(history, *(np.where(t > 0, t - shift, 0).astype(np.int32)
                                    for t in (times, query_times)))
  np.testing.assert_allclose(want, moved, rtol=1e-5, atol=1e-6)
  want[:, :features.FIRST_ITEM_ID] = -np.inf

  status, body = server.post({"instances": instances})  # before: 400 beyond 2**31 - 1
  assert status == 200, body
  for pred, w in zip(body["predictions"], want):
    ids = [vocab.index(str(raw)) for raw in pred["items"]]
    np.testing.assert_allclose(pred["scores"], w[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pred["scores"], np.sort(w)[::-1][:K], rtol=1e-5, atol=1e-5)

  # the time path is live at these dates: zero gaps give other scores
  flat = [{**inst, "timestamps": [inst["query_timestamp"]] * len(inst["items"])}
          for inst in instances if len(inst["items"]) > 2]
  _, zero_gaps = server.post({"instances": flat})
  served = [p for p, inst in zip(body["predictions"], instances) if len(inst["items"]) > 2]
  assert any(a["scores"] != b["scores"] for a, b in zip(served, zero_gaps["predictions"]))


def test_timestamp_bounds(server, dataset):
  items = raw_ids(dataset)[:2]
  assert server.post({"instances": [{"items": items, "timestamps": [0, 2**63 - 1],
                                     "query_timestamp": 2**63 - 1}]})[0] == 200
  for ts in ([0, 2**63], [-1, 5]):
    status, answer = server.post({"instances": [{"items": items, "timestamps": ts}]})
    assert status == 400 and "2**63 - 1" in answer["error"], answer


def test_gives_up_after_max_restarts(server):
  """Last in this module: it ends the server. With ``--max-restarts 1``, a device process
  that dies again within a minute of its restart makes `recml serve` exit 1 with the
  reason (the platform then replaces the container), instead of answering 500 forever."""
  kills = []
  for _ in range(3):
    pid = server.wait_ready()["device_pid"]
    os.kill(pid, signal.SIGKILL)
    kills.append(pid)
    deadline = time.monotonic() + 120
    while server.proc.poll() is None and time.monotonic() < deadline:
      status, health = server.health()
      if status == 200 and health["device_pid"] != pid:
        break  # restarted: kill it again
      time.sleep(0.1)
    if server.proc.poll() is not None:
      break
  assert server.proc.wait(60) == 1
  assert len(kills) <= 2  # one restart at most
  error = [line for line in server.read_log().splitlines() if line.startswith("error:")]
  assert error and f"pid {kills[-1]}) died (killed by signal SIGKILL)" in error[-1], error
  assert "giving up after 1 restarts" in error[-1], error
