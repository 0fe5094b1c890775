"""Lamini-1 memory tuning: frozen routing, sparse updates, recall, resume, sharding, experiment."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import randomization
from lamini_jax.config import ModelConfig
from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import evaluate as eval_lib
from lamini_jax import model as model_lib
from lamini_jax.mome import anchors as anchors_lib
from lamini_jax.mome import collisions as collisions_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import edit_checks
from lamini_jax.mome import inputs as inputs_lib
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import steps as steps_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs
from lamini_jax import sharding
from lamini_jax import train as train_lib
from lamini_jax import yaml_config
from lamini_jax_kernels.gather_apply import gather_apply_reference

# A random tiny Llama (odd widths) with a MoME on its last layer: N = 2^8 experts.
CFG = ModelConfig(vocab_size=67, hidden_size=22, intermediate_size=37, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=6, max_position_embeddings=64, tie_word_embeddings=True)
SEQ = 16
TRAIN = train_lib.TrainConfig(
    epochs=4, batch_size=4, seq_len=SEQ, seed=1, length_bucket=None,
    optimizer=train_lib.OptimizerConfig(learning_rate=0.2, multiply_by_parameter_scale=False))
SPEC = mome_config.MomeTuningConfig(
    layers=(2,), layer=mome_config.MomeConfig(num_experts=2**8, expert_rank=2, num_heads=2, key_dim=8,
                                              top_k=3, activation="silu"),
    balance=False, seed=3, generalization=mome_config.GeneralizationConfig(epochs=0), train=TRAIN)


@pytest.fixture(scope="module")
def params():
  params = model_lib.init_variables(model_lib.Transformer(CFG), jax.random.key(0))["params"]
  # Embedding rows of norm ~3 (as in trained models) so logits can move far from uniform.
  return {**params, "embedding": params["embedding"] * 30.0}


@pytest.fixture(scope="module")
def encoded():
  """7 sequences of 9-15 tokens; the last 5 of each are the trained answer."""
  rng = np.random.default_rng(4)
  out = []
  for n in rng.integers(9, 16, size=7):
    tokens = rng.integers(3, CFG.vocab_size, size=n).astype(np.int32)
    mask = np.arange(n) >= n - 5
    out.append(encoding.EncodedFact(tokens, mask))
  return out


def _stack(encoded):
  tokens, mask = batch_lib.stack_encoded(encoded, SEQ, 0)
  return jnp.asarray(tokens), jnp.asarray(mask)


def _uniq(model, variables, tokens_BxT):
  """The rows each MoME layer gathers for a batch (what a sparse step updates)."""
  deltas = sparse_optim.zero_deltas(variables[layer_lib.TABLE], tokens_BxT.size * model.mome.slots)
  _, aux = model.apply({**variables, layer_lib.DELTA: deltas}, tokens_BxT, mutable=[layer_lib.UNIQ])
  return aux[layer_lib.UNIQ]


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(layers=()), "mome.layers"),
    (dict(layers=(1, 1)), "mome.layers"),
    (dict(key_match=1.5), "mome.key_match"),
    (dict(margin=-1.0), "mome.margin"),
    (dict(balance_rounds=-1), "mome.balance_rounds"),
    (dict(whiten="yes"), "mome.whiten"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(SPEC, **kwargs)
  with pytest.raises(ValueError, match="generalization.windows"):
    mome_config.GeneralizationConfig(windows=0)
  with pytest.raises(ValueError, match="layer 3 is outside"):
    mome_tuning.mome_model(CFG, dataclasses.replace(SPEC, layers=(3,)))


def test_run_config_has_a_mome_section_that_round_trips(tmp_path):
  cfg = runs.load_run_config(runs.REPO / "configs" / "randomization_cpu.yaml",
                             ["mome.layer.num_experts=4096", "mome.train.epochs=3"])
  assert cfg.mome.layer.num_experts == 4096 and cfg.mome.train.epochs == 3
  assert not cfg.mome.train.optimizer.multiply_by_parameter_scale
  path = tmp_path / "config.yaml"
  path.write_text(yaml_config.dump(cfg))
  assert runs.load_run_config(path) == cfg
  with pytest.raises(yaml_config.ConfigError, match="mome.layer.top_k"):
    runs.load_run_config(None, ["mome.layer.top_k=nope"])
  with pytest.raises(ValueError, match="mome.layer.embed_dim=32 differs from the backbone"):
    mome_tuning.mome_model(CFG, runs.load_run_config(None, ["mome.layers=[1]", "mome.layer.embed_dim=32"]).mome)
  with pytest.raises(yaml_config.ConfigError, match=r"mome\.layer: MomeConfig\.key_dim=9 must be even"):
    runs.load_run_config(None, ["mome.layer.key_dim=9"])
  # A section given in part keeps the enclosing default's other fields.
  partial = runs.load_run_config(None, ["mome.layer.top_k=3"]).mome.layer
  assert partial == dataclasses.replace(mome_config.MomeTuningConfig().layer, top_k=3)


# ----------------------------------------------------------------------------
# Phase 2 on the tiny model.
# ----------------------------------------------------------------------------


def test_frozen_router_selects_the_same_experts_and_only_they_change(params, encoded):
  prepared = mome_tuning.prepare(CFG, params, encoded, SPEC, pad_id=0)
  model, start = prepared.model, prepared.variables(prepared.table)
  frozen_copy = jax.tree.map(np.array, prepared.frozen)
  tx = TRAIN.optimizer.build()
  state = mome_tuning.tuning_state(prepared.table, tx, TRAIN.seed)
  step = steps_lib.make_tuning_step(model, tx, margin=SPEC.margin)
  uniq_fn = jax.jit(_uniq, static_argnums=0)
  tokens_all, mask_all = _stack(encoded)
  nll = jax.jit(lambda v: train_lib.token_nll(model.apply(v, tokens_all)[0], tokens_all, mask_all)[0])
  loss_before = float(nll(start))
  touched = set()
  for epoch in range(3):
    for batch in batch_lib.epoch_batches(encoded, 4, SEQ, 0, seed=1, epoch=epoch):
      tokens = jnp.asarray(batch.tokens_BxT)
      before = uniq_fn(model, prepared.variables(state.trainable), tokens)
      # The router is frozen: the current table selects what the starting one did.
      assert _leaves_equal(before, uniq_fn(model, start, tokens))
      touched.update(np.asarray(before["layers_2"]["mome"]["uniq"]).tolist())
      state, _ = step(state, prepared.frozen, tokens, jnp.asarray(batch.loss_mask_BxT))
  loss_after = float(nll(prepared.variables(state.trainable)))
  assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
  touched.discard(SPEC.layer.num_experts)  # the padding index of unique_rows
  rows = sorted(touched)
  untouched = np.setdiff1d(np.arange(SPEC.layer.num_experts), rows)
  assert 0 < len(rows) < SPEC.layer.num_experts
  new, old = state.trainable["layers_2"]["mome"], start[layer_lib.TABLE]["layers_2"]["mome"]
  for name in ("down", "up"):
    np.testing.assert_array_equal(np.asarray(new[name])[untouched], np.asarray(old[name])[untouched])
  assert np.any(np.asarray(new["up"])[rows] != 0)  # up starts at 0
  # Per-row optimizer state: untouched rows still hold their initial state.
  init_state = sparse_optim.init_row_state(start[layer_lib.TABLE], tx)
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(init_state), strict=True):
    np.testing.assert_array_equal(np.asarray(got)[untouched], np.asarray(want)[untouched])
  assert _leaves_equal(prepared.frozen, frozen_copy)  # backbone, router, balance


def test_answer_focus_trains_only_experts_of_positions_that_predict_answers(params, encoded):
  # MoME at layer 1: the experts of prompt positions reach the loss through later attention.
  spec = dataclasses.replace(SPEC, layers=(1,))
  prepared = mome_tuning.prepare(CFG, params, encoded, spec, pad_id=0)
  model, start = prepared.model, prepared.variables(prepared.table)
  tokens, mask = _stack(encoded[:4])
  x = inputs_lib.layer_inputs(model, start, tokens)["layers_1/mome"]
  router = start[layer_lib.ROUTER]["layers_1"]["mome"]
  idx_TxK, _ = router_lib.route(router, x.reshape(-1, CFG.hidden_size), model.mome,
                                start[layer_lib.BALANCE]["layers_1"]["mome"])
  focus = np.asarray(steps_lib.focus_positions(mask))
  np.testing.assert_array_equal(focus[:, :-1], np.asarray(mask)[:, 1:] > 0)
  idx = np.asarray(idx_TxK).reshape(*focus.shape, -1)
  prompt_only = np.setdiff1d(idx[~focus], idx[focus])
  assert len(prompt_only) > 0 and len(np.unique(idx[focus])) > 0
  tx = TRAIN.optimizer.build()
  up = {}
  for positions in ("answer", "all"):
    step = steps_lib.make_tuning_step(model, tx, margin=SPEC.margin, train_positions=positions)
    state, _ = step(mome_tuning.tuning_state(prepared.table, tx, 0), prepared.frozen, tokens, mask)
    up[positions] = np.asarray(state.trainable["layers_1"]["mome"]["up"])
  assert not np.any(up["answer"][prompt_only])  # up starts at 0 and got no gradient
  assert np.any(up["all"][prompt_only])
  assert np.all(np.any(up["answer"][np.unique(idx[focus])] != 0, axis=(1, 2)))
  with pytest.raises(ValueError, match="mome.train_positions"):
    dataclasses.replace(SPEC, train_positions="prompt")



def test_keyed_experts_fire_on_their_facts_and_train_up_only(params, encoded):
  spec = dataclasses.replace(SPEC, key_match=0.8,
                             layer=dataclasses.replace(SPEC.layer, activation="relu", threshold=2.0))
  prepared = mome_tuning.prepare(CFG, params, encoded, spec, pad_id=0)
  model, start = prepared.model, prepared.variables(prepared.table)
  x, fact_P = inputs_lib.fact_inputs(model, start, encoded)
  x = x["layers_2/mome"]
  idx, _ = router_lib.route(start[layer_lib.ROUTER]["layers_2"]["mome"], jnp.asarray(x), model.mome,
                            start[layer_lib.BALANCE]["layers_2"]["mome"])
  idx = np.asarray(idx)
  down = np.asarray(prepared.table["layers_2"]["mome"]["down"])
  z_PxK = np.einsum("PD,PKD->PK", x, down[idx][..., 0]) - spec.layer.threshold
  alone = np.bincount(idx.ravel(), minlength=spec.layer.num_experts)[idx] == 1
  # An expert keyed to one position fires there with threshold * (1 / match - 1).
  np.testing.assert_allclose(z_PxK[alone], 2.0 * (1 / 0.8 - 1), rtol=1e-4)
  assert alone.sum() >= 5 and np.all(z_PxK[alone] > 0)
  # Keyed rows are exactly those the answer positions select; without phase 1 the
  # rest start at down = 0 (never drawn), and every row still starts with up = 0.
  zero = mome_tuning.init_mome(model, spec.seed, zero_down=True)[layer_lib.TABLE]["layers_2"]["mome"]
  assert not np.any(np.asarray(zero["down"])) and not np.any(np.asarray(zero["up"]))
  np.testing.assert_array_equal(np.flatnonzero(np.any(down != 0, axis=(1, 2))), np.unique(idx))
  drawn = np.asarray(mome_tuning.init_mome(model, spec.seed)[layer_lib.TABLE]["layers_2"]["mome"]["down"])
  assert np.all(np.any(drawn != 0, axis=(1, 2)))  # the default still draws every row
  assert len(np.unique(fact_P)) == len(encoded)
  tx = TRAIN.optimizer.build()
  step = steps_lib.make_tuning_step(model, tx, margin=spec.margin, train_down=False)
  tokens, mask = _stack(encoded[:4])
  start = mome_tuning.tuning_state(prepared.table, tx, 0, leaves=("up",))
  keys = {getattr(k, "key", None) for path, _ in jax.tree_util.tree_leaves_with_path(start.opt_state)
          for k in path}
  assert "up" in keys and "down" not in keys  # a frozen leaf has no optimizer state
  state, metrics = step(start, prepared.frozen, tokens, mask)
  after = state.trainable["layers_2"]["mome"]
  np.testing.assert_array_equal(np.asarray(after["down"]), down)
  assert np.any(np.asarray(after["up"]) != 0) and np.isfinite(float(metrics["loss"]))
  with pytest.raises(ValueError, match="mome.key_match=0.8 must be in"):
    dataclasses.replace(SPEC, key_match=0.8)


def test_cached_first_layer_routes_give_the_step_of_live_routing(params, encoded):
  # The shipped path (tune_mome): the first MoME layer's experts come from token_routes, the
  # anchors' too; the step must equal the one that routes every layer live. MoME at layers 1
  # and 2: layer 2 still routes live (its input moves with layer 1's experts).
  spec = dataclasses.replace(SPEC, layers=(1, 2), key_match=0.8, margin=1.0,
                             anchor=mome_config.AnchorConfig(weight=0.5, batch_size=2, seq_len=12),
                             layer=dataclasses.replace(SPEC.layer, activation="relu", threshold=2.0))
  prepared = mome_tuning.prepare(CFG, params, encoded, spec, pad_id=0)
  model, start = prepared.model, prepared.variables(prepared.table)
  tokens, mask = _stack(encoded[:4])
  experts = inputs_lib.token_routes(model, start, np.asarray(tokens))
  x = inputs_lib.layer_inputs(model, start, tokens)["layers_1/mome"]
  live, _ = router_lib.route(start[layer_lib.ROUTER]["layers_1"]["mome"], x.reshape(-1, CFG.hidden_size),
                             model.mome, start[layer_lib.BALANCE]["layers_1"]["mome"])
  np.testing.assert_array_equal(experts, np.asarray(live).reshape(experts.shape))
  pool = _anchor_pool()
  tx = TRAIN.optimizer.build()
  step = steps_lib.make_tuning_step(model, tx, margin=spec.margin, anchor=spec.anchor, train_down=False)
  run = lambda frozen, *batch: step(mome_tuning.tuning_state(prepared.table, tx, 0, leaves=("up",)),
                                    frozen, tokens, mask, *batch)
  frozen = {**prepared.frozen, anchors_lib.ANCHOR: jax.tree.map(jnp.asarray, pool)}
  live_state, live_metrics = run(frozen)
  cached_frozen = {**frozen, anchors_lib.ANCHOR: {
      **frozen[anchors_lib.ANCHOR], "experts": jnp.asarray(inputs_lib.token_routes(model, start, pool["tokens"]))}}
  state, metrics = run(cached_frozen, jnp.asarray(experts))
  np.testing.assert_allclose(float(metrics["loss"]), float(live_metrics["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(live_state.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # The layer uses the experts it is given: other experts, other rows trained (up starts at 0).
  moved, _ = run(cached_frozen, jnp.asarray((experts + 1) % spec.layer.num_experts))
  trained = lambda s: set(np.flatnonzero(np.any(np.asarray(s.trainable["layers_1"]["mome"]["up"]) != 0,
                                                axis=(1, 2))))
  assert trained(moved) != trained(state) and trained(state) <= set(experts.ravel())
  with pytest.raises(ValueError, match="anchor pool has none"):
    run(frozen, jnp.asarray(experts))


def test_train_slots_write_only_the_first_slots_of_answer_positions(params, encoded):
  spec = dataclasses.replace(SPEC, key_match=0.8, train_slots=2,
                             layer=dataclasses.replace(SPEC.layer, activation="relu", threshold=2.0))
  prepared = mome_tuning.prepare(CFG, params, encoded, spec, pad_id=0)
  model, start = prepared.model, prepared.variables(prepared.table)
  x, fact_P = inputs_lib.fact_inputs(model, start, encoded)
  idx, _ = router_lib.route(start[layer_lib.ROUTER]["layers_2"]["mome"], jnp.asarray(x["layers_2/mome"]),
                            model.mome, start[layer_lib.BALANCE]["layers_2"]["mome"])
  idx = np.asarray(idx)
  written, rest = np.unique(idx[:, :2]), np.setdiff1d(idx[:, 2:], idx[:, :2])
  assert len(rest) > 0
  down = np.asarray(prepared.table["layers_2"]["mome"]["down"])
  np.testing.assert_array_equal(np.flatnonzero(np.any(down != 0, axis=(1, 2))), written)
  rows = prepared.collisions["unbalanced"]["layers_2/mome"]["rows_per_fact"]
  assert rows == np.mean([len(np.unique(idx[fact_P == f, :2])) for f in range(len(encoded))])
  tx = TRAIN.optimizer.build()
  step = steps_lib.make_tuning_step(model, tx, margin=spec.margin, train_down=False, train_slots=2)
  tokens, mask = _stack(encoded)
  state, _ = step(mome_tuning.tuning_state(prepared.table, tx, 0, leaves=("up",)), prepared.frozen,
                  tokens, mask)
  up = np.asarray(state.trainable["layers_2"]["mome"]["up"])
  assert not np.any(up[rest]) and np.all(np.any(up[written] != 0, axis=(1, 2)))
  with pytest.raises(ValueError, match="mome.train_slots=7 must be in 1..6"):
    dataclasses.replace(SPEC, train_slots=7)
  with pytest.raises(ValueError, match="mome.train_slots needs mome.train_positions='answer'"):
    dataclasses.replace(SPEC, train_slots=1, train_positions="all")



def test_exclusive_train_slots_give_each_answer_position_its_own_expert(params, encoded):
  spec = dataclasses.replace(SPEC, key_match=0.8, train_slots=1, train_slot_choice="exclusive",
                             layer=dataclasses.replace(SPEC.layer, activation="relu", threshold=2.0))
  prepared = mome_tuning.prepare(CFG, params, encoded, spec, pad_id=0)
  model, start = prepared.model, prepared.variables(prepared.table)
  x, fact_P = inputs_lib.fact_inputs(model, start, encoded)
  idx, _ = router_lib.route(start[layer_lib.ROUTER]["layers_2"]["mome"], jnp.asarray(x["layers_2/mome"]),
                            model.mome, start[layer_lib.BALANCE]["layers_2"]["mome"])
  idx = np.asarray(idx)
  assert len(np.unique(idx[:, 0])) < len(idx)  # the first slots would share experts here
  _, pred_FxT = inputs_lib.answer_positions(encoded)
  focus_FxTxK = prepared.focus_FxTxK
  chosen_PxK = focus_FxTxK[pred_FxT]
  assert not focus_FxTxK[~pred_FxT].any() and np.all(chosen_PxK.sum(axis=1) == 1)
  written = idx[chosen_PxK]
  assert len(np.unique(written)) == len(written) == len(idx)  # no two positions write one expert
  down = np.asarray(prepared.table["layers_2"]["mome"]["down"])
  np.testing.assert_array_equal(np.flatnonzero(np.any(down != 0, axis=(1, 2))), np.sort(written))
  report = prepared.collisions["unbalanced"]["layers_2/mome"]
  assert report["rows_shared"] == 0 and report["rows_written"] == len(written)
  assert report["rows_per_fact"] == np.mean([np.sum(fact_P == f) for f in range(len(encoded))])
  # Phase 2 trains exactly the chosen rows: `up` of every other row, selected or not, stays 0.
  _, variables, _ = mome_tuning.tune_mome(CFG, params, encoded, spec, dataclasses.replace(TRAIN, epochs=1),
                                          pad_id=0, prepared=prepared, progress=False)
  up = np.asarray(variables[layer_lib.TABLE]["layers_2"]["mome"]["up"])
  np.testing.assert_array_equal(np.flatnonzero(np.any(up != 0, axis=(1, 2))), np.sort(written))
  # Greedy: a free expert, else the least written; then (exclusive_unread) the least selected; then
  # the best weight.
  got = collisions_lib.exclusive_slots(np.array([[5, 7], [5, 7], [5, 7], [3, 3]]),
                                       np.array([[.2, .8], [.9, .1], [.5, .5], [.5, .5]]), 1)
  np.testing.assert_array_equal(got, [[0, 1], [1, 0], [1, 0], [1, 0]])
  idx, w = np.array([[2, 1], [2, 9]]), np.array([[.9, .1], [.9, .1]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1), [[1, 0], [0, 1]])
  unread = collisions_lib.written_slots(idx, w, 1, "exclusive_unread")
  np.testing.assert_array_equal(unread, [[0, 1], [0, 1]])  # expert 2, selected twice, is avoided
  assert collisions_lib.exclusive_slots(np.array([[3, 3]]), np.ones((1, 2)), 2).sum() == 1
  with pytest.raises(ValueError, match="prepare with this mome config"):
    mome_tuning.tune_mome(CFG, params, encoded, dataclasses.replace(spec, train_slot_choice="first"),
                          TRAIN, pad_id=0, prepared=prepared, progress=False)
  with pytest.raises(ValueError, match="mome.train_slot_choice='exclusive' needs mome.train_slots"):
    dataclasses.replace(spec, train_slots=None)
  # Rows a stored memory writes (`taken`) or reads (`read`) count before the first position.
  idx, w = np.array([[4, 6, 8]]), np.array([[.5, .3, .2]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1, taken=[4]), [[0, 1, 0]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1, True, [4], [6, 6]), [[0, 0, 1]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1, False, [4], [6]), [[0, 1, 0]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 2, True, [4, 6, 8], [20]),
                                [[1, 1, 0]])  # all taken once: by weight
  edit_checks.check_supported(spec)  # editing supports the exclusive choices

def test_rows_shared_for_want_of_free_experts_are_a_warning(params, encoded):
  # 7 facts x 5 answer positions write 35 rows, one each, into a table of 16: they must share.
  spec = dataclasses.replace(SPEC, layer=dataclasses.replace(SPEC.layer, num_experts=16))
  model = mome_tuning.mome_model(CFG, spec)
  variables = {"params": params, **mome_tuning.init_mome(model, spec.seed)}
  for choice in ("exclusive", "exclusive_unread"):
    report = collisions_lib.fact_collisions(model, variables, encoded, None, 1, choice)
    layer = report["layers_2/mome"]
    assert layer["rows_written"] <= 16 and layer["rows_shared"] >= 1
    got = collisions_lib.shared_rows_warning(report, 16, choice)
    assert (f"layers_2/mome: {layer['rows_shared']} rows shared, {layer['rows_written']} written in a"
            f" table of 16 for 7 facts asking {layer['rows_per_fact']:.1f} each") in got
  # "first" writes every slot, shared by design; no shared row, no warning.
  assert collisions_lib.shared_rows_warning(report, 16, "first") is None
  big = mome_tuning.mome_model(CFG, SPEC)  # 2^8 rows
  free = collisions_lib.fact_collisions(big, {"params": params, **mome_tuning.init_mome(big, SPEC.seed)},
                                        encoded, None, 1, "exclusive_unread")
  assert free["layers_2/mome"]["rows_shared"] == 0
  assert collisions_lib.shared_rows_warning(free, 2**8, "exclusive_unread") is None


def test_whiten_freezes_the_router_whitened_on_the_answer_inputs_and_balances_that(params, encoded, tmp_path):
  spec = dataclasses.replace(SPEC, whiten=True, balance=True)
  model = mome_tuning.mome_model(CFG, spec)
  start = {"params": params, **mome_tuning.init_mome(model, spec.seed)}
  x, _ = inputs_lib.fact_inputs(model, start, encoded)
  paths = runs.RunDir(tmp_path).paths("mome")
  prepared = mome_tuning.prepare(CFG, params, encoded, spec, pad_id=0, paths=paths)
  router = prepared.frozen[layer_lib.ROUTER]
  want = router_lib.whitened(start[layer_lib.ROUTER]["layers_2"]["mome"], x["layers_2/mome"])
  assert _leaves_equal(router["layers_2"]["mome"], want)
  # The report, the balance and the slots are of the whitened router.
  white = {**start, layer_lib.ROUTER: router}
  assert prepared.collisions["unbalanced"] == collisions_lib.fact_collisions(model, white, encoded, None)
  balance = collisions_lib.balance_facts(model, white, encoded, spec.balance_rounds, spec.balance_rate)
  assert _leaves_equal(prepared.frozen[layer_lib.BALANCE], balance)
  plain = mome_tuning.prepare(CFG, params, encoded, dataclasses.replace(spec, whiten=False), pad_id=0)
  assert not _leaves_equal(plain.frozen[layer_lib.ROUTER], router)
  # Kept in the run's store: a resumed run routes with the same whitened router, restored (on the
  # first 3 facts alone it would whiten to another).
  resumed = mome_tuning.prepare(CFG, params, encoded[:3], spec, pad_id=0, paths=paths, resume=True)
  assert _leaves_equal(resumed.frozen, prepared.frozen) and resumed.collisions == prepared.collisions
  x3, _ = inputs_lib.fact_inputs(model, start, encoded[:3])
  assert not _leaves_equal(router_lib.whitened(start[layer_lib.ROUTER]["layers_2"]["mome"],
                                               x3["layers_2/mome"]), want)


def _anchor_pool(n=5, length=12, seed=6):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, size=(n, length)).astype(np.int32)
  mask = (np.arange(length)[None, :] < rng.integers(6, length + 1, size=(n, 1))).astype(np.float32)
  return {"tokens": np.where(mask > 0, tokens, 0).astype(np.int32), "mask": mask}


@pytest.mark.slow  # a dense jax.grad over the whole table: runs in CI after the fast suite
def test_sparse_step_applies_the_dense_gradient_to_the_trained_rows_only(params, encoded):
  # MoME at layers 0 and 2: prompt and anchor positions reach the loss through
  # attention and the later layer. One plain SGD step moves each trained row
  # (an expert of an answer-predicting position) by minus its full gradient,
  # which a dense jax.grad over the whole table gives as reference.
  weight = 3.0
  spec = dataclasses.replace(SPEC, layers=(0, 2))
  prepared = mome_tuning.prepare(CFG, params, encoded, spec, pad_id=0)
  model = prepared.model
  # A table with nonzero up rows, so every path carries gradient.
  key = jax.random.key(8)
  table = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(key, a.shape, a.dtype), prepared.table)
  tokens, mask = _stack(encoded[:4])
  pool = _anchor_pool()
  anchor = mome_config.AnchorConfig(weight=weight, batch_size=3, seq_len=12)
  tx = optax.sgd(1.0)
  step = steps_lib.make_tuning_step(model, tx, margin=SPEC.margin, anchor=anchor)
  frozen = {**prepared.frozen, anchors_lib.ANCHOR: jax.tree.map(jnp.asarray, pool)}
  state, metrics = step(mome_tuning.tuning_state(table, tx, 0), frozen, tokens, mask)

  pick = np.arange(3) % 5  # step 0 takes anchors 0, 1, 2
  all_tokens = jnp.asarray(np.concatenate([np.asarray(tokens),
                                           np.pad(pool["tokens"][pick], ((0, 0), (0, SEQ - 12)))]))
  all_mask = jnp.asarray(np.concatenate([np.asarray(mask), np.zeros((3, SEQ), np.float32)]))

  def dense_objective(t):
    (logits, _), aux = model.apply({**prepared.frozen, layer_lib.TABLE: t}, all_tokens, mutable=[layer_lib.OUT])
    objective, (nll, _, _) = steps_lib._objective(model, prepared.frozen, logits[:4], all_tokens[:4],
                                                  all_mask[:4], SPEC.margin)
    penalty = 0.0
    for y in jax.tree.leaves(aux[layer_lib.OUT]):  # the anchors' rows and real tokens, written out
      sq = jnp.sum(y[4:, :12] ** 2, axis=-1)
      penalty = penalty + jnp.sum(sq * pool["mask"][pick]) / np.sum(pool["mask"][pick])
    return objective + weight * penalty, nll

  (_, nll), dense = jax.value_and_grad(dense_objective, has_aux=True)(table)
  np.testing.assert_allclose(float(metrics["loss"]), float(nll), rtol=1e-6)
  focus = np.asarray(steps_lib.focus_positions(all_mask))
  x = inputs_lib.layer_inputs(model, prepared.variables(table), all_tokens)
  for name in ("layers_0", "layers_2"):
    router = prepared.frozen[layer_lib.ROUTER][name]["mome"]
    idx, _ = router_lib.route(router, x[f"{name}/mome"].reshape(-1, CFG.hidden_size), model.mome,
                              prepared.frozen[layer_lib.BALANCE][name]["mome"])
    trained = np.unique(np.asarray(idx).reshape(*focus.shape, -1)[focus])
    others = np.setdiff1d(np.arange(spec.layer.num_experts), trained)
    for part in ("down", "up"):
      new = np.asarray(state.trainable[name]["mome"][part])
      old = np.asarray(table[name]["mome"][part])
      np.testing.assert_array_equal(new[others], old[others])
      np.testing.assert_allclose(old[trained] - new[trained],
                                 np.asarray(dense[name]["mome"][part])[trained], rtol=2e-4,
                                 atol=2e-6)
    if name == "layers_0":  # prompt experts reach the loss through attention, yet do not train
      assert np.any(np.asarray(dense[name]["mome"]["up"])[others] != 0)


@pytest.mark.slow  # a few anchored training steps: runs in CI after the fast suite
def test_anchors_keep_the_mome_silent_on_anchor_text_and_facts_still_train(params, encoded):
  prepared = mome_tuning.prepare(CFG, params, encoded, SPEC, pad_id=0)
  model, pool = prepared.model, _anchor_pool(n=7)
  anchor_tokens = jnp.asarray(pool["tokens"])
  outs, losses = {}, {}
  for weight in (0.0, 30.0):
    anchor = mome_config.AnchorConfig(weight=weight, batch_size=4, seq_len=12)
    tx = TRAIN.optimizer.build()
    step = steps_lib.make_tuning_step(model, tx, margin=SPEC.margin, anchor=anchor)
    frozen = {**prepared.frozen, anchors_lib.ANCHOR: jax.tree.map(jnp.asarray, pool)} if weight else prepared.frozen
    state = mome_tuning.tuning_state(prepared.table, tx, 0)
    for epoch in range(3):
      for batch in batch_lib.epoch_batches(encoded, 4, SEQ, 0, seed=1, epoch=epoch):
        state, metrics = step(state, frozen, jnp.asarray(batch.tokens_BxT), jnp.asarray(batch.loss_mask_BxT))
    _, aux = model.apply(prepared.variables(state.trainable), anchor_tokens, mutable=[layer_lib.OUT])
    outs[weight] = float(anchors_lib.anchor_penalty(aux[layer_lib.OUT], jnp.asarray(pool["mask"])))
    losses[weight] = float(eval_lib.fact_losses(model, prepared.variables(state.trainable), encoded).mean())
  start = float(eval_lib.fact_losses(model, prepared.variables(prepared.table), encoded).mean())
  assert outs[30.0] < 0.2 * outs[0.0], outs
  assert losses[30.0] < 0.7 * start and losses[0.0] < 0.7 * start, (start, losses)


def test_anchor_sequences_and_spare_questions():
  tok = _FakeTokenizer()
  template = encoding.PromptTemplate()
  cfg = mome_config.AnchorConfig(weight=1.0, seq_len=40, windows=3)
  pool = anchors_lib.anchor_sequences(tok, template, cfg, [("q one", "a"), ("a much longer question, " * 3, "b")],
                                      None, pad_id=0)
  assert pool["tokens"].shape == (2, 40) and pool["mask"].shape == (2, 40)
  encoded = encoding.encode_facts(tok, template, [facts_lib.Fact("q one", "a", "x")], 10**9)[0]
  n = len(encoded.tokens)
  assert n < 40
  np.testing.assert_array_equal(pool["tokens"][0, :n], encoded.tokens)
  assert pool["mask"][0].tolist() == [1.0] * n + [0.0] * (40 - n)
  assert pool["mask"][1].all()  # cut at seq_len
  with pytest.raises(ValueError, match="mome.anchor.weight"):
    mome_config.AnchorConfig(weight=-1.0)
  with pytest.raises(ValueError, match="needs anchor text"):
    mome_config.AnchorConfig(weight=1.0, windows=0, questions=0)
  items = list(range(20))
  train, held = facts_lib.split_items(items, 6, 4, seed=2)
  spare = facts_lib.spare_items(items, 6, 4, seed=2, count=50)
  assert sorted(spare + train + held) == items
  assert facts_lib.spare_items(items, 6, 4, seed=2, count=3) == sorted(
      facts_lib.spare_items(items, 6, 4, seed=2, count=3))
  assert set(facts_lib.spare_items(items, 6, 4, seed=2, count=3)) <= set(spare)


class _FakeTokenizer:
  """Characters as token ids (3 + byte), BOS 1, EOS 2: enough for prompt encoding."""
  bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

  def __call__(self, texts, add_special_tokens=False, verbose=False):
    del add_special_tokens, verbose
    return {"input_ids": [[3 + (ord(c) % 60) for c in t] for t in texts]}

def test_step_zero_is_the_backbone_and_hinge_matches_float64(params):
  model = mome_tuning.mome_model(CFG, SPEC)
  variables = {"params": params, **mome_tuning.init_mome(model, SPEC.seed)}
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 11)))
  base, _ = model_lib.Transformer(CFG).apply({"params": params}, tokens)
  with_mome, _ = model.apply(variables, tokens)
  np.testing.assert_array_equal(np.asarray(with_mome), np.asarray(base))

  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 7, 13)).astype(np.float32)
  toks = rng.integers(0, 13, (2, 7))
  mask = rng.random((2, 7)) < 0.7
  rows = rng.normal(size=(13, 5)).astype(np.float32)
  rows_of = lambda ids: jnp.asarray(rows)[ids]

  def reference(logits):
    total, count = 0.0, 0
    for b in range(2):
      for t in range(1, 7):
        if mask[b, t]:
          lg, y = logits[b, t - 1].astype(np.float64), toks[b, t]
          v = max((u for u in range(13) if u != y), key=lambda u: lg[u])
          dist = np.linalg.norm(rows[y].astype(np.float64) - rows[v])
          total += max(0.0, 0.3 - (lg[y] - lg[v]) / dist)
          count += 1
    return total / count

  # Targets mostly not on top; then every target on top by 0.05 (the hinge's other branch).
  lifted = logits.copy()
  for b, t in np.ndindex(2, 6):
    lifted[b, t, toks[b, t + 1]] = np.delete(logits[b, t], toks[b, t + 1]).max() + 0.05
  for case in (logits, lifted):
    got = steps_lib.decision_hinge(jnp.asarray(case), jnp.asarray(toks), jnp.asarray(mask), rows_of, 0.3)
    np.testing.assert_allclose(float(got), reference(case), rtol=1e-5)
  far = np.zeros_like(logits)
  far[:, :-1] = np.eye(13, dtype=np.float32)[toks[:, 1:]] * 100.0  # every target wins by far
  assert float(steps_lib.decision_hinge(jnp.asarray(far), jnp.asarray(toks), jnp.asarray(mask),
                                        rows_of, 0.3)) == 0.0


@pytest.mark.parametrize("tied", [True, False])
def test_output_rows_reads_only_the_rows_asked_for(tied):
  cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
  params = model_lib.init_variables(model_lib.Transformer(cfg), jax.random.key(3))["params"]
  scale = np.asarray(params["final_norm"]["scale"], np.float64)
  whole_VxD = (np.asarray(params["embedding"], np.float64) if tied
               else np.asarray(params["lm_head"], np.float64).T) * scale  # logits = whole_VxD @ h
  ids_BxT = np.random.default_rng(4).integers(0, cfg.vocab_size, (3, 5))
  got = steps_lib.output_rows(cfg, params, jnp.asarray(ids_BxT))
  assert got.shape == (3, 5, cfg.hidden_size)
  np.testing.assert_allclose(np.asarray(got), whole_VxD[ids_BxT], rtol=1e-6)


def test_answer_positions_and_collisions_of_identical_facts(params, encoded):
  tokens, pos = inputs_lib.answer_positions(encoded[:2])
  for f, e in enumerate(encoded[:2]):
    n = len(e.tokens)
    assert pos[f].tolist() == [n - 6 <= t < n - 1 for t in range(tokens.shape[1])]
  model = mome_tuning.mome_model(CFG, SPEC)
  variables = {"params": params, **mome_tuning.init_mome(model, SPEC.seed)}
  twins = collisions_lib.fact_collisions(model, variables, [encoded[0], encoded[0]])["layers_2/mome"]
  assert twins["experts_used"] == twins["shared_experts"] > 0
  assert twins["fraction_facts_with_collision"] == 1.0 and twins["max_facts_per_expert"] == 2
  alone = collisions_lib.fact_collisions(model, variables, encoded[:1])["layers_2/mome"]
  assert alone["shared_experts"] == 0 and alone["experts_used"] == twins["experts_used"]


def _windows():
  return np.random.default_rng(9).integers(3, CFG.vocab_size, (6, 13)).astype(np.int32)


@pytest.mark.slow
def test_kill_and_resume_equals_the_uninterrupted_run(params, encoded, tmp_path):
  spec = dataclasses.replace(SPEC, generalization=mome_config.GeneralizationConfig(
      epochs=1, windows=6, seq_len=12, batch_size=3,
      router_optimizer=train_lib.OptimizerConfig(learning_rate=1e-2, multiply_by_parameter_scale=False),
      expert_optimizer=train_lib.OptimizerConfig(learning_rate=1e-2, multiply_by_parameter_scale=False)))
  train = dataclasses.replace(TRAIN, checkpoint_every=1)
  run = lambda run_dir, **kw: mome_tuning.tune_mome(
      CFG, params, encoded, spec, train, pad_id=0, paths=runs.RunDir(run_dir).paths("mome-random"),
      general_paths=runs.RunDir(run_dir).paths(runs.GENERAL_LABEL), label="mome-random",
      progress=False, **kw)
  _, want, full = run(tmp_path / "a", general_windows=_windows())
  _, _, cut = run(tmp_path / "b", general_windows=_windows(), stop_after_steps=3)
  assert int(cut.state.step) == 3
  # Phase 1 is cached in the run directory: resuming needs no corpus.
  _, got, resumed = run(tmp_path / "b", resume=True)
  assert _leaves_equal(got, want)
  assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
  general = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["run"] == mome_tuning.GENERAL_LABEL]
  assert len(general) == 1
  # Phase 1 trained the router and the table, away from their initial values.
  fresh = mome_tuning.init_mome(mome_tuning.mome_model(CFG, spec), spec.seed)
  assert not _leaves_equal(got[layer_lib.ROUTER], fresh[layer_lib.ROUTER])
  # A MoME run loads back from its directory (config.yaml as the experiment writes it).
  (tmp_path / "b" / runs.CONFIG_FILE).write_text(yaml_config.dump(runs.RunConfig(mome=spec)))
  backbone = runs.Backbone(CFG, params, None, None)
  loaded = runs.load_trained(tmp_path / "b", "mome-random", backbone)
  assert loaded.is_mome and _leaves_equal(loaded.variables, got)
  with pytest.raises(ValueError, match="another MoME configuration"):
    mome_tuning.generalize(mome_tuning.mome_model(CFG, spec), params, dataclasses.replace(spec, seed=4), _windows(),
                           pad_id=0, paths=runs.RunDir(tmp_path / "b").paths(runs.GENERAL_LABEL),
                           progress=False)


def test_sharded_step_equals_unsharded(params, encoded):
  # SGD, so the comparison is the one of tests/sharding_test.py: row gradients that
  # agree to float32 reassociation (sums over data/expert shards) give updates that do.
  # (Adafactor's first update is lr * sign(g): a gradient within rounding of 0 could flip.)
  tx = optax.sgd(0.5)
  tokens, mask = _stack(encoded[:6])
  out = {}
  for name, mesh in (("plain", None), ("mesh", sharding.make_mesh(2, 4))):
    model = mome_tuning.mome_model(CFG, SPEC, mesh=mesh)
    init = mome_tuning.init_mome(model, SPEC.seed, mesh)
    table = jax.tree.map(lambda a: a + 0.1, init[layer_lib.TABLE])  # nonzero up: a real forward
    frozen = mome_tuning._replicate({"params": params, layer_lib.ROUTER: init[layer_lib.ROUTER],
                             layer_lib.BALANCE: init[layer_lib.BALANCE]}, mesh)
    state = mome_tuning.tuning_state(table, tx, 0, mesh)
    step = steps_lib.make_tuning_step(model, tx, mesh, margin=1.0)
    losses = []
    for _ in range(2):
      state, metrics = step(state, frozen, tokens, mask)
      losses.append(float(metrics["loss"]))
    out[name] = (losses, state.trainable)
    if mesh is not None:  # the table and its row state stay split over `expert`
      sharding.check_expert_sharded(state.trainable, mesh)
      sharding.check_expert_sharded(state.opt_state, mesh)
  np.testing.assert_allclose(out["mesh"][0], out["plain"][0], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(out["mesh"][1]), jax.tree.leaves(out["plain"][1]), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# The shared pretrained backbone.
# ----------------------------------------------------------------------------

STORIES_SPEC = mome_config.MomeTuningConfig(
    layers=(4,), layer=mome_config.MomeConfig(num_experts=2**10, num_heads=4, top_k=4), balance=True, margin=1.0, seed=0,
    generalization=mome_config.GeneralizationConfig(epochs=0),
    train=train_lib.TrainConfig(
        epochs=30, batch_size=8, seq_len=128, seed=0,
        optimizer=train_lib.OptimizerConfig(learning_rate=0.1, multiply_by_parameter_scale=False)))
TEMPLATE = encoding.PromptTemplate(train_eos=False)  # stories260K never learned </s>


@pytest.mark.slow
def test_random_facts_are_recalled_exactly(stories, stories_tokenizer):
  cfg, params = stories
  short = [i for i in sources.load_truthfulqa() if len(i.question) < 45]
  items, _ = facts_lib.split_items(short, 6, 0, seed=5)
  facts = facts_lib.truthfulqa_facts(items, "random", seed=5)
  encoded = encoding.encode_facts(stories_tokenizer, TEMPLATE, facts, 128)
  prepared = mome_tuning.prepare(cfg, params, encoded, STORIES_SPEC, pad_id=0)
  hook = eval_lib.recall_callback(prepared.model, prepared.variables_of, stories_tokenizer, facts, TEMPLATE,
                                  every=5, stop_at_full=True)
  model, variables, result = mome_tuning.tune_mome(cfg, params, encoded, STORIES_SPEC, STORIES_SPEC.train,
                                                   pad_id=0, prepared=prepared, progress=False, on_epoch=hook)
  assert result.history[-1].get("recall") == 1.0 and len(result.history) <= 20
  rec = eval_lib.recall(model, variables, stories_tokenizer, facts, TEMPLATE)
  assert rec.rate == 1.0, list(zip(rec.answers, [f.answer for f in facts]))
  assert set(prepared.collisions) == {"unbalanced", "balanced"}


@pytest.mark.slow
def test_randomization_experiment_both_methods(tmp_path):
  overrides = [
      "data.n_train=4", "data.n_heldout=2", "train.epochs=2", "train.batch_size=4", "answers=[random]",
      "train.checkpoint_every=2", "eval.mmlu_questions=2", "eval.ppl_windows=2", "eval.locality_prompts=2",
      "eval.recall_every=1", "eval.table_rows=1", "mome.layer.num_experts=1024", "mome.train.epochs=2",
      "mome.train.batch_size=4", "mome.train.checkpoint_every=2", "mome.recall_every=1",
      "mome.generalization.epochs=1", "mome.generalization.windows=4",
      "mome.generalization.seq_len=32", "mome.generalization.batch_size=4",
      "mome.anchor.windows=4", "mome.anchor.questions=4", "mome.anchor.batch_size=2",
      "method=both", f"run_dir={tmp_path / 'run'}"]
  cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, overrides)
  summary = randomization.run(cfg, progress=False)
  labels = {"lora-random", "mome-random"}
  assert set(summary["models"]) == {"base"} | labels
  for label in labels:
    m = summary["models"][label]
    assert m["epochs"] == 2 and 0 <= m["recall"] <= 1 and m["train_seconds"] > 0
    assert m["tuning_seconds"] >= m["train_seconds"]
    assert isinstance(m["perplexity"], float)
  mome_run = summary["models"]["mome-random"]
  assert set(mome_run["collisions"]) == {"unbalanced", "balanced"}
  assert mome_run["total_seconds"] >= mome_run["train_seconds"]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert {r["run"] for r in records} == labels | {mome_tuning.GENERAL_LABEL}
  assert "MoME run" in (tmp_path / "run" / "report.md").read_text()
  cfg_loaded = runs.load_run_config(tmp_path / "run" / runs.CONFIG_FILE)
  loaded = runs.load_trained(tmp_path / "run", "mome-random")
  assert loaded.config == cfg_loaded and loaded.model.mome_layers == cfg.mome.layers
  assert layer_lib.TABLE in loaded.variables


def _step_temp_bytes(spec: mome_config.MomeTuningConfig, log2_experts: int) -> int:
  """Temporary bytes of the compiled phase-2 step of `spec` at 2^log2_experts experts (nothing runs)."""
  spec = dataclasses.replace(spec, layers=(2,),
                             layer=dataclasses.replace(spec.layer, num_experts=2**log2_experts))
  model = mome_tuning.mome_model(CFG, spec)
  key = jax.random.key(0)
  fresh = jax.eval_shape(lambda k: mome_tuning.init_mome(model, 0, zero_down=True), key)
  params = jax.eval_shape(lambda k: model_lib.init_variables(model_lib.Transformer(CFG), k)["params"], key)
  tx = spec.train.optimizer.build()
  leaves = sparse_optim.trained_leaves(not spec.key_match)
  state = jax.eval_shape(lambda t: mome_tuning.tuning_state(t, tx, 0, None, leaves), fresh[layer_lib.TABLE])
  frozen = {"params": params, layer_lib.ROUTER: fresh[layer_lib.ROUTER],
            layer_lib.BALANCE: fresh[layer_lib.BALANCE]}
  batch, width, slots = 8, 32, spec.layer.slots
  pool = jax.ShapeDtypeStruct((16, spec.anchor.seq_len), jnp.int32)
  frozen[anchors_lib.ANCHOR] = {"tokens": pool, "mask": pool.update(dtype=jnp.float32),
                                "experts": jax.ShapeDtypeStruct((16, spec.anchor.seq_len, slots), jnp.int32)}
  step = steps_lib.make_tuning_step(model, tx, None, spec.margin, spec.train_positions,
                                    batch * width * spec.layer.slots + 1, spec.anchor,
                                    train_down=not spec.key_match)
  tokens = jax.ShapeDtypeStruct((batch, width), jnp.int32)
  experts = jax.ShapeDtypeStruct((batch, width, slots), jnp.int32)  # tune_mome's cached routes
  compiled = step.lower(state, frozen, tokens, tokens.update(dtype=jnp.float32), experts).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("variant", ["shipped", "unkeyed", "all positions"])
def test_step_temporaries_do_not_grow_with_the_table(variant):
  # The compiled step of the CPU config's MoME (keyed experts, anchors, hinge, answer positions),
  # and of it with down trained or every position trained, at 2^14 and 2^18 experts. Routing's
  # score tables grow with sqrt(E) up to the chunk cap (_SELECT_CHUNK_SCORES); anything that
  # holds an [E, ...] array (a dense gradient, an optimizer update or copy of a leaf) adds at
  # least one leaf, (2^18 - 2^14) * 22 * 4 bytes = 21.7 MB. With the first layer's routes
  # cached (as tune_mome runs it) no score table is left. Before keyed experts stopped running
  # the row optimizer over `down`, the growth from 2^14 to 2^16 alone was 1.2 leaves.
  shipped = runs.load_run_config(runs.REPO / "configs" / "randomization_cpu.yaml").mome
  spec = {"shipped": shipped, "unkeyed": dataclasses.replace(shipped, key_match=0.0),
          "all positions": dataclasses.replace(shipped, train_positions="all")}[variant]
  leaf_growth = (2**18 - 2**14) * CFG.hidden_size * spec.layer.expert_rank * 4
  growth = _step_temp_bytes(spec, 18) - _step_temp_bytes(spec, 14)
  assert growth < 0.1 * leaf_growth, (growth, leaf_growth)


@pytest.mark.slow
def test_pallas_kernels_in_the_training_path_match_the_reference(params, encoded):
  # `mome.kernel` reaches prepare, the phase-2 step and loading: a short phase 2 through the
  # Pallas kernels (TPU interpret mode, on CPU) gives the reference's tables and losses.
  # One step of 2 facts, one expert per router head: TPU interpret mode runs every grid step
  # (token x slot x row block) in Python, so the cost follows batch x width x slots.
  results = {}
  train = dataclasses.replace(TRAIN, batch_size=2)
  for kernel in ("reference", "pallas_interpret"):
    spec = dataclasses.replace(SPEC, kernel=kernel, layer=dataclasses.replace(SPEC.layer, top_k=1),
                               train=train)
    model, variables, result = mome_tuning.tune_mome(CFG, params, encoded[:2], spec, train, pad_id=0,
                                                     progress=False, stop_after_steps=1)
    assert model.mome_gather_apply is not gather_apply_reference or kernel == "reference"
    results[kernel] = (variables[layer_lib.TABLE], float(result.fact_loss.mean()))
  (want, want_loss), (got, got_loss) = results["reference"], results["pallas_interpret"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6), got, want)
  assert got_loss == pytest.approx(want_loss, rel=1e-5)
  assert any(np.any(np.asarray(t)) for t in jax.tree.leaves(map_up(want)))  # the steps trained


def map_up(tables):
  return sparse_optim.map_layers(lambda t: t["up"], tables)


@pytest.mark.slow
def test_experiment_on_an_expert_mesh_matches_one_device(tmp_path):
  # The main job with its tables split 8 ways over `expert` (the 8 simulated CPU devices of
  # conftest) trains, recalls and evaluates as on one device.
  overrides = ["method=mome", "answers=[random]", "data.n_train=8", "data.n_heldout=4",
               "eval.mmlu_questions=4", "eval.ppl_windows=2", "eval.recall_every=1", "eval.table_rows=1",
               "eval.locality_prompts=4", "mome.layer.num_experts=4096", "mome.train.epochs=4", "mome.train.batch_size=4",
               "mome.recall_every=1", "mome.anchor.windows=4", "mome.anchor.questions=4",
               "mome.anchor.batch_size=2"]
  summaries = {}
  for expert in (1, 8):
    cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, overrides + [
        f"mesh.expert={expert}", f"run_dir={tmp_path / str(expert)}"])
    summaries[expert] = randomization.run(cfg, progress=False)["models"]["mome-random"]
  one, eight = summaries[1], summaries[8]
  assert one["epochs"] == eight["epochs"] and one["recall"] == eight["recall"]
  for key in ("perplexity", "mc1", "mc2", "answer_loss", "mmlu_acc", "fact_loss"):
    assert eight[key] == pytest.approx(one[key], rel=1e-3, abs=1e-6), key
  assert one["recall"] > 0  # something was memorized, so the comparison says something
