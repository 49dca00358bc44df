"""Static checks of the infrastructure: scripts, Dockerfiles, Kind/KFP pins, Cloud Build and
the BigQuery metrics schema. Fast; needs `shellcheck` (Debian package) on PATH."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from components import images

ROOT = pathlib.Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", "build", "dist", "runs", "workdirs", "node_modules", "__pycache__"}
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def _files(pattern: str, under: str = "") -> list[pathlib.Path]:
  """Files matching ``pattern`` below ROOT/under, skipping virtualenvs and build output."""
  found = []
  for folder, dirs, files in os.walk(ROOT / under):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".venv")]
    found += [pathlib.Path(folder, f) for f in files if pathlib.PurePath(f).match(pattern)]
  return sorted(found)


def _infra_files() -> list[pathlib.Path]:
  return _files("*", "infra") + _files("*", "containers")


SCRIPTS = _files("*.sh")
DOCKERFILE = ROOT / images.DOCKERFILE


def _read(rel: str) -> str:
  return (ROOT / rel).read_text()


def _install_deps():
  spec = importlib.util.spec_from_file_location("install_deps", ROOT / "containers/install_deps.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


# --- shell scripts -----------------------------------------------------------------------

def test_scripts_found():
  names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
  assert {"infra/bootstrap_docker.sh", "infra/build_images.sh", "infra/test.sh",
          "infra/kind/up.sh", "infra/kind/down.sh", "infra/gcp/setup.sh",
          "containers/entrypoint.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_parses(script):
  shell = "sh" if script.read_text().startswith("#!/bin/sh") else "bash"
  subprocess.run([shell, "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    if IN_CI:
      pytest.fail("shellcheck is not installed (apt-get install shellcheck)")
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", "-x", str(script)], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_executable():
  for script in SCRIPTS:  # those with a shebang are run, the others sourced
    if script.read_text().startswith("#!"):
      assert os.access(script, os.X_OK), f"{script} is not executable"


def test_env_example_defines_what_the_scripts_require():
  env = subprocess.run(
      ["bash", "-c", "set -u; source infra/env.example.sh; env -0"], cwd=ROOT,
      check=True, capture_output=True, text=True).stdout
  defined = {kv.split("=", 1)[0] for kv in env.split("\0") if "=" in kv}
  required = set()
  for script in ("infra/gcp/setup.sh", "infra/gcp/submit_build.sh"):
    required |= set(re.findall(r'"\$\{(\w+):\?\}"', _read(script)))
  assert {"PROJECT", "REGION", "BUCKET", "REGISTRY"} <= required | defined
  assert required <= defined, f"not in infra/env.example.sh: {required - defined}"
  assert "RECML_IMAGE_REGISTRY" in defined and "RECML_IMAGE_TAG" in defined


# --- pins ----------------------------------------------------------------------------------

def _constraint(name: str) -> str:
  for line in _read("requirements/constraints.txt").splitlines():
    if line.lower().startswith(name.lower() + "=="):
      return line.split("==", 1)[1].strip()
  raise AssertionError(f"{name} is not pinned in requirements/constraints.txt")


def test_kind_and_kfp_are_pinned():
  up = _read("infra/kind/up.sh")
  kfp_version = re.search(r"^KFP_VERSION=(\S+)$", up, re.M).group(1)
  assert re.fullmatch(r"\d+\.\d+\.\d+", kfp_version)
  # The backend release that matches the SDK's API client.
  assert kfp_version == _constraint("kfp-server-api")
  node = re.search(r"^KIND_NODE_IMAGE=(\S+)$", up, re.M).group(1)
  assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", node)
  assert "?ref=$KFP_VERSION" in up
  for path in _infra_files():
    text = path.read_text(errors="ignore")
    assert not re.search(r"ref=(master|main|latest)\b|:latest\b", text), path


def test_accelerator_constraints():
  # The Dockerfile copies them to requirements/, where install_deps.plan names them.
  assert "COPY requirements/constraints.txt containers/trainer/constraints-*.txt " \
      "requirements/" in DOCKERFILE.read_text()
  cpu = _read("containers/trainer/constraints-cpu.txt")
  assert not re.search(r"^(nvidia|jax-cuda)", cpu, re.M | re.I)
  for acc in ("cuda", "tpu"):
    lines = [l for l in _read(f"containers/trainer/constraints-{acc}.txt").splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines and all(re.fullmatch(r"[\w.\-]+==[\w.\-]+", l) for l in lines), acc
  assert "libtpu==" in _read("containers/trainer/constraints-tpu.txt")
  assert "jax-cuda12-plugin==" + _constraint("jax") in _read(
      "containers/trainer/constraints-cuda.txt")


# --- image names and Dockerfiles -----------------------------------------------------------

def _stages(text: str) -> list[tuple[str, str | None, str]]:
  """(base, stage name or None, the stage's instructions) for each FROM of a Dockerfile."""
  starts = [m for m in re.finditer(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)]
  ends = [m.start() for m in starts[1:]] + [len(text)]
  return [(m.group(1), m.group(2), text[m.end():end]) for m, end in zip(starts, ends)]


def test_one_dockerfile_with_a_stage_per_image():
  dockerfiles = [p for p in _files("*Dockerfile*") if "containers" in p.parts or
                 p.parent == ROOT]
  assert dockerfiles == [DOCKERFILE], "every image comes from containers/Dockerfile"
  stages = _stages(DOCKERFILE.read_text())
  names = [name for _, name, _ in stages]
  assert set(images.IMAGES) <= set(names)
  # The image is chosen by the build arg IMAGE: the last stage is the selected one.
  assert stages[-1][0] == "${IMAGE}" and not stages[-1][2].strip()
  assert re.search(r"^ARG IMAGE$", DOCKERFILE.read_text(), re.M)
  # What each image installs: install_deps.IMAGES, for the same names.
  assert sorted(_install_deps().IMAGES) == sorted(images.IMAGES)


def test_dockerfile():
  text = DOCKERFILE.read_text()
  assert 'org.opencontainers.image.title="recml-${IMAGE}"' in text
  assert 'org.opencontainers.image.revision="${REVISION}"' in text
  assert f'org.opencontainers.image.source="{images.DOCKERFILE}"' in text
  assert re.search(r"^ARG BASE_IMAGE=recml-base:bookworm$", text, re.M)
  stages = _stages(text)
  by_name = {name: (base, body) for base, name, body in stages if name}
  # Every image is the one chain app -> its own stage -> the selected stage.
  assert by_name["app"][0] == "${BASE_IMAGE}"
  for name in images.IMAGES:
    base, body = by_name[name]
    assert base == "app", name
    assert re.search(r"^LABEL org\.opencontainers\.image\.description=", body, re.M), name
    assert not re.search(r"^(RUN|USER|ENTRYPOINT|CMD) ", body, re.M), name
  # Every stage that does not start from another stage carries the build label, so the
  # build can prune what it made (and only that).
  label = "LABEL " + images.BUILD_LABEL
  for base, name, body in stages[:-1]:
    if base not in by_name:
      assert body.lstrip().startswith(label + "\n"), f"stage {name} lacks {label}"
  app = by_name["app"][1]
  users = re.findall(r"^USER (\S+)", app, re.M)
  assert users and users[-1] not in ("root", "0", "0:0"), "the images run as non-root"
  assert 'install_deps.py --image "$IMAGE" --accelerator "$ACCELERATOR"' in app
  assert "rm -rf /build" in app and "PATH=/opt/venv/bin:" in app
  assert "PIP_NO_CACHE_DIR=1" in app
  assert re.search(r'^ENTRYPOINT \["/usr/local/bin/recml-entrypoint"\]$', app, re.M)
  # Each package the wheel holds (pyproject.toml) is copied into the build.
  packages = tomllib.loads(_read("pyproject.toml"))["tool"]["setuptools"]["packages"]
  for pattern in packages["find"]["include"]:
    package = pattern.rstrip("*")
    assert f"COPY {package} /build/{package}\n" in app, f"{package}/ is not copied"
  assert not re.search(r"^\s*(ENV|ARG)\s+\S*(KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS)",
                       text, re.M | re.I)
  # No compilers or build tools are installed anywhere.
  assert not re.search(r"apt-get install|build-essential|\bgcc\b", text)
  # Per image, as the four Dockerfiles had it.
  assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in by_name["preprocess"][1]
  assert "EXPOSE 8080" in by_name["serving"][1]
  assert 'ai.recml.accelerator="${ACCELERATOR}"' in by_name["trainer"][1]
  for name in ("preprocess", "trainer"):
    assert "ENV TF_CPP_MIN_LOG_LEVEL=1" in by_name[name][1]


def test_install_deps_plans_what_the_former_dockerfiles_installed():
  deps = _install_deps()
  # (extras, more requirements, tensorflow-cpu, constraint files) of each former
  # containers/NAME/Dockerfile's install_deps.py call.
  for accelerator, extra in (("cpu", "cpu"), ("cuda", "cuda12"), ("tpu", "tpu")):
    spec, also, constraints = deps.plan("trainer", accelerator)
    assert (spec.extras, also, spec.tensorflow_cpu, constraints) == (
        ("train",), ["kfp", f"jax[{extra}]"], True,
        [f"requirements/constraints-{accelerator}.txt"])
    assert (ROOT / f"containers/trainer/constraints-{accelerator}.txt").is_file()
  expected = {"preprocess": (("preprocess",), ["kfp"], True),
              "tools": (("pipelines",), [], False),
              "serving": (("serve",), ["jax[cpu]"], False)}
  for name, want in expected.items():
    spec, also, constraints = deps.plan(name)
    assert (spec.extras, also, spec.tensorflow_cpu) == want and constraints == []
  for image, accelerator in (("tools", "cuda"), ("nope", "cpu"), ("trainer", "rocm")):
    with pytest.raises(SystemExit, match=accelerator if image != "nope" else "nope"):
      deps.plan(image, accelerator)


def test_install_deps_finds_cuda_packages():
  deps = _install_deps()
  assert deps.cuda_packages(["jax", "jaxlib", "numpy", "tensorflow-cpu"]) == []
  assert deps.cuda_packages(["nvidia-cublas-cu12", "jax", "jax_cuda12_plugin", "cupy-cuda12x",
                             "NVIDIA-nccl-cu12"]) == [
      "NVIDIA-nccl-cu12", "cupy-cuda12x", "jax_cuda12_plugin", "nvidia-cublas-cu12"]


def test_dockerignore_is_an_allow_list():
  lines = [l.strip() for l in _read(".dockerignore").splitlines()
           if l.strip() and not l.startswith("#")]
  assert lines[0] == "*", "everything is excluded unless allowed"
  allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
  assert not any(a.startswith((".venv", ".git", "runs", "data", "workdirs", "infra/env"))
                 for a in allowed)
  for needed in ("pyproject.toml", "requirements/constraints.txt", "components", "pipelines",
                 "serving", "trainers", "containers"):
    assert needed in allowed


# --- Cloud Build ---------------------------------------------------------------------------

def test_cloudbuild_builds_and_pushes_every_image():
  build = yaml.safe_load(_read("infra/gcp/cloudbuild.yaml"))
  steps = {s["id"]: s for s in build["steps"]}
  assert sorted(steps) == sorted(images.IMAGES)
  for name, step in steps.items():
    args = step["args"]
    assert args[args.index("-f") + 1] == images.DOCKERFILE
    assert f"IMAGE={name}" in args
    assert any(a.startswith("ACCELERATOR=") for a in args) == (name == "trainer")
    tag = f"${{_REGISTRY}}/recml-{name}:${{_TAG}}"
    assert args[args.index("-t") + 1] == tag
    assert "REVISION=${_REVISION}" in args
    assert tag in build["images"]
  assert len(build["images"]) == len(images.IMAGES)
  assert "BEAM_SDK_IMAGE=${_BEAM_SDK_IMAGE}" in steps["preprocess"]["args"]
  assert re.fullmatch(r"apache/beam_python3\.11_sdk:" + re.escape(_constraint("apache-beam")),
                      build["substitutions"]["_BEAM_SDK_IMAGE"])


# --- BigQuery metrics table ----------------------------------------------------------------

_TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "JSON": "STRING"}


def _normalise(field) -> tuple[str, str, str]:
  if isinstance(field, dict):
    name, ftype, mode = field["name"], field.get("type") or field.get("field_type"), field.get("mode")
  elif hasattr(field, "field_type"):  # google.cloud.bigquery.SchemaField
    name, ftype, mode = field.name, field.field_type, field.mode
  else:  # (name, type[, mode]) tuples
    name, ftype, mode = (list(field) + [None])[:3]
  ftype = str(ftype).upper()
  return name, _TYPE_ALIASES.get(ftype, ftype), str(mode or "NULLABLE").upper()


def test_metrics_table_json():
  fields = json.loads(_read("infra/gcp/metrics_table.json"))
  got = [_normalise(f) for f in fields]
  assert got == [
      ("run_id", "STRING", "REQUIRED"), ("pipeline", "STRING", "NULLABLE"),
      ("model", "STRING", "REQUIRED"), ("dataset", "STRING", "REQUIRED"),
      ("split", "STRING", "REQUIRED"), ("metric", "STRING", "REQUIRED"),
      ("k", "INT64", "NULLABLE"), ("value", "FLOAT64", "REQUIRED"),
      ("created_at", "TIMESTAMP", "REQUIRED"), ("model_uri", "STRING", "NULLABLE"),
      ("labels", "STRING", "NULLABLE"), ("dataset_id", "STRING", "NULLABLE")]
  bigquery = pytest.importorskip("google.cloud.bigquery")
  assert [bigquery.SchemaField.from_api_repr(f).name for f in fields] == [g[0] for g in got]


def test_metrics_table_json_matches_metrics_store():
  from components import metrics_store as store  # pylint: disable=g-import-not-at-top
  fields = json.loads(_read("infra/gcp/metrics_table.json"))
  assert [_normalise(f) for f in store.METRICS_SCHEMA] == [_normalise(f) for f in fields]
  clustering = getattr(store, "CLUSTERING_FIELDS", None)
  if clustering:
    assert f"--clustering_fields={','.join(clustering)}" in _read("infra/gcp/setup.sh")


# --- containers/install_deps.py ------------------------------------------------------------

def test_install_deps_reads_the_extras():
  deps = _install_deps()
  reqs = deps.requirements(ROOT / "pyproject.toml", ["preprocess"], ["kfp"])
  assert "apache-beam[gcp]==" + _constraint("apache-beam") in reqs
  assert reqs[-1] == "kfp" and "numpy==" + _constraint("numpy") in reqs
  assert deps.pinned_version(reqs, "tensorflow") == _constraint("tensorflow")
  assert deps.pinned_version(["tensorflow-cpu==1.0"], "tensorflow") is None
  with pytest.raises(SystemExit):
    deps.requirements(ROOT / "pyproject.toml", ["nope"], [])


def test_install_deps_tensorflow_shim(tmp_path):
  deps = _install_deps()
  deps.write_tensorflow_shim(tmp_path, "2.21.0")
  (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])
  assert dist.metadata["Name"] == "tensorflow" and dist.version == "2.21.0"
  assert dist.requires == ["tensorflow-cpu==2.21.0"]
  assert not list(tmp_path.glob("tensorflow/"))  # metadata only: no package files


def test_install_deps_strip(tmp_path):
  deps = _install_deps()
  keep = ["numpy/core/x.py", "apache_beam/testing/util.py", "tests/top_level_kept.py"]
  drop = ["tensorflow/include/a.h", "pandas/tests/t.py", "apache_beam/io/x_test.py",
          "apache_beam/io/__pycache__/x_test.cpython-311.pyc"]
  for rel in keep + drop:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("x")
  assert deps.strip(tmp_path) == len(drop)
  assert all((tmp_path / rel).exists() for rel in keep)
  assert not any((tmp_path / rel).exists() for rel in drop)


def test_build_images_rejects_unknown_names():
  result = subprocess.run(["bash", "infra/build_images.sh", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "unknown image 'nope'" in result.stderr


def test_kind_cluster_config():
  config = yaml.safe_load(_read("infra/kind/cluster.yaml"))
  assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
  assert [n["role"] for n in config["nodes"]] == ["control-plane"]
  assert "--config infra/kind/cluster.yaml" in _read("infra/kind/up.sh")


def test_entrypoint():
  entrypoint = str(ROOT / "containers/entrypoint.sh")
  ran = subprocess.run(["sh", entrypoint, "echo", "a b"], capture_output=True, text=True)
  assert ran.returncode == 0 and ran.stdout == "a b\n"
  # Harness flags only and no Beam boot binary (not on this machine): a clear error.
  flags = subprocess.run(["sh", entrypoint, "--id=1", "--logging_endpoint=x"],
                         capture_output=True, text=True)
  assert flags.returncode == 2 and "/opt/apache/beam/boot" in flags.stderr
