"""Data identity, the gate and the metrics store (issue 10).

Failures reproduced, each against an independent reference:

* recurring retraining retrained nothing new: nothing in the DAG looked at the data
  behind ``data_uri``, so preprocess/train/evaluate/export were cache hits on new files;
* the gate compared models trained on different data (champion by the config's
  ``dataset:`` label) and blessed and redeployed a model that only tied the champion;
* two writers of the same run duplicated metric rows (no unique key behind the MERGE).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from components import fingerprint as fp
from components import metrics_store
from components import validate
from components import write_metrics
from tests.components.conftest import bq_client, bq_emulator  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ML100K = os.path.join(REPO, "..", "shared", "datasets", "ml-100k")


# ---------------------------------------------------------------------------
# (1) The fingerprint
# ---------------------------------------------------------------------------
def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_fingerprint_follows_content_not_mtime(tmp_path):
  data = tmp_path / "events"
  _write(data / "a.csv", "user,item,timestamp\n1,10,100\n1,11,101\n")
  _write(data / "b.csv", "user,item,timestamp\n2,10,100\n2,12,102\n")
  glob = str(data / "*.csv")
  first = fp.compute(glob)
  # The reference: the entries written out by hand with hashlib.
  assert first["entries"] == [
      {"name": name, "size": len((data / name).read_bytes()),
       "sha256": hashlib.sha256((data / name).read_bytes()).hexdigest()}
      for name in ("a.csv", "b.csv")]
  assert first["digest"].startswith("sha256:") and len(first["digest"]) == 7 + 64

  # Untouched, or touched (new mtime, same bytes): the same fingerprint.
  assert fp.compute(glob)["digest"] == first["digest"]
  os.utime(data / "a.csv", (time.time() + 3600, time.time() + 3600))
  assert fp.compute(glob)["digest"] == first["digest"]

  # Same name, same size, one byte different: another fingerprint; restored: the same.
  original = (data / "a.csv").read_text()
  (data / "a.csv").write_text(original.replace("1,11,101", "1,11,109"))
  assert (data / "a.csv").stat().st_size == len(original)
  changed = fp.compute(glob)
  assert changed["digest"] != first["digest"]
  (data / "a.csv").write_text(original)
  assert fp.compute(glob)["digest"] == first["digest"]

  # A new file behind the same URI: another fingerprint.
  _write(data / "c.csv", "user,item,timestamp\n3,10,100\n3,13,103\n")
  assert fp.compute(glob)["digest"] not in (first["digest"], changed["digest"])

  # The same bytes elsewhere are the same data (names are relative to their folder).
  moved = tmp_path / "elsewhere"
  shutil.copytree(data, moved)
  assert fp.compute(str(moved / "*.csv"))["digest"] == fp.compute(glob)["digest"]


def test_fingerprint_covers_what_preprocess_reads(tmp_path):
  # A MovieLens folder: preprocess reads u.data only, so only u.data counts.
  folder = tmp_path / "ml"
  _write(folder / "u.data", "1\t10\t5\t100\n1\t11\t4\t101\n")
  _write(folder / "u.item", "10|Movie\n")
  before = fp.run(str(folder), str(tmp_path / "manifest"))
  assert [e["name"] for e in before["entries"]] == ["u.data"]
  manifest = json.loads((tmp_path / "manifest" / fp.MANIFEST_FILE).read_text())
  assert manifest["digest"] == before["digest"]
  (folder / "u.item").write_text("10|Another title\n")
  assert fp.compute(str(folder))["digest"] == before["digest"]
  with open(folder / "u.data", "a", encoding="utf-8") as f:
    f.write("2\t10\t3\t102\n")
  assert fp.compute(str(folder))["digest"] != before["digest"]


def _blob(bucket, resource):
  """A Blob as ``list_blobs`` makes it from the JSON API's object resource."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  blob = storage.Blob(resource["name"], bucket=bucket)
  blob._set_properties(resource)  # pylint: disable=protected-access
  return blob


def test_gcs_entries_come_from_object_metadata():
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket = storage.Bucket(client=None, name="b")
  content = b"1\t10\t5\t100\n"
  md5 = base64.b64encode(hashlib.md5(content).digest()).decode()
  plain = _blob(bucket, {"name": "ml/u.data", "size": str(len(content)),
                         "generation": "1700000000000001", "md5Hash": md5,
                         "crc32c": "AAAAAA=="})
  composite = _blob(bucket, {"name": "ml/part-1.csv", "size": "7", "generation": "42",
                             "crc32c": "yZRlqg=="})
  assert fp.gcs_blob_entry(plain, "u.data") == {
      "name": "u.data", "size": len(content), "generation": 1700000000000001,
      "md5": hashlib.md5(content).hexdigest()}
  assert fp.gcs_blob_entry(composite, "part-1.csv") == {
      "name": "part-1.csv", "size": 7, "generation": 42,
      "crc32c": base64.b64decode("yZRlqg==").hex()}
  # MD5 identifies the content: a re-upload (new generation) of the same bytes is the
  # same data; a composite object (CRC32C only) is identified with its generation.
  reupload = fp.gcs_blob_entry(plain, "u.data") | {"generation": 7}
  assert fp.digest([reupload]) == fp.digest([fp.gcs_blob_entry(plain, "u.data")])
  assert fp.digest([fp.gcs_blob_entry(composite, "part-1.csv") | {"generation": 43}]) != \
      fp.digest([fp.gcs_blob_entry(composite, "part-1.csv")])
  assert fp.relative_names(["gs://b/ml/u.data", "gs://b/ml/2024/x.csv"]) == [
      "u.data", "2024/x.csv"]


def test_dataset_identity_is_fingerprint_plus_protocol_and_parameters():
  base = dict(max_len=50, min_item_count=1, timestamp_unit="auto", data_format="")
  ident = fp.dataset_identity("sha256:" + "0" * 64, **base)
  assert ident.startswith("ds-") and len(ident) == 15
  assert fp.dataset_identity("sha256:" + "0" * 64, **base) == ident   # stable
  others = {fp.dataset_identity("sha256:" + "1" * 64, **base)}
  for key, value in (("max_len", 200), ("min_item_count", 5), ("timestamp_unit", "ms")):
    others.add(fp.dataset_identity("sha256:" + "0" * 64, **{**base, key: value}))
  assert ident not in others and len(others) == 4
  with pytest.raises(ValueError, match="fingerprint"):
    fp.dataset_identity("", **base)


@pytest.mark.integration
def test_bigquery_fingerprint_follows_the_table(bq_client):
  from google.cloud import bigquery  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top
  table_id = f"test.recml_test.events_{uuid.uuid4().hex[:8]}"
  bq_client.create_table(bigquery.Table(table_id, schema=[
      bigquery.SchemaField("user", "STRING"), bigquery.SchemaField("item", "STRING"),
      bigquery.SchemaField("timestamp", "INT64")]))
  assert not bq_client.insert_rows_json(table_id, [{"user": "u1", "item": "i1", "timestamp": 1}])
  first = fp.compute(f"bq://{table_id}", bq_client=bq_client)
  assert first["kind"] == "bigquery" and first["entries"][0]["table"] == table_id
  assert fp.compute(f"bq://{table_id}", bq_client=bq_client)["digest"] == first["digest"]
  assert not bq_client.insert_rows_json(table_id, [{"user": "u2", "item": "i1", "timestamp": 2}])
  second = fp.compute(f"bq://{table_id}", bq_client=bq_client)
  assert second["entries"][0]["num_rows"] == first["entries"][0]["num_rows"] + 1
  assert second["digest"] != first["digest"]


# ---------------------------------------------------------------------------
# (2) The compiled pipeline: the fingerprint is never cached and keys preprocess
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["local", "vertex"])
def test_fingerprint_task_is_uncached_and_feeds_preprocess(tmp_path, target):
  import yaml  # pylint: disable=g-import-not-at-top
  from pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  from pipelines import dag  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("ml100k_smoke")
  out = tmp_path / "ir.yaml"
  dag.compile_pipeline(dag.build_pipeline(target, enable_caching=True), str(out),
                       config_lib.pipeline_parameters(config, data_uri="gs://b/ml-100k",
                                                      store_uri="duckdb:///m.duckdb"))
  ir = yaml.safe_load(out.read_text())
  top = ir["root"]["dag"]["tasks"]
  assert not top["fingerprint"].get("cachingOptions", {}).get("enableCache", False)
  assert top["fingerprint"]["inputs"]["parameters"]["input_uri"] == {
      "componentInputParameter": "data_uri"}
  prep = top["preprocess"]
  assert prep["cachingOptions"]["enableCache"] is True   # unchanged data may still hit
  assert prep["inputs"]["parameters"]["fingerprint"]["taskOutputParameter"] == {
      "outputParameterKey": "Output", "producerTask": "fingerprint"}
  assert prep["inputs"]["parameters"]["timestamp_unit"] == {
      "componentInputParameter": "timestamp_unit"}
  assert ir["root"]["inputDefinitions"]["parameters"]["timestamp_unit"]["defaultValue"] == "auto"
  # Every cached step downstream depends on preprocess's outputs, so on the fingerprint.
  assert top["train"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"][
      "producerTask"] == "preprocess"
  for name in ("write-metrics", "validate"):
    assert top[name]["inputs"]["parameters"]["dataset_id"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "preprocess"}
  fingerprint_exec = ir["deploymentSpec"]["executors"]["exec-fingerprint"]["container"]
  assert fingerprint_exec["image"].startswith("recml-preprocess:")


# ---------------------------------------------------------------------------
# (3) The gate: champions per dataset identity; a tie is not redeployed
# ---------------------------------------------------------------------------
def _evaluated(uri, run_id, ndcg, dataset_id, model_uri=None):
  write_metrics.run(uri, run_id, "recml", "sasrec", "ml-1m", {"valid": {"ndcg@10": ndcg}},
                    model_uri=model_uri or f"runs/{run_id}/model", dataset_id=dataset_id)


def test_gate_compares_runs_on_the_same_data_only_and_ties_are_not_blessed(tmp_path):
  data = tmp_path / "ml"
  _write(data / "u.data", "1\t10\t5\t100\n1\t11\t4\t101\n1\t12\t4\t102\n")
  params = dict(max_len=50, min_item_count=1)
  week1 = fp.dataset_identity(fp.compute(str(data))["digest"], **params)
  with open(data / "u.data", "a", encoding="utf-8") as f:
    f.write("2\t10\t3\t103\n2\t11\t3\t104\n2\t13\t3\t105\n")
  week2 = fp.dataset_identity(fp.compute(str(data))["digest"], **params)
  assert week1 != week2
  uri = f"duckdb:///{tmp_path}/metrics.duckdb"

  # Week 1: the first model on its data, blessed.
  _evaluated(uri, "w1", 0.30, week1)
  assert validate.run(uri, "w1", "ml-1m", "sasrec")["decision"] == "blessed"
  # Week 2, same "ml-1m" label, other data: 0.20 is not comparable with week 1's 0.30
  # (the old gate rejected it against w1). No champion on this data: blessed.
  _evaluated(uri, "w2", 0.20, week2)
  second = validate.run(uri, "w2", "ml-1m", "sasrec")
  assert (second["decision"], second["champion_run_id"]) == ("blessed", None)
  assert second["dataset_id"] == week2
  # The same week-2 model again (a cached retrain: the same model artifact): a tie.
  _evaluated(uri, "w2-again", 0.20, week2, model_uri="runs/w2/model")
  again = validate.run(uri, "w2-again", "ml-1m", "sasrec")
  assert (again["decision"], again["blessed"], again["champion_run_id"]) == ("tie", False, "w2")
  # A retrain that lands on exactly the champion's value: a tie (the old gate blessed it).
  _evaluated(uri, "w2-retrain", 0.20, week2)
  assert validate.run(uri, "w2-retrain", "ml-1m", "sasrec")["decision"] == "tie"
  # Only beating the champion on the same data deploys; worse is rejected.
  _evaluated(uri, "w2-better", 0.21, week2)
  _evaluated(uri, "w2-worse", 0.19, week2)
  assert validate.run(uri, "w2-better", "ml-1m", "sasrec")["decision"] == "blessed"
  assert validate.run(uri, "w2-worse", "ml-1m", "sasrec")["decision"] == "rejected"

  store = metrics_store.open_store(uri)
  assert store.champion(week1, "sasrec", "ndcg", 10).run_id == "w1"
  assert store.champion(week2, "sasrec", "ndcg", 10).run_id == "w2-better"
  decisions = {r.run_id: r.decision for r in store.runs()}
  assert decisions == {"w1": "blessed", "w2": "blessed", "w2-again": "tie",
                       "w2-retrain": "tie", "w2-better": "blessed", "w2-worse": "rejected"}
  # A run must not be gated on data other than its own.
  with pytest.raises(ValueError, match="was evaluated on dataset"):
    validate.run(uri, "w2-worse", "ml-1m", "sasrec", dataset_id=week1)


def test_deploy_runs_only_on_blessed(tmp_path):
  import yaml  # pylint: disable=g-import-not-at-top
  from pipelines import dag  # pylint: disable=g-import-not-at-top
  out = tmp_path / "ir.yaml"
  dag.compile_pipeline(dag.build_pipeline("local"), str(out))
  ir = yaml.safe_load(out.read_text())
  (condition,) = [t for t in ir["root"]["dag"]["tasks"].values()
                  if "triggerPolicy" in t]
  assert condition["triggerPolicy"]["condition"] == (
      "inputs.parameter_values['pipelinechannel--validate-Output'] == 'blessed'")
  assert set(ir["components"][condition["componentRef"]["name"]]["dag"]["tasks"]) == {
      "bless", "export", "deploy"}
  assert validate.TIE != dag.BLESSED and validate.REJECTED != dag.BLESSED


# ---------------------------------------------------------------------------
# (4) The metrics store: one row per key, whatever the writers
# ---------------------------------------------------------------------------
KEYS = [(split, metric, k) for split in ("valid", "test")
        for metric, k in (("hr", 10), ("ndcg", 10), ("hr", 50), ("ndcg", 50), ("mrr", None))]
ROUNDS = 4


def _value(writer, rnd, key_index):
  return writer * 1000 + rnd * 100 + key_index


def rows_of(writer, rnd):
  return [metrics_store.MetricRow(
      run_id="run-1", model="sasrec", dataset="ml-100k", split=split, metric=metric, k=k,
      value=float(_value(writer, rnd, i)), labels={"writer": writer, "round": rnd},
      dataset_id="ds-000000000000") for i, (split, metric, k) in enumerate(KEYS)]


PROCESS_WRITER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from tests.reliability import test_data_identity as t
from components import metrics_store
uri, writer, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = metrics_store.open_store(uri)
open(go + ".ready." + str(writer), "w").close()
while not os.path.exists(go):
  time.sleep(0.002)
for rnd in range(t.ROUNDS):
  store.write(t.rows_of(writer, rnd))
"""


def _check_one_row_per_key(rows, writers):
  """Exactly one row per key; every row whole from one write; all from the last write."""
  by_key = {}
  for r in rows:
    assert (r.split, r.metric, r.k) not in by_key, f"duplicate row for {r.key}"
    by_key[(r.split, r.metric, r.k)] = r
  assert set(by_key) == set(KEYS)     # the brute-force expected row set
  writes = {(r.labels["writer"], r.labels["round"]) for r in rows}
  assert len(writes) == 1, f"rows from several writes: {writes}"   # writes are atomic
  ((writer, rnd),) = writes
  assert writer in writers and 0 <= rnd < ROUNDS
  for i, key in enumerate(KEYS):
    assert by_key[key].value == _value(writer, rnd, i), key


def test_duckdb_threads_and_processes_write_one_row_per_key(tmp_path):
  import duckdb  # pylint: disable=g-import-not-at-top
  path = tmp_path / "store" / "metrics.duckdb"
  uri = f"duckdb:///{path}"
  go = tmp_path / "go"
  env = {**os.environ, "PYTHONPATH": REPO}
  procs = [subprocess.Popen([sys.executable, "-c", PROCESS_WRITER.format(repo=REPO), uri,
                             str(100 + p), str(go)], env=env) for p in range(4)]
  barrier = threading.Barrier(8)
  errors = []

  def thread_writer(writer):
    try:
      store = metrics_store.open_store(uri)
      barrier.wait()
      for rnd in range(ROUNDS):
        store.write(rows_of(writer, rnd))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=thread_writer, args=(w,)) for w in range(8)]
  deadline = time.monotonic() + 120
  while len(list(tmp_path.glob("go.ready.*"))) < len(procs):   # all imported and waiting
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.01)
  go.touch()
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
  assert not errors, errors
  _check_one_row_per_key(metrics_store.open_store(uri).rows(),
                         writers=set(range(8)) | {100, 101, 102, 103})
  # Read back with DuckDB directly: one row per (run_id, split, metric, k), 10 rows.
  con = duckdb.connect(str(path), read_only=True)
  counts = con.execute("SELECT run_id, split, metric, k, count(*) FROM metrics "
                       "GROUP BY ALL").fetchall()
  con.close()
  assert len(counts) == len(KEYS) and {c[-1] for c in counts} == {1}


def test_duckdb_key_is_enforced_and_old_files_are_migrated(tmp_path, capsys):
  import duckdb  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "old.duckdb")
  # A file written before dataset_id and the key existed, with the duplicates the old
  # MERGE let two concurrent writers make.
  con = duckdb.connect(path)
  con.execute("CREATE TABLE metrics (run_id VARCHAR NOT NULL, pipeline VARCHAR, "
              "model VARCHAR NOT NULL, dataset VARCHAR NOT NULL, split VARCHAR NOT NULL, "
              "metric VARCHAR NOT NULL, k BIGINT, value DOUBLE NOT NULL, "
              "created_at TIMESTAMP WITH TIME ZONE NOT NULL, model_uri VARCHAR, labels VARCHAR)")
  for value, ts in ((0.1, "2026-01-01"), (0.2, "2026-01-02"), (0.3, "2026-01-03")):
    con.execute("INSERT INTO metrics VALUES ('r1', 'p', 'sasrec', 'ml', 'valid', 'mrr', NULL, "
                f"{value}, TIMESTAMPTZ '{ts} 00:00:00+00', NULL, '{{}}')")
  con.execute("INSERT INTO metrics VALUES ('r1', 'p', 'sasrec', 'ml', 'valid', 'ndcg', 10, "
              "0.5, TIMESTAMPTZ '2026-01-01 00:00:00+00', NULL, '{}')")
  con.close()

  store = metrics_store.open_store(f"duckdb:///{path}")
  assert store.schema() == list(metrics_store.METRICS_SCHEMA)
  assert "removed 2 row(s) duplicating" in capsys.readouterr().err
  got = {r.name: (r.value, r.dataset_id) for r in store.rows("r1")}
  assert got == {"mrr": (0.3, None), "ndcg@10": (0.5, None)}   # the newest of each key
  # A writer outside the store's code cannot duplicate a key any more (NULL k included).
  con = duckdb.connect(path)
  with pytest.raises(duckdb.ConstraintException):
    con.execute("INSERT INTO metrics VALUES ('r1', 'p', 'sasrec', 'ml', 'valid', 'mrr', NULL, "
                "0.9, now(), NULL, '{}', NULL)")
  con.close()


@pytest.mark.integration
def test_bigquery_merge_is_the_key_under_concurrent_writers(bq_client):
  import uuid  # pylint: disable=g-import-not-at-top
  table = f"metrics_{uuid.uuid4().hex[:12]}"
  uri = f"bq://test.recml_test.{table}"
  store = metrics_store.open_store(uri, client=bq_client, retry_deadline_s=15)
  store.ensure_table()
  errors = []

  def writer(w):
    try:
      for rnd in range(2):
        store.write(rows_of(w, rnd))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert not errors, errors
  _check_one_row_per_key(store.rows(), writers=set(range(4)))
  # What reached the emulator is exactly the keyed MERGE (the emulator keeps the jobs).
  expected = store.sql(metrics_store.MERGE_SQL)
  assert "ON T.run_id = S.run_id AND T.split = S.split AND T.metric = S.metric AND " \
      "(T.k = S.k OR (T.k IS NULL AND S.k IS NULL))" in expected
  merges = [j.query for j in bq_client.list_jobs(max_results=500)
            if getattr(j, "query", None) and table in j.query and j.query.startswith("MERGE")]
  assert len(merges) >= 8 and set(merges) == {expected}


# ---------------------------------------------------------------------------
# (5) Scheduled-style local runs over data that changes between them
# ---------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.skipif(not os.path.isdir(ML100K), reason="needs ../shared/datasets/ml-100k")
def test_scheduled_runs_retrain_on_new_data_and_ties_are_not_redeployed(tmp_path, monkeypatch):
  from pipelines import cli  # pylint: disable=g-import-not-at-top
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  from serving import registry as registry_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("RECML_STORE_URI", raising=False)
  monkeypatch.delenv("RECML_PIPELINE_ROOT", raising=False)
  monkeypatch.delenv("RECML_REGISTRY", raising=False)
  data, root = tmp_path / "ml-100k", tmp_path / "runs"
  data.mkdir()
  shutil.copyfile(os.path.join(ML100K, "u.data"), data / "u.data")
  lines = (data / "u.data").read_text().splitlines(keepends=True)

  def run(run_id):
    assert cli.main(["run", "--config", "ml100k_smoke", "--data", str(data),
                     "--pipeline-root", str(root), "--run-id", run_id,
                     "--set", "train.epochs=1"]) == 0
    steps = {s["step"]: s for s in local_lib.lineage(str(root / run_id))["steps"]}
    meta = steps["preprocess"]["outputs"]["dataset"]["metadata"]
    gate = steps["validate"]["outputs"]["verdict"]["metadata"]
    return steps, meta, gate

  def versions():
    return sorted(os.listdir(root / "registry" / "models"))

  steps1, meta1, gate1 = run("week-1")
  assert gate1["decision"] == "blessed" and versions() == ["0001"]
  assert meta1["num_users"] == len({line.split("\t")[0] for line in lines}) == 943

  # New data behind the same URI: every 10th user's rows are gone.
  kept = [line for line in lines if int(line.split("\t")[0]) % 10 != 0]
  (data / "u.data").write_text("".join(kept))
  steps2, meta2, gate2 = run("week-2")
  assert meta2["num_users"] == len({line.split("\t")[0] for line in kept}) == 943 - 94
  assert meta2["rows/rows_read"] == len(kept) != meta1["rows/rows_read"]
  assert meta2["dataset_id"] != meta1["dataset_id"]
  assert steps2["fingerprint"]["values"]["Output"] != steps1["fingerprint"]["values"]["Output"]
  # Same "ml-100k" label, other data: no champion on it, so blessed and deployed.
  assert gate2["decision"] == "blessed" and "champion_run_id" not in gate2
  assert gate2["dataset_id"] == meta2["dataset_id"]
  assert versions() == ["0001", "0002"]
  assert registry_lib.current(str(root / "registry"))["labels"]["dataset_id"] == meta2["dataset_id"]

  # Unchanged data: the same identity, a model that ties week 2's: not redeployed.
  steps3, meta3, gate3 = run("week-3")
  assert meta3["dataset_id"] == meta2["dataset_id"]
  assert gate3["decision"] == "tie" and gate3["champion_run_id"] == "week-2", gate3
  assert steps3["deploy"]["status"] == "skipped"
  assert versions() == ["0001", "0002"]
  assert registry_lib.current(str(root / "registry"))["run_id"] == "week-2"
