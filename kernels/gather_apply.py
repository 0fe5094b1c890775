"""Gather-apply: the expert op of the Mixture of Memory Experts (MoME).

For T tokens, each routed to K expert slots of a table of E rank-R adapters:

  y[t] = sum_k w[t, k] * up[idx[t, k]]^T act(down[idx[t, k]]^T x[t])

with x_TxD the token inputs, idx_TxK the selected experts (int, in [0, E)),
w_TxK their weights, down_ExDxR and up_ExRxD the expert table, and `act` an
elementwise activation. R = 1 is a PEER-style single-neuron expert.

Every implementation has the signature of `GatherApplyFn`:

  gather_apply(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation) -> y_TxD

and is differentiable in x, w, down and up. The MoME layer takes one as a
parameter; `lamini_jax_kernels.dispatch.get_gather_apply` picks one per backend.

The kernels (`lamini_jax_kernels.tpu.gather_apply`: Pallas/Mosaic, `lamini_jax_kernels.gpu.gather_apply`:
Triton through jax-triton) implement two gathered row contractions, which never
materialise gathered rows in device memory:

  gather_dot:     z[t, k, r] = sum_d a[t, d] * table[idx[t, k]][d, r]   (float32)
  gather_combine: y[t, d]    = sum_k sum_r c[t, k, r] * table[idx[t, k]][d, r]

where a table row is [D, R] (`d_axis=1`, down) or [R, D] (`d_axis=2`, up).
`make_gather_apply` composes them into the op and its backward (this file):

  forward:   z = gather_dot(x, idx, down); h = act(z);
             y = gather_combine(w * h, idx, up)
  backward:  g = gather_dot(dy, idx, up); dw = sum_r h * g;
             dz = act'(z) * w * g; dx = gather_combine(dz, idx, down);
             row gradients (one per slot, P = T * K):
               down_rows[p] = x[t] outer dz[t, k]   [P, D, R]
               up_rows[p]   = (w h)[t, k] outer dy[t]   [P, R, D]

The activation runs in XLA on the [T, K, R] pre-activations between the two
kernels (any jax activation works; those bytes are T*K*R*4, against T*K*D*R
for the rows). `gather_apply_vjp` returns the row gradients as `RowGrads`
(rows plus flat indices, duplicates not summed); the custom_vjp of the op
scatter-adds them into the cotangent of the table argument, so `jax.grad`
w.r.t. a whole table is correct (and dense, [E, ...]); the MoME sparse path
passes the gathered unique rows [U, ...] as the table, so its cotangent has U
rows and the scatter-add sums duplicate slots. Inside `jax.shard_map` (the
row-sharded table of `lamini_jax.sharding.shard_gather_apply`) kernel outputs
carry the manual axes their inputs vary over (`out_struct`, `match_varying`).

Shape letters are the package legend's (`lamini_jax/__init__.py`): T tokens, K expert slots
per token, E experts, D model width, R expert rank, P = T * K slots.
"""

from collections.abc import Callable
import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


class GatherApplyFn(Protocol):

  def __call__(
      self,
      x_TxD: jax.Array,
      idx_TxK: jax.Array,
      w_TxK: jax.Array,
      down_ExDxR: jax.Array,
      up_ExRxD: jax.Array,
      activation: Activation,
  ) -> jax.Array:
    ...


class GatherDotFn(Protocol):
  """z_TxKxR (float32) = sum_d a[t, d] * table[idx[t, k]] over its D axis `d_axis`."""

  def __call__(self, a_TxD: jax.Array, idx_TxK: jax.Array, table: jax.Array, *,
               d_axis: int) -> jax.Array:
    ...


class GatherCombineFn(Protocol):
  """y_TxD (out_dtype) = sum_{k, r} c[t, k, r] * table[idx[t, k]] over its R axis."""

  def __call__(self, c_TxKxR: jax.Array, idx_TxK: jax.Array, table: jax.Array, *,
               d_axis: int, out_dtype: jnp.dtype) -> jax.Array:
    ...


class RowGrads(NamedTuple):
  """Gradients of the selected rows, one per slot (P = T * K), not summed.

  idx_P[p] = clip(idx_TxK.reshape(-1)[p], 0, E - 1) is the table row of slot p;
  down_PxDxR[p] and up_PxRxD[p] are that slot's contribution to the gradient of
  down[idx_P[p]] and up[idx_P[p]]. Rows of repeated indices must be summed
  (e.g. `table.at[idx_P].add(rows)` or a segment sum after `unique_rows`).
  """
  idx_P: jax.Array
  down_PxDxR: jax.Array
  up_PxRxD: jax.Array


VjpRowsFn = Callable[[jax.Array], tuple[jax.Array, jax.Array, RowGrads]]


def check_shapes(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD) -> None:
  """Raises a ValueError naming the argument whose shape does not fit the others."""
  if x_TxD.ndim != 2:
    raise ValueError(f"gather_apply: x_TxD must be [T, D], got shape {x_TxD.shape}")
  t, d = x_TxD.shape
  if idx_TxK.ndim != 2 or idx_TxK.shape[0] != t:
    raise ValueError(f"gather_apply: idx_TxK must be [T={t}, K], got shape {idx_TxK.shape}")
  if not jnp.issubdtype(idx_TxK.dtype, jnp.integer):
    raise ValueError(f"gather_apply: idx_TxK must be integer, got {idx_TxK.dtype}")
  if w_TxK.shape != idx_TxK.shape:
    raise ValueError(f"gather_apply: w_TxK shape {w_TxK.shape} != idx_TxK shape {idx_TxK.shape}")
  if down_ExDxR.ndim != 3 or down_ExDxR.shape[1] != d:
    raise ValueError(f"gather_apply: down_ExDxR must be [E, D={d}, R], got {down_ExDxR.shape}")
  n, _, r = down_ExDxR.shape
  if up_ExRxD.shape != (n, r, d):
    raise ValueError(f"gather_apply: up_ExRxD must be [E={n}, R={r}, D={d}], got {up_ExRxD.shape}")


def clip_indices(idx_TxK: jax.Array, num_rows: int) -> jax.Array:
  """int32 indices clipped to [0, num_rows), as the reference's mode="clip" gather."""
  return jnp.clip(idx_TxK, 0, num_rows - 1).astype(jnp.int32)


def output_dtype(x_TxD, w_TxK, down_ExDxR, up_ExRxD) -> jnp.dtype:
  """The reference's output dtype (jnp type promotion of its einsums)."""
  return jnp.result_type(x_TxD.dtype, w_TxK.dtype, down_ExDxR.dtype, up_ExRxD.dtype)


def varying_axes(*arrays: jax.Array) -> frozenset[str]:
  """Manual mesh axes that any of the arrays varies over (inside `jax.shard_map`)."""
  axes = frozenset()
  for a in arrays:
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    axes |= mat.varying if mat is not None else frozenset()
  return axes


def out_struct(shape, dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
  """A kernel output's type: varying over every manual axis its inputs vary over.

  Inside `jax.shard_map` with check_vma, pallas_call needs this on out_shape;
  outside, it is a plain ShapeDtypeStruct.
  """
  axes = varying_axes(*inputs)
  if not axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  mat = jax.typeof(inputs[0]).manual_axis_type.update(varying=axes)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def match_varying(out: jax.Array, *inputs: jax.Array) -> jax.Array:
  """out cast to vary over the inputs' manual axes (for calls that drop that type)."""
  missing = tuple(sorted(varying_axes(*inputs) - varying_axes(out)))
  return jax.lax.pcast(out, missing, to="varying") if missing else out


# ----------------------------------------------------------------------------
# Forward and backward from the two row contractions.
# ----------------------------------------------------------------------------


def _forward(dot, combine, x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation):
  """(y_TxD, z_TxKxR) for clipped int32 indices."""
  z_TxKxR = dot(x_TxD, idx_TxK, down_ExDxR, d_axis=1)
  c_TxKxR = w_TxK.astype(jnp.float32)[..., None] * activation(z_TxKxR)
  out_dtype = output_dtype(x_TxD, w_TxK, down_ExDxR, up_ExRxD)
  return combine(c_TxKxR, idx_TxK, up_ExRxD, d_axis=2, out_dtype=out_dtype), z_TxKxR


def _backward(dot, combine, activation, x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, z_TxKxR,
              dy_TxD):
  """(dx_TxD, dw_TxK, RowGrads) from the saved pre-activations z_TxKxR."""
  h_TxKxR, act_vjp = jax.vjp(activation, z_TxKxR)
  w32_TxKx1 = w_TxK.astype(jnp.float32)[..., None]
  g_TxKxR = dot(dy_TxD, idx_TxK, up_ExRxD, d_axis=2)
  dw_TxK = jnp.sum(h_TxKxR * g_TxKxR, axis=-1).astype(w_TxK.dtype)
  (dz_TxKxR,) = act_vjp(w32_TxKx1 * g_TxKxR)
  dx_TxD = combine(dz_TxKxR, idx_TxK, down_ExDxR, d_axis=1, out_dtype=x_TxD.dtype)
  x32_Tx1xDx1 = x_TxD.astype(jnp.float32)[:, None, :, None]
  dy32_Tx1x1xD = dy_TxD.astype(jnp.float32)[:, None, None, :]
  down_TxKxDxR = (x32_Tx1xDx1 * dz_TxKxR[:, :, None, :]).astype(down_ExDxR.dtype)
  up_TxKxRxD = ((w32_TxKx1 * h_TxKxR)[..., None] * dy32_Tx1x1xD).astype(up_ExRxD.dtype)
  p = idx_TxK.size
  rows = RowGrads(idx_TxK.reshape(p), down_TxKxDxR.reshape(p, *down_ExDxR.shape[1:]),
                  up_TxKxRxD.reshape(p, *up_ExRxD.shape[1:]))
  return dx_TxD, dw_TxK, rows


def gather_apply_vjp(
    dot: GatherDotFn,
    combine: GatherCombineFn,
    x_TxD: jax.Array,
    idx_TxK: jax.Array,
    w_TxK: jax.Array,
    down_ExDxR: jax.Array,
    up_ExRxD: jax.Array,
    activation: Activation,
) -> tuple[jax.Array, VjpRowsFn]:
  """(y_TxD, vjp_rows) with vjp_rows(dy_TxD) -> (dx_TxD, dw_TxK, RowGrads).

  No [E, ...] array is formed: the backward gives gradients of the selected
  rows only. idx is clipped to [0, E) (see `gather_apply_reference`).
  """
  check_shapes(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD)
  idx_TxK = clip_indices(idx_TxK, down_ExDxR.shape[0])
  args = (x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD)
  y_TxD, z_TxKxR = _forward(dot, combine, *args, activation)
  return y_TxD, functools.partial(_backward, dot, combine, activation, *args, z_TxKxR)


def make_gather_apply(dot: GatherDotFn, combine: GatherCombineFn) -> GatherApplyFn:
  """A `GatherApplyFn` with a custom_vjp built on the two row contractions.

  The cotangent of the table arguments is the scatter-add of `RowGrads` into
  zeros shaped like them: correct under `jax.grad` w.r.t. a whole table (a
  dense [E, ...] result), and U rows when the table passed in is U gathered
  rows (the MoME sparse path). Under jit, unused cotangents are pruned.
  """

  def fwd(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation):
    check_shapes(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD)
    idx_TxK = clip_indices(idx_TxK, down_ExDxR.shape[0])
    args = (x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD)
    y_TxD, z_TxKxR = _forward(dot, combine, *args, activation)
    return y_TxD, (*args, z_TxKxR)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def custom(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation):
    return fwd(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation)[0]

  def bwd(activation, residuals, dy_TxD):
    _, _, _, down_ExDxR, up_ExRxD, _ = residuals
    dx_TxD, dw_TxK, rows = _backward(dot, combine, activation, *residuals, dy_TxD)
    d_down = jnp.zeros_like(down_ExDxR).at[rows.idx_P].add(rows.down_PxDxR)
    d_up = jnp.zeros_like(up_ExRxD).at[rows.idx_P].add(rows.up_PxRxD)
    return dx_TxD, None, dw_TxK, d_down, d_up

  custom.defvjp(fwd, bwd)

  def gather_apply(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation):
    # Inside shard_map, give every input the same manual axes first: the
    # cotangents then match the primals, and autodiff sums them where pcast
    # broadcast an input (as it does for the reference's implicit casts).
    args = (x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD)
    return custom(*(match_varying(a, *args) for a in args), activation)

  return gather_apply


# ----------------------------------------------------------------------------
# Reference (pure jnp). Kernels are checked against these functions.
# ----------------------------------------------------------------------------


def gather_dot_reference(a_TxD, idx_TxK, table, *, d_axis):
  """`GatherDotFn` by an XLA gather of the rows and an einsum."""
  rows = jnp.take(table, idx_TxK, axis=0, mode="clip")
  spec = "TD,TKDR->TKR" if d_axis == 1 else "TD,TKRD->TKR"
  return jnp.einsum(spec, a_TxD, rows, preferred_element_type=jnp.float32).astype(jnp.float32)


def gather_combine_reference(c_TxKxR, idx_TxK, table, *, d_axis, out_dtype):
  """`GatherCombineFn` by an XLA gather of the rows and an einsum."""
  rows = jnp.take(table, idx_TxK, axis=0, mode="clip")
  spec = "TKR,TKDR->TD" if d_axis == 1 else "TKR,TKRD->TD"
  return jnp.einsum(spec, c_TxKxR, rows, preferred_element_type=jnp.float32).astype(out_dtype)


def gather_apply_reference(
    x_TxD: jax.Array,
    idx_TxK: jax.Array,
    w_TxK: jax.Array,
    down_ExDxR: jax.Array,
    up_ExRxD: jax.Array,
    activation: Activation,
) -> jax.Array:
  """Gathers the selected expert rows and applies them; returns y_TxD.

  Indices must lie in [0, E); callers that mask slots pass a valid index with
  weight 0 (out-of-range indices are clipped, not dropped).
  """
  down_TxKxDxR = jnp.take(down_ExDxR, idx_TxK, axis=0, mode="clip")
  up_TxKxRxD = jnp.take(up_ExRxD, idx_TxK, axis=0, mode="clip")
  h_TxKxR = activation(jnp.einsum("TD,TKDR->TKR", x_TxD, down_TxKxDxR))
  return jnp.einsum("TK,TKR,TKRD->TD", w_TxK, h_TxKxR, up_TxKxRxD)
