"""The metrics store: one table of evaluation metrics, in BigQuery or an embedded DuckDB file.

A store is addressed by URI and opened with :func:`open_store`:

* ``bq://project.dataset.table``: a BigQuery table (``google-cloud-bigquery``). The
  dataset must exist (it carries a location; ``infra/gcp`` creates it); the table
  is created from :data:`METRICS_SCHEMA` when missing.
* ``duckdb:///relative/path/metrics.duckdb`` or ``duckdb:////absolute/path/metrics.duckdb``
  (the SQLAlchemy convention: the path is what follows ``duckdb:///``; relative
  paths are resolved against the working directory when the store is opened). The
  file and its folder are created when missing.

Both hold the same table (:data:`METRICS_SCHEMA`): one row per
``(run_id, split, metric, k)`` (:data:`KEY_COLUMNS`), the key of idempotent writes.
Writing a row whose key exists replaces it (``MERGE`` in both engines), so a retried
pipeline step never duplicates metrics. ``k`` is NULL for metrics without a cut-off (MRR).

**The key, enforced.** DuckDB: a unique index on ``(run_id, split, metric,
COALESCE(k, -1))`` (a PRIMARY KEY cannot hold the NULL ``k`` of MRR, and a plain
UNIQUE constraint treats NULLs as distinct; ``k`` is never negative, so -1 cannot
collide). A write that would duplicate a key fails instead of duplicating. Writers take
an exclusive ``fcntl.flock`` on ``<file>.lock`` around every connection (DuckDB allows
one read-write process per file, and two threads merging at once would both insert),
so threads and processes writing the same run take turns and the last write of a key
wins whole. BigQuery has no enforced unique key: the ``MERGE`` statement is the key
(its ``ON`` clause is :data:`KEY_COLUMNS`; BigQuery runs concurrent mutating DML on
one table under snapshot isolation and fails the loser with "Could not serialize
access", which :class:`BigQueryStore` retries).

**Dataset identity.** ``dataset`` is a display label (the config's ``dataset:``);
``dataset_id`` is what the data *is*: ``ds-<12 hex>`` from the input's fingerprint and
the preprocessing parameters (:func:`components.fingerprint.dataset_identity`). Champions
are looked up by ``dataset_id``, so models trained on different data are never
compared. Tables written before the column existed get it added (NULL in old rows, which
therefore never become champions).

Every query is written once below, with ``@name`` parameters and a ``{table}``
placeholder; the two dialect differences (how the table is named, and how the
rows to merge are passed) live in the two small store classes.

**Blessing and champions.** The validate step records its decision in the same
table as a row with ``metric = "blessed"`` (:data:`BLESSED_METRIC`), ``k`` NULL,
``value`` 1.0 (blessed), 0.5 (tie: as good as the champion, not redeployed) or 0.0
(rejected) (:data:`DECISION_VALUES`), on the split it gated on, with the decision's
details in ``labels["gate"]``. Being a row, the decision is idempotent per run
(re-validating replaces it), shows in ``rows()`` and in ``runs()``, and needs no second
table. The *champion* of a (dataset identity, model family, metric, k, split) is the
blessed run with the best value of that metric (ties: the newest); a candidate is gated
against it. "Best" rather than "latest" blessed, so that a tolerance cannot let
quality ratchet down over many runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import random
import re
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------
# Schema: (name, BigQuery type, mode). infra generates the BigQuery table from it.
# ---------------------------------------------------------------------------
METRICS_SCHEMA: tuple[tuple[str, str, str], ...] = (
    ("run_id", "STRING", "REQUIRED"),
    ("pipeline", "STRING", "NULLABLE"),
    ("model", "STRING", "REQUIRED"),
    ("dataset", "STRING", "REQUIRED"),
    ("split", "STRING", "REQUIRED"),
    ("metric", "STRING", "REQUIRED"),
    ("k", "INT64", "NULLABLE"),
    ("value", "FLOAT64", "REQUIRED"),
    ("created_at", "TIMESTAMP", "REQUIRED"),
    ("model_uri", "STRING", "NULLABLE"),
    ("labels", "STRING", "NULLABLE"),   # a JSON object, as text
    # The data's identity (components.fingerprint); NULLABLE so that existing tables can
    # be migrated by adding it (BigQuery only adds NULLABLE columns).
    ("dataset_id", "STRING", "NULLABLE"),
)
COLUMNS = tuple(name for name, _, _ in METRICS_SCHEMA)
KEY_COLUMNS = ("run_id", "split", "metric", "k")
CLUSTERING_FIELDS = ("dataset", "model", "run_id")   # BigQuery clustering

BLESSED_METRIC = "blessed"   # the validate step's decision, as a value of DECISION_VALUES
# Gate decisions and their value in the ``blessed`` row. Only "blessed" runs are deployed
# and can become champions; a "tie" equals the champion and is not redeployed.
DECISION_VALUES = {"blessed": 1.0, "tie": 0.5, "rejected": 0.0}

URI_FORMS = ("bq://project.dataset.table",
             "duckdb:///relative/path/metrics.duckdb (or duckdb:////absolute/path/metrics.duckdb)")

# BigQuery type -> DuckDB type. The only type difference between the two tables.
_DUCKDB_TYPES = {"STRING": "VARCHAR", "INT64": "BIGINT", "FLOAT64": "DOUBLE",
                 "TIMESTAMP": "TIMESTAMP WITH TIME ZONE"}

# ---------------------------------------------------------------------------
# SQL, written once. {table}: the table reference; {rows_source}: a FROM item that
# yields one struct ``r`` per row to write (see the store classes).
# ---------------------------------------------------------------------------
_SOURCE_COLUMNS = ", ".join(f"r.{c} AS {c}" for c in COLUMNS)
_UPDATES = ", ".join(f"{c} = S.{c}" for c in COLUMNS if c not in KEY_COLUMNS)
_NULLABLE = {name for name, _, mode in METRICS_SCHEMA if mode == "NULLABLE"}
# The MERGE's ON clause is the key: equal key columns, NULL matching NULL.
_KEY_MATCH = " AND ".join(
    f"(T.{c} = S.{c} OR (T.{c} IS NULL AND S.{c} IS NULL))" if c in _NULLABLE
    else f"T.{c} = S.{c}" for c in KEY_COLUMNS)

MERGE_SQL = f"""MERGE INTO {{table}} AS T
USING (SELECT {_SOURCE_COLUMNS} FROM {{rows_source}}) AS S
ON {_KEY_MATCH}
WHEN MATCHED THEN UPDATE SET {_UPDATES}
WHEN NOT MATCHED THEN INSERT ({", ".join(COLUMNS)}) \
VALUES ({", ".join(f"S.{c}" for c in COLUMNS)})"""

ROWS_SQL = f"""SELECT {", ".join(COLUMNS)} FROM {{table}}
WHERE (@run_id IS NULL OR run_id = @run_id)
  AND (@dataset IS NULL OR dataset = @dataset)
  AND (@model IS NULL OR model = @model)
  AND (@split IS NULL OR split = @split)
  AND (@metric IS NULL OR metric = @metric)
  AND (@dataset_id IS NULL OR dataset_id = @dataset_id)"""

CHAMPION_SQL = f"""SELECT m.run_id AS run_id, m.value AS value, m.model_uri AS model_uri,
  m.created_at AS created_at, m.dataset AS dataset
FROM {{table}} AS m
WHERE m.dataset_id = @dataset_id AND m.model = @model AND m.split = @split
  AND m.metric = @metric
  AND (m.k = @k OR (m.k IS NULL AND @k IS NULL))
  AND (@exclude_run_id IS NULL OR m.run_id != @exclude_run_id)
  AND m.run_id IN (SELECT b.run_id FROM {{table}} AS b
                   WHERE b.metric = @blessed_metric AND b.value = @blessed_value)
ORDER BY m.value * @sign DESC, m.created_at DESC
LIMIT 1"""

RUNS_SQL = """SELECT run_id, ANY_VALUE(pipeline) AS pipeline, ANY_VALUE(model) AS model,
  ANY_VALUE(dataset) AS dataset, MAX(dataset_id) AS dataset_id, MAX(model_uri) AS model_uri,
  MIN(created_at) AS created_at,
  MAX(CASE WHEN metric = @blessed_metric THEN value END) AS blessed,
  MAX(CASE WHEN split = @split AND metric = @metric AND (k = @k OR (k IS NULL AND @k IS NULL))
      THEN value END) AS value,
  COUNT(*) AS num_rows
FROM {table}
WHERE (@dataset IS NULL OR dataset = @dataset) AND (@model IS NULL OR model = @model)
  AND (@dataset_id IS NULL OR dataset_id = @dataset_id)
GROUP BY run_id
ORDER BY created_at DESC, run_id
LIMIT @limit"""

# A query parameter: (name, BigQuery type, value).
Param = tuple[str, str, Any]


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MetricRow:
  """One metric value. ``labels`` is a JSON object (stored as text)."""

  run_id: str
  model: str
  dataset: str
  split: str
  metric: str
  value: float
  k: int | None = None
  pipeline: str | None = None
  created_at: datetime.datetime | None = None   # set to "now" (UTC) when written
  model_uri: str | None = None
  labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dataset_id: str | None = None   # the data's identity ("ds-..."); champions are per identity

  @property
  def key(self) -> tuple[str, str, str, int | None]:
    """The idempotency key ``(run_id, split, metric, k)``."""
    return (self.run_id, self.split, self.metric, self.k)

  @property
  def name(self) -> str:
    """``metric@k``, or ``metric`` when ``k`` is NULL (the evaluation output's key)."""
    return self.metric if self.k is None else f"{self.metric}@{self.k}"


@dataclasses.dataclass(frozen=True)
class Champion:
  """The best blessed run for a (dataset identity, model family, metric, k, split)."""

  run_id: str
  value: float
  model_uri: str | None
  created_at: datetime.datetime
  dataset: str | None = None   # its display label


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """One run, as ``recml runs list`` shows it.

  ``blessed`` is None when the run was never validated, else whether the gate blessed
  it; ``decision`` is the gate's word (``"blessed"``, ``"tie"``, ``"rejected"``);
  ``value`` is the requested metric (None when the run lacks it).
  """

  run_id: str
  pipeline: str | None
  model: str
  dataset: str
  model_uri: str | None
  created_at: datetime.datetime
  blessed: bool | None
  value: float | None
  num_rows: int
  dataset_id: str | None = None
  decision: str | None = None


def decision_of(value: float | None) -> str | None:
  """The gate decision a ``blessed`` row's value stands for (None: not validated)."""
  if value is None:
    return None
  for name, code in DECISION_VALUES.items():
    if abs(value - code) < 1e-9:
      return name
  raise ValueError(f"blessed row value {value} is none of {DECISION_VALUES}")


def json_object(value: Mapping[str, Any] | str | None, what: str) -> dict[str, Any]:
  """``value`` -- a mapping, its JSON text, or None / "" for empty -- as a dict.

  Raises:
    ValueError: ``"{what} is not valid JSON: ..."`` or ``"{what} must be a JSON object, ..."``.
  """
  if value is None or value == "":
    return {}
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise ValueError(f"{what} is not valid JSON: {e}") from None
  if not isinstance(value, Mapping):
    raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
  return dict(value)


def parse_metric_name(name: str) -> tuple[str, int | None]:
  """``"ndcg@10"`` -> ``("ndcg", 10)``; ``"mrr"`` -> ``("mrr", None)``."""
  metric, sep, k = name.partition("@")
  if not metric or (sep and not k.isdigit()):
    raise ValueError(f"bad metric name {name!r}: expected 'name' or 'name@K' with an integer K")
  return metric, (int(k) if sep else None)


def _utc(ts: datetime.datetime) -> datetime.datetime:
  if ts.tzinfo is None:
    raise ValueError(f"created_at must be timezone-aware (UTC), got naive {ts!r}")
  return ts.astimezone(datetime.timezone.utc)


def normalize_row(row: MetricRow | Mapping[str, Any],
                  now: datetime.datetime | None = None) -> dict[str, Any]:
  """Checks one row and returns it as a dict of column -> stored value.

  The checks are BigQuery's, made here because local engines (and the emulator)
  are looser: unknown fields, missing REQUIRED values, NaN/inf, a non-integer or
  negative ``k``, naive timestamps and labels that are not a JSON object are
  rejected with a ValueError naming the row.

  Args:
    row: a :class:`MetricRow` or a mapping with its fields.
    now: ``created_at`` for rows without one (default: the current UTC time).

  Returns:
    ``{column: value}`` in :data:`COLUMNS` order; ``labels`` as JSON text.
  """
  fields = dataclasses.asdict(row) if isinstance(row, MetricRow) else dict(row)
  unknown = sorted(set(fields) - set(COLUMNS))
  if unknown:
    raise ValueError(f"unknown metric row field(s) {unknown}; columns are {list(COLUMNS)}")
  out = {c: fields.get(c) for c in COLUMNS}
  where = f"metric row {out['run_id']}/{out['split']}/{out['metric']}@{out['k']}"
  if out["created_at"] is None:
    out["created_at"] = now or datetime.datetime.now(datetime.timezone.utc)
  out["created_at"] = _utc(out["created_at"])
  labels = json_object(out["labels"], f"{where}: labels")
  try:
    out["labels"] = json.dumps(labels, sort_keys=True, allow_nan=False, default=str)
  except ValueError:
    raise ValueError(f"{where}: labels hold NaN or infinity") from None
  k = out["k"]
  if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
    raise ValueError(f"{where}: k must be a non-negative integer or None, got {k!r}")
  value = out["value"]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{where}: value must be a number, got {value!r}")
  if not math.isfinite(value):
    raise ValueError(f"{where}: value is {value}; NaN and infinite metrics are not stored "
                     "(a diverged run? fix the evaluation or leave the metric out)")
  out["value"] = float(value)
  for name, type_, mode in METRICS_SCHEMA:
    v = out[name]
    if mode == "REQUIRED" and (v is None or v == ""):
      raise ValueError(f"{where}: {name} is required")
    if type_ == "STRING" and v is not None and not isinstance(v, str):
      raise ValueError(f"{where}: {name} must be a string, got {v!r}")
  return out


def _to_row(record: Mapping[str, Any]) -> MetricRow:
  values = dict(record)
  values["labels"] = json.loads(values["labels"]) if values.get("labels") else {}
  values["created_at"] = _utc(values["created_at"])
  return MetricRow(**values)


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------
class MetricsStore:
  """The interface; :func:`open_store` returns one of the two engines below."""

  uri: str
  table_ref: str     # how the SQL names the table
  rows_source: str   # FROM item yielding a struct ``r`` per row of the ``@rows`` parameter

  # -- engine hooks ----------------------------------------------------------
  def _query(self, sql: str, params: Sequence[Param]) -> list[dict[str, Any]]:
    raise NotImplementedError

  def _merge(self, records: list[dict[str, Any]]) -> None:
    raise NotImplementedError

  def ensure_table(self) -> None:
    """Creates the table when missing."""
    raise NotImplementedError

  def schema(self) -> list[tuple[str, str, str]]:
    """The table's schema as the engine reports it, as (name, BigQuery type, mode)."""
    raise NotImplementedError

  def sql(self, template: str) -> str:
    """A query template with this store's table and row source filled in."""
    return template.format(table=self.table_ref, rows_source=self.rows_source)

  # -- the interface ---------------------------------------------------------
  def write(self, rows: Iterable[MetricRow | Mapping[str, Any]]) -> int:
    """Writes rows, replacing rows with the same ``(run_id, split, metric, k)``.

    Args:
      rows: :class:`MetricRow` or mappings of its fields. Rows without
        ``created_at`` get one shared "now". Within one call, the last row of a key wins.

    Returns:
      The number of distinct rows written.

    Raises:
      ValueError: a row is invalid (see :func:`normalize_row`); nothing is written.
    """
    records = self.prepare(rows)
    if records:
      self.ensure_table()
      self._merge(records)
    return len(records)

  def prepare(self, rows: Iterable[MetricRow | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated records, de-duplicated by key (the last row of a key wins)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    by_key: dict[tuple, dict[str, Any]] = {}
    for row in rows:
      record = normalize_row(row, now)
      key = tuple(record[c] for c in KEY_COLUMNS)
      by_key.pop(key, None)
      by_key[key] = record
    return list(by_key.values())

  def rows(self, run_id: str | None = None, *, dataset: str | None = None,
           model: str | None = None, split: str | None = None,
           metric: str | None = None, dataset_id: str | None = None) -> list[MetricRow]:
    """Rows matching every given filter, ordered by run, split, metric and k (NULL first)."""
    self.ensure_table()
    params = [("run_id", "STRING", run_id), ("dataset", "STRING", dataset),
              ("model", "STRING", model), ("split", "STRING", split),
              ("metric", "STRING", metric), ("dataset_id", "STRING", dataset_id)]
    out = [_to_row(r) for r in self._query(self.sql(ROWS_SQL), params)]
    return sorted(out, key=lambda r: (r.run_id, r.split, r.metric, -1 if r.k is None else r.k))

  def champion(self, dataset_id: str, model_family: str, metric: str, k: int | None,
               split: str = "valid", exclude_run_id: str | None = None,
               higher_is_better: bool = True) -> Champion | None:
    """The best blessed run of a model family on the same data, or None when none is blessed.

    Args:
      dataset_id: the ``dataset_id`` column (the data's identity, not its label: runs
        with the same ``dataset`` label on other data are never champions).
      model_family: the ``model`` column (e.g. ``"sasrec"``).
      metric: metric name without the cut-off (``"ndcg"``).
      k: the cut-off (``10``), or None for metrics without one (``"mrr"``).
      split: the split whose value ranks the runs.
      exclude_run_id: leave this run out (the candidate itself, when re-validated).
      higher_is_better: False for metrics such as a loss.

    Returns:
      The blessed run with the best value (ties: the newest), or None.
    """
    if not dataset_id:
      raise ValueError("champion lookup needs a dataset identity (dataset_id), got "
                       f"{dataset_id!r}")
    self.ensure_table()
    params = [("dataset_id", "STRING", dataset_id), ("model", "STRING", model_family),
              ("split", "STRING", split), ("metric", "STRING", metric), ("k", "INT64", k),
              ("exclude_run_id", "STRING", exclude_run_id),
              ("blessed_metric", "STRING", BLESSED_METRIC),
              ("blessed_value", "FLOAT64", DECISION_VALUES["blessed"]),
              ("sign", "FLOAT64", 1.0 if higher_is_better else -1.0)]
    found = self._query(self.sql(CHAMPION_SQL), params)
    if not found:
      return None
    r = found[0]
    return Champion(run_id=r["run_id"], value=float(r["value"]), model_uri=r["model_uri"],
                    created_at=_utc(r["created_at"]), dataset=r["dataset"])

  def runs(self, *, dataset: str | None = None, model: str | None = None,
           metric: str = "ndcg", k: int | None = 10, split: str = "valid",
           limit: int = 100, dataset_id: str | None = None) -> list[RunSummary]:
    """Runs, newest first, with their blessing and one headline metric.

    Args:
      dataset: only runs with this dataset label.
      dataset_id: only runs on this dataset identity.
      model: only runs of this model family.
      metric, k, split: the headline metric reported as ``RunSummary.value``.
      limit: at most this many runs.
    """
    self.ensure_table()
    params = [("dataset", "STRING", dataset), ("model", "STRING", model),
              ("dataset_id", "STRING", dataset_id),
              ("metric", "STRING", metric), ("k", "INT64", k), ("split", "STRING", split),
              ("blessed_metric", "STRING", BLESSED_METRIC), ("limit", "INT64", int(limit))]
    out = []
    for r in self._query(self.sql(RUNS_SQL), params):
      decision = decision_of(r["blessed"])
      out.append(RunSummary(
          run_id=r["run_id"], pipeline=r["pipeline"], model=r["model"],
          dataset=r["dataset"], model_uri=r["model_uri"], created_at=_utc(r["created_at"]),
          blessed=None if decision is None else decision == "blessed",
          value=None if r["value"] is None else float(r["value"]),
          num_rows=int(r["num_rows"]), dataset_id=r["dataset_id"], decision=decision))
    return out

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.uri!r})"


class DuckDBStore(MetricsStore):
  """The embedded store: one DuckDB file, opened per operation.

  A connection is held only for the length of one call, under an exclusive
  ``fcntl.flock`` on ``<file>.lock``: DuckDB allows one read-write process per file, and
  threads of one process sharing the database would each see no row of a new key and
  both insert it. The lock serializes threads (each call opens its own lock file
  description) and processes; waiting for it, and for a DuckDB file lock held by a
  process outside this protocol (e.g. the ``duckdb`` CLI), retries for ``lock_timeout_s``.
  The key is also enforced by the unique index :data:`DUCKDB_KEY_INDEX`, so a writer
  that bypasses the lock fails instead of duplicating rows.
  """

  table_ref = "metrics"
  rows_source = "(SELECT UNNEST(@rows) AS r)"

  def __init__(self, path: str, lock_timeout_s: float = 60.0):
    self.path = os.path.abspath(path)
    self.uri = "duckdb:///" + self.path
    self.lock_path = self.path + ".lock"
    self.lock_timeout_s = lock_timeout_s
    self._table_ready = False

  @contextlib.contextmanager
  def _locked(self):
    """Holds the store's exclusive file lock (threads and processes take turns)."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      deadline = time.monotonic() + self.lock_timeout_s
      while True:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          if time.monotonic() > deadline:
            raise TimeoutError(f"metrics store {self.path}: {self.lock_path} stayed locked "
                               f"for {self.lock_timeout_s:g} s (another writer hung?)") from None
          time.sleep(random.uniform(0.002, 0.02))
      yield
    finally:
      os.close(fd)   # releases the lock

  @contextlib.contextmanager
  def _connection(self):
    """A connection to the file, under the lock, closed (and unlocked) on exit."""
    import duckdb  # pylint: disable=g-import-not-at-top
    with self._locked():
      deadline = time.monotonic() + self.lock_timeout_s
      while True:
        try:
          con = duckdb.connect(self.path)
          break
        except duckdb.IOException as e:   # a process outside the lock protocol holds it
          if "lock" not in str(e).lower() or time.monotonic() > deadline:
            raise
          time.sleep(0.2)
      try:
        con.execute("SET TimeZone = 'UTC'")
        yield con
      finally:
        con.close()

  @staticmethod
  def _params(sql: str, params: Sequence[Param]) -> tuple[str, dict[str, Any]]:
    # DuckDB spells named parameters $name; pass only the ones the query uses.
    used = set(re.findall(r"@(\w+)", sql))
    return re.sub(r"@(\w+)", r"$\1", sql), {n: v for n, _, v in params if n in used}

  def _query(self, sql, params):
    sql, values = self._params(sql, params)
    with self._connection() as con:
      cur = con.execute(sql, values)
      names = [d[0] for d in cur.description]
      return [dict(zip(names, row)) for row in cur.fetchall()]

  def _merge(self, records):
    sql, values = self._params(self.sql(MERGE_SQL), [("rows", "ARRAY", records)])
    with self._connection() as con:
      con.execute(sql, values)

  def ensure_table(self):
    """Creates the table and its key index, migrating files of older schemas.

    Older files lack columns (added, NULL in old rows) or the key index; rows that
    duplicate a key (written before the index existed) are reduced to the newest one
    per key, and the number removed is reported on stderr.
    """
    if self._table_ready:
      return
    cols = ", ".join(f"{n} {_DUCKDB_TYPES[t]}{' NOT NULL' if m == 'REQUIRED' else ''}"
                     for n, t, m in METRICS_SCHEMA)
    table = self.table_ref
    with self._connection() as con:
      con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
      have = {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
      for name, type_, mode in METRICS_SCHEMA:
        if name not in have:
          if mode == "REQUIRED":
            raise ValueError(f"metrics store {self.path}: table {table} lacks the REQUIRED "
                             f"column {name}; it was not written by this code")
          con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {_DUCKDB_TYPES[type_]}")
      indexed = con.execute("SELECT count(*) FROM duckdb_indexes() WHERE index_name = $name",
                            {"name": DUCKDB_KEY_INDEX}).fetchone()[0]
      if not indexed:
        key = ", ".join(DUCKDB_KEY_EXPRESSIONS)
        removed = con.execute(
            f"DELETE FROM {table} WHERE rowid NOT IN (SELECT max_by(rowid, (created_at, rowid)) "
            f"FROM {table} GROUP BY {key})").fetchone()[0]
        if removed:
          print(f"metrics store {self.path}: removed {removed} row(s) duplicating a "
                f"(run_id, split, metric, k) key; kept the newest of each", file=sys.stderr)
        con.execute(f"CREATE UNIQUE INDEX {DUCKDB_KEY_INDEX} ON {table} ({key})")
    self._table_ready = True

  def schema(self):
    self.ensure_table()
    back = {v: k for k, v in _DUCKDB_TYPES.items()}
    with self._connection() as con:
      described = con.execute(f"DESCRIBE {self.table_ref}").fetchall()
    return [(name, back.get(type_, type_), "NULLABLE" if null == "YES" else "REQUIRED")
            for name, type_, null, *_ in described]


# The DuckDB key: k is NULL for metrics without a cut-off and never negative, so
# COALESCE(k, -1) makes NULL a value of the key (see the module docstring).
DUCKDB_KEY_INDEX = "metrics_key"
DUCKDB_KEY_EXPRESSIONS = tuple(f"COALESCE({c}, -1)" if c == "k" else c for c in KEY_COLUMNS)


class BigQueryStore(MetricsStore):
  """A BigQuery table, through ``google-cloud-bigquery``.

  Writes are one ``MERGE`` statement per call with the rows as an
  ``ARRAY<STRUCT>`` query parameter (DML, not streaming inserts, so rows can be
  replaced right away: streamed rows cannot be updated while in the streaming buffer).
  BigQuery enforces no unique key; the MERGE is the key. Concurrent MERGEs into one
  table run under snapshot isolation: one commits, the other fails with "Could not
  serialize access ... due to concurrent update" (after BigQuery's own retries) and is
  sent again here, up to ``MERGE_ATTEMPTS`` times, so it then sees the committed rows.
  """

  MERGE_ATTEMPTS = 5

  rows_source = "UNNEST(@rows) AS r"

  def __init__(self, project: str, dataset: str, table: str, *, client=None,
               client_options: Mapping[str, Any] | None = None, credentials=None,
               location: str | None = None, retry_deadline_s: float | None = None):
    self.project, self.dataset, self.table = project, dataset, table
    self.uri = f"bq://{project}.{dataset}.{table}"
    self.table_id = f"{project}.{dataset}.{table}"
    self.table_ref = f"`{self.table_id}`"
    self.location = location
    self._client = client
    self._client_options = dict(client_options or {})
    self._credentials = credentials
    self._retry_deadline_s = retry_deadline_s
    self._table_ready = False

  @property
  def client(self):
    """The BigQuery client, made on first use (no cloud calls at import or open)."""
    if self._client is None:
      from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
      self._client = bigquery.Client(project=self.project, credentials=self._credentials,
                                     client_options=self._client_options or None,
                                     location=self.location)
    return self._client

  def _retry(self, jobs: bool = False) -> dict[str, Any]:
    """``retry``/``timeout`` (and ``job_retry``) arguments for client calls; {}: the defaults."""
    from google.cloud.bigquery import retry  # pylint: disable=g-import-not-at-top
    deadline = self._retry_deadline_s
    if deadline is None:
      return {}
    out = {"retry": retry.DEFAULT_RETRY.with_deadline(deadline), "timeout": deadline}
    if jobs:
      out["job_retry"] = retry.DEFAULT_JOB_RETRY.with_deadline(deadline)
    return out

  @staticmethod
  def query_parameter(name: str, type_: str, value: Any):
    """One typed BigQuery query parameter."""
    from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
    return bigquery.ScalarQueryParameter(name, type_, value)

  def merge_request(self, rows: Iterable[MetricRow | Mapping[str, Any]]):
    """The exact ``(sql, QueryJobConfig)`` that :meth:`write` sends for these rows.

    Public so tests can check what reaches BigQuery where the emulator is looser
    (REQUIRED columns, unknown fields, parameter types).
    """
    return self._merge_job(self.prepare(rows))

  def _merge_job(self, records: list[dict[str, Any]]):
    from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
    structs = [bigquery.StructQueryParameter(
        None, *(self.query_parameter(n, t, rec[n]) for n, t, _ in METRICS_SCHEMA))
               for rec in records]
    config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ArrayQueryParameter("rows", "STRUCT", structs)])
    return self.sql(MERGE_SQL), config

  def _run(self, sql: str, config):
    retry = self._retry(jobs=True)
    job = self.client.query(sql, job_config=config, location=self.location,
                            **{k: v for k, v in retry.items() if k != "timeout"})
    return job.result(**retry)

  def _query(self, sql, params):
    from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
    used = set(re.findall(r"@(\w+)", sql))
    config = bigquery.QueryJobConfig(query_parameters=[
        self.query_parameter(n, t, v) for n, t, v in params if n in used])
    return [dict(row.items()) for row in self._run(sql, config)]

  def _merge(self, records):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    for attempt in range(self.MERGE_ATTEMPTS):
      try:
        self._run(*self._merge_job(records))
        return
      except exceptions.BadRequest as e:
        if ("could not serialize access" not in str(e).lower()
            or attempt == self.MERGE_ATTEMPTS - 1):
          raise
        time.sleep(random.uniform(0.5, 2.0) * 2 ** attempt)

  def bigquery_schema(self):
    """:data:`METRICS_SCHEMA` as ``SchemaField`` objects."""
    from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
    return [bigquery.SchemaField(n, t, mode=m) for n, t, m in METRICS_SCHEMA]

  def ensure_table(self):
    if self._table_ready:
      return
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
    table = bigquery.Table(self.table_id, schema=self.bigquery_schema())
    table.clustering_fields = list(CLUSTERING_FIELDS)
    table.description = "RecML metrics: one row per (run_id, split, metric, k)."
    try:
      table = self.client.create_table(table, exists_ok=True, **self._retry())
    except exceptions.NotFound as e:
      raise ValueError(f"{self.uri}: dataset {self.project}.{self.dataset} not found; "
                       "create it first (infra/gcp, or `bq mk --dataset`)") from e
    # A table of an older schema gets the missing (NULLABLE) columns appended.
    have = {f.name for f in table.schema}
    missing = [f for f in self.bigquery_schema() if f.name not in have]
    if missing:
      if any(f.mode == "REQUIRED" for f in missing):
        raise ValueError(f"{self.uri} lacks REQUIRED column(s) "
                         f"{[f.name for f in missing if f.mode == 'REQUIRED']}")
      table.schema = list(table.schema) + missing
      self.client.update_table(table, ["schema"], **self._retry())
    self._table_ready = True

  def schema(self):
    self.ensure_table()
    table = self.client.get_table(self.table_id, **self._retry())
    return [(f.name, bigquery_standard_type(f.field_type), f.mode or "NULLABLE")
            for f in table.schema]


def bigquery_standard_type(type_: str) -> str:
  """Legacy BigQuery type names (``INTEGER``, ``FLOAT``) -> standard SQL names."""
  return {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}.get(type_, type_)


# ---------------------------------------------------------------------------
# Opening a store
# ---------------------------------------------------------------------------
EMULATOR_HOST_VAR = "BIGQUERY_EMULATOR_HOST"
_BQ_URI = re.compile(r"^bq://(?P<project>[a-z][a-z0-9.:-]*[a-z0-9])\.(?P<dataset>\w+)"
                     r"\.(?P<table>[\w-]+)$")


def open_store(uri: str, *, client=None, client_options: Mapping[str, Any] | None = None,
               credentials=None, location: str | None = None,
               retry_deadline_s: float | None = None) -> MetricsStore:
  """Opens the metrics store at ``uri``; the table is created on first use.

  A BigQuery emulator can be named without code changes: when neither ``client`` nor
  ``client_options`` is given and ``BIGQUERY_EMULATOR_HOST`` (``host:port``, the
  variable Google's Go client also honours) is set, the client talks to
  ``http://$BIGQUERY_EMULATOR_HOST`` with anonymous credentials.

  Args:
    uri: ``bq://project.dataset.table`` or ``duckdb:///relative/path.duckdb`` /
      ``duckdb:////absolute/path.duckdb``.
    client: BigQuery only: a ``bigquery.Client`` to use.
    client_options: BigQuery only: for the client made otherwise (e.g.
      ``{"api_endpoint": "http://127.0.0.1:9050"}`` for an emulator).
    credentials: BigQuery only: e.g. ``AnonymousCredentials()`` for an emulator.
    location: BigQuery only: the dataset's location (default: the client's).
    retry_deadline_s: BigQuery only: give up on retried requests after this long
      (default: the client's 600 s).

  Returns:
    A :class:`MetricsStore`.

  Raises:
    ValueError: the URI is neither form.
  """
  if not isinstance(uri, str):
    raise ValueError(f"metrics store URI must be a string, got {uri!r}")
  uri = uri.strip()
  if uri.startswith("duckdb:///"):
    path = uri[len("duckdb:///"):]
    if path and not path.endswith("/"):
      return DuckDBStore(path)
  elif uri.startswith("bq://"):
    m = _BQ_URI.match(uri)
    emulator = os.environ.get(EMULATOR_HOST_VAR)
    if m and client is None and not client_options and emulator:
      from google.auth import credentials as auth  # pylint: disable=g-import-not-at-top
      client_options = {"api_endpoint": f"http://{emulator}"}
      credentials = credentials or auth.AnonymousCredentials()
    if m:
      return BigQueryStore(m["project"], m["dataset"], m["table"], client=client,
                           client_options=client_options, credentials=credentials,
                           location=location, retry_deadline_s=retry_deadline_s)
  raise ValueError(f"bad metrics store URI {uri!r}: expected {URI_FORMS[0]} or {URI_FORMS[1]}")
