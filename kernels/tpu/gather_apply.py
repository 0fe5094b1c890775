"""Gather-apply in Pallas for TPU (Mosaic); on CPU it runs in TPU interpret mode.

The op and its backward are composed in `lamini_jax_kernels.gather_apply` from two
gathered row contractions, which this file implements as Pallas kernels. The
selected expert indices are scalar-prefetched into SMEM, so each grid step's
BlockSpec index_map picks its table row (`idx_ref[p]`) and the pipeline DMAs
that row block (never the gathered [T, K, D, R] array) into VMEM:

  gather_dot:     grid (P, D / block_d), P = T * K slots; step (p, j) reads
                  the j-th D-block of row idx[p] and of a[p // K] and adds
                  their product, summed over D, into z[p] (float32; the
                  D-blocks of a slot run in order on the "arbitrary" axis).
  gather_combine: grid (T, D / block_d, K); step (t, j, k) reads the j-th
                  D-block of row idx[t, k] and accumulates c[t, k] times it
                  in a float32 VMEM scratch, written to y[t] at the last k.

D need not be a multiple of block_d: the edge block of a reduction over D is
masked by index (the interpreter fills out-of-bounds reads with NaN), and the
edge block of an output is clipped on write. Unit dims are added to vectors
so that every block's last two dims are whole array dims or D-blocks.

Status on TPU hardware: not run (no TPU was available in development).
Known limits there: block_d must be a
multiple of 128 (lane dim, `d_axis=2`) and 8 (sublane dim, `d_axis=1`) unless
it covers D; R = 1 rows and [D, 1] columns pad to 128 lanes in VMEM; one table
row per grid step costs the per-step overhead (~0.35 us) P * D / block_d
times, so small rows want a multi-row DMA kernel; idx is prefetched whole into
SMEM, so P * 4 bytes must fit there (chunk the tokens beyond that).

Public API: `gather_apply` (a `GatherApplyFn` with custom_vjp),
`gather_apply_vjp` (backward as `RowGrads`), the two contractions, `BlockSizes`.
In TPU interpret mode (`pltpu.InterpretParams()`, uninitialized_memory="nan")
output and VMEM buffers start as NaN, so elements no step writes show.
"""

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from lamini_jax_kernels import gather_apply as ga

Interpret = bool | pltpu.InterpretParams


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_d: D elements of a table row per grid step (clipped to D)."""
  block_d: int = 512

  def __post_init__(self):
    if not isinstance(self.block_d, int) or self.block_d < 1:
      raise ValueError(f"BlockSizes.block_d={self.block_d!r} must be a positive int")


def _row_dims(table: jax.Array, d_axis: int) -> tuple[int, int]:
  if d_axis not in (1, 2) or table.ndim != 3:
    raise ValueError(f"d_axis={d_axis} must be 1 ([E, D, R]) or 2 ([E, R, D]) of a 3-D table,"
                     f" got table shape {table.shape}")
  return table.shape[d_axis], table.shape[3 - d_axis]


def _compiler_params(*semantics: str) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=semantics)


# ----------------------------------------------------------------------------
# gather_dot: z[p, r] = sum_d a[p // K, d] * table[idx[p]][d, r].
# ----------------------------------------------------------------------------


def _gather_dot_kernel(idx_ref, a_ref, row_ref, z_ref, *, row_d_axis, block_d, d_size):
  """a_ref [bd, 1] / [1, bd], row_ref [bd, R] / [R, bd], z_ref [1, R] / [R, 1]."""
  del idx_ref  # used by the index maps only
  j = pl.program_id(1)
  row = row_ref[...].astype(jnp.float32)
  d = jax.lax.broadcasted_iota(jnp.int32, row.shape, row_d_axis) + j * block_d
  prod = jnp.where(d < d_size, a_ref[...].astype(jnp.float32) * row, 0.0)
  part = jnp.sum(prod, axis=row_d_axis, keepdims=True)

  @pl.when(j == 0)
  def _():
    z_ref[...] = part

  @pl.when(j > 0)
  def _():
    z_ref[...] += part


def gather_dot(
    a_TxD: jax.Array,
    idx_TxK: jax.Array,
    table: jax.Array,
    *,
    d_axis: int,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: Interpret = False,
) -> jax.Array:
  """`GatherDotFn`: z_TxKxR float32. idx must be int32 in [0, E)."""
  t, d = a_TxD.shape
  k = idx_TxK.shape[1]
  d_table, r = _row_dims(table, d_axis)
  if d_table != d:
    raise ValueError(f"gather_dot: table D={d_table} (axis {d_axis}) != a_TxD D={d}")
  bd = min(block_sizes.block_d, d)
  sq = pl.squeezed
  if d_axis == 1:  # rows [D, R]: D on sublanes
    a3 = a_TxD.reshape(t, d, 1)
    a_spec = pl.BlockSpec((sq, bd, 1), lambda p, j, idx: (p // k, j, 0))
    row_spec = pl.BlockSpec((sq, bd, r), lambda p, j, idx: (idx[p], j, 0))
    z_shape, z_block = (t * k, 1, r), (sq, 1, r)
  else:  # rows [R, D]: D on lanes
    a3 = a_TxD.reshape(t, 1, d)
    a_spec = pl.BlockSpec((sq, 1, bd), lambda p, j, idx: (p // k, 0, j))
    row_spec = pl.BlockSpec((sq, r, bd), lambda p, j, idx: (idx[p], 0, j))
    z_shape, z_block = (t * k, r, 1), (sq, r, 1)
  kernel = functools.partial(_gather_dot_kernel, row_d_axis=d_axis - 1, block_d=bd, d_size=d)
  z = pl.pallas_call(
      kernel,
      out_shape=ga.out_struct(z_shape, jnp.float32, idx_TxK, a_TxD, table),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(t * k, pl.cdiv(d, bd)),
          in_specs=[a_spec, row_spec],
          out_specs=pl.BlockSpec(z_block, lambda p, j, idx: (p, 0, 0)),
      ),
      compiler_params=_compiler_params("parallel", "arbitrary"),
      interpret=interpret,
      name="gather_dot",
  )(idx_TxK.reshape(-1), a3, table)
  return z.reshape(t, k, r)


# ----------------------------------------------------------------------------
# gather_combine: y[t, d] = sum_k sum_r c[t, k, r] * table[idx[t, k]][d, r].
# ----------------------------------------------------------------------------


def _gather_combine_kernel(idx_ref, c_ref, row_ref, y_ref, acc_ref, *, row_r_axis):
  """c_ref [1, R] / [R, 1], row_ref [bd, R] / [R, bd], y_ref and acc_ref [bd, 1] / [1, bd]."""
  del idx_ref  # used by the index maps only
  k = pl.program_id(2)
  part = jnp.sum(c_ref[...].astype(jnp.float32) * row_ref[...].astype(jnp.float32),
                 axis=row_r_axis, keepdims=True)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = part

  @pl.when(k > 0)
  def _():
    acc_ref[...] += part

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def gather_combine(
    c_TxKxR: jax.Array,
    idx_TxK: jax.Array,
    table: jax.Array,
    *,
    d_axis: int,
    out_dtype: jnp.dtype,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: Interpret = False,
) -> jax.Array:
  """`GatherCombineFn`: y_TxD in out_dtype. idx must be int32 in [0, E)."""
  t, k, r_c = c_TxKxR.shape
  d, r = _row_dims(table, d_axis)
  if r_c != r:
    raise ValueError(f"gather_combine: c_TxKxR R={r_c} != table R={r} (d_axis={d_axis})")
  bd = min(block_sizes.block_d, d)
  sq = pl.squeezed
  if d_axis == 1:  # rows [D, R]: y block is a column
    c3 = c_TxKxR.reshape(t * k, 1, r)
    c_spec = pl.BlockSpec((sq, 1, r), lambda i, j, s, idx: (i * k + s, 0, 0))
    row_spec = pl.BlockSpec((sq, bd, r), lambda i, j, s, idx: (idx[i * k + s], j, 0))
    y_shape, y_block, acc_shape = (t, d, 1), (sq, bd, 1), (bd, 1)
    y_map = lambda i, j, s, idx: (i, j, 0)
  else:  # rows [R, D]: y block is a row
    c3 = c_TxKxR.reshape(t * k, r, 1)
    c_spec = pl.BlockSpec((sq, r, 1), lambda i, j, s, idx: (i * k + s, 0, 0))
    row_spec = pl.BlockSpec((sq, r, bd), lambda i, j, s, idx: (idx[i * k + s], 0, j))
    y_shape, y_block, acc_shape = (t, 1, d), (sq, 1, bd), (1, bd)
    y_map = lambda i, j, s, idx: (i, 0, j)
  kernel = functools.partial(_gather_combine_kernel, row_r_axis=2 - d_axis)
  y = pl.pallas_call(
      kernel,
      out_shape=ga.out_struct(y_shape, out_dtype, idx_TxK, c_TxKxR, table),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(t, pl.cdiv(d, bd), k),
          in_specs=[c_spec, row_spec],
          out_specs=pl.BlockSpec(y_block, y_map),
          scratch_shapes=[pltpu.VMEM(acc_shape, jnp.float32)],
      ),
      compiler_params=_compiler_params("parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="gather_combine",
  )(idx_TxK.reshape(-1), c3, table)
  return y.reshape(t, d)


# ----------------------------------------------------------------------------
# The op.
# ----------------------------------------------------------------------------


def contractions(block_sizes: BlockSizes = BlockSizes(), interpret: Interpret = False):
  """(gather_dot, gather_combine) bound to block sizes and interpret mode."""
  opts = dict(block_sizes=block_sizes, interpret=interpret)
  return functools.partial(gather_dot, **opts), functools.partial(gather_combine, **opts)


@functools.lru_cache(maxsize=None)
def make(block_sizes: BlockSizes = BlockSizes(), interpret: Interpret = False) -> ga.GatherApplyFn:
  """The custom_vjp `GatherApplyFn` on these kernels (one per configuration)."""
  return ga.make_gather_apply(*contractions(block_sizes, interpret))


def gather_apply(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation, *,
                 block_sizes: BlockSizes = BlockSizes(), interpret: Interpret = False):
  """y_TxD; see `lamini_jax_kernels.gather_apply` for the math, its custom_vjp for gradients."""
  return make(block_sizes, interpret)(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation)


def gather_apply_vjp(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation, *,
                     block_sizes: BlockSizes = BlockSizes(), interpret: Interpret = False):
  """(y_TxD, vjp_rows); vjp_rows(dy_TxD) -> (dx_TxD, dw_TxK, RowGrads)."""
  return ga.gather_apply_vjp(*contractions(block_sizes, interpret), x_TxD, idx_TxK, w_TxK,
                             down_ExDxR, up_ExRxD, activation)
