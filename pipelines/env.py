"""Deployment environment: the one source of project, region, bucket, registry and accounts.

Values come from, lowest precedence first: the process environment
(``RECML_PROJECT``, ``RECML_REGION``, ...), then an env file given with ``--env-file``
(``KEY=VALUE`` lines, ``export`` and quotes allowed, the format of ``infra/env.sh``),
then explicit command-line flags. No other module spells a project, bucket or
registry; they all take an :class:`Env`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Mapping

# Field name -> environment variable.
VARIABLES = {
    "project": "RECML_PROJECT",
    "region": "RECML_REGION",
    "pipeline_root": "RECML_PIPELINE_ROOT",
    "service_account": "RECML_SERVICE_ACCOUNT",
    "image_registry": "RECML_IMAGE_REGISTRY",
    "image_tag": "RECML_IMAGE_TAG",
    "store_uri": "RECML_STORE_URI",
    "kfp_host": "RECML_KFP_HOST",
    "experiment": "RECML_EXPERIMENT",
    "network": "RECML_NETWORK",
}

DEFAULT_LOCAL_ROOT = "runs"          # local pipeline root, relative to the cwd
DEFAULT_LOCAL_STORE = "duckdb:///runs/metrics.duckdb"


@dataclasses.dataclass(frozen=True)
class Env:
  """Environment-specific values. Empty strings mean "not set"."""

  project: str = ""
  region: str = "us-central1"
  pipeline_root: str = ""
  service_account: str = ""
  image_registry: str = ""
  image_tag: str = ""
  store_uri: str = ""
  kfp_host: str = ""
  experiment: str = "recml"
  network: str = ""

  def require(self, *names: str, target: str = "") -> None:
    """Raises a ValueError naming every missing field and its variable."""
    missing = [n for n in names if not getattr(self, n)]
    if missing:
      where = f" for target {target!r}" if target else ""
      hints = ", ".join(f"{n} (${VARIABLES[n]} or --{n.replace('_', '-')})" for n in missing)
      raise ValueError(f"missing environment settings{where}: {hints}")

  def with_overrides(self, **values: str | None) -> "Env":
    """A copy with the given non-empty values replaced (e.g. from CLI flags)."""
    return dataclasses.replace(self, **{k: v for k, v in values.items() if v})


def read_env_file(path: str) -> dict[str, str]:
  """Parses ``KEY=VALUE`` lines (``#`` comments, ``export`` prefixes, shell quoting)."""
  values = {}
  with open(path, encoding="utf-8") as f:
    for lineno, raw in enumerate(f, 1):
      line = raw.strip()
      if not line or line.startswith("#"):
        continue
      if line.startswith("export "):
        line = line[len("export "):].strip()
      key, sep, value = line.partition("=")
      if not sep or not key.strip().isidentifier():
        raise ValueError(f"{path}:{lineno}: expected KEY=VALUE, got {raw.rstrip()!r}")
      parts = shlex.split(value, comments=True)
      values[key.strip()] = parts[0] if parts else ""
  return values


def load_env(env_file: str | None = None,
             environ: Mapping[str, str] | None = None) -> Env:
  """Builds the :class:`Env` from the process environment and an optional env file."""
  source = dict(os.environ if environ is None else environ)
  if env_file:
    source.update(read_env_file(env_file))
  defaults = Env()
  values = {field: source.get(var) or getattr(defaults, field)
            for field, var in VARIABLES.items()}
  return Env(**values)
