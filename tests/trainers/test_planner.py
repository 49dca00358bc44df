"""The sharding planner against hand computations and a brute-force search."""

import itertools
import json
import math

import numpy as np
import pytest

from trainers.planner import KINDS, Plan, PlanError, TableSpec, plan_tables

MIB = 1 << 20


def ref_bytes(t, kind, dev, n):
  """Bytes per device, written out from the definitions."""
  elem = t.param_bytes + t.optimizer_bytes
  if kind == "replicated":
    return [t.rows * t.dim * elem] * n
  if kind == "table":
    return [t.rows * t.dim * elem * (k == dev) for k in range(n)]
  if kind == "row":
    return [math.ceil(t.rows / n) * t.dim * elem] * n
  return [t.rows * (t.dim // n) * elem] * n


def ref_cost(t, kind, dev, n, batch, w=4.0):
  """Per-device bytes moved per step (memory + w * collectives), from the docstring's formulas."""
  lk, d, p = batch * t.lookups_per_sample, t.dim, t.param_bytes
  frac = (n - 1) / n
  if kind == "replicated":
    return [lk / n * d * p + w * 2 * frac * t.rows * d * 4] * n
  if kind == "row":
    return [lk * d * p / n + w * (2 * frac * lk * d * 4 + frac * lk * 4)] * n
  if kind == "column":
    return [lk * (d / n) * p + w * (2 * frac * lk * (d / n) * 4 + frac * lk * 4)] * n
  return [lk * d * p + w * frac * lk * (2 * d + 1) * 4 if k == dev
          else w * lk / n * (2 * d + 1) * 4 for k in range(n)]


def options(t, n, kinds=KINDS):
  for kind in kinds:
    if kind == "column" and t.dim % n:
      continue
    for dev in (range(n) if kind == "table" else [None]):
      yield kind, dev


def brute_force(tables, n, budget, batch, kinds=KINDS):
  """Smallest busiest-device cost over every assignment that fits the budget (None: none fits)."""
  best = None
  for combo in itertools.product(*[list(options(t, n, kinds)) for t in tables]):
    b = np.sum([ref_bytes(t, k, dv, n) for t, (k, dv) in zip(tables, combo)], axis=0)
    if budget and b.max() > budget:
      continue
    c = np.sum([ref_cost(t, k, dv, n, batch) for t, (k, dv) in zip(tables, combo)], axis=0)
    best = c.max() if best is None else min(best, c.max())
  return best


def test_bytes_per_device_equal_hand_computation():
  # 1001 rows x 8 dims, fp32 params + Adam (8 bytes): 12 bytes per element.
  t = TableSpec("t", rows=1001, dim=8)
  n = 4
  by_kind = {}
  for kind in KINDS:
    plan = plan_tables([t], n, pins={"t": kind})
    by_kind[kind] = plan.device_bytes()
    assert plan.tables[0].bytes_per_device == max(by_kind[kind])
  assert by_kind["replicated"] == [1001 * 8 * 12] * 4 == [96096] * 4
  assert by_kind["row"] == [251 * 8 * 12] * 4  # ceil(1001 / 4) = 251 rows each, padded
  assert by_kind["column"] == [1001 * 2 * 12] * 4
  assert sorted(by_kind["table"]) == [0, 0, 0, 96096]
  bf16 = plan_tables([TableSpec("t", 1001, 8, param_bytes=2, optimizer_bytes=4)], 4,
                     pins={"t": "row"})
  assert bf16.device_bytes() == [251 * 8 * 6] * 4
  assert bf16.tables[0].devices == (0, 1, 2, 3)


def test_costs_equal_formulas():
  t = TableSpec("t", rows=300, dim=12, param_bytes=2, lookups_per_sample=5)
  for kind in KINDS:
    plan = plan_tables([t], 4, batch_size=64, pins={"t": kind})
    dev = plan.device("t") if kind == "table" else None
    np.testing.assert_allclose(plan.device_cost(), ref_cost(t, kind, dev, 4, 64), rtol=1e-12)
    assert plan.tables[0].cost == pytest.approx(max(ref_cost(t, kind, dev, 4, 64)))
    if kind != "table":
      with pytest.raises(ValueError, match=f"'t' is sharded {kind}, not table-wise"):
        plan.device("t")


def test_budget_forces_row_wise_for_a_table_larger_than_one_device():
  big = TableSpec("items", rows=100_000, dim=30, lookups_per_sample=20)  # 36 MB; dim % 4 != 0
  small = [TableSpec(f"f{i}", rows=50 + 10 * i, dim=8) for i in range(3)]
  budget = 12_000_000
  assert big.total_bytes > budget
  plan = plan_tables([big] + small, 4, budget_bytes=budget, batch_size=256)
  assert plan.kind("items") == "row"
  assert plan.tables[0].bytes_per_device == 25_000 * 30 * 12
  assert max(plan.device_bytes()) <= budget
  assert {plan.kind(t.name) for t in small} <= {"replicated", "table"}
  # With dim % n == 0 column-wise fits too and moves fewer bytes, unless the user excludes it.
  div = TableSpec("items", rows=100_000, dim=32, lookups_per_sample=20)
  assert plan_tables([div], 4, budget_bytes=budget, batch_size=256).kind("items") == "column"
  assert plan_tables([div], 4, budget_bytes=budget, batch_size=256,
                     kinds=("replicated", "table", "row")).kind("items") == "row"


def test_unlimited_budget_small_tables_replicated_or_table_wise():
  tables = [TableSpec(f"f{i}", rows=20 + i, dim=8, lookups_per_sample=2) for i in range(6)]
  plan = plan_tables(tables, 4, batch_size=512)
  assert {t.kind for t in plan.tables} <= {"replicated", "table"}
  one = plan_tables(tables + [TableSpec("big", 10_000, 16)], 1, batch_size=512)
  assert {t.kind for t in one.tables} == {"replicated"}
  assert one.device_bytes() == [sum(t.total_bytes for t in tables) + 10_000 * 16 * 12]


def test_pins_are_honoured_and_bad_pins_name_the_choices():
  tables = [TableSpec("a", 1000, 8), TableSpec("b", 10, 8), TableSpec("c", 500, 6)]
  plan = plan_tables(tables, 2, pins={"b": "row", "a": "table"}, kinds=("replicated",))
  assert [(t.name, t.kind, t.pinned) for t in plan.tables] == [
      ("a", "table", True), ("b", "row", True), ("c", "replicated", False)]
  with pytest.raises(ValueError, match=r"unknown table 'z'.*\['a', 'b', 'c'\]"):
    plan_tables(tables, 2, pins={"z": "row"})
  with pytest.raises(ValueError, match=r"'diagonal'.*'replicated', 'table', 'row', 'column'"):
    plan_tables(tables, 2, pins={"a": "diagonal"})
  with pytest.raises(PlanError, match=r"'c' is pinned column-wise.*dim 6.*4 devices"):
    plan_tables(tables, 4, pins={"c": "column"})
  with pytest.raises(PlanError, match="'a'"):  # a pinned choice over budget
    plan_tables(tables, 2, budget_bytes=70_000, pins={"a": "replicated"})  # 96,000 bytes
  assert plan_tables(tables, 2, budget_bytes=70_000).kind("a") in ("row", "column")


def test_infeasible_budget_names_the_table_and_sizes():
  tables = [TableSpec("small", 100, 8), TableSpec("huge", 10_000, 8)]
  with pytest.raises(PlanError) as err:
    plan_tables(tables, 2, budget_bytes=400_000)
  msg = str(err.value)
  assert "'huge'" in msg and "replicated=937.5 KiB" in msg and "row=468.8 KiB" in msg
  assert "column=468.8 KiB" in msg and "free bytes per device: [" in msg
  with pytest.raises(ValueError, match="table 'x': rows"):
    TableSpec("x", 0, 8)
  with pytest.raises(ValueError, match="table 'x': lookups_per_sample"):
    TableSpec("x", 5, 8, lookups_per_sample=0)
  with pytest.raises(ValueError, match="duplicate"):
    plan_tables([TableSpec("x", 5, 8)] * 2, 2)
  with pytest.raises(ValueError, match="num_devices"):
    plan_tables(tables, 0)


def random_tables(rng, count):
  return [TableSpec(f"t{i}", rows=int(rng.integers(10, 3000)), dim=int(rng.choice([4, 6, 8, 16])),
                    param_bytes=int(rng.choice([2, 4])),
                    lookups_per_sample=float(rng.choice([1, 3, 20]))) for i in range(count)]


def test_search_close_to_brute_force():
  rng = np.random.default_rng(0)
  ratios = []
  for case in range(24):
    n = [2, 3, 4][case % 3]
    tables = random_tables(rng, 4)
    batch = int(rng.choice([16, 256]))
    budget = int(sum(t.total_bytes for t in tables) / n * 1.6) if case % 2 else 0
    opt = brute_force(tables, n, budget, batch)
    plan = plan_tables(tables, n, budget_bytes=budget, batch_size=batch)
    assert max(plan.device_bytes()) <= (budget or math.inf)
    ratios.append(max(plan.device_cost()) / opt)
  # Over 360 such cases (seeds 0-5) the worst was 1.48 and 98% were optimal.
  assert min(ratios) >= 1 - 1e-9 and max(ratios) <= 1.5, ratios
  assert np.mean(np.array(ratios) <= 1 + 1e-9) >= 0.9, ratios


def test_search_equals_brute_force_on_equal_tables():
  # Four equal tables of dim 6 (no column split) on 4 devices: one table per device costs
  # 336 bytes per lookup on every device; all row-wise (where a single greedy pass ends: row is
  # the cheapest first move) costs 648.
  tables = [TableSpec(f"t{i}", rows=5000, dim=6) for i in range(4)]
  plan = plan_tables(tables, 4, batch_size=64)
  assert sorted(plan.device(t.name) for t in plan.tables) == [0, 1, 2, 3]
  np.testing.assert_allclose(plan.device_cost(), [336 * 64] * 4)
  assert max(plan.device_cost()) == pytest.approx(brute_force(tables, 4, 0, 64), rel=1e-12)
  rows = [max(ref_cost(t, "row", None, 4, 64)) for t in tables]
  assert sum(rows) == pytest.approx(648 * 64)


def test_save_load_round_trip_and_format(tmp_path):
  tables = [TableSpec("items", 100_000, 30, lookups_per_sample=20),
            TableSpec("genre", 20, 8, param_bytes=2, optimizer_bytes=4), TableSpec("year", 90, 8)]
  plan = plan_tables(tables, 4, budget_bytes=12_000_000, batch_size=256, pins={"year": "table"})
  plan.save(str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["sharding_plan.json", "sharding_plan.txt"]
  assert Plan.load(str(tmp_path)) == plan
  assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
  text = (tmp_path / "sharding_plan.txt").read_text()
  assert text == plan.format_table() + "\n"
  lines = text.splitlines()
  assert lines[0].split() == ["table", "kind", "devices", "rows", "dim", "dtype", "bytes/device",
                              "est.", "cost", "pinned"]
  assert lines[1].split()[:6] == ["items", "row", "0-3", "100,000", "30", "fp32"]
  assert "8.6 MiB" in lines[1]  # 25,000 rows x 30 x 12 bytes
  genre = lines[2].split()
  assert genre[:2] == ["genre", plan.kind("genre")] and genre[3:6] == ["20", "8", "bf16"]
  assert lines[3].split()[1:3] == ["table", str(plan.device("year"))] and lines[3].endswith("yes")
  assert lines[1].index("row") == lines[0].index("kind")  # aligned columns
  assert "budget 11.4 MiB per device" in lines[4]
  expected = np.zeros(4)
  for t in tables:
    tp = plan.tables[[x.name for x in plan.tables].index(t.name)]
    expected += ref_bytes(t, tp.kind, tp.devices[0], 4)
  assert plan.device_bytes() == expected.tolist()
  assert len(lines) == 6 + 4
  for k, b in enumerate(expected):
    assert lines[6 + k].startswith(f"device {k}: {b / 2**20:.1f} MiB ({100 * b / 12e6:.0f}% of ")
  with pytest.raises(FileNotFoundError, match="no sharding plan"):
    Plan.load(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="not a sharding plan"):
    Plan.from_dict({"num_devices": 2})
