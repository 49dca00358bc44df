"""int8 embedding tables: quantized at export, dequantized inside the exported function.

A float32 table ``[rows, dim]`` is stored as int8 values and one float16 scale per
group of ``rows_per_scale`` consecutive rows (symmetric, no zero point)::

    scale = max |x| over the group / 127, rounded up to a float16
    q     = round(x / scale)                    in [-127, 127], int8
    x'    = q * scale                           |x - x'| <= scale / 2

The scale is rounded *up*, so no value is clipped and every value is within half a
step of its original. A group of zeros (the padding rows past the vocabulary) has
scale 0 and stays exactly zero.

Bytes: float32 ``4 * dim`` per row against ``dim + 2 / rows_per_scale``. A scale per
row reaches the :data:`MIN_RATIO` of 3.5x from ``dim >= 14`` on (dim 50: 200 / 52 =
3.85x); narrower tables share a scale between 2, 4, ... rows: :func:`rows_per_scale`
takes the smallest power of two that reaches it (dim 10: two rows, 40 / 11 = 3.64x).
Float16 rather than float32 scales because a float32 scale per row of 10 values alone
would cap the ratio at 40 / 14 = 2.9x; float16's 11-bit mantissa, rounded up, widens
the step by at most 2**-10 (bfloat16's 8 bits: up to 2**-7), or by 2**-24 (absolute)
for groups below float16's normal range (max |x| < 127 * 2**-14 = 0.0078).
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127
SCALE_DTYPE = np.dtype(np.float16)
MIN_RATIO = 3.5       # float32 bytes / (int8 bytes + scale bytes) rows_per_scale aims at
MAX_ROWS_PER_SCALE = 64  # trainers.layers.ROW_ALIGNMENT: every table's row count divides


def ratio(dim: int, group: int) -> float:
  """float32 bytes / stored bytes of a table ``dim`` wide with a scale per ``group`` rows."""
  return 4.0 * dim / (dim + SCALE_DTYPE.itemsize / group)


def rows_per_scale(rows: int, dim: int, min_ratio: float = MIN_RATIO) -> int:
  """The smallest power of two ``g`` (dividing ``rows``, at most 64) whose
  :func:`ratio` reaches ``min_ratio``; the largest such divisor when none does."""
  group = 1
  while (ratio(dim, group) < min_ratio and group < MAX_ROWS_PER_SCALE
         and rows % (2 * group) == 0):
    group *= 2
  return group


def stored_bytes(rows: int, dim: int, group: int) -> int:
  """Bytes of an int8 table and its scales."""
  return rows * dim + (rows // group) * SCALE_DTYPE.itemsize


def quantize_table(table, group: int = 1, name: str = "table"
                   ) -> tuple[np.ndarray, np.ndarray]:
  """float ``[rows, dim]`` -> ``(int8 [rows, dim], float16 [rows // group])``.

  Raises:
    ValueError: not a 2-D table, ``group`` does not divide its rows, or a value that is
      not finite or too large for a float16 scale (``name`` says which table).
  """
  x = np.asarray(table, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a [rows, dim] table, got shape {x.shape}")
  rows, dim = x.shape
  if group < 1 or rows % group:
    raise ValueError(f"{name}: rows_per_scale {group} does not divide its {rows} rows")
  if not np.isfinite(x).all():
    raise ValueError(f"{name}: holds values that are not finite (inf or NaN)")
  blocks = x.reshape(rows // group, group * dim)
  exact = np.abs(blocks).max(axis=1) / np.float32(INT8_MAX)
  with np.errstate(over="ignore"):
    scale = exact.astype(SCALE_DTYPE)
  if not np.isfinite(scale).all():
    raise ValueError(f"{name}: values up to {float(np.abs(x).max()):g} are too large for "
                     f"int8 with a {SCALE_DTYPE} scale")
  low = scale.astype(np.float32) < exact  # rounded down: one float16 step up
  scale[low] = np.nextafter(scale[low], SCALE_DTYPE.type(np.inf))
  step = scale.astype(np.float32)
  q = np.rint(blocks / np.where(step > 0, step, 1)[:, None])
  q = np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)
  return q.reshape(rows, dim), scale


def dequantize_table(q, scale, group: int = 1, dtype=np.float32):
  """``q * scale`` as ``dtype`` (``[rows, dim]``); traced inside the exported function
  (``jax.numpy``), exact in float32 (an int8 times a float16 has at most 19 bits)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rows, dim = q.shape
  blocks = q.reshape(rows // group, group * dim).astype(jnp.float32)
  return (blocks * scale.astype(jnp.float32)[:, None]).reshape(rows, dim).astype(dtype)
