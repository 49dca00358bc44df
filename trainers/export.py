"""Serving bundles: a trained model as data, answerable without the training code.

This module is the bundle format: writing one (:func:`export_bundle`), reading one
(:func:`load_bundle`) and checking its files (:func:`verify_bundle_files`). Serving it
(the predictor, the HTTP server, the model registry) is the ``serving`` package.

A bundle holds one of the two tasks of :mod:`trainers.tasks` (``bundle.json``'s
``task``). A retrieval bundle answers "given this user's recent raw item ids, return the
top-K raw item ids with scores"; a ranking bundle (DLRM v2, DCNv2) "given rows of raw
feature values, return their click probabilities" (see *Ranking bundles* below). It is a
directory of data files only (no pickle, no Python)::

    bundle.json        format, model, shapes (max_len, max_k, vocab), signature, weight
                       names/shapes, sha256 of every file, provenance (workdir, metrics)
    model.stablehlo    ``jax.export`` artifact (serialised StableHLO, symbolic batch ``b``
                       and history length ``l <= max_len``)
    weights.npz        the parameters as a flat list w000, w001, ... (read with
                       ``allow_pickle=False``); with int8 tables, their scales last
    vocab/items.txt    raw item id per line, line i = index i (0 = <pad>, 1 = <oov>)
    config.json        the exact TrainConfig (reference only)
    dataset_info.json  the dataset's vocabulary sizes and counts (reference only)

The exported function is the trainer's scoring (:func:`trainers.evaluate.make_score_fn`:
user vector at the last history position . item table^T, the final block run for that
position only) followed, on device, by the exclusion of PAD/OOV and of the given history
ids, and ``lax.top_k``::

    serve(weights, item_ids[b, l] i32, timestamps[b, l, 2] i32,
          query_timestamps[b, l, 2] i32, exclude_ids[b, l] i32) -> (scores[b, K] f32, ids[b, K] i32)

Both ``b`` and ``l`` are symbolic: a caller picks the padded shape per call, and a short
history runs short (positions are right-aligned and HSTU's attention scale is the fixed
``max_len``, so trimming left padding leaves the scores unchanged; tested).
Sequences are right-aligned (left padding with 0, last column = most recent item);
``query_timestamps[:, i]`` is the time at which position i's prediction is made (the
next item's timestamp, and for the last column the request time), as in training.
Excluded candidates score ``-inf``; callers drop those.

Times: requests carry int64 unix seconds, the device takes int32. As in training
(:func:`trainers.input_pipeline.model_batch`), each time goes in as the int32 (high,
low) words of its offset from the row's latest query time
(:func:`trainers.features.time_words`) and HSTU subtracts word by word: no date or gap
overflows, and the scores are the trainer's for the same int64 times (the server's
predictor converts them). Bundles of format 1 and 2 take plain int32 offsets ``[b, l]``
(exact for gaps under 2**31 s).

Writing a bundle needs the model code (Flax); loading one needs only ``jax`` and
``numpy`` (the serving image has nothing else), which is why Flax and the trainer are
imported inside :func:`export_bundle` only.

Ranking bundles (``"task": "ranking"``)::

    bundle.json          format, task, model, the input signature, weight names/shapes,
                         the feature names, sha256 of every file, provenance
    model.stablehlo      ``jax.export`` artifact, symbolic batch ``b``
    weights.npz          the model's variables (``params`` and batch-norm ``batch_stats``)
    dataset_info.json    the dataset's :class:`trainers.ranking_features.RankingInfo`
                         (feature names and kinds, dense statistics, hash buckets): used
    vocab/<feature>.txt  the vocabulary of each vocabulary feature: used
    config.json          the exact TrainConfig (reference only)

The exported function is the trainer's evaluation forward pass
(``model.apply(variables, batch, deterministic=True)``, batch norm on its running
averages) followed by the sigmoid::

    serve(weights, dense[b, Nd] f32, dense_missing[b, Nd] f32, sparse[b, Nc] i32,
          multi_hot/<name>[b, M] i32 ...) -> probabilities[b] f32

with only the inputs the dataset has, in the order of ``signature.inputs`` (the batch
contract of :class:`trainers.input_pipeline.RankingData`). Serving maps raw feature
values to these inputs with :func:`trainers.ranking_features.transform_rows` on the
bundle's own ``dataset_info.json`` and vocabularies: the transform preprocessing applied,
with no TensorFlow and no dataset directory.

int8 tables (``recml export --quantize int8``): every embedding table (a parameter whose
logical axes are (vocab, embed), :func:`trainers.sharding.find_tables`) is stored in
``weights.npz`` as int8, in its float32 leaf's place, and its float16 scales (one per
row, or per group of rows for narrow tables: :mod:`trainers.quantize`) follow the
leaves. The exported function takes them as they are stored and dequantizes each table
before the model runs, so the weights a server holds are the int8 ones; every other
parameter stays as trained. ``bundle.json``'s ``quantization`` names the scheme and,
per table, its weight and scale inputs, ``rows_per_scale`` and the bytes stored against
float32 (``embedding_bytes``). A reader needs no change: the function's inputs are the
stored arrays (no format version bump; a bundle without ``quantization`` is ``none``).

TF SavedModel: not written. Native ``jax2tf`` output (StableHLO inside ``XlaCallModule``)
of JAX 0.10.2 does not load in TF 2.21 (measured here). ``jax2tf.convert(...,
native_serialization=False)`` (TF graph ops, no StableHLO) still converts a trivial
function in JAX 0.10.2, so it may avoid the mismatch. It was not tried on these models,
and the serving path does not need it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from trainers import features

FORMAT = "recml-serving-bundle"
FORMAT_VERSION = 4
# Versions this code loads: 1 had a fixed history length (max_len), 2 a symbolic one,
# 3 takes times as int32 words [b, l, 2] (1 and 2: int32 offsets [b, l]), 4 names its
# task (retrieval or ranking; earlier versions are retrieval).
LOADABLE_VERSIONS = (1, 2, 3, 4)
RETRIEVAL, RANKING = "retrieval", "ranking"
BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.stablehlo"
WEIGHTS_FILE = "weights.npz"
VOCAB_FILE = features.ITEM_VOCAB_FILE
DEFAULT_MAX_K = 100
# Platforms the StableHLO is lowered for: the serving image runs on CPU; an endpoint with
# an accelerator can load the same bundle.
PLATFORMS = ("cpu", "cuda", "tpu")
INPUTS = ("item_ids", "timestamps", "query_timestamps", "exclude_ids")
TIME_INPUTS = ("timestamps", "query_timestamps")
TIME_UNITS = ("int32 (high, low) words of the offset in seconds from the row's latest query "
              "time (trainers.features.time_words)")
OUTPUTS = ("scores", "ids")
NONE, INT8 = "none", "int8"
QUANTIZE = (NONE, INT8)  # how embedding tables are stored (bundle.json's quantization)


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _weight_name(i: int) -> str:
  return f"w{i:03d}"


# ---------------------------------------------------------------------------
# Writing (needs the model code)
# ---------------------------------------------------------------------------


def serving_function(model, max_k: int):
  """``(weights, item_ids, timestamps, query_timestamps, exclude_ids) -> (scores, ids)``.

  ``weights`` is the flat list of the model's parameter leaves (``jax.tree.leaves``
  order of ``params``); the function rebuilds the tree itself, so the exported artifact
  takes a plain tuple of arrays.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from trainers import evaluate  # pylint: disable=g-import-not-at-top
  score = evaluate.make_score_fn(model)

  def make(treedef):
    def serve(weights, item_ids, timestamps, query_timestamps, exclude_ids):
      params = jax.tree.unflatten(treedef, list(weights))
      batch = {"history": item_ids, "timestamps": timestamps,
               "query_timestamps": query_timestamps}
      scores = score(params, batch)                                   # [b, V]
      b, vocab = scores.shape
      excluded = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], exclude_ids].set(True)
      excluded = excluded.at[:, :features.FIRST_ITEM_ID].set(True)     # PAD, OOV
      scores = jnp.where(excluded, -jnp.inf, scores)
      top_scores, top_ids = jax.lax.top_k(scores, max_k)
      return top_scores, top_ids.astype(jnp.int32)
    return serve

  return make


def export_model(model, params, max_len: int, max_k: int,
                 platforms: Sequence[str] = PLATFORMS,
                 int8_tables: Mapping[str, str] | None = None):
  """``(jax.export.Exported, weights, treedef)`` of the serving function (batch and
  length symbolic); ``weights`` are its weight inputs (:func:`pack_weights`: the
  ``params`` leaves, the ``int8_tables`` among them as int8, then their scales)."""
  packed = pack_weights(params, int8_tables or {})
  exported = _export_retrieval(model, packed, max_len, max_k, platforms)
  return exported, packed.arrays, packed.treedef


def _export_retrieval(model, packed: PackedWeights, max_len: int, max_k: int,
                      platforms: Sequence[str]):
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  fn = packed.wrap(serving_function(model, max_k)(packed.treedef))
  b, length = export.symbolic_shape("b, l", constraints=[f"l <= {int(max_len)}"])
  seq = jax.ShapeDtypeStruct((b, length), np.int32)
  times = jax.ShapeDtypeStruct((b, length, 2), np.int32)  # features.time_words
  return export.export(jax.jit(fn), platforms=tuple(platforms))(
      packed.avals(), seq, times, times, seq)


# ---------------------------------------------------------------------------
# int8 embedding tables
# ---------------------------------------------------------------------------


def check_quantize(quantize: str) -> str:
  """``quantize`` if it is one of :data:`QUANTIZE`, else a ValueError naming it."""
  if quantize not in QUANTIZE:
    raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
  return quantize


def embedding_tables(task, model, prefix: str = "") -> dict[str, str]:
  """``{leaf path: table name}`` of the model's embedding tables
  (:func:`trainers.sharding.find_tables` of its boxed params, ``task.init`` traced
  only); paths are ``/``-joined keys after ``prefix`` (``params/`` when the exported
  tree is the whole variables dict)."""
  import jax  # pylint: disable=g-import-not-at-top
  from trainers import sharding  # pylint: disable=g-import-not-at-top
  boxed = jax.eval_shape(lambda: task.init(model, jax.random.key(0)))["params"]
  return {prefix + "/".join(t.path): t.name for t in sharding.find_tables(boxed)}


@dataclasses.dataclass
class PackedWeights:
  """The exported function's weight inputs: the leaves of the model's tree, each
  int8 table in its leaf's place, then one float16 scale array per int8 table."""

  arrays: tuple[np.ndarray, ...]
  paths: tuple[str, ...]        # a leaf's tree path (``jax.tree_util.keystr``)
  treedef: Any
  tables: tuple[dict[str, Any], ...]  # name, leaf, rows, dim, dtype, rows_per_scale
  table_sizes: tuple[dict[str, Any], ...]  # every table: name, leaf, rows, dim

  @property
  def num_leaves(self) -> int:
    return len(self.paths)

  def avals(self):
    import jax  # pylint: disable=g-import-not-at-top
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self.arrays)

  def unpack(self, weights) -> list[Any]:
    """The model's leaves from the weight inputs (int8 tables dequantized; traced)."""
    from trainers import quantize  # pylint: disable=g-import-not-at-top
    leaves = list(weights[:self.num_leaves])
    for j, t in enumerate(self.tables):
      leaves[t["leaf"]] = quantize.dequantize_table(
          leaves[t["leaf"]], weights[self.num_leaves + j], t["rows_per_scale"], t["dtype"])
    return leaves

  def wrap(self, fn):
    """``fn(leaves, *inputs)`` -> ``serve(weights, *inputs)`` taking the packed inputs."""
    if not self.tables:
      return fn
    return lambda weights, *inputs: fn(tuple(self.unpack(weights)), *inputs)

  def signature(self) -> list[dict[str, Any]]:
    """``signature.weights``: name, tree path, shape, dtype of every input (a scale's
    path is its table's with `` scale``)."""
    paths = list(self.paths) + [self.paths[t["leaf"]] + " scale" for t in self.tables]
    return [{"name": _weight_name(i), "path": p, "shape": list(a.shape), "dtype": str(a.dtype)}
            for i, (p, a) in enumerate(zip(paths, self.arrays))]

  def record(self) -> dict[str, Any]:
    """``bundle.json``'s ``quantization``: the scheme, and per embedding table its
    weight (and scale), shape and bytes stored against float32."""
    int8 = {t["leaf"]: (j, t) for j, t in enumerate(self.tables)}
    tables = []
    for t in self.table_sizes:
      entry = {"name": t["name"], "weight": _weight_name(t["leaf"]), "rows": t["rows"],
               "dim": t["dim"], "float32_bytes": 4 * t["rows"] * t["dim"],
               "dtype": str(self.arrays[t["leaf"]].dtype),
               "bytes": int(self.arrays[t["leaf"]].nbytes)}
      if t["leaf"] in int8:
        j, q = int8[t["leaf"]]
        scale = self.arrays[self.num_leaves + j]
        entry.update(scale=_weight_name(self.num_leaves + j), scale_dtype=str(scale.dtype),
                     rows_per_scale=q["rows_per_scale"],
                     bytes=entry["bytes"] + int(scale.nbytes))
      tables.append(entry)
    fp32 = sum(t["float32_bytes"] for t in tables)
    stored = sum(t["bytes"] for t in tables)
    return {"scheme": INT8 if self.tables else NONE, "tables": tables,
            "embedding_bytes": {"float32": fp32, "stored": stored,
                                "ratio": round(fp32 / stored, 4) if stored else None}}


def pack_weights(tree: Any, int8_tables: Mapping[str, str],
                 all_tables: Mapping[str, str] | None = None) -> PackedWeights:
  """The weight inputs of ``tree``: ``int8_tables`` (``{leaf path: table name}``,
  :func:`embedding_tables`) quantized (:mod:`trainers.quantize`), the rest as they are.
  ``all_tables`` (default ``int8_tables``) are the tables ``record`` reports.

  Raises:
    ValueError: a table that is not a leaf of ``tree``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from trainers import quantize  # pylint: disable=g-import-not-at-top
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  index = {jax.tree_util.keystr(p, simple=True, separator="/"): i
           for i, (p, _) in enumerate(flat)}
  all_tables = int8_tables if all_tables is None else all_tables
  missing = sorted((set(int8_tables) | set(all_tables)) - set(index))
  if missing:
    raise ValueError(f"embedding table(s) {', '.join(missing)} are not parameters of the model")
  arrays = [np.asarray(w) for _, w in flat]
  sizes = tuple({"name": name, "leaf": index[path], "rows": int(arrays[index[path]].shape[0]),
                 "dim": int(arrays[index[path]].shape[1])}
                for path, name in sorted(all_tables.items(), key=lambda kv: index[kv[0]]))
  tables, scales = [], []
  for path, name in sorted(int8_tables.items(), key=lambda kv: index[kv[0]]):
    i = index[path]
    rows, dim = arrays[i].shape
    group = quantize.rows_per_scale(rows, dim)
    arrays[i], scale = quantize.quantize_table(arrays[i], group, name)
    tables.append({"name": name, "leaf": i, "rows": int(rows), "dim": int(dim),
                   "dtype": str(np.asarray(flat[i][1]).dtype), "rows_per_scale": group})
    scales.append(scale)
  return PackedWeights(arrays=tuple(arrays + scales),
                       paths=tuple(jax.tree_util.keystr(p) for p, _ in flat),
                       treedef=treedef, tables=tuple(tables), table_sizes=sizes)


def _item_id_type(vocab: Sequence[str]) -> str:
  """``int`` when every raw id is a canonical integer (MovieLens), else ``str``."""
  for raw in vocab[features.FIRST_ITEM_ID:]:
    try:
      if str(int(raw)) != raw:
        return "str"
    except ValueError:
      return "str"
  return "int"


def export_bundle(workdir: str, out_dir: str, data_dir: str | None = None,
                  max_k: int = DEFAULT_MAX_K,
                  platforms: Sequence[str] = PLATFORMS,
                  quantize: str = NONE) -> dict[str, Any]:
  """Writes the serving bundle of a training work directory's selected checkpoint.

  Args:
    workdir: a training work directory (the train step's Model artifact).
    out_dir: the bundle directory (created; must be empty or absent).
    data_dir: the dataset directory: for retrieval the one holding ``vocab/items.txt``
      (default: the work directory when it has one, else the config's ``data_dir``); for
      ranking the one holding ``dataset_info.json`` and ``vocab/`` (default: the
      config's ``data_dir``).
    max_k: the largest ``k`` a request may ask for (capped at the number of items;
      retrieval only).
    platforms: platforms to lower for.
    quantize: ``none`` (float32 weights) or ``int8``: every embedding table stored as
      int8 with float16 scales (:mod:`trainers.quantize`), dequantized inside the
      exported function; the other parameters stay as trained.

  Returns:
    The bundle's ``bundle.json`` content.
  """
  from trainers import configs  # pylint: disable=g-import-not-at-top
  from trainers.checkpoints import load_config_dict  # pylint: disable=g-import-not-at-top
  check_quantize(quantize)
  if configs.TrainConfig.from_dict(load_config_dict(workdir)).task == RANKING:
    return export_ranking_bundle(workdir, out_dir, data_dir, platforms, quantize)
  from trainers import evaluate, tasks  # pylint: disable=g-import-not-at-top
  config, model, params, meta = evaluate.load_model(workdir)
  vocab_dir = data_dir
  if vocab_dir is None:
    has_vocab = os.path.exists(os.path.join(workdir, VOCAB_FILE))
    vocab_dir = workdir if has_vocab else config.data_dir
  vocab = features.load_item_vocab(vocab_dir)
  vocab_size = config.model_config.vocab_size
  if len(vocab) != vocab_size:
    raise ValueError(f"{vocab_dir}/{VOCAB_FILE} has {len(vocab)} ids but the model's item "
                     f"table has {vocab_size} rows: wrong dataset for this model")
  max_len = config.model_config.max_len
  max_k = max(1, min(int(max_k), vocab_size - features.FIRST_ITEM_ID))
  tables = embedding_tables(tasks.for_config(config), model)
  packed = pack_weights(params, tables if quantize == INT8 else {}, tables)

  _new_bundle_dir(out_dir)
  os.makedirs(os.path.join(out_dir, "vocab"), exist_ok=True)
  exported = _export_retrieval(model, packed, max_len, max_k, platforms)
  weights = _write_model(out_dir, exported, packed)
  with open(os.path.join(out_dir, VOCAB_FILE), "w", encoding="utf-8") as f:
    f.write("".join(f"{v}\n" for v in vocab))
  _copy_config(workdir, out_dir)
  info = os.path.join(workdir, features.DATASET_INFO_FILE)
  if not os.path.exists(info):
    info = os.path.join(vocab_dir, features.DATASET_INFO_FILE)
  if os.path.exists(info):
    shutil.copyfile(info, os.path.join(out_dir, features.DATASET_INFO_FILE))

  record = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "task": RETRIEVAL,
      "model": config.model,
      "max_len": max_len,
      # A cloze model (BERT4Rec) scores a [MASK] appended after the history, in the last
      # column: a history of n items runs in n + 1 columns (at most max_len).
      "mask_slot": bool(getattr(config.model_config, "CLOZE", False)),
      "max_k": max_k,
      "item_vocab_size": vocab_size,
      "item_id_type": _item_id_type(vocab),
      "platforms": list(exported.platforms),
      "signature": {
          "inputs": {n: ({"shape": ["b", "l", 2], "dtype": "int32", "units": TIME_UNITS}
                         if n in TIME_INPUTS else {"shape": ["b", "l"], "dtype": "int32"})
                     for n in INPUTS},
          "weights": weights,
          "outputs": {"scores": {"shape": ["b", max_k], "dtype": "float32"},
                      "ids": {"shape": ["b", max_k], "dtype": "int32"}},
      },
      "quantization": packed.record(),
      "source": _source(workdir, vocab_dir, meta),
  }
  return _finish(out_dir, record)


def _new_bundle_dir(out_dir: str) -> None:
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty")
  os.makedirs(out_dir, exist_ok=True)


def _write_model(out_dir: str, exported, packed: PackedWeights) -> list[dict[str, Any]]:
  """Writes ``model.stablehlo`` and ``weights.npz``; returns the weights' signature."""
  with open(os.path.join(out_dir, MODEL_FILE), "wb") as f:
    f.write(exported.serialize())
  np.savez(os.path.join(out_dir, WEIGHTS_FILE),
           **{_weight_name(i): a for i, a in enumerate(packed.arrays)})
  return packed.signature()


def _copy_config(workdir: str, out_dir: str) -> None:
  from trainers.checkpoints import CONFIG_FILE  # pylint: disable=g-import-not-at-top
  shutil.copyfile(os.path.join(workdir, CONFIG_FILE), os.path.join(out_dir, CONFIG_FILE))


def _source(workdir: str, data_dir: str, checkpoint_meta: dict[str, Any] | None
            ) -> dict[str, Any]:
  """Provenance: the work directory, the dataset, the selected epoch and its metrics
  (``checkpoint_meta``: the best checkpoint's record, when at hand)."""
  metrics = {}
  metrics_file = os.path.join(workdir, "metrics.json")
  if os.path.exists(metrics_file):
    with open(metrics_file, encoding="utf-8") as f:
      metrics = json.load(f)
  return {
      "workdir": os.path.abspath(workdir),
      "vocab_dir": os.path.abspath(data_dir),
      "checkpoint_meta": checkpoint_meta,
      "selected_epoch": metrics.get("selected_epoch"),
      "valid": metrics.get("valid", {}),
      "test": metrics.get("test", {}),
  }


def _finish(out_dir: str, record: dict[str, Any]) -> dict[str, Any]:
  """Adds the creation time and every file's sha256, writes ``bundle.json``."""
  files = sorted(
      os.path.relpath(os.path.join(d, n), out_dir)
      for d, _, names in os.walk(out_dir) for n in names)
  record["created"] = datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds")
  record["sha256"] = {name: _sha256(os.path.join(out_dir, name)) for name in files}
  with open(os.path.join(out_dir, BUNDLE_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True, default=str)
  return record


# ---------------------------------------------------------------------------
# Ranking bundles
# ---------------------------------------------------------------------------


def ranking_inputs(info) -> list[dict[str, Any]]:
  """The exported ranking function's inputs after the weights, in order: name, shape
  (``"b"`` symbolic), dtype; only the features the dataset has (a
  :class:`trainers.ranking_features.RankingInfo`)."""
  from trainers import ranking_features as rf  # pylint: disable=g-import-not-at-top
  out = []
  if info.dense:
    out += [{"name": n, "shape": ["b", len(info.dense)], "dtype": "float32"}
            for n in (rf.DENSE, rf.DENSE_MISSING)]
  if info.scalar_categorical:
    out.append({"name": rf.SPARSE, "shape": ["b", len(info.scalar_categorical)],
                "dtype": "int32"})
  out += [{"name": rf.multi_hot_key(f.name), "shape": ["b", f.multi_hot], "dtype": "int32"}
          for f in info.multi_hot]
  return out


def ranking_serving_function(model, names: Sequence[str]):
  """``treedef -> serve(weights, *inputs) -> probabilities [b]``: the trainer's
  evaluation forward pass (``deterministic=True``) and the sigmoid; ``inputs`` are the
  batch arrays ``names`` (:func:`ranking_inputs`), ``weights`` the variables' leaves."""
  import jax  # pylint: disable=g-import-not-at-top

  def make(treedef):
    def serve(weights, *inputs):
      variables = jax.tree.unflatten(treedef, list(weights))
      logits = model.apply(variables, dict(zip(names, inputs)), deterministic=True)
      return jax.nn.sigmoid(logits)
    return serve

  return make


def export_ranking_bundle(workdir: str, out_dir: str, data_dir: str | None = None,
                          platforms: Sequence[str] = PLATFORMS,
                          quantize: str = NONE) -> dict[str, Any]:
  """Writes the ranking bundle of a work directory (see :func:`export_bundle`)."""
  check_quantize(quantize)
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  from trainers import ranking_features as rf  # pylint: disable=g-import-not-at-top
  from trainers import ranking_eval  # pylint: disable=g-import-not-at-top
  # the selected checkpoint, after checking that data_dir is the model's dataset
  config, task, model, variables = ranking_eval.load_selected(workdir, data_dir)
  data_dir, info = config.data_dir, task.info
  rf.load_vocabs(data_dir, info)  # every vocabulary file is there and of the right size
  inputs = ranking_inputs(info)
  tables = embedding_tables(task, model, "params/")
  packed = pack_weights(variables, tables if quantize == INT8 else {}, tables)
  fn = packed.wrap(ranking_serving_function(model, [i["name"] for i in inputs])(packed.treedef))
  (b,) = export.symbolic_shape("b")
  args = [jax.ShapeDtypeStruct((b, i["shape"][1]), np.dtype(i["dtype"])) for i in inputs]
  exported = export.export(jax.jit(fn), platforms=tuple(platforms))(packed.avals(), *args)

  _new_bundle_dir(out_dir)
  weight_specs = _write_model(out_dir, exported, packed)
  shutil.copyfile(os.path.join(data_dir, rf.DATASET_INFO_FILE),
                  os.path.join(out_dir, rf.DATASET_INFO_FILE))
  vocab_features = [f.name for f in info.categorical if f.kind == rf.VOCAB]
  if vocab_features:
    os.makedirs(os.path.join(out_dir, rf.VOCAB_DIR))
  for name in vocab_features:
    shutil.copyfile(os.path.join(data_dir, rf.vocab_file(name)),
                    os.path.join(out_dir, rf.vocab_file(name)))
  _copy_config(workdir, out_dir)
  record = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "task": RANKING,
      "model": config.model,
      "platforms": list(exported.platforms),
      "features": {
          "label": info.label,
          "dense": info.dense_names,
          "categorical": [{"name": f.name, "kind": f.kind, "multi_hot": f.multi_hot}
                          for f in info.categorical],
      },
      "signature": {
          "inputs": inputs,
          "weights": weight_specs,
          "outputs": {"probabilities": {"shape": ["b"], "dtype": "float32"}},
      },
      "quantization": packed.record(),
      "source": _source(workdir, data_dir, None),
  }
  return _finish(out_dir, record)


# ---------------------------------------------------------------------------
# Loading (jax + numpy only)
# ---------------------------------------------------------------------------


class BundleError(ValueError):
  """A bundle directory that is incomplete, corrupt or of an unknown format."""


@dataclasses.dataclass
class Bundle:
  """A loaded bundle: the deserialised model, its weights and what maps raw values to
  its inputs (retrieval: the item vocabulary; ranking: the dataset's features)."""

  path: str
  meta: dict[str, Any]
  exported: Any                 # jax.export.Exported (None: loaded with model=False)
  weights: tuple[np.ndarray, ...]
  vocab: list[str]              # retrieval: raw item id of each index ([] for ranking)
  index: dict[Any, int]         # raw id -> item index (admitted items only); canonical
                                # integer ids are keyed by both their str and int form
  ranking_info: Any = None      # ranking: trainers.ranking_features.RankingInfo
  ranking_vocabs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

  @property
  def task(self) -> str:
    """``retrieval`` or ``ranking`` (bundles before version 4 are retrieval)."""
    return self.meta.get("task", RETRIEVAL)

  @property
  def quantization(self) -> str:
    """How its embedding tables are stored: ``none`` (float32; every bundle before
    ``quantization`` was recorded) or ``int8``."""
    return self.meta.get("quantization", {}).get("scheme", NONE)

  @property
  def max_len(self) -> int:
    return int(self.meta["max_len"])

  @property
  def max_k(self) -> int:
    return int(self.meta["max_k"])

  @property
  def mask_slot(self) -> bool:
    """Whether the model appends a ``[MASK]`` after the history (BERT4Rec): a history
    of n items then needs n + 1 columns."""
    return bool(self.meta.get("mask_slot", False))

  @property
  def input_names(self) -> list[str]:
    """Ranking: the exported function's inputs after the weights, in order."""
    return [i["name"] for i in self.meta["signature"]["inputs"]]

  def lookup(self, raw_ids: Sequence[Any]) -> list[int]:
    """Raw ids (str or int, not bool or float) -> item indices; unknown ids map to OOV."""
    get = self.index.get
    return [get(r, features.OOV_ID) for r in raw_ids]

  def raw_ids(self, indices: Sequence[int]) -> list[Any]:
    """Item indices -> raw ids (ints when the vocabulary is all integers)."""
    raw = [self.vocab[int(i)] for i in indices]
    return [int(r) for r in raw] if self.meta.get("item_id_type") == "int" else raw

  def transform(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
    """Ranking: raw feature rows (dicts) -> the exported function's inputs ``{name:
    [n, ...]}`` (:func:`trainers.ranking_features.transform_rows`, ids as int32).

    Raises:
      ValueError: a bad value or an unknown feature, naming the row and the feature.
    """
    from trainers import ranking_features as rf  # pylint: disable=g-import-not-at-top
    out = rf.transform_rows(rows, self.ranking_info, self.ranking_vocabs)
    return {n: out[n].astype(np.int32) if out[n].dtype == np.int64 else out[n]
            for n in self.input_names}


def _read_meta(path: str) -> dict[str, Any]:
  """bundle.json of a bundle directory, after checking its format and version."""
  meta_path = os.path.join(path, BUNDLE_FILE)
  if not os.path.isfile(meta_path):
    raise BundleError(f"{meta_path} not found: not a serving bundle (run `recml export`?)")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("format_version") not in LOADABLE_VERSIONS:
    raise BundleError(f"{path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                      f"expected {FORMAT!r} v{'/'.join(map(str, LOADABLE_VERSIONS))}")
  if meta.get("task", RETRIEVAL) not in (RETRIEVAL, RANKING):
    raise BundleError(f"{path}: unknown task {meta.get('task')!r}")
  return meta


def _required_files(meta: dict[str, Any]) -> tuple[str, ...]:
  if meta.get("task", RETRIEVAL) == RANKING:
    return (MODEL_FILE, WEIGHTS_FILE, features.DATASET_INFO_FILE)
  return (MODEL_FILE, WEIGHTS_FILE, VOCAB_FILE)


def _check_digests(path: str, meta: dict[str, Any]) -> None:
  for name, digest in meta.get("sha256", {}).items():
    file = os.path.join(path, name)
    if not os.path.isfile(file) or _sha256(file) != digest:
      raise BundleError(f"{path}: {name} is missing or does not match its sha256")


def load_bundle(path: str, verify: bool = True, model: bool = True) -> Bundle:
  """Reads a bundle directory; ``verify`` checks every file's sha256 against bundle.json.

  ``model=False`` reads the metadata and vocabularies only (no JAX import): ``exported``
  is None and ``weights`` empty.
  """
  meta = _read_meta(path)
  for name in _required_files(meta):
    if not os.path.isfile(os.path.join(path, name)):
      raise BundleError(f"{path}: {name} is missing")
  if verify:
    _check_digests(path, meta)
  exported, weights = _load_model(path, meta) if model else (None, ())
  if meta.get("task", RETRIEVAL) == RANKING:
    return _ranking_bundle(path, meta, exported, weights)
  vocab = features.load_item_vocab(path)
  if len(vocab) != int(meta["item_vocab_size"]):
    raise BundleError(f"{path}: {VOCAB_FILE} has {len(vocab)} ids, bundle.json says "
                      f"{meta['item_vocab_size']}")
  index: dict[Any, int] = {}
  for i, raw in enumerate(vocab[features.FIRST_ITEM_ID:], features.FIRST_ITEM_ID):
    index[raw] = i
    if raw.lstrip("-").isdigit() and str(int(raw)) == raw:  # JSON integers find "123"
      index[int(raw)] = i
  return Bundle(path=os.path.abspath(path), meta=meta, exported=exported, weights=weights,
                vocab=vocab, index=index)


def _ranking_bundle(path: str, meta: dict[str, Any], exported, weights) -> Bundle:
  """A ranking bundle's features (``dataset_info.json``, ``vocab/``), checked against its
  signature."""
  from trainers import ranking_features as rf  # pylint: disable=g-import-not-at-top
  try:
    info = rf.load_info(path)
    vocabs = rf.load_vocabs(path, info)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise BundleError(f"{path}: its features cannot be read: {type(e).__name__}: {e}") from None
  if ranking_inputs(info) != meta["signature"]["inputs"]:
    raise BundleError(f"{path}: {rf.DATASET_INFO_FILE} does not match the model's inputs "
                      f"{meta['signature']['inputs']}")
  return Bundle(path=os.path.abspath(path), meta=meta, exported=exported, weights=weights,
                vocab=[], index={}, ranking_info=info, ranking_vocabs=vocabs)


def _load_model(path: str, meta: dict[str, Any]):
  """``(jax.export.Exported, weights)`` of a bundle, weights checked against its inputs."""
  from jax import export  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, MODEL_FILE), "rb") as f:
    exported = export.deserialize(bytearray(f.read()))
  specs = meta["signature"]["weights"]
  try:
    with np.load(os.path.join(path, WEIGHTS_FILE), allow_pickle=False) as npz:
      weights = tuple(npz[s["name"]] for s in specs)
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise BundleError(f"{path}: {WEIGHTS_FILE} is unreadable: {type(e).__name__}: {e}") from None
  expected = exported.in_avals[:len(weights)]
  inputs = (len(meta["signature"]["inputs"]) if meta.get("task") == RANKING
            else len(INPUTS))
  if len(exported.in_avals) != len(weights) + inputs or any(
      tuple(a.shape) != w.shape or a.dtype != w.dtype for a, w in zip(expected, weights)):
    raise BundleError(f"{path}: weights.npz does not match the exported model's inputs")
  return exported, weights


# ---------------------------------------------------------------------------
# Verifying (files only, no JAX)
# ---------------------------------------------------------------------------


def verify_bundle_files(path: str) -> dict[str, Any]:
  """Checks format and sha256 of every file (no JAX needed); returns bundle.json."""
  meta = _read_meta(path)
  for name in _required_files(meta):
    if name not in meta.get("sha256", {}):
      raise BundleError(f"{path}: bundle.json lists no sha256 for {name}")
  _check_digests(path, meta)
  return meta
