"""The pipeline DAG, one definition for every target.

    fingerprint ─► preprocess ─► train ─► evaluate ─► write_metrics ─► validate
        ─► If(blessed): bless
                        └─ export ─► deploy

``fingerprint`` (never cached) hashes the input data (file hashes, GCS object metadata,
BigQuery table state; :mod:`components.fingerprint`). Its digest is a parameter of
``preprocess``, so the cache keys of preprocess and of every step after it change when
the data behind an unchanged ``data_uri`` does (unchanged data may still hit the cache).
``preprocess`` returns the dataset identity (``ds-...``: the fingerprint with the split
protocol and the preprocessing parameters) that write_metrics stores and validate
finds the champion by; validate deploys only a model that beats the champion on that
identity ("blessed"), not one that ties it.

``deploy`` is the local registry step on the local/KFP targets and, on Vertex, the
Model Registry upload + endpoint deployment of :func:`components.deploy.vertex_pipeline_ops`.

The same DAG serves both tasks (``task``): ``sequence`` (retrieval: user histories,
full-ranking HR/NDCG, gate e.g. on ``ndcg@10``) and ``ranking`` (CTR rows and the
``ranking`` preprocess parameters, AUC / log loss with a ``ClassificationMetrics``
artifact from evaluate, gate e.g. on ``auc`` guarded by ``logloss``). Each step reads
the task from its inputs (the dataset, the model's config); only preprocess is told.

``build_pipeline(target, ...)`` returns a ``@dsl.pipeline`` function. What differs per
target is only how steps are placed:

* ``local`` / ``local-docker`` / ``kfp``: every step is the project's lightweight Python
  component (``kfp.local`` runs them as subprocesses or in the images; KFP runs the images).
* ``vertex``: the train step becomes a Vertex AI CustomJob on TPU (or GPU/CPU) through
  ``google_cloud_pipeline_components``' ``create_custom_training_job_from_component``;
  its worker pool gets ``tpu_topology`` added (see :func:`vertex_training_step`, which
  also says how the processes of a multi-host job find each other).

Images come from :mod:`components.images` with the registry and tag of the
:class:`pipelines.env.Env`, so one compiled IR names images in Artifact Registry while
local runs use the bare local tags.
"""

import copy
from typing import Any, Callable, Mapping

from kfp import dsl

from components import images
from pipelines.env import Env

TARGETS = ("local", "local-docker", "kfp", "vertex")
PIPELINE_NAME = "recml-pipeline"
BLESSED = "blessed"  # the validate step's output when the gate passes

# Steps whose outputs depend only on their inputs may be cached; steps with side effects
# (metrics store writes, the gate that reads the store) and the fingerprint (which looks
# at the data behind the URI) never are.
CACHEABLE_STEPS = ("preprocess", "train", "evaluate", "export")
UNCACHED_STEPS = ("fingerprint", "write-metrics", "validate", "bless", "deploy")
# The Vertex deployment tasks (Google Cloud Pipeline Components), never cached.
VERTEX_DEPLOY_TASKS = ("importer", "model-upload", "endpoint-create", "model-deploy")


def _with_image(component, image: str):
  """A copy of a Python component that runs in ``image`` (registry/tag from the Env)."""
  comp = copy.deepcopy(component)
  comp.component_spec.implementation.container.image = image
  return comp


def vertex_training_step(component, vertex: Mapping[str, Any], env: Env,
                         display_name: str = "recml-train"):
  """Wraps the train component into a Vertex AI CustomJob component.

  GCPC 2.22's ``create_custom_training_job_from_component`` has no TPU topology argument
  (it takes machine type, accelerator type/count, replicas, disks, ...). It puts the
  worker pool specs into the ``worker_pool_specs`` input's default value, which Vertex
  parses as ``WorkerPoolSpec`` messages, so the topology is added there as
  ``machine_spec.tpu_topology`` (the ``MachineSpec.tpuTopology`` field of the REST API).
  TPU VM machine types (``ct5lp-hightpu-4t``, ``ct6e-...``) imply the accelerator, so
  no accelerator type is set for them; GPUs set ``accelerator_type``/``_count``.
  :func:`pipelines.config.check_vertex` rejects what Vertex would refuse.

  Multi-host jobs: every host runs the same container command (the train component),
  and :mod:`trainers.distributed` joins them into one JAX system before training:

  * a TPU slice is one worker pool with ``replica_count: 1`` and a topology larger than
    one host (``ct5lp-hightpu-4t`` + ``4x4``: 16 chips on 4 hosts); Vertex runs the
    container on each host of the slice. The pool's ``env`` carries
    ``RECML_DISTRIBUTED=auto``, so each process calls ``jax.distributed.initialize()``
    and JAX finds the slice's hosts itself (TPU worker variables or the TPU VM
    metadata), as on any Cloud TPU slice.
  * GPU/CPU ``replica_count: N`` gives workerpool0 (the primary, 1 replica) and
    workerpool1 (N - 1 replicas) with the same machine spec; Vertex sets
    ``CLUSTER_SPEC`` on each replica, from which every process takes its id and the
    coordinator (workerpool0's host).

  Args:
    component: the train component (already bound to its image).
    vertex: the config's ``vertex`` section.
    env: service account and network for the job.
    display_name: the CustomJob's display name.
  """
  from google_cloud_pipeline_components.v1.custom_job import (  # pylint: disable=g-import-not-at-top
      create_custom_training_job_from_component)
  from pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.check_vertex(vertex)
  accelerator = vertex.get("accelerator_type") or ""
  multi_host_tpu = config_lib.tpu_hosts(vertex) > 1
  op = create_custom_training_job_from_component(
      component,
      display_name=display_name,
      replica_count=int(vertex.get("replica_count", 1)),
      machine_type=vertex["machine_type"],
      accelerator_type=accelerator,
      accelerator_count=int(vertex.get("accelerator_count") or 1) if accelerator else 1,
      boot_disk_size_gb=int(vertex.get("boot_disk_size_gb", 100)),
      timeout=str(vertex.get("timeout", "86400s")),
      service_account=env.service_account,
      network=env.network,
      env=[{"name": "RECML_DISTRIBUTED", "value": "auto"}] if multi_host_tpu else None,
  )
  topology = vertex.get("tpu_topology") or ""
  if topology:
    specs = op.component_spec.inputs["worker_pool_specs"].default
    for spec in specs:
      spec["machine_spec"]["tpu_topology"] = topology
  return op


def vertex_worker_pool_specs(env: Env, vertex: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The worker pool specs the Vertex training step requests (for ``--dry-run``)."""
  from components import train as train_step  # pylint: disable=g-import-not-at-top
  image = images.image("trainer", env.image_registry, env.image_tag or None)
  op = vertex_training_step(_with_image(train_step.train, image), vertex, env)
  return copy.deepcopy(op.component_spec.inputs["worker_pool_specs"].default)


def build_pipeline(target: str = "local", *, env: Env | None = None,
                   vertex: Mapping[str, Any] | None = None,
                   kfp_resources: Mapping[str, Any] | None = None,
                   enable_caching: bool = True,
                   name: str = PIPELINE_NAME) -> Callable[..., Any]:
  """Builds the pipeline function for a target.

  Args:
    target: one of ``TARGETS``.
    env: registry/tag for images; service account, network and region for Vertex.
    vertex: the ``vertex`` config section (machine type, TPU topology, accelerators).
    kfp_resources: the ``kfp`` config section (``train_cpu``, ``train_memory`` limits).
    enable_caching: cache preprocess/train/evaluate/export (fingerprint,
      write_metrics, validate, bless and deploy are never cached).
    name: the pipeline name (shown in the UIs and stored with the metrics).

  Returns:
    A ``@dsl.pipeline`` function; compile it or call it under ``kfp.local``.
  """
  # pylint: disable=g-import-not-at-top
  from components import bless as bless_step
  from components import deploy as deploy_step
  from components import export as export_step
  from components import evaluate as evaluate_step
  from components import fingerprint as fingerprint_step
  from components import train as train_step
  from components import validate as validate_step
  from components import write_metrics as write_metrics_step
  from components.preprocess import component as preprocess_step
  from pipelines import config as config_lib
  # pylint: enable=g-import-not-at-top
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
  env = env or Env()
  vertex = dict(config_lib.DEFAULTS["vertex"], **(vertex or {}))
  kfp_resources = dict(kfp_resources or {})

  def image(step: str) -> str:
    return images.image(step, env.image_registry, env.image_tag or None)

  fingerprint_op = _with_image(fingerprint_step.fingerprint, image("preprocess"))
  preprocess_op = _with_image(preprocess_step.preprocess, image("preprocess"))
  train_op = _with_image(train_step.train, image("trainer"))
  evaluate_op = _with_image(evaluate_step.evaluate, image("trainer"))
  write_metrics_op = _with_image(write_metrics_step.write_metrics, image("tools"))
  validate_op = _with_image(validate_step.validate, image("tools"))
  bless_op = _with_image(bless_step.bless, image("tools"))
  export_op = _with_image(export_step.export, image("trainer"))
  deploy_op = _with_image(deploy_step.deploy, image("tools"))
  if target == "vertex":
    train_op = vertex_training_step(train_op, vertex, env)

  @dsl.pipeline(
      name=name,
      description="RecML: preprocess, train, evaluate, record metrics, gate against "
      "the champion; blessed models go on to export and deploy.")
  def recml_pipeline(
      data_uri: str,
      dataset_name: str = "",
      data_format: str = "",
      task: str = "sequence",
      ranking: dict = {},  # pylint: disable=dangerous-default-value
      max_len: int = 200,
      min_item_count: int = 1,
      bad_rows_threshold: float = 0.01,
      timestamp_unit: str = "auto",
      beam_args: list = [],  # pylint: disable=dangerous-default-value
      model: str = "sasrec",
      train_overrides: list = [],  # pylint: disable=dangerous-default-value
      store_uri: str = "",
      run_id: str = "",
      labels: dict = {},  # pylint: disable=dangerous-default-value
      gate_metric: str = "ndcg",
      gate_k: int = 10,
      gate_guard_metric: str = "",
      gate_split: str = "valid",
      gate_tolerance: float = 0.0,
      serving_registry: str = "",
  ):
    # -- fingerprint: what the data behind data_uri is now (never cached) ------------
    fingerprinted = fingerprint_op(input_uri=data_uri)
    fingerprinted.set_display_name("fingerprint").set_caching_options(False)

    # -- preprocess: raw events -> sequence dataset (or CTR rows -> ranking dataset);
    # returns the dataset identity. The fingerprint is an input, so this step's cache
    # key (and every later one's) changes with the data.
    prep = preprocess_op(
        input_uri=data_uri, data_format=data_format, max_len=max_len,
        min_item_count=min_item_count, bad_rows_threshold=bad_rows_threshold,
        beam_args=beam_args, fingerprint=fingerprinted.outputs["Output"],
        timestamp_unit=timestamp_unit, task=task, ranking=ranking)
    prep.set_display_name("preprocess").set_caching_options(enable_caching)
    dataset_id = prep.outputs["Output"]

    # -- train: a CustomJob on Vertex, a plain step elsewhere ----------------------
    train_args = dict(dataset=prep.outputs["dataset"], model_name=model,
                      overrides=train_overrides, dataset_name=dataset_name)
    if target == "vertex":
      train_args["location"] = env.region or "us-central1"
    train = train_op(**train_args)
    train.set_display_name("train").set_caching_options(enable_caching)
    if target == "kfp":
      if kfp_resources.get("train_cpu"):
        train.set_cpu_limit(str(kfp_resources["train_cpu"]))
      if kfp_resources.get("train_memory"):
        train.set_memory_limit(str(kfp_resources["train_memory"]))

    # -- evaluate: metrics at the selected checkpoint (full ranking; or AUC / log loss
    # with a ClassificationMetrics artifact: ROC curve, confusion matrix) + HTML report
    evaluation = evaluate_op(model=train.outputs["model"], dataset=prep.outputs["dataset"],
                             split="test", title=run_id, dataset_name=dataset_name)
    evaluation.set_display_name("evaluate").set_caching_options(enable_caching)

    # -- write_metrics: one row per (split, metric, k) into DuckDB / BigQuery ------
    written = write_metrics_op(
        store_uri=store_uri, metrics=evaluation.outputs["metrics"],
        model=train.outputs["model"], run_id=run_id,
        job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, pipeline=name, model_name=model,
        dataset=dataset_name, labels=labels, dataset_id=dataset_id)
    # The task's own name: kfp.local warns about a display name that differs from it.
    written.set_display_name("write-metrics").set_caching_options(False)

    # -- validate: gate against the champion on the same dataset identity -------------
    # "blessed" only when the candidate beats it (or has none); a tie is not redeployed.
    gate = validate_op(
        store_uri=store_uri, run_id=written.output, dataset=dataset_name,
        model_family=model, metric=gate_metric, k=gate_k, split=gate_split,
        tolerance=gate_tolerance, dataset_id=dataset_id, guard_metric=gate_guard_metric)
    gate.set_display_name("validate").set_caching_options(False)

    # -- blessed models only ---------------------------------------------------------
    # A string compared with validate's single output: kfp.local (2.17) silently skips
    # float comparisons and cannot resolve named outputs in dsl.If conditions.
    with dsl.If(gate.outputs["Output"] == BLESSED, name="blessed"):
      blessing = bless_op(model=train.outputs["model"], verdict=gate.outputs["verdict"],
                          run_id=written.output)
      blessing.set_display_name("bless").set_caching_options(False)
      # -- export: the serving bundle (jax.export StableHLO + weights + vocabulary) --
      bundle = export_op(model=train.outputs["model"], dataset=prep.outputs["dataset"])
      bundle.set_display_name("export").set_caching_options(enable_caching).after(blessing)
      # -- deploy: Vertex Model Registry + endpoint, or the local registry -------------
      if target == "vertex":
        deploy_step.vertex_pipeline_ops(bundle.outputs["Output"], env, display_name=name)
      else:
        deployed = deploy_op(bundle=bundle.outputs["bundle"], registry=serving_registry,
                             run_id=written.output, dataset_id=dataset_id)
        deployed.set_display_name("deploy").set_caching_options(False)

  return recml_pipeline


def compile_pipeline(pipeline_func, output: str,
                     parameters: Mapping[str, Any] | None = None) -> str:
  """Compiles to IR YAML with the config's values as parameter defaults."""
  from kfp import compiler  # pylint: disable=g-import-not-at-top
  compiler.Compiler().compile(pipeline_func=pipeline_func, package_path=output,
                              pipeline_parameters=dict(parameters or {}))
  return output
