"""Small learnable sequence datasets written through the dataset contract."""

import numpy as np
import pytest

from trainers import features


def write_cyclic_dataset(path, users=240, vocab=50, max_len=20, seed=0):
  """Each user walks the catalogue in steps of 3 from a random start: learnable, not popular."""
  rng = np.random.default_rng(seed)
  events = {}
  for u in range(users):
    start, n = int(rng.integers(0, vocab - 2)), int(rng.integers(6, 2 * max_len))
    items = [features.FIRST_ITEM_ID + (start + 3 * i) % (vocab - 2) for i in range(n)]
    events[u] = (items, [1_000_000 + 3600 * i for i in range(n)])
  features.write_sequence_dataset(str(path), events, item_vocab_size=vocab, max_len=max_len,
                                  source={"name": "cyclic"})
  return str(path)


@pytest.fixture(scope="session")
def cyclic_data(tmp_path_factory):
  return write_cyclic_dataset(tmp_path_factory.mktemp("cyclic"))
