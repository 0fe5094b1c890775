"""Lamini-1 memory tuning on a frozen backbone: prepare, tune and load a MoME model.

Two phases (paper section 7.1), both built on `train.fit`:
  1. generalization (`generalize`, skipped when `epochs = 0`): router and expert
     tables train on general text, the backbone frozen; the result is kept in
     the run directory and reused by every later call with the same configuration.
  2. memory tuning (`tune_mome`): the router is frozen (with `whiten`, its query first
     decorrelates the facts' inputs; with `balance`, a frozen selection bias spreads the facts
     over the experts), so each fact selects the same experts on every step; a step updates
     only the selected experts' rows, so unselected experts, the router and the backbone stay
     bit-for-bit unchanged.
`prepare` runs phase 1 (or restores it), the whitening, the balance, the collision
report and the keying of experts; `load_mome` rebuilds a trained model from its run paths.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from lamini_jax.checkpoint import Checkpointer
from lamini_jax.config import ModelConfig
from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.model import Transformer
from lamini_jax.mome.anchors import ANCHOR
from lamini_jax.mome.collisions import adds_zero, balance_facts, choice_fragility, fact_collisions
from lamini_jax.mome.collisions import whiten_facts, written_slots
from lamini_jax.mome.config import MomeTuningConfig
from lamini_jax.mome.inputs import (fact_inputs, fact_slots, layer_key, layer_paths, token_routes, tree_get,
                                    tree_set)
from lamini_jax.mome.layer import BALANCE, ROUTER, TABLE
from lamini_jax.mome import registry
from lamini_jax.mome.router import route_jit, zero_balance
from lamini_jax.mome.sparse_optim import LEAVES, init_row_state, map_layers, trained_leaves
from lamini_jax.mome.steps import focus_rows, make_generalization_step, make_tuning_step
from lamini_jax.mome.table import key_rows
from lamini_jax import sharding
from lamini_jax import train as train_lib
from lamini_jax_kernels import dispatch
from lamini_jax_kernels.gather_apply import GatherApplyFn


# Inside a MoME run's store (`train.RunPaths.store`): the frozen router and balance
# (an Orbax checkpoint) and the facts' collision report, written last.
ROUTER_DIR = "router"
GENERAL_LABEL = "mome-general"  # the label of phase 1 in a run directory
COLLISIONS_FILE = "collisions.json"


def mome_model(cfg: ModelConfig, spec: MomeTuningConfig, *, mesh: Mesh | None = None,
               gather_apply: GatherApplyFn | None = None) -> Transformer:
  """The backbone with a MoME residual branch at `spec.layers`.

  `gather_apply` overrides the implementation `spec.kernel` names (`lamini_jax_kernels.dispatch`).
  """
  bad = [i for i in spec.layers if i >= cfg.num_layers]
  if bad:
    raise ValueError(f"mome.layers {list(spec.layers)}: layer {bad[0]} is outside 0..{cfg.num_layers - 1}"
                     " of the backbone")
  return Transformer(cfg, mome=spec.layer_config(cfg.hidden_size), mome_layers=tuple(spec.layers),
                     mome_gather_apply=gather_apply or dispatch.get_gather_apply(spec.kernel),
                     mome_mesh=mesh)


def _mome_collections(model: Transformer, key: jax.Array) -> dict[str, Any]:
  # Only the MoME collections are returned, so XLA drops the backbone initializers.
  variables = model.clone(mome_mesh=None).init({"params": key}, jnp.zeros((1, 1), jnp.int32))
  return {c: variables[c] for c in (ROUTER, BALANCE, TABLE)}


def init_mome(model: Transformer, seed: int, mesh: Mesh | None = None,
              zero_down: bool = False) -> dict[str, Any]:
  """Fresh router, zero balance and table (up = 0) of every MoME layer.

  With a mesh, each leaf is created directly with its sharding (the table split
  over `expert`, the rest replicated); the table never exists on one device.
  `zero_down`: down = 0 as well, and its N x D normals are never drawn (XLA
  drops them). For keyed experts without phase 1 (`generalize`): the rows the
  facts select are keyed before phase 2; any other row computes act(-threshold),
  0 with "relu" and no gradient for its up, so an expert that only a later
  layer's moving input selects in phase 2 stays silent (a random down could fire).
  """
  key = jax.random.key(seed)

  def init(k):
    fresh = nn.meta.unbox(_mome_collections(model, k))
    if zero_down:
      fresh[TABLE] = map_layers(lambda t: {**t, "down": jnp.zeros_like(t["down"])},
                                          fresh[TABLE])
    return fresh
  if mesh is None:
    return jax.jit(init)(key)
  specs = nn.get_partition_spec(jax.eval_shape(lambda k: _mome_collections(model, k), key))
  shardings = sharding.shardings_for(specs, mesh)
  out = jax.jit(init, out_shardings=shardings)(key)
  sharding.check_expert_sharded(out[TABLE], mesh)
  return out


def _replicate(tree: Any, mesh: Mesh | None) -> Any:
  return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


def _state(trainable: Any, opt_state: Any, seed: int, mesh: Mesh | None) -> train_lib.TrainState:
  # step and rng replicated on the mesh like the rest: the step's outputs are, so a loose
  # step count would compile the step a second time for its own outputs.
  step, rng = _replicate((jnp.zeros((), jnp.int32),
                          jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))), mesh)
  return train_lib.TrainState(step=step, trainable=trainable, opt_state=opt_state, rng=rng)


def tuning_state(tables: Any, tx: optax.GradientTransformation, seed: int,
                 mesh: Mesh | None = None, leaves: tuple[str, ...] = LEAVES, *,
                 copy: bool = True) -> train_lib.TrainState:
  """Phase-2 train state: the tables and fresh row state of `leaves`.

  The step donates the state, so the tables are copied unless `copy=False`: then the caller
  gives up `tables` (`mome.edit`, whose table is its own).
  """
  if copy:
    tables = jax.tree.map(jnp.copy, tables)
  return _state(tables, init_row_state(tables, tx, mesh, leaves), seed, mesh)


def windows_as_facts(windows_WxT: np.ndarray) -> list[encoding.EncodedFact]:
  """Corpus windows as training sequences: every token but the first is a target."""
  mask = np.ones(windows_WxT.shape[1], bool)
  mask[0] = False
  return [encoding.EncodedFact(np.asarray(w, np.int32), mask.copy()) for w in windows_WxT]


def generalize(model: Transformer, params: Any, spec: MomeTuningConfig, windows_WxT: np.ndarray | None,
               *, pad_id: int, paths: train_lib.RunPaths | None = None, resume: bool = False,
               progress: bool = True, mesh: Mesh | None = None,
               label: str = GENERAL_LABEL) -> tuple[dict[str, Any], float]:
  """Phase 1; returns ({"mome_router": ..., "mome": ...}, seconds spent here).

  With `paths` (`runs.RunDir.paths(runs.GENERAL_LABEL)`), phase 1 checkpoints there
  and its finished result is kept in `paths.store`; a later call with the same
  configuration restores it instead of recomputing it, and a different
  configuration there is an error.
  """
  t0 = time.perf_counter()
  g = spec.generalization
  fresh = init_mome(model, spec.seed, mesh, zero_down=bool(spec.key_match) and g.epochs == 0)
  result = {ROUTER: fresh[ROUTER], TABLE: fresh[TABLE]}
  if g.epochs == 0:
    return result, time.perf_counter() - t0
  cache = None
  if paths is not None:
    cache = Checkpointer(paths.store, every=0)
    restored = cache.restore(result)
    if restored is not None:
      cache.close()
      if restored[1].get("config") != spec.phase1_key():
        raise ValueError(f"{paths.store} holds phase 1 of another MoME configuration; use another"
                         " run directory")
      return restored[0], time.perf_counter() - t0
  if windows_WxT is None:
    raise ValueError("mome.generalization.epochs > 0 needs corpus windows (general_windows)")
  router_tx, row_tx = g.router_optimizer.build(), g.expert_optimizer.build()
  trainable = {"router": result[ROUTER], "table": jax.tree.map(jnp.copy, result[TABLE])}
  state = _state(trainable, {"router": router_tx.init(trainable["router"]),
                             "table": init_row_state(trainable["table"], row_tx, mesh)}, spec.seed, mesh)
  frozen = _replicate({"params": params, BALANCE: fresh[BALANCE]}, mesh)
  train_cfg = train_lib.TrainConfig(
      epochs=g.epochs, batch_size=g.batch_size, seq_len=windows_WxT.shape[1], seed=spec.seed,
      checkpoint_every=spec.train.checkpoint_every)
  step = make_generalization_step(model, router_tx, row_tx, mesh)
  fit = train_lib.fit(step, state, frozen, windows_as_facts(windows_WxT), train_cfg, pad_id=pad_id,
                      label=label, paths=paths, resume=resume, progress=progress)
  result = {ROUTER: fit.state.trainable["router"], TABLE: fit.state.trainable["table"]}
  if cache is not None:
    cache.save(int(fit.state.step), result, {"config": spec.phase1_key()})
    cache.close()
  return result, time.perf_counter() - t0


def key_experts(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                match: float, inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
                train_slots: int | None = None, slot_choice: str = "first") -> Any:
  """The "mome" collection with each layer's answer-position experts keyed (`key_rows`).

  `train_slots`, `slot_choice`: only the experts of the slots phase 2 writes are keyed,
  each to the positions that write it (`collisions.written_slots`;
  `MomeTuningConfig.train_slots` and `train_slot_choice`).

  Layer by layer in order, each keyed to its inputs at the start of phase 2
  given the keys of the earlier layers (recomputed unless every layer adds 0,
  as before phase 2 without phase 1); `inputs`: `fact_inputs` of `variables`,
  if already computed. The layer tables of `variables` are donated.
  """
  tables = variables[TABLE]
  fixed = adds_zero(tables)
  x = None if inputs is None else inputs[0]
  for path in layer_paths(model):
    if x is None or not fixed:
      x, _ = fact_inputs(model, {**variables, TABLE: tables}, encoded)
    name = layer_key(path)
    router, balance = tree_get(variables[ROUTER], path), tree_get(variables[BALANCE], path)
    idx, w = map(np.asarray, route_jit(router, jnp.asarray(x[name]), model.mome, balance))
    written_PxK = written_slots(idx, w, train_slots, slot_choice,
                                fragile=choice_fragility(router, x[name], model.mome, balance, slot_choice))
    tables = tree_set(tables, path, key_rows(tree_get(tables, path), np.where(written_PxK, idx, -1),
                                             x[name], model.mome, match, only=np.unique(idx[written_PxK])))
  return tables


def exclusive_focus(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                    spec: MomeTuningConfig, inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None
                    ) -> np.ndarray:
  """bool [F, T, K]: the slots of the first MoME layer that phase 2 trains at each fact's
  answer positions, as `spec.train_slot_choice` chooses them (`fact_slots`)."""
  path = layer_paths(model)[0]
  x = (inputs if inputs is not None else fact_inputs(model, variables, encoded))[0][layer_key(path)]
  router, balance = tree_get(variables[ROUTER], path), tree_get(variables[BALANCE], path)
  idx, w = route_jit(router, jnp.asarray(x), model.mome, balance)
  choice = spec.train_slot_choice
  return fact_slots(encoded, written_slots(np.asarray(idx), np.asarray(w), spec.train_slots, choice,
                                           fragile=choice_fragility(router, x, model.mome, balance, choice)))


@dataclasses.dataclass
class Prepared:
  """A MoME model ready for memory tuning: phase 1 done, router frozen.

  `frozen` holds "params", "mome_router" and "mome_balance"; `table` is the
  starting "mome" collection; `collisions` maps "unbalanced" (and, with
  balance, "balanced") to each layer's collision figures. `focus_FxTxK`: with
  `mome.train_slot_choice` "exclusive", the slots phase 2 trains (`exclusive_focus`).
  """

  model: Transformer
  frozen: dict[str, Any]
  table: Any
  collisions: dict[str, Any]
  generalization_seconds: float
  seconds: float  # all of `prepare`, phase 1 included
  focus_FxTxK: np.ndarray | None = None

  def variables(self, table: Any) -> dict[str, Any]:
    return {**self.frozen, TABLE: table}

  def variables_of(self, state: train_lib.TrainState) -> dict[str, Any]:
    """Model variables for a phase-2 train state (for `evaluate.recall_callback`)."""
    return self.variables(state.trainable)


def prepare(cfg: ModelConfig, params: Any, encoded: Sequence[encoding.EncodedFact],
            spec: MomeTuningConfig, *, pad_id: int, general_windows: np.ndarray | None = None,
            paths: train_lib.RunPaths | None = None, general_paths: train_lib.RunPaths | None = None,
            label: str = "mome", resume: bool = False, progress: bool = True,
            mesh: Mesh | None = None, gather_apply: GatherApplyFn | None = None) -> Prepared:
  """Phase 1 (or its cache), the optional whitening and balance, and the facts' collision report.

  With `paths`, the frozen router and balance are written to `paths.store` with
  the collision report (`is_prepared` tells whether they are there), and
  restored from there on resume. `general_paths`: where phase 1 keeps its work.
  """
  t0 = time.perf_counter()
  model = mome_model(cfg, spec, mesh=mesh, gather_apply=gather_apply)
  general, general_seconds = generalize(
      model, params, spec, general_windows, pad_id=pad_id, paths=general_paths, resume=resume,
      progress=progress, mesh=mesh)
  zero_bias = {}
  for path in layer_paths(model):
    zero_bias = tree_set(zero_bias, path, zero_balance(model.mome))
  variables = {"params": params, ROUTER: general[ROUTER],
               BALANCE: _replicate(zero_bias, mesh), TABLE: general[TABLE]}
  store = None if paths is None else paths.store
  restored, inputs = None, None
  plain = model.clone(mome_mesh=None)  # host-side passes over the facts: no mesh needed
  choice = (spec.train_slots, spec.train_slot_choice)
  if store is not None and resume and is_prepared(store):
    ckpt = Checkpointer(store / ROUTER_DIR, every=0)
    restored = ckpt.restore({ROUTER: variables[ROUTER], BALANCE: variables[BALANCE]})
    ckpt.close()
  if restored is not None:
    variables.update(restored[0])
    collisions = json.loads((store / COLLISIONS_FILE).read_text())
  else:
    inputs = fact_inputs(plain, variables, encoded)
    if spec.whiten:
      variables[ROUTER] = whiten_facts(plain, variables, encoded, inputs)
      inputs = inputs if adds_zero(variables[TABLE]) else None
    collisions = {"unbalanced": fact_collisions(plain, variables, encoded, inputs, *choice)}
    if spec.balance:
      variables[BALANCE] = balance_facts(plain, variables, encoded, spec.balance_rounds,
                                         spec.balance_rate, inputs)
      if not adds_zero(variables[TABLE]):
        inputs = None
      collisions["balanced"] = fact_collisions(plain, variables, encoded, inputs, *choice)
    if store is not None:
      ckpt = Checkpointer(store / ROUTER_DIR, every=0)
      ckpt.save(0, {ROUTER: variables[ROUTER], BALANCE: variables[BALANCE]},
                {"label": label})
      ckpt.close()
      if jax.process_index() == 0:  # one writer when several processes share the run directory
        (store / COLLISIONS_FILE).write_text(json.dumps(collisions, indent=2) + "\n")
  focus = None
  if spec.train_slot_choice != "first":  # one layer: its inputs do not depend on its own table
    inputs = inputs or fact_inputs(plain, variables, encoded)
    focus = exclusive_focus(plain, variables, encoded, spec, inputs)
  if spec.key_match:
    variables[TABLE] = key_experts(plain, variables, encoded, spec.key_match, inputs, *choice)
  frozen = _replicate({k: variables[k] for k in ("params", ROUTER, BALANCE)}, mesh)
  return Prepared(model, frozen, variables[TABLE], collisions, general_seconds,
                  time.perf_counter() - t0, focus)


def tune_mome(cfg: ModelConfig, params: Any, encoded: Sequence[encoding.EncodedFact],
              mome_cfg: MomeTuningConfig, train_cfg: train_lib.TrainConfig, *, pad_id: int,
              paths: train_lib.RunPaths | None = None, general_paths: train_lib.RunPaths | None = None,
              label: str = "mome", resume: bool = False, progress: bool = True,
              on_epoch: Callable | None = None, stop_after_steps: int | None = None,
              general_windows: np.ndarray | None = None, prepared: Prepared | None = None,
              mesh: Mesh | None = None, gather_apply: GatherApplyFn | None = None,
              anchors: dict[str, np.ndarray] | None = None,
              ) -> tuple[Transformer, dict[str, Any], train_lib.FitResult]:
  """Memorizes `encoded` facts into their selected experts; returns (model, variables, result).

  `anchors` (`anchor_sequences`) is needed when `mome_cfg.anchor.weight > 0`.

  Runs `prepare` first unless `prepared` is given (build it first to hand
  `prepared.variables_of` to an `on_epoch` recall hook). Phase 2 trains with
  `train_cfg`, its optimizer applied per expert row, and `mome_cfg.margin`.
  """
  if prepared is None:
    prepared = prepare(cfg, params, encoded, mome_cfg, pad_id=pad_id, general_windows=general_windows,
                       paths=paths, general_paths=general_paths, label=label, resume=resume,
                       progress=progress, mesh=mesh, gather_apply=gather_apply)
  tx = train_cfg.optimizer.build()
  state = tuning_state(prepared.table, tx, train_cfg.seed, mesh, trained_leaves(not mome_cfg.key_match))
  anchor_cfg = mome_cfg.anchor if mome_cfg.anchor.weight > 0 else None
  frozen = prepared.frozen
  plain = prepared.model.clone(mome_mesh=None)  # host-side passes over the facts: no mesh needed
  routes_of = lambda tokens_NxT: token_routes(plain, prepared.variables(prepared.table), tokens_NxT)
  if anchor_cfg is not None:
    if anchors is None:
      raise ValueError("mome.anchor.weight > 0 needs the anchor pool (tune_mome(anchors=...),"
                       " see anchor_sequences)")
    anchors = {**anchors, "experts": routes_of(np.asarray(anchors["tokens"]))}
    frozen = {**frozen, ANCHOR: _replicate(jax.tree.map(jnp.asarray, anchors), mesh)}
  step = make_tuning_step(prepared.model, tx, mesh, mome_cfg.margin, mome_cfg.train_positions,
                          focus_rows(encoded, train_cfg.batch_size, mome_cfg), anchor_cfg,
                          train_down=not mome_cfg.key_match, train_slots=mome_cfg.train_slots)
  longest = max(len(e.tokens) for e in encoded)
  routes_FxTxK = routes_of(batch_lib.stack_encoded(encoded, longest, pad_id)[0])
  focus_FxTxK = prepared.focus_FxTxK
  if (focus_FxTxK is None) != (mome_cfg.train_slot_choice == "first"):
    raise ValueError(f"tune_mome: mome.train_slot_choice={mome_cfg.train_slot_choice!r} but `prepared`"
                     " was made with another (prepare with this mome config)")
  extras = lambda batch: (batch_routes(routes_FxTxK, batch),) + (
      () if focus_FxTxK is None else (batch_focus(focus_FxTxK, batch),))
  result = train_lib.fit(step, state, frozen, encoded, train_cfg, pad_id=pad_id, label=label,
                         paths=paths, resume=resume, progress=progress, on_epoch=on_epoch,
                         stop_after_steps=stop_after_steps, batch_extras=extras)
  return prepared.model, prepared.variables(result.state.trainable), result


def batch_routes(routes_FxTxK: np.ndarray, batch: batch_lib.Batch) -> jax.Array:
  """[B, T, K]: the first MoME layer's experts for a batch's rows (padding rows: any valid experts).

  Positions past a fact's last token get expert 0: they are padding, whose
  outputs reach no loss.
  """
  width = batch.tokens_BxT.shape[1]
  e_BxTxK = routes_FxTxK[np.maximum(batch.fact_index_B, 0), :width]
  return jnp.asarray(np.pad(e_BxTxK, ((0, 0), (0, width - e_BxTxK.shape[1]), (0, 0))))


def batch_focus(focus_FxTxK: np.ndarray, batch: batch_lib.Batch) -> jax.Array:
  """bool [B, T, K]: a batch's rows of the per-fact slot focus (`Prepared.focus_FxTxK`);
  padding rows get none."""
  width = batch.tokens_BxT.shape[1]
  f_BxTxK = focus_FxTxK[np.maximum(batch.fact_index_B, 0), :width] & batch.valid_B[:, None, None]
  return jnp.asarray(np.pad(f_BxTxK, ((0, 0), (0, width - f_BxTxK.shape[1]), (0, 0))))


def focus_slots(routes_FxTxK: np.ndarray, batch: batch_lib.Batch, rows_N: np.ndarray,
                train_slots: int | None) -> jax.Array:
  """bool [B, T, K]: the slots of a batch's answer positions (the first `train_slots`) whose
  first-layer expert is one of `rows_N` (bool [N]): what an edit of stored facts trains
  (`make_tuning_step`'s `focus`)."""
  e_BxTxK = np.asarray(batch_routes(routes_FxTxK, batch))
  answer_BxT = np.zeros(batch.loss_mask_BxT.shape, bool)
  answer_BxT[:, :-1] = batch.loss_mask_BxT[:, 1:] > 0
  focus = answer_BxT[..., None] & rows_N[e_BxTxK]
  if train_slots is not None:
    focus &= np.arange(e_BxTxK.shape[-1]) < train_slots
  return jnp.asarray(focus)


def apply_rows(tables: Any, rows: registry.Rows) -> Any:
  """The "mome" collection with the rows of `rows` (`registry.load_rows`) written into it."""
  for name, leaves in rows.items():
    path, idx = tuple(name.split("/")), jnp.asarray(leaves["rows"], jnp.int32)
    tables = tree_set(tables, path, {k: (v.at[idx].set(jnp.asarray(leaves[k], v.dtype)) if k in leaves else v)
                                     for k, v in tree_get(tables, path).items()})
  return tables


def is_prepared(store: pathlib.Path) -> bool:
  """Whether `prepare` finished writing a frozen router and collision report into `store`."""
  return (store / COLLISIONS_FILE).is_file()


def load_mome(spec: MomeTuningConfig, paths: train_lib.RunPaths, cfg: ModelConfig,
              params: Any) -> tuple[Transformer, dict[str, Any]]:
  """(model, variables) of a memory-tuned MoME: frozen router from `paths.store`, table from
  the newest checkpoint in `paths.checkpoints`, or, once its facts were listed or edited
  (`lamini_jax.facts`), the committed version of its memory (`registry.read_manifest`):
  the checkpoint it names with the version's changed rows written in.

  Shapes come from `jax.eval_shape`: no table is initialised and no optimizer
  built just to learn what the checkpoint holds.
  """
  model = mome_model(cfg, spec)
  abstract = jax.eval_shape(lambda k: _mome_collections(model, k), jax.random.key(spec.seed))
  abstract = nn.meta.unbox(abstract)
  ckpt = Checkpointer(paths.store / ROUTER_DIR, every=0)
  frozen = ckpt.restore({ROUTER: abstract[ROUTER], BALANCE: abstract[BALANCE]})
  ckpt.close()
  if frozen is None:
    raise FileNotFoundError(f"{paths.store / ROUTER_DIR}: no frozen router of this MoME run")
  manifest = registry.read_manifest(paths.store)
  if manifest is not None and not (paths.checkpoints / str(manifest.base_step)).is_dir():
    raise FileNotFoundError(f"{paths.store / registry.MANIFEST} builds on step {manifest.base_step} of"
                            f" {paths.checkpoints}, which is no longer there")
  ckpt = Checkpointer(paths.checkpoints, every=0)
  table = ckpt.restore_trainable(abstract[TABLE], None if manifest is None else manifest.base_step)
  ckpt.close()
  if table is None:
    raise FileNotFoundError(f"{paths.checkpoints}: no checkpoint (train.checkpoint_every must be > 0"
                            " for a run to be loadable)")
  if manifest is not None:
    table = apply_rows(table, registry.load_rows(paths.store, manifest))
  return model, {"params": params, **frozen[0], TABLE: table}
