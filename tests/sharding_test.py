"""Tests for lamini_jax.sharding: rules, mesh, and the row-sharded MoME table (8 CPU devices)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from lamini_jax.mome import config as mome_config
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import table as table_lib
from lamini_jax import sharding

# N = 264 = 8 * 33 experts, split 12 x 22 into product keys; odd widths. SiLU,
# not GELU: tanh-GELU and its derivative are exactly 0 below about -6 in float32,
# which would leave a selected expert with an exactly zero gradient.
CFG = mome_config.MomeConfig(num_experts=264, embed_dim=13, expert_rank=3, num_heads=3, key_dim=10, top_k=5,
                             activation="silu")
TOKENS = 38  # even, for data = 2
MESH_SHAPES = [(2, 4), (1, 8)]


@pytest.fixture(scope="module", params=MESH_SHAPES, ids=lambda s: f"data{s[0]}_expert{s[1]}")
def mesh(request):
  assert jax.device_count() >= 8, "conftest must force 8 CPU devices"
  return sharding.make_mesh(*request.param)


def _random_table(key, rows=CFG.num_experts):
  k1, k2 = jax.random.split(key)
  d, r = CFG.embed_dim, CFG.expert_rank
  return {"down": jax.random.normal(k1, (rows, d, r)), "up": jax.random.normal(k2, (rows, r, d))}


def _batch(seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(keys[0], (TOKENS, CFG.embed_dim))
  target = jax.random.normal(keys[1], (TOKENS, CFG.embed_dim))
  return x, target


# ----------------------------------------------------------------------------
# Rules and checks.
# ----------------------------------------------------------------------------


def test_logical_to_spec_maps_rules_and_rejects_unknown_names():
  assert sharding.logical_to_spec(("batch", "length", "embed")) == P("data", None, None)
  assert sharding.logical_to_spec(("expert", None, "expert_rank")) == P("expert", None, None)
  with pytest.raises(KeyError, match="'experts'"):
    sharding.logical_to_spec(("experts", "embed"))
  with pytest.raises(ValueError, match="two dims"):
    sharding.logical_to_spec(("expert", "expert"))


def test_shardings_for_accepts_tuples_and_partition_specs():
  mesh = sharding.make_mesh(2, 4)
  tree = {"table": P("expert", "embed", "expert_rank"), "x": ("batch", "embed"), "scalar": ()}
  got = sharding.shardings_for(tree, mesh)
  assert got["table"] == NamedSharding(mesh, P("expert", None, None))
  assert got["x"] == NamedSharding(mesh, P("data", None))
  assert got["scalar"] == NamedSharding(mesh, P())


def test_expert_table_is_never_silently_replicated():
  mesh = sharding.make_mesh(2, 4)
  replicate_experts = {**sharding.LOGICAL_RULES, "expert": None}
  with pytest.raises(ValueError, match="replicated"):
    sharding.shardings_for(table_lib.TABLE_AXES, mesh, replicate_experts)
  # A one-device expert axis has nothing to split over: allowed.
  sharding.shardings_for(table_lib.TABLE_AXES, sharding.make_mesh(8, 1), replicate_experts)

  table = jax.device_put(_random_table(jax.random.PRNGKey(0)), NamedSharding(mesh, P()))
  with pytest.raises(ValueError, match="never replicated"):
    sharding.check_expert_sharded(table, mesh)
  uneven = {"down": jnp.zeros((262, 3))}
  with pytest.raises(ValueError, match="262 rows"):
    sharding.check_expert_sharded(uneven, mesh)


def test_make_mesh_validates_sizes():
  mesh = sharding.make_mesh(2, 4)
  assert dict(mesh.shape) == {"data": 2, "expert": 4}
  with pytest.raises(ValueError, match="expert=0"):
    sharding.make_mesh(2, 0)
  with pytest.raises(ValueError, match="16 devices"):
    sharding.make_mesh(4, 4)


# ----------------------------------------------------------------------------
# Row-sharded table.
# ----------------------------------------------------------------------------


def test_init_table_on_mesh_is_split_along_experts(mesh):
  num_shards = dict(mesh.shape)["expert"]
  table = table_lib.init_table(jax.random.PRNGKey(1), CFG, mesh)
  for name, leaf in table.items():
    assert leaf.sharding.spec == P("expert", None, None), name
    shapes = {s.data.shape for s in leaf.addressable_shards}
    assert shapes == {(CFG.num_experts // num_shards,) + leaf.shape[1:]}, name
  unsharded = table_lib.init_table(jax.random.PRNGKey(1), CFG)
  for name in table:
    np.testing.assert_array_equal(np.asarray(table[name]), np.asarray(unsharded[name]))

  opt_state = sparse_optim.init_expert_opt_state(table, optax.adafactor(1e-2), mesh)
  for leaf in jax.tree.leaves(opt_state):
    assert leaf.shape[0] == CFG.num_experts
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {CFG.num_experts // num_shards}


def test_key_rows_of_a_sharded_table_stay_sharded_and_equal_unsharded(mesh):
  keyed_cfg = dataclasses.replace(CFG, activation="relu", threshold=2.0)
  rng = np.random.default_rng(3)
  idx_PxK, x_PxD = rng.integers(0, CFG.num_experts, (9, 4)), rng.normal(size=(9, CFG.embed_dim))
  keyed = table_lib.key_rows(table_lib.init_table(jax.random.PRNGKey(1), keyed_cfg, mesh), idx_PxK, x_PxD,
                             keyed_cfg, 0.8)
  want = table_lib.key_rows(table_lib.init_table(jax.random.PRNGKey(1), keyed_cfg), idx_PxK, x_PxD, keyed_cfg, 0.8)
  for name, leaf in keyed.items():
    assert leaf.sharding.spec == P("expert", None, None), name
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[name]))


def test_sharded_forward_equals_unsharded(mesh):
  table = _random_table(jax.random.PRNGKey(2))
  router = router_lib.init_router(jax.random.PRNGKey(3), CFG)
  x, _ = _batch(4)
  idx, w = router_lib.route(router, x, CFG)
  y = jax.jit(functools.partial(table_lib.apply_experts, cfg=CFG))(x, idx, w, table)
  shardings = sharding.shardings_for(table_lib.TABLE_AXES, mesh)
  table_sharded = jax.device_put(table, shardings)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  y_sharded = jax.jit(functools.partial(table_lib.apply_experts, cfg=CFG, mesh=mesh))(
      x_sharded, idx, w, table_sharded)
  # Per-shard partial sums are added by psum: float32 reassociation only.
  np.testing.assert_allclose(np.asarray(y_sharded), np.asarray(y), rtol=1e-5, atol=1e-6)

  rows = table_lib.gather_rows(table, table_lib.unique_rows(idx, CFG.num_experts)[0])
  uniq = table_lib.unique_rows(idx, CFG.num_experts)[0]
  rows_sharded = jax.jit(functools.partial(table_lib.gather_rows, mesh=mesh))(table_sharded, uniq)
  real = np.asarray(uniq) < CFG.num_experts
  for name in rows:  # one owner per row, zeros elsewhere: exact
    np.testing.assert_array_equal(np.asarray(rows_sharded[name])[real], np.asarray(rows[name])[real])


def test_sharded_module_forward_equals_unsharded(mesh):
  layer = layer_lib.MomeLayer(CFG)
  x = jax.random.normal(jax.random.PRNGKey(5), (2, TOKENS // 2, CFG.embed_dim))
  variables = nn.unbox(jax.jit(layer.init)({"params": jax.random.PRNGKey(6)}, x))
  variables[layer_lib.TABLE] = jax.device_put(
      _random_table(jax.random.PRNGKey(7)), sharding.shardings_for(table_lib.TABLE_AXES, mesh))
  y = jax.jit(layer.apply)(variables, x)
  y_sharded = jax.jit(layer_lib.MomeLayer(CFG, mesh=mesh).apply)(variables, x)
  np.testing.assert_allclose(np.asarray(y_sharded), np.asarray(y), rtol=1e-5, atol=1e-6)


def _loss(rows, idx_TxK, w_TxK, x_TxD, target_TxD):
  y_TxD = table_lib.apply_experts(x_TxD, idx_TxK, w_TxK, rows, CFG)
  return jnp.mean((y_TxD - target_TxD) ** 2)


def _tuning_step(tx, mesh):
  def step(table, opt_state, router, x, target):
    idx, w = router_lib.route(router, x, CFG)
    loss, g_rows, uniq = sparse_optim.row_grads(_loss, table, idx, w, x, target, mesh=mesh)
    table, opt_state = sparse_optim.sparse_step(table, opt_state, g_rows, uniq, tx=tx, mesh=mesh)
    return table, opt_state, loss, idx
  return jax.jit(step, donate_argnames=("table", "opt_state"))


def _put(mesh, table, x, target):
  table = jax.device_put(table, sharding.shardings_for(table_lib.TABLE_AXES, mesh))
  return (table,) + jax.device_put((x, target), NamedSharding(mesh, P("data", None)))


def test_sharded_row_grads_equal_unsharded(mesh):
  router = router_lib.init_router(jax.random.PRNGKey(8), CFG)
  x, target = _batch(9)
  table = _random_table(jax.random.PRNGKey(10))
  idx, w = router_lib.route(router, x, CFG)
  grads = lambda m: jax.jit(functools.partial(sparse_optim.row_grads, _loss, mesh=m))
  loss, g_rows, uniq = grads(None)(table, idx, w, x, target)
  table_sh, x_sh, target_sh = _put(mesh, table, x, target)
  sh_loss, sh_g_rows, sh_uniq = grads(mesh)(table_sh, idx, w, x_sh, target_sh)
  np.testing.assert_array_equal(np.asarray(sh_uniq), np.asarray(uniq))
  # Data-parallel sums over `data` reassociate float32 additions.
  np.testing.assert_allclose(float(sh_loss), float(loss), rtol=1e-6)
  for name in g_rows:
    np.testing.assert_allclose(np.asarray(sh_g_rows[name]), np.asarray(g_rows[name]), rtol=1e-5, atol=1e-7)


def test_sharded_sparse_update_equals_unsharded(mesh):
  # Same row gradients on both sides: each expert shard updates exactly the rows it owns.
  tx = optax.adafactor(3e-2)
  table = _random_table(jax.random.PRNGKey(11))
  ref_table, ref_state = table, sparse_optim.init_expert_opt_state(table, tx)
  sh_table = jax.device_put(table, sharding.shardings_for(table_lib.TABLE_AXES, mesh))
  sh_state = sparse_optim.init_expert_opt_state(sh_table, tx, mesh)
  ref_step = jax.jit(functools.partial(sparse_optim.sparse_step, tx=tx), donate_argnames=("table", "opt_state"))
  sh_step = jax.jit(functools.partial(sparse_optim.sparse_step, tx=tx, mesh=mesh),
                    donate_argnames=("table", "opt_state"))
  for s in range(3):
    idx = jax.random.randint(jax.random.PRNGKey(20 + s), (TOKENS, CFG.slots), 0, 200)
    uniq, _ = table_lib.unique_rows(idx, CFG.num_experts)
    g_rows = _random_table(jax.random.PRNGKey(30 + s), rows=uniq.shape[0])
    ref_table, ref_state = ref_step(ref_table, ref_state, g_rows, uniq)
    sh_table, sh_state = sh_step(sh_table, sh_state, g_rows, uniq)
  for name, leaf in sh_table.items():
    assert leaf.sharding.spec == P("expert", None, None), name
  for got, want in zip(jax.tree.leaves((sh_table, sh_state)), jax.tree.leaves((ref_table, ref_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sharded_steps_touch_only_selected_rows(mesh):
  tx = optax.adafactor(3e-2)
  router = router_lib.init_router(jax.random.PRNGKey(8), CFG)
  x, target = _batch(9)
  start = _random_table(jax.random.PRNGKey(12))
  table, x_sh, target_sh = _put(mesh, start, x, target)
  opt_state = sparse_optim.init_expert_opt_state(table, tx, mesh)
  step = _tuning_step(tx, mesh)
  losses = []
  for _ in range(3):
    table, opt_state, loss, idx = step(table, opt_state, router, x_sh, target_sh)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  sharding.check_expert_sharded(table, mesh)
  sharding.check_expert_sharded(opt_state, mesh)
  selected = np.unique(np.asarray(idx))
  unselected = np.setdiff1d(np.arange(CFG.num_experts), selected)
  assert unselected.size > 0
  for name in start:
    got, old = np.asarray(table[name]), np.asarray(start[name])
    np.testing.assert_array_equal(got[unselected], old[unselected])
    assert np.all(np.any(got[selected] != old[selected], axis=(1, 2)))
