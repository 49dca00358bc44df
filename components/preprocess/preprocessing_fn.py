"""The tf.transform ``preprocessing_fn`` of the sequence dataset, and CTR transforms.

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
# CTR transforms (DLRM): dense features -> log + z-score and quantile buckets,
# categorical features -> hash buckets or a frequency-thresholded vocabulary.
# ---------------------------------------------------------------------------

CRITEO_LABEL = "label"
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))


def log_z_score(x: tf.Tensor) -> tf.Tensor:
  """``z-score(log(1 + max(x, 0)))``: the DLRM dense-feature transform."""
  x = tf.maximum(tf.cast(x, tf.float32), 0.0)
  return tft.scale_to_z_score(tf.math.log1p(x))


def bucketize(x: tf.Tensor, num_buckets: int) -> tf.Tensor:
  """Quantile buckets of a dense feature (0..num_buckets-1)."""
  return tft.bucketize(tf.cast(x, tf.float32), num_buckets)


def hash_categorical(x: tf.Tensor, num_buckets: int) -> tf.Tensor:
  """Hash bucket of a string feature; missing ('') maps to bucket 0."""
  h = tf.strings.to_hash_bucket_fast(x, num_buckets - 1) + 1
  return tf.where(tf.equal(x, ""), tf.zeros_like(h), h)


def vocab_categorical(x: tf.Tensor, min_count: int, name: str) -> tf.Tensor:
  """Vocabulary index (+1) of a string feature; rare or missing values map to 0."""
  idx = tft.compute_and_apply_vocabulary(
      x, frequency_threshold=min_count, default_value=-1, vocab_filename=name)
  return tf.where(tf.equal(x, ""), tf.zeros_like(idx), idx + 1)


def make_ctr_preprocessing_fn(
    *,
    dense: Sequence[str] = CRITEO_DENSE,
    sparse: Sequence[str] = CRITEO_SPARSE,
    label: str | None = CRITEO_LABEL,
    hash_buckets: int | None = 1 << 16,
    min_count: int = 1,
    num_quantile_buckets: int = 0,
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
  """Builds a ``preprocessing_fn`` for a CTR model such as DLRM.

  Dense inputs are int or float (missing values filled with 0 before the
  transform); sparse inputs are strings ('' = missing).

  Args:
    dense: numeric feature names -> ``<name>`` (log + z-score) and, with
      ``num_quantile_buckets``, ``<name>_bucket``.
    sparse: categorical feature names -> ``<name>`` (int64 index).
    label: passed through as float32, if given.
    hash_buckets: hash categorical values into this many buckets (0 reserved for
      missing); ``None`` learns a vocabulary per feature instead.
    min_count: vocabulary admission threshold when ``hash_buckets`` is None.
    num_quantile_buckets: also emit quantile buckets of each dense feature.
  """

  def preprocessing_fn(inputs):
    outputs = {}
    for name in dense:
      outputs[name] = log_z_score(inputs[name])
      if num_quantile_buckets:
        outputs[f"{name}_bucket"] = bucketize(inputs[name], num_quantile_buckets)
    for name in sparse:
      x = inputs[name]
      outputs[name] = (hash_categorical(x, hash_buckets) if hash_buckets
                       else vocab_categorical(x, min_count, name))
    if label is not None:
      outputs[label] = tf.cast(inputs[label], tf.float32)
    return outputs

  return preprocessing_fn
