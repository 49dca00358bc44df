"""`recml serve` start-up: progress per compiled shape, the compile cache, the help text.

Issue 14: the server printed "serving ... on http://..." at once and then was not ready
for a minute, with no sign of progress; every restart compiled every shape again; the
request format was in a module docstring only. The servers here are the real CLI in a
subprocess on the tiny bundles of ``conftest.py``, with ``$XDG_CACHE_HOME`` (the default
cache root) in a temporary folder.
"""
# pylint: disable=redefined-outer-name  (pytest fixtures)

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from serving import cli, predictor, protocol
from tests.serving.conftest import free_port, request
from trainers import export, features

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCHES, LENGTHS = (1, 2), (4, 8, 12)  # --max-batch 2, --length-buckets 4,8 (max_len 12)
SHAPES = {(b, n) for b in BATCHES for n in LENGTHS}
PROGRESS = re.compile(r"compiling (\d+)/(\d+): batch (\d+) x length (\d+) \.\.\. "
                      r"[\d.]+ s( \(from cache\))?$")
OWN = ("starting: ", "compile cache: ", "compiling ", "compiled and ", "ready in ",
       "warning: ", "error: ")  # the lines of recml serve (and its device process)
SUMMARY = re.compile(r"compiled and warmed up in [\d.]+ s \((\d+) shapes, from cache: (\d+)\)$")


class Start:
  """One `recml serve` run: its output lines until ready, seconds from process start to
  the ready line, and /health when the ``starting`` line came out."""

  def __init__(self, bundle: str, cache_home: str, *extra: str):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    started = time.monotonic()
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--bundle", bundle, "--port",
         str(self.port), "--max-batch", str(BATCHES[-1]), "--length-buckets",
         ",".join(map(str, LENGTHS[:-1])), *extra],
        cwd=REPO, env={**os.environ, "XDG_CACHE_HOME": cache_home},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.rstrip("\n")) for x in self.proc.stdout],
                     daemon=True).start()
    self.lines, self.health_when_starting = [], None
    deadline = started + 240
    while not self.lines or not self.lines[-1].startswith("ready in "):
      try:
        line = lines.get(timeout=1)
      except queue.Empty:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          pytest.fail("recml serve exited or was not ready in 240 s:\n"
                      + "\n".join(self.lines[-30:]))
        continue
      self.lines.append(line)
      if line.startswith("starting: "):
        self.health_when_starting = self.health()
    self.ready_seconds = time.monotonic() - started
    self.health_when_ready = self.health()
    self.output = [x for x in self.lines if x.startswith(OWN)]  # not the log, not JAX's

  def health(self) -> int:
    try:
      return request("GET", self.url + "/health")[0]
    except OSError:  # not listening yet
      return 0

  def progress(self) -> list[tuple[int, ...]]:
    """``(n, total, batch, length, from cache)`` of each progress line."""
    out = []
    for line in self.output:
      if line.startswith("compiling "):
        m = PROGRESS.match(line)
        assert m, line
        out.append((*map(int, m.groups()[:4]), bool(m.group(5))))
    return out

  def summary(self) -> tuple[int, int]:
    """``(shapes, from cache)`` of the final progress line."""
    found = [SUMMARY.match(x) for x in self.output if x.startswith("compiled and warmed up")]
    assert len(found) == 1 and found[0], self.output
    return int(found[0].group(1)), int(found[0].group(2))

  def stop(self) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(60)


def cache_entries(directory: str) -> dict[str, float]:
  """JAX's cache entries (one per executable) in a folder -> their modification times."""
  if not os.path.isdir(directory):
    return {}
  return {name: os.path.getmtime(os.path.join(directory, name))
          for name in os.listdir(directory) if name.endswith("-cache")}


def cache_dir(cache_home: str, bundle: str) -> str:
  digest = predictor.bundle_digest(export.verify_bundle_files(bundle))
  return os.path.join(cache_home, "recml", "compile", digest)


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="module")
def cold(bundles, cache_home):
  """The first start of the SASRec bundle (an empty cache), stopped."""
  start = Start(bundles["sasrec"], cache_home)
  assert start.stop() == 0
  return start


@pytest.fixture(scope="module")
def warm(cold, bundles, cache_home):
  """The second start of the same bundle, left running for the module's tests."""
  del cold  # started and stopped first
  start = Start(bundles["sasrec"], cache_home)
  yield start
  assert start.stop() == 0, "\n".join(start.lines[-30:])


def test_cold_start_prints_a_line_per_shape_then_ready(cold, bundles, cache_home):
  out = cold.output
  directory = cache_dir(cache_home, bundles["sasrec"])
  assert re.fullmatch(f"starting: serving {re.escape(bundles['sasrec'])} on "
                      f"{re.escape(cold.url)} \\(health /health, predict /predict.*\\); "
                      "not ready until compiled", out[0]), out[0]
  assert cold.health_when_starting != 200  # said "starting", and it was not ready
  assert out[1] == f"compile cache: {directory} (0 executables)"
  progress = cold.progress()
  assert [p[:2] for p in progress] == [(n, len(SHAPES)) for n in range(1, len(SHAPES) + 1)]
  assert {(b, n) for _, _, b, n, _ in progress} == SHAPES  # one line per shape, each once
  assert not any(p[4] for p in progress)
  assert cold.summary() == (len(SHAPES), 0)
  assert out.index(next(x for x in out if x.startswith("compiled and"))) < len(out) - 1
  assert re.fullmatch(r"ready in [\d.]+ s: serving .* on http://127\.0\.0\.1:\d+ .*", out[-1])
  assert cold.health_when_ready == 200
  assert len(cache_entries(directory)) == len(SHAPES)  # every executable written


def test_restart_reads_every_shape_from_the_cache(cold, warm, bundles, cache_home):
  directory = cache_dir(cache_home, bundles["sasrec"])
  assert f"compile cache: {directory} ({len(SHAPES)} executables)" in warm.output
  progress = warm.progress()
  assert {(b, n) for _, _, b, n, _ in progress} == SHAPES
  assert all(p[4] for p in progress), warm.output
  assert warm.summary() == (len(SHAPES), len(SHAPES))  # JAX's cache-hit events
  assert len(cache_entries(directory)) == len(SHAPES)  # read, nothing new written
  assert warm.health_when_ready == 200
  print(f"ready after {cold.ready_seconds:.1f} s cold, {warm.ready_seconds:.1f} s warm")
  assert warm.ready_seconds < cold.ready_seconds


def test_another_bundle_does_not_read_this_bundles_cache(warm, bundles, cache_home):
  sasrec = cache_dir(cache_home, bundles["sasrec"])
  before = cache_entries(sasrec)
  start = Start(bundles["hstu"], cache_home)
  assert start.stop() == 0
  own = cache_dir(cache_home, bundles["hstu"])
  assert own != sasrec
  assert f"compile cache: {own} (0 executables)" in start.output
  assert start.summary() == (len(SHAPES), 0)
  assert len(cache_entries(own)) == len(SHAPES)
  assert cache_entries(sasrec) == before  # neither read into nor written to
  del warm


def test_no_compile_cache_compiles_everything(warm, bundles, cache_home):
  directory = cache_dir(cache_home, bundles["sasrec"])
  before = cache_entries(directory)
  start = Start(bundles["sasrec"], cache_home, "--no-compile-cache")
  assert start.stop() == 0
  assert not any(x.startswith("compile cache:") for x in start.output)
  assert start.summary() == (len(SHAPES), 0)  # though this bundle's shapes are cached
  assert cache_entries(directory) == before
  assert sorted(os.listdir(os.path.join(cache_home, "recml", "compile"))) == sorted(
      [os.path.basename(directory), os.path.basename(cache_dir(cache_home, bundles["hstu"]))])
  del warm


def test_port_in_use_is_an_error_not_a_false_ready(bundles, tmp_path):
  with socket.socket() as other:  # another server on the port
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--bundle",
                          bundles["sasrec"], "--port", str(port)], cwd=REPO,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stdout + out.stderr
  assert f"error: port {port} is in use" in out.stderr
  assert "ready" not in out.stdout and not os.listdir(tmp_path)  # nothing started


def test_bundle_digest_follows_every_file(bundles):
  meta = export.verify_bundle_files(bundles["sasrec"])
  digest = predictor.bundle_digest(meta)
  assert re.fullmatch(r"[0-9a-f]{16}", digest)
  assert predictor.bundle_digest(json.loads(json.dumps(meta))) == digest
  for name in meta["sha256"]:
    changed = {**meta, "sha256": {**meta["sha256"], name: "0" * 64}}
    assert predictor.bundle_digest(changed) != digest, name
  assert predictor.compile_cache_dir(meta, "/x") == f"/x/{digest}"


# ---------------------------------------------------------------------------
# The request format: `recml serve --help` and the README
# ---------------------------------------------------------------------------


def flat(text: str) -> str:
  return " ".join(text.split())


@pytest.fixture(scope="module")
def help_text():
  out = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=True)
  return out.stdout


def readme_serving() -> str:
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  start = text.index("**Serving.** `recml export")
  return text[start:text.index("\n`recml train` writes", start)]


def curl_command(text: str) -> str:
  """The curl command of a text (continuation lines joined)."""
  lines = text.splitlines()
  at = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
  command = []
  for line in lines[at:]:
    command.append(line.strip().rstrip("\\").strip())
    if not line.rstrip().endswith("\\"):
      return " ".join(command)
  raise AssertionError("unterminated curl command")


def curl_body(command: str) -> dict:
  return json.loads(shlex.split(command)[shlex.split(command).index("-d") + 1])


def documented_answer(text: str) -> dict:
  """The answer shown after the curl command (``-> {...}``)."""
  after = text[text.index("curl "):]
  line = next(x for x in after.splitlines() if "-> " in x)
  return json.loads(line.split("-> ", 1)[1])


def test_help_holds_the_request_format(help_text):
  limits = protocol.Limits()
  text = flat(help_text)
  for part in ('{"instances": [{"items": [1193, 661, 914], "k": 10,',   # retrieval
               '-> {"predictions": [{"items": [2355, 1197, ...]',
               '"candidates": [{"item": "1572"}',                        # ranking
               '-> {"predictions": [{"score": 0.91},',
               "GET /health", "GET /v1/metadata", "POST /predict",     # routes
               '{"error": "<reason>"}', "413", "Retry-After",           # errors
               f"--max-body-bytes (default {limits.max_body_bytes} bytes",  # limits
               f"--max-instances instances per request (default {limits.max_instances})",
               f"each id at most {limits.max_id_chars} characters",
               f"k from 1 to the bundle's max_k (`recml export --max-k`, default "
               f"{export.DEFAULT_MAX_K}), default {protocol.DEFAULT_K}",
               f"candidates per instance (default {limits.max_candidates})",
               "--compile-cache", "ready in N s"):
    assert part in text, part
  assert cli.CURL_EXAMPLE in help_text  # verbatim, so it can be copied
  assert curl_body(curl_command(help_text)) == curl_body(curl_command(cli.CURL_EXAMPLE))


def test_readme_gives_routes_errors_and_the_limits():
  limits = protocol.Limits()
  text = flat(readme_serving())
  assert limits.max_body_bytes == 2**20
  for part in ("`GET /health`", "`GET /v1/metadata`", "`POST /predict`",
               '`{"error": "<reason>"}`', "413", "`Retry-After`",
               "a body of at most 1 MiB (`--max-body-bytes`)",
               f"at most {limits.max_instances} instances per request (`--max-instances`)",
               f"ids of at most {limits.max_id_chars} characters",
               f"`k` from 1 to the bundle's `max_k` (`recml export --max-k`, default "
               f"{export.DEFAULT_MAX_K}; default `k` {protocol.DEFAULT_K})",
               f"at most {limits.max_candidates} candidates per ranking instance",
               "`--compile-cache DIR`"):
    assert part in text, part


def test_readme_curl_example_runs_against_recml_serve(warm, bundles):
  section = readme_serving()
  command = curl_command(section)
  body = curl_body(command)
  assert body == curl_body(curl_command(cli.CURL_EXAMPLE))  # README and --help agree
  documented = documented_answer(section)
  assert documented == documented_answer(cli.CURL_EXAMPLE)
  # the test bundle's own ids in place of ml-1m's (unknown ids would be OOV, not errors)
  bundle = export.load_bundle(bundles["sasrec"])
  ids = bundle.raw_ids(range(features.FIRST_ITEM_ID, features.FIRST_ITEM_ID
                             + len(body["instances"][0]["items"])))
  body["instances"][0]["items"] = ids
  args = shlex.split(command)
  args[args.index("-d") + 1] = json.dumps(body)
  args = [a.replace("http://127.0.0.1:8080", warm.url) for a in args]
  if shutil.which("curl"):  # the command itself
    answer = json.loads(subprocess.run(args, capture_output=True, text=True, timeout=60,
                                       check=True).stdout)
  else:  # the same request
    status, answer = request("POST", warm.url + "/predict", json.dumps(body).encode())
    assert status == 200, answer
  k = body["instances"][0]["k"]
  [got] = answer["predictions"]
  assert set(got) == set(documented["predictions"][0]) == {"items", "scores"}
  assert len(got["items"]) == len(got["scores"]) == k
  # the same answer as the bundle's predictor in this process (no server)
  row = protocol.parse_body(json.dumps(body).encode(), bundle, protocol.Limits())
  local = predictor.Predictor(export.load_bundle(bundles["sasrec"]), (1,), (12,))
  [(scores, top)] = predictor.run_rows(local, row)
  assert got["items"] == bundle.raw_ids(top[:k])
  np.testing.assert_allclose(got["scores"], scores[:k], rtol=1e-5, atol=1e-6)


def test_documented_error_is_the_servers(warm, bundles):
  documented = re.search(r'"(instances\[0\]\.k must be an integer in \[1, 100\], got 500)"',
                         flat(cli._serve_epilog())).group(1)  # pylint: disable=protected-access
  assert f"`{documented}`" in flat(readme_serving())
  bundle = export.load_bundle(bundles["sasrec"], model=False)
  status, answer = request("POST", warm.url + "/predict", json.dumps(
      {"instances": [{"items": bundle.raw_ids([2]), "k": 500}]}).encode())
  assert status == 400
  assert answer == {"error": documented.replace("100", str(bundle.max_k))}
