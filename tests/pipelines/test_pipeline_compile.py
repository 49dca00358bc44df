"""Compiling every experiment config for every target is itself a test.

Asserts on the IR: step images, the Vertex training step's machine spec and TPU
topology, parameter defaults, caching settings and the gate condition.
"""

import pytest
import yaml

from pipelines import config as config_lib
from pipelines import dag
from pipelines.env import Env

REGISTRY = "us-central1-docker.pkg.dev/my-project/recml"
ENV = Env(project="my-project", region="us-central1", pipeline_root="gs://bucket/root",
          service_account="runner@my-project.iam.gserviceaccount.com",
          image_registry=REGISTRY, image_tag="1.2.3")
STEP_IMAGES = {
    "fingerprint": "recml-preprocess", "preprocess": "recml-preprocess", "train": "recml-trainer", "evaluate": "recml-trainer",
    "write-metrics": "recml-tools", "validate": "recml-tools", "bless": "recml-tools",
    "export": "recml-trainer", "deploy": "recml-tools",
}


def compile_ir(tmp_path, config_name, target, overrides=(), caching=True):
  config = config_lib.load_config(config_name, overrides)
  params = config_lib.pipeline_parameters(config, data_uri="gs://bucket/ml-1m",
                                          store_uri="bq://my-project.recml.metrics")
  pipeline = dag.build_pipeline(target, env=ENV, vertex=config["vertex"],
                                kfp_resources=config["kfp"],
                                enable_caching=caching and config["caching"])
  out = tmp_path / f"{config_name}-{target}.yaml"
  dag.compile_pipeline(pipeline, str(out), params)
  return yaml.safe_load(out.read_text()), config


def tasks(ir):
  """Every container task, nested condition DAGs included: name -> (task, condition)."""
  found = {}

  def walk(dag_spec, condition):
    for name, task in dag_spec["tasks"].items():
      comp = ir["components"][task["componentRef"]["name"]]
      if "dag" in comp:
        walk(comp["dag"], task.get("triggerPolicy", {}).get("condition"))
      else:
        found[name] = (task, condition)

  walk(ir["root"]["dag"], None)
  return found


def executor(ir, task):
  comp = ir["components"][task["componentRef"]["name"]]
  return ir["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]


@pytest.mark.parametrize("target", dag.TARGETS)
@pytest.mark.parametrize("config_name", config_lib.list_configs())
def test_every_config_compiles_for_every_target(tmp_path, config_name, target):
  ir, config = compile_ir(tmp_path, config_name, target)
  found = tasks(ir)
  expected = set(STEP_IMAGES)
  if target == "vertex":  # deploy = GCPC upload + endpoint + deploy (tests/serving)
    expected = expected - {"deploy"} | set(dag.VERTEX_DEPLOY_TASKS)
  assert set(found) == expected

  # Images: each step in its image, from the configured registry and tag.
  for name, (task, _) in found.items():
    if name in dag.VERTEX_DEPLOY_TASKS:
      continue
    image = executor(ir, task)["image"]
    if target == "vertex" and name == "train":
      assert "google-cloud-pipeline-components" in image  # the CustomJob launcher
      continue
    assert image == f"{REGISTRY}/{STEP_IMAGES[name]}:1.2.3", name

  # Parameters: the config's values are the compiled defaults.
  inputs = ir["root"]["inputDefinitions"]["parameters"]
  assert inputs["max_len"]["defaultValue"] == config["preprocess"]["max_len"]
  assert inputs["model"]["defaultValue"] == config["train"]["model"]
  assert inputs["train_overrides"]["defaultValue"] == config_lib.train_overrides(config)
  assert inputs["gate_metric"]["defaultValue"] == config["gate"]["metric"]
  assert inputs["gate_split"]["defaultValue"] == config["gate"]["split"]
  assert inputs["data_uri"]["defaultValue"] == "gs://bucket/ml-1m"
  assert inputs["timestamp_unit"]["defaultValue"] == config["preprocess"]["timestamp_unit"]

  # Caching: pure steps cached, side-effect steps and the fingerprint never.
  for name, (task, _) in found.items():
    enabled = task.get("cachingOptions", {}).get("enableCache", False)
    assert enabled == (name in dag.CACHEABLE_STEPS), name

  # The data's fingerprint is part of preprocess's inputs (so of its cache key), and the
  # dataset identity preprocess returns keys the metrics and the gate.
  prep_inputs = found["preprocess"][0]["inputs"]["parameters"]
  assert prep_inputs["fingerprint"]["taskOutputParameter"] == {
      "outputParameterKey": "Output", "producerTask": "fingerprint"}
  for name in ("write-metrics", "validate"):
    assert found[name][0]["inputs"]["parameters"]["dataset_id"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "preprocess"}, name

  # The gate: bless runs only under a string comparison of validate's decision.
  _, condition = found["bless"]
  assert condition == "inputs.parameter_values['pipelinechannel--validate-Output'] == 'blessed'"
  for name in ("fingerprint", "preprocess", "train", "evaluate", "write-metrics", "validate"):
    assert found[name][1] is None


def test_vertex_training_step_is_a_tpu_custom_job(tmp_path):
  ir, _ = compile_ir(tmp_path, "ml1m_sasrec", "vertex")
  task, _ = tasks(ir)["train"]
  comp = ir["components"][task["componentRef"]["name"]]
  params = comp["inputDefinitions"]["parameters"]
  specs = params["worker_pool_specs"]["defaultValue"]
  assert len(specs) == 1
  assert specs[0]["machine_spec"] == {"machine_type": "ct5lp-hightpu-4t", "tpu_topology": "2x2"}
  assert specs[0]["container_spec"]["image_uri"] == f"{REGISTRY}/recml-trainer:1.2.3"
  assert params["service_account"]["defaultValue"] == ENV.service_account
  assert task["inputs"]["parameters"]["location"]["runtimeValue"]["constant"] == "us-central1"
  launcher = executor(ir, task)
  assert "google_cloud_pipeline_components.container.v1.custom_job.launcher" in launcher["command"]


def test_vertex_gpu_and_cpu_machine_types(tmp_path):
  gpu = ["vertex.machine_type=a2-highgpu-1g", "vertex.accelerator_type=NVIDIA_TESLA_A100",
         "vertex.accelerator_count=1", "vertex.tpu_topology="]
  specs = dag.vertex_worker_pool_specs(ENV, config_lib.load_config("ml1m_hstu", gpu)["vertex"])
  assert specs[0]["machine_spec"] == {"machine_type": "a2-highgpu-1g",
                                      "accelerator_type": "NVIDIA_TESLA_A100",
                                      "accelerator_count": 1}
  specs = dag.vertex_worker_pool_specs(ENV, config_lib.load_config("ml100k_smoke")["vertex"])
  assert specs[0]["machine_spec"] == {"machine_type": "n1-standard-4"}


def test_no_cache_disables_every_step(tmp_path):
  ir, _ = compile_ir(tmp_path, "ml100k_smoke", "kfp", caching=False)
  for name, (task, _) in tasks(ir).items():
    assert not task.get("cachingOptions", {}).get("enableCache", False), name


def test_kfp_resource_limits(tmp_path):
  ir, _ = compile_ir(tmp_path, "ml100k_smoke", "kfp",
                     ["kfp.train_cpu=4", "kfp.train_memory=8G"])
  resources = executor(ir, tasks(ir)["train"][0])["resources"]
  assert resources["resourceCpuLimit"] == "4"
  assert resources["resourceMemoryLimit"] == "8G"


def test_unknown_target_rejected():
  with pytest.raises(ValueError, match="unknown target"):
    dag.build_pipeline("laptop")
