"""Experiment configs: YAML files under ``pipelines/configs/`` mapped onto pipeline parameters.

A config has the sections below (every key optional; ``DEFAULTS`` holds the rest)::

    name: ml1m-sasrec          # run ids start with it
    dataset: ml-1m             # display label; champions are per dataset *identity* + model
    data: movielens-1m         # default --data: a path, gs:// / bq:// URI, or a known download
    preprocess: {task, format, bad_rows_threshold, runner,
                 max_len, min_item_count, timestamp_unit,                  (sequence task)
                 label, dense, categorical, multi_hot, multi_hot_separator,  (ranking task)
                 hash_buckets, min_count, split, split_ratios, split_seed, time_column}
    train: {model, <any TrainConfig field>: value}
    gate: {metric, k, guard_metric, split, tolerance}
    vertex: {machine_type, tpu_topology, accelerator_type, accelerator_count, replica_count, ...}
                               (checked by check_vertex: TPU slice = 1 replica + topology)
    kfp: {train_cpu, train_memory}
    caching: true
    labels: {key: value}

``--set section.key=value`` overrides any entry (values parsed as YAML, so ``2``, ``1e-3``,
``true`` get their types); ``train.*`` keys go to the trainer unchecked here, where
``trainers.configs.apply_overrides`` validates them.

One DAG serves both tasks; the model decides which (:func:`task`): ``sequence``
(retrieval: SASRec, HSTU; the preprocess step builds user histories) or ``ranking``
(CTR: DLRM v2, DCNv2; the preprocess step's ranking parameters are those of
``recml preprocess --task ranking``, :func:`components.preprocess.ctr_step.run`, and
the gate is typically ``metric: auc, k: 0, guard_metric: logloss``).
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
        "task": "",                  # sequence | ranking; empty: the model's task
        "format": "",
        "bad_rows_threshold": 0.01,
        "runner": "direct",          # direct | dataflow (vertex only)
        # sequence task
        "max_len": 200,
        "min_item_count": 1,
        "timestamp_unit": "auto",    # s | ms | us | ns | auto (detected from a sample)
        # ranking task (recml preprocess --task ranking; lists or "a,b" strings)
        "label": "",                 # the 0/1 label column (Criteo's is fixed)
        "dense": [],                 # numeric columns: log1p, z-score, missing indicator
        "categorical": [],           # default: every column without another role
        "multi_hot": [],             # COLUMN:SIZE list columns
        "multi_hot_separator": "|",
        "hash_buckets": [],          # N (all) and/or FEATURE=N: hashing instead of a vocabulary
        "min_count": [],             # N and/or FEATURE=N (default 10 for Criteo, else 2)
        "split": "auto",             # auto | files | random | time
        "split_ratios": "",          # TRAIN,VALID,TEST of random/time splits (0.8,0.1,0.1)
        "split_seed": 0,
        "time_column": "",           # orders rows for the time split
    },
    "train": {"model": "sasrec"},
    # k: the cut-off of metrics at K; 0 (or null) for metrics without one (mrr, auc).
    # guard_metric: a second metric (no cut-off) that may veto a blessing (ranking: logloss).
    "gate": {"metric": "ndcg", "k": 10, "guard_metric": "", "split": "valid",
             "tolerance": 0.0},
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
TASKS = ("sequence", "ranking")  # the preprocess step's names of the two tasks
# The ranking models of ``trainers.models`` (the others are sequence models), listed rather
# than imported: importing JAX in ``recml run``'s process sets TF_CPP_MIN_LOG_LEVEL, which
# the local steps would inherit (pipelines/run_output.py). A test checks the list.
RANKING_MODELS = ("dlrm-v2", "dcnv2", "dlrm")
# The preprocess keys of each task (the others must keep their defaults).
TASK_KEYS = {
    "sequence": ("max_len", "min_item_count", "timestamp_unit"),
    "ranking": ("label", "dense", "categorical", "multi_hot", "multi_hot_separator",
                "hash_buckets", "min_count", "split", "split_ratios", "split_seed",
                "time_column"),
}


# TPU VM machine types Vertex AI trains on -> (chips per host, may a slice span hosts).
# Vertex's ``MachineSpec.tpuTopology`` takes the TPU topologies of GKE, where the 1- and
# 8-chip VMs are single-host slices (1x1, 2x4) and every slice larger than one host is
# made of 4-chip VMs: v5e ``4x4`` on ct5lp-hightpu-4t is 16 chips on 4 hosts.
TPU_MACHINE_TYPES: dict[str, tuple[int, bool]] = {
    "ct5lp-hightpu-1t": (1, False),   # TPU v5e
    "ct5lp-hightpu-4t": (4, True),
    "ct5lp-hightpu-8t": (8, False),
    "ct6e-standard-1t": (1, False),   # TPU v6e
    "ct6e-standard-4t": (4, True),
    "ct6e-standard-8t": (8, False),
}


def tpu_hosts(vertex: Mapping[str, Any]) -> int:
  """The number of hosts of the ``vertex`` section's TPU slice (0: not a TPU VM);
  each runs the same trainer container, one JAX process per host."""
  machine, topology = vertex.get("machine_type"), vertex.get("tpu_topology") or ""
  if machine not in TPU_MACHINE_TYPES or not topology:
    return 0
  chips = 1
  for dim in str(topology).split("x"):
    chips *= int(dim)
  return chips // TPU_MACHINE_TYPES[machine][0]


def check_vertex(vertex: Mapping[str, Any]) -> None:
  """Rejects a ``vertex`` section Vertex AI would refuse or run wrongly, naming the key.

  A TPU slice is requested as ONE replica of a TPU VM machine type with
  ``tpu_topology`` (Vertex provisions the slice's hosts and runs the container on each);
  GPU/CPU jobs scale with ``replica_count`` (1 primary in workerpool0, the rest in
  workerpool1).
  """
  machine = vertex.get("machine_type")
  if not machine or not isinstance(machine, str):
    raise ValueError(f"vertex.machine_type is required, got {machine!r}")
  counts = {}
  for key, low in (("replica_count", 1), ("accelerator_count", 0)):
    value = vertex.get(key, low)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"vertex.{key} must be an integer >= {low}, got {value!r}")
    counts[key] = value
  accelerator = vertex.get("accelerator_type") or ""
  topology = str(vertex.get("tpu_topology") or "")
  if machine not in TPU_MACHINE_TYPES:
    if topology:
      raise ValueError(
          f"vertex.tpu_topology {topology!r} needs a TPU VM machine type "
          f"({', '.join(TPU_MACHINE_TYPES)}), not vertex.machine_type {machine!r}: "
          "clear it (--set vertex.tpu_topology=) for GPU/CPU machines")
    if counts["accelerator_count"] and not accelerator:
      raise ValueError("vertex.accelerator_count is set without vertex.accelerator_type")
    return
  per_host, multi_host = TPU_MACHINE_TYPES[machine]
  if accelerator or counts["accelerator_count"]:
    raise ValueError(f"vertex.accelerator_type/accelerator_count: {machine} is a TPU VM "
                     "type, which implies its accelerator; leave them empty")
  if counts["replica_count"] != 1:
    raise ValueError(
        f"vertex.replica_count must be 1 for a TPU slice, got {counts['replica_count']}: "
        "Vertex AI runs a TPU job as one replica; ask for more hosts with a larger "
        f"vertex.tpu_topology (on {machine}: {per_host} chips per host)")
  dims = topology.split("x")
  if not topology or len(dims) not in (2, 3) or not all(d.isdigit() and int(d) > 0
                                                        for d in dims):
    raise ValueError(f"vertex.tpu_topology must be AxB or AxBxC chips (e.g. 2x2, 4x4) for "
                     f"TPU VM machine type {machine}, got {topology!r}")
  chips = 1
  for d in dims:
    chips *= int(d)
  if chips % per_host:
    raise ValueError(f"vertex.tpu_topology {topology} is {chips} chips, not a whole number "
                     f"of {machine} hosts ({per_host} chips each)")
  if chips > per_host and not multi_host:
    multi = sorted(m for m, (_, ok) in TPU_MACHINE_TYPES.items()
                   if ok and m.split("-")[0] == machine.split("-")[0])
    raise ValueError(f"vertex.tpu_topology {topology} spans {chips // per_host} hosts, but "
                     f"{machine} makes single-host slices of {per_host} chips only; "
                     f"multi-host slices use {' or '.join(multi)}")


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
  """Rejects unknown keys (typos) outside ``train`` and ``labels``, bad values, and
  preprocess settings of the other task than the model's."""
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
  given = config["preprocess"]["task"]
  if given and given not in TASKS:
    raise ValueError(f"preprocess.task must be one of {', '.join(TASKS)}, got {given!r}")
  want = model_task(config["train"]["model"])
  if given and given != want:
    raise ValueError(f"preprocess.task is {given!r} but train.model "
                     f"{config['train']['model']!r} is a {want} model: remove "
                     "preprocess.task or choose a model of that task")
  other = TASK_KEYS["sequence" if want == "ranking" else "ranking"]
  stray = sorted(k for k in other
                 if config["preprocess"][k] != DEFAULTS["preprocess"][k])
  if stray:
    raise ValueError(f"preprocess.{', preprocess.'.join(stray)} apply to the "
                     f"{'sequence' if want == 'ranking' else 'ranking'} task only, and "
                     f"{config['train']['model']!r} is a {want} model")
  check_vertex(config["vertex"])
  k = config["gate"]["k"]
  if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
    raise ValueError(f"gate.k must be a cut-off >= 1, or 0/null for none, got {k!r}")


def model_task(model: str) -> str:
  """The preprocess task of a model: ``ranking`` (:data:`RANKING_MODELS`) or ``sequence``."""
  return "ranking" if model in RANKING_MODELS else "sequence"


def task(config: Mapping[str, Any]) -> str:
  """The config's task: ``sequence`` or ``ranking`` (its model's)."""
  return config["preprocess"]["task"] or model_task(config["train"]["model"])


def ranking_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
  """The ranking preprocess parameters: the keywords of ``ctr_step.run`` as JSON values
  (lists of strings, ``split_ratios`` a list of numbers; unset ones left out, so the
  step's defaults apply: KFP parameters cannot be null); empty for the sequence task."""
  if task(config) != "ranking":
    return {}
  out: dict[str, Any] = {}
  for key in TASK_KEYS["ranking"]:
    value = config["preprocess"][key]
    if key == "split_seed":
      out[key] = int(value)
    elif key == "split_ratios":
      parts = value.split(",") if isinstance(value, str) else list(value or [])
      out[key] = [float(v) for v in parts if str(v).strip()] or None
    elif isinstance(value, (list, tuple)):
      out[key] = [str(v) for v in value]
    else:
      out[key] = str(value) if value not in (None, "") else None
  return {k: v for k, v in out.items() if v is not None}


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
  if "max_len" not in config["train"] and task(config) == "sequence":
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
      "gate_k": int(gate["k"] or 0),
      "gate_guard_metric": str(gate["guard_metric"] or ""),
      "gate_split": str(gate["split"]),
      "gate_tolerance": float(gate["tolerance"]),
      "task": task(config),
      "ranking": ranking_parameters(config),
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
