"""Readers, format detection, input errors, runner options and BigQuery, without pipelines."""

import gzip

import pytest

from components.preprocess import pipeline, sources, step
from components.preprocess.sources import ColumnMapping, InputError, SourceSpec


def _rows(path, spec, batch_rows=4):
  chunks = list(sources.read_file(str(path), 1, spec, batch_rows))
  cols = {"user": [], "item": [], "timestamp": [], "event_order": []}
  for c in chunks:
    if c.batch is not None:
      for name in cols:
        cols[name] += [v[0] for v in c.batch.column(name).to_pylist()]
  counts = step_sum([c.counts for c in chunks])
  bad = [r for c in chunks for r in c.bad_rows]
  return cols, bad, counts


def step_sum(dicts):
  return pipeline._sum_counts(dicts)  # pylint: disable=protected-access


def test_movielens_gzip_streaming_batches_and_order(tmp_path):
  path = tmp_path / "ratings.dat.gz"
  lines = [f"{u}::{i}::3::{1000 + i}" for u in (1, 2) for i in range(5)]
  path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
  cols, bad, counts = _rows(path, SourceSpec("movielens"), batch_rows=3)
  assert cols["user"] == [b"1"] * 5 + [b"2"] * 5
  assert cols["timestamp"] == [1000 + i for i in range(5)] * 2
  assert cols["event_order"] == [(1 << 40) + k for k in range(10)]
  assert not bad and counts == {"rows_read": 10, "rows_quarantined": 0,
                                "blank_lines": 0, "header_lines": 0}


def test_csv_header_detection_quotes_and_column_names(tmp_path):
  path = tmp_path / "events.csv"
  path.write_text('ts,visitor,"product_id",extra\n5,u1,"a,b",x\n6,u2,c,y\n7,u3,,z\n')
  cols, bad, counts = _rows(path, SourceSpec("csv", ColumnMapping(user="visitor")))
  assert cols["user"] == [b"u1", b"u2"] and cols["item"] == [b"a,b", b"c"]
  assert cols["timestamp"] == [5, 6]
  assert counts["header_lines"] == 1 and counts["rows_read"] == 3
  assert [(r["line"], r["reason"]) for r in bad] == [(4, "empty item id")]


def test_csv_without_header_uses_indices(tmp_path):
  path = tmp_path / "log.tsv"
  path.write_text("u1\ti1\tpv\t10\nu1\ti2\tbuy\n")
  cols, bad, _ = _rows(path, SourceSpec("csv", ColumnMapping(behavior=2)))
  assert cols["item"] == [b"i1"] and cols["timestamp"] == [10]
  assert bad[0]["reason"] == "wrong field count: 3 fields, expected 4"
  with pytest.raises(InputError, match="must be a 0-based column index"):
    _rows(path, SourceSpec("csv", ColumnMapping(user="user_name"), header=False))


def test_sequences_lines_expand_in_order(tmp_path):
  path = tmp_path / "Beauty.txt"
  path.write_text("7 3 1 2\n8\n9 4\n")
  cols, bad, counts = _rows(path, SourceSpec("sequences"))
  assert cols["user"] == [b"7", b"7", b"7", b"9"] and cols["item"] == [b"3", b"1", b"2", b"4"]
  assert cols["timestamp"] == [0, 0, 0, 0]
  assert [r["reason"] for r in bad] == ["no items after the user id"]
  assert counts["rows_read"] == 3


def test_format_detection_and_its_errors(tmp_path):
  assert sources.detect_format("gs://b/ml-1m/ratings.dat") == "movielens"
  assert sources.detect_format("x/ratings_users1-2999.dat.gz") == "movielens"
  assert sources.detect_format("ml-100k/u.data") == "ml-100k"
  assert sources.detect_format("ratings.csv") == "csv"
  assert sources.detect_format("a/part-0.parquet") == "parquet"
  with pytest.raises(InputError, match="pass --format with one of movielens"):
    sources.detect_format("data/ml-1m.txt")
  with pytest.raises(InputError, match="unknown --format 'xml'"):
    sources.resolve_format([("a.csv", 1)], "xml")


def test_input_errors_fail_at_once(tmp_path):
  with pytest.raises(InputError, match="does not exist"):
    step.run(str(tmp_path / "nope.dat"), str(tmp_path / "o"))
  with pytest.raises(InputError, match="matches no file"):
    step.run(str(tmp_path / "*.csv"), str(tmp_path / "o"))
  (tmp_path / "empty.csv").write_text("")
  with pytest.raises(InputError, match="is empty"):
    step.run(str(tmp_path / "empty.csv"), str(tmp_path / "o"))
  (tmp_path / "folder").mkdir()
  with pytest.raises(InputError, match="holds no MovieLens ratings file"):
    step.run(str(tmp_path / "folder"), str(tmp_path / "o"))
  with pytest.raises(InputError, match="--max-len must be >= 1"):
    step.run(str(tmp_path / "empty.csv"), str(tmp_path / "o"), max_len=0)


def test_header_only_file_fails_with_a_message(tmp_path):
  (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
  with pytest.raises(InputError, match="holds only blank or header lines"):
    step.run(str(tmp_path / "ratings.csv"), str(tmp_path / "o"))


def test_direct_and_dataflow_pipeline_options():
  assert pipeline.pipeline_flags() == [
      "--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
  flags = pipeline.pipeline_flags(
      "DataflowRunner", project="p", region="europe-west4", temp_location="gs://b/tmp",
      machine_type="n2-highmem-8", sdk_container_image="europe-docker.pkg.dev/p/r/pre:1",
      extra_args=["--max_num_workers=50"])
  assert flags == [
      "--runner=DataflowRunner", "--project=p", "--region=europe-west4",
      "--temp_location=gs://b/tmp", "--machine_type=n2-highmem-8",
      "--sdk_container_image=europe-docker.pkg.dev/p/r/pre:1", "--max_num_workers=50"]
  opts = pipeline.pipeline_options(
      "DataflowRunner", project="p", region="europe-west4", temp_location="gs://b/tmp",
      machine_type="n2-highmem-8", sdk_container_image="img:1").get_all_options(
          drop_default=True)
  assert opts == {"runner": "DataflowRunner", "project": "p", "region": "europe-west4",
                  "temp_location": "gs://b/tmp", "machine_type": "n2-highmem-8",
                  "sdk_container_image": "img:1"}
  with pytest.raises(ValueError, match="needs --project, --region, --temp-location"):
    pipeline.pipeline_flags("DataflowRunner")


def test_bigquery_read_transform_for_table_and_query():
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  read = sources.bigquery_read("bq://proj.events.ratings")
  assert isinstance(read, beam.io.ReadFromBigQuery)
  assert read.method == beam.io.ReadFromBigQuery.Method.DIRECT_READ
  assert read._kwargs["table"] == "proj:events.ratings"  # pylint: disable=protected-access
  query = "SELECT user_id, item_id, ts FROM `proj.events.ratings`"
  read = sources.bigquery_read(query, method="EXPORT", project="billing")
  assert read.method == beam.io.ReadFromBigQuery.Method.EXPORT
  assert read._kwargs["query"] == query and read._kwargs["use_standard_sql"]  # pylint: disable=protected-access
  assert read._kwargs["project"] == "billing"  # pylint: disable=protected-access
  assert sources.is_bigquery_ref(query) and sources.is_bigquery_ref("bq://a.b.c")
  with pytest.raises(InputError, match="project.dataset.table"):
    sources.table_spec("events.ratings")


def test_bigquery_rows_are_validated_like_files():
  rows = [{"user_id": 1, "item_id": "a", "ts": 10},
          {"user_id": 2, "item_id": "", "ts": 11},
          {"user_id": None, "item_id": "b", "ts": 12},
          {"user_id": 3, "item_id": "c", "ts": "soon"}]
  spec = SourceSpec("bigquery", ColumnMapping(timestamp="ts"))
  chunk = sources.records_to_batch(rows, spec, "bq://p.d.t")
  assert chunk.batch.num_rows == 1
  assert [v[0] for v in chunk.batch.column("user").to_pylist()] == [b"1"]
  assert [(r["line"], r["reason"]) for r in chunk.bad_rows] == [
      (None, "empty item id"), (None, "empty user id"), (None, "non-numeric timestamp")]
  assert chunk.counts == {"rows_read": 4, "rows_quarantined": 3}
