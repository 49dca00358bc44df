"""Model registry: a name maps to a module class and its config (with preset overrides)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from trainers.models.bert4rec import BERT4Rec, BERT4RecConfig
from trainers.models.dlrm import DLRM, DLRMConfig, PRESETS as _DLRM_PRESETS
from trainers.models.dlrm import TRAIN_PRESETS as _DLRM_TRAIN_PRESETS
from trainers.models.hstu import HSTU, HSTUConfig
from trainers.models.mamba4rec import Mamba4Rec, Mamba4RecConfig
from trainers.models.sasrec import SASRec, SASRecConfig

# name -> (module class, config class, preset overrides of the config's defaults)
_REGISTRY: dict[str, tuple[Callable, type, dict[str, Any]]] = {
    "sasrec": (SASRec, SASRecConfig, {}),
    "bert4rec": (BERT4Rec, BERT4RecConfig, {}),
    # the official code's initialisation (RecBole's: normal(0.02) weights, zero biases)
    "mamba4rec": (Mamba4Rec, Mamba4RecConfig, dict(init="recbole")),
    "hstu": (HSTU, HSTUConfig, {}),
    "hstu-large": (HSTU, HSTUConfig, dict(num_blocks=8, num_heads=2,
                                          attention_dim=25, linear_dim=25)),
    # ranking (CTR) models; their trainer settings: trainers.models.dlrm.TRAIN_PRESETS
    "dlrm-v2": (DLRM, DLRMConfig, _DLRM_PRESETS["dlrm-v2"]),
    "dcnv2": (DLRM, DLRMConfig, _DLRM_PRESETS["dcnv2"]),
    "dlrm": (DLRM, DLRMConfig, _DLRM_PRESETS["dlrm"]),
}
MODELS = tuple(_REGISTRY)

# name -> the trainer settings (TrainConfig fields) its preset changes, e.g. its loss
# (the sequential models' defaults are the loss that gave the best validation quality on
# ml-1m-partial: benchmarks/results/sequential.md)
_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # cloze over the masked positions, full softmax over the raw logits h.E + bias
    "bert4rec": dict(loss="softmax", temperature=1.0),
    "mamba4rec": dict(loss="softmax", temperature=1.0),  # the paper's CE over raw logits
    **_DLRM_TRAIN_PRESETS,
}


def _entry(name: str):
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
  return _REGISTRY[name]


def task_of(name: str) -> str:
  """The task a model serves: its config class's ``TASK`` (``retrieval`` unless it says
  ``ranking``); :mod:`trainers.tasks` holds what differs between the two."""
  _, config_cls, _ = _entry(name)
  return getattr(config_cls, "TASK", "retrieval")


def train_preset(name: str) -> dict[str, Any]:
  """The trainer settings (``TrainConfig`` fields) of the named model's preset."""
  _entry(name)
  return dict(_TRAIN_PRESETS.get(name, {}))


def model_config(name: str, **overrides: Any):
  """The named model's frozen config, preset values applied, then ``overrides``."""
  _, config_cls, preset = _entry(name)
  return config_cls(**{**preset, **overrides})


def config_from_dict(name: str, values: dict[str, Any]):
  _, config_cls, _ = _entry(name)
  known = {f.name for f in dataclasses.fields(config_cls)}
  unknown = set(values) - known
  if unknown:
    raise ValueError(f"{name} config has no field(s) {sorted(unknown)}; known: {sorted(known)}")
  return config_cls(**values)


def build(name: str, config) -> Any:
  """Instantiates the Flax module for ``config``."""
  module_cls, config_cls, _ = _entry(name)
  if not isinstance(config, config_cls):
    raise TypeError(f"{name} expects {config_cls.__name__}, got {type(config).__name__}")
  return module_cls(config)
