"""Multi-process start: reading the environment, and two real processes joined on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from trainers import distributed
from trainers.distributed import ProcessInfo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cluster_spec(task_type, index, pools=None):
  pools = pools or {
      "workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
      "workerpool1": [f"cmle-training-workerpool1-ab-{i}:2222" for i in range(3)],
  }
  return json.dumps({"cluster": pools, "environment": "cloud",
                     "task": {"type": task_type, "index": index, "trial": ""}})


def test_no_environment_is_one_process():
  assert distributed.detect({}) == ProcessInfo(0, 1, "", "single")
  assert not distributed.detect({}).multi_process
  assert distributed.initialize({}) == ProcessInfo(0, 1, "", "single")  # a no-op


def test_explicit_variables():
  env = {"RECML_COORDINATOR_ADDRESS": "10.0.0.1:1234", "RECML_NUM_PROCESSES": "4",
         "RECML_PROCESS_ID": "3"}
  assert distributed.detect(env) == ProcessInfo(3, 4, "10.0.0.1:1234", "explicit")
  # explicit settings win over anything the platform set
  assert distributed.detect({**env, "CLUSTER_SPEC": cluster_spec("workerpool0", 0)}).source \
      == "explicit"


@pytest.mark.parametrize("env, match", [
    ({"RECML_COORDINATOR_ADDRESS": "h:1", "RECML_NUM_PROCESSES": "2"}, "RECML_PROCESS_ID"),
    ({"RECML_PROCESS_ID": "0"}, "RECML_COORDINATOR_ADDRESS, RECML_NUM_PROCESSES"),
    ({"RECML_COORDINATOR_ADDRESS": "h:1", "RECML_NUM_PROCESSES": "two",
      "RECML_PROCESS_ID": "0"}, "RECML_NUM_PROCESSES must be an integer"),
    ({"RECML_COORDINATOR_ADDRESS": "h:1", "RECML_NUM_PROCESSES": "2",
      "RECML_PROCESS_ID": "2"}, "RECML_PROCESS_ID is 2"),
    ({"RECML_COORDINATOR_ADDRESS": "h:1", "RECML_NUM_PROCESSES": "2",
      "RECML_PROCESS_ID": "-1"}, "RECML_PROCESS_ID must be >= 0"),
    ({"RECML_COORDINATOR_ADDRESS": "h:1", "RECML_NUM_PROCESSES": "0",
      "RECML_PROCESS_ID": "0"}, "RECML_NUM_PROCESSES must be >= 1"),
    ({"RECML_COORDINATOR_ADDRESS": "nohost", "RECML_NUM_PROCESSES": "2",
      "RECML_PROCESS_ID": "0"}, "RECML_COORDINATOR_ADDRESS must be host:port"),
    ({"RECML_DISTRIBUTED": "yes"}, "RECML_DISTRIBUTED"),
])
def test_explicit_errors_name_the_variable(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.detect(env)


def test_vertex_cluster_spec_numbers_replicas_over_the_pools():
  # workerpool0 (1 primary) + workerpool1 (3 workers): ids 0..3, coordinator on the primary
  ids = [distributed.detect({"CLUSTER_SPEC": cluster_spec(t, i)})
         for t, i in [("workerpool0", 0), ("workerpool1", 0), ("workerpool1", 1),
                      ("workerpool1", 2)]]
  host = "cmle-training-workerpool0-ab-0"
  assert ids == [ProcessInfo(p, 4, f"{host}:{distributed.DEFAULT_COORDINATOR_PORT}", "vertex")
                 for p in range(4)]
  env = {"CLUSTER_SPEC": cluster_spec("workerpool1", 2), "RECML_COORDINATOR_PORT": "9999"}
  assert distributed.detect(env).coordinator == f"{host}:9999"
  # pools count in workerpool order whatever the JSON order; an evaluator comes last
  pools = {"workerpool3": ["e-0:2222"], "workerpool1": ["w-0:2222"], "workerpool0": ["c-0:2222"]}
  assert distributed.detect({"CLUSTER_SPEC": cluster_spec("workerpool3", 0, pools)}) == \
      ProcessInfo(2, 3, "c-0:8476", "vertex")
  # one replica: a single-process job
  one = {"workerpool0": ["c-0:2222"]}
  assert distributed.detect({"CLUSTER_SPEC": cluster_spec("workerpool0", 0, one)}).source == \
      "single"


@pytest.mark.parametrize("raw, match", [
    ("{not json", "CLUSTER_SPEC is not valid JSON"),
    (json.dumps({"cluster": {"workerpool0": ["c:1"]}}), "'task' object"),
    (cluster_spec("workerpool2", 0), "task.type 'workerpool2' is not a pool"),
    (cluster_spec("workerpool1", 3), "task.index 3 is not a replica of workerpool1"),
    (cluster_spec("chief", 0, {"chief": ["c:1"], "workerpool1": ["w:1"]}), "unknown worker pools"),
    (cluster_spec("workerpool1", 0, {"workerpool0": [], "workerpool1": ["w:1", "v:1"]}),
     "workerpool0"),
    (cluster_spec("workerpool0", 0, {"workerpool0": "c:1"}), "list of host:port"),
])
def test_bad_cluster_spec(raw, match):
  with pytest.raises(ValueError, match=match):
    distributed.detect({"CLUSTER_SPEC": raw})
  with pytest.raises(ValueError, match="RECML_COORDINATOR_PORT"):
    distributed.detect({"CLUSTER_SPEC": cluster_spec("workerpool0", 0),
                        "RECML_COORDINATOR_PORT": "x"})


def test_tpu_slice_variables():
  hosts = "t1k-0,t1k-1,t1k-2,t1k-3"
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": hosts, "TPU_WORKER_ID": "2"}) == \
      ProcessInfo(2, 4, "", "tpu")
  # multislice: slice 1 of 2, worker 3 of 4 -> process 7 of 8
  env = {"TPU_WORKER_HOSTNAMES": hosts, "TPU_WORKER_ID": "3", "MEGASCALE_NUM_SLICES": "2",
         "MEGASCALE_SLICE_ID": "1"}
  assert distributed.detect(env) == ProcessInfo(7, 8, "", "tpu")
  # the slice's own view wins over a CLUSTER_SPEC
  assert distributed.detect({**env, "CLUSTER_SPEC": cluster_spec("workerpool1", 0)}).source \
      == "tpu"
  # a single-host slice is one process; multislice hosts only in the metadata: JAX finds them
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "t1k-0", "TPU_WORKER_ID": "0"}).source \
      == "single"
  assert distributed.detect({"MEGASCALE_NUM_SLICES": "2"}) == ProcessInfo(0, 0, "", "tpu")
  assert distributed.detect({"RECML_DISTRIBUTED": "auto"}) == ProcessInfo(0, 0, "", "auto")
  with pytest.raises(ValueError, match="TPU_WORKER_ID is not set"):
    distributed.detect({"TPU_WORKER_HOSTNAMES": hosts})
  with pytest.raises(ValueError, match="TPU_WORKER_ID is 4"):
    distributed.detect({"TPU_WORKER_HOSTNAMES": hosts, "TPU_WORKER_ID": "4"})
  with pytest.raises(ValueError, match="MEGASCALE_SLICE_ID is 2"):
    distributed.detect({**env, "MEGASCALE_SLICE_ID": "2"})


WORKER = textwrap.dedent("""
    import json
    import numpy as np
    from trainers import distributed
    info = distributed.initialize()
    assert distributed.initialize() == info  # idempotent
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = np.random.default_rng(info.process_id).normal(size=(4, 3)).astype(np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), rows, (8, 3))
    total = jax.jit(lambda a: jnp.sum(a * a, axis=0),
                    out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps({"info": [info.process_id, info.num_processes, info.source],
                      "devices": jax.device_count(), "local": jax.local_device_count(),
                      "processes": jax.process_count(), "primary": distributed.is_primary(),
                      "sum": np.asarray(total).tolist()}))
""")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_join_and_reduce_a_sharded_array():
  """2 processes x 4 virtual CPU devices: one 8-device system computing one global sum."""
  port, n = free_port(), 2
  env = {k: v for k, v in os.environ.items() if not k.startswith(("RECML_", "TPU_",
                                                                    "MEGASCALE_"))}
  env.pop("CLUSTER_SPEC", None)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT, RECML_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             RECML_NUM_PROCESSES=str(n))
  procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, text=True,
                            env={**env, "RECML_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n)]
  results = []
  try:
    for i, p in enumerate(procs):
      out, err = p.communicate(timeout=180)
      assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{err[-4000:]}"
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  # every process contributed its own 4 rows (its id's random draw): an 8-row global array
  rows = np.concatenate([np.random.default_rng(i).normal(size=(4, 3)).astype(np.float32)
                         for i in range(n)])
  expected = (rows.astype(np.float64) ** 2).sum(axis=0)
  for i, r in enumerate(results):
    assert r["info"] == [i, n, "explicit"]
    assert (r["devices"], r["local"], r["processes"]) == (8, 4, n)
    assert r["primary"] == (i == 0)
    np.testing.assert_allclose(r["sum"], expected, rtol=1e-5)


@pytest.mark.parametrize("env, message", [
    ({"RECML_PROCESS_ID": "1"}, "RECML_PROCESS_ID set without RECML_COORDINATOR_ADDRESS"),
    ({"RECML_DISTRIBUTED": "auto"}, "JAX's cluster detection found no cluster to join"),
])
def test_recml_train_refuses_a_bad_environment_before_training(tmp_path, env, message):
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("RECML_", "TPU_", "MEGASCALE_")) and k != "CLUSTER_SPEC"}
  result = subprocess.run(
      [sys.executable, "-m", "pipelines.cli", "train", "--data", str(tmp_path / "none"),
       "--workdir", str(tmp_path / "w")], cwd=ROOT, text=True, capture_output=True,
      env={**clean, **env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}, timeout=180)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert not (tmp_path / "w").exists()
