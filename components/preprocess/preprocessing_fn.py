"""The tf.transform ``preprocessing_fn`` of the sequence and of the ranking dataset.

Vocabularies learned here are saved in ``transform_fn/`` and are exactly the
ones serving applies.

Item ids map to the contract of ``trainers.features``: ``PAD_ID`` (0) is never
produced, items below the admission threshold (and unknown items at serving
time) map to ``OOV_ID`` (1), admitted items to ``FIRST_ITEM_ID + rank`` where
rank orders items by descending frequency. Ties (equal frequency) are ordered by
the raw id's bytes, *descending* (tf.transform's rule): items ``"20"`` and
``"30"`` seen equally often rank ``"30"`` first. User vocabularies follow the
same rule.

Vocabularies count with unit weights: tf.transform then reduces each batch to
(unique token, count) in TensorFlow before Beam sees it, instead of one Beam
element per event. Counts are float32 per batch and summed in Python floats,
exact up to 2**53 events per token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf
import tensorflow_transform as tft

from trainers import features

ITEM_VOCAB = "item"     # vocabulary file names under transform_fn/assets/
USER_VOCAB = "user"


def vocab_name(column: str) -> str:
  """The vocabulary file name of a side feature."""
  return column


def make_preprocessing_fn(
    *,
    min_item_count: int = 1,
    user_encoding: str = "vocabulary",
    user_hash_buckets: int = 1 << 20,
    side_features: Sequence[str] = (),
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
  """Builds the ``preprocessing_fn`` of the sequence dataset.

  Args:
    min_item_count: items seen fewer times map to ``OOV_ID``.
    user_encoding: ``"vocabulary"`` (index by descending frequency) or
      ``"hash"`` (``user_hash_buckets`` buckets; collisions share an index).
    user_hash_buckets: buckets for ``user_encoding="hash"``.
    side_features: raw columns (e.g. ``category``) to index through a vocabulary
      each (index 0.. by descending frequency; unknown values -> -1).

  Returns:
    ``preprocessing_fn(inputs) -> outputs`` with ``features.USER_ID``,
    ``"item_id"`` (int64 per event) and ``<side>_id`` per side feature.
  """
  if user_encoding not in ("vocabulary", "hash"):
    raise ValueError(f"user_encoding must be 'vocabulary' or 'hash', got {user_encoding!r}")

  def preprocessing_fn(inputs):
    item = inputs[features.RAW_ITEM]
    ones = tf.ones_like(item, dtype=tf.float32)
    item_vocab = tft.vocabulary(item, weights=ones, frequency_threshold=min_item_count if min_item_count > 1 else None,
                                vocab_filename=ITEM_VOCAB)
    rank = tft.apply_vocabulary(item, item_vocab, default_value=-1)
    outputs = {"item_id": tf.where(rank < 0, tf.constant(features.OOV_ID, tf.int64),
                                   rank + features.FIRST_ITEM_ID)}
    user = inputs[features.RAW_USER]
    if user_encoding == "vocabulary":
      user_vocab = tft.vocabulary(user, weights=ones, vocab_filename=USER_VOCAB)
      outputs[features.USER_ID] = tft.apply_vocabulary(user, user_vocab, default_value=-1)
    else:
      outputs[features.USER_ID] = tf.strings.to_hash_bucket_fast(user, user_hash_buckets)
    for column in side_features:
      x = inputs[column]
      vocab = tft.vocabulary(x, weights=ones, vocab_filename=vocab_name(column))
      outputs[f"{column}_id"] = tft.apply_vocabulary(x, vocab, default_value=-1)
    return outputs

  return preprocessing_fn


# ---------------------------------------------------------------------------
# The ranking (CTR) dataset: trainers.ranking_features names the outputs.
# ---------------------------------------------------------------------------

DENSE_MEAN = "_dense_mean"  # analyzer results, emitted per row so that the step can
DENSE_STD = "_dense_std"    # record them; not written to the TFRecords


def ctr_vocab_name(index: int) -> str:
  """The vocabulary file (under transform_fn/assets/) of the index-th categorical feature."""
  return f"ctr_{index}"


def make_ctr_preprocessing_fn(spec) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
  """Builds the ``preprocessing_fn`` of the ranking dataset (analysed on train only).

  Inputs are the raw columns of ``ctr_sources.arrow_schema(spec)``: the label, the
  dense features as one ``SparseTensor [B, Nd]`` holding the present values, one
  column per categorical feature (values for vocabulary features, ``FIRST_ID +
  hash_bucket`` ids for hashed ones; ragged for multi-hot).

  Args:
    spec: a resolved ``ctr_spec.CtrSpec``.

  Returns:
    ``preprocessing_fn(inputs)`` with the features of ``trainers.ranking_features``:
    ``dense`` (``(log1p(max(x, 0)) - mean) / std`` with train's mean and population
    std per feature, in float32; 0 where missing; a feature with std 0 is only
    centred, one never present in train has mean 0 and std 1), ``dense_missing``,
    ``sparse`` (vocabulary features: ``FIRST_ID`` + rank by descending train count
    among values seen ``min_count`` times, else ``OOV_ID``), ``multi_hot/<name>``
    (truncated / 0-padded to the feature's length), ``label``, plus ``DENSE_MEAN`` and
    ``DENSE_STD`` (the statistics, per row).
  """
  from components.preprocess import ctr_sources  # pylint: disable=g-import-not-at-top
  from trainers import ranking_features as rf  # pylint: disable=g-import-not-at-top

  nd = len(spec.dense)
  features = (*spec.categorical, *spec.multi_hot_names)
  sizes = dict(spec.multi_hot)

  def ids_of(name: str, index: int, x):
    if spec.is_hashed(name):
      return x
    ones = tf.ones_like(x, dtype=tf.float32)
    count = spec.min_count[name]
    vocab = tft.vocabulary(x, weights=ones, frequency_threshold=count if count > 1 else None,
                           vocab_filename=ctr_vocab_name(index))
    rank = tft.apply_vocabulary(x, vocab, default_value=-1)
    return tf.where(rank < 0, tf.constant(rf.OOV_ID, tf.int64), rank + rf.FIRST_ID)

  def preprocessing_fn(inputs):
    label = inputs[ctr_sources.LABEL_COLUMN]
    outputs = {rf.LABEL: label}
    rows = tf.shape(label)[0]
    if nd:
      x = inputs[ctr_sources.DENSE_INPUT]
      logs = tf.math.log1p(tf.maximum(x.values, 0.0))
      present = tf.SparseTensor(x.indices, logs, x.dense_shape)
      mean = tft.mean(present, reduce_instance_dims=False, output_dtype=tf.float64)
      std = tf.sqrt(tft.var(present, reduce_instance_dims=False, output_dtype=tf.float64))
      mean = tf.cast(tf.where(tf.math.is_finite(mean), mean, 0.0), tf.float32)
      std = tf.cast(tf.where(tf.math.is_finite(std), std, 1.0), tf.float32)
      scale = tf.where(std > 0, std, 1.0)
      column = x.indices[:, 1]
      z = (logs - tf.gather(mean, column)) / tf.gather(scale, column)
      dense = tf.sparse.to_dense(tf.SparseTensor(x.indices, z, x.dense_shape))
      seen = tf.sparse.to_dense(tf.SparseTensor(x.indices, tf.ones_like(z), x.dense_shape))
      outputs[rf.DENSE] = tf.reshape(dense, [-1, nd])
      outputs[rf.DENSE_MISSING] = 1.0 - tf.reshape(seen, [-1, nd])
      outputs[DENSE_MEAN] = tf.tile(mean[tf.newaxis], [rows, 1])
      outputs[DENSE_STD] = tf.tile(std[tf.newaxis], [rows, 1])
    scalars = []
    for index, name in enumerate(features):
      x = inputs[spec.input_column(name)]
      if name not in sizes:
        scalars.append(ids_of(name, index, x))
        continue
      ids = x.with_flat_values(ids_of(name, index, x.flat_values))
      outputs[rf.multi_hot_key(name)] = ids.to_tensor(default_value=rf.PAD_ID,
                                                      shape=[None, sizes[name]])
    if scalars:
      outputs[rf.SPARSE] = tf.stack(scalars, axis=1)
    return outputs

  return preprocessing_fn
