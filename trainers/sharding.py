"""Where arrays live: the mesh, each embedding table's sharding, and lookups that respect it.

One mesh axis, ``data``, spans every device (of every process). The batch is split over
it; dense parameters are replicated (data parallel). Each embedding table -- a
parameter whose logical axes are (``vocab``, ``embed``): SASRec/HSTU's item table, each
DLRM feature table -- gets one of the :data:`KINDS`:

* ``replicated`` -- every device holds the whole table (data parallel);
* ``row``        -- the rows are split evenly over the devices (row-wise); tables are
  padded to a multiple of :data:`trainers.layers.ROW_ALIGNMENT` rows, so the same
  shapes shard over 1, 2, 4, 8, ... 64 devices and a checkpoint moves between them;
* ``column``     -- the embedding width is split over the devices (column-wise; needs
  ``dim % devices == 0``);
* ``table``      -- the whole table on one device (table-wise). SPMD arrays span every
  device, so the tables of one width that are placed table-wise are packed into one
  row-sharded array, ``[devices * R, dim]``, each inside its device's block of ``R``
  rows (:class:`Layout`). The train state holds that packed form; checkpoints, the
  best params, evaluation and export see the model's own per-table tree.
  Table-row-wise (rows split over a subset of the devices) is not a kind of its own: a
  table too big for one device is row-wise over all of them.

The plan (which table gets which kind) comes from :mod:`trainers.planner` or the
config. Optimizer slots follow their parameter's sharding.

Lookups (:func:`lookup`) of a sharded table never gather the table. ``row``: every
device gathers the global batch's ids (small) and looks up the ones in its rows (the
others read as zeros), and a reduce-scatter sums the partial rows and hands each
device its own slice of the batch; the backward pass is an all-gather of the output
gradients and a local scatter-add. ``column``: every device looks up its columns for
the global batch and an all-to-all returns full rows for its slice of the batch. The
models call the lookup through :class:`trainers.layers.ItemEmbedding`; the plan is
visible to it while the trainer traces its steps (:func:`use_plan`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Logical axis names of parameters (models import them via layers): (vocab, embed) marks
# an embedding table; the others document the parameters (every non-table parameter is
# replicated: dense layers are data parallel).
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
POSITION = "position"
BUCKETS = "buckets"

KINDS = ("replicated", "table", "row", "column")
PACKED = "table_wise"  # params key of the packed table-wise arrays (one per width)
TABLE_AXES = (VOCAB, EMBED)

def make_mesh(num_devices: int = 0,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: every device of every
  process), or the first ``num_devices`` of them."""
  devices = list(devices or jax.devices())
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist "
                       f"({devices[0].platform})")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError(f"num_devices={num_devices}: a multi-process run uses every device "
                       f"({len(devices)})")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
  """An embedding table of a variables tree: its name is its path without the
  trailing ``embedding`` (``item_embedding``, ``embeddings/sparse_3``)."""

  name: str
  path: tuple[str, ...]
  rows: int
  dim: int
  dtype: str


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def find_tables(boxed_params: Any) -> list[Table]:
  """The embedding tables of a boxed ``params`` tree (abstract or real): the parameters
  whose logical axes are (``vocab``, ``embed``)."""
  out = []
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    if isinstance(leaf, nn.Partitioned) and tuple(leaf.names) == TABLE_AXES:
      names = _key_names(path)
      name = "/".join(names[:-1] if names[-1] == "embedding" else names)
      rows, dim = leaf.value.shape
      out.append(Table(name, names, int(rows), int(dim), str(leaf.value.dtype)))
  return out


def table_spec(kind: str) -> P:
  if kind not in KINDS:
    raise ValueError(f"unknown table sharding {kind!r}; choose one of {KINDS}")
  # a table-wise table's own (canonical) array, when it is not packed: row-wise
  return {"replicated": P(), "row": P(DATA_AXIS, None), "column": P(None, DATA_AXIS),
          "table": P(DATA_AXIS, None)}[kind]


def check_kind(table: Table, kind: str, num_devices: int) -> None:
  """Raises if ``table`` cannot be sharded ``kind`` over ``num_devices`` devices."""
  table_spec(kind)
  if kind in ("row", "table") and table.rows % num_devices:
    raise ValueError(f"table {table.name} has {table.rows} rows, not a multiple of the "
                     f"{num_devices} devices: row-wise sharding needs a device count that "
                     f"divides the row alignment (trainers.layers.ROW_ALIGNMENT)")
  if kind == "column" and table.dim % num_devices:
    raise ValueError(f"table {table.name} is {table.dim} wide, not a multiple of the "
                     f"{num_devices} devices: column-wise sharding needs dim % devices == 0")


def state_shardings(mesh, state: Any, kinds: Mapping[str, str],
                    tables: Sequence[Table]) -> Any:
  """NamedShardings for an (abstract) train ``state`` tree: each table per its kind in
  ``kinds`` (missing: replicated), packed table-wise arrays row-wise, every other array
  replicated. Optimizer slots -- any leaf whose key path ends with a table's path and
  has its shape -- follow their table."""
  by_path = {t.path: (t, kinds.get(t.name, "replicated")) for t in tables}

  def leaf_sharding(path, leaf):
    names = _key_names(path)
    if PACKED in names:  # a packed table-wise array (or its optimizer slot)
      return NamedSharding(mesh, P(DATA_AXIS, None))
    for table_path, (table, kind) in by_path.items():
      if (names[-len(table_path):] == table_path
          and tuple(getattr(leaf, "shape", ())) == (table.rows, table.dim)):
        return NamedSharding(mesh, table_spec(kind))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, state)


# ---------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  mesh: jax.sharding.Mesh
  kinds: Mapping[str, str]
  packed: Mapping[str, tuple[jax.Array, int]] = dataclasses.field(default_factory=dict)


_ACTIVE = threading.local()


@contextlib.contextmanager
def use_plan(mesh, kinds: Mapping[str, str],
             packed: Mapping[str, tuple[jax.Array, int]] | None = None) -> Iterator[None]:
  """Lookups traced inside this block use the tables' shardings (``kinds``: table
  name -> kind). Outside it (evaluation in another process, export, serving) a lookup
  is a plain gather.

  ``packed``: table name -> (its packed table-wise array, the row where it starts);
  lookups of those tables read the packed array (see :meth:`Layout.packed_rows`).
  """
  previous = getattr(_ACTIVE, "plan", None)
  _ACTIVE.plan = _Plan(mesh, dict(kinds), dict(packed or {}))
  try:
    yield
  finally:
    _ACTIVE.plan = previous


def planned_loss(loss, mesh, kinds: Mapping[str, str], layout: "Layout"):
  """``loss(model, params, ...)`` taking the train state's (packed) params: the model
  gets its own tree (:meth:`Layout.unpack`) and its lookups read the packed arrays, so
  gradients reach the packed form the optimizer updates."""

  def wrapped(model, params, *args):
    with use_plan(mesh, kinds, layout.packed_rows(params) if layout else None):
      return loss(model, layout.unpack(params), *args)

  return wrapped


def lookup(table: jax.Array, ids: jax.Array, name: str) -> jax.Array:
  """``table[ids]`` (``[*ids.shape, dim]``) for the table called ``name``, without
  gathering a sharded table (see the module docstring). Ids outside the table's rows
  read as zeros under ``row`` sharding and are clipped otherwise (JAX's gather)."""
  plan = getattr(_ACTIVE, "plan", None)
  kind = plan.kinds.get(name, "replicated") if plan is not None else "replicated"
  n = plan.mesh.devices.size if plan is not None else 1
  if kind == "table" and name in plan.packed:  # its rows inside the packed array
    table, start = plan.packed[name]
    ids, kind = ids + start, "row"
  if kind == "replicated" or n == 1:
    return jnp.take(table, ids, axis=0)
  split = ids.ndim > 0 and ids.shape[0] % n == 0   # batch split over devices, or not
  ids_spec = P(DATA_AXIS) if split else P()
  fn = _column_lookup(split) if kind == "column" else _row_lookup(split)
  return jax.shard_map(fn, mesh=plan.mesh, in_specs=(table_spec(kind), ids_spec),
                       out_specs=ids_spec)(table, ids)


def _row_lookup(split: bool):
  def local(shard, ids):
    if split:
      ids = jax.lax.all_gather(ids, DATA_AXIS, tiled=True)          # the global batch's ids
    rows = shard.shape[0]
    local_ids = ids - jax.lax.axis_index(DATA_AXIS) * rows
    mine = (local_ids >= 0) & (local_ids < rows)
    emb = jnp.take(shard, jnp.where(mine, local_ids, 0), axis=0)
    emb = emb * mine[..., None].astype(emb.dtype)
    if split:  # sum the partial rows; each device keeps its slice of the batch
      return jax.lax.psum_scatter(emb, DATA_AXIS, scatter_dimension=0, tiled=True)
    return jax.lax.psum(emb, DATA_AXIS)
  return local


def _column_lookup(split: bool):
  def local(shard, ids):
    if split:
      ids = jax.lax.all_gather(ids, DATA_AXIS, tiled=True)
    emb = jnp.take(shard, ids, axis=0)                               # [B, ..., dim / n]
    if split:  # rows of the batch out, columns in
      return jax.lax.all_to_all(emb, DATA_AXIS, 0, emb.ndim - 1, tiled=True)
    return jax.lax.all_gather(emb, DATA_AXIS, axis=emb.ndim - 1, tiled=True)
  return local


# ---------------------------------------------------------------------------
# Table-wise packing
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Packed:
  """Table-wise tables of one width packed into one row-sharded array of
  ``devices * rows_per_device`` rows; ``members``: (table, device, first row in the
  device's block)."""

  dim: int
  rows_per_device: int
  members: tuple[tuple[Table, int, int], ...]

  @property
  def key(self) -> str:
    return f"dim_{self.dim}"


class Layout:
  """The train state's form of the params: the model's tree with the table-wise tables
  moved into :class:`Packed` arrays under ``params[PACKED]``, and back.

  :meth:`pack` and :meth:`unpack` map any tree that holds params-shaped dicts (the
  params, the optimizer's slots) between the two forms; with no table-wise tables both
  are the identity.
  """

  def __init__(self, tables: Sequence[Table], kinds: Mapping[str, str],
               devices: Mapping[str, int], num_devices: int):
    self.num_devices = num_devices
    by_dim: dict[int, list[tuple[Table, int]]] = {}
    for t in tables:
      if kinds.get(t.name) == "table":
        by_dim.setdefault(t.dim, []).append((t, int(devices[t.name])))
    self.groups: list[Packed] = []
    for dim, members in sorted(by_dim.items()):
      used = [0] * num_devices
      placed = []
      for t, d in members:
        placed.append((t, d, used[d]))
        used[d] += t.rows
      # blocks of a multiple of 8 rows (aligned shards)
      self.groups.append(Packed(dim, -(-max(used) // 8) * 8, tuple(placed)))
    self._paths = {t.path for g in self.groups for t, _, _ in g.members}

  def __bool__(self) -> bool:
    return bool(self.groups)

  def start(self, group: Packed, device: int, offset: int) -> int:
    return device * group.rows_per_device + offset

  def packed_rows(self, params: Mapping[str, Any]) -> dict[str, tuple[jax.Array, int]]:
    """Table name -> (packed array, first row): what :func:`use_plan` takes."""
    out = {}
    for g in self.groups:
      for t, d, off in g.members:
        out[t.name] = (params[PACKED][g.key], self.start(g, d, off))
    return out

  def _is_params(self, node: Any) -> bool:
    if not isinstance(node, Mapping) or not self._paths:
      return False
    path = next(iter(self._paths))
    for key in path[:-1]:
      node = node.get(key) if isinstance(node, Mapping) else None
    return isinstance(node, Mapping) and path[-1] in node

  def _walk(self, tree: Any, fn) -> Any:
    if self._is_params(tree) or (isinstance(tree, Mapping) and PACKED in tree):
      return fn(tree)
    if isinstance(tree, Mapping):
      return {k: self._walk(v, fn) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple (optax states)
      return type(tree)(*(self._walk(v, fn) for v in tree))
    if isinstance(tree, (tuple, list)):
      return type(tree)(self._walk(v, fn) for v in tree)
    return tree

  def pack(self, tree: Any) -> Any:
    """Model form -> packed form (every params-shaped dict of ``tree``)."""
    if not self:
      return tree

    def pack_params(params):
      params = _copy_dicts(params)
      packed = {}
      for g in self.groups:
        first = _get(params, g.members[0][0].path)
        rows = self.num_devices * g.rows_per_device
        arr = jnp.zeros((rows, g.dim), first.dtype)
        for t, d, off in g.members:
          start = self.start(g, d, off)
          arr = jax.lax.dynamic_update_slice(arr, _pop(params, t.path), (start, 0))
        packed[g.key] = arr
      params[PACKED] = packed
      return params

    return self._walk(tree, pack_params)

  def unpack(self, tree: Any) -> Any:
    """Packed form -> model form."""
    if not self:
      return tree

    def unpack_params(params):
      params = _copy_dicts(params)
      packed = params.pop(PACKED)
      for g in self.groups:
        for t, d, off in g.members:
          start = self.start(g, d, off)
          _set(params, t.path, jax.lax.slice_in_dim(packed[g.key], start, start + t.rows))
      return params

    return self._walk(tree, unpack_params)


def _copy_dicts(tree):
  return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _pop(tree, path):
  parent = _get(tree, path[:-1])
  value = parent.pop(path[-1])
  for i in range(len(path) - 1, 0, -1):  # drop dicts left empty
    if not _get(tree, path[:i]):
      _get(tree, path[:i - 1]).pop(path[i - 1])
  return value


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------
# Batches across processes
# ---------------------------------------------------------------------------


def process_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global batch: process ``p`` of ``P`` keeps rows
  ``[p B/P, (p+1) B/P)``, the rows its devices hold under :func:`batch_sharding`."""
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return dict(batch)
  out = {}
  for key, value in batch.items():
    rows = value.shape[0]
    if rows % count:
      raise ValueError(f"batch[{key!r}] has {rows} rows, not a multiple of the {count} "
                       "processes")
    per = rows // count
    out[key] = value[index * per:(index + 1) * per]
  return out


def global_batch(mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """A global batch, split over the data axis, from every process's full copy of it
  (each process contributes the rows its devices hold)."""
  sharding = batch_sharding(mesh)
  local = process_rows(batch)
  return {k: jax.make_array_from_process_local_data(sharding, local[k], batch[k].shape)
          for k in batch}
