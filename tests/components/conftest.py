"""Fixtures for the metrics-store tests: both backends, and one BigQuery emulator per session.

The emulator is the ``bqemulator`` PyPI package, installed into ``.venv-bqemu`` and
started on a free 127.0.0.1 port by ``infra/bqemulator.sh`` (so a fresh machine gets it
from the project's own files). ``RECML_TEST_BQ_EMULATOR=host:port`` uses one that is
already running instead. BigQuery-backed tests carry the ``integration`` mark.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import time
import uuid
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "bqemulator.sh"
PROJECT = "test"
DATASET = "recml_test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def bq_emulator():
  """``host:port`` of a BigQuery emulator that lives for the test session."""
  existing = os.environ.get("RECML_TEST_BQ_EMULATOR")
  if existing:
    yield existing
    return
  port = _free_port()
  start = time.monotonic()
  proc = subprocess.run(["bash", str(SCRIPT), "start", str(port)], capture_output=True,
                        text=True, timeout=900, check=False)
  if proc.returncode:
    pytest.fail(f"{SCRIPT} start {port} failed:\n{proc.stdout}\n{proc.stderr}")
  print(f"\nbqemulator on 127.0.0.1:{port}, up in {time.monotonic() - start:.1f} s")
  try:
    yield f"127.0.0.1:{port}"
  finally:
    subprocess.run(["bash", str(SCRIPT), "stop", str(port)], capture_output=True,
                   timeout=60, check=False)


@pytest.fixture(scope="session")
def bq_client(bq_emulator):
  """An official BigQuery client pointed at the emulator, with the test dataset made."""
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
  from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
  client = bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": f"http://{bq_emulator}"})
  client.create_dataset(DATASET, exists_ok=True, timeout=30)
  return client


@dataclasses.dataclass(frozen=True)
class Backend:
  """A fresh, empty metrics store: its URI and the options ``open_store`` needs."""

  name: str
  uri: str
  options: dict[str, Any]

  def open(self):
    from components import metrics_store  # pylint: disable=g-import-not-at-top
    return metrics_store.open_store(self.uri, **self.options)


@pytest.fixture(params=["duckdb", pytest.param("bigquery", marks=pytest.mark.integration)])
def backend(request, tmp_path) -> Backend:
  """Each test body runs once per backend, against a table of its own."""
  if request.param == "duckdb":
    return Backend("duckdb", f"duckdb:///{tmp_path}/store/metrics.duckdb", {})
  client = request.getfixturevalue("bq_client")
  table = f"metrics_{uuid.uuid4().hex[:12]}"
  # A short deadline: the emulator answers some bad requests with HTTP 500, which
  # the client would otherwise retry for 600 s.
  return Backend("bigquery", f"bq://{PROJECT}.{DATASET}.{table}",
                 {"client": client, "retry_deadline_s": 15})
