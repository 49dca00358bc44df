"""Embedding sharding planner: one sharding kind per table under a per-device memory budget.

Kinds (:data:`KINDS`): ``replicated`` (data-parallel: every device holds the whole table),
``table`` (the whole table on one device), ``row`` (rows split evenly over all devices, padded
to a multiple of the device count), ``column`` (the embedding dim split over all devices; only
when ``dim % n == 0``).

Memory per device is parameters plus optimizer state (``optimizer_bytes`` per element, fp32):
``rows*d*(p+opt)`` for replicated (every device) and table (its device only),
``ceil(rows/n)*d*(p+opt)`` for row and ``rows*(d/n)*(p+opt)`` for column.

Cost: bytes moved per training step on each device. B is the global batch, n the devices, L
the lookups per sample, d the dim, p the parameter bytes; outputs, gradients and ids travel as
4-byte values and collective bytes are multiplied by ``collective_weight`` (the interconnect
is slower than memory):

* replicated: ``B/n*L*d*p`` local lookups + all-reduce of the dense table gradient
  ``2(n-1)/n*rows*d*4``.
* row: ``B*L*d*p/n`` + reduce-scatter of the outputs and all-gather of their gradients
  ``2(n-1)/n*B*L*d*4`` + all-gather of the ids ``(n-1)/n*B*L*4``.
* column: ``B*L*(d/n)*p`` + all-to-all of outputs and gradients ``2(n-1)/n*B*L*(d/n)*4`` + the
  ids' all-gather.
* table on device k: k looks up ``B*L*d*p``, receives the other devices' ids, sends their
  outputs and receives their gradients: ``(n-1)/n*B*L*(2d+1)*4``; every other device sends its
  ids and receives its outputs / sends their gradients: ``B/n*L*(2d+1)*4``. The owner is the
  hot spot, so spreading tables over devices balances the busiest device.

Search: pinned tables first, then the others by decreasing total bytes; each takes the option
(kind, and device for ``table``) that keeps every device within the budget and minimises the
busiest device's total cost, then the busiest device's bytes, then the cost summed over
devices, then the kind order replicated < table < column < row, then the lowest device. Then
each unpinned table in turn moves to its best option given the others while that lowers
(busiest cost, busiest bytes, summed cost). This runs once freely and once per allowed kind
with unpinned tables taking that kind whenever it fits (like TorchRec's uniform proposer); the
plan with the lowest (busiest cost, busiest bytes, summed cost) wins. A single greedy pass is
myopic: four equal tables of dim 6 on 4 devices all go row-wise at 1.9x the cost of one
table per device. On one device every kind costs the same and all tables are replicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Mapping, Sequence

KINDS = ("replicated", "table", "row", "column")
_ORDER = {"replicated": 0, "table": 1, "column": 2, "row": 3}
_DTYPES = {2: "bf16", 4: "fp32"}
PLAN_FILE = "sharding_plan.json"
PLAN_TEXT_FILE = "sharding_plan.txt"


class PlanError(ValueError):
  """A table has no allowed sharding that fits the per-device budget."""


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One embedding table as the planner sees it."""
  name: str
  rows: int
  dim: int
  param_bytes: int = 4  # 2 for bf16 tables
  optimizer_bytes: int = 8  # fp32 optimizer state per parameter element (Adam 8, Adagrad 4)
  lookups_per_sample: float = 1.0  # ids looked up per example (max_len, multi-hot width)

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"TableSpec.name must be a non-empty string, got {self.name!r}")
    for field, low in (("rows", 1), ("dim", 1), ("param_bytes", 1), ("optimizer_bytes", 0)):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"table {self.name!r}: {field} must be an integer >= {low}, got {value!r}")
    lookups = self.lookups_per_sample
    if not isinstance(lookups, numbers.Real) or not math.isfinite(lookups) or lookups <= 0:
      raise ValueError(f"table {self.name!r}: lookups_per_sample must be a finite number > 0, "
                       f"got {lookups!r}")

  @property
  def total_bytes(self) -> int:
    return int(self.rows) * int(self.dim) * (int(self.param_bytes) + int(self.optimizer_bytes))


@dataclasses.dataclass(frozen=True)
class TablePlan:
  """The planner's choice for one table; ``cost`` is the maximum of ``device_costs``."""
  name: str
  kind: str
  devices: tuple[int, ...]  # devices holding part of it: all, or one for ``table``
  bytes_per_device: int  # params + optimizer state on each of ``devices``
  cost: float  # estimated per-step cost on its busiest device
  pinned: bool = False
  rows: int = 0
  dim: int = 0
  param_bytes: int = 4
  device_costs: tuple[float, ...] = ()  # this table's cost on every device of the mesh


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sharding of every table over ``num_devices`` devices (``budget_bytes`` 0: unlimited)."""
  num_devices: int
  budget_bytes: int
  batch_size: int
  tables: tuple[TablePlan, ...]
  collective_weight: float = 4.0

  def _table(self, name: str) -> TablePlan:
    for t in self.tables:
      if t.name == name:
        return t
    raise KeyError(f"no table {name!r} in the sharding plan; "
                   f"tables: {[t.name for t in self.tables]}")

  def kind(self, name: str) -> str:
    return self._table(name).kind

  def device(self, name: str) -> int:
    """The device of a table-wise table."""
    t = self._table(name)
    if t.kind != "table":
      raise ValueError(f"table {name!r} is sharded {t.kind}, not table-wise: it has no one device")
    return t.devices[0]

  def device_bytes(self) -> list[int]:
    out = [0] * self.num_devices
    for t in self.tables:
      for k in t.devices:
        out[k] += t.bytes_per_device
    return out

  def device_cost(self) -> list[float]:
    out = [0.0] * self.num_devices
    for t in self.tables:
      for k, c in enumerate(t.device_costs):
        out[k] += c
    return out

  def format_table(self) -> str:
    head = ("table", "kind", "devices", "rows", "dim", "dtype", "bytes/device", "est. cost",
            "pinned")
    rows = [head] + [(t.name, t.kind, _span(t.devices), f"{t.rows:,}", str(t.dim),
                      _DTYPES.get(t.param_bytes, f"{t.param_bytes}B"),
                      _human(t.bytes_per_device), _human(t.cost), "yes" if t.pinned else "no")
                     for t in self.tables]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i in (3, 4, 6, 7) else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    budget = _human(self.budget_bytes) if self.budget_bytes else "unlimited"
    lines.append(f"{self.num_devices} device(s), global batch {self.batch_size}, budget {budget} "
                 f"per device")
    lines.append(f"(bytes: parameters + fp32 optimizer state; cost: bytes moved per step, "
                 f"collectives x{self.collective_weight:g})")
    for k, (b, c) in enumerate(zip(self.device_bytes(), self.device_cost())):
      used = f" ({100 * b / self.budget_bytes:.0f}% of {budget})" if self.budget_bytes else ""
      lines.append(f"device {k}: {_human(b)}{used}, est. cost {_human(c)}")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
    try:
      tables = tuple(TablePlan(**{**t, "devices": tuple(t["devices"]),
                                  "device_costs": tuple(t["device_costs"])}) for t in d["tables"])
      plan = cls(int(d["num_devices"]), int(d["budget_bytes"]), int(d["batch_size"]), tables,
                 float(d.get("collective_weight", 4.0)))
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a sharding plan ({type(e).__name__}: {e})") from e
    for t in plan.tables:
      if t.kind not in KINDS or not all(0 <= k < plan.num_devices for k in t.devices):
        raise ValueError(f"sharding plan: table {t.name!r} has kind {t.kind!r} on devices "
                         f"{t.devices}; expected one of {KINDS} on 0..{plan.num_devices - 1}")
    return plan

  def save(self, directory: str) -> None:
    """Writes ``sharding_plan.json`` and ``sharding_plan.txt`` (each renamed into place)."""
    os.makedirs(directory, exist_ok=True)
    for name, text in ((PLAN_TEXT_FILE, self.format_table()),
                       (PLAN_FILE, json.dumps(self.to_dict(), indent=1))):
      path = os.path.join(directory, name)
      with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text + "\n")
      os.replace(f"{path}.tmp", path)

  @classmethod
  def load(cls, directory: str) -> "Plan":
    path = os.path.join(directory, PLAN_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: no sharding plan was saved in {directory}")
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))


def _span(devices: Sequence[int]) -> str:
  if len(devices) > 1 and list(devices) == list(range(devices[0], devices[-1] + 1)):
    return f"{devices[0]}-{devices[-1]}"
  return ",".join(map(str, devices))


def _human(x: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(x) < 1024:
      return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
    x /= 1024
  return f"{x:.1f} TiB"


def _bytes(spec: TableSpec, kind: str, device: int | None, n: int) -> list[int]:
  """Bytes (params + optimizer state) that ``kind`` puts on each of the n devices."""
  per_row = int(spec.dim) * (int(spec.param_bytes) + int(spec.optimizer_bytes))
  if kind == "table":
    return [int(spec.rows) * per_row if k == device else 0 for k in range(n)]
  per = {"replicated": int(spec.rows) * per_row, "row": -(-int(spec.rows) // n) * per_row,
         "column": int(spec.rows) * per_row // n}[kind]
  return [per] * n


def _costs(spec: TableSpec, kind: str, device: int | None, n: int, batch: int,
           weight: float) -> list[float]:
  """Estimated bytes moved per step on each of the n devices (see the module docstring)."""
  lookups, d, p = batch * spec.lookups_per_sample, spec.dim, spec.param_bytes
  ids = (n - 1) / n * lookups * 4
  if kind == "replicated":
    return [lookups / n * d * p + weight * 2 * (n - 1) / n * spec.rows * d * 4] * n
  if kind == "row":
    return [lookups * d * p / n + weight * (2 * (n - 1) / n * lookups * d * 4 + ids)] * n
  if kind == "column":
    return [lookups * d / n * p + weight * (2 * (n - 1) / n * lookups * d / n * 4 + ids)] * n
  owner = lookups * d * p + weight * (n - 1) / n * lookups * (2 * d + 1) * 4
  other = weight * lookups / n * (2 * d + 1) * 4
  return [owner if k == device else other for k in range(n)]


def _sig(x: float) -> float:
  """Rounds away float noise so equal costs reached by different sums tie."""
  return float(f"{x:.10g}")


def plan_tables(tables: Sequence[TableSpec], num_devices: int, budget_bytes: int = 0,
                batch_size: int = 1, pins: Mapping[str, str] | None = None,
                kinds: Sequence[str] = KINDS, collective_weight: float = 4.0) -> Plan:
  """Chooses each table's sharding (greedy search; see the module docstring).

  Args:
    tables: the embedding tables (unique names).
    num_devices: devices in the mesh.
    budget_bytes: per-device memory for the tables and their optimizer state (0: unlimited).
    batch_size: the global batch.
    pins: table name -> kind fixed by the user (allowed even when not in ``kinds``).
    kinds: the kinds the planner may choose for unpinned tables.
    collective_weight: how much more a collective byte costs than a memory byte.

  Raises:
    PlanError: a table has no allowed sharding within the budget.
    ValueError: bad arguments (unknown pin table or kind, ...).
  """
  n = num_devices
  for field, value, low in (("num_devices", n, 1), ("budget_bytes", budget_bytes, 0),
                            ("batch_size", batch_size, 1)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
      raise ValueError(f"plan_tables: {field} must be an integer >= {low}, got {value!r}")
  if not (collective_weight >= 0 and math.isfinite(collective_weight)):
    raise ValueError(f"plan_tables: collective_weight must be >= 0, got {collective_weight!r}")
  names = [t.name for t in tables]
  if len(set(names)) != len(names):
    raise ValueError(f"plan_tables: duplicate table names in {names}")
  if not kinds or any(k not in KINDS for k in kinds):
    raise ValueError(f"plan_tables: kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
  pins = dict(pins or {})
  for name, kind in pins.items():
    if name not in names:
      raise ValueError(f"sharding pin for unknown table {name!r}; tables: {names}")
    if kind not in KINDS:
      raise ValueError(f"sharding pin {name}={kind!r} is not a kind; kinds: {list(KINDS)}")
    dim = tables[names.index(name)].dim
    if kind == "column" and dim % n:
      raise PlanError(f"table {name!r} is pinned column-wise but its dim {dim} is not "
                      f"divisible by {n} devices")
  order = sorted(tables, key=lambda t: (t.name not in pins, -t.total_bytes, t.name))
  plans, error = [], None
  for prefer in (None,) + tuple(kinds):
    try:
      chosen = _search(order, n, budget_bytes, batch_size, pins, tuple(kinds), collective_weight,
                       prefer)
    except PlanError as e:
      error = error or e
      continue
    plan = Plan(n, int(budget_bytes), int(batch_size), tuple(chosen[name] for name in names),
                float(collective_weight))
    cost = plan.device_cost()
    plans.append(((_sig(max(cost)), max(plan.device_bytes()), _sig(sum(cost))), plan))
  if not plans:
    raise error
  return min(plans, key=lambda key_plan: key_plan[0])[1]


def _option(spec: TableSpec, kind: str, device: int | None, n: int, batch: int,
            weight: float) -> TablePlan:
  c = _costs(spec, kind, device, n, batch, weight)
  return TablePlan(spec.name, kind, (device,) if kind == "table" else tuple(range(n)),
                   max(_bytes(spec, kind, device, n)), max(c), False, int(spec.rows),
                   int(spec.dim), int(spec.param_bytes), tuple(c))


def _add(used_bytes: list[int], used_cost: list[float], t: TablePlan, sign: int = 1) -> None:
  for k in t.devices:
    used_bytes[k] += sign * t.bytes_per_device
  for k, c in enumerate(t.device_costs):
    used_cost[k] += sign * c


def _best(spec, allowed, used_bytes, used_cost, n, budget, batch, weight, prefer=None):
  """(key, TablePlan) of the best option on top of the devices' loads; None if none fits."""
  best = None
  for kind in allowed:
    if kind == "column" and spec.dim % n:
      continue
    for device in range(n) if kind == "table" else (None,):
      t = _option(spec, kind, device, n, batch, weight)
      b = [u + (t.bytes_per_device if k in t.devices else 0) for k, u in enumerate(used_bytes)]
      if budget and max(b) > budget:
        continue
      c = [u + x for u, x in zip(used_cost, t.device_costs)]
      key = (kind != prefer, _sig(max(c)), max(b), _sig(sum(c)), _ORDER[kind], device or 0)
      if best is None or key < best[0]:
        best = (key, t)
  return best


def _search(order, n, budget, batch, pins, kinds, weight, prefer) -> dict[str, TablePlan]:
  """Greedy placement (``prefer``: a kind unpinned tables take when it fits), then local moves."""
  used_bytes, used_cost, chosen = [0] * n, [0.0] * n, {}
  for spec in order:
    allowed = (pins[spec.name],) if spec.name in pins else kinds
    best = _best(spec, allowed, used_bytes, used_cost, n, budget, batch, weight, prefer)
    if best is None:
      raise _no_fit(spec, allowed, n, budget, used_bytes)
    chosen[spec.name] = dataclasses.replace(best[1], pinned=spec.name in pins)
    _add(used_bytes, used_cost, chosen[spec.name])
  for _ in range(20):  # every move lowers the key: this ends
    moved = False
    for spec in (t for t in order if t.name not in pins):
      now = (_sig(max(used_cost)), max(used_bytes), _sig(sum(used_cost)))
      _add(used_bytes, used_cost, chosen[spec.name], -1)
      key, t = _best(spec, kinds, used_bytes, used_cost, n, budget, batch, weight)
      if key[1:4] < now:
        chosen[spec.name], moved = t, True
      _add(used_bytes, used_cost, chosen[spec.name])
    if not moved:
      break
  return chosen


def _no_fit(spec: TableSpec, allowed: Sequence[str], n: int, budget: int,
            used: Sequence[int]) -> PlanError:
  sizes = ", ".join(
      f"{k}={_human(max(_bytes(spec, k, 0, n)))}" + ("" if k in allowed else " (not allowed)")
      for k in KINDS if not (k == "column" and spec.dim % n))
  column = (f"; column-wise is impossible: dim {spec.dim} is not divisible by {n} devices"
            if spec.dim % n and "column" in allowed else "")
  free = ", ".join(_human(budget - u) for u in used) if budget else "unlimited"
  return PlanError(f"table {spec.name!r} ({spec.rows:,} x {spec.dim}) fits no allowed sharding "
                   f"({', '.join(allowed)}) within the budget of "
                   f"{_human(budget) if budget else 'unlimited'} per device: "
                   f"bytes per device under {sizes}{column}; free bytes per device: [{free}]")
