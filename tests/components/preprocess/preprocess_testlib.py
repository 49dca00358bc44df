"""Helpers for the preprocessing tests: shared data sets, decoding, a pandas reference."""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

from trainers import features

REPO = pathlib.Path(__file__).resolve().parents[3]
DATASETS = REPO.parent / "shared" / "datasets"


def shared(name: str) -> pathlib.Path:
  """A folder of ../shared/datasets, or a skip saying it is absent."""
  path = DATASETS / name
  if not path.exists():
    pytest.skip(f"{path} is absent (the shared data sets are not on this machine)")
  return path


def read_split(data_dir, split: str) -> list[dict[str, list[int]]]:
  """Decoded examples of a split, in file order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = []
  for path in features.split_files(str(data_dir), split):
    for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
      ex = tf.train.Example.FromString(record.numpy())
      out.append({k: list(v.int64_list.value) for k, v in ex.features.feature.items()})
  return out


def tree_digest(root) -> dict[str, str]:
  """sha256 of every file under ``root`` by relative path."""
  digests = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def vocab_order(values) -> list[str]:
  """tf.transform's order: frequency descending, ties by raw bytes descending."""
  import collections  # pylint: disable=g-import-not-at-top
  counts = collections.Counter(values)
  return [k for k, _ in sorted(counts.items(), key=lambda kv: (kv[1], kv[0].encode()),
                               reverse=True)]


def check_against_reference(out_dir, users, items, stamps, max_len: int):
  """Checks a dataset against a direct pandas-free computation of the contract.

  Args:
    out_dir: the output of ``run``.
    users, items, stamps: raw events in input order (strings, strings, ints).
    max_len: the ``max_len`` of the run.
  """
  item_tokens = vocab_order(items)
  assert features.load_item_vocab(str(out_dir)) == ["<pad>", "<oov>"] + item_tokens
  item_index = {t: i + features.FIRST_ITEM_ID for i, t in enumerate(item_tokens)}
  user_index = {u: i for i, u in enumerate(vocab_order(users))}
  per_user: dict[str, list[tuple[int, int, int]]] = {}
  for order, (u, i, t) in enumerate(zip(users, items, stamps)):
    per_user.setdefault(u, []).append((t, order, item_index[i]))
  expected = {s: {} for s in features.SPLITS}
  for u, events in per_user.items():
    events.sort()
    s = features.split_user_events(user_index[u], [e[2] for e in events],
                                   [e[0] for e in events], max_len)
    if s is None:
      continue
    for split, ex in ((features.TRAIN, s.train), (features.VALID, s.valid),
                      (features.TEST, s.test)):
      if ex is not None:
        expected[split][s.user_id] = {k: v if isinstance(v, list) else [v]
                                      for k, v in ex.items()}
  for split in features.SPLITS:
    got = {ex[features.USER_ID][0]: ex for ex in read_split(out_dir, split)}
    assert len(got) == len(expected[split]), split
    assert got == expected[split], split
  info = features.load_dataset_info(str(out_dir))
  assert info.item_vocab_size == len(item_tokens) + 2
  assert info.num_users == len(expected[features.TEST])
  return info
