"""The row-sparse optimizer: optax applied to the expert rows a step touched, written in place.

A step differentiates only the gathered unique rows (U of them), applies the
optax transformation per row with `jax.vmap` over the rows' own optimizer state
(so each expert has its own step count), and writes rows and state back with
`.at[uniq].set(..., mode="drop")` into buffers the jitted step donates: no
dense [E, ...] gradient, update or copy. `dense_step` is the dense baseline.

Only the leaves that train have optimizer state and deltas: with keyed experts
(`down` is each expert's key, written once) a step trains `up` alone, and
`down` passes through the donated state untouched, so no step reads or writes
more than the touched rows of either leaf.
"""


from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from lamini_jax.mome.table import Table, gather_rows, unique_rows
from lamini_jax import sharding

LEAVES = ("down", "up")  # the leaves of a layer's table


def init_expert_opt_state(table: Table, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> Any:
  """Per-expert optimizer state: tx.init vmapped over rows (every leaf has leading N)."""
  if mesh is None:
    return _jitted_init(tx)(table)
  init = jax.vmap(tx.init)
  sharding.check_expert_sharded(table, mesh)
  return jax.jit(init, out_shardings=sharding.row_shardings(jax.eval_shape(init, table), mesh))(table)


@functools.lru_cache(maxsize=8)
def _jitted_init(tx: optax.GradientTransformation) -> Callable[[Table], Any]:
  """jit(vmap(tx.init)), one per optimizer: successive calls (`mome.edit`) reuse its compilation."""
  return jax.jit(jax.vmap(tx.init))


def row_grads(
    loss_fn: Callable[..., jax.Array],
    table: Table,
    idx_TxK: jax.Array,
    *args: Any,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Table, jax.Array]:
  """(loss, grads_rows, uniq_U) for loss_fn(rows, inv_TxK, *args) -> scalar.

  loss_fn sees the gathered unique rows and indices into them (it typically
  calls `apply_experts(x, inv, w, rows, cfg)`), so slots that share an expert
  sum into one row gradient and no [N, ...] gradient exists.
  """
  uniq_U, inv_TxK = unique_rows(idx_TxK, table["down"].shape[0])
  rows = gather_rows(table, uniq_U, mesh)
  loss, grads_rows = jax.value_and_grad(loss_fn)(rows, inv_TxK, *args)
  return loss, grads_rows, uniq_U


def row_update(tx: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  """(rows, state_rows, grads_rows) -> (new_rows, new_state_rows), tx applied per row."""

  def update(rows, state_rows, grads_rows):
    updates, new_state_rows = jax.vmap(tx.update)(grads_rows, state_rows, rows)
    return optax.apply_updates(rows, updates), new_state_rows

  return update


def sparse_step(
    table: Table,
    opt_state: Any,
    grads_rows: Table,
    uniq_U: jax.Array,
    *,
    tx: optax.GradientTransformation,
    mesh: Mesh | None = None,
) -> tuple[Table, Any]:
  """Updates rows uniq_U of the table's trained leaves and of their per-expert state.

  The trained leaves are those of `grads_rows` (and of `opt_state`); other leaves
  and other rows are returned untouched. Jit it with
  donate_argnames=("table", "opt_state") so the writes are in place.
  Note: `up` starts at zero, and optax.adafactor's default
  multiply_by_parameter_scale=True scales a zero row's updates by its
  min_scale 1e-3; memory tuning from a fresh table wants it off.
  """
  trained = {k: table[k] for k in grads_rows}
  if mesh is not None:
    new, opt_state = sharding.update_rows_sharded(row_update(tx), trained, opt_state, grads_rows,
                                                  uniq_U, mesh)
    return {**table, **new}, opt_state
  take = lambda a: jnp.take(a, uniq_U, axis=0, mode="clip")
  put = lambda a, rows: a.at[uniq_U].set(rows, mode="drop", indices_are_sorted=True)
  new_rows, new_state_rows = row_update(tx)(
      jax.tree.map(take, trained), jax.tree.map(take, opt_state), grads_rows)
  return ({**table, **jax.tree.map(put, trained, new_rows)},
          jax.tree.map(put, opt_state, new_state_rows))


def dense_step(
    table: Table, opt_state: Any, grads_table: Table, *, tx: optax.GradientTransformation,
) -> tuple[Table, Any]:
  """The dense baseline: per-row tx on all N rows from a dense [N, ...] gradient."""
  return row_update(tx)(table, opt_state, grads_table)


def _is_layer(node: Any) -> bool:
  """A layer's table (or its deltas, gradients or row state): a dict keyed by table leaves."""
  return isinstance(node, dict) and bool(node) and set(node) <= set(LEAVES)


def map_layers(fn: Callable[..., Any], tables: Any, *trees: Any) -> Any:
  """fn(table, *subtrees) for every layer table in a nested "mome" collection."""
  if _is_layer(tables):
    return fn(tables, *trees)
  return {k: map_layers(fn, tables[k], *(t[k] for t in trees)) for k in tables}


def sparse_step_layers(
    tables: Any, opt_states: Any, delta_grads: Any, uniqs: Any, *,
    tx: optax.GradientTransformation, mesh: Mesh | None = None,
) -> tuple[Any, Any]:
  """`sparse_step` on every layer of nested "mome", "mome_delta" and "mome_uniq" trees."""
  if _is_layer(tables):
    return sparse_step(tables, opt_states, delta_grads, uniqs["uniq"], tx=tx, mesh=mesh)
  pairs = {k: sparse_step_layers(tables[k], opt_states[k], delta_grads[k], uniqs[k], tx=tx, mesh=mesh)
           for k in tables}
  return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}


def trained_leaves(train_down: bool) -> tuple[str, ...]:
  """The table leaves a step trains: both, or `up` alone when `down` holds keys."""
  return LEAVES if train_down else ("up",)


def zero_deltas(tables: Any, num_rows: int, leaves: tuple[str, ...] = LEAVES) -> Any:
  """Zero "mome_delta" rows of `leaves` for every layer table: [E, a, b] -> [num_rows, a, b].

  num_rows = (tokens per layer call) * cfg.slots.
  """
  zeros = lambda a: jnp.zeros((num_rows,) + a.shape[1:], a.dtype)
  return map_layers(lambda t: {k: zeros(t[k]) for k in leaves}, tables)


def init_row_state(tables: Any, tx: optax.GradientTransformation, mesh: Mesh | None = None,
                   leaves: tuple[str, ...] = LEAVES) -> Any:
  """Per-expert optimizer state of `leaves` of every MoME layer (leading axis E, row-sharded on a mesh).

  A leaf that does not train has no state at all.
  """
  return map_layers(lambda t: init_expert_opt_state({k: t[k] for k in leaves}, tx, mesh), tables)
