"""The metrics store: the same test bodies against DuckDB and a real local BigQuery emulator."""

from __future__ import annotations

import datetime
import math
import uuid

import pytest

from components import metrics_store
from components import write_metrics
from components.metrics_store import MetricRow

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)


def row(run_id="r1", metric="ndcg", k=10, value=0.1, split="valid", model="sasrec",
        dataset="ml-100k", **extra) -> MetricRow:
  extra.setdefault("dataset_id", f"ds-{dataset}")   # one identity per label unless given
  return MetricRow(run_id=run_id, model=model, dataset=dataset, split=split, metric=metric,
                   k=k, value=value, pipeline="recml", model_uri=f"runs/{run_id}/model",
                   **extra)


def bless(store, run_id, value=1.0, split="valid", model="sasrec", dataset="ml-100k",
          **extra):
  store.write([row(run_id, metrics_store.BLESSED_METRIC, None, value, split, model, dataset,
                   **extra)])


# ---------------------------------------------------------------------------
# Both backends
# ---------------------------------------------------------------------------
def test_schema_is_the_constant_in_both_backends(backend):
  store = backend.open()
  assert store.schema() == list(metrics_store.METRICS_SCHEMA)
  assert [name for name, _, _ in metrics_store.METRICS_SCHEMA] == [
      "run_id", "pipeline", "model", "dataset", "split", "metric", "k", "value",
      "created_at", "model_uri", "labels", "dataset_id"]


def test_rows_round_trip(backend):
  store = backend.open()
  written = row(labels={"seed": 3, "tags": ["a"]}, created_at=T0)
  assert store.write([written, row(metric="mrr", k=None, value=0.05)]) == 2
  got = store.rows("r1")
  assert [r.name for r in got] == ["mrr", "ndcg@10"]
  assert got[1] == written
  assert got[1].created_at.tzinfo is not None and got[1].created_at == T0
  assert got[0].k is None and got[0].labels == {}
  assert got[0].created_at > T0   # "now", set by write


def test_rewriting_a_key_replaces_the_row(backend):
  store = backend.open()
  store.write([row(value=0.1), row(metric="mrr", k=None, value=0.01)])
  # Same (run_id, split, metric, k) again, k NULL included: one row each, new values.
  assert store.write([row(value=0.2, labels={"attempt": 2}),
                      row(metric="mrr", k=None, value=0.02)]) == 2
  got = {r.name: r for r in store.rows("r1")}
  assert sorted(got) == ["mrr", "ndcg@10"]
  assert got["ndcg@10"].value == 0.2 and got["ndcg@10"].labels == {"attempt": 2}
  assert got["mrr"].value == 0.02
  # Other parts of the key make other rows.
  store.write([row(k=50, value=0.3), row(split="test", value=0.4), row("r2", value=0.5)])
  assert len(store.rows()) == 5
  assert len(store.rows("r1")) == 4


def test_same_key_twice_in_one_write_keeps_the_last(backend):
  store = backend.open()
  assert store.write([row(value=0.1), row(value=0.3)]) == 1
  assert [r.value for r in store.rows()] == [0.3]


def test_rows_filters(backend):
  store = backend.open()
  store.write([row("a"), row("b", dataset="other"), row("c", model="bert4rec"),
               row("a", split="test"), row("a", metric="hr")])
  assert {r.run_id for r in store.rows(dataset="ml-100k")} == {"a", "c"}
  assert {r.run_id for r in store.rows(model="bert4rec")} == {"c"}
  assert [(r.split, r.metric) for r in store.rows("a", split="valid")] == [
      ("valid", "hr"), ("valid", "ndcg")]
  assert len(store.rows(metric="ndcg")) == 4
  assert store.rows("nobody") == []


def test_nan_and_infinity_are_rejected_and_nothing_is_written(backend):
  store = backend.open()
  for bad in (math.nan, math.inf):
    with pytest.raises(ValueError, match="NaN and infinite metrics are not stored"):
      store.write([row("ok", value=0.1), row("bad", value=bad)])
  assert store.rows() == []


@pytest.mark.parametrize("bad, message", [
    (dict(dataset=None), "dataset is required"),
    (dict(run_id=""), "run_id is required"),
    (dict(k=-1), "k must be a non-negative integer"),
    (dict(k=True), "k must be a non-negative integer"),
    (dict(value="0.1"), "value must be a number"),
    (dict(labels="[1, 2]"), "labels must be a JSON object"),
    (dict(labels="{oops"), "labels is not valid JSON"),
    (dict(created_at=datetime.datetime(2026, 1, 1)), "timezone-aware"),
    (dict(colour="blue"), "unknown metric row field"),
])
def test_invalid_rows_are_rejected(backend, bad, message):
  store = backend.open()
  fields = dict(run_id="r1", model="m", dataset="d", split="valid", metric="ndcg", k=10,
                value=0.1)
  with pytest.raises(ValueError, match=message):
    store.write([{**fields, **bad}])
  assert store.rows() == []


def test_champion_is_the_best_blessed_run(backend):
  store = backend.open()
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10) is None
  store.write([row("r1", value=0.10), row("r2", value=0.30), row("r3", value=0.20),
               row("r4", value=0.90),                      # never validated
               row("r5", value=0.95),                      # rejected
               row("r6", value=0.99, model="bert4rec"),    # another family
               row("r7", value=0.99, dataset="ml-1m"),     # another dataset
               row("r8", value=0.99, split="test"),        # another split
               row("r1", metric="mrr", k=None, value=0.07)])
  for run_id in ("r1", "r3", "r6", "r7", "r8"):
    bless(store, run_id, model="bert4rec" if run_id == "r6" else "sasrec",
          dataset="ml-1m" if run_id == "r7" else "ml-100k")
  bless(store, "r5", value=0.0)
  champ = store.champion("ds-ml-100k", "sasrec", "ndcg", 10)
  assert (champ.run_id, champ.value, champ.model_uri) == ("r3", 0.20, "runs/r3/model")
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10, exclude_run_id="r3").run_id == "r1"
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10, split="test").run_id == "r8"
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 50) is None
  assert store.champion("ds-ml-100k", "sasrec", "mrr", None).value == 0.07
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10, higher_is_better=False).run_id == "r1"
  assert store.champion("ds-ml-1m", "sasrec", "ndcg", 10).run_id == "r7"


def test_champion_is_keyed_by_dataset_identity_not_label(backend):
  store = backend.open()
  # Same label, other data: r-old was trained on an earlier version of "ml-100k".
  store.write([row("r-old", value=0.50, dataset_id="ds-aaaaaaaaaaaa"),
               row("r-new", value=0.10, dataset_id="ds-bbbbbbbbbbbb")])
  bless(store, "r-old", dataset_id="ds-aaaaaaaaaaaa")
  assert store.champion("ds-bbbbbbbbbbbb", "sasrec", "ndcg", 10) is None
  assert store.champion("ds-aaaaaaaaaaaa", "sasrec", "ndcg", 10).run_id == "r-old"
  with pytest.raises(ValueError, match="dataset identity"):
    store.champion("", "sasrec", "ndcg", 10)
  by_id = {r.run_id: r for r in store.runs(dataset_id="ds-bbbbbbbbbbbb")}
  assert list(by_id) == ["r-new"] and by_id["r-new"].dataset_id == "ds-bbbbbbbbbbbb"
  assert [r.run_id for r in store.rows(dataset_id="ds-aaaaaaaaaaaa")] == ["r-old", "r-old"]


def test_champion_ties_go_to_the_newest(backend):
  store = backend.open()
  store.write([row("old", value=0.2, created_at=T0),
               row("new", value=0.2, created_at=T0 + datetime.timedelta(days=1))])
  bless(store, "old")
  bless(store, "new")
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10).run_id == "new"


def test_runs_lists_runs_newest_first_with_blessing(backend):
  store = backend.open()
  day = datetime.timedelta(days=1)
  store.write([row("r1", value=0.1, created_at=T0), row("r1", "mrr", None, 0.05, created_at=T0),
               row("r2", value=0.2, created_at=T0 + day),
               row("r3", "hr", 10, 0.5, created_at=T0 + 2 * day, dataset="ml-1m")])
  bless(store, "r1")
  bless(store, "r2", value=0.0)
  runs = store.runs()
  assert [r.run_id for r in runs] == ["r3", "r2", "r1"]
  by_id = {r.run_id: r for r in runs}
  assert by_id["r1"].blessed is True and by_id["r2"].blessed is False
  assert by_id["r3"].blessed is None
  assert (by_id["r1"].value, by_id["r2"].value, by_id["r3"].value) == (0.1, 0.2, None)
  assert by_id["r1"].num_rows == 3 and by_id["r1"].created_at == T0
  assert (by_id["r1"].model, by_id["r1"].pipeline, by_id["r1"].model_uri) == (
      "sasrec", "recml", "runs/r1/model")
  assert [r.run_id for r in store.runs(dataset="ml-100k")] == ["r2", "r1"]
  assert [r.run_id for r in store.runs(limit=1)] == ["r3"]
  assert [r.value for r in store.runs(metric="hr", k=10, dataset="ml-1m")] == [0.5]
  assert [r.value for r in store.runs(metric="mrr", k=None)] == [None, None, 0.05]


def test_write_metrics_step(backend):
  evaluation = {
      "valid": {"hr@10": 0.2, "ndcg@10": 0.1, "mrr": 0.05},
      "test": {"hr@10": 0.18, "ndcg@10": 0.09, "mrr": 0.04},
      "best_test": {"ndcg@10": 0.095, "epoch": 7},
      "model": "sasrec", "dataset": "ml-100k", "selected_epoch": 12,
  }
  args = dict(store_uri=backend.uri, run_id="run-1", pipeline="recml", model="sasrec",
              dataset="ml-100k", metrics=evaluation, model_uri="runs/run-1/model",
              labels={"config": "ml100k_sasrec"}, store_options=backend.options)
  assert write_metrics.run(**args) == 8
  assert write_metrics.run(**args) == 8   # a retried step replaces, never duplicates
  got = {(r.split, r.name): r for r in backend.open().rows("run-1")}
  assert len(got) == 8
  assert got["valid", "hr@10"].metric == "hr" and got["valid", "hr@10"].k == 10
  assert got["test", "mrr"].k is None and got["test", "mrr"].value == 0.04
  assert got["best_test", "epoch"].value == 7.0
  assert got["valid", "mrr"].labels == {"config": "ml100k_sasrec", "selected_epoch": 12}
  assert got["valid", "mrr"].model_uri == "runs/run-1/model"


# ---------------------------------------------------------------------------
# No backend needed
# ---------------------------------------------------------------------------
def test_write_metrics_rejects_bad_input():
  to_rows = write_metrics.to_rows
  with pytest.raises(ValueError, match=r"metrics\['valid'\]\['hr@10'\] must be a number"):
    to_rows("r", "p", "m", "d", {"valid": {"hr@10": "high"}})
  with pytest.raises(ValueError, match="bad metric name 'hr@ten'"):
    to_rows("r", "p", "m", "d", {"valid": {"hr@ten": 0.1}})
  with pytest.raises(ValueError, match="hold no split"):
    to_rows("r", "p", "m", "d", {"model": "m"})
  rows = to_rows("r", "p", "m", "d", '{"valid": {"ndcg@200": 0.3}}', labels='{"a": 1}')
  assert [(r.metric, r.k, r.labels) for r in rows] == [("ndcg", 200, {"a": 1})]


@pytest.mark.parametrize("uri", [
    "metrics.duckdb", "/abs/metrics.duckdb", "sqlite:///x.db", "duckdb://metrics.duckdb",
    "duckdb:///", "bq://project.dataset", "bq://project.data-set.table", "bq://Project.d.t",
    "bq://p.d.t.extra!", "", None,
])
def test_bad_uri_names_both_forms(uri):
  with pytest.raises(ValueError) as e:
    metrics_store.open_store(uri)
  assert "bq://project.dataset.table" in str(e.value) or uri is None
  assert "duckdb:///relative/path/metrics.duckdb" in str(e.value) or uri is None


def test_uri_forms(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  rel = metrics_store.open_store("duckdb:///runs/metrics.duckdb")
  assert rel.path == str(tmp_path / "runs" / "metrics.duckdb")
  assert rel.uri == f"duckdb:///{tmp_path}/runs/metrics.duckdb"   # absolute: 4 slashes
  assert metrics_store.open_store(rel.uri).path == rel.path
  bq = metrics_store.open_store("bq://example.com:my-project.recml.metrics")
  assert (bq.project, bq.dataset, bq.table) == ("example.com:my-project", "recml", "metrics")
  assert bq.table_ref == "`example.com:my-project.recml.metrics`"


def test_opening_does_no_io(tmp_path):
  metrics_store.open_store(f"duckdb:///{tmp_path}/a/metrics.duckdb")
  metrics_store.open_store("bq://no-such-project.d.t")   # no client, no credentials lookup
  assert not (tmp_path / "a").exists()


# The emulator is looser than BigQuery (REQUIRED columns, unknown fields, parameter
# types), so the request sent to BigQuery is checked exactly here.
EXPECTED_MERGE = """MERGE INTO `proj.recml.metrics` AS T
USING (SELECT r.run_id AS run_id, r.pipeline AS pipeline, r.model AS model, r.dataset AS dataset, r.split AS split, r.metric AS metric, r.k AS k, r.value AS value, r.created_at AS created_at, r.model_uri AS model_uri, r.labels AS labels, r.dataset_id AS dataset_id FROM UNNEST(@rows) AS r) AS S
ON T.run_id = S.run_id AND T.split = S.split AND T.metric = S.metric AND (T.k = S.k OR (T.k IS NULL AND S.k IS NULL))
WHEN MATCHED THEN UPDATE SET pipeline = S.pipeline, model = S.model, dataset = S.dataset, value = S.value, created_at = S.created_at, model_uri = S.model_uri, labels = S.labels, dataset_id = S.dataset_id
WHEN NOT MATCHED THEN INSERT (run_id, pipeline, model, dataset, split, metric, k, value, created_at, model_uri, labels, dataset_id) VALUES (S.run_id, S.pipeline, S.model, S.dataset, S.split, S.metric, S.k, S.value, S.created_at, S.model_uri, S.labels, S.dataset_id)"""


def test_bigquery_merge_request_is_exact():
  store = metrics_store.open_store("bq://proj.recml.metrics")
  sql, config = store.merge_request([
      row(value=0.1), row(metric="mrr", k=None, value=1, labels={"b": 1, "a": [2]},
                          created_at=T0),
      row(value=0.3)])   # same key as the first: de-duplicated, last wins
  assert sql == EXPECTED_MERGE
  (param,) = config.query_parameters
  api = param.to_api_repr()
  assert api["name"] == "rows"
  assert api["parameterType"]["type"] == "ARRAY"
  struct_type = api["parameterType"]["arrayType"]
  assert struct_type["type"] == "STRUCT"
  assert [(f["name"], f["type"]["type"]) for f in struct_type["structTypes"]] == [
      (name, type_) for name, type_, _ in metrics_store.METRICS_SCHEMA]
  values = [{n: v["value"] if v else None for n, v in s["structValues"].items()}
            for s in api["parameterValue"]["arrayValues"]]
  assert len(values) == 2
  assert values[1]["value"] == 0.3 and values[1]["k"] == "10" and values[1]["labels"] == "{}"
  assert values[0] == {
      "run_id": "r1", "pipeline": "recml", "model": "sasrec", "dataset": "ml-100k",
      "split": "valid", "metric": "mrr", "k": None, "value": 1.0,
      "created_at": "2026-01-01 00:00:00+00:00", "model_uri": "runs/r1/model",
      "labels": '{"a": [2], "b": 1}', "dataset_id": "ds-ml-100k"}   # JSON text, never a dict (HTTP 500 in the emulator)
  # What the emulator would accept but BigQuery would not is stopped before any request.
  with pytest.raises(ValueError, match="model is required"):
    store.merge_request([{**vars(row()), "model": None}])
  with pytest.raises(ValueError, match="unknown metric row field"):
    store.merge_request([{**vars(row()), "extra": 1}])


def test_bigquery_table_definition():
  store = metrics_store.open_store("bq://proj.recml.metrics")
  fields = [f.to_api_repr() for f in store.bigquery_schema()]
  assert [(f["name"], f["type"], f["mode"]) for f in fields] == list(
      metrics_store.METRICS_SCHEMA)


@pytest.mark.integration
def test_emulator_host_variable(bq_client, bq_emulator, monkeypatch):
  monkeypatch.setenv(metrics_store.EMULATOR_HOST_VAR, bq_emulator)
  store = metrics_store.open_store(f"bq://test.recml_test.metrics_{uuid.uuid4().hex[:8]}",
                                   retry_deadline_s=15)
  store.write([row()])
  assert [r.value for r in store.rows()] == [0.1]
  assert store.client._connection.API_BASE_URL == f"http://{bq_emulator}"
