"""The shared-memory hand-off (serving.shm): block allocation and the block layouts.

References: a byte-occupancy map for the allocator (brute force), the rows themselves
for the layouts (what the worker writes, the device reads back, and the reverse for
the answers)."""

import mmap
import random

import numpy as np
import pytest

from serving import protocol, shm

START, SIZE = shm.HEADER, 64 * 1024


def test_ring_blocks_never_overlap_and_space_comes_back():
  rng = random.Random(0)
  ring = shm.Ring(START, SIZE)
  live: dict[int, int] = {}          # offset -> bytes asked for
  owner = np.full(SIZE, -1)          # byte -> offset of the live block holding it
  refused = granted = 0
  for _ in range(20_000):
    if live and rng.random() < 0.5:  # free a block: usually an old one, any order
      at = sorted(live)[0] if rng.random() < 0.3 else rng.choice(list(live))
      owner[owner == at] = -1
      ring.free(at)
      del live[at]
      continue
    n = rng.randrange(1, 6000)
    at = ring.alloc(n)
    if at is None:
      refused += 1
      assert live, "an empty ring refused a block that fits"
      continue
    granted += 1
    assert at % shm.ALIGN == 0 and START <= at and at + n <= SIZE, (at, n)
    assert (owner[at:at + n] == -1).all(), f"block {at}+{n} overlaps a live block"
    owner[at:at + n] = at
    live[at] = n
  assert granted > 5000 and refused > 100  # the ring filled up, and emptied again
  for at in list(live):
    ring.free(at)
  assert ring.alloc(SIZE - START) == START  # all space is back, in one piece
  assert ring.alloc(1) is None


def test_ring_wraps_in_first_in_first_out_use():
  ring = shm.Ring(START, START + 10 * 64)
  blocks = [ring.alloc(64) for _ in range(10)]
  assert blocks == [START + 64 * i for i in range(10)] and ring.alloc(1) is None
  ring.free(blocks[0])
  ring.free(blocks[1])
  assert ring.alloc(100) == START       # wraps to the start
  assert ring.alloc(1) is None          # [START + 128, ...) is still in use
  ring.free(blocks[3])                  # out of order: no space until blocks[2] goes
  assert ring.alloc(64) is None
  ring.free(blocks[2])
  assert ring.alloc(128) == START + 128


def _retrieval_rows(rng: np.random.Generator, n: int) -> list[protocol.Row]:
  rows = []
  for _ in range(n):
    length = int(rng.integers(1, 30))
    ts = np.sort(rng.integers(0, 2**62, length))
    rows.append(protocol.Row(items=rng.integers(0, 10**6, length).astype(np.int32),
                             timestamps=ts, query_timestamps=np.append(ts[1:], 2**62 + 7),
                             exclude_history=bool(rng.integers(2)),
                             k=int(rng.integers(1, 21))))
  return rows


def test_retrieval_rows_and_answers_cross_the_arena_unchanged():
  rng = np.random.default_rng(1)
  schema = shm.schema({"max_k": 20})
  arena = mmap.mmap(-1, 1 << 20)
  rows = _retrieval_rows(rng, 7)
  counts = schema.counts(rows)
  assert counts == (7, sum(len(r.items) for r in rows), max(r.k for r in rows))
  offset = 128
  schema.write(arena, offset, counts, rows)
  read, answers = schema.read(arena, offset, counts)  # the device process's view
  for got, want in zip(read, rows):
    for field in ("items", "timestamps", "query_timestamps"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
      assert getattr(got, field).dtype == getattr(want, field).dtype
    assert (got.exclude_history, got.k) == (want.exclude_history, want.k)
  top = [(rng.random(20).astype(np.float32), rng.integers(0, 99, 20).astype(np.int32))
         for _ in rows]
  for j, (row, (s, i)) in enumerate(zip(read, top)):
    schema.answer(answers, j, row, s, i)
  for (s, i), (want_s, want_i) in zip(schema.results(arena, offset, counts), top):
    np.testing.assert_array_equal(s, want_s[:counts[2]])
    np.testing.assert_array_equal(i, want_i[:counts[2]])
  assert schema.nbytes(counts) <= schema.max_request_bytes(protocol.Limits(), 30)


def test_ranking_rows_and_answers_cross_the_arena_unchanged():
  rng = np.random.default_rng(2)
  meta = {"task": "ranking", "signature": {"inputs": [
      {"name": "dense", "dtype": "float32", "shape": ["b", 3]},
      {"name": "sparse", "dtype": "int32", "shape": ["b", 5]}]}}
  schema = shm.schema(meta)
  rows = [protocol.RankingRow(inputs={"dense": rng.random((n, 3)).astype(np.float32),
                                      "sparse": rng.integers(0, 9, (n, 5)).astype(np.int32)},
                              n=n, candidates=n > 1) for n in (1, 4, 2)]
  arena = mmap.mmap(-1, 1 << 16)
  counts = schema.counts(rows)
  assert counts == (3, 7, 0)
  schema.write(arena, 64, counts, rows)
  read, answers = schema.read(arena, 64, counts)
  for got, want in zip(read, rows):
    assert (got.n, got.candidates) == (want.n, want.candidates)
    for name in ("dense", "sparse"):
      np.testing.assert_array_equal(got.inputs[name], want.inputs[name])
  top = []
  for j, row in enumerate(read):  # padded to the batch's widest instance, as run_rows does
    s, i = np.full(4, -np.inf, np.float32), np.full(4, -1, np.int32)
    s[:row.n], i[:row.n] = np.sort(rng.random(row.n))[::-1], rng.permutation(row.n)
    schema.answer(answers, j, row, s, i)
    top.append((s[:row.n], i[:row.n]))
  for (s, i), (want_s, want_i) in zip(schema.results(arena, 64, counts), top):
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(i, want_i)


@pytest.mark.parametrize("counts", [(1, 10**9, 5), (2, 3, 20), (0, 0, 1)])
def test_bad_records_are_refused(counts):
  """A record whose block does not fit the arena, or whose rows do not add up to its
  counts, is a ValueError (the device process answers it with an error)."""
  schema = shm.schema({"max_k": 20})
  arena = mmap.mmap(-1, 1 << 16)
  rows = _retrieval_rows(np.random.default_rng(3), 1)  # 1 row, not 2; k is its own
  good = schema.counts(rows)
  schema.write(arena, 64, good, rows)
  with pytest.raises(ValueError):
    schema.read(arena, 64, counts if counts != (2, 3, 20) else (2, good[1], good[2]))
