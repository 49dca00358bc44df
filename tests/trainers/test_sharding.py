"""Sharded training on 8 virtual CPU devices, against single-device and single-process runs.

Each test starts a fresh Python process (tests/trainers/sharding_runs.py) with
``--xla_force_host_platform_device_count``: the device count is fixed when JAX starts.
References are independent runs: one device, one process, an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.trainers.conftest import write_cyclic_dataset
from tests.trainers.test_ranking_train import _write as write_clicks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 600


def _env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("RECML_")}
  env.update(TF_CPP_MIN_LOG_LEVEL="3", **extra)
  return env


def _run(devices: int, scenario: str, *args: str, env=None) -> dict:
  proc = subprocess.run(
      [sys.executable, "-m", "tests.trainers.sharding_runs", str(devices), scenario, *args],
      cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT)
  return _result(proc.returncode, proc.stdout, proc.stderr)


def _result(code: int, stdout: str, stderr: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert code == 0 and lines, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
  return write_cyclic_dataset(tmp_path_factory.mktemp("cyclic"))


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
  data = str(tmp_path_factory.mktemp("clicks"))
  write_clicks(data)
  return data


@pytest.mark.integration
@pytest.mark.parametrize("model", ["sasrec", "dcnv2"])
def test_every_table_sharding_trains_like_one_device(model, sequences, clicks, tmp_path):
  data = sequences if model == "sasrec" else clicks
  out = _run(8, "equivalence", model, data, str(tmp_path))
  reference = np.array(out["reference"])
  assert len(reference) == 2 and reference[1] < reference[0]  # it trained
  for kind in ("replicated", "table", "row", "column"):
    assert out[kind]["kinds"] == [kind]  # every table of the model got that sharding
    np.testing.assert_allclose(out[kind]["losses"], reference, rtol=1e-6)
    assert out[kind]["param_gap"] < 1e-6, (kind, out[kind]["param_gap"])


def test_row_wise_lookup_never_gathers_the_table():
  out = _run(8, "hlo")
  rows, dim = out["rows"], out["dim"]
  ops = [op for op, _ in out["collectives"]]
  # The partial rows are summed and scattered (forward), output gradients gathered
  # (backward): activations move, the table does not.
  assert "reduce-scatter" in ops, out
  for op, shape in out["collectives"]:
    dims = [int(x) for x in shape.split("[")[1].split("]")[0].split(",") if x]
    assert not (op == "all-gather" and rows in dims), (op, shape)
    assert np.prod(dims) < rows * dim, (op, shape)  # nothing table-sized crosses devices


def test_a_budget_below_the_table_forces_row_wise(sequences, tmp_path):
  out = _run(8, "budget", sequences, str(tmp_path))
  plan, budget = out["plan"], out["plan"]["budget_bytes"]
  (table,) = plan["tables"]
  assert out["replicated_bytes"] > budget  # replicated (and table-wise) cannot fit
  assert table["kind"] == "row"  # 12 wide: no column split over 8 devices
  assert table["bytes_per_device"] == out["replicated_bytes"] // 8 <= budget
  assert (tmp_path / "sharding_plan.txt").read_text().count("item_embedding") == 1


@pytest.mark.integration
def test_checkpoint_from_8_devices_continues_on_1_and_4(sequences, tmp_path):
  out = _run(8, "reshard", "sasrec", sequences, str(tmp_path))
  full = np.array(out["uninterrupted"])
  for devices in (1, 4):
    got = out[f"resumed_on_{devices}"]
    np.testing.assert_allclose(got["losses"], full, rtol=1e-6)
    assert got["param_gap"] < 1e-6, (devices, got["param_gap"])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.integration
def test_two_processes_of_4_devices_train_like_one_process_of_8(sequences, tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.trainers.sharding_runs", "4", "multiprocess", "sasrec",
       sequences, str(tmp_path / "two")], cwd=ROOT, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=_env(RECML_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", RECML_NUM_PROCESSES="2",
               RECML_PROCESS_ID=str(i))) for i in range(2)]
  outs = []
  for proc in procs:
    try:
      stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
      for p in procs:
        p.kill() if p.poll() is None else None
    outs.append(_result(proc.returncode, stdout, stderr))
  one = _run(8, "multiprocess", "sasrec", sequences, str(tmp_path / "one"))
  assert [o["processes"] for o in outs] == [2, 2] and one["processes"] == 1
  assert {o["devices"] for o in outs} == {one["devices"]} == {8}
  np.testing.assert_allclose(outs[0]["losses"], one["losses"], rtol=1e-6)
  two, ref = np.load(tmp_path / "two" / "params.npz"), np.load(tmp_path / "one" / "params.npz")
  assert sorted(two.files) == sorted(ref.files)
  assert two["item_embedding/embedding"].shape == (64, 16)  # whole tables, not one shard
  for name in ref.files:
    if name.endswith("qkv/bias"):  # key bias: zero true gradient (see sharding_runs.max_diff)
      continue
    np.testing.assert_allclose(two[name], ref[name], atol=1e-6, err_msg=name)
  # Only process 0 wrote the run's files.
  metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
  assert metrics["num_processes"] == 2 and metrics["num_devices"] == 8


def test_a_checkpoint_with_unpadded_tables_restores_padded(tmp_path):
  """Work directories written before tables had ROW_ALIGNMENT rows resume: the missing
  rows (past the vocabulary, never looked up) come back as zeros; other arrays as saved."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from trainers import checkpoints, layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  old = {"item_embedding": {"embedding": rng.normal(size=(50, 8)).astype(np.float32)},
         "dense": {"kernel": rng.normal(size=(8, 3)).astype(np.float32)}}
  ckpt = checkpoints.Checkpoints(str(tmp_path), async_save=False)
  ckpt.save_latest(1, jax.tree.map(jnp.asarray, old), {"epoch": 1})
  rows = layers.padded_rows(50)
  abstract = {"item_embedding": {"embedding": jax.ShapeDtypeStruct((rows, 8), jnp.float32)},
              "dense": {"kernel": jax.ShapeDtypeStruct((8, 3), jnp.float32)}}
  state, meta = ckpt.restore_latest(abstract)
  ckpt.close()
  table = np.asarray(state["item_embedding"]["embedding"])
  assert meta == {"epoch": 1} and table.shape == (64, 8)
  np.testing.assert_array_equal(table[:50], old["item_embedding"]["embedding"])
  np.testing.assert_array_equal(table[50:], 0.0)
  np.testing.assert_array_equal(np.asarray(state["dense"]["kernel"]), old["dense"]["kernel"])


def test_sharding_settings_parse_and_refuse_bad_values():
  from trainers import configs  # pylint: disable=g-import-not-at-top
  config = configs.apply_overrides(configs.get_config("sasrec"), [
      "sharding_pins=item_embedding=row,embeddings/sparse_1=table", "embedding_sharding=column",
      "num_devices=4", "device_memory_gb=0.5"])
  assert config.pins() == {"item_embedding": "row", "embeddings/sparse_1": "table"}
  assert (config.embedding_sharding, config.num_devices, config.device_memory_gb) == (
      "column", 4, 0.5)
  assert configs.TrainConfig.from_dict(config.to_dict()).pins() == config.pins()
  # Placement may change on resume; the model may not.
  assert {"num_devices", "embedding_sharding", "sharding_pins",
          "device_memory_gb"} <= configs.RESUMABLE_FIELDS
  with pytest.raises(ValueError, match="sharding_pins entry 'item_embedding=diagonal'"):
    configs.get_config("sasrec", sharding_pins=("item_embedding=diagonal",))
  with pytest.raises(ValueError, match="embedding_sharding must be one of"):
    configs.get_config("sasrec", embedding_sharding="rows")
