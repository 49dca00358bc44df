"""Bundles, the local registry, and the Vertex deployment requests (dry run and compiled IR)."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml

from components import deploy as deploy_step
from pipelines import cli, dag
from pipelines import env as env_lib
from pipelines.env import Env
from serving import predictor as predictor_lib
from serving import registry as registry_lib
from serving import server
from trainers import export

REGISTRY = "europe-west4-docker.pkg.dev/my-project/recml"
ENV = Env(project="my-project", region="europe-west4", pipeline_root="gs://bucket/root",
          service_account="runner@my-project.iam.gserviceaccount.com",
          image_registry=REGISTRY, image_tag="1.2.3")


# -- bundles ---------------------------------------------------------------------------


def test_bundle_is_data_only(bundles):
  path = bundles["hstu"]
  meta = json.load(open(os.path.join(path, export.BUNDLE_FILE)))
  assert meta["format"] == export.FORMAT and meta["model"] == "hstu"
  assert meta["max_len"] == 12 and meta["max_k"] == 20 and meta["item_id_type"] == "int"
  assert set(meta["sha256"]) >= {export.MODEL_FILE, export.WEIGHTS_FILE, export.VOCAB_FILE,
                                 "config.json", "dataset_info.json"}
  assert meta["signature"]["inputs"]["item_ids"] == {"shape": ["b", "l"], "dtype": "int32"}
  assert meta["signature"]["inputs"]["timestamps"]["shape"] == ["b", "l", 2]  # time words
  assert meta["format_version"] == 4 and meta["task"] == "retrieval"
  with np.load(os.path.join(path, export.WEIGHTS_FILE), allow_pickle=False) as npz:
    assert len(npz.files) == len(meta["signature"]["weights"])
  bundle = export.load_bundle(path)
  assert [str(d) for d in bundle.exported.in_avals[-1].shape] == ["b", "l"]  # both symbolic
  assert bundle.lookup([1000, "1007", "nope", "<pad>", "<oov>"]) == [2, 3, 1, 1, 1]


def test_predictor_runs_every_bucket_without_recompiling(bundles):
  bundle = export.load_bundle(bundles["sasrec"])
  predictor = predictor_lib.Predictor(bundle, (1, 2, 4))
  predictor.warmup()
  compiled = predictor._call._cache_size()  # pylint: disable=protected-access
  x = predictor_lib.right_align([[2, 3, 4]] * 3, bundle.max_len)
  scores, ids = predictor.run(x, x, x, x)
  assert scores.shape == (3, 20) and ids.dtype == np.int32
  assert not set(ids.ravel()) & {0, 1, 2, 3, 4}  # PAD, OOV and the history excluded
  assert predictor._call._cache_size() == compiled  # pylint: disable=protected-access


def test_length_buckets_and_merged_calls_give_the_same_scores(bundles):
  """A history scores the same padded to its length bucket, to max_len, alone or in a
  call merged with other length groups by the cost plan."""
  bundle = export.load_bundle(bundles["hstu"])
  predictor = predictor_lib.Predictor(bundle, (1, 2, 4, 8), (3, 6))
  assert predictor.length_buckets == (3, 6, 12)
  predictor.warmup()
  assert set(predictor.cost) == {(b, n) for b in (1, 2, 4, 8) for n in (3, 6, 12)}
  rng = np.random.default_rng(0)
  histories = [rng.integers(2, bundle.meta["item_vocab_size"], n).tolist()
               for n in (1, 3, 4, 6, 7, 12, 2, 9)]
  times = [sorted(rng.integers(10**9, 10**9 + 10**6, len(h)).tolist()) for h in histories]

  def one(items, ts, length):
    x = predictor_lib.right_align([items], length)
    t = predictor_lib.right_align([ts], length)
    q = predictor_lib.right_align([ts[1:] + [ts[-1] + 60]], length)
    return predictor.run(x, t, q, x)

  for items, ts in zip(histories, times):
    full_scores, full_ids = one(items, ts, 12)
    scores, ids = one(items, ts, predictor.length(len(items)))
    np.testing.assert_allclose(scores, full_scores, rtol=1e-5, atol=1e-6)
    assert (ids == full_ids).mean() > 0.9  # ties at float32 noise may swap
  groups = {3: [0, 1], 6: [2, 3], 12: [4]}
  plan = predictor.plan(groups)
  assert sorted(r for _, rows in plan for r in rows) == [0, 1, 2, 3, 4]
  assert all(length >= max(n for n, rows in groups.items() if r in rows)
             for length, members in plan for r in members)
  predictor.cost = {(b, n): float(b * n) for b, n in predictor.cost}
  assert predictor.plan(groups) == [(3, [0, 1]), (6, [2, 3]), (12, [4])]  # padding costs
  predictor.cost = {k: 10.0 for k in predictor.cost}
  assert predictor.plan(groups) == [(12, [0, 1, 2, 3, 4])]  # fixed cost only: one call


def test_version_1_bundle_with_a_fixed_length_still_serves(bundles, trained, tmp_path):
  """Bundles written before the history length became symbolic load and answer the same."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from trainers import evaluate  # pylint: disable=g-import-not-at-top
  _, model, params, _ = evaluate.load_model(trained["sasrec"])
  leaves, treedef = jax.tree.flatten(params)
  (b,) = jax_export.symbolic_shape("b")
  seq = jax.ShapeDtypeStruct((b, 12), np.int32)
  weights = tuple(jax.ShapeDtypeStruct(np.shape(w), np.asarray(w).dtype) for w in leaves)
  old = jax_export.export(jax.jit(export.serving_function(model, 20)(treedef)),
                          platforms=("cpu",))(weights, seq, seq, seq, seq)
  copy = tmp_path / "v1"
  shutil.copytree(bundles["sasrec"], copy)
  (copy / export.MODEL_FILE).write_bytes(old.serialize())
  meta = json.loads((copy / export.BUNDLE_FILE).read_text())
  meta["format_version"] = 1
  meta["sha256"][export.MODEL_FILE] = export._sha256(str(copy / export.MODEL_FILE))  # pylint: disable=protected-access
  (copy / export.BUNDLE_FILE).write_text(json.dumps(meta))

  v1 = predictor_lib.Predictor(export.load_bundle(str(copy)), (1, 4))
  v2 = predictor_lib.Predictor(export.load_bundle(bundles["sasrec"]), (1, 4))
  assert v1.length_buckets == (12,) and v2.length_buckets == (12,)
  x = predictor_lib.right_align([[2, 3, 4], [5, 6, 7, 8, 9]], 12)
  np.testing.assert_allclose(v1.run(x, x, x, x)[0], v2.run(x, x, x, x)[0], rtol=1e-6)
  meta["format_version"] = 5
  (copy / export.BUNDLE_FILE).write_text(json.dumps(meta))
  with pytest.raises(export.BundleError, match="v5, expected"):
    export.load_bundle(str(copy))


def test_tampered_bundle_is_rejected(bundles, tmp_path):
  copy = tmp_path / "b"
  shutil.copytree(bundles["sasrec"], copy)
  with open(copy / export.WEIGHTS_FILE, "r+b") as f:
    f.seek(100)
    f.write(b"\x00\x01")
  with pytest.raises(export.BundleError, match="sha256"):
    export.load_bundle(str(copy))
  with pytest.raises(export.BundleError, match="not a serving bundle"):
    export.load_bundle(str(tmp_path))


# -- local registry ----------------------------------------------------------------------


def test_registry_versions_and_current(bundles, tmp_path):
  registry = str(tmp_path / "registry")
  first = deploy_step.run_local(bundles["sasrec"], registry, run_id="r1")
  second = deploy_step.run_local(bundles["hstu"], registry, run_id="r2")
  assert (first["version"], second["version"]) == ("0001", "0002")
  current = registry_lib.current(registry)
  assert current["version"] == "0002" and current["model"] == "hstu" and current["run_id"] == "r2"
  assert export.load_bundle(current["path"]).meta["model"] == "hstu"
  assert len(open(os.path.join(registry, registry_lib.REGISTRY_HISTORY)).readlines()) == 2
  with pytest.raises(FileNotFoundError, match="no deployed model"):
    registry_lib.current(str(tmp_path / "empty"))


def test_registry_of_a_local_run(tmp_path, monkeypatch):
  monkeypatch.delenv("RECML_REGISTRY", raising=False)
  run = tmp_path / "runs" / "run-1"
  (run / "recml-pipeline-x" / "export" / "bundle").mkdir(parents=True)
  (run / "run.json").write_text("{}")
  assert deploy_step.registry_for(str(run / "recml-pipeline-x" / "export" / "bundle")) == \
      str(tmp_path / "runs" / "registry")
  monkeypatch.setenv("RECML_REGISTRY", "/srv/registry")
  assert deploy_step.registry_for("/anything") == "/srv/registry"


def test_cli_deploy_then_serve_resolves_the_current_model(bundles, tmp_path, monkeypatch):
  monkeypatch.delenv("AIP_STORAGE_URI", raising=False)
  registry = str(tmp_path / "reg")
  assert cli.main(["deploy", "--bundle", bundles["sasrec"], "--registry", registry]) == 0
  assert registry_lib.resolve_bundle(None, registry) == os.path.join(registry, "models", "0001")
  monkeypatch.setenv("RECML_REGISTRY", registry)
  assert registry_lib.resolve_bundle(None, None) == os.path.join(registry, "models", "0001")
  assert registry_lib.resolve_bundle("/explicit", None) == "/explicit"


def test_default_registry_is_in_the_pipelines_local_root(tmp_path, monkeypatch):
  """`recml serve` (serving, which cannot import pipelines) finds the registry where the
  local pipeline's deploy step puts it."""
  for name in ("RECML_REGISTRY", "RECML_PIPELINE_ROOT"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.chdir(tmp_path)
  assert registry_lib.default_registry() == str(tmp_path / env_lib.DEFAULT_LOCAL_ROOT /
                                                "registry")
  monkeypatch.setenv("RECML_PIPELINE_ROOT", "elsewhere")
  assert registry_lib.default_registry() == str(tmp_path / "elsewhere" / "registry")
  monkeypatch.setenv("RECML_REGISTRY", "/srv/registry")
  assert registry_lib.default_registry() == "/srv/registry"


def test_vertex_contract_environment(monkeypatch):
  assert server.routes_from_env({}) == (8080, "/health", "/predict")
  assert server.routes_from_env({"AIP_HTTP_PORT": "7000", "AIP_HEALTH_ROUTE": "/v1/h",
                                 "AIP_PREDICT_ROUTE": "/v1/p"}) == (7000, "/v1/h", "/v1/p")


# -- Vertex: the requests ----------------------------------------------------------------


def test_vertex_requests():
  req = deploy_step.vertex_requests(ENV, artifact_uri="gs://bucket/run/export/bundle",
                                    display_name="ml1m-sasrec")
  assert req["upload"] == {
      "project": "my-project", "location": "europe-west4", "display_name": "ml1m-sasrec",
      "artifact_uri": "gs://bucket/run/export/bundle",
      "serving_container_image_uri": f"{REGISTRY}/recml-serving:1.2.3",
      "serving_container_args": ["recml", "serve"], "serving_container_ports": [8080],
      "serving_container_predict_route": "/predict",
      "serving_container_health_route": "/health", "labels": {"recml": "serving"}}
  assert req["endpoint"] == {"project": "my-project", "location": "europe-west4",
                             "display_name": "ml1m-sasrec-endpoint", "network": None}
  assert req["deploy"] == {
      "deployed_model_display_name": "ml1m-sasrec", "machine_type": "n1-standard-4",
      "min_replica_count": 1, "max_replica_count": 2, "traffic_percentage": 100,
      "service_account": "runner@my-project.iam.gserviceaccount.com"}
  with pytest.raises(ValueError, match="Cloud Storage"):
    deploy_step.vertex_requests(ENV, artifact_uri="/local/bundle")
  with pytest.raises(ValueError, match="RECML_PROJECT"):
    deploy_step.vertex_requests(Env(), artifact_uri="gs://b/x")


def test_vertex_deploy_dry_run(tmp_path, capsys, monkeypatch):
  for key, value in {"RECML_PROJECT": "my-project", "RECML_REGION": "europe-west4",
                     "RECML_IMAGE_REGISTRY": REGISTRY, "RECML_IMAGE_TAG": "1.2.3"}.items():
    monkeypatch.setenv(key, value)
  assert cli.main(["deploy", "--target", "vertex", "--bundle", "gs://b/bundle",
                   "--display-name", "m", "--endpoint",
                   "projects/p/locations/europe-west4/endpoints/42", "--dry-run"]) == 0
  req = json.loads(capsys.readouterr().out)
  assert req["upload"]["serving_container_image_uri"] == f"{REGISTRY}/recml-serving:1.2.3"
  assert req["endpoint"] == {"endpoint_name": "projects/p/locations/europe-west4/endpoints/42"}


def _compile(tmp_path, target):
  out = tmp_path / f"{target}.yaml"
  dag.compile_pipeline(dag.build_pipeline(target, env=ENV), str(out))
  return yaml.safe_load(out.read_text())


def test_compiled_vertex_deploy(tmp_path):
  ir = _compile(tmp_path, "vertex")
  blessed = ir["components"]["comp-condition-1"]["dag"]["tasks"]
  assert set(blessed) == {"bless", "export", *dag.VERTEX_DEPLOY_TASKS}
  # export runs after bless, in the trainer image; the importer reads its URI output
  assert blessed["export"]["dependentTasks"] == ["bless"]
  assert blessed["importer"]["inputs"]["parameters"]["uri"]["taskOutputParameter"] == {
      "outputParameterKey": "Output", "producerTask": "export"}
  importer = ir["deploymentSpec"]["executors"]["exec-importer"]["importer"]
  assert importer["typeSchema"]["schemaTitle"] == "google.UnmanagedContainerModel"
  spec = importer["metadata"]["containerSpec"]
  assert spec["imageUri"] == f"{REGISTRY}/recml-serving:1.2.3"
  assert spec["args"] == ["recml", "serve"]
  assert (spec["predictRoute"], spec["healthRoute"]) == ("/predict", "/health")
  assert spec["ports"] == [{"containerPort": 8080}]

  def constants(task):
    return {k: v["runtimeValue"]["constant"]
            for k, v in blessed[task]["inputs"].get("parameters", {}).items()
            if "runtimeValue" in v}

  upload = constants("model-upload")
  assert upload["project"] == "my-project" and upload["location"] == "europe-west4"
  assert blessed["model-upload"]["inputs"]["artifacts"]["unmanaged_container_model"][
      "taskOutputArtifact"]["producerTask"] == "importer"
  deploy = constants("model-deploy")
  assert deploy["dedicated_resources_machine_type"] == "n1-standard-4"
  assert deploy["dedicated_resources_min_replica_count"] == 1
  assert deploy["dedicated_resources_max_replica_count"] == 2
  assert deploy["traffic_split"] == {"0": 100}
  assert deploy["service_account"] == ENV.service_account
  artifacts = blessed["model-deploy"]["inputs"]["artifacts"]
  assert artifacts["model"]["taskOutputArtifact"]["producerTask"] == "model-upload"
  assert artifacts["endpoint"]["taskOutputArtifact"]["producerTask"] == "endpoint-create"
  for name in dag.VERTEX_DEPLOY_TASKS:
    assert not blessed[name].get("cachingOptions", {}).get("enableCache"), name


def test_compiled_local_deploy(tmp_path):
  ir = _compile(tmp_path, "local")
  blessed = ir["components"]["comp-condition-1"]["dag"]["tasks"]
  assert set(blessed) == {"bless", "export", "deploy"}
  assert blessed["deploy"]["inputs"]["artifacts"]["bundle"]["taskOutputArtifact"] == {
      "outputArtifactKey": "bundle", "producerTask": "export"}
  image = ir["deploymentSpec"]["executors"]["exec-deploy"]["container"]["image"]
  assert image == f"{REGISTRY}/recml-tools:1.2.3"
