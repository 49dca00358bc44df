"""The evaluation protocol against a brute-force loop over users (issue 10).

A MovieLens-style file goes through the real preprocessing step with
``min_item_count=3`` (rare items, some of them valid/test targets, become the OOV
id) and ``max_len=6`` (most users have older items than the model's window). The
reference ranks each user's target in plain Python from the raw events: it scores
every id, drops padding, OOV and the items the rule excludes (the whole history, or
its last ``max_len`` items), and averages HR/NDCG/MRR over the equally likely ranks
among ties. OOV targets are not ranked; they are counted.
"""

import logging
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from components import evaluate as evaluate_step
from components.preprocess import run as preprocess
from trainers import configs, evaluate, features, train
from trainers.input_pipeline import SequenceData, model_batch

MAX_LEN, MIN_COUNT, KS = 6, 3, (1, 5, 10)


def _raw_events(seed=0, users=40):
  """user -> time-ordered (raw items, timestamps); every 4th user ends on a rare item."""
  rng = np.random.default_rng(seed)
  popular = np.arange(100, 130)
  p = 1.0 / np.arange(1, len(popular) + 1)
  events = {}
  for u in range(users):
    n = int(rng.integers(4, 22))
    items = [str(i) for i in rng.choice(popular, n, p=p / p.sum())]  # repeats happen
    if u % 4 == 0:
      items[-1 - (u // 4) % 2] = str(900 + u)  # seen once: OOV, as test or valid target
    events[str(u)] = (items, [1_000_000 + 60 * k for k in range(n)])
  return events


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  events = _raw_events()
  folder = tmp_path_factory.mktemp("raw")
  lines = [f"{u}::{i}::5::{t}" for u, (items, ts) in events.items() for i, t in zip(items, ts)]
  (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
  out = tmp_path_factory.mktemp("seq")
  preprocess(str(folder), str(out), max_len=MAX_LEN, min_item_count=MIN_COUNT)
  vocab = features.load_item_vocab(str(out))
  index = {raw: i for i, raw in enumerate(vocab) if i >= features.FIRST_ITEM_ID}
  indexed = {u: ([index.get(i, features.OOV_ID) for i in items], ts)
             for u, (items, ts) in events.items()}
  return str(out), indexed, len(vocab)


def _examples(indexed, split):
  """(user, target position, item ids, timestamps) of each user's example of ``split``."""
  back = 2 if split == features.VALID else 1
  for u, (items, ts) in sorted(indexed.items()):
    yield u, len(items) - back, items, ts


def reference(indexed, split, score_row, rule, vocab_size):
  """Brute force: metric means over in-vocabulary targets, and the target counts."""
  sums = {f"{m}@{k}": 0.0 for m in ("hr", "ndcg") for k in KS}
  sums["mrr"] = 0.0
  ranked = oov = 0
  for u, t, items, ts in _examples(indexed, split):
    target = items[t]
    if target == features.OOV_ID:
      oov += 1
      continue
    ranked += 1
    history = items[:t]
    dropped = {"all": set(history), "window": set(history[-MAX_LEN:]), "none": set()}[rule]
    dropped |= {features.PAD_ID, features.OOV_ID}
    s = score_row(u, t, items, ts)
    rivals = [j for j in range(vocab_size) if j not in dropped and j != target]
    above = sum(s[j] > s[target] for j in rivals)
    tied = sum(s[j] == s[target] for j in rivals)
    ranks = range(above + 1, above + tied + 2)  # equally likely
    for k in KS:
      sums[f"hr@{k}"] += np.mean([r <= k for r in ranks])
      sums[f"ndcg@{k}"] += np.mean([1 / math.log2(r + 1) if r <= k else 0.0 for r in ranks])
    sums["mrr"] += np.mean([1 / r for r in ranks])
  return {k: v / ranked for k, v in sums.items()}, {"ranked_targets": ranked, "oov_targets": oov}


def _table_scorer(vocab_size, seed=1):
  """A fixed 'model': the scores are a row of a random table with many ties, picked by
  the last history item."""
  table = np.random.default_rng(seed).integers(0, 4, (vocab_size, vocab_size)).astype(np.float32)
  row = lambda u, t, items, ts: table[items[t - 1]]
  step = lambda rule: (lambda params, batch: evaluate.make_metrics_step(KS, rule)(
      jnp.asarray(table)[batch["history"][:, -1]], batch))
  return row, step


def _assert_close(got, want):
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-5), key


@pytest.mark.parametrize("split", [features.VALID, features.TEST])
def test_oov_targets_are_not_ranked_and_are_counted(dataset, split):
  data_dir, indexed, vocab_size = dataset
  row, step = _table_scorer(vocab_size)
  want, counts = reference(indexed, split, row, "all", vocab_size)
  assert counts["oov_targets"] >= 5 and counts["ranked_targets"] >= 30  # both occur
  data = SequenceData(data_dir, split, 64, MAX_LEN)
  _assert_close(evaluate.run_eval(step("all"), None, data), want)
  assert evaluate.evaluation_facts("all", {split: data}) == {
      "history_exclusion": "all", **{f"{split}/{k}": v for k, v in counts.items()}}
  # the popularity baseline follows the same rules; its counts come from the train split
  pop = np.zeros(vocab_size)
  for items, _ in indexed.values():
    if len(items) >= 4:
      np.add.at(pop, items[:-2][-(MAX_LEN + 1):], 1)
  want_pop, _ = reference(indexed, split, lambda *_: pop, "all", vocab_size)
  _assert_close(evaluate.popularity_baseline(data_dir, split, MAX_LEN, KS), want_pop)


def test_whole_history_is_excluded_and_window_is_an_option(dataset, tmp_path, caplog):
  data_dir, indexed, vocab_size = dataset
  row, step = _table_scorer(vocab_size)
  assert sum(len(set(i[:-1])) > len(set(i[:-1][-MAX_LEN:])) for i, _ in indexed.values()) > 20
  for split in (features.VALID, features.TEST):
    data = SequenceData(data_dir, split, 64, MAX_LEN)
    by_rule = {}
    for rule in configs.HISTORY_EXCLUSION:
      by_rule[rule], _ = reference(indexed, split, row, rule, vocab_size)
      _assert_close(evaluate.run_eval(step(rule), None, data), by_rule[rule])
    assert by_rule["all"]["mrr"] > by_rule["window"]["mrr"] > by_rule["none"]["mrr"]
  # booleans of older configs keep working: True is the whole history
  assert configs.get_config("sasrec", exclude_history=True).exclude_history == "all"
  with pytest.raises(ValueError, match="exclude_history"):
    configs.get_config("sasrec", exclude_history="some")

  # A dataset written before seen_items: "all" falls back to the window, and says so.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  old = tmp_path / "old"
  shutil.copytree(data_dir, old)
  for path in features.split_files(str(old), features.VALID):
    records = [tf.train.Example.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]
    with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type="GZIP")) as w:
      for ex in records:
        del ex.features.feature[features.SEEN_ITEMS]
        w.write(ex.SerializeToString())
  data = SequenceData(str(old), features.VALID, 64, MAX_LEN)
  with caplog.at_level(logging.WARNING):
    assert evaluate.evaluation_facts("all", {features.VALID: data})["history_exclusion"] == \
        "window"
  assert "re-run `recml preprocess`" in caplog.text
  want, _ = reference(indexed, features.VALID, row, "window", vocab_size)
  _assert_close(evaluate.run_eval(step("all"), None, data), want)


def test_metrics_json_and_evaluate_step_follow_the_protocol(dataset, tmp_path):
  data_dir, indexed, vocab_size = dataset
  cfg = configs.get_config("sasrec", smoke=True, data_dir=data_dir, epochs=1, max_len=MAX_LEN,
                           max_steps_per_epoch=2, top_ks=KS, selection_metric="ndcg@10")
  saved = train.train_and_evaluate(cfg, str(tmp_path))
  _, model, params, _ = evaluate.load_model(str(tmp_path))
  score = jax.jit(evaluate.make_score_fn(model))

  def model_row(u, t, items, ts):  # the model's scores for inputs built from the raw events
    window = lambda xs: np.array([[0] * (MAX_LEN - len(xs)) + list(xs)], np.int64)
    batch = {"history": window(items[:t][-MAX_LEN:]).astype(np.int32),
             "timestamps": window(ts[:t][-MAX_LEN:]),
             "query_timestamps": window(ts[1:t + 1][-MAX_LEN:])}
    return np.asarray(score(params, model_batch(batch)))[0]

  assert saved["history_exclusion"] == "all"
  for split in (features.VALID, features.TEST):
    want, counts = reference(indexed, split, model_row, "all", vocab_size)
    _assert_close(saved[split], want)
    assert {k: saved[f"{split}/{k}"] for k in counts} == counts
  result = evaluate_step.run(str(tmp_path), split=features.TEST)
  _assert_close(result[features.TEST], reference(indexed, features.TEST, model_row, "all",
                                                 vocab_size)[0])
  assert result["test/oov_targets"] == saved["test/oov_targets"]
  assert result["history_exclusion"] == "all"
