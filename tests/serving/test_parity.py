"""Scores served over HTTP equal the trainer's scores for the same histories.

The reference is the training forward pass (every position, padded to max_len); the server
runs the exported scoring path (final block for the last position only, histories padded
only to their length bucket, several length groups per micro-batch)."""

import jax
import numpy as np
import pytest

from trainers import evaluate, features
from trainers.input_pipeline import SequenceData, model_batch

pytestmark = pytest.mark.integration
K = 20


@pytest.mark.parametrize("name", ["sasrec", "hstu", "bert4rec", "mamba4rec"])
def test_served_scores_equal_trainer_scores(name, dataset, served):
  workdir, server = served(name)
  config, model, params, _ = evaluate.load_model(workdir)
  vocab = features.load_item_vocab(dataset)
  batch = next(SequenceData(dataset, features.VALID, 64, config.model_config.max_len).batches())

  def full_forward_scores(params, batch):  # the training forward: every position, max_len
    def fwd(m):
      user = m(batch["history"], batch["timestamps"], batch["query_timestamps"])
      # the table's rows past the vocabulary are padding (layers.ROW_ALIGNMENT)
      return (user[:, -1] @ m.all_candidates().T)[:, :m.config.vocab_size]
    return model.apply({"params": params}, method=fwd)
  scores = np.asarray(jax.jit(full_forward_scores)(params, model_batch(batch)))
  lengths = (batch["history"] != features.PAD_ID).sum(1)
  assert {1, 2} & set(lengths) or min(lengths) <= 4  # short and ...
  assert max(lengths) > 8                              # ... long histories (length buckets)
  assert {4, 8} & set(lengths)  # a history exactly as long as a length bucket

  instances, expected = [], []
  for row in range(len(batch["target"])):
    keep = batch["history"][row] != features.PAD_ID
    items, ts = batch["history"][row][keep], batch["timestamps"][row][keep]
    if not len(items):
      continue
    exclude = bool(row % 2)  # both settings
    instances.append({"items": [int(vocab[i]) for i in items], "timestamps": ts.tolist(),
                      "query_timestamp": int(batch["query_timestamps"][row][-1]),
                      "k": K, "exclude_history": exclude})
    s = scores[row].copy()
    s[:features.FIRST_ITEM_ID] = -np.inf
    if exclude:
      s[items] = -np.inf
    expected.append(s)
  assert len(instances) > 30

  for start in range(0, len(instances), 7):  # several requests, several instances each
    status, body = server.post({"instances": instances[start:start + 7]})
    assert status == 200, body
    for pred, want in zip(body["predictions"], expected[start:start + 7]):
      ids = [vocab.index(str(raw)) for raw in pred["items"]]
      assert len(ids) == K
      # The served scores are the trainer's scores of the served items...
      np.testing.assert_allclose(pred["scores"], want[ids], rtol=1e-5, atol=1e-5)
      # ... and they are the trainer's top K (ties aside), best first.
      np.testing.assert_allclose(pred["scores"], np.sort(want)[::-1][:K], rtol=1e-5, atol=1e-5)
      assert all(np.isfinite(want[ids]))


def test_hstu_uses_time(servers):
  """HSTU's answer depends on the timestamps; the documented default is zero gaps."""
  base = {"items": [1000, 1007, 1014, 1021], "k": 5}
  now = 1_700_000_000
  _, explicit = servers["hstu"].post({"instances": [
      {**base, "timestamps": [now - 10**6, now - 10**5, now - 10**3, now - 10],
       "query_timestamp": now}]})
  _, zero_gaps = servers["hstu"].post({"instances": [
      {**base, "timestamps": [now] * 4, "query_timestamp": now}]})
  _, default = servers["hstu"].post({"instances": [base]})
  assert explicit["predictions"][0]["scores"] != zero_gaps["predictions"][0]["scores"]
  np.testing.assert_allclose(default["predictions"][0]["scores"],
                             zero_gaps["predictions"][0]["scores"], rtol=1e-6)


def test_unknown_items_map_to_oov(servers):
  s = servers["sasrec"]
  _, a = s.post({"instances": [{"items": [1000, "no-such-item"], "exclude_history": False}]})
  _, b = s.post({"instances": [{"items": [1000, 999999], "exclude_history": False}]})
  assert a["predictions"] == b["predictions"]
  assert len(a["predictions"][0]["items"]) == 10  # default k
