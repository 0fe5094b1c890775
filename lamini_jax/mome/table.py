"""The expert table and the gather-and-apply call that uses it.

A layer's table holds E rank-R experts, `down [E, D, R]` and `up [E, R, D]`
(`up` starts at 0, so a fresh layer adds exactly 0). `apply_experts` computes
sum_k w[t, k] * up[e]^T act(down[e]^T x[t]) through a gather-and-apply
implementation from `lamini_jax_kernels` (reference, Pallas or Triton), over a
row-sharded table when given a mesh. `key_rows` writes keyed experts' `down`
rows in closed form; `unique_rows` / `gather_rows` give the rows a step touches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from lamini_jax.mome.config import MomeConfig
from lamini_jax.mome.router import scaled_normal
from lamini_jax import sharding
from lamini_jax_kernels.dispatch import gather_apply_auto
from lamini_jax_kernels.gather_apply import GatherApplyFn


TABLE_AXES = {"down": ("expert", "embed", "expert_rank"), "up": ("expert", "expert_rank", "embed")}


Table = dict[str, jax.Array]  # {"down": [N, D, R], "up": [N, R, D]}


def table_shapes(cfg: MomeConfig) -> dict[str, tuple[int, ...]]:
  n, d, r = cfg.num_experts, cfg.embed_dim, cfg.expert_rank
  return {"down": (n, d, r), "up": (n, r, d)}


def table_param_init(name: str, cfg: MomeConfig) -> Callable[[jax.Array], jax.Array]:
  """down ~ N(0, 1/D); up = 0, so a fresh layer adds exactly zero."""
  shape = table_shapes(cfg)[name]
  if name == "down":
    return lambda key: scaled_normal(key, shape, cfg.embed_dim)
  return lambda key: jnp.zeros(shape, jnp.float32)


def init_table(key: jax.Array, cfg: MomeConfig, mesh: Mesh | None = None) -> Table:
  """The expert table; on a mesh it is created already split over `expert`."""

  def init(key):
    return {name: table_param_init(name, cfg)(key) for name in TABLE_AXES}

  if mesh is None:
    return jax.jit(init)(key)
  shardings = sharding.shardings_for(TABLE_AXES, mesh)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init, key), shardings)
  sharding.check_expert_sharded(abstract, mesh)
  return jax.jit(init, out_shardings=shardings)(key)


def apply_experts(
    x_TxD: jax.Array,
    idx_TxK: jax.Array,
    w_TxK: jax.Array,
    table: Table,
    cfg: MomeConfig,
    gather_apply: GatherApplyFn = gather_apply_auto,
    mesh: Mesh | None = None,
) -> jax.Array:
  """sum_k w_k * expert_k(x); over a row-sharded table when a mesh is given."""
  if mesh is not None:
    gather_apply = sharding.shard_gather_apply(gather_apply, mesh)
  return gather_apply(expert_input(x_TxD, cfg), idx_TxK, w_TxK, table["down"], table["up"], cfg.act)


def expert_input(x_XxD, cfg: MomeConfig):
  """What the experts' down projection sees: x, or x / |x| with `cfg.unit_input` (numpy in,
  numpy out)."""
  if not cfg.unit_input:
    return x_XxD
  xp = np if isinstance(x_XxD, np.ndarray) else jnp
  return x_XxD / xp.maximum(xp.linalg.norm(x_XxD, axis=-1, keepdims=True), 1e-30)


def key_rows(table: Table, idx_PxK: np.ndarray, x_PxD: np.ndarray, cfg: MomeConfig,
             match: float, only: np.ndarray | None = None) -> Table:
  """The table with every expert selected in idx_PxK keyed to the inputs that select it.

  Expert e, selected at positions P_e, gets down[e, :, r] = a * m / |m|^2 for
  every r, with m the mean of x over P_e (of x / |x| with `cfg.unit_input`: proj is then
  the cosine for a single position; the mean of several unit inputs is shorter than 1, so such
  a key reaches proj = 1 / |m|, firing harder than at its inputs and a little wider) and
  a = cfg.threshold / match, so
  down^T x - threshold = threshold * (proj(x) / match - 1), proj(x) = x . m / |m|^2:
  with a "relu" activation the expert fires (with threshold * (1 / match - 1)
  at x = m) only where x projects onto m at least `match` of m's length, and is
  exactly silent on other inputs that select it. Other rows are unchanged.
  A one-time set-up step (host aggregation and one scatter), not a training step.

  `only`: key only these experts (each to the mean over the slots that select it);
  every other row, selected or not, keeps its value bit for bit (`mome.edit`).
  """
  if cfg.threshold <= 0:
    raise ValueError(f"key_rows: needs MomeConfig.threshold > 0, got {cfg.threshold}")
  if not 0 < match < 1:
    raise ValueError(f"key_rows: match={match} must be in (0, 1)")
  idx_PxK, x_PxD = np.asarray(idx_PxK), expert_input(np.asarray(x_PxD, np.float64), cfg)
  if idx_PxK.shape[0] != x_PxD.shape[0]:
    raise ValueError(f"key_rows: {idx_PxK.shape[0]} positions of experts, {x_PxD.shape[0]} inputs")
  flat = idx_PxK.ravel()
  pos = np.arange(flat.size) // max(idx_PxK.shape[1], 1)  # the position of each slot
  if only is not None:
    kept = np.isin(flat, np.asarray(only))
    flat, pos = flat[kept], pos[kept]
    if not flat.size:
      return table
  uniq_U, inv = np.unique(flat, return_inverse=True)
  order = np.argsort(inv, kind="stable")  # slots grouped by expert, for one reduceat
  starts = np.searchsorted(inv[order], np.arange(len(uniq_U)))
  sums_UxD = np.add.reduceat(x_PxD[pos[order]], starts, axis=0)
  mean_UxD = sums_UxD / np.diff(np.append(starts, len(order)))[:, None]
  norm2_U = np.maximum(np.sum(mean_UxD**2, axis=1, keepdims=True), 1e-30)
  key_UxD = (cfg.threshold / match) * mean_UxD / norm2_U
  rows_UxDxR = np.repeat(key_UxD[:, :, None], cfg.expert_rank, axis=2)
  return _set_down(table, jnp.asarray(uniq_U, jnp.int32), jnp.asarray(rows_UxDxR, table["down"].dtype))


def zero_rows(table: Table, rows: np.ndarray, leaves: tuple[str, ...]) -> Table:
  """`table` (one layer's) with `rows` of `leaves` set to 0 in place: the table passed is donated."""
  if not len(rows):
    return table
  idx_M = np.full(1 << (len(rows) - 1).bit_length(), len(table["up"]), np.int32)  # pad: dropped
  idx_M[:len(rows)] = rows  # padded to a power of 2: one compile per size class
  return _zeroed(table, jnp.asarray(idx_M), leaves)


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _zeroed(table: Table, idx_M: jax.Array, leaves: tuple[str, ...]) -> Table:
  return {k: v.at[idx_M].set(0, mode="drop") if k in leaves else v for k, v in table.items()}


@functools.partial(jax.jit, donate_argnums=0)
def _set_down(table: Table, uniq_U: jax.Array, rows_UxDxR: jax.Array) -> Table:
  return {**table, "down": table["down"].at[uniq_U].set(rows_UxDxR)}


def unique_rows(idx_TxK: jax.Array, num_experts: int,
                size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(uniq_U, inv_TxK): sorted unique experts padded with num_experts to U = size (T * K).

  uniq_U[inv_TxK] == idx_TxK; the padding index num_experts is out of range, so
  it is clipped on gathers and dropped on writes. A `size` below the number of
  distinct values loses the largest ones: callers bound it (see MomeLayer).
  """
  flat = idx_TxK.reshape(-1)
  uniq_U, inv = jnp.unique(flat, size=flat.size if size is None else size, fill_value=num_experts,
                           return_inverse=True)
  return uniq_U, inv.reshape(idx_TxK.shape)


def gather_rows(tree: Any, uniq_U: jax.Array, mesh: Mesh | None = None) -> Any:
  """Rows uniq_U of every leaf (leading axis N); replicated when a mesh is given."""
  if mesh is not None:
    return sharding.gather_rows_sharded(tree, uniq_U, mesh)
  return jax.tree.map(lambda a: jnp.take(a, uniq_U, axis=0, mode="clip"), tree)
