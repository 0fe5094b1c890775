"""The jitted train steps: phase 2 (sparse rows), its dense baseline, and phase 1.

Phase 2 (`make_tuning_step`) differentiates only the gathered rows of the
experts the answer positions select, adds the decision hinge and the anchor
penalty when configured, and updates those rows in place (`sparse_optim`).
`make_dense_tuning_step` is the same objective with a dense table gradient;
`make_generalization_step` is phase 1 (dense router update, sparse rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from lamini_jax.config import ModelConfig
from lamini_jax.data import encoding
from lamini_jax.model import Transformer
from lamini_jax.mome.anchors import ANCHOR, anchor_penalty
from lamini_jax.mome.config import AnchorConfig, MomeTuningConfig
from lamini_jax.mome.inputs import layer_paths, tree_set
from lamini_jax.mome.layer import DELTA, FOCUS, OUT, ROUTE, ROUTER, TABLE, UNIQ
from lamini_jax.mome.sparse_optim import (LEAVES, dense_step, map_layers, sparse_step_layers,
                                          trained_leaves, zero_deltas)
from lamini_jax import train as train_lib


def _metrics(loss, row_sum, row_count):
  return {"loss": loss, "row_sum": row_sum, "row_count": row_count}


def output_rows(cfg: ModelConfig, params: Any, ids_X: jax.Array) -> jax.Array:
  """[..., D]: the output rows of tokens `ids_X` (final-norm scale folded in).

  logits[v] = row(v) . normalized final hidden state. Only the rows asked for are
  read: the [V, D] output matrix is never formed (2.1 GB at Llama 3's vocabulary).
  """
  scale_D = params["final_norm"]["scale"].astype(jnp.float32)
  if cfg.tie_word_embeddings:
    rows = jnp.take(params["embedding"], ids_X, axis=0)
  else:  # lm_head is [D, V]
    rows = jnp.moveaxis(jnp.take(params["lm_head"], ids_X, axis=1), 0, -1)
  return rows.astype(jnp.float32) * scale_D


def decision_hinge(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, mask_BxT: jax.Array,
                   rows_of: Callable[[jax.Array], jax.Array], margin: float) -> jax.Array:
  """Mean over targets of relu(margin - distance to the greedy decision boundary).

  The distance is measured in the space of the normalized final hidden state
  (RMS 1): (logit of the target - best other logit) / |row_target - row_other|.
  It is zero once greedy decoding picks every target with that much room, and
  its gradient is a unit push per target whatever the logit scale, so targets
  whose output row nearly equals others' (an EOS row that was never trained)
  are learned as fast as any other.
  """
  logits = logits_BxTxV[:, :-1].astype(jnp.float32)
  target_BxT = tokens_BxT[:, 1:]
  is_target = jax.nn.one_hot(target_BxT, logits.shape[-1], dtype=bool)
  other_BxT = jnp.argmax(jnp.where(is_target, -jnp.inf, logits), axis=-1)
  gap_BxT = (jnp.take_along_axis(logits, target_BxT[..., None], axis=-1)[..., 0]
             - jnp.take_along_axis(logits, other_BxT[..., None], axis=-1)[..., 0])
  dist_BxT = jnp.linalg.norm(rows_of(target_BxT) - rows_of(other_BxT), axis=-1)
  dist_BxT = jax.lax.stop_gradient(jnp.maximum(dist_BxT, 1e-12))
  mask = mask_BxT[:, 1:].astype(jnp.float32)
  return jnp.sum(jax.nn.relu(margin - gap_BxT / dist_BxT) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def focus_positions(mask_BxT: jax.Array) -> jax.Array:
  """[B, T] bool: the positions that predict a trained token (t where mask[t + 1] > 0)."""
  return jnp.pad(mask_BxT[:, 1:] > 0, ((0, 0), (0, 1)))


def _focus(model: Transformer, mask_BxT: jax.Array, train_slots: int | None) -> dict[str, Any]:
  focus = focus_positions(mask_BxT)
  if train_slots is not None:  # [B, T, K]: the first train_slots slots of each focus position
    focus = focus[..., None] & (jnp.arange(model.mome.slots) < train_slots)
  return _focus_slots(model, focus)


def _focus_slots(model: Transformer, focus: jax.Array) -> dict[str, Any]:
  """The "mome_focus" collection: `focus` ([B, T] positions or [B, T, K] slots) at every MoME layer."""
  tree: dict[str, Any] = {}
  for path in layer_paths(model):
    tree = tree_set(tree, path, {"mask": focus})
  return {FOCUS: tree}


def _first_layer_route(model: Transformer, experts_BxTxK: jax.Array | None) -> dict[str, Any]:
  if experts_BxTxK is None:
    return {}
  return {ROUTE: tree_set({}, layer_paths(model)[0], {"experts": experts_BxTxK})}


def focus_rows(encoded: Sequence[encoding.EncodedFact], batch_size: int, spec: MomeTuningConfig) -> int:
  """Rows a phase-2 step with `train_positions="answer"` gathers per layer: a bound that holds.

  A batch has at most batch_size * (most trained tokens of one fact) focus
  positions, each selecting K experts, plus the padding index; and there are
  only N + 1 distinct indices.
  """
  most = max(int(np.count_nonzero(e.loss_mask[1:])) for e in encoded)
  cfg = spec.layer_config(2)
  return min(batch_size * most * (spec.train_slots or cfg.slots), cfg.num_experts) + 1


def _pad_to(a_BxT: jax.Array, width: int, value) -> jax.Array:
  return jnp.pad(a_BxT, ((0, 0), (0, width - a_BxT.shape[1])), constant_values=value)


def _sparse_rows_step(loss_of: Callable, tables: Any, row_state: Any, num_rows: int,
                      leaves: tuple[str, ...], tx: optax.GradientTransformation, mesh: Mesh | None,
                      dense: Any = None) -> tuple[Any, Any, Any, Any]:
  """The path every sparse step shares: gradient of the gathered rows, per-row update, write back.

  `loss_of(deltas, dense) -> (objective, (aux, uniqs))` runs the model with the zero
  "mome_delta" rows of `leaves` (and `dense`, parameters updated densely, e.g. phase 1's
  router); the rows it gathered ("mome_uniq") and their optimizer state are updated
  in place. Returns (tables, row_state, aux, gradient of `dense`).
  """
  deltas = zero_deltas(tables, num_rows, leaves)
  (_, (aux, uniqs)), (g_rows, g_dense) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
      deltas, dense)
  tables, row_state = sparse_step_layers(tables, row_state, g_rows, uniqs, tx=tx, mesh=mesh)
  return tables, row_state, aux, g_dense


def make_tuning_step(model: Transformer, tx: optax.GradientTransformation,
                     mesh: Mesh | None = None, margin: float = 0.0,
                     train_positions: str = "answer", rows: int | None = None,
                     anchor: AnchorConfig | None = None, train_down: bool = True,
                     train_slots: int | None = None) -> Callable:
  """Phase 2, jitted with the state donated: sparse row updates of the expert tables.

  `train_slots` (with `train_positions="answer"`): only the first that many of
  the K slots of an answer position train (`MomeTuningConfig.train_slots`).

  `train_down=False` trains `up` only (the down rows of keyed experts are their keys):
  `down` then has neither deltas nor optimizer state, and passes through the
  donated state untouched (`sparse_optim.trained_leaves`).

  `frozen` holds "params" (backbone), "mome_router" and "mome_balance"; the
  state's `trainable` is the "mome" collection, its `opt_state` the per-row
  optimizer state. Only the gathered rows ("mome_delta") are differentiated.
  With `train_positions="answer"` those are the experts of the positions that
  predict a trained token ("mome_focus"), at most `rows` per layer
  (`focus_rows`; default tokens * K). A batch with more focus positions than
  `rows` allows gets a NaN loss, which `train.fit` reports, never a silently
  partial update.

  With an `anchor` of positive weight, `frozen` also holds "anchor" (`anchor_sequences`:
  tokens and mask [A, L]); step s adds anchors s * G .. s * G + G - 1 (mod A) as
  extra rows and `anchor.weight * anchor_penalty` to the objective. The
  reported loss stays the facts' token NLL.

  `step(state, frozen, tokens, mask, experts=None, focus=None)`: `experts` [B, T, K] are the
  first MoME layer's selections for the batch (`inputs.token_routes`; fixed in phase
  2), so the step does not route that layer; the anchor pool then holds its
  own, "experts" [A, L, K]. Without them every layer routes on every step, at a
  cost that grows with sqrt(E).

  `focus` (bool [B, T, K], with `train_positions="answer"`): the slots whose experts
  train, in place of every slot of the answer positions (the first `train_slots`);
  editing a stored memory (`mome.edit`) trains only some rows this way. Anchor rows
  have no focus slots.
  """
  slots = model.mome.slots
  leaves = trained_leaves(train_down)
  focused = train_positions == "answer"
  if train_slots is not None and not (focused and 1 <= train_slots <= slots):
    raise ValueError(f"make_tuning_step: train_slots={train_slots} needs train_positions='answer'"
                     f" and 1..{slots}")
  written = train_slots or slots  # rows written per answer position
  anchored = anchor is not None and anchor.weight > 0

  def loss_fn(deltas, tables, frozen, tokens_BxT, mask_BxT, anchor_mask_BxT, experts_BxTxK,
              focus_BxTxK=None):
    # Rows past the first b are anchors (mask 0: no loss, no answer positions).
    b = tokens_BxT.shape[0] - (0 if anchor_mask_BxT is None else anchor_mask_BxT.shape[0])
    focus = _focus(model, mask_BxT, train_slots) if focused else {}
    if focus_BxTxK is not None:
      focus = _focus_slots(model, focus_BxTxK)
    (logits, _), aux = model.apply({**frozen, **focus, **_first_layer_route(model, experts_BxTxK),
                                    TABLE: tables, DELTA: deltas}, tokens_BxT, mutable=[UNIQ, OUT])
    objective, nll = _objective(model, frozen, logits[:b], tokens_BxT[:b], mask_BxT[:b], margin)
    if anchor_mask_BxT is not None:
      objective = objective + anchor.weight * anchor_penalty(aux[OUT], anchor_mask_BxT)
    return objective, (nll, aux[UNIQ])

  def step(state: train_lib.TrainState, frozen, tokens_BxT, mask_BxT, experts_BxTxK=None,
           focus_BxTxK=None):
    if focus_BxTxK is not None and not focused:
      raise ValueError("make_tuning_step: a focus mask needs train_positions='answer'")
    anchor_mask_BxT, all_tokens, all_mask, all_experts = None, tokens_BxT, mask_BxT, experts_BxTxK
    all_focus = focus_BxTxK
    if anchored:
      frozen = dict(frozen)
      pool = frozen.pop(ANCHOR)
      if experts_BxTxK is not None and "experts" not in pool:
        raise ValueError("make_tuning_step: the batch has first-layer experts but the anchor pool"
                         " has none (anchor \"experts\" from inputs.token_routes)")
      pick_B = (state.step * anchor.batch_size + jnp.arange(anchor.batch_size)) % pool["tokens"].shape[0]
      a_tokens_BxT, anchor_mask_BxT = pool["tokens"][pick_B], pool["mask"][pick_B]
      width = max(tokens_BxT.shape[1], a_tokens_BxT.shape[1])
      all_tokens = jnp.concatenate([_pad_to(tokens_BxT, width, 0), _pad_to(a_tokens_BxT, width, 0)])
      all_mask = jnp.concatenate([_pad_to(mask_BxT, width, 0),
                                  jnp.zeros((anchor.batch_size, width), mask_BxT.dtype)])
      if experts_BxTxK is not None:
        # Padding positions come after every real token: their outputs reach no loss.
        pad = lambda e_BxTxK: jnp.pad(e_BxTxK, ((0, 0), (0, width - e_BxTxK.shape[1]), (0, 0)))
        all_experts = jnp.concatenate([pad(experts_BxTxK), pad(pool["experts"][pick_B])])
      if focus_BxTxK is not None:
        all_focus = jnp.concatenate([
            jnp.pad(focus_BxTxK, ((0, 0), (0, width - focus_BxTxK.shape[1]), (0, 0))),
            jnp.zeros((anchor.batch_size, width, slots), bool)])
    num_rows = all_tokens.size * slots if rows is None or not focused else rows
    loss_of = lambda deltas, _: loss_fn(deltas, state.trainable, frozen, all_tokens, all_mask,
                                        anchor_mask_BxT, all_experts, all_focus)
    tables, opt_state, (loss, row_sum, row_count), _ = _sparse_rows_step(
        loss_of, state.trainable, state.opt_state, num_rows, leaves, tx, mesh)
    new_state = state.replace(step=state.step + 1, trainable=tables, opt_state=opt_state)
    if focused:
      if focus_BxTxK is None:
        needed = jnp.minimum(jnp.sum(focus_positions(mask_BxT)) * written, model.mome.num_experts) + 1
      else:
        needed = jnp.minimum(jnp.sum(focus_BxTxK), model.mome.num_experts) + 1
      overflow = needed > num_rows
      loss, row_sum = (jnp.where(overflow, jnp.nan, a) for a in (loss, row_sum))
    return new_state, _metrics(loss, row_sum, row_count)

  return jax.jit(step, donate_argnums=0)


def _objective(model: Transformer, frozen, logits_BxTxV, tokens_BxT, mask_BxT, margin: float):
  """(objective, (mean NLL, per-row NLL sums, per-row counts)): NLL plus the optional hinge."""
  loss, row_sum, row_count = train_lib.token_nll(logits_BxTxV, tokens_BxT, mask_BxT)
  objective = loss
  if margin:
    rows_of = lambda ids: output_rows(model.cfg, frozen["params"], ids)
    objective = loss + decision_hinge(logits_BxTxV, tokens_BxT, mask_BxT, rows_of, margin)
  return objective, (loss, row_sum, row_count)


def make_dense_tuning_step(model: Transformer, tx: optax.GradientTransformation,
                           margin: float = 0.0) -> Callable:
  """Phase 2 with a dense [N, ...] table gradient and the optimizer on all rows (the baseline)."""

  def loss_fn(tables, frozen, tokens_BxT, mask_BxT):
    logits, _ = model.apply({**frozen, TABLE: tables}, tokens_BxT)
    return _objective(model, frozen, logits, tokens_BxT, mask_BxT, margin)

  def step(state: train_lib.TrainState, frozen, tokens_BxT, mask_BxT):
    (_, (loss, row_sum, row_count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.trainable, frozen, tokens_BxT, mask_BxT)
    dense = lambda t, s, g: dense_step(t, s, g, tx=tx)
    pairs = map_layers(dense, state.trainable, state.opt_state, grads)
    tables = map_layers(lambda t, p: p[0], state.trainable, pairs)
    opt_state = map_layers(lambda t, p: p[1], state.trainable, pairs)
    new_state = state.replace(step=state.step + 1, trainable=tables, opt_state=opt_state)
    return new_state, _metrics(loss, row_sum, row_count)

  return jax.jit(step, donate_argnums=0)


def make_generalization_step(model: Transformer, router_tx: optax.GradientTransformation,
                             row_tx: optax.GradientTransformation, mesh: Mesh | None = None) -> Callable:
  """Phase 1: dense update of the router, sparse row updates of the tables.

  The state's `trainable` is {"router": "mome_router", "table": "mome"}; `frozen`
  holds "params" and "mome_balance".
  """
  slots = model.mome.slots

  def loss_fn(deltas, router, tables, frozen, tokens_BxT, mask_BxT):
    variables = {**frozen, ROUTER: router, TABLE: tables, DELTA: deltas}
    (logits, _), aux = model.apply(variables, tokens_BxT, mutable=[UNIQ])
    nll = train_lib.token_nll(logits, tokens_BxT, mask_BxT)
    return nll[0], (nll, aux[UNIQ])

  def step(state: train_lib.TrainState, frozen, tokens_BxT, mask_BxT):
    router, tables = state.trainable["router"], state.trainable["table"]
    loss_of = lambda deltas, router: loss_fn(deltas, router, tables, frozen, tokens_BxT, mask_BxT)
    tables, row_state, (loss, row_sum, row_count), g_router = _sparse_rows_step(
        loss_of, tables, state.opt_state["table"], tokens_BxT.size * slots, LEAVES, row_tx, mesh,
        dense=router)
    updates, router_state = router_tx.update(g_router, state.opt_state["router"], router)
    router = optax.apply_updates(router, updates)
    new_state = state.replace(step=state.step + 1, trainable={"router": router, "table": tables},
                              opt_state={"router": router_state, "table": row_state})
    return new_state, _metrics(loss, row_sum, row_count)

  return jax.jit(step, donate_argnums=0)
