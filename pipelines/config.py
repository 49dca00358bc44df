"""Experiment configs: YAML files under ``pipelines/configs/`` mapped onto pipeline parameters.

A config has the sections below (every key optional; ``DEFAULTS`` holds the rest)::

    name: ml1m-sasrec          # run ids start with it
    dataset: ml-1m             # display label; champions are per dataset *identity* + model
    data: movielens-1m         # default --data: a path, gs:// / bq:// URI, or a known download
    preprocess: {format, max_len, min_item_count, bad_rows_threshold, timestamp_unit, runner}
    train: {model, <any TrainConfig field>: value}
    gate: {metric, k, split, tolerance}
    vertex: {machine_type, tpu_topology, accelerator_type, accelerator_count, replica_count, ...}
    kfp: {train_cpu, train_memory}
    caching: true
    labels: {key: value}

``--set section.key=value`` overrides any entry (values parsed as YAML, so ``2``, ``1e-3``,
``true`` get their types); ``train.*`` keys go to the trainer unchecked here, where
``trainers.configs.apply_overrides`` validates them.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

DEFAULTS: dict[str, Any] = {
    "name": "recml",
    "description": "",
    "dataset": "",
    "data": "",
    "preprocess": {
        "format": "",
        "max_len": 200,
        "min_item_count": 1,
        "bad_rows_threshold": 0.01,
        "timestamp_unit": "auto",    # s | ms | us | ns | auto (detected from a sample)
        "runner": "direct",          # direct | dataflow (vertex only)
    },
    "train": {"model": "sasrec"},
    "gate": {"metric": "ndcg", "k": 10, "split": "valid", "tolerance": 0.0},
    "vertex": {
        "machine_type": "ct5lp-hightpu-4t",   # TPU v5e, 4 chips, one host
        "tpu_topology": "2x2",
        "accelerator_type": "",               # GPUs: e.g. NVIDIA_TESLA_A100 on a2-highgpu-1g
        "accelerator_count": 0,
        "replica_count": 1,
        "boot_disk_size_gb": 100,
        "timeout": "86400s",
    },
    "kfp": {"train_cpu": "", "train_memory": ""},
    "caching": True,
    "labels": {},
}

# Sections whose keys are checked against DEFAULTS (``train`` is checked by the trainer).
_CHECKED = ("preprocess", "gate", "vertex", "kfp")


def config_path(name_or_path: str) -> str:
  """Resolves ``ml1m_sasrec`` / ``ml1m_sasrec.yaml`` / a path to a config file."""
  if os.path.exists(name_or_path):
    return name_or_path
  base = name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml"
  path = os.path.join(CONFIG_DIR, os.path.basename(base))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config {name_or_path!r} not found; known: {', '.join(list_configs())}")
  return path


def list_configs() -> list[str]:
  return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
  out = copy.deepcopy(base)
  for key, value in extra.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), dict):
      out[key] = _merge(out[key], value)
    else:
      out[key] = copy.deepcopy(value)
  return out


def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """``["train.epochs=2", "gate.k=50"]`` -> nested dict with YAML-typed values."""
  out: dict[str, Any] = {}
  for item in items:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--set expects key=value, got {item!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
      try:
        value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
      except ValueError:
        pass
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"--set {item!r}: {part!r} is not a section")
    node[parts[-1]] = value
  return out


def validate(config: Mapping[str, Any]) -> None:
  """Rejects unknown keys (typos) outside ``train`` and ``labels``."""
  unknown = sorted(set(config) - set(DEFAULTS))
  for section in _CHECKED:
    unknown += [f"{section}.{k}" for k in set(config.get(section, {})) - set(DEFAULTS[section])]
  if unknown:
    raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
  if config["preprocess"]["runner"] not in ("direct", "dataflow"):
    raise ValueError("preprocess.runner must be 'direct' or 'dataflow'")
  from components.preprocess import step  # pylint: disable=g-import-not-at-top
  units = step.TIMESTAMP_UNIT_CHOICES
  if config["preprocess"]["timestamp_unit"] not in units:
    raise ValueError(f"preprocess.timestamp_unit must be one of {', '.join(units)}, "
                     f"got {config['preprocess']['timestamp_unit']!r}")
  if not config["train"].get("model"):
    raise ValueError("train.model is required")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Loads a config file, fills in defaults and applies ``--set`` overrides."""
  with open(config_path(name_or_path), encoding="utf-8") as f:
    raw = yaml.safe_load(f) or {}
  config = _merge(_merge(DEFAULTS, raw), parse_set(overrides))
  validate(config)
  return config


def train_overrides(config: Mapping[str, Any]) -> list[str]:
  """The ``train`` section (minus ``model``) as ``key=value`` strings for the trainer."""
  out = []
  for key, value in sorted(config["train"].items()):
    if key == "model":
      continue
    if isinstance(value, bool):
      value = str(value).lower()
    out.append(f"{key}={value}")
  if "max_len" not in config["train"]:
    out.append(f"max_len={config['preprocess']['max_len']}")
  return out


def pipeline_parameters(config: Mapping[str, Any], *, data_uri: str, store_uri: str,
                        run_id: str = "", beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """The runtime parameters of the pipeline (``pipelines.dag``) for one config."""
  pre, gate = config["preprocess"], config["gate"]
  return {
      "data_uri": data_uri,
      "dataset_name": config["dataset"] or config["name"],
      "data_format": pre["format"] or "",
      "max_len": int(pre["max_len"]),
      "min_item_count": int(pre["min_item_count"]),
      "bad_rows_threshold": float(pre["bad_rows_threshold"]),
      "timestamp_unit": str(pre["timestamp_unit"] or "auto"),
      "beam_args": list(beam_args),
      "model": str(config["train"]["model"]),
      "train_overrides": train_overrides(config),
      "store_uri": store_uri,
      "run_id": run_id,
      "labels": {str(k): str(v) for k, v in config["labels"].items()},
      "gate_metric": str(gate["metric"]),
      "gate_k": int(gate["k"]),
      "gate_split": str(gate["split"]),
      "gate_tolerance": float(gate["tolerance"]),
  }


def dataflow_args(env, image: str, run_id: str = "") -> list[str]:
  """Beam options that send the preprocess step to Dataflow (``preprocess.runner: dataflow``).

  Args:
    env: a :class:`pipelines.env.Env` (project, region, pipeline root, service account).
    image: the preprocess image, used as Dataflow's SDK container (it has tf.transform).
    run_id: names the Dataflow job.
  """
  env.require("project", "region", "pipeline_root", target="vertex (Dataflow)")
  root = env.pipeline_root.rstrip("/")
  args = [
      "--runner=DataflowRunner",
      f"--project={env.project}",
      f"--region={env.region}",
      f"--temp_location={root}/dataflow/tmp",
      f"--staging_location={root}/dataflow/staging",
      f"--sdk_container_image={image}",
      "--experiments=use_runner_v2",
  ]
  if run_id:
    args.append(f"--job_name={run_id}-preprocess")
  if env.service_account:
    args.append(f"--service_account_email={env.service_account}")
  if env.network:
    args.append(f"--network={env.network.rsplit('/', 1)[-1]}")
  return args
