"""Every reader on real files from ../shared/datasets, checked against a reference.

The reference (``preprocess_testlib.check_against_reference``) recomputes the
vocabularies, user ordering and splits directly from the raw events.
"""

import csv
import gzip
import zipfile

import pytest

from components.preprocess import ColumnMapping, run
from preprocess_testlib import check_against_reference, read_split, shared, tree_digest
from trainers import features

pytestmark = pytest.mark.integration


def _split_lines(path, sep, cols=(0, 1, 3), skip_header=False):
  opener = gzip.open if str(path).endswith(".gz") else open
  users, items, stamps = [], [], []
  with opener(path, "rt", encoding="utf-8") as f:
    if skip_header:
      next(f)
    for line in f:
      p = line.rstrip("\n").split(sep)
      users.append(p[cols[0]])
      items.append(p[cols[1]])
      stamps.append(int(p[cols[2]]))
  return users, items, stamps


def test_ml1m_partial_dat_gz_folder(tmp_path):
  folder = shared("ml-1m-partial")
  result = run(str(folder), str(tmp_path))
  events = _split_lines(folder / "ratings_users1-2999.dat.gz", "::")
  info = check_against_reference(tmp_path, *events, max_len=200)
  assert info.source["format"] == "movielens"
  assert result.counts["rows_read"] == 487_650 and result.counts["rows_quarantined"] == 0
  assert info.num_users == 2999


def test_ml100k_u_data_and_official_zip(tmp_path):
  folder = shared("ml-100k")
  run(str(folder), str(tmp_path / "folder"), max_len=50)
  info = check_against_reference(tmp_path / "folder", *_split_lines(folder / "u.data", "\t"),
                                 max_len=50)
  assert info.num_users == 943 and info.num_items == 1682
  # the same data straight from an official-style zip (ml-100k/u.data member)
  archive = tmp_path / "ml-100k.zip"
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
    z.write(folder / "u.data", "ml-100k/u.data")
    z.write(folder / "u.item", "ml-100k/u.item")
  run(str(archive), str(tmp_path / "zip"), max_len=50)
  a, b = tree_digest(tmp_path / "folder"), tree_digest(tmp_path / "zip")
  for split in features.SPLITS:
    name = features.shard_name(split, 0, 1)
    assert a[name] == b[name]
  assert a["vocab/items.txt"] == b["vocab/items.txt"]


@pytest.fixture(scope="module")
def latest_small(tmp_path_factory):
  folder = shared("ml-latest-small")
  out = tmp_path_factory.mktemp("latest_csv")
  run(str(folder / "ratings.csv"), str(out), max_len=100)
  return folder, out


def test_ml_latest_small_ratings_csv(latest_small):
  folder, out = latest_small
  events = _split_lines(folder / "ratings.csv", ",", skip_header=True)
  info = check_against_reference(out, *events, max_len=100)
  assert info.counts["header_lines"] == 1 and info.counts["rows_read"] == 100_836
  assert info.source["format"] == "csv" and info.num_users == 610


def test_parquet_written_by_the_test_matches_csv(latest_small, tmp_path):
  """The same events as Parquet (int ids, timestamp[s] column) give the same shards."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  folder, csv_out = latest_small
  df = pd.read_csv(folder / "ratings.csv")
  df["timestamp"] = pd.to_datetime(df["timestamp"], unit="s")
  df = df.rename(columns={"userId": "uid", "movieId": "movie"})
  path = tmp_path / "events.parquet"
  df.to_parquet(path, row_group_size=30_000)
  out = tmp_path / "out"
  run(str(path), str(out), max_len=100, columns=ColumnMapping(user="uid", item="movie"))
  a, b = tree_digest(csv_out), tree_digest(out)
  for split in features.SPLITS:
    name = features.shard_name(split, 0, 1)
    assert a[name] == b[name], split
  assert a["vocab/items.txt"] == b["vocab/items.txt"]
  assert features.load_dataset_info(str(out)).source["format"] == "parquet"


def test_taobao_csv_without_header_with_side_columns(tmp_path):
  path = shared("taobao-sample") / "UserBehavior_head.csv"
  columns = ColumnMapping(user=0, item=1, category=2, behavior=3, timestamp=4)
  result = run(str(path), str(tmp_path), max_len=50, columns=columns)
  rows = list(csv.reader(open(path, encoding="utf-8")))
  info = check_against_reference(tmp_path, [r[0] for r in rows], [r[1] for r in rows],
                                 [int(r[4]) for r in rows], max_len=50)
  assert result.counts["rows_read"] == 84_475
  assert info.extra_vocab_sizes["category"] == len({r[2] for r in rows})
  assert info.extra_vocab_sizes["behavior"] == len({r[3] for r in rows})
  assert info.vocab_files["category"] == "transform_fn/assets/category"


def test_pairs_and_sequences_formats_agree(tmp_path):
  """SASRec-style pairs and S3Rec-style sequences of the same histories."""
  users, items, _ = _split_lines(shared("ml-100k") / "u.data", "\t")
  users, items = users[:5000], items[:5000]
  per_user = {}
  for u, i in zip(users, items):
    per_user.setdefault(u, []).append(i)
  pairs = tmp_path / "ml-100k.txt"
  pairs.write_text("".join(f"{u} {i}\n" for u in per_user for i in per_user[u]))
  seqs = tmp_path / "Beauty.txt"
  seqs.write_text("".join(f"{u} {' '.join(v)}\n" for u, v in per_user.items()))
  run(str(pairs), str(tmp_path / "p"), format="pairs", max_len=20)
  run(str(seqs), str(tmp_path / "s"), format="sequences", max_len=20)
  flat_users = [u for u in per_user for _ in per_user[u]]
  flat_items = [i for u in per_user for i in per_user[u]]
  check_against_reference(tmp_path / "p", flat_users, flat_items, [0] * len(flat_users),
                          max_len=20)
  a, b = tree_digest(tmp_path / "p"), tree_digest(tmp_path / "s")
  for split in features.SPLITS:
    assert a[features.shard_name(split, 0, 1)] == b[features.shard_name(split, 0, 1)]
  info = features.load_dataset_info(str(tmp_path / "s"))
  assert info.counts["rows_read"] == len(per_user)          # lines
  assert info.counts["events_parsed"] == len(flat_items)    # events
  assert all(t == 0 for ex in read_split(tmp_path / "p", "test") for t in ex["timestamps"])


def test_output_trains_with_the_trainer(tmp_path):
  """The trainer consumes this output unchanged (a few steps of SASRec)."""
  import math  # pylint: disable=g-import-not-at-top
  from trainers import configs, train  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  run(str(shared("ml-100k")), str(data), max_len=20)
  cfg = configs.get_config("sasrec", smoke=True, data_dir=str(data), epochs=1,
                           max_steps_per_epoch=3)
  summary = train.train_and_evaluate(cfg, str(tmp_path / "work"))
  assert summary["steps"] == 3
  assert math.isfinite(summary["valid"]["mrr"]) and math.isfinite(summary["test"]["mrr"])
