"""int8 embedding tables (``recml export --quantize int8``).

References: numpy (float64) for the quantization; for the bundles, the trainer's own
scoring function (:func:`trainers.evaluate.make_score_fn`) on the checkpoint's
parameters with the item table replaced by the numpy dequantization of the int8 bundle's
stored values (so the exported function must dequantize exactly what it stores), and
the float32 bundle of the same checkpoint (so the int8 scores must stay close to the
model's).
"""
# pylint: disable=redefined-outer-name,unused-import  (pytest fixtures)

import json
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from serving import predictor as predictor_lib
from tests.serving.test_ranking_serving import ctr_data, workdir  # the ranking model
from trainers import evaluate, export, features, quantize
from trainers.input_pipeline import SequenceData, model_batch

K = 20
# int8 vs float32 bundle: scores within this fraction of the largest |score| of the row
SCORE_TOLERANCE = 0.02
TABLE = "item_embedding"


# -- the quantization (numpy reference) ------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 4])
def test_quantize_table_against_numpy(group):
  rng = np.random.default_rng(group)
  magnitudes = np.exp(rng.uniform(np.log(1e-3), np.log(3.0), (128, 1)))  # rows differ
  x = (rng.normal(0, 1, (128, 10)) * magnitudes).astype(np.float32)
  x[-16:] = 0.0  # padding rows
  q, s = quantize.quantize_table(x, group)
  assert q.dtype == np.int8 and q.shape == x.shape
  assert s.dtype == np.float16 and s.shape == (128 // group,)

  exact = np.abs(x.reshape(-1, group * 10).astype(np.float64)).max(1) / 127
  step = s.astype(np.float64)
  # float16, rounded up: one float16 step at most (2**-24 below its normal range)
  assert np.all(step >= exact) and np.all(step <= np.maximum(exact * (1 + 2**-10),
                                                             exact + 2**-24))
  assert (exact < 2**-14).any() and (exact > 2**-14).any()  # both ranges are tested
  per_value = np.repeat(step, group)[:, None]
  err = np.abs(q.astype(np.float64) * per_value - x.astype(np.float64))
  assert np.all(err <= per_value / 2 * (1 + 1e-6))  # within half a step
  assert np.all(np.rint(x / np.where(per_value > 0, per_value, 1)) == q)  # round to nearest
  groups = np.abs(q.reshape(-1, group * 10).astype(int)).max(1)
  assert np.all(groups[exact > 0] == 127)  # the whole int8 range is used
  assert not q[-16:].any() and not s[-16 // group:].any()  # zero rows stay exactly zero

  deq = np.asarray(quantize.dequantize_table(q, s, group))  # traced (jax.numpy), as served
  assert deq.dtype == np.float32
  np.testing.assert_array_equal(deq, (q * per_value).astype(np.float32))


def test_rows_per_scale_is_the_smallest_reaching_the_ratio():
  assert quantize.rows_per_scale(3648, 50) == 1  # SASRec / HSTU on ml-1m
  assert quantize.ratio(50, 1) == pytest.approx(200 / 52)
  assert quantize.rows_per_scale(4096, 10) == 2  # DCNv2 on frappe
  assert quantize.ratio(10, 2) == pytest.approx(40 / 11)
  assert quantize.ratio(10, 1) == pytest.approx(40 / 12)  # a scale per row: too little
  assert quantize.ratio(10, 1) < quantize.MIN_RATIO
  for dim in range(1, 65):
    g = quantize.rows_per_scale(64, dim)
    assert quantize.ratio(dim, g) >= quantize.MIN_RATIO and (
        g == 1 or quantize.ratio(dim, g // 2) < quantize.MIN_RATIO), dim
    assert quantize.stored_bytes(64, dim, g) == 64 * dim + 64 // g * 2
  assert quantize.rows_per_scale(6, 4) == 2  # no group wider than divides the rows
  assert quantize.rows_per_scale(3, 10) == 1


@pytest.mark.parametrize("table, group, message", [
    (np.full((4, 3), np.nan, np.float32), 1, "item_embedding: holds values that are not finite"),
    (np.ones((6, 3), np.float32), 4, "rows_per_scale 4 does not divide its 6 rows"),
    (np.full((4, 3), 1e7, np.float32), 1, "too large for int8"),
    (np.ones(4, np.float32), 1, r"expected a \[rows, dim\] table"),
])
def test_bad_tables_are_named(table, group, message):
  with pytest.raises(ValueError, match=message):
    quantize.quantize_table(table, group, name="item_embedding")


# -- retrieval bundles -----------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_bundles(trained, dataset, tmp_path_factory):
  """model name -> int8 bundle of the checkpoint of the ``bundles`` fixture."""
  out = {}
  for name, workdir in trained.items():
    out[name] = str(tmp_path_factory.mktemp(f"int8-{name}") / "bundle")
    export.export_bundle(workdir, out[name], data_dir=dataset, max_k=K, quantize=export.INT8)
  return out


def _meta(path):
  with open(os.path.join(path, export.BUNDLE_FILE), encoding="utf-8") as f:
    return json.load(f)


def _index(meta, name):
  return [w["name"] for w in meta["signature"]["weights"]].index(name)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_int8_bundle_holds_int8_tables_on_disk_and_in_memory(name, int8_bundles, bundles):
  meta, meta32 = _meta(int8_bundles[name]), _meta(bundles[name])
  q = meta["quantization"]
  assert q["scheme"] == export.INT8 and meta32["quantization"]["scheme"] == export.NONE
  (table,) = q["tables"]
  rows, dim = 64, 16  # the tiny models' table: 60 ids padded to ROW_ALIGNMENT, width 16
  assert (table["name"], table["rows"], table["dim"], table["rows_per_scale"]) == (
      TABLE, rows, dim, 1)
  assert q["embedding_bytes"] == {"float32": 4 * rows * dim, "stored": rows * dim + 2 * rows,
                                  "ratio": round(4 * dim / (dim + 2), 4)}
  assert q["embedding_bytes"]["ratio"] >= 3.5

  path = os.path.join(int8_bundles[name], export.WEIGHTS_FILE)
  with np.load(path, allow_pickle=False) as npz, \
       np.load(os.path.join(bundles[name], export.WEIGHTS_FILE), allow_pickle=False) as npz32:
    assert npz[table["weight"]].dtype == np.int8 and npz[table["weight"]].shape == (rows, dim)
    assert npz[table["scale"]].dtype == np.float16 and npz[table["scale"]].shape == (rows,)
    # every other parameter is the float32 bundle's, unchanged
    assert len(npz.files) == len(npz32.files) + 1
    for w in meta32["signature"]["weights"]:
      if w["name"] != table["weight"]:
        assert npz[w["name"]].dtype == np.float32
        np.testing.assert_array_equal(npz[w["name"]], npz32[w["name"]])
  with zipfile.ZipFile(path) as z:  # one byte per value in the file itself (+ a header)
    assert rows * dim < z.getinfo(table["weight"] + ".npy").file_size < rows * dim + 256

  bundle = export.load_bundle(int8_bundles[name])
  assert bundle.quantization == export.INT8
  i, j = _index(meta, table["weight"]), _index(meta, table["scale"])
  assert bundle.weights[i].dtype == np.int8 and bundle.weights[j].dtype == np.float16
  assert bundle.exported.in_avals[i].dtype == np.int8  # the function takes int8 ...
  held = predictor_lib.Predictor(bundle, (1,))._weights  # pylint: disable=protected-access
  assert held[i].dtype == np.int8 and held[i].nbytes == rows * dim  # ... and so does a server
  assert held[j].dtype == np.float16


def _valid_batch(workdir, dataset):
  config, *_ = evaluate.load_model(workdir)
  return next(SequenceData(dataset, features.VALID, 64, config.model_config.max_len).batches())


def _trainer_scores(workdir, batch, int8_bundle=None):
  """The trainer's scores ``[n, V]`` (PAD, OOV at -inf); with ``int8_bundle``, its item
  table is the numpy dequantization of that bundle's stored int8 values and scales."""
  _, model, params, _ = evaluate.load_model(workdir)
  if int8_bundle:
    (table,) = _meta(int8_bundle)["quantization"]["tables"]
    with np.load(os.path.join(int8_bundle, export.WEIGHTS_FILE), allow_pickle=False) as npz:
      q, s = npz[table["weight"]], npz[table["scale"]]
    params = jax.tree.map(lambda x: x, params)  # a copy of the containers
    params[TABLE]["embedding"] = (q.astype(np.float64) * s.astype(np.float64)[:, None]
                                  ).astype(np.float32)
  scores = np.array(jax.jit(evaluate.make_score_fn(model))(params, model_batch(batch)))
  scores[:, :features.FIRST_ITEM_ID] = -np.inf
  return scores


def _bundle_scores(path, batch):
  """The exported function's top ``K`` of ``batch`` (nothing excluded)."""
  bundle, b = export.load_bundle(path), model_batch(batch)
  scores, ids = bundle.exported.call(bundle.weights, b["history"], b["timestamps"],
                                     b["query_timestamps"], np.zeros_like(b["history"]))
  return np.asarray(scores), np.asarray(ids)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_int8_scores_are_the_dequantized_models_and_close_to_float32(
    name, trained, dataset, int8_bundles, bundles):
  batch = _valid_batch(trained[name], dataset)
  want = _trainer_scores(trained[name], batch, int8_bundles[name])
  got, ids = _bundle_scores(int8_bundles[name], batch)
  # exactly the model with the stored table dequantized (float32 rounding aside) ...
  np.testing.assert_allclose(got, np.take_along_axis(want, ids, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, -np.sort(-want, axis=1)[:, :K], rtol=1e-5, atol=1e-6)

  # ... and close to the float32 model's scores, with mostly the same top 10
  want32 = _trainer_scores(trained[name], batch)
  got32, ids32 = _bundle_scores(bundles[name], batch)
  np.testing.assert_allclose(got32, np.take_along_axis(want32, ids32, 1), rtol=1e-5, atol=1e-6)
  real = slice(features.FIRST_ITEM_ID, None)
  gap = np.abs(want[:, real] - want32[:, real]).max(axis=1)
  size = np.abs(want32[:, real]).max(axis=1)
  assert np.all(gap <= SCORE_TOLERANCE * size), (gap / size).max()
  assert np.all(gap > 0)  # really quantized
  overlap = [len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, ids32)]
  assert np.mean(overlap) >= 0.8, np.mean(overlap)


@pytest.mark.integration
def test_served_int8_scores_are_the_dequantized_models(trained, dataset, int8_bundles,
                                                       start_server):
  batch = _valid_batch(trained["hstu"], dataset)
  want = _trainer_scores(trained["hstu"], batch, int8_bundles["hstu"])
  vocab = features.load_item_vocab(dataset)
  server = start_server(int8_bundles["hstu"])
  instances, rows = [], []
  for row in range(len(batch["target"])):
    keep = batch["history"][row] != features.PAD_ID
    if keep.any():
      instances.append({"items": [int(vocab[i]) for i in batch["history"][row][keep]],
                        "timestamps": batch["timestamps"][row][keep].tolist(),
                        "query_timestamp": int(batch["query_timestamps"][row][-1]),
                        "k": K, "exclude_history": False})
      rows.append(row)
  assert len(rows) > 30
  status, body = server.post({"instances": instances[:32]})
  assert status == 200, body
  for pred, row in zip(body["predictions"], rows):
    ids = [vocab.index(str(raw)) for raw in pred["items"]]
    np.testing.assert_allclose(pred["scores"], want[row][ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pred["scores"], np.sort(want[row])[::-1][:K], rtol=1e-5,
                               atol=1e-5)


# -- old bundles, bad input ------------------------------------------------------------


@pytest.mark.integration
def test_bundle_without_a_quantization_record_still_loads(bundles, tmp_path):
  """A bundle written before int8 tables (no ``quantization`` in bundle.json) loads as
  float32 and answers as before."""
  copy = tmp_path / "old"
  shutil.copytree(bundles["sasrec"], copy)
  meta = _meta(str(copy))
  del meta["quantization"]
  (copy / export.BUNDLE_FILE).write_text(json.dumps(meta))
  old, new = export.load_bundle(str(copy)), export.load_bundle(bundles["sasrec"])
  assert old.quantization == export.NONE
  assert all(w.dtype == np.float32 for w in old.weights)
  x = predictor_lib.right_align([[2, 3, 4], [5, 6, 7, 8, 9]], old.max_len)
  a = predictor_lib.Predictor(old, (2,)).run(x, x, x, x)
  b = predictor_lib.Predictor(new, (2,)).run(x, x, x, x)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.integration
def test_recml_export_quantize_flag(trained, dataset, tmp_path):
  """``recml export --quantize int8`` writes an int8 bundle; a bad value is a usage
  error naming the flag and the choices, and writes nothing."""
  cmd = [sys.executable, "-m", "pipelines.cli", "export", "--model-dir", trained["sasrec"],
         "--data", dataset, "--max-k", str(K)]
  bad = subprocess.run(cmd + ["--output", str(tmp_path / "bad"), "--quantize", "int4"],
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 2
  assert "argument --quantize: invalid choice: 'int4'" in bad.stderr
  assert "none" in bad.stderr.rsplit("choose from", 1)[1] and "int8" in bad.stderr
  assert not (tmp_path / "bad").exists()
  ok = subprocess.run(cmd + ["--output", str(tmp_path / "int8"), "--quantize", "int8"],
                      capture_output=True, text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  assert "embedding tables: int8, 1,152 bytes (4,096 as float32: 3.56x smaller)" in ok.stdout
  assert export.load_bundle(str(tmp_path / "int8")).quantization == export.INT8
  with pytest.raises(ValueError, match="quantize must be one of none, int8, got 'int4'"):
    export.export_bundle(trained["sasrec"], str(tmp_path / "api"), quantize="int4")
  assert not (tmp_path / "api").exists()


# -- ranking bundles -------------------------------------------------------------------


@pytest.mark.integration
def test_int8_ranking_bundle_scores_close_to_float32(workdir, ctr_data, tmp_path):
  """DCNv2 (every feature table int8, batch norm and dense layers float32): the int8
  bundle's probabilities are the model's with its tables dequantized, close to float32."""
  from trainers import ranking_eval  # pylint: disable=g-import-not-at-top
  from trainers.input_pipeline import RankingData  # pylint: disable=g-import-not-at-top
  data_dir = ctr_data[0]
  paths = {s: str(tmp_path / s) for s in export.QUANTIZE}
  for scheme, path in paths.items():
    export.export_bundle(workdir, path, data_dir=data_dir, quantize=scheme)
  meta = _meta(paths[export.INT8])
  tables = meta["quantization"]["tables"]
  _, task, model, variables = ranking_eval.load_selected(workdir, data_dir)
  embeddings = variables["params"]["embeddings"]
  assert sorted(t["name"] for t in tables) == sorted(f"embeddings/{k}" for k in embeddings)
  assert meta["quantization"]["embedding_bytes"]["ratio"] >= 3.5

  bundles = {s: export.load_bundle(p) for s, p in paths.items()}
  dequantized = jax.tree.map(lambda x: x, variables)
  for t in tables:  # the numpy reference of what the function must compute
    q = bundles[export.INT8].weights[_index(meta, t["weight"])]
    s = bundles[export.INT8].weights[_index(meta, t["scale"])].astype(np.float64)
    assert q.dtype == np.int8
    dequantized["params"]["embeddings"][t["name"].split("/")[1]]["embedding"] = (
        q.astype(np.float64) * np.repeat(s, t["rows_per_scale"])[:, None]).astype(np.float32)
  logits = task.make_logits(model)
  batch = next(RankingData(data_dir, features.TEST, 128).batches())
  keep = batch["weight"] > 0
  args = [batch[n] for n in bundles[export.INT8].input_names]
  p8 = np.asarray(bundles[export.INT8].exported.call(bundles[export.INT8].weights, *args))
  p32 = np.asarray(bundles[export.NONE].exported.call(bundles[export.NONE].weights, *args))
  want8 = np.asarray(jax.nn.sigmoid(logits(dequantized, batch)))
  want32 = np.asarray(jax.nn.sigmoid(logits(variables, batch)))
  np.testing.assert_allclose(p8[keep], want8[keep], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p32[keep], want32[keep], rtol=1e-5, atol=1e-6)
  assert 0 < np.abs(p8 - p32)[keep].max() <= 0.01
