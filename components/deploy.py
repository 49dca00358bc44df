"""Deploy step: a serving bundle becomes the served model.

* local targets: the bundle is copied into a local registry folder and made its current
  model (:func:`serving.registry.publish`); ``recml serve`` without ``--bundle`` serves it.
  The registry defaults to ``registry/`` beside the run folders of the local pipeline
  root (the folder above the run's ``run.json``), or ``$RECML_REGISTRY``.
* Vertex AI: the bundle is uploaded to the Model Registry with the ``recml-serving``
  image as its custom container and deployed to an endpoint. In the pipeline that is
  Google Cloud Pipeline Components (``dsl.importer`` of the bundle as an
  ``UnmanagedContainerModel`` -> ``ModelUploadOp``; ``EndpointCreateOp``;
  ``ModelDeployOp``, see :func:`vertex_pipeline_ops`); from the command line the same
  values go through the ``aiplatform`` SDK (:func:`vertex_requests`, printed by
  ``recml deploy --target vertex --dry-run``).

Both paths take the container spec and machine from :func:`serving_container_spec` and
``SERVING``, so the pipeline and the CLI cannot drift apart.
"""


import os
from typing import Any, Mapping

from kfp.dsl import Artifact, Input, Model, Output

from components import images, kfp_step

# The Vertex endpoint's machine; replicas scale between min and max on load.
SERVING = {"machine_type": "n1-standard-4", "min_replica_count": 1, "max_replica_count": 2}
PORT = 8080
HEALTH_ROUTE = "/health"
PREDICT_ROUTE = "/predict"
LABELS = {"recml": "serving"}


def serving_container_spec(image: str) -> dict[str, Any]:
  """The Vertex ``ModelContainerSpec`` (REST JSON) of the serving image.

  Vertex sets ``AIP_HTTP_PORT``, ``AIP_HEALTH_ROUTE``, ``AIP_PREDICT_ROUTE`` from these
  fields and ``AIP_STORAGE_URI`` to its copy of the artifact URI, which ``recml serve``
  reads when no ``--bundle`` is given.
  """
  return {"imageUri": image, "args": ["recml", "serve"],
          "ports": [{"containerPort": PORT}],
          "predictRoute": PREDICT_ROUTE, "healthRoute": HEALTH_ROUTE}


def serving_image(env) -> str:
  return images.image("serving", env.image_registry, env.image_tag or None)


# ---------------------------------------------------------------------------
# Local registry
# ---------------------------------------------------------------------------


def registry_for(bundle_dir: str) -> str:
  """``$RECML_REGISTRY``, else ``<pipeline root>/registry`` for a bundle inside a local run."""
  if os.environ.get("RECML_REGISTRY"):
    return os.environ["RECML_REGISTRY"]
  path = os.path.abspath(bundle_dir)
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    if os.path.isfile(os.path.join(path, "run.json")):  # a run folder (pipelines.local)
      return os.path.join(os.path.dirname(path), "registry")
  raise ValueError(f"cannot tell the registry of {bundle_dir}: pass one (--registry, "
                   "$RECML_REGISTRY)")


def run_local(bundle_dir: str, registry: str = "", run_id: str = "",
              dataset_id: str = "") -> dict[str, Any]:
  """Publishes the bundle to the local registry; returns the deployment record.

  ``dataset_id`` (the data the model was trained on) goes into the record's labels.
  """
  from serving import registry as registry_lib  # pylint: disable=g-import-not-at-top
  labels = {"dataset_id": dataset_id} if dataset_id else None
  return registry_lib.publish(bundle_dir, registry or registry_for(bundle_dir),
                              run_id=run_id, labels=labels)


# ---------------------------------------------------------------------------
# Vertex AI
# ---------------------------------------------------------------------------


def vertex_requests(env, *, artifact_uri: str, display_name: str = "recml",
                    endpoint: str | None = None,
                    serving: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The Model Registry upload and endpoint deployment, as ``aiplatform`` SDK arguments."""
  env.require("project", "region", target="vertex")
  if not artifact_uri.startswith("gs://"):
    raise ValueError(f"Vertex reads the bundle from Cloud Storage: got {artifact_uri!r}")
  serving = {**SERVING, **dict(serving or {})}
  spec = serving_container_spec(serving_image(env))
  where = {"project": env.project, "location": env.region}
  return {
      "kind": "vertex.Model.upload+Endpoint.deploy",
      "upload": {**where, "display_name": display_name, "artifact_uri": artifact_uri,
                 "serving_container_image_uri": spec["imageUri"],
                 "serving_container_args": spec["args"],
                 "serving_container_ports": [PORT],
                 "serving_container_predict_route": PREDICT_ROUTE,
                 "serving_container_health_route": HEALTH_ROUTE,
                 "labels": dict(LABELS)},
      "endpoint": ({"endpoint_name": endpoint} if endpoint else
                   {**where, "display_name": f"{display_name}-endpoint",
                    "network": env.network or None}),
      "deploy": {"deployed_model_display_name": display_name,
                 "machine_type": serving["machine_type"],
                 "min_replica_count": int(serving["min_replica_count"]),
                 "max_replica_count": int(serving["max_replica_count"]),
                 "traffic_percentage": 100,
                 "service_account": env.service_account or None},
  }


def vertex_deploy(request: Mapping[str, Any]) -> str:
  """Sends :func:`vertex_requests`' request through the SDK; returns the endpoint name."""
  from google.cloud import aiplatform  # pylint: disable=g-import-not-at-top
  model = aiplatform.Model.upload(**request["upload"])
  if "endpoint_name" in request["endpoint"]:
    endpoint = aiplatform.Endpoint(request["endpoint"]["endpoint_name"])
  else:
    endpoint = aiplatform.Endpoint.create(**request["endpoint"])
  model.deploy(endpoint=endpoint, **request["deploy"])
  return endpoint.resource_name


def vertex_pipeline_ops(bundle_uri, env, display_name: str = "recml"):
  """Adds the Vertex upload + deploy tasks to the pipeline being defined.

  Args:
    bundle_uri: the export task's URI output (a pipeline channel).
    env: project, region, registry, service account.
    display_name: the model's and endpoint's display name.

  Returns:
    The ``ModelDeployOp`` task.
  """
  from google_cloud_pipeline_components.types import artifact_types  # pylint: disable=g-import-not-at-top
  from google_cloud_pipeline_components.v1.endpoint import EndpointCreateOp, ModelDeployOp  # pylint: disable=g-import-not-at-top
  from google_cloud_pipeline_components.v1.model import ModelUploadOp  # pylint: disable=g-import-not-at-top
  from kfp import dsl  # pylint: disable=g-import-not-at-top
  serving = {**SERVING}
  # An empty project compiles to GCPC's default (the pipeline job's project).
  where = {"location": env.region or "us-central1",
           **({"project": env.project} if env.project else {})}
  unmanaged = dsl.importer(
      artifact_uri=bundle_uri, artifact_class=artifact_types.UnmanagedContainerModel,
      metadata={"containerSpec": serving_container_spec(serving_image(env))})
  upload = ModelUploadOp(display_name=display_name,
                         unmanaged_container_model=unmanaged.outputs["artifact"],
                         labels=dict(LABELS), **where)
  endpoint = EndpointCreateOp(display_name=f"{display_name}-endpoint",
                              network=env.network or "", **where)
  task = ModelDeployOp(
      model=upload.outputs["model"], endpoint=endpoint.outputs["endpoint"],
      deployed_model_display_name=display_name,
      dedicated_resources_machine_type=serving["machine_type"],
      dedicated_resources_min_replica_count=int(serving["min_replica_count"]),
      dedicated_resources_max_replica_count=int(serving["max_replica_count"]),
      traffic_split={"0": 100},
      service_account=env.service_account or "")
  for op, label in ((unmanaged, "serving-model"), (upload, "upload-model"),
                    (endpoint, "create-endpoint"), (task, "deploy-model")):
    op.set_display_name(label).set_caching_options(False)
  return task


# ---------------------------------------------------------------------------
# The local component
# ---------------------------------------------------------------------------


@kfp_step.step("tools")
def deploy(bundle: Input[Model], deployment: Output[Artifact], registry: str = "",
           run_id: str = "", dataset_id: str = "") -> str:
  """Makes the bundle the current model of the local registry.

  Args:
    bundle: the serving bundle (export step).
    deployment: the deployment record (version, registry path, time).
    registry: the registry folder (empty: ``<pipeline root>/registry``).
    run_id: the run that produced the model.
    dataset_id: the dataset identity it was trained on (recorded with the deployment).

  Returns:
    The deployed bundle's path in the registry.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  from components import deploy as step  # pylint: disable=g-import-not-at-top
  record = step.run_local(bundle.path, registry, run_id, dataset_id)
  os.makedirs(deployment.path, exist_ok=True)
  with open(os.path.join(deployment.path, "deployment.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  deployment.metadata.update({k: record[k] for k in ("version", "path", "deployed_at", "run_id")})
  if dataset_id:
    deployment.metadata["dataset_id"] = dataset_id
  return record["path"]
