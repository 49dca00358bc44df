"""The CTR transforms of preprocessing_fn.py (log + z-score, bucketize, hash) on Criteo rows."""

import numpy as np
import pytest

from preprocess_testlib import shared


def test_ctr_preprocessing_fn_on_criteo_sample(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_transform.beam as tft_beam  # pylint: disable=g-import-not-at-top
  from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils  # pylint: disable=g-import-not-at-top
  from components.preprocess import preprocessing_fn as pfn  # pylint: disable=g-import-not-at-top

  rows = []
  with open(shared("criteo-sample") / "train_head1000.tsv", encoding="utf-8") as f:
    for line in f:
      fields = line.rstrip("\n").split("\t")
      row = {"label": int(fields[0])}
      row.update({n: int(v) if v else 0 for n, v in zip(pfn.CRITEO_DENSE, fields[1:14])})
      row.update({n: v for n, v in zip(pfn.CRITEO_SPARSE, fields[14:40])})
      rows.append(row)
  spec = {"label": tf.io.FixedLenFeature([], tf.int64)}
  spec.update({n: tf.io.FixedLenFeature([], tf.int64) for n in pfn.CRITEO_DENSE})
  spec.update({n: tf.io.FixedLenFeature([], tf.string) for n in pfn.CRITEO_SPARSE})
  metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
  fn = pfn.make_ctr_preprocessing_fn(hash_buckets=1000, num_quantile_buckets=4)
  with tft_beam.Context(temp_dir=str(tmp_path), force_tf_compat_v1=False):
    (out, _), _ = ((rows, metadata) | tft_beam.AnalyzeAndTransformDataset(fn))
  assert len(out) == 1000
  dense = np.array([[r[n] for n in pfn.CRITEO_DENSE] for r in out])
  assert np.abs(dense.mean(axis=0)).max() < 1e-3              # z-scored
  assert np.allclose(dense.std(axis=0)[dense.std(axis=0) > 0], 1.0, atol=1e-3)
  buckets = np.array([r["I5_bucket"] for r in out])
  assert buckets.min() == 0 and buckets.max() == 3
  sparse = np.array([[r[n] for n in pfn.CRITEO_SPARSE] for r in out])
  assert sparse.min() >= 0 and sparse.max() < 1000
  missing = np.array([[rows[i][n] == "" for n in pfn.CRITEO_SPARSE] for i in range(1000)])
  assert (sparse[missing] == 0).all() and (sparse[~missing] > 0).all()
  assert sum(r["label"] for r in out) == pytest.approx(205)
