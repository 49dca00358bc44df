"""Ranking (CTR) preprocessing: readers, split rules, the Beam + tf.transform step, and
``trainers.ranking_features.transform_rows`` against what the step wrote.

References are computed here from the raw rows with numpy / collections (train-only
statistics, vocabularies in tf.transform's order), not with the code under test.
"""

import argparse
import collections
import json
import math
import os
import shutil

import numpy as np
import pytest

from components.preprocess import cli, ctr_sources, ctr_spec, ctr_step
from components.preprocess.sources import InputError, reason_kind
from preprocess_testlib import shared, vocab_order
from trainers import ranking_features as rf

CRITEO = ("criteo-sample", "train_head1000.tsv")


def read_split(data_dir, split: str) -> dict[str, np.ndarray]:
  """The decoded TFRecords of a split, in file order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  info = rf.load_info(str(data_dir))
  spec = rf.feature_spec(info)
  files = rf.split_files(str(data_dir), split)
  out = {k: [] for k in spec}
  for batch in tf.data.TFRecordDataset(files, "GZIP").batch(4096):
    parsed = tf.io.parse_example(batch, spec)
    for k in spec:
      out[k].append(parsed[k].numpy())
  return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def assert_transform_rows_match(data_dir, split: str, raw_rows: list[dict]):
  """transform_rows on the raw rows gives what the step wrote for them."""
  info = rf.load_info(str(data_dir))
  got = rf.transform_rows(raw_rows, info, rf.load_vocabs(str(data_dir), info))
  written = read_split(data_dir, split)
  assert len(written[rf.LABEL]) == len(raw_rows)
  for key, value in got.items():
    if value.dtype == np.float32:
      np.testing.assert_allclose(value, written[key], rtol=1e-6, atol=1e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(value, written[key], err_msg=key)
  assert set(got) == set(written) - {rf.LABEL}


def z_scores(values: list, train_mask: np.ndarray) -> tuple[np.ndarray, float, float]:
  """numpy reference of the dense transform: values (None = missing) -> z (0 if missing)."""
  x = np.array([np.nan if v is None else max(float(v), 0.0) for v in values])
  logs = np.log1p(x)
  present = ~np.isnan(logs)
  train = logs[train_mask & present]
  mean, std = train.mean(), train.std()
  z = np.where(present, (logs - mean) / (std if std > 0 else 1.0), 0.0)
  return z, mean, std


# ---------------------------------------------------------------------------
# Raw values and the contract (no pipeline)
# ---------------------------------------------------------------------------


def test_hash_bucket_values_are_pinned():
  # Serving hashes with this function; a change would silently remap every hashed id.
  assert rf.hash_bucket("68fd1e64", 1000) == 209
  assert rf.hash_bucket("<missing>", 7) == 0
  assert rf.hash_bucket("x", 7) == 2
  assert rf.hash_bucket("é", 1 << 20) == 989899
  assert rf.hash_bucket("162", 1 << 40) == 157408637751
  ids = [rf.hash_bucket(str(i), 10) for i in range(10_000)]
  assert min(ids) == 0 and max(ids) == 9
  assert max(np.bincount(ids)) < 1100    # roughly uniform


def test_raw_value_parsers():
  assert rf.parse_dense("3") == 3.0 and rf.parse_dense(" -2.5 ") == -2.5
  assert rf.parse_dense(7) == 7.0 and rf.parse_dense(np.float32(1.5)) == 1.5
  for missing in ("", "  ", None, "nan", float("nan")):
    assert rf.parse_dense(missing) is None
  for bad, why in (("abc", "non-numeric"), ("1_000", "non-numeric"), (True, "non-numeric"),
                   ([1], "non-numeric"), ("inf", "non-finite"), (-math.inf, "non-finite")):
    with pytest.raises(ValueError, match=why):
      rf.parse_dense(bad)
  assert [rf.parse_label(v) for v in ("1", "0", "1.0", 0, 1.0)] == [1.0, 0.0, 1.0, 0.0, 1.0]
  for bad in ("2", "", "yes", None, True, -1):
    with pytest.raises(ValueError, match="bad label"):
      rf.parse_label(bad)
  assert rf.categorical_token(" a ") == "a" and rf.categorical_token(162) == "162"
  assert rf.categorical_token("") == rf.categorical_token(None) == rf.MISSING
  for bad in (1.5, True, ["a"]):
    with pytest.raises(ValueError, match="text or an integer"):
      rf.categorical_token(bad)
  assert rf.multi_hot_tokens("a|b||c ") == ["a", "b", "c"]
  assert rf.multi_hot_tokens([1, "x", None, ""]) == ["1", "x"]
  assert rf.multi_hot_tokens(None) == [] and rf.multi_hot_tokens("a;b", ";") == ["a", "b"]


def _toy_info() -> rf.RankingInfo:
  return rf.RankingInfo(
      label="y", dense=[rf.DenseFeature("d", 1.0, 2.0), rf.DenseFeature("k", 0.5, 0.0)],
      categorical=[rf.CategoricalFeature("c", rf.VOCAB, 4, min_count=2),
                   rf.CategoricalFeature("h", rf.HASH, 9, buckets=7),
                   rf.CategoricalFeature("t", rf.VOCAB, 3, min_count=1, multi_hot=2)],
      counts={}, label_rate={}, quarantine={}, rows={}, source={}, params={})


def test_transform_rows_golden_and_errors():
  info = _toy_info()
  vocabs = {"c": {"a": 2, "b": 3}, "t": {"p": 2}}
  out = rf.transform_rows([{"d": "3", "k": 1, "c": "b", "h": "x", "t": "p|q|p"},
                           {"y": 1, "c": None, "t": ["q"]}, {}], info, vocabs)
  z = (np.float32(np.log1p(np.float32(3))) - np.float32(1)) / np.float32(2)
  k = np.float32(np.log1p(np.float32(1))) - np.float32(0.5)  # std 0: only centred
  np.testing.assert_allclose(out["dense"], [[z, k], [0, 0], [0, 0]], rtol=1e-6)
  np.testing.assert_array_equal(out["dense_missing"], [[0, 0], [1, 1], [1, 1]])
  hx, hm = 2 + rf.hash_bucket("x", 7), 2 + rf.hash_bucket(rf.MISSING, 7)
  np.testing.assert_array_equal(out["sparse"], [[3, hx], [1, hm], [1, hm]])
  np.testing.assert_array_equal(out["multi_hot/t"], [[2, 1], [1, 0], [0, 0]])
  for row, feature in (({"d": "abc"}, "'d'"), ({"k": True}, "'k'"), ({"c": [1]}, "'c'"),
                       ({"h": 2.5}, "'h'"), ({"t": {"a": 1}}, "'t'"), ({"d": "inf"}, "'d'"),
                       ({"zz": 1}, "unknown feature 'zz'")):
    with pytest.raises(ValueError, match=feature):
      rf.transform_rows([{}, row], info, vocabs)
  with pytest.raises(ValueError, match="row 1"):
    rf.transform_rows([{}, {"d": "x"}], info, vocabs)


def test_contract_loads_without_tensorflow(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (tmp_path / "dataset_info.json").write_text(_toy_info().to_json())
  (tmp_path / "vocab").mkdir()
  (tmp_path / "vocab" / "c.txt").write_text("<pad>\n<oov>\na\nb\n")
  (tmp_path / "vocab" / "t.txt").write_text("<pad>\n<oov>\np\n")
  code = ("import sys; from trainers import ranking_features as rf; "
          f"i = rf.load_info({str(tmp_path)!r}); v = rf.load_vocabs({str(tmp_path)!r}, i); "
          "print(rf.transform_rows([{'c': 'b'}], i, v)['sparse'].tolist(), "
          "'tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(rf.__file__)))
  hm = 2 + rf.hash_bucket(rf.MISSING, 7)
  assert out.stdout.split() == ["[[3,", f"{hm}]]", "False"]


def test_info_round_trip_and_task_check(tmp_path):
  from trainers import features  # pylint: disable=g-import-not-at-top
  info = _toy_info()
  info.save(str(tmp_path))
  assert rf.load_info(str(tmp_path)) == info
  assert rf.is_ranking(str(tmp_path))
  with pytest.raises(ValueError, match="ranking dataset, not a sequence dataset"):
    features.load_dataset_info(str(tmp_path))
  (tmp_path / "dataset_info.json").write_text(json.dumps({"item_vocab_size": 3}))
  with pytest.raises(ValueError, match="not a ranking dataset"):
    rf.load_info(str(tmp_path))


# ---------------------------------------------------------------------------
# Readers, column spec and split rules (no pipeline)
# ---------------------------------------------------------------------------


def _criteo_lines() -> list[str]:
  with open(shared(CRITEO[0]) / CRITEO[1], encoding="utf-8") as f:
    return f.read().split("\n")[:-1]


def _with_bad_rows(lines: list[str]) -> tuple[list[bytes], dict[int, str]]:
  """Criteo lines with bad rows injected; returns the file's lines and line -> reason kind."""
  good = lines[0].split("\t")
  bad = {
      3: ("\t".join(good[:39]), "wrong field count"),
      5: ("\t".join(good + ["x"]), "wrong field count"),
      8: ("\t".join(["2"] + good[1:]), "bad label"),
      13: ("\t".join([""] + good[1:]), "bad label"),
      21: ("\t".join(good[:3] + ["12a"] + good[4:]), "non-numeric dense value"),
      34: ("\t".join(good[:5] + ["inf"] + good[6:]), "non-finite dense value"),
      55: (None, "unreadable encoding (not utf-8)"),
  }
  out, kinds, it = [], {}, iter(lines)
  number = 0
  while True:
    number += 1
    if number in bad:
      text, kind = bad[number]
      out.append(b"\xff\xfe" + lines[0].encode()[2:] if text is None else text.encode())
      kinds[number] = kind
      continue
    if number == 89:
      out.append(b"")  # a blank line: counted, not a row
      continue
    line = next(it, None)
    if line is None:
      break
    out.append(line.encode())
  return out, kinds


def test_criteo_reader_quarantines_bad_rows_with_file_line_and_reason(tmp_path):
  lines = _criteo_lines()[:100]
  raw, kinds = _with_bad_rows(lines)
  path = tmp_path / "day_0.tsv"
  path.write_bytes(b"\n".join(raw) + b"\n")
  spec = ctr_spec.resolve_spec("criteo", None, label=None)
  pieces = list(ctr_sources.read_file(str(path), 0, spec, batch_rows=40))
  bad = [r for p in pieces for r in p.bad_rows]
  assert {r["line"]: reason_kind(r["reason"]) for r in bad} == kinds
  assert all(r["file"] == str(path) for r in bad)
  assert "I3 = '12a'" in next(r["reason"] for r in bad if r["line"] == 21)
  counts = collections.Counter()
  for p in pieces:
    counts.update(p.counts)
  assert counts == {"rows_read": 100 + len(kinds), "rows_quarantined": len(kinds),
                    "blank_lines": 1, "header_lines": 0}
  keys = np.concatenate([p.batch.column("row_key").flatten().to_numpy() for p in pieces])
  assert len(keys) == 100 and not set(keys) & set(kinds) and 89 not in keys
  first = pieces[0].batch.slice(0, 1).to_pydict()
  fields = lines[0].split("\t")
  assert first["label"] == [[float(fields[0])]]
  assert first["dense_index"] == [[i for i in range(13) if fields[1 + i]]]
  assert first["dense_value"] == [[float(v) for v in fields[1:14] if v]]
  assert first["cat/C22"] == [[(fields[35] or rf.MISSING).encode()]]


def test_parquet_and_bigquery_rows_read_like_text(tmp_path):
  import datetime  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pa.table({
      "y": pa.array([1, 0, 1, 3], pa.int64()),
      "price": pa.array([2.5, float("nan"), None, 1.0]),
      "user": pa.array([162, None, 7, 8], pa.int64()),
      "tags": pa.array([["a", "b"], [], None, ["c"]], pa.list_(pa.string())),
      "at": pa.array([datetime.datetime(2024, 1, 2)] * 4, pa.timestamp("s")),
  })
  path = tmp_path / "part.parquet"
  pq.write_table(table, path)
  names, _, _ = ctr_spec.column_names("parquet", str(path), None, None)
  spec = ctr_spec.resolve_spec("parquet", names, label="y", dense=["price"],
                               multi_hot=[("tags", 2)], time_column="at",
                               hash_buckets=["user=11"])
  ctr_spec.check_parquet_types(str(path), spec)
  (piece,) = ctr_sources.read_file(str(path), 2, spec)
  assert [(r["line"], reason_kind(r["reason"])) for r in piece.bad_rows] == [(4, "bad label")]
  got = piece.batch.to_pydict()
  assert got["label"] == [[1.0], [0.0], [1.0]]
  assert got["dense_index"] == [[0], [], []] and got["dense_value"] == [[2.5], [], []]
  assert got["hash/user"] == [[2 + rf.hash_bucket(v, 11)] for v in ("162", rf.MISSING, "7")]
  assert got["cat/tags"] == [[b"a", b"b"], [], []]
  assert got["row_key"] == [[(2 << 40) + i] for i in (1, 2, 3)]
  np.testing.assert_array_equal(piece.times, [1704153600.0] * 3)
  records = table.to_pylist()
  piece = ctr_sources.records_to_piece(records, spec)
  assert piece.batch.to_pydict()["hash/user"] == got["hash/user"]
  assert piece.counts == {"rows_read": 4, "rows_quarantined": 1}
  bad = pa.table({"y": [1], "f": [0.5]})
  pq.write_table(bad, tmp_path / "bad.parquet")
  with pytest.raises(InputError, match="categorical column 'f' is double"):
    ctr_spec.check_parquet_types(str(tmp_path / "bad.parquet"),
                                 ctr_spec.resolve_spec("parquet", ["y", "f"], label="y"))


def test_column_spec_defaults_and_errors():
  names = ["label", "user", "item", "price", "tags", "ts"]
  spec = ctr_spec.resolve_spec("csv", names, label="label", dense=["price"],
                                  multi_hot=[("tags", 3)], time_column="ts",
                                  hash_buckets=["item=50"], min_count=["5", "user=3"])
  assert spec.categorical == ("user", "item")          # every column without a role
  assert spec.hash_buckets == {"item": 50} and spec.min_count == {"user": 3, "tags": 5}
  assert spec.columns == ("label", "price", "user", "item", "tags", "ts")
  criteo = ctr_spec.resolve_spec("criteo", None, label=None, hash_buckets=["1000"],
                                    min_count=["C1=3"])
  assert criteo.min_count == {"C1": 3} and len(criteo.hash_buckets) == 25
  assert ctr_spec.resolve_spec("criteo", None, label=None).min_count["C7"] == 10
  for kwargs, message in (
      ({"label": None}, "--label"),
      ({"label": "label", "dense": ["nope"]}, "no column 'nope'"),
      ({"label": "label", "dense": ["user"], "categorical": ["user"]}, "named twice"),
      ({"label": "label", "hash_buckets": ["user=5"], "min_count": ["user=2"]}, "both"),
      ({"label": "label", "hash_buckets": ["price=5"], "dense": ["price"]},
       "not a categorical"),
      ({"label": "label", "hash_buckets": ["0"]}, "N >= 1"),
  ):
    with pytest.raises(InputError, match=message):
      ctr_spec.resolve_spec("csv", names, **kwargs)
  with pytest.raises(InputError, match="--categorical"):
    ctr_spec.resolve_spec("bigquery", None, label="label")
  with pytest.raises(InputError, match="COLUMN:SIZE"):
    ctr_spec.parse_multi_hot(["tags"])
  with pytest.raises(InputError, match="sum to 1"):
    ctr_spec.parse_ratios("0.8,0.1,0.2")


def test_pre_split_file_names():
  assert [ctr_spec.split_of_name(p) for p in (
      "a/train.csv", "valid_01.parquet", "b/VAL.tsv.gz", "dev-2.csv", "test.txt",
      "trainer.csv", "testing.csv", "day_0.tsv")] == [
          "train", "valid", "valid", "valid", "test", None, None, None]
  assert ctr_spec.assign_file_splits(["d/train.txt"], "auto") == ("random", {})
  kind, splits = ctr_spec.assign_file_splits(["train.csv", "valid.csv", "test.csv"], "auto")
  assert kind == "files" and splits["valid.csv"] == "valid"
  with pytest.raises(InputError, match="no valid file"):
    ctr_spec.assign_file_splits(["train.csv", "test.csv"], "auto")
  with pytest.raises(InputError, match="notes.csv names no split"):
    ctr_spec.assign_file_splits(["train.csv", "valid.csv", "test.csv", "notes.csv"],
                                   "auto")


def test_random_split_is_seeded_and_follows_ratios():
  keys = np.arange(200_000) + (3 << ctr_sources.ROW_FILE_SHIFT)
  codes = ctr_sources.random_splits(keys, (0.7, 0.2, 0.1), seed=1)
  np.testing.assert_allclose(np.bincount(codes) / len(keys), [0.7, 0.2, 0.1], atol=0.005)
  np.testing.assert_array_equal(codes, ctr_sources.random_splits(keys, (0.7, 0.2, 0.1), 1))
  assert (codes != ctr_sources.random_splits(keys, (0.7, 0.2, 0.1), 2)).mean() > 0.3


def test_time_cutoffs_against_sorted_reference():
  rng = np.random.default_rng(0)
  for n in (10, 997, 5000):
    times = rng.integers(0, n // 3 + 2, n).astype(float)   # many ties
    distinct, counts = np.unique(times, return_counts=True)
    cut = ctr_sources.time_cutoffs(distinct, counts, (0.8, 0.1, 0.1))
    ordered = np.sort(times)
    assert cut == (ordered[math.ceil(0.8 * n) - 1], ordered[math.ceil(0.9 * n) - 1])
    codes = ctr_sources.time_splits(times, cut)
    assert times[codes == 0].max() < times[codes > 0].min()   # no tie straddles a cut
    assert (codes == 0).sum() >= 0.8 * n


def test_cli_picks_the_task():
  parser = argparse.ArgumentParser()
  cli.register(parser.add_subparsers())

  def task(*argv):
    return cli.resolve_task(parser.parse_args(["preprocess", "--output", "x", *argv]))

  assert task("--input", str(shared(CRITEO[0]) / CRITEO[1])) == "ranking"
  assert task("--input", str(shared("ml-100k"))) == "sequence"
  assert task("--input", "a.csv", "--label", "y") == "ranking"
  assert task("--input", "a.csv", "--format", "criteo") == "ranking"
  assert task("--input", "a.csv", "--task", "sequence", "--label", "y") == "sequence"


# ---------------------------------------------------------------------------
# The step, end to end
# ---------------------------------------------------------------------------

# time, label, d1, d2, cat, hcat, tags: train = the 6 earliest rows, valid the next 2.
GOLDEN = [
    (3, "1", "3", "2.5", "b", "x", ""),
    (9, "1", "5", "3", "", "x", "q|q|q|q"),
    (1, "1", "0", "-5", "a", "x", "p|q|r|s"),
    (7, "0", "100", "1", "c", "x", "p|zz"),
    (2, "0", "1", "", "a", "y", "q"),
    (5, "0", "7", "10", "b", "x", "q|t"),
    (10, "0", "0", "0", " a ", "y", "r"),
    (4, "0", "", "nan", "a", "z", "p|q"),
    (6, "1", "-2", "0", "c", "", "p"),
    (8, "1", "", "", "new", "w", ""),
]


def test_golden_rows_time_split(tmp_path):
  path = tmp_path / "clicks.csv"
  path.write_text("when,clicked,d1,d2,cat,hcat,tags\n" +
                  "".join(",".join(map(str, r)) + "\n" for r in GOLDEN))
  out = tmp_path / "out"
  result = ctr_step.run(str(path), str(out), label="clicked", dense="d1,d2",
                        categorical=["cat", "hcat"], multi_hot=["tags:3"],
                        hash_buckets=["hcat=7"], time_column="when",
                        split_ratios="0.6,0.2,0.2")
  info = rf.load_info(str(out))
  assert info == result.info
  assert info.counts == {"train": 6, "valid": 2, "test": 2}
  assert info.label_rate == {"train": 0.5, "valid": 0.5, "test": 0.5}
  assert info.rows["rows_read"] == 10 and info.rows["header_lines"] == 1
  assert info.params["split"] == {"kind": "time", "ratios": [0.6, 0.2, 0.2]}
  assert [f.to_dict() for f in info.categorical] == [
      {"name": "cat", "kind": "vocab", "vocab_size": 4, "min_count": 2, "multi_hot": 0,
       "vocab_file": "vocab/cat.txt"},
      {"name": "hcat", "kind": "hash", "vocab_size": 9, "buckets": 7, "multi_hot": 0},
      {"name": "tags", "kind": "vocab", "vocab_size": 4, "min_count": 2, "multi_hot": 3,
       "vocab_file": "vocab/tags.txt"}]
  # train counts: cat a:3 b:2 c:1 -> [a, b]; tags q:4 p:3 r, s, t: 1 -> [q, p]
  assert rf.read_vocab_file(str(out / "vocab" / "cat.txt")) == ["<pad>", "<oov>", "a", "b"]
  assert rf.read_vocab_file(str(out / "vocab" / "tags.txt")) == ["<pad>", "<oov>", "q", "p"]

  rows = GOLDEN                                # file order: the order within a split
  code = np.array([0 if r[0] <= 6 else 1 if r[0] <= 8 else 2 for r in rows])
  d1, m1, s1 = z_scores([r[2] or None for r in rows], code == 0)
  d2, m2, s2 = z_scores([None if r[3] in ("", "nan") else r[3] for r in rows], code == 0)
  np.testing.assert_allclose([(f.mean, f.std) for f in info.dense], [(m1, s1), (m2, s2)],
                             rtol=1e-6)
  h = lambda v: 2 + rf.hash_bucket(v or rf.MISSING, 7)
  sparse = np.array([[{"a": 2, "b": 3}.get(r[4].strip(), 1), h(r[5])] for r in rows])
  tags_by_time = {1: [3, 2, 1], 2: [2, 0, 0], 3: [0, 0, 0], 4: [3, 2, 0], 5: [2, 1, 0],
                  6: [3, 0, 0], 7: [3, 1, 0], 8: [0, 0, 0], 9: [2, 2, 2], 10: [1, 0, 0]}
  tags = np.array([tags_by_time[r[0]] for r in rows])
  missing = np.array([[r[2] == "", r[3] in ("", "nan")] for r in rows])
  for i, split in enumerate(rf.SPLITS):
    sel = code == i
    got = read_split(out, split)
    np.testing.assert_array_equal(got["label"], [float(r[1]) for r, c in zip(rows, sel) if c])
    np.testing.assert_allclose(got["dense"], np.stack([d1, d2], 1)[sel], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(got["dense_missing"], missing[sel])
    np.testing.assert_array_equal(got["sparse"], sparse[sel])
    np.testing.assert_array_equal(got["multi_hot/tags"], tags[sel])
    raw = [{"d1": r[2], "d2": r[3], "cat": r[4], "hcat": r[5], "tags": r[6]}
           for r, c in zip(rows, sel) if c]
    assert_transform_rows_match(out, split, raw)


def test_criteo_sample_end_to_end_through_the_cli(tmp_path, capsys):
  lines = _criteo_lines()
  raw, kinds = _with_bad_rows(lines)
  data = tmp_path / "criteo.tsv"
  data.write_bytes(b"\n".join(raw) + b"\n")
  out = tmp_path / "out"
  parser = argparse.ArgumentParser()
  cli.register(parser.add_subparsers())
  args = parser.parse_args(["preprocess", "--input", str(data), "--output", str(out),
                            # vocabularies for three features (each costs ~1 s of
                            # tf.transform graph on a 1,000-row file), the rest hashed
                            "--hash-buckets", "1000", "--hash-buckets", "C3=500",
                            "--min-count", "C1=10,C9=10,C22=10", "--split-seed", "3",
                            "--num-shards", "2", "--json"])
  assert args.func(args) == 0
  assert '"task": "ranking"' in capsys.readouterr().out
  info = rf.load_info(str(out))
  assert info.quarantine == dict(collections.Counter(kinds.values()))
  quarantined = [json.loads(line) for f in sorted((out / "quarantine").iterdir())
                 for line in f.read_text().splitlines()]
  assert sorted(r["line"] for r in quarantined) == sorted(kinds)
  assert info.rows == {"rows_read": 1000 + len(kinds), "rows_quarantined": len(kinds),
                       "rows_kept": 1000, "blank_lines": 1, "header_lines": 0}

  # The good rows, their line numbers, and the split the seeded rule gives them.
  numbers = [n for n, line in enumerate(raw, 1) if line and n not in kinds]
  codes = ctr_sources.random_splits(np.array(numbers), (0.8, 0.1, 0.1), seed=3)
  fields = [line.split("\t") for line in lines]
  assert info.counts == {s: int((codes == i).sum()) for i, s in enumerate(rf.SPLITS)}
  labels = np.array([int(f[0]) for f in fields])
  assert sum(labels) == 205
  for i, s in enumerate(rf.SPLITS):
    assert info.label_rate[s] == pytest.approx(labels[codes == i].mean())

  train = codes == 0
  for j, feature in enumerate(info.dense):
    _, mean, std = z_scores([f[1 + j] or None for f in fields], train)
    assert (feature.mean, feature.std) == pytest.approx((mean, std), rel=1e-6)
  for j, feature in enumerate(info.categorical):
    if feature.kind == rf.HASH:
      assert feature.buckets == (500 if feature.name == "C3" else 1000)
      continue
    assert feature.name in ("C1", "C9", "C22")
    counts = collections.Counter(f[14 + j] or rf.MISSING for f, t in zip(fields, train) if t)
    admitted = vocab_order([v for v, c in counts.items() for _ in range(c) if c >= 10])
    assert rf.read_vocab_file(str(out / rf.vocab_file(feature.name)))[2:] == admitted
  # Shards are read in order, rows in a shard by key (= line number here).
  shards = ctr_sources.mix64(np.array(numbers)) % np.uint64(2)
  assert 0.4 < shards.mean() < 0.6
  for i, split in enumerate(rf.SPLITS):
    order = [j for j in np.lexsort((numbers, shards)) if codes[j] == i]
    rows = [dict(zip(ctr_spec.CRITEO_DENSE + ctr_spec.CRITEO_CATEGORICAL, fields[j][1:]))
            for j in order]
    assert_transform_rows_match(out, split, rows)


def _frappe_copy(folder, rows: int | None):
  src = shared("frappe_x1")
  if rows is None:
    return src
  folder.mkdir()
  for name in ("train.csv", "valid.csv", "test.csv"):
    with open(src / name, "rb") as f:
      (folder / name).write_bytes(b"".join(f.readline() for _ in range(rows + 1)))
  return folder


def _check_frappe(data, out, result):
  """Counts, label rates, vocabularies and ids against a direct reading of the CSVs."""
  import csv  # pylint: disable=g-import-not-at-top
  splits = {}
  for split in rf.SPLITS:
    with open(data / f"{split}.csv", newline="", encoding="utf-8") as f:
      splits[split] = list(csv.DictReader(f))
  info = result.info
  assert info.counts == {s: len(r) for s, r in splits.items()}
  for s, r in splits.items():
    assert info.label_rate[s] == pytest.approx(np.mean([int(x["label"]) for x in r]))
  names = [f.name for f in info.categorical]
  assert names == ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost",
                   "weather", "country", "city"] and not info.dense
  vocabs = {}
  for f in info.categorical:
    values = [r[f.name] for r in splits["train"]]
    counts = collections.Counter(values)
    vocabs[f.name] = vocab_order([v for v in values if counts[v] >= 2])
    assert f.vocab_size == 2 + len(vocabs[f.name]), f.name
  index = {n: {v: i + 2 for i, v in enumerate(t)} for n, t in vocabs.items()}
  written = read_split(out, "valid")
  expected = [[index[n].get(r[n], 1) for n in names] for r in splits["valid"]]
  np.testing.assert_array_equal(written["sparse"], expected)
  return splits


def test_frappe_head_pre_split(tmp_path):
  from components import fingerprint  # pylint: disable=g-import-not-at-top
  from components.preprocess import component  # pylint: disable=g-import-not-at-top
  from components.preprocess import step  # pylint: disable=g-import-not-at-top
  data = _frappe_copy(tmp_path / "frappe", 2000)
  out = tmp_path / "out"
  result = step.run(str(data), str(out), task="ranking", ranking={"label": "label"})
  splits = _check_frappe(data, out, result)
  assert result.info.params["split"] == {"kind": "files"}
  assert_transform_rows_match(out, "test", [{k: v for k, v in r.items() if k != "label"}
                                            for r in splits["test"]])
  # The KFP wrapper's pieces: the folder's fingerprint, the identity, the metadata.
  digest = fingerprint.compute(str(data))["digest"]
  ident = fingerprint.ranking_dataset_identity(digest, ctr_step.identity_params(result.info))
  other = dict(ctr_step.identity_params(result.info), min_count={"user": 3})
  assert fingerprint.ranking_dataset_identity(digest, other) != ident
  component.record_identity(str(out), digest, ident)
  assert rf.load_info(str(out)).source["dataset_id"] == ident
  meta = component.dataset_metadata(str(out))
  assert meta["dataset_id"] == ident and meta["examples/train"] == 2000
  assert meta["vocab_size/user"] == result.info.feature("user").vocab_size


def test_bad_rows_above_threshold_publish_nothing(tmp_path):
  data = tmp_path / "rows.csv"
  data.write_text("label,c\n" + "1,a\n0,b\n" * 8 + "1,a,extra\n2,b\n0\n")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  with pytest.raises(Exception, match=r"3 of 19 rows \(15.79%\) are malformed") as e:
    ctr_step.run(str(data), str(out), label="label", bad_rows_threshold=0.1)
  assert type(e.value).__name__ == "BadInputError"
  assert sorted(os.listdir(out)) == ["keep.txt"]
  assert (tmp_path / "out.partial" / "quarantine").is_dir()


@pytest.mark.integration
def test_frappe_full_data(tmp_path):
  data = _frappe_copy(tmp_path, None)
  out = tmp_path / "out"
  result = ctr_step.run(str(data), str(out), label="label")
  assert result.info.counts == {"train": 202_027, "valid": 57_722, "test": 28_860}
  assert all(0.32 < r < 0.34 for r in result.info.label_rate.values())
  _check_frappe(data, out, result)
  shutil.rmtree(out)
