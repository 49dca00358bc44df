"""Dumps a sequence dataset's splits to one .npz for machines without TensorFlow.

    .venv/bin/python benchmarks/gpu/dump_npz.py DATASET_DIR ml1m.npz
"""
import sys

import numpy as np

from trainers import features
from trainers.input_pipeline import SequenceData


def main(data_dir: str, out: str, max_len: int = 200) -> None:
  info = features.load_dataset_info(data_dir)
  arrays = {}
  for split in features.SPLITS:
    n = info.num_examples[split]
    batch = next(SequenceData(data_dir, split, n, max_len, shuffle_buffer=1).batches())
    arrays.update({f"{split}/{k}": v[:n] for k, v in batch.items()})
  np.savez_compressed(out, **arrays)
  print({k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
