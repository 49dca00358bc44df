"""The dataset contract: split protocol, serialization, dataset_info, input pipeline."""

import json

import numpy as np
import pytest

from trainers import features
from trainers.input_pipeline import SequenceData


def test_split_protocol_golden():
  s = features.split_user_events(7, [5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6], max_len=3)
  assert s.train == {"user_id": 7, "item_ids": [5, 6, 7, 8], "timestamps": [1, 2, 3, 4]}
  assert s.valid == {"user_id": 7, "item_ids": [6, 7, 8], "timestamps": [2, 3, 4],
                     "target_item": 9, "target_timestamp": 5, "seen_items": [5, 6, 7, 8]}
  assert s.test == {"user_id": 7, "item_ids": [7, 8, 9], "timestamps": [3, 4, 5],
                    "target_item": 10, "target_timestamp": 6, "seen_items": [5, 6, 7, 8, 9]}
  # 3 events: valid and test only; fewer: dropped
  three = features.split_user_events(1, [2, 3, 4], [1, 2, 3], max_len=3)
  assert three.train is None and three.valid["item_ids"] == [2] and three.test["target_item"] == 4
  assert features.split_user_events(1, [2, 3], [1, 2], max_len=3) is None
  with pytest.raises(ValueError, match="timestamps"):
    features.split_user_events(1, [2, 3, 4], [1, 2], max_len=3)


def test_no_future_leakage_in_any_split():
  items = list(range(2, 40))
  s = features.split_user_events(0, items, list(range(len(items))), max_len=50)
  assert s.valid["target_item"] not in s.train["item_ids"]
  assert s.test["target_item"] not in s.train["item_ids"] + s.valid["item_ids"]
  assert max(s.valid["timestamps"]) < s.valid["target_timestamp"]


def test_writer_round_trip_and_input_pipeline(tmp_path):
  events = {0: ([2, 3, 4, 5, 6, 7], [10, 20, 30, 40, 50, 60]),
            1: ([3, 4, 5], [1, 2, 3]),
            2: ([5, 6], [1, 2]),
            3: ([2, 2, 3, 4, 9, 8, 7, 6, 5], list(range(9)))}
  info = features.write_sequence_dataset(str(tmp_path), events, item_vocab_size=10, max_len=4,
                                         item_vocab=[str(i) for i in range(10)])
  assert info.num_examples == {"train": 2, "valid": 3, "test": 3}
  assert info.num_users == 3 and info.num_items == 8
  assert features.load_dataset_info(str(tmp_path)) == info
  assert features.load_item_vocab(str(tmp_path))[9] == "9"
  assert json.loads((tmp_path / "dataset_info.json").read_text())["max_len"] == 4

  train = list(SequenceData(str(tmp_path), "train", batch_size=4, max_len=4,
                            shuffle_buffer=1).batches())
  assert len(train) == 1
  b = train[0]
  np.testing.assert_array_equal(b["inputs"][:2], [[0, 2, 3, 4], [3, 4, 9, 8]])
  np.testing.assert_array_equal(b["targets"][:2], [[0, 3, 4, 5], [4, 9, 8, 7]])
  np.testing.assert_array_equal(b["query_timestamps"][0], [0, 20, 30, 40])
  np.testing.assert_array_equal(b["weights"].sum(1), [3, 4, 0, 0])  # padded rows weigh 0

  test = next(SequenceData(str(tmp_path), "test", batch_size=4, max_len=4).batches())
  np.testing.assert_array_equal(test["history"][:3], [[3, 4, 5, 6], [0, 0, 3, 4], [9, 8, 7, 6]])
  np.testing.assert_array_equal(test["target"], [7, 5, 5, 0])
  np.testing.assert_array_equal(test["query_timestamps"][0], [30, 40, 50, 60])
  np.testing.assert_array_equal(test["weight"], [1, 1, 1, 0])
  # every earlier item, beyond max_len, deduplicated; 0-padded to a power of two
  np.testing.assert_array_equal(test["seen_items"], [[2, 3, 4, 5, 6, 0, 0, 0],
                                                     [3, 4, 0, 0, 0, 0, 0, 0],
                                                     [2, 3, 4, 6, 7, 8, 9, 0],
                                                     [0] * 8])


def test_shuffle_is_a_function_of_seed_and_epoch(tmp_path):
  events = {u: (list(range(2, 8)), list(range(6))) for u in range(50)}
  for u in events:
    events[u] = ([2 + (u + i) % 20 for i in range(6)], list(range(6)))
  features.write_sequence_dataset(str(tmp_path), events, item_vocab_size=22, max_len=5)
  data = SequenceData(str(tmp_path), "train", batch_size=8, max_len=5)
  order = lambda e, s: np.concatenate([b["inputs"][:, -1] for b in data.batches(e, s)])
  np.testing.assert_array_equal(order(1, 0), order(1, 0))
  assert not np.array_equal(order(1, 0), order(2, 0))


def test_every_pass_yields_every_batch_of_the_dataset(tmp_path):
  """Passes after the first stop at the counted number of batches rather than asking
  tf.data for the end: each pass still equals tf.data's own full iteration."""
  events = {u: ([2 + (u * 7 + i) % 20 for i in range(3 + u % 5)], list(range(3 + u % 5)))
            for u in range(53)}
  features.write_sequence_dataset(str(tmp_path), events, item_vocab_size=22, max_len=6)
  data = SequenceData(str(tmp_path), "train", batch_size=8, max_len=6)
  for epoch in (1, 2, 3, 2):
    ours = list(data.batches(epoch, 0))
    reference = list(data.dataset(epoch, 0).as_numpy_iterator())
    assert len(ours) == len(reference) >= 5
    for a, b in zip(ours, reference):
      for key in b:
        np.testing.assert_array_equal(a[key], b[key])
  assert len(list(data.batches(1, 0, max_steps=3))) == 3


def test_missing_dataset_says_what_to_pass(tmp_path):
  with pytest.raises(FileNotFoundError, match="recml preprocess"):
    features.load_dataset_info(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no TFRecord shards"):
    features.split_files(str(tmp_path), "train")


def test_length_buckets_only_drop_padding(tmp_path):
  rng = np.random.default_rng(0)
  events = {}
  for u in range(70):
    n = int(rng.integers(3, 45))
    events[u] = ([int(x) for x in rng.integers(2, 30, n)], list(range(n)))
  features.write_sequence_dataset(str(tmp_path), events, item_vocab_size=30, max_len=40)
  plain = SequenceData(str(tmp_path), "train", batch_size=8, max_len=40)
  bucketed = SequenceData(str(tmp_path), "train", batch_size=8, max_len=40,
                          length_buckets=(10, 20), bucket_window=4)
  def rows(batches):
    out = []
    for b in batches:
      assert b["inputs"].shape[0] == 8
      for i in range(8):
        if b["weights"][i].any():
          valid = b["inputs"][i] != 0
          out.append((tuple(b["inputs"][i][valid]), tuple(b["targets"][i][valid]),
                      tuple(b["query_timestamps"][i][valid])))
    return sorted(out)
  got = list(bucketed.batches(epoch=1, seed=3))
  assert {b["inputs"].shape[1] for b in got} <= {10, 20, 40}
  assert len({b["inputs"].shape[1] for b in got}) > 1
  assert rows(got) == rows(plain.batches(epoch=1, seed=3))
  again = list(bucketed.batches(epoch=1, seed=3))
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(got, again))


def test_dataset_name_comes_from_the_source(tmp_path):
  from trainers.evaluate import dataset_name
  events = {0: ([2, 3, 4], [1, 2, 3])}
  for source, want in ((None, "ds"), ({"name": "cyclic"}, "cyclic"),
                       ({"input": "/data/ml-1m-partial"}, "ml-1m-partial"),
                       ({"input": "/data/ml-100k/u.data"}, "ml-100k")):
    out = tmp_path / "ds"
    features.write_sequence_dataset(str(out), events, item_vocab_size=5, max_len=3,
                                    source=source)
    assert dataset_name(str(out)) == want


def test_time_words_are_the_offset_in_two_int32_words_saturating_beyond_2_55():
  rng = np.random.default_rng(0)
  times = np.concatenate([rng.integers(0, 2**31, (3, 5)), rng.integers(-2**60, 2**60, (3, 5))
                          ]).astype(np.int64)
  times[0, 0], times[1, 0] = 0, -2**62  # padding, and an offset far beyond 2**55
  reference = times.max(axis=-1)
  words = features.time_words(times, reference)
  assert words.dtype == np.int32 and words.shape == (6, 5, 2)
  bits = features.TIME_WORD_BITS
  for b in range(6):
    for i in range(5):
      offset = int(times[b, i]) - int(reference[b])  # Python ints: exact
      high = min(max(offset >> bits, -2**31), 2**31 - 1)
      assert (int(words[b, i, 0]), int(words[b, i, 1])) == (high, offset & (2**bits - 1))
      if -2**55 <= offset < 2**55:
        assert int(words[b, i, 0]) * 2**bits + int(words[b, i, 1]) == offset
