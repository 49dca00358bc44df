"""Golden test of the preprocessing step on a hand-written MovieLens-style file.

Item counts: "10" x5, "20" x3, "30" x3, "40"/"50"/"60" x1. With --min-item-count 2
the vocabulary is <pad>, <oov>, 10, 30, 20 ("30" before "20": equal counts are
ordered by raw bytes, descending) and 40/50/60 map to OOV (1). Users by event
count: "1" (6 events) -> 0, then "4" and "2" (3 each; "4" first) -> 1, 2, and
"3" (2) -> 3, which has too few events and is dropped. Lines 6, 11, 13 and 17
are malformed; line 9 is blank.
"""

import json
import subprocess
import sys

import pytest

from components.preprocess import BadInputError, run
from preprocess_testlib import REPO, read_split, tree_digest
from trainers import features

LINES = [
    b"1::10::5::100",
    b"2::20::5::50",
    b"1::20::5::300",
    b"3::30::5::10",
    b"1::30::5::200",
    b"4::20::5",              # 6: wrong field count
    b"1::40::5::200",         # same timestamp as "30": input order decides
    b"2::30::5::60",
    b"",                      # 9: blank
    b"4::10::5::1",
    b"5::10::5::abc",         # 11: non-numeric timestamp
    b"1::10::5::400",
    b"4::::5::7",             # 13: empty item id
    b"3::50::5::20",
    b"4::20::5::2",
    b"2::10::5::70",
    b"6::caf\xe9::5::9",      # 17: latin-1, not utf-8
    b"4::10::5::3",
    b"1::60::5::50",
]

EXPECTED = {
    "train": [
        {"user_id": [0], "item_ids": [2, 3, 1], "timestamps": [100, 200, 200]},
    ],
    "valid": [
        {"user_id": [0], "item_ids": [3, 1], "timestamps": [200, 200],
         "target_item": [4], "target_timestamp": [300], "seen_items": [1, 2, 3]},
        {"user_id": [1], "item_ids": [2], "timestamps": [1],
         "target_item": [4], "target_timestamp": [2], "seen_items": [2]},
        {"user_id": [2], "item_ids": [4], "timestamps": [50],
         "target_item": [3], "target_timestamp": [60], "seen_items": [4]},
    ],
    "test": [
        {"user_id": [0], "item_ids": [1, 4], "timestamps": [200, 300],
         "target_item": [2], "target_timestamp": [400], "seen_items": [1, 2, 3, 4]},
        {"user_id": [1], "item_ids": [2, 4], "timestamps": [1, 2],
         "target_item": [2], "target_timestamp": [3], "seen_items": [2, 4]},
        {"user_id": [2], "item_ids": [4, 3], "timestamps": [50, 60],
         "target_item": [2], "target_timestamp": [70], "seen_items": [3, 4]},
    ],
}

COUNTS = {
    "rows_read": 18, "rows_quarantined": 4, "rows_kept": 14, "blank_lines": 1,
    "header_lines": 0, "events_parsed": 14, "events_oov": 3, "users": 3,
    "users_too_few_events": 1, "events_dropped_short_users": 2, "events_kept": 12,
    "events_beyond_max_len": 1, "users_without_train": 2,
}


@pytest.fixture(scope="module")
def golden_input(tmp_path_factory):
  folder = tmp_path_factory.mktemp("ml-golden")
  (folder / "ratings.dat").write_bytes(b"\n".join(LINES) + b"\n")
  return folder


@pytest.fixture(scope="module")
def golden(golden_input, tmp_path_factory):
  out = tmp_path_factory.mktemp("golden_out")
  result = run(str(golden_input), str(out), max_len=2, min_item_count=2,
               bad_rows_threshold=0.25)
  return golden_input, out, result


def test_exact_examples(golden):
  _, out, _ = golden
  for split, examples in EXPECTED.items():
    assert read_split(out, split) == examples, split


def test_vocabularies_and_oov(golden):
  _, out, _ = golden
  assert features.load_item_vocab(str(out)) == ["<pad>", "<oov>", "10", "30", "20"]
  with open(out / "transform_fn" / "assets" / "user") as f:
    assert f.read().split() == ["1", "4", "2", "3"]


def test_counts_and_dataset_info(golden, golden_input):
  _, out, result = golden
  info = features.load_dataset_info(str(out))
  assert info.counts == COUNTS
  assert result.counts == COUNTS
  assert info.item_vocab_size == 5 and info.num_items == 3
  assert info.num_users == 3 and info.max_len == 2
  assert info.num_examples == {"train": 1, "valid": 3, "test": 3}
  assert info.source["format"] == "movielens"
  assert info.source["files"] == [str(golden_input / "ratings.dat")]
  assert info.params["min_item_count"] == 2 and info.params["num_shards"] == 1
  assert info.vocab_files["item"] == "vocab/items.txt"
  assert info.extra_vocab_sizes == {"user": 4}
  assert "| rows quarantined | 4 (22.22%) |" in result.markdown
  assert result.metrics()["examples_valid"] == 3.0


def test_quarantine_rows_with_reasons(golden, golden_input):
  _, out, _ = golden
  path = str(golden_input / "ratings.dat")
  with open(out / "quarantine" / "part-00000-of-00001.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert rows == [
      {"file": path, "line": 6, "raw": "4::20::5",
       "reason": "wrong field count: 3 fields, expected 4"},
      {"file": path, "line": 11, "raw": "5::10::5::abc", "reason": "non-numeric timestamp"},
      {"file": path, "line": 13, "raw": "4::::5::7", "reason": "empty item id"},
      {"file": path, "line": 17, "raw": "6::caf\\xe9::5::9",
       "reason": "unreadable encoding (not utf-8)"},
  ]


def test_transform_fn_maps_raw_ids_like_the_dataset(golden):
  """Serving applies the saved transform_fn: same ids, unknown items -> OOV."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
  _, out, _ = golden
  tf_output = tft.TFTransformOutput(str(out))
  raw = {"item": tf.constant(["10", "30", "20", "40", "never-seen"]),
         "user": tf.constant(["1", "4", "2", "3", "1"])}
  got = tf_output.transform_raw_features(raw, drop_unused_features=True)
  assert tf.reshape(got["item_id"], [-1]).numpy().tolist() == [2, 3, 4, 1, 1]
  assert tf.reshape(got["user_id"], [-1]).numpy().tolist() == [0, 1, 2, 3, 0]


def test_threshold_fails_with_file_and_first_bad_rows(golden_input, tmp_path):
  with pytest.raises(BadInputError) as e:
    run(str(golden_input), str(tmp_path), max_len=2, min_item_count=2)  # default 1%
  message = str(e.value)
  assert "4 of 18 rows (22.22%) are malformed, above --bad-rows-threshold 0.01" in message
  assert f"{golden_input / 'ratings.dat'}:6: wrong field count" in message
  assert ":17: unreadable encoding" in message
  assert "--bad-rows-threshold" in message
  # the rejected rows are kept for inspection in the run's work folder, named in
  # the message; nothing is published to the output
  work = tmp_path.parent / (tmp_path.name + ".partial")
  assert f"{work / 'quarantine'}/" in message
  assert (work / "quarantine" / "part-00000-of-00001.jsonl").exists()
  assert not (work / features.DATASET_INFO_FILE).exists()
  assert list(tmp_path.iterdir()) == []


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "pipelines.cli", "preprocess", *args],
                        cwd=REPO, capture_output=True, text=True, check=False)


def test_two_runs_write_identical_bytes(golden_input, tmp_path):
  """Two runs (separate processes, through the CLI) write the same bytes.

  (TensorFlow numbers graph functions per process, so reproducibility is per run
  of the step, which is one process.)
  """
  outs = [tmp_path / "a", tmp_path / "b"]
  flags = ["--max-len", "2", "--bad-rows-threshold", "0.5", "--num-shards", "3", "--json"]
  digests = []
  for out in outs:
    proc = _cli("--input", str(golden_input), "--output", str(out), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["counts"]["rows_quarantined"] == 4
    assert result["num_examples"] == {"train": 1, "valid": 3, "test": 3}
    digests.append(tree_digest(out))
  # The tf.transform graph names its tables after the output path: equal once the
  # path is swapped (same length, so no protobuf length changes); fingerprint.pb
  # hashes saved_model.pb and differs with it.
  same = {k for k in digests[0] if not k.startswith("transform_fn/")}
  assert {k: digests[0][k] for k in same} == {k: digests[1][k] for k in same}
  assert set(digests[0]) == set(digests[1])
  model_a = (outs[0] / "transform_fn" / "saved_model.pb").read_bytes()
  model_b = (outs[1] / "transform_fn" / "saved_model.pb").read_bytes()
  assert model_a == model_b.replace(str(outs[1]).encode(), str(outs[0]).encode())
  for name in ("variables/variables.index", "assets/item", "assets/user"):
    assert digests[0][f"transform_fn/{name}"] == digests[1][f"transform_fn/{name}"]
  assert sorted(p for p in digests[0] if p.startswith("train/")) == [
      features.shard_name("train", k, 3) for k in range(3)]
  # shard = user index mod 3, examples sorted by user within a shard
  assert [ex["user_id"][0] for ex in read_split(outs[0], "test")] == [0, 1, 2]


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
  proc = _cli("--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o"))
  assert proc.returncode == 2
  assert "does not exist: pass a file, a glob" in proc.stderr
