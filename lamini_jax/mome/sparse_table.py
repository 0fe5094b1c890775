"""A MoME expert table as the rows that were trained: what MoME exports write and read back.

An expert whose `up` is all zero adds exactly zero to its layer's output, whatever its
`down` (`table.py`: a fresh table has `up = 0`). So a table is fully described, for its
outputs, by the rows whose `up` is not all zero: their ascending expert ids and their `down`
and `up`. An export of those grows with the facts a model holds, not with the table
(2^20 experts of rank 4 at width 64 are 537 MB in float32; 256 facts at 32 rows a fact
write about 2 MB).

Reading a sparse table back gives a whole table whose other rows are zero, `down` included:
the same outputs, but not the random `down` a fresh table starts from (`whole_table` writes
every row where that matters).

Shape letters: N experts, M stored rows, D width, R expert rank.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.mome.table import TABLE_AXES

ROWS = "rows"  # the tensor of a sparse table that holds the stored rows' expert ids


def trained_rows(up_NxRxD: jax.Array) -> np.ndarray:
  """Ascending ids (int64) of the experts whose `up` is not all zero.

  Computed where the table lives (a sharded table stays sharded); only a bool per expert
  comes to the host.
  """
  nonzero_N = jax.jit(lambda up: jnp.any(up != 0, axis=(1, 2)))(up_NxRxD)
  return np.flatnonzero(np.asarray(jax.device_get(nonzero_N))).astype(np.int64)


def sparse(table: dict[str, jax.Array], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """{"rows": [M], "down": [M, D, R], "up": [M, R, D]} of one layer's trained rows (or of the
  distinct `rows` given), on the host."""
  rows_M = trained_rows(table["up"]) if rows is None else np.unique(np.asarray(rows, np.int64))
  idx_M = jnp.asarray(rows_M.astype(np.int32))
  return {ROWS: rows_M, **{name: np.asarray(jax.device_get(jnp.take(table[name], idx_M, axis=0)))
                          for name in TABLE_AXES}}


def dense(stored: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], where: str,
          dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The whole table (`shapes`, from `table.table_shapes`) of a sparse one; other rows zero.

  `where` names the source in errors (an export directory and layer).
  """
  rows_M = np.asarray(stored[ROWS])
  n = shapes["up"][0]
  if rows_M.ndim != 1 or not np.issubdtype(rows_M.dtype, np.integer):
    raise ValueError(f"{where}: {ROWS} must be a vector of expert ids, got {rows_M.dtype} "
                     f"of shape {list(rows_M.shape)}")
  if rows_M.size and (rows_M[0] < 0 or rows_M[-1] >= n or np.any(np.diff(rows_M) <= 0)):
    raise ValueError(f"{where}: {ROWS} must be ascending distinct expert ids in 0..{n - 1}")
  full = {}
  for name in TABLE_AXES:
    want = (rows_M.size, *shapes[name][1:])
    if tuple(stored[name].shape) != want:
      raise ValueError(f"{where}: {name} has shape {list(stored[name].shape)}, expected "
                       f"{list(want)} ({rows_M.size} stored rows)")
    full[name] = np.zeros(shapes[name], dtype)
    full[name][rows_M] = stored[name]
  return full
