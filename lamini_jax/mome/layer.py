"""The MoME layer: a residual branch beside a frozen block's MLP (`MomeLayer`), and its collections.

  h = h + mome(norm(h))      at the configured layers,
  mome(x)[t] = sum_k w[t, k] * up[e]^T act(down[e]^T x[t] - threshold),  e = idx[t, k].

Flax variable collections:
  "mome_router"   query [D, A, Q], keys1 [A, I, C], keys2 [A, J, C]: differentiated
                  in phase 1 only; phase 2 freezes it by not differentiating it.
  "mome_balance"  bias1 [A, I], bias2 [A, J]: the frozen selection bias set by
                  `collisions.balance_router`; never differentiated.
  "mome"          down [E, D, R], up [E, R, D]: the expert table, updated by
                  `sparse_optim.sparse_step`. Differentiate "mome_delta" instead (a
                  gradient w.r.t. "mome" itself is a dense [E, ...] array).
  "mome_delta"    (input, optional) zero rows [U, D, R] / [U, R, D], U = tokens * K
                  (`sparse_optim.zero_deltas`). When given, the layer uses
                  rows = table[uniq] + delta, so grad w.r.t. "mome_delta" is the
                  gradient of the gathered unique rows.
  "mome_uniq"     (output, mutable) the layer's uniq row indices for that step.
  "mome_focus"    (input, optional, with "mome_delta") "mask", bool with the
                  input's leading shape: the positions whose experts train (or that
                  shape + (K,): the slots whose experts train). The
                  delta rows are then the unique experts of those positions only,
                  so an expert selected only elsewhere is not updated; other
                  positions use a delta row where they select a trained expert and
                  the table elsewhere, so a trained row gets its full gradient.
  "mome_out"      (output, mutable) "y": the layer's output [..., D], for penalties
                  on it (`anchors.anchor_penalty`).
  "mome_route"    (input, optional) "experts", int32 [..., K]: the experts this layer's
                  router selects for the input, computed once beforehand
                  (`inputs.fact_routes`); the layer then computes only their weights.
A sparse step over a model therefore is:

  def loss_of(deltas):
    out, aux = model.apply({..., "mome": tables, "mome_delta": deltas}, batch,
                           mutable=["mome_uniq"])
    return loss(out), aux["mome_uniq"]
  (loss, uniqs), g = jax.value_and_grad(loss_of, has_aux=True)(zero_deltas(...))
  tables, opt = sparse_step_layers(tables, opt, g, uniqs, tx=tx, mesh=mesh)

All parameters carry logical axis names (see lamini_jax.sharding).
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lamini_jax.mome.config import MomeConfig
from lamini_jax.mome.router import BALANCE_AXES, ROUTER_AXES, router_param_init, route, zero_balance
from lamini_jax.mome.table import TABLE_AXES, table_param_init, apply_experts, gather_rows, unique_rows
from lamini_jax_kernels.dispatch import gather_apply_auto
from lamini_jax_kernels.gather_apply import GatherApplyFn


ROUTER, BALANCE, TABLE, DELTA, UNIQ = "mome_router", "mome_balance", "mome", "mome_delta", "mome_uniq"


FOCUS, OUT, ROUTE = "mome_focus", "mome_out", "mome_route"


class MomeLayer(nn.Module):
  """The MoME residual branch; see the module docstring for the collections.

  Input [..., D], output [..., D]. With a mesh, the table is used row-sharded
  (`shard_gather_apply`, `gather_rows_sharded`) and tokens split over `data`.
  """
  cfg: MomeConfig
  gather_apply: GatherApplyFn = gather_apply_auto
  mesh: Mesh | None = None

  def _vars(self, collection, axes, make_init):
    def boxed(name):
      init = nn.with_logical_partitioning(make_init(name, self.cfg), axes[name])
      return lambda: init(self.make_rng("params"))
    return {name: self.variable(collection, name, boxed(name)).value for name in axes}

  def _sow_out(self, y_XxD: jax.Array) -> None:
    if not self.is_initializing():  # init returns parameters only
      self.sow(OUT, "y", y_XxD, init_fn=lambda: None, reduce_fn=lambda _, new: new)

  @nn.compact
  def __call__(self, x_XxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    if x_XxD.shape[-1] != cfg.embed_dim:
      raise ValueError(f"MomeLayer: input width {x_XxD.shape[-1]} != cfg.embed_dim={cfg.embed_dim}")
    router = self._vars(ROUTER, ROUTER_AXES, router_param_init)
    balance = self._vars(BALANCE, BALANCE_AXES, lambda name, c: lambda key: zero_balance(c)[name])
    table = self._vars(TABLE, TABLE_AXES, table_param_init)
    x_TxD = x_XxD.reshape(-1, cfg.embed_dim)
    experts_TxK = None
    if self.has_variable(ROUTE, "experts"):
      experts = self.get_variable(ROUTE, "experts")
      if experts.shape != x_XxD.shape[:-1] + (cfg.slots,):
        raise ValueError(f"MomeLayer: mome_route experts have shape {experts.shape}, need the input's"
                         f" leading shape + (slots,) = {x_XxD.shape[:-1] + (cfg.slots,)}")
      experts_TxK = experts.reshape(-1, cfg.slots)
    idx_TxK, w_TxK = route(router, x_TxD, cfg, balance, experts_TxK)
    if not any(self.has_variable(DELTA, name) for name in TABLE_AXES):
      y_XxD = apply_experts(x_TxD, idx_TxK, w_TxK, table, cfg, self.gather_apply,
                            self.mesh).reshape(x_XxD.shape)
      self._sow_out(y_XxD)
      return y_XxD
    delta = {name: self.get_variable(DELTA, name) for name in TABLE_AXES
             if self.has_variable(DELTA, name)}  # the trained leaves (`up` alone for keyed experts)
    num_rows = next(iter(delta.values())).shape[0]
    focus_TxK = None
    if self.has_variable(FOCUS, "mask"):
      focus = self.get_variable(FOCUS, "mask")
      lead = x_XxD.shape[:-1]
      if focus.shape not in (lead, lead + (cfg.slots,)):
        raise ValueError(f"MomeLayer: mome_focus mask has shape {focus.shape}, need the input's"
                         f" leading shape {lead} (positions) or {lead + (cfg.slots,)} (slots)")
      focus_TxK = jnp.broadcast_to(focus.reshape(x_TxD.shape[0], -1), idx_TxK.shape)
    elif num_rows != x_TxD.shape[0] * cfg.slots:
      raise ValueError(
          f"MomeLayer: mome_delta has {num_rows} rows, need tokens * slots ="
          f" {x_TxD.shape[0]} * {cfg.slots} = {x_TxD.shape[0] * cfg.slots} (see zero_deltas)")
    table = jax.lax.stop_gradient(table)
    trained_TxK = idx_TxK if focus_TxK is None else jnp.where(focus_TxK, idx_TxK, cfg.num_experts)
    uniq_U, inv_TxK = unique_rows(trained_TxK, cfg.num_experts, num_rows)
    rows = gather_rows(table, uniq_U, self.mesh)
    rows = {**rows, **{name: rows[name] + d for name, d in delta.items()}}
    self.sow(UNIQ, "uniq", uniq_U, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    if focus_TxK is None:
      y_TxD = apply_experts(x_TxD, inv_TxK, w_TxK, rows, cfg, self.gather_apply)
    else:
      # Every slot whose expert is a trained row uses that row (so the gradient
      # of a trained row counts all its uses, prompt and anchor positions too);
      # the others use the table as is. Each slot adds w * expert(x), so the two
      # partial sums are exact. The padding index N never equals a real expert.
      pos_TxK = jnp.clip(jnp.searchsorted(uniq_U, idx_TxK), 0, num_rows - 1)
      hit_TxK = uniq_U[pos_TxK] == idx_TxK
      y_TxD = (apply_experts(x_TxD, pos_TxK, jnp.where(hit_TxK, w_TxK, 0.0), rows, cfg,
                             self.gather_apply)
               + apply_experts(x_TxD, idx_TxK, jnp.where(hit_TxK, 0.0, w_TxK), table, cfg,
                               self.gather_apply, self.mesh))
    self._sow_out(y_TxD.reshape(x_XxD.shape))
    return y_TxD.reshape(x_XxD.shape)
