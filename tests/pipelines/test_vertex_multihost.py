"""The Vertex training request for multi-host jobs: TPU slices and multi-replica GPU pools.

The worker pool specs are asserted whole (built by GCPC, in the compiled IR and in the
``--dry-run`` request), and tied to what the trainer does with them: the environment
Vertex gives each process makes :func:`trainers.distributed.detect` count the same
processes the request asked for.
"""

import json

import pytest
import yaml

from components import train as train_step
from pipelines import cli
from pipelines import config as config_lib
from pipelines import dag
from pipelines.env import Env
from trainers import distributed

REGISTRY = "us-central1-docker.pkg.dev/my-project/recml"
IMAGE = f"{REGISTRY}/recml-trainer:1.2.3"
ENV = Env(project="my-project", region="us-central1", pipeline_root="gs://bucket/root",
          service_account="runner@my-project.iam.gserviceaccount.com",
          image_registry=REGISTRY, image_tag="1.2.3")
CLOUD = ["--project", "my-project", "--region", "us-central1",
         "--pipeline-root", "gs://bucket/root", "--store-uri", "bq://my-project.recml.metrics",
         "--image-registry", REGISTRY]
DISK = {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": 100}
# The train component's own container command; GCPC passes the executor input escaped.
COMMAND = list(train_step.train.component_spec.implementation.container.command)
ARGS = ["--executor_input", "{{$.json_escape[1]}}", "--function_to_execute", "train"]
JOIN_BY_JAX = [{"name": "RECML_DISTRIBUTED", "value": "auto"}]
GPU = ["vertex.machine_type=a2-highgpu-1g", "vertex.accelerator_type=NVIDIA_TESLA_A100",
       "vertex.accelerator_count=1", "vertex.tpu_topology="]


def container(env=()):
  return {"image_uri": IMAGE, "command": COMMAND, "args": ARGS, "env": list(env)}


def specs_for(overrides=(), config="ml1m_sasrec"):
  return dag.vertex_worker_pool_specs(ENV, config_lib.load_config(config, overrides)["vertex"])


def test_single_host_v5e_slice():
  assert specs_for() == [{
      "machine_spec": {"machine_type": "ct5lp-hightpu-4t", "tpu_topology": "2x2"},
      "replica_count": 1, "disk_spec": DISK, "container_spec": container()}]


def test_multi_host_v5e_slice_is_one_replica_whose_hosts_join_through_jax():
  specs = specs_for(["vertex.tpu_topology=4x4"])
  assert specs == [{
      "machine_spec": {"machine_type": "ct5lp-hightpu-4t", "tpu_topology": "4x4"},
      "replica_count": 1, "disk_spec": DISK, "container_spec": container(JOIN_BY_JAX)}]
  # 16 chips / 4 per ct5lp-hightpu-4t VM (GKE's v5litepod-16: 4 VMs)
  assert config_lib.tpu_hosts(config_lib.load_config(
      "ml1m_sasrec", ["vertex.tpu_topology=4x4"])["vertex"]) == 4
  # what the env tells each host's trainer: let JAX's cluster detection join the slice
  env = {e["name"]: e["value"] for e in specs[0]["container_spec"]["env"]}
  info = distributed.detect(env)
  assert (info.source, info.multi_process) == ("auto", True)


@pytest.mark.parametrize("machine, topology, hosts", [
    ("ct5lp-hightpu-1t", "1x1", 1), ("ct5lp-hightpu-4t", "2x2", 1),
    ("ct5lp-hightpu-8t", "2x4", 1), ("ct5lp-hightpu-4t", "8x8", 16),
    ("ct5lp-hightpu-4t", "16x16", 64), ("ct6e-standard-4t", "4x8", 8),
    ("a2-highgpu-1g", "", 0), ("n1-standard-4", "", 0)])
def test_tpu_hosts(machine, topology, hosts):
  vertex = {"machine_type": machine, "tpu_topology": topology}
  config_lib.check_vertex(vertex)
  assert config_lib.tpu_hosts(vertex) == hosts


def test_multi_replica_gpu_pool_is_a_primary_and_workers():
  specs = specs_for([*GPU, "vertex.replica_count=2"], config="ml1m_hstu")
  machine = {"machine_type": "a2-highgpu-1g", "accelerator_type": "NVIDIA_TESLA_A100",
             "accelerator_count": 1}
  pool = {"machine_spec": machine, "disk_spec": DISK, "container_spec": container()}
  assert specs == [{**pool, "replica_count": 1}, {**pool, "replica_count": 1}]
  # 4 replicas: workerpool0 (1) + workerpool1 (3), and Vertex's CLUSTER_SPEC for them
  specs = specs_for([*GPU, "vertex.replica_count=4"], config="ml1m_hstu")
  assert [s["replica_count"] for s in specs] == [1, 3]
  cluster = {f"workerpool{i}": [f"w{i}-{r}:2222" for r in range(s["replica_count"])]
             for i, s in enumerate(specs)}
  ids = [distributed.detect({"CLUSTER_SPEC": json.dumps(
      {"cluster": cluster, "task": {"type": pool, "index": r}})})
         for pool, hosts in cluster.items() for r in range(len(hosts))]
  assert [(i.process_id, i.num_processes, i.coordinator) for i in ids] == [
      (p, 4, f"w0-0:{distributed.DEFAULT_COORDINATOR_PORT}") for p in range(4)]


def test_compiled_ir_carries_the_multi_host_specs(tmp_path):
  config = config_lib.load_config("ml1m_sasrec", ["vertex.tpu_topology=4x4"])
  params = config_lib.pipeline_parameters(config, data_uri="gs://bucket/ml-1m",
                                          store_uri="bq://my-project.recml.metrics")
  out = tmp_path / "ir.yaml"
  dag.compile_pipeline(dag.build_pipeline("vertex", env=ENV, vertex=config["vertex"]),
                       str(out), params)
  ir = yaml.safe_load(out.read_text())
  train = ir["root"]["dag"]["tasks"]["train"]
  comp = ir["components"][train["componentRef"]["name"]]
  assert comp["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"] == \
      specs_for(["vertex.tpu_topology=4x4"])


def test_dry_run_shows_the_worker_pools(capsys, tmp_path, monkeypatch):
  for var in ("RECML_PROJECT", "RECML_REGION", "RECML_PIPELINE_ROOT", "RECML_STORE_URI",
              "RECML_SERVICE_ACCOUNT", "RECML_IMAGE_REGISTRY", "RECML_IMAGE_TAG"):
    monkeypatch.delenv(var, raising=False)

  def dry_run(*sets):
    argv = ["run", "--config", "ml1m_hstu", "--target", "vertex", "--data", "gs://b/ml-1m",
            "--dry-run", "--output", str(tmp_path / "ir.yaml"), *CLOUD]
    for s in sets:
      argv += ["--set", s]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)["train_worker_pool_specs"]

  image = dry_run()[0]["container_spec"]["image_uri"]
  assert dry_run("vertex.tpu_topology=4x4") == [{
      "machine_spec": {"machine_type": "ct5lp-hightpu-4t", "tpu_topology": "4x4"},
      "replica_count": 1, "disk_spec": DISK,
      "container_spec": {"image_uri": image, "env": JOIN_BY_JAX}}]
  gpu = dry_run(*GPU, "vertex.replica_count=3")
  assert [(s["machine_spec"]["machine_type"], s["replica_count"]) for s in gpu] == [
      ("a2-highgpu-1g", 1), ("a2-highgpu-1g", 2)]
  assert all(s["container_spec"] == {"image_uri": image} for s in gpu)
  # a bad request is refused before anything is compiled or sent
  argv = ["run", "--config", "ml1m_hstu", "--target", "vertex", "--data", "gs://b/ml-1m",
          "--dry-run", "--output", str(tmp_path / "bad.yaml"), *CLOUD,
          "--set", "vertex.tpu_topology=3x3"]
  assert cli.main(argv) == 2
  assert "vertex.tpu_topology 3x3 is 9 chips" in capsys.readouterr().err
  assert not (tmp_path / "bad.yaml").exists()


@pytest.mark.parametrize("vertex, match", [
    ({"tpu_topology": "3x3"}, r"vertex.tpu_topology 3x3 is 9 chips, not a whole number of "
                              r"ct5lp-hightpu-4t hosts \(4 chips each\)"),
    ({"tpu_topology": "1x1"}, "vertex.tpu_topology 1x1 is 1 chips"),
    ({"machine_type": "ct5lp-hightpu-8t", "tpu_topology": "4x4"},
     "vertex.tpu_topology 4x4 spans 2 hosts.*multi-host slices use ct5lp-hightpu-4t"),
    ({"machine_type": "ct6e-standard-1t", "tpu_topology": "2x2"},
     "spans 4 hosts.*ct6e-standard-4t"),
    ({"tpu_topology": ""}, "vertex.tpu_topology must be AxB or AxBxC"),
    ({"tpu_topology": "4by4"}, "vertex.tpu_topology must be AxB or AxBxC"),
    ({"tpu_topology": "0x4"}, "vertex.tpu_topology must be AxB or AxBxC"),
    ({"tpu_topology": "4x4", "replica_count": 4}, "vertex.replica_count must be 1 for a TPU"),
    ({"accelerator_type": "TPU_V5_LITEPOD"}, "vertex.accelerator_type"),
    ({"machine_type": "a2-highgpu-1g", "accelerator_type": "NVIDIA_TESLA_A100",
      "accelerator_count": 1}, "vertex.tpu_topology '2x2' needs a TPU VM machine type"),
    ({"machine_type": "n1-standard-4", "tpu_topology": "", "accelerator_count": 2},
     "vertex.accelerator_count is set without vertex.accelerator_type"),
    ({"machine_type": "n1-standard-4", "tpu_topology": "", "replica_count": 0},
     "vertex.replica_count must be an integer >= 1"),
    ({"machine_type": ""}, "vertex.machine_type is required"),
])
def test_bad_vertex_sections_name_the_key(vertex, match):
  merged = {**config_lib.DEFAULTS["vertex"], **vertex}
  with pytest.raises(ValueError, match=match):
    config_lib.check_vertex(merged)
  with pytest.raises(ValueError, match=match):  # the request builder checks too
    dag.vertex_worker_pool_specs(ENV, merged)
  sets = [f"vertex.{k}={v}" for k, v in vertex.items()]
  with pytest.raises(ValueError, match=match):  # and so does loading a config
    config_lib.load_config("ml1m_sasrec", sets)


def test_counts_must_be_integers():
  vertex = {**config_lib.DEFAULTS["vertex"], "machine_type": "n1-standard-4",
            "tpu_topology": ""}
  for key, value in (("replica_count", "2"), ("accelerator_count", 1.5),
                     ("replica_count", True)):
    with pytest.raises(ValueError, match=f"vertex.{key} must be an integer"):
      config_lib.check_vertex({**vertex, key: value})
