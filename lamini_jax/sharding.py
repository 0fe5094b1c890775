"""Mesh, logical axis rules, and row-sharded expert tables.

The mesh has two axes: `data` (tokens are split over it) and `expert` (the
rows of every expert table, and of its optimizer state, are split over it).
Parameters carry logical axis names; `LOGICAL_RULES` is the one table that maps
them to mesh axes. A name missing from the table is an error, never a silent
replication, and a table whose leading (expert) axis would end up replicated on
a mesh with more than one `expert` device is an error too.

The `*_sharded` functions run the expert-table operations under `jax.shard_map`:
device (d, e) of n `expert` devices holds rows [e * E/n, (e + 1) * E/n) of the table, maps global row
indices to local ones, works on the rows it owns (masking the others), and
combines partial results with `psum` over `expert`. No device ever holds the
whole table.

Meshes use `AxisType.Auto` axes (jax >= 0.10 defaults to Explicit) so that
jit in/out shardings, flax logical partitioning and shard_map work unchanged.
`jax.shard_map` runs with its default replication check (keyword `check_vma`
on jax 0.10-0.12; `check_rep` was the old experimental API's): every output
here is psum-ed over `expert` or varies only where its out_spec says so.
"""

from collections.abc import Callable, Mapping, Sequence
import types
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
EXPERT = "expert"

LOGICAL_RULES: Mapping[str, str | None] = types.MappingProxyType({
    # Split.
    "batch": DATA,
    "expert": EXPERT,
    # Backbone (replicated).
    "vocab": None,
    "embed": None,
    "q_heads": None,
    "kv_heads": None,
    "head_dim": None,
    "mlp": None,
    "lora_rank": None,
    "layers": None,
    "length": None,
    # MoME (replicated except "expert").
    "expert_rank": None,  # R, the rank of one expert
    "key_heads": None,  # H, router heads
    "key_dim": None,  # query / sub-key width
    "sub_keys": None,  # n1 or n2, rows of a product-key half
    "expert_slots": None,  # K = H * top_k selected experts per token
    "expert_rows": None,  # U, gathered (unique) rows of a training step
})

Names = Sequence[str | None]


def make_mesh(data: int, expert: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, expert) mesh over the first data * expert devices."""
  for field, value in (("data", data), ("expert", expert)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"make_mesh: {field}={value!r} must be a positive int")
  devices = list(jax.devices() if devices is None else devices)
  if data * expert > len(devices):
    raise ValueError(
        f"make_mesh: data * expert = {data} * {expert} = {data * expert} devices"
        f" requested but only {len(devices)} are available")
  return jax.make_mesh(
      (data, expert), (DATA, EXPERT), axis_types=(AxisType.Auto, AxisType.Auto),
      devices=devices[:data * expert])


def logical_to_spec(names: Names | P, rules: Mapping[str, str | None] = LOGICAL_RULES) -> P:
  """Maps logical axis names (None = replicated dim) to a PartitionSpec."""
  axes = []
  for name in names:
    if name is None:
      axes.append(None)
      continue
    if name not in rules:
      raise KeyError(
          f"logical axis name {name!r} has no rule in lamini_jax.sharding.LOGICAL_RULES"
          f" (known: {sorted(rules)}); add it there with its mesh axis or None")
    axes.append(rules[name])
  used = [a for a in axes if a is not None]
  if len(used) != len(set(used)):
    raise ValueError(f"logical axes {tuple(names)} map two dims to one mesh axis: {tuple(axes)}")
  return P(*axes)


def _is_names(x: Any) -> bool:
  return isinstance(x, P) or (
      isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x))


def shardings_for(tree: Any, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES) -> Any:
  """NamedShardings for a tree whose leaves are logical names (tuples or PartitionSpecs).

  Works on `nn.get_partition_spec(jax.eval_shape(model.init, ...))`. Raises if a
  leaf with an "expert" dim would be replicated over a >1 `expert` axis.
  """

  def one(names):
    spec = logical_to_spec(names, rules)
    if "expert" in tuple(names) and _mesh_size(mesh, EXPERT) > 1 and EXPERT not in tuple(spec):
      raise ValueError(
          f"logical axes {tuple(names)} map to {spec}: the expert table would be replicated"
          f" over the {_mesh_size(mesh, EXPERT)}-way '{EXPERT}' mesh axis; rule 'expert' must"
          f" map to '{EXPERT}'")
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, tree, is_leaf=_is_names)


def row_spec(ndim: int) -> P:
  """Spec of an array whose leading axis is the expert (row) axis."""
  return P(EXPERT, *([None] * (ndim - 1)))


def row_shardings(tree: Any, mesh: Mesh) -> Any:
  """Shardings splitting the leading axis of every leaf (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda a: NamedSharding(mesh, row_spec(a.ndim)), tree)


def _mesh_size(mesh: Mesh, axis: str) -> int:
  return dict(mesh.shape).get(axis, 1)


def check_expert_sharded(table: Any, mesh: Mesh) -> None:
  """Raises unless every leaf's leading axis is split evenly over `expert`.

  Leaves are jax Arrays or ShapeDtypeStructs that carry a sharding. A no-op on a
  mesh whose `expert` axis has size 1.
  """
  num_shards = _mesh_size(mesh, EXPERT)
  if num_shards == 1:
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(table):
    where = jax.tree_util.keystr(path) or "table"
    rows = leaf.shape[0]
    if rows % num_shards:
      raise ValueError(
          f"{where}: {rows} rows do not split evenly over the {num_shards}-way '{EXPERT}'"
          " mesh axis; make num_experts a multiple of it")
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      raise ValueError(f"{where}: has no sharding; create it with out_shardings on the mesh")
    local_rows = sharding.shard_shape(leaf.shape)[0]
    if local_rows != rows // num_shards:
      raise ValueError(
          f"{where}: each device holds {local_rows} of {rows} rows (sharding {sharding});"
          f" the expert table must be split over the {num_shards}-way '{EXPERT}' axis"
          f" ({rows // num_shards} rows per device), never replicated")


def check_tokens_divisible(num_tokens: int, mesh: Mesh) -> None:
  size = _mesh_size(mesh, DATA)
  if num_tokens % size:
    raise ValueError(
        f"{num_tokens} tokens do not split evenly over the {size}-way '{DATA}' mesh axis")


def _owned(idx: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
  """Local row index and ownership mask of global indices on this expert shard."""
  local = idx - jax.lax.axis_index(EXPERT) * num_local
  return local, (local >= 0) & (local < num_local)


def shard_gather_apply(gather_apply: Callable[..., jax.Array], mesh: Mesh) -> Callable[..., jax.Array]:
  """Wraps a gather-apply implementation to run over a row-sharded table.

  Tokens are split over `data`; each expert shard applies the slots whose
  experts it owns (other slots get weight 0) and the partial outputs are
  summed over `expert`. Same signature as the wrapped function.
  """

  def fn(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation):
    check_tokens_divisible(x_TxD.shape[0], mesh)

    def local(x_TxD, idx_TxK, w_TxK, down_nxDxR, up_nxRxD):
      local_TxK, owned_TxK = _owned(idx_TxK, down_nxDxR.shape[0])
      y_TxD = gather_apply(
          x_TxD, jnp.where(owned_TxK, local_TxK, 0), jnp.where(owned_TxK, w_TxK, 0),
          down_nxDxR, up_nxRxD, activation)
      return jax.lax.psum(y_TxD, EXPERT)

    tokens = P(DATA, None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, row_spec(3), row_spec(3)),
        out_specs=tokens)(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD)

  return fn


def gather_rows_sharded(table: Any, idx_U: jax.Array, mesh: Mesh) -> Any:
  """Rows idx_U of every leaf of a row-sharded tree, replicated on all devices.

  Indices outside [0, E) give zero rows.
  """

  def local(table, idx_U):
    def one(leaf):
      local_U, owned_U = _owned(idx_U, leaf.shape[0])
      rows = jnp.take(leaf, jnp.where(owned_U, local_U, 0), axis=0)
      mask = owned_U.reshape((-1,) + (1,) * (leaf.ndim - 1))
      return jax.lax.psum(jnp.where(mask, rows, jnp.zeros_like(rows)), EXPERT)
    return jax.tree.map(one, table)

  specs = jax.tree.map(lambda a: row_spec(a.ndim), table)
  return jax.shard_map(
      local, mesh=mesh, in_specs=(specs, P()),
      out_specs=jax.tree.map(lambda _: P(), table))(table, idx_U)


def update_rows_sharded(
    update_fn: Callable[[Any, Any, Any], tuple[Any, Any]],
    table: Any,
    opt_state: Any,
    grads_rows: Any,
    idx_U: jax.Array,
    mesh: Mesh,
) -> tuple[Any, Any]:
  """Applies update_fn to rows idx_U of a row-sharded table and its row-sharded state.

  update_fn(rows, state_rows, grads_rows) -> (new_rows, new_state_rows) works on
  gathered rows. Each expert shard updates only the rows it owns, in place
  (indices it does not own, and indices >= E, are dropped). grads_rows and
  idx_U are replicated.
  """

  def local(table, opt_state, grads_rows, idx_U):
    num_local = jax.tree.leaves(table)[0].shape[0]
    local_U, owned_U = _owned(idx_U, num_local)
    local_U = jnp.where(owned_U, local_U, num_local)  # num_local: dropped on write
    take = lambda a: jnp.take(a, local_U, axis=0, mode="clip")
    put = lambda a, rows: a.at[local_U].set(rows, mode="drop")
    new_rows, new_state_rows = update_fn(
        jax.tree.map(take, table), jax.tree.map(take, opt_state), grads_rows)
    return jax.tree.map(put, table, new_rows), jax.tree.map(put, opt_state, new_state_rows)

  table_specs = jax.tree.map(lambda a: row_spec(a.ndim), table)
  state_specs = jax.tree.map(lambda a: row_spec(a.ndim), opt_state)
  grad_specs = jax.tree.map(lambda _: P(), grads_rows)
  return jax.shard_map(
      local, mesh=mesh, in_specs=(table_specs, state_specs, grad_specs, P()),
      out_specs=(table_specs, state_specs))(table, opt_state, grads_rows, idx_U)
