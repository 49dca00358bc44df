"""A served ranking model: HTTP scores equal the trainer's probabilities for the same rows.

The dataset is 600 rows of ../shared/datasets/criteo-sample, pre-split into train /
valid / test files and preprocessed by the project's CTR step, with every kind of
feature: 13 dense (some missing), two vocabulary and six hashed categorical features
(some missing), and a multi-hot ``tags`` column (three of) four more Criteo columns. A
smoke DCNv2 (batch norm) is trained on it, exported, and served by the real server.

The reference is the trainer's own path on the preprocessed TFRecords (checkpoint
restored through ``trainers.tasks``, ``model.apply(..., deterministic=True)``, sigmoid);
the server gets the raw CSV values as JSON and transforms them itself.
"""
# pylint: disable=redefined-outer-name  (pytest fixtures)

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.serving.conftest import Server

pytestmark = pytest.mark.integration
REPO = pathlib.Path(__file__).resolve().parents[2]
CRITEO = REPO.parent / "shared" / "datasets" / "criteo-sample" / "train_head1000.tsv"
DENSE = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 9)]
SPLIT_ROWS = {"train": (0, 400), "valid": (400, 500), "test": (500, 600)}


def _raw(record: dict[str, str], style: int) -> dict:
  """A CSV row as a JSON instance's features, in one of three spellings of the same
  values: numbers as JSON numbers or text, missing values absent, null or ``""``,
  the multi-hot column as a list or ``a|b`` text."""
  out = {}
  for name, text in record.items():
    if name == "label":
      continue
    if name == "tags":
      out[name] = text.split("|") if style == 0 and text else text
    elif text == "":
      if style == 1:
        out[name] = None
      elif style == 2:
        out[name] = ""
    elif name in DENSE and style != 2:
      out[name] = int(text)
    else:
      out[name] = text
  return out


@pytest.fixture(scope="module")
def ctr_data(tmp_path_factory):
  """``(dataset dir, {split: CSV records})``: the project's preprocessing of 600 rows."""
  if not CRITEO.exists():
    pytest.skip(f"{CRITEO} is absent (the shared data sets are not on this machine)")
  from components.preprocess import ctr_step  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("ranking-data")
  lines = CRITEO.read_text().splitlines()[:600]
  header = ["label", *DENSE, *CATEGORICAL, "tags"]
  records = {}
  for split, (start, stop) in SPLIT_ROWS.items():
    rows = []
    for line in lines[start:stop]:
      x = line.split("\t")
      tags = "|".join(v for v in (x[32], x[33], x[35], x[38]) if v)  # C19 C20 C22 C25
      rows.append(dict(zip(header, x[:14] + x[14:22] + [tags])))
    records[split] = rows
    with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, header)
      writer.writeheader()
      writer.writerows(rows)
  out = root / "dataset"
  ctr_step.run(str(root), str(out), label="label", dense=DENSE, categorical=CATEGORICAL,
               multi_hot=["tags:3"], hash_buckets=[f"{c}=50" for c in CATEGORICAL[2:]],
               num_shards=1)
  return str(out), records


@pytest.fixture(scope="module")
def workdir(ctr_data, tmp_path_factory):
  from trainers import configs, train  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("ranking-model"))
  config = configs.get_config("dcnv2", smoke=True, data_dir=ctr_data[0], epochs=1,
                              batch_size=128, eval_batch_size=256)
  train.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope="module")
def bundle(workdir, ctr_data, tmp_path_factory):
  from trainers import export  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("ranking-bundle") / "bundle")
  export.export_bundle(workdir, path, data_dir=ctr_data[0])
  return path


@pytest.fixture(scope="module")
def server(bundle):
  s = Server(bundle, buckets=(1, 4, 16, 64))
  try:
    s.wait_ready()
    yield s
  finally:
    s.close()


def trainer_probabilities(workdir: str, data_dir: str, split: str) -> np.ndarray:
  """The trainer's click probabilities of a split's TFRecord rows, in file order."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from trainers import configs, models, tasks  # pylint: disable=g-import-not-at-top
  from trainers.checkpoints import Checkpoints, load_config_dict  # pylint: disable=g-import-not-at-top
  from trainers.input_pipeline import RankingData  # pylint: disable=g-import-not-at-top
  config = configs.TrainConfig.from_dict(load_config_dict(workdir))
  task = tasks.Ranking(config)
  task.prepare()
  model = models.build(config.model, config.model_config)
  abstract = nn.meta.unbox(jax.eval_shape(lambda: task.init(model, jax.random.key(0))))
  ckpt = Checkpoints(workdir, async_save=False)
  variables, _ = ckpt.restore_best(abstract)
  ckpt.close()
  assert "batch_stats" in variables  # the preset's batch norm, on its running averages
  logits = jax.jit(lambda v, b: model.apply(v, b, deterministic=True))
  out = []
  for batch in RankingData(data_dir, split, 64).batches():
    keep = batch["weight"] > 0
    out.append(np.asarray(jax.nn.sigmoid(logits(variables, batch)))[keep])
  return np.concatenate(out)


def post_all(server, instances, chunk: int = 29) -> list:
  predictions = []
  for start in range(0, len(instances), chunk):
    status, body = server.post({"instances": instances[start:start + chunk]})
    assert status == 200, body
    predictions += body["predictions"]
  return predictions


def test_served_scores_equal_trainer_probabilities(server, workdir, ctr_data):
  data_dir, records = ctr_data
  want = trainer_probabilities(workdir, data_dir, "test")
  rows = records["test"]
  assert len(want) == len(rows) == 100
  assert want.std() > 1e-3  # distinct scores: a row mix-up would show
  assert any(r["I1"] == "" for r in rows) and any(r["C3"] == "" for r in rows)
  assert any(r["tags"] == "" for r in rows) and any(r["tags"].count("|") == 3 for r in rows)
  from trainers import ranking_features as rf  # pylint: disable=g-import-not-at-top
  vocab = rf.load_vocabs(data_dir, rf.load_info(data_dir))["C2"]
  assert any(r["C2"] not in vocab for r in rows)  # out-of-vocabulary values

  instances = [{"features": _raw(r, i % 3)} for i, r in enumerate(rows)]
  got = np.array([p["score"] for p in post_all(server, instances)])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_candidate_lists_are_sorted_and_score_as_rows_alone(server, ctr_data):
  _, records = ctr_data
  user = {k: v for k, v in _raw(records["test"][0], 0).items() if k in DENSE}
  item_keys = CATEGORICAL + ["tags"]
  candidates = [{k: v for k, v in _raw(r, j % 3).items() if k in item_keys}
                for j, r in enumerate(records["valid"])]  # 100 > the largest bucket (64)
  status, body = server.post({"instances": [
      {"features": user, "candidates": candidates},
      {"features": user, "candidates": candidates[:3]}]})
  assert status == 200, body
  ranked, short = body["predictions"]

  alone = np.array([p["score"] for p in post_all(
      server, [{"features": {**user, **c}} for c in candidates])])
  order = [s["candidate"] for s in ranked["scores"]]
  scores = np.array([s["score"] for s in ranked["scores"]])
  assert sorted(order) == list(range(len(candidates)))
  assert np.all(np.diff(scores) <= 0)                   # best first
  np.testing.assert_allclose(scores, alone[order], rtol=0, atol=1e-6)
  np.testing.assert_allclose(scores, np.sort(alone)[::-1], rtol=0, atol=1e-6)
  short_order = [s["candidate"] for s in short["scores"]]
  assert sorted(short_order) == [0, 1, 2]
  np.testing.assert_allclose([s["score"] for s in short["scores"]], alone[short_order],
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose([s["score"] for s in short["scores"]],
                             np.sort(alone[:3])[::-1], rtol=0, atol=1e-6)
  assert len(set(np.round(alone, 6))) > 50              # the order is not among ties


def test_concurrent_requests_answer_as_sent_alone(server, ctr_data):
  """Requests of plain rows and candidate lists of many sizes, micro-batched together
  (one device call mixes them), get the answers they get one at a time."""
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=g-import-not-at-top
  _, records = ctr_data
  rng = np.random.default_rng(0)
  rows = [_raw(r, i % 3) for i, r in enumerate(records["valid"])]
  bodies = []
  for i in range(40):
    user = {k: v for k, v in rows[i].items() if k in DENSE}
    n = int(rng.integers(1, 70))
    cands = [{k: v for k, v in rows[j].items() if k not in DENSE}
             for j in rng.integers(0, len(rows), n)]
    plain = {"features": rows[(i * 7) % len(rows)]}
    bodies.append({"instances": [plain, {"features": user, "candidates": cands}][:1 + i % 2]})
  alone = [server.post(b) for b in bodies]
  before = server.get("/v1/metadata")[1]
  with ThreadPoolExecutor(16) as pool:
    together = list(pool.map(server.post, bodies))
  after = server.get("/v1/metadata")[1]
  batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
  print(f"{rows} instances in {batches} device batches")
  assert rows == sum(len(b["instances"]) for b in bodies) and batches < rows  # mixed
  for (s1, a), (s2, b) in zip(alone, together):
    assert s1 == s2 == 200, (a, b)
    for pa, pb in zip(a["predictions"], b["predictions"]):
      if "score" in pa:
        assert pa["score"] == pytest.approx(pb["score"], abs=1e-6)
      else:
        by_candidate = {c["candidate"]: c["score"] for c in pa["scores"]}
        assert [c["score"] for c in pb["scores"]] == pytest.approx(
            [by_candidate[c["candidate"]] for c in pb["scores"]], abs=1e-6)
        assert len(pb["scores"]) == len(pa["scores"])


@pytest.mark.parametrize("instance, message", [
    ({"features": {"I1": "abc"}}, "instances[1]: feature 'I1': non-numeric dense value"),
    ({"features": {"I1": True}}, "instances[1]: feature 'I1': non-numeric dense value"),
    ({"features": {"I1": [1]}}, "instances[1]: feature 'I1': non-numeric dense value"),
    ({"features": {"C1": 1.5}}, "instances[1]: feature 'C1': a categorical value must be"),
    ({"features": {"C3": False}}, "instances[1]: feature 'C3': a categorical value must be"),
    ({"features": {"C1": {"a": 1}}}, "instances[1]: feature 'C1'"),
    ({"features": {"tags": 7}}, "instances[1]: feature 'tags': a multi-hot value must be"),
    ({"features": {"tags": [1.5]}}, "instances[1]: feature 'tags'"),
    ({"features": {"Cx": "a"}}, "instances[1]: unknown feature 'Cx' (known: C1, C2"),
    ({"features": {"I1": 1}, "candidates": [{"C1": "a"}, {"I2": "x"}]},
     "instances[1].candidates[1]: feature 'I2': non-numeric dense value"),
    ({"features": {"I1": 1}, "candidates": [{"C1": "a"}, {"nope": 1}]},
     "instances[1].candidates[1]: unknown feature 'nope'"),
    ({"features": {"C1": "a"}, "candidates": [{"C1": "b"}]},
     "instances[1].candidates[0]: feature 'C1' is also in instances[1].features"),
    ({"features": {}, "candidates": []}, "instances[1].candidates must be a non-empty list"),
    ({"features": {}, "candidates": [{}] * 1001}, "at most 1000"),
    ({"features": {}, "candidates": ["C1"]}, "instances[1].candidates[0] must be an object"),
    ({"features": ["I1", 1]}, "instances[1].features must be an object"),
    ({"items": [1, 2]}, "instances[1]: unknown field(s) ['items']"),
    ({}, "instances[1] is empty"),
])
def test_bad_features_are_a_400_naming_them(server, instance, message):
  status, body = server.post({"instances": [{"features": {"I1": 1}}, instance]})
  assert status == 400, body
  assert message in body["error"], body["error"]


def test_missing_features_score_as_missing_values(server, ctr_data):
  """An absent feature, null and "" are the missing value (as an empty CSV field)."""
  _, records = ctr_data
  row = {k: v for k, v in _raw(records["test"][1], 0).items() if k not in ("I2", "C4")}
  predictions = post_all(server, [{"features": row},
                                  {"features": {**row, "I2": None, "C4": None}},
                                  {"features": {**row, "I2": "", "C4": ""}},
                                  {"features": {**row, "I2": 5, "C4": "x"}}])
  scores = [p["score"] for p in predictions]
  assert scores[0] == scores[1] == scores[2] != scores[3]
  status, body = server.post({"instances": [{"features": row}], "parameters": {"k": 3}})
  assert status == 400 and "ranking requests take none" in body["error"]


def test_bundle_serves_without_tensorflow_or_the_dataset(bundle, tmp_path):
  """The bundle is self-contained: a copy away from the dataset loads, transforms raw
  values and scores with jax and numpy only."""
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "copy"
  shutil.copytree(bundle, copy)
  meta = json.loads((copy / "bundle.json").read_text())
  assert meta["task"] == "ranking" and meta["format_version"] == 4
  assert [i["name"] for i in meta["signature"]["inputs"]] == [
      "dense", "dense_missing", "sparse", "multi_hot/tags"]
  assert {"dataset_info.json", "vocab/C1.txt", "vocab/C2.txt", "vocab/tags.txt"} <= set(
      meta["sha256"])
  script = (
      "import sys, numpy as np\n"
      "from trainers import export\n"
      "b = export.load_bundle(sys.argv[1])\n"
      "x = b.transform([{'I1': 3, 'C1': '68fd1e64', 'tags': ['a']}, {}])\n"
      "p = np.asarray(b.exported.call(b.weights, *[x[n] for n in b.input_names]))\n"
      "assert p.shape == (2,) and ((p > 0) & (p < 1)).all(), p\n"
      "bad = sorted(m for m in ('tensorflow', 'flax', 'optax', 'orbax') if m in sys.modules)\n"
      "assert not bad, bad\n"
      "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", script, str(copy)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
