"""Shared by the container tier: the images, built once per session."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from components import images

ROOT = pathlib.Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
BUILD_TIMEOUT_S = 3600


def _docker_works() -> bool:
  if shutil.which("docker") is None:
    return False
  return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def built() -> dict[str, str]:
  """Builds every image (sequentially) and returns {name: local image reference}."""
  if not _docker_works():
    message = "no Docker engine: run infra/bootstrap_docker.sh (or infra/test.sh)"
    if IN_CI:
      pytest.fail(message)
    pytest.skip(message)
  env = dict(os.environ, RECML_IMAGE_REGISTRY="", TRAINER_ACCELERATOR="cpu",
             # The results table records deliberate builds (make build), not test builds.
             RECML_IMAGES_RESULTS="")
  result = subprocess.run(["bash", "infra/build_images.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  return {name: images.image(name, registry="") for name in images.IMAGES}


