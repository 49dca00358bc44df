"""Sharding as data: a mesh and a table mapping logical axis names to mesh axes.

Models name their parameter axes (``vocab``, ``embed``, ...; see
:mod:`trainers.layers`); this table decides where each goes. Data parallelism
over every device is the default: the batch is split over ``data`` and
parameters are replicated. Sharding the item table row-wise is one rule
(``("vocab", "data")``), not a model change.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from trainers import layers

DATA_AXIS = "data"
BATCH = "batch"

# logical axis -> mesh axis (None: replicated)
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    (BATCH, DATA_AXIS),
    (layers.VOCAB, None),
    (layers.EMBED, None),
    (layers.MLP, None),
    (layers.HEADS, None),
    (layers.POSITION, None),
    (layers.BUCKETS, None),
)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices`` (default: all) named ``data``."""
  devices = list(devices or jax.devices())
  return jax.sharding.Mesh(devices, (DATA_AXIS,))


def param_shardings(mesh, boxed_variables: Any, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a variables tree that still carries logical metadata."""
  specs = nn.get_partition_spec(boxed_variables)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  axis = dict(rules).get(BATCH)
  return NamedSharding(mesh, P(axis))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
