"""Container image names: one place, shared by the DAG, the build scripts and the tests.

The registry prefix and tag come from the environment (``infra/env.sh`` sets them for a
deployment); locally built images carry the bare names, e.g. ``recml-trainer:0.1.0``.
Every image is built from one Dockerfile, ``DOCKERFILE``, with the build arg
``IMAGE=<name>`` (``infra/build_images.sh``); what each installs is the ``IMAGES`` table
of ``containers/install_deps.py``.
"""

from __future__ import annotations

import os

IMAGES = ("preprocess", "trainer", "tools", "serving")
DEFAULT_TAG = "0.1.0"
DOCKERFILE = "containers/Dockerfile"
# Carried by every image and build stage the Dockerfile makes: the build prunes the
# untagged ones (`docker image prune --filter label=...`).
BUILD_LABEL = "ai.recml.build=1"


def image(name: str, registry: str | None = None, tag: str | None = None) -> str:
  """Full reference of one of the project's images.

  Args:
    name: one of ``IMAGES``.
    registry: e.g. ``us-central1-docker.pkg.dev/PROJECT/recml``; defaults to
      ``$RECML_IMAGE_REGISTRY`` (empty: local names).
    tag: defaults to ``$RECML_IMAGE_TAG`` or ``DEFAULT_TAG``.
  """
  if name not in IMAGES:
    raise ValueError(f"unknown image {name!r}; expected one of {IMAGES}")
  registry = os.environ.get("RECML_IMAGE_REGISTRY", "") if registry is None else registry
  tag = tag or os.environ.get("RECML_IMAGE_TAG", DEFAULT_TAG)
  base = f"recml-{name}:{tag}"
  return f"{registry.rstrip('/')}/{base}" if registry else base
