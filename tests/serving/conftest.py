"""Shared fixtures: tiny trained SASRec/HSTU models, their bundles, and live servers.

Models are the smoke presets with two blocks (so HSTU's query timestamps reach the
last position through a lower layer), trained for a few steps on a small dataset whose
raw item ids are integers and whose time gaps vary (so HSTU's time buckets matter).
Servers are the real aiohttp application on 127.0.0.1, in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from trainers import features

VOCAB = 60
MAX_LEN = 12


def write_dataset(path, users=120, seed=0):
  rng = np.random.default_rng(seed)
  events = {}
  for u in range(users):
    start, n = int(rng.integers(0, VOCAB - 2)), int(rng.integers(4, 2 * MAX_LEN))
    items = [features.FIRST_ITEM_ID + (start + 3 * i) % (VOCAB - 2) for i in range(n)]
    gaps = rng.integers(1, 10**6, n)
    events[u] = (items, list(1_000_000 + np.cumsum(gaps)))
  raw = ["<pad>", "<oov>"] + [str(1000 + 7 * i) for i in range(VOCAB - 2)]
  features.write_sequence_dataset(str(path), events, item_vocab_size=VOCAB, max_len=MAX_LEN,
                                  item_vocab=raw, source={"name": "serving-test"})
  return str(path)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("serving-data"))


# each sequential model's own small settings for train_tiny
TINY = {"sasrec": ["ffn_dim=16"], "bert4rec": ["ffn_dim=16", "attention_dropout=0.0"],
        "hstu": ["attention_dim=8", "linear_dim=8"], "mamba4rec": ["d_state=8"]}


def train_tiny(dataset: str, workdir: str, name: str) -> str:
  """Trains the tiny ``name`` model (a key of :data:`TINY`) into ``workdir``."""
  from components import train as train_step
  train_step.run(dataset, workdir, name, [
      "epochs=1", "max_steps_per_epoch=3", f"max_len={MAX_LEN}", "embedding_dim=16",
      "num_blocks=2", "batch_size=32", "num_negatives=16", "eval_batch_size=64",
      "patience=0", "dropout=0.0"] + TINY[name])
  return workdir


def export_tiny(workdir: str, dataset: str, path: str) -> str:
  """The bundle of a :func:`train_tiny` model (``max_k`` 20) at ``path``."""
  from components import export as export_step
  export_step.run(workdir, path, dataset, max_k=20)
  return path


@pytest.fixture(scope="session")
def trained(dataset, tmp_path_factory):
  """model name -> training work directory (train step's Model artifact layout)."""
  return {name: train_tiny(dataset, str(tmp_path_factory.mktemp(f"model-{name}")), name)
          for name in ("sasrec", "hstu")}


@pytest.fixture(scope="session")
def bundles(trained, dataset, tmp_path_factory):
  """model name -> bundle directory."""
  return {name: export_tiny(workdir, dataset,
                            str(tmp_path_factory.mktemp(f"bundle-{name}") / "bundle"))
          for name, workdir in trained.items()}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """The real server application on 127.0.0.1, run by an event loop in a thread."""

  def __init__(self, bundle: str, **kwargs):
    from aiohttp import web
    from serving import server
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.loop = asyncio.new_event_loop()
    # three length buckets (the bundles' max_len is 12): short histories run short
    self.app = server.make_app(bundle, **{"buckets": (1, 2, 4, 8), "length_buckets": (4, 8),
                                         **kwargs})
    self.runner = web.AppRunner(self.app)
    self.loop.run_until_complete(self.runner.setup())
    self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
    self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
    self.thread.start()

  def wait_ready(self, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      status, body = self.get("/health")
      if status == 200:
        return
      assert status == 503, body
      time.sleep(0.2)
    raise TimeoutError("server not ready")

  def get(self, route: str):
    return request("GET", self.url + route)

  def post(self, body, route: str = "/predict"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request("POST", self.url + route, data)

  def close(self) -> None:
    asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(10)


def request(method: str, url: str, data: bytes | None = None, with_headers: bool = False):
  """``(status, JSON body)``, or ``(status, JSON body, headers)`` ``with_headers``."""
  req = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      out = r.status, json.loads(r.read()), r.headers
  except urllib.error.HTTPError as e:
    out = e.code, json.loads(e.read() or b"null"), e.headers
  return out if with_headers else out[:2]


@pytest.fixture(scope="session")
def servers(bundles):
  """model name -> a ready Server."""
  started = {name: Server(path) for name, path in bundles.items()}
  try:
    for s in started.values():
      s.wait_ready()
    yield started
  finally:
    for s in started.values():
      s.close()


@pytest.fixture(scope="session")
def served(trained, servers, dataset, tmp_path_factory):
  """``served(name) -> (workdir, Server)`` for any model of :data:`TINY`: sasrec and hstu
  from ``trained``/``servers``, the others trained, exported and started on first use."""
  extra = {}

  def get(name: str):
    if name in servers:
      return trained[name], servers[name]
    if name not in extra:
      workdir = train_tiny(dataset, str(tmp_path_factory.mktemp(f"model-{name}")), name)
      bundle = export_tiny(workdir, dataset,
                           str(tmp_path_factory.mktemp(f"bundle-{name}") / "bundle"))
      extra[name] = workdir, Server(bundle)
      extra[name][1].wait_ready()
    return extra[name]
  yield get
  for _, server in extra.values():
    server.close()


@pytest.fixture
def start_server():
  """``start_server(bundle, **make_app_kwargs)`` -> a ready Server, closed after the test."""
  started = []

  def start(bundle: str, **kwargs) -> Server:
    server = Server(bundle, **kwargs)
    started.append(server)
    server.wait_ready()
    return server
  yield start
  for server in started:
    server.close()
