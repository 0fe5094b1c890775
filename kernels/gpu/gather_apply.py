"""Gather-apply in Triton for GPU, called from JAX through jax-triton.

The op and its backward are composed in `lamini_jax_kernels.gather_apply` from two
gathered row contractions, which this file implements as Triton kernels
(`triton.language`, official Triton; not Pallas' deprecated Triton backend).
Each program loads the selected indices and gathers its table rows by pointer
arithmetic straight from the [E, ...] table, so no gathered array exists:

  _gather_dot_kernel:     programs over blocks of BLOCK_P slots (P = T * K);
                          a loop over D in BLOCK_D chunks accumulates
                          a[p // K] . table[idx[p]] into float32 z[p, :R].
  _gather_combine_kernel: programs over (BLOCK_T tokens) x (BLOCK_D columns);
                          a loop over the K slots accumulates
                          c[t, k, :] . table[idx[t, k]][d-block] in float32.

A row is addressed as table + idx * stride_n + d * stride_d + r * stride_r,
so one kernel serves down rows [D, R] and up rows [R, D]; row offsets are
int64 (N * D * R can exceed 2^31). Edges are masked, so sizes need not be
multiples of the blocks, and every output element is written exactly once.

triton and jax-triton are optional (the `gpu` extra). This module imports
without them: the kernels are then plain functions, and the JAX wrappers raise
a clear error. jax-triton passes the inputs (arrays and scalars, in call
order) and then the output pointer, hence the kernels' parameter order.

Status: the raw kernels run on CPU in Triton's interpreter (TRITON_INTERPRET=1)
and compile to sm_90 cubins (tests/gather_apply_test.py); neither they nor the
jax-triton wrappers have run on a GPU yet.
"""

# Lazy annotations: `tl.constexpr` is read by name, so kernels define without triton.
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lamini_jax_kernels import gather_apply as ga

try:
  import triton
  import triton.language as tl
except ImportError:  # optional dependency
  triton = tl = None

try:
  import jax_triton as jt
except Exception as e:  # ImportError, or jax-triton rejecting a CPU-only jaxlib
  jt, JAX_TRITON_ERROR = None, e
else:
  JAX_TRITON_ERROR = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


def available() -> bool:
  """Whether the jax-triton path can run here (triton, jax-triton, a GPU jaxlib)."""
  return triton is not None and jt is not None


def require() -> None:
  """Raises an ImportError that says how to get the jax-triton path."""
  if not available():
    reason = "triton is not installed" if triton is None else f"jax_triton: {JAX_TRITON_ERROR}"
    raise ImportError(
        "lamini_jax_kernels.gpu.gather_apply needs triton and jax-triton on a CUDA jaxlib (the `gpu` extra,"
        f" pip install 'lamini-jax[gpu]', with jax's CUDA wheels); {reason}")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two) and warps of the two kernels."""
  dot_block_p: int = 32  # slots per gather_dot program
  dot_block_d: int = 256  # D chunk of the gather_dot loop
  combine_block_t: int = 16  # tokens per gather_combine program
  combine_block_d: int = 256  # D columns per gather_combine program
  num_warps: int = 4

  def __post_init__(self):
    for field in ("dot_block_p", "dot_block_d", "combine_block_t", "combine_block_d",
                  "num_warps"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"BlockSizes.{field}={value!r} must be a positive power of two")


def _strides(table_shape, d_axis: int) -> tuple[int, int, int]:
  """(stride_n, stride_d, stride_r) in elements of a contiguous [N, A, B] table."""
  _, a, b = table_shape
  return (a * b, b, 1) if d_axis == 1 else (a * b, 1, b)


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------
# Raw Triton kernels.
# ----------------------------------------------------------------------------


@_jit
def _gather_dot_kernel(a_ptr, idx_ptr, table_ptr, num_slots, num_k, d_size, r_size,
                       stride_n, stride_d, stride_r, z_ptr,
                       BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
  """z[p, r] = sum_d a[p // K, d] * table[idx[p], d, r] (float32 [P, R])."""
  p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
  p_ok = p < num_slots
  row = tl.load(idx_ptr + p, mask=p_ok, other=0).to(tl.int64) * stride_n
  tok = (p // num_k).to(tl.int64) * d_size
  r = tl.arange(0, BLOCK_R)
  r_ok = r < r_size
  acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
  for d0 in range(0, d_size, BLOCK_D):
    d = d0 + tl.arange(0, BLOCK_D)
    d_ok = d < d_size
    a = tl.load(a_ptr + tok[:, None] + d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
    offs = row[:, None, None] + d[None, None, :] * stride_d + r[None, :, None] * stride_r
    ok = p_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :]
    rows = tl.load(table_ptr + offs, mask=ok, other=0.0)
    acc += tl.sum(a.to(tl.float32)[:, None, :] * rows.to(tl.float32), axis=2)
  tl.store(z_ptr + p[:, None] * r_size + r[None, :], acc, mask=p_ok[:, None] & r_ok[None, :])


@_jit
def _gather_combine_kernel(c_ptr, idx_ptr, table_ptr, num_tokens, num_k, d_size, r_size,
                           stride_n, stride_d, stride_r, y_ptr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
  """y[t, d] = sum_k sum_r c[t, k, r] * table[idx[t, k], d, r] (y's dtype)."""
  t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
  t_ok = t < num_tokens
  d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
  d_ok = d < d_size
  r = tl.arange(0, BLOCK_R)
  r_ok = r < r_size
  acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
  for k in range(0, num_k):
    slot = t.to(tl.int64) * num_k + k
    row = tl.load(idx_ptr + slot, mask=t_ok, other=0).to(tl.int64) * stride_n
    c = tl.load(c_ptr + slot[:, None] * r_size + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                other=0.0)
    offs = row[:, None, None] + r[None, :, None] * stride_r + d[None, None, :] * stride_d
    ok = t_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :]
    rows = tl.load(table_ptr + offs, mask=ok, other=0.0)
    acc += tl.sum(c.to(tl.float32)[:, :, None] * rows.to(tl.float32), axis=1)
  y_offs = t.to(tl.int64)[:, None] * d_size + d[None, :]
  tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


def dot_grid(num_slots: int, block_sizes: BlockSizes) -> tuple[int]:
  return (-(-num_slots // block_sizes.dot_block_p),)


def combine_grid(num_tokens: int, d_size: int, block_sizes: BlockSizes) -> tuple[int, int]:
  return (-(-num_tokens // block_sizes.combine_block_t), -(-d_size // block_sizes.combine_block_d))


# ----------------------------------------------------------------------------
# JAX wrappers (jax-triton).
# ----------------------------------------------------------------------------


def gather_dot(a_TxD, idx_TxK, table, *, d_axis, block_sizes: BlockSizes = BlockSizes()):
  """`GatherDotFn` on GPU: z_TxKxR float32. idx must be int32 in [0, E)."""
  require()
  t, d = a_TxD.shape
  k = idx_TxK.shape[1]
  r = table.shape[3 - d_axis]
  # jax-triton passes the inputs (arrays and scalars, in this order), then the output.
  z = jt.triton_call(
      a_TxD, idx_TxK.reshape(-1), table, t * k, k, d, r, *_strides(table.shape, d_axis),
      kernel=_gather_dot_kernel, out_shape=jax.ShapeDtypeStruct((t * k, r), jnp.float32),
      grid=dot_grid(t * k, block_sizes), num_warps=block_sizes.num_warps, name="gather_dot",
      BLOCK_P=block_sizes.dot_block_p, BLOCK_D=block_sizes.dot_block_d, BLOCK_R=_next_pow2(r))
  return ga.match_varying(z.reshape(t, k, r), idx_TxK, a_TxD, table)  # jax-triton drops vma


def gather_combine(c_TxKxR, idx_TxK, table, *, d_axis, out_dtype,
                   block_sizes: BlockSizes = BlockSizes()):
  """`GatherCombineFn` on GPU: y_TxD in out_dtype. idx must be int32 in [0, E)."""
  require()
  t, k, r = c_TxKxR.shape
  d = table.shape[d_axis]
  y = jt.triton_call(
      c_TxKxR.astype(jnp.float32), idx_TxK.reshape(-1), table, t, k, d, r,
      *_strides(table.shape, d_axis),
      kernel=_gather_combine_kernel, out_shape=jax.ShapeDtypeStruct((t, d), out_dtype),
      grid=combine_grid(t, d, block_sizes), num_warps=block_sizes.num_warps,
      name="gather_combine", BLOCK_T=block_sizes.combine_block_t,
      BLOCK_D=block_sizes.combine_block_d, BLOCK_R=_next_pow2(r))
  return ga.match_varying(y, idx_TxK, c_TxKxR, table)


# ----------------------------------------------------------------------------
# The op.
# ----------------------------------------------------------------------------


def contractions(block_sizes: BlockSizes = BlockSizes()):
  """(gather_dot, gather_combine) bound to block sizes."""
  return (functools.partial(gather_dot, block_sizes=block_sizes),
          functools.partial(gather_combine, block_sizes=block_sizes))


@functools.lru_cache(maxsize=None)
def make(block_sizes: BlockSizes = BlockSizes()) -> ga.GatherApplyFn:
  """The custom_vjp `GatherApplyFn` on these kernels (one per configuration)."""
  require()
  return ga.make_gather_apply(*contractions(block_sizes))


def gather_apply(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation, *,
                 block_sizes: BlockSizes = BlockSizes()):
  """y_TxD; see `lamini_jax_kernels.gather_apply` for the math, its custom_vjp for gradients."""
  return make(block_sizes)(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation)


def gather_apply_vjp(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation, *,
                     block_sizes: BlockSizes = BlockSizes()):
  """(y_TxD, vjp_rows); vjp_rows(dy_TxD) -> (dx_TxD, dw_TxK, RowGrads)."""
  require()
  return ga.gather_apply_vjp(*contractions(block_sizes), x_TxD, idx_TxK, w_TxK, down_ExDxR,
                             up_ExRxD, activation)
