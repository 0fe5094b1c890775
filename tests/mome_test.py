"""Tests for lamini_jax.mome and lamini_jax_kernels.gather_apply (reference)."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lamini_jax.mome import collisions as collisions_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import table as table_lib
from lamini_jax_kernels.gather_apply import gather_apply_reference

# N = 15 * 17 experts (odd, not square), odd widths everywhere.
CFG = mome_config.MomeConfig(
    num_experts=255, embed_dim=13, expert_rank=3, num_heads=3, key_dim=10, top_k=5,
    activation="gelu", sub_keys=(15, 17))
TOKENS = 37


def _random_table(key, cfg, scale=1.0):
  k1, k2 = jax.random.split(key)
  shapes = table_lib.table_shapes(cfg)
  return {"down": scale * jax.random.normal(k1, shapes["down"]),
          "up": scale * jax.random.normal(k2, shapes["up"])}


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _brute_topk(scores_XxN, k):
  """Top-k by (score desc, index asc) over the last axis, in float64 numpy."""
  order = np.argsort(-scores_XxN, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(scores_XxN, order, axis=-1), order


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(key_dim=9), "key_dim"),
    (dict(num_experts=4, top_k=5, sub_keys=None), "top_k"),
    (dict(num_experts=251, sub_keys=None), "num_experts=251"),  # prime: 1 x 251
    (dict(sub_keys=(15, 16)), "sub_keys"),
    (dict(activation="tanh"), "activation"),
    (dict(expert_rank=0), "expert_rank"),
    (dict(threshold=-0.5), "threshold"),
    (dict(threshold=math.inf), "threshold"),
])
def test_config_rejects_bad_values(kwargs, field):
  with pytest.raises(ValueError, match=field):
    mome_config.MomeConfig(**{**CFG.__dict__, **kwargs})


def test_config_grid_splits_non_square_sizes():
  assert mome_config.MomeConfig(num_experts=2**17, top_k=8).grid == (256, 512)
  assert mome_config.MomeConfig(num_experts=2**20, top_k=8).grid == (1024, 1024)
  assert mome_config.MomeConfig(num_experts=289, top_k=8).grid == (17, 17)
  assert CFG.grid == (15, 17) and CFG.slots == 15


# ----------------------------------------------------------------------------
# Router.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n1, n2, k", [(15, 17, 7), (3, 5, 7), (3, 5, 4), (11, 2, 22), (64, 48, 3)])
def test_product_key_topk_equals_brute_force_with_ties(n1, n2, k):
  # Small integers: sums are exact in float32 and full of ties, so indices must
  # follow the documented order (score desc, expert index asc) exactly.
  rng = np.random.default_rng(n1 * 100 + k)
  s1 = rng.integers(-3, 4, size=(6, n1)).astype(np.float32)
  s2 = rng.integers(-3, 4, size=(6, n2)).astype(np.float32)
  scores, experts = router_lib.product_key_topk(jnp.asarray(s1), jnp.asarray(s2), k)
  full = (s1.astype(np.float64)[:, :, None] + s2[:, None, :]).reshape(6, n1 * n2)
  want_scores, want_experts = _brute_topk(full, k)
  np.testing.assert_array_equal(np.asarray(experts), want_experts)
  np.testing.assert_array_equal(np.asarray(scores), want_scores)


@pytest.mark.parametrize("n, k", [(64, 1), (64, 2), (512, 2), (1000, 7), (96, 11), (20, 3)])
def test_exact_topk_equals_brute_force_with_ties(n, k):
  # Few distinct values: many ties, so the index order (lower index first) is tested.
  rng = np.random.default_rng(n + k)
  s = rng.integers(-4, 5, size=(3, 5, n)).astype(np.float32)
  s[0, 0] = 0.0  # all tied
  values, idx = jax.jit(router_lib.exact_topk, static_argnums=1)(jnp.asarray(s), k)
  want_values, want_idx = _brute_topk(s.astype(np.float64), k)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_array_equal(np.asarray(values), want_values)


# Selection in one piece, and over token chunks of 1 and of 5 tokens (the last padded).
@pytest.mark.parametrize("chunk_scores", [None, 1, 3 * 17 * 5])
def test_route_equals_dense_cross_attention_over_all_keys(chunk_scores, monkeypatch):
  if chunk_scores is not None:
    monkeypatch.setattr(router_lib, "_SELECT_CHUNK_SCORES", chunk_scores)
  router = router_lib.init_router(jax.random.PRNGKey(0), CFG)
  x = jax.random.normal(jax.random.PRNGKey(1), (TOKENS, CFG.embed_dim))
  idx, w = jax.jit(functools.partial(router_lib.route, cfg=CFG))(router, x)
  # Reference: every expert's full key, dense [T, H, N] scores in float64.
  n1, n2 = CFG.grid
  p = {k: np.asarray(v, np.float64) for k, v in router.items()}
  e = np.arange(CFG.num_experts)
  keys_HxNxQ = np.concatenate([p["keys1"][:, e // n2], p["keys2"][:, e % n2]], axis=-1)
  q_TxHxQ = np.einsum("td,dhq->thq", np.asarray(x, np.float64), p["query"])
  scores_TxHxN = np.einsum("thq,hnq->thn", q_TxHxQ, keys_HxNxQ)
  top, want = _brute_topk(scores_TxHxN, CFG.top_k + 1)
  assert np.min(top[..., -2] - top[..., -1]) > 1e-4, "test data has a near-tie at the k-th score"
  top, want = top[..., :-1], want[..., :-1]
  got = np.asarray(idx).reshape(TOKENS, CFG.num_heads, CFG.top_k)
  np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))
  got_w = np.asarray(w).reshape(got.shape)
  ref_scores = np.take_along_axis(scores_TxHxN, got, axis=-1)
  ref_w = np.exp(ref_scores - ref_scores.max(-1, keepdims=True))
  np.testing.assert_allclose(got_w, ref_w / ref_w.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_selection_margins_equal_float64_over_all_keys_with_balance():
  router = router_lib.init_router(jax.random.PRNGKey(0), CFG)
  x = jax.random.normal(jax.random.PRNGKey(1), (TOKENS, CFG.embed_dim))
  n1, n2 = CFG.grid
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  balance = {"bias1": 0.3 * jax.random.normal(k1, (CFG.num_heads, n1)),
             "bias2": 0.3 * jax.random.normal(k2, (CFG.num_heads, n2))}
  margin_TxK, next_TxK = map(np.asarray, router_lib.selection_margins(router, x, CFG, balance))
  # Reference: every expert's biased score in float64; the slot's minus the (top_k + 1)-th.
  p = {k: np.asarray(v, np.float64) for k, v in {**router, **balance}.items()}
  e = np.arange(CFG.num_experts)
  keys_HxNxQ = np.concatenate([p["keys1"][:, e // n2], p["keys2"][:, e % n2]], axis=-1)
  q_TxHxQ = np.einsum("td,dhq->thq", np.asarray(x, np.float64), p["query"])
  scores_TxHxN = (np.einsum("thq,hnq->thn", q_TxHxQ, keys_HxNxQ)
                  + p["bias1"][:, e // n2] + p["bias2"][:, e % n2])
  top, _ = _brute_topk(scores_TxHxN, CFG.top_k + 1)
  want = (top[..., :-1] - top[..., -1:]).reshape(TOKENS, CFG.slots)
  np.testing.assert_allclose(margin_TxK, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(next_TxK, np.repeat(top[..., -1], CFG.top_k, axis=1), rtol=1e-5, atol=1e-5)
  assert (margin_TxK >= 0).all()
  # Fragile: a margin under FRAGILE_MARGIN of the next score; the least margin of each head is the last slot.
  fragile = router_lib.fragile_slots(router, x, CFG, balance)
  np.testing.assert_array_equal(fragile, want < router_lib.FRAGILE_MARGIN * np.abs(np.asarray(next_TxK)))


def test_chunked_selection_with_balance_equals_one_piece(monkeypatch):
  router = router_lib.init_router(jax.random.PRNGKey(0), CFG)
  x = jax.random.normal(jax.random.PRNGKey(1), (TOKENS, CFG.embed_dim))
  n1, n2 = CFG.grid
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  balance = {"bias1": jax.random.normal(k1, (CFG.num_heads, n1)),
             "bias2": jax.random.normal(k2, (CFG.num_heads, n2))}
  whole = router_lib.route(router, x, CFG, balance)
  monkeypatch.setattr(router_lib, "_SELECT_CHUNK_SCORES", 3 * 17 * 4)  # chunks of 4 tokens
  chunked = router_lib.route(router, x, CFG, balance)
  for a, b in zip(whole, chunked):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(whole[0]), np.asarray(router_lib.route(router, x, CFG)[0]))


def test_route_gradient_reaches_query_and_keys():
  router = router_lib.init_router(jax.random.PRNGKey(0), CFG)
  x = jax.random.normal(jax.random.PRNGKey(1), (TOKENS, CFG.embed_dim))
  target = jax.random.normal(jax.random.PRNGKey(2), (TOKENS, CFG.slots))
  grads = jax.jit(jax.grad(lambda r: jnp.sum(router_lib.route(r, x, CFG)[1] * target)))(router)
  for name, g in grads.items():
    assert float(jnp.abs(g).max()) > 0, name


# ----------------------------------------------------------------------------
# Gather-apply reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("activation, np_activation", [
    (jax.nn.relu, lambda h: np.maximum(h, 0.0)), (jax.nn.gelu, _gelu_tanh)])
def test_gather_apply_reference_equals_float64_loop(activation, np_activation):
  t, k, n, d, r = 7, 5, 11, 13, 3
  rng = np.random.default_rng(3)
  x, w = rng.normal(size=(t, d)), rng.normal(size=(t, k))
  down, up = rng.normal(size=(n, d, r)), rng.normal(size=(n, r, d))
  idx = rng.integers(0, n, size=(t, k))
  idx[0, :2] = idx[0, 2]  # duplicate slots in one token
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y = gather_apply_reference(f32(x), jnp.asarray(idx), f32(w), f32(down), f32(up), activation)
  want = np.zeros((t, d))
  for i in range(t):
    for j in range(k):
      e = idx[i, j]
      want[i] += w[i, j] * np_activation(x[i] @ down[e]) @ up[e]
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Sparse training.
# ----------------------------------------------------------------------------


def _loss(rows, idx_TxK, w_TxK, x_TxD, target_TxD, cfg):
  y_TxD = table_lib.apply_experts(x_TxD, idx_TxK, w_TxK, rows, cfg)
  return jnp.mean((y_TxD - target_TxD) ** 2)


def _batch(seed, cfg=CFG, tokens=TOKENS, max_expert=None):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  idx = jax.random.randint(keys[0], (tokens, cfg.slots), 0, max_expert or cfg.num_experts)
  w = jax.random.uniform(keys[1], (tokens, cfg.slots))
  x = jax.random.normal(keys[2], (tokens, cfg.embed_dim))
  target = jax.random.normal(keys[3], (tokens, cfg.embed_dim))
  return idx, w, x, target


def test_key_rows_equal_float64_and_fire_only_near_their_inputs():
  cfg = mome_config.MomeConfig(num_experts=16, embed_dim=6, expert_rank=2, num_heads=1, key_dim=4, top_k=2,
                               activation="relu", threshold=2.0)
  table = table_lib.init_table(jax.random.key(0), cfg)
  before = jax.tree.map(np.asarray, table)
  rng = np.random.default_rng(1)
  x_PxD = rng.normal(size=(5, 6)).astype(np.float32)
  idx_PxK = np.array([[3, 7], [3, 9], [7, 9], [11, 3], [11, 11]])
  keyed = jax.tree.map(np.asarray, table_lib.key_rows(table, idx_PxK, x_PxD, cfg, match=0.8))
  for e in (3, 7, 9, 11):
    slots = np.argwhere(idx_PxK == e)[:, 0]  # a position counts once per slot it selects e in
    m = x_PxD.astype(np.float64)[slots].mean(axis=0)
    want = 2.0 / 0.8 * m / (m @ m)
    np.testing.assert_allclose(keyed["down"][e], np.repeat(want[:, None], 2, axis=1), rtol=1e-6)
    # Fires above 0.8 of the key's own projection, by threshold * (proj / match - 1); silent below.
    for proj in (1.0, 0.9, 0.79, 0.3, -1.0):
      side = rng.normal(size=6)
      side -= (side @ m) / (m @ m) * m  # orthogonal to m: no effect on the projection
      x = (proj * m + 3.0 * side).astype(np.float32)
      h = np.asarray(cfg.act(jnp.asarray(x @ keyed["down"][e])))
      np.testing.assert_allclose(h, max(0.0, 2.0 * (proj / 0.8 - 1.0)), atol=1e-5)
  others = np.setdiff1d(np.arange(16), idx_PxK)
  np.testing.assert_array_equal(keyed["down"][others], before["down"][others])
  np.testing.assert_array_equal(keyed["up"], before["up"])
  with pytest.raises(ValueError, match="threshold > 0"):
    table_lib.key_rows(table_lib.init_table(jax.random.key(0), CFG), idx_PxK, x_PxD, CFG, match=0.8)
  with pytest.raises(ValueError, match="match=1.0"):
    table_lib.key_rows(table_lib.init_table(jax.random.key(0), cfg), idx_PxK, x_PxD, cfg, match=1.0)


def test_unit_input_keys_fire_on_the_cosine_at_any_input_length():
  cfg = mome_config.MomeConfig(num_experts=16, embed_dim=6, expert_rank=1, num_heads=1, key_dim=4, top_k=2,
                               activation="relu", threshold=2.0, unit_input=True)
  rng = np.random.default_rng(2)
  x_PxD = rng.normal(size=(2, 6)) * np.array([[1.0], [5.0]])  # inputs of different lengths
  keyed = jax.tree.map(np.asarray, table_lib.key_rows(table_lib.init_table(jax.random.key(0), cfg),
                                                      np.array([[3, 4], [5, 6]]), x_PxD, cfg, match=0.8))
  u = x_PxD[0] / np.linalg.norm(x_PxD[0])
  np.testing.assert_allclose(keyed["down"][3, :, 0], 2.0 / 0.8 * u, rtol=1e-6)
  side = rng.normal(size=6)
  side -= (side @ u) * u
  side /= np.linalg.norm(side)
  # An input at cosine c to the key fires by threshold * (c / match - 1) whatever its length, so
  # nothing fires harder than the key's own direction; without unit_input, length counts.
  for c in (1.0, 0.9, 0.79, -0.5):
    for scale in (0.1, 1.0, 30.0):
      x = scale * (c * u + np.sqrt(1 - c * c) * side)
      h = float(cfg.act(jnp.asarray(table_lib.expert_input(x, cfg) @ keyed["down"][3, :, 0])))
      assert h == pytest.approx(max(0.0, 2.0 * (c / 0.8 - 1.0)), abs=1e-5), (c, scale)
  plain = dataclasses.replace(cfg, unit_input=False)
  assert table_lib.expert_input(x_PxD, plain) is x_PxD
  # An expert keyed to two positions: m, the mean of their unit inputs, is shorter than 1, and the
  # expert fires by threshold * (proj / match - 1), proj = x / |x| . m / |m|^2, up to 1 / |m| past 1.
  two = jax.tree.map(np.asarray, table_lib.key_rows(table_lib.init_table(jax.random.key(0), cfg),
                                                    np.array([[7], [7]]), x_PxD, cfg, match=0.8))
  m = (x_PxD[0] / np.linalg.norm(x_PxD[0]) + x_PxD[1] / np.linalg.norm(x_PxD[1])) / 2
  np.testing.assert_allclose(two["down"][7, :, 0], 2.0 / 0.8 * m / (m @ m), rtol=1e-6)
  at_m = float(cfg.act(jnp.asarray(table_lib.expert_input(3 * m, cfg) @ two["down"][7, :, 0])))
  assert at_m == pytest.approx(2.0 * (1 / np.linalg.norm(m) / 0.8 - 1.0), abs=1e-5) and at_m > 0.5
  up = rng.normal(size=(16, 1, 6)).astype(np.float32)
  x_TxD = np.stack([30.0 * u, 0.1 * u, 30.0 * (0.79 * u + np.sqrt(1 - 0.79 ** 2) * side)]).astype(np.float32)
  idx_TxK, w_TxK = jnp.full((3, 1), 3, jnp.int32), jnp.ones((3, 1))
  y_TxD = table_lib.apply_experts(jnp.asarray(x_TxD), idx_TxK, w_TxK, {"down": jnp.asarray(keyed["down"]),
                                                                       "up": jnp.asarray(up)}, cfg)
  np.testing.assert_allclose(np.asarray(y_TxD), np.stack([0.5 * up[3, 0], 0.5 * up[3, 0], 0 * up[3, 0]]),
                             atol=1e-5)
  with pytest.raises(ValueError, match="MomeConfig.unit_input='yes' must be true or false"):
    dataclasses.replace(cfg, unit_input="yes")


def test_unique_rows_roundtrip_and_padding():
  idx = jnp.array([[5, 1, 5], [2, 1, 0]])
  uniq, inv = table_lib.unique_rows(idx, 9)
  np.testing.assert_array_equal(np.asarray(uniq), [0, 1, 2, 5, 9, 9])
  np.testing.assert_array_equal(np.asarray(uniq)[np.asarray(inv)], np.asarray(idx))


def test_row_grads_combine_duplicates_and_equal_dense_gradient_rows():
  # Only 40 distinct experts for 37 * 15 slots: many duplicates within the batch.
  idx, w, x, target = _batch(0, max_expert=40)
  table = _random_table(jax.random.PRNGKey(1), CFG)
  loss_fn = functools.partial(_loss, cfg=CFG)
  loss, g_rows, uniq = jax.jit(functools.partial(sparse_optim.row_grads, loss_fn))(table, idx, w, x, target)
  dense_loss, g_dense = jax.jit(jax.value_and_grad(loss_fn))(table, idx, w, x, target)
  uniq = np.asarray(uniq)
  real = uniq < CFG.num_experts
  assert real.sum() == len(np.unique(np.asarray(idx))) and not real.all()
  # Exact: both are the transpose of the same gather, summed in the same order.
  assert float(loss) == float(dense_loss)
  for name in ("down", "up"):
    dense = np.asarray(g_dense[name])
    np.testing.assert_array_equal(np.asarray(g_rows[name])[real], dense[uniq[real]])
    np.testing.assert_array_equal(np.asarray(g_rows[name])[~real], 0.0)
    untouched = np.setdiff1d(np.arange(CFG.num_experts), uniq[real])
    np.testing.assert_array_equal(dense[untouched], 0.0)


def _tuning_step(cfg, tx):
  def step(table, opt_state, idx, w, x, target):
    loss_fn = functools.partial(_loss, cfg=cfg)
    loss, g_rows, uniq = sparse_optim.row_grads(loss_fn, table, idx, w, x, target)
    table, opt_state = sparse_optim.sparse_step(table, opt_state, g_rows, uniq, tx=tx)
    return table, opt_state, loss
  return jax.jit(step, donate_argnames=("table", "opt_state"))


def test_sparse_steps_change_only_selected_experts():
  # SiLU: tanh-GELU and its derivative are exactly 0 below about -6 in float32,
  # which could leave a selected expert with an exactly zero gradient.
  cfg = dataclasses.replace(CFG, activation="silu")
  tx = optax.adafactor(1e-2)
  idx, w, x, target = _batch(1, max_expert=200)
  table = _random_table(jax.random.PRNGKey(2), cfg)
  opt_state = sparse_optim.init_expert_opt_state(table, tx)
  before = jax.tree.map(np.array, (table, opt_state))
  step = _tuning_step(cfg, tx)
  losses = []
  for _ in range(4):
    table, opt_state, loss = step(table, opt_state, idx, w, x, target)
    losses.append(float(loss))
  after = jax.tree.map(np.asarray, (table, opt_state))
  selected = np.unique(np.asarray(idx))
  unselected = np.setdiff1d(np.arange(CFG.num_experts), selected)
  assert unselected.size > 0
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(new[unselected], old[unselected])  # bit for bit
  for name in ("down", "up"):
    changed = np.any(after[0][name][selected] != before[0][name][selected], axis=(1, 2))
    assert changed.all(), name
  np.testing.assert_array_equal(after[1][0].count[selected], 4)
  assert losses[-1] < losses[0]


def test_sparse_step_is_in_place_with_no_table_sized_temporary():
  # Compile only (no data): 2^16 experts, 16 tokens. The donated table and state
  # must be aliased to the outputs, and the step's scratch memory must not hold
  # anything close to one [E, D, R] table.
  cfg = mome_config.MomeConfig(num_experts=2**16, embed_dim=8, expert_rank=1, num_heads=2, key_dim=8,
                               top_k=4)
  tx = optax.adafactor(1e-2)
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  table = jax.tree.map(spec, table_lib.table_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  opt_state = jax.eval_shape(lambda t: sparse_optim.init_expert_opt_state(t, tx), table)
  idx, w = spec((16, cfg.slots), jnp.int32), spec((16, cfg.slots))
  x = spec((16, cfg.embed_dim))
  compiled = _tuning_step(cfg, tx).lower(table, opt_state, idx, w, x, x).compile()
  stats = compiled.memory_analysis()
  state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((table, opt_state)))
  one_table_leaf = cfg.num_experts * cfg.embed_dim * 4
  assert stats.alias_size_in_bytes == state_bytes
  assert stats.temp_size_in_bytes < one_table_leaf / 8, stats


def test_sparse_adafactor_equals_one_optax_adafactor_per_expert():
  # Default adafactor (per-block clipping and parameter scale): each expert is
  # its own parameter block with its own step count. Selections vary per step.
  tx = optax.adafactor(3e-2)
  table = _random_table(jax.random.PRNGKey(3), CFG)
  opt_state = sparse_optim.init_expert_opt_state(table, tx)
  ref_params = {e: {k: v[e] for k, v in table.items()} for e in range(CFG.num_experts)}
  ref_state = {e: tx.init(p) for e, p in ref_params.items()}
  ref_update = jax.jit(tx.update)
  step = jax.jit(functools.partial(sparse_optim.sparse_step, tx=tx))
  for s in range(3):
    idx = jax.random.randint(jax.random.PRNGKey(10 + s), (5, 4), 0, 60)
    uniq, _ = table_lib.unique_rows(idx, CFG.num_experts)
    grads = _random_table(jax.random.PRNGKey(20 + s), CFG)
    g_rows = jax.tree.map(lambda a: jnp.take(a, uniq, axis=0, mode="clip"), grads)
    table, opt_state = step(table, opt_state, g_rows, uniq)
    for e in np.unique(np.asarray(idx)):
      g = {k: v[e] for k, v in grads.items()}
      upd, ref_state[e] = ref_update(g, ref_state[e], ref_params[e])
      ref_params[e] = optax.apply_updates(ref_params[e], upd)
  # rtol 1e-6 (a few float32 ulps): the vmapped and the unbatched XLA programs
  # may associate the per-block RMS sums differently.
  for e in range(CFG.num_experts):
    for name in ("down", "up"):
      np.testing.assert_allclose(np.asarray(table[name][e]), np.asarray(ref_params[e][name]),
                                 rtol=1e-6, atol=1e-7, err_msg=f"expert {e} {name}")
    assert int(opt_state[0].count[e]) == int(ref_state[e][0].count)


@pytest.mark.parametrize("all_rows", [True, False])
def test_sparse_adafactor_equals_dense_optax_adafactor_on_whole_table(all_rows):
  # Elementwise adafactor (no factoring, no block clipping, no parameter scale):
  # optax on the whole [E, ...] table keeps one step count for all rows. It
  # equals the per-expert sparse update when every selected row is selected on
  # every step: (a) all rows every step, or (b) a frozen selection where the
  # dense gradient is zero elsewhere (zero gradient => zero update there).
  tx = optax.adafactor(3e-2, factored=False, clipping_threshold=None,
                       multiply_by_parameter_scale=False)
  n = CFG.num_experts
  if all_rows:
    idx = jax.random.permutation(jax.random.PRNGKey(4), n).reshape(17, CFG.slots)  # 17 * 15 = N
  else:
    idx = _batch(5, tokens=17, max_expert=120)[0]
  _, w, x, target = _batch(6, tokens=17)
  table = _random_table(jax.random.PRNGKey(7), CFG)
  dense_table, dense_state = table, tx.init(table)
  sparse_state = sparse_optim.init_expert_opt_state(table, tx)
  step = _tuning_step(CFG, tx)
  loss_fn = functools.partial(_loss, cfg=CFG)

  @jax.jit
  def dense_step(params, state):
    grads = jax.grad(loss_fn)(params, idx, w, x, target)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  sparse_table = jax.tree.map(jnp.copy, table)
  for _ in range(3):
    sparse_table, sparse_state, _ = step(sparse_table, sparse_state, idx, w, x, target)
    dense_table, dense_state = dense_step(dense_table, dense_state)
  for name in ("down", "up"):  # bit for bit: the same elementwise float ops
    np.testing.assert_array_equal(np.asarray(sparse_table[name]), np.asarray(dense_table[name]))
    assert not np.array_equal(np.asarray(sparse_table[name]), np.asarray(table[name]))


def test_dense_step_equals_sparse_step_when_all_rows_selected():
  tx = optax.adafactor(1e-2)
  table = _random_table(jax.random.PRNGKey(8), CFG)
  grads = _random_table(jax.random.PRNGKey(9), CFG)
  state = sparse_optim.init_expert_opt_state(table, tx)
  dense_table, dense_state = jax.jit(functools.partial(sparse_optim.dense_step, tx=tx))(table, state, grads)
  uniq = jnp.arange(CFG.num_experts)
  sparse = jax.jit(functools.partial(sparse_optim.sparse_step, tx=tx))
  sparse_table, sparse_state = sparse(table, state, grads, uniq)
  for a, b in zip(jax.tree.leaves((dense_table, dense_state)), jax.tree.leaves((sparse_table, sparse_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layer_helpers_walk_nested_collections():
  tx = optax.adafactor(1e-2)
  tables = {"block_0": {"mome": _random_table(jax.random.PRNGKey(40), CFG)},
            "block_3": {"mome": _random_table(jax.random.PRNGKey(41), CFG)}}
  opt_states = sparse_optim.map_layers(lambda t: sparse_optim.init_expert_opt_state(t, tx), tables)
  uniqs, grads = {}, {}
  for i, block in enumerate(tables):
    uniq, _ = table_lib.unique_rows(_batch(42 + i, tokens=3)[0], CFG.num_experts)
    uniqs[block] = {"mome": {"uniq": uniq}}
    grads[block] = {"mome": jax.tree.map(lambda a: a[:uniq.shape[0]],
                                         _random_table(jax.random.PRNGKey(50 + i), CFG))}
  new_tables, new_states = jax.jit(functools.partial(sparse_optim.sparse_step_layers, tx=tx))(
      tables, opt_states, grads, uniqs)
  step = jax.jit(functools.partial(sparse_optim.sparse_step, tx=tx))
  for block in tables:
    want = step(tables[block]["mome"], opt_states[block]["mome"], grads[block]["mome"],
                uniqs[block]["mome"]["uniq"])
    got = (new_tables[block]["mome"], new_states[block]["mome"])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Flax module.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_x_vars():
  layer = layer_lib.MomeLayer(CFG)
  x = jax.random.normal(jax.random.PRNGKey(11), (2, 19, CFG.embed_dim))
  variables = jax.jit(layer.init)({"params": jax.random.PRNGKey(12)}, x)
  return layer, x, variables


def test_module_collections_logical_names_and_zero_init_output(layer_x_vars):
  layer, x, variables = layer_x_vars
  specs = nn.get_partition_spec(variables)
  assert set(variables) == {layer_lib.ROUTER, layer_lib.BALANCE, layer_lib.TABLE}
  assert tuple(specs[layer_lib.TABLE]["down"]) == table_lib.TABLE_AXES["down"]
  assert tuple(specs[layer_lib.TABLE]["up"]) == table_lib.TABLE_AXES["up"]
  for name, axes in router_lib.ROUTER_AXES.items():
    assert tuple(specs[layer_lib.ROUTER][name]) == axes
  y = jax.jit(layer.apply)(variables, x)
  assert y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y), 0.0)  # up = 0: step 0 equals the backbone


def test_module_delta_gradient_equals_dense_table_gradient_and_router_is_frozen(layer_x_vars):
  layer, x, variables = layer_x_vars
  variables = nn.unbox(variables)
  frozen = {k: variables[k] for k in (layer_lib.ROUTER, layer_lib.BALANCE)}
  tables = _random_table(jax.random.PRNGKey(13), CFG, scale=0.5)
  num_tokens = x.shape[0] * x.shape[1]

  def loss_of_deltas(deltas, tables):
    y, aux = layer.apply({**frozen, layer_lib.TABLE: tables, layer_lib.DELTA: deltas}, x, mutable=[layer_lib.UNIQ])
    return jnp.sum(jnp.sin(y)), aux[layer_lib.UNIQ]

  def loss_of_table(tables):
    return jnp.sum(jnp.sin(layer.apply({**frozen, layer_lib.TABLE: tables}, x)))

  deltas = sparse_optim.zero_deltas(tables, num_tokens * CFG.slots)
  delta_grad = jax.jit(jax.value_and_grad(loss_of_deltas, has_aux=True))
  (loss, uniqs), g = delta_grad(deltas, tables)
  dense_loss, g_dense = jax.jit(jax.value_and_grad(loss_of_table))(tables)
  assert float(loss) == float(dense_loss)
  uniq = np.asarray(uniqs["uniq"])
  real = uniq < CFG.num_experts
  for name in ("down", "up"):
    np.testing.assert_array_equal(np.asarray(g[name])[real], np.asarray(g_dense[name])[uniq[real]])

  # Phase 2: steps update the table only; the frozen router keeps selecting the same rows.
  tx = optax.adafactor(1e-1)
  opt_state = sparse_optim.init_expert_opt_state(tables, tx)
  step = jax.jit(functools.partial(sparse_optim.sparse_step_layers, tx=tx))
  for _ in range(3):
    (_, new_uniqs), g = delta_grad(deltas, tables)
    np.testing.assert_array_equal(np.asarray(new_uniqs["uniq"]), uniq)
    tables, opt_state = step(tables, opt_state, g, new_uniqs)
  assert not np.allclose(np.asarray(tables["up"])[uniq[real]],
                         np.asarray(_random_table(jax.random.PRNGKey(13), CFG, 0.5)["up"])[uniq[real]])


def test_module_rejects_wrong_delta_rows(layer_x_vars):
  layer, x, variables = layer_x_vars
  variables = nn.unbox(variables)
  deltas = sparse_optim.zero_deltas(variables[layer_lib.TABLE], 5)
  with pytest.raises(ValueError, match="zero_deltas"):
    layer.apply({**variables, layer_lib.DELTA: deltas}, x, mutable=[layer_lib.UNIQ])


# ----------------------------------------------------------------------------
# Collisions.
# ----------------------------------------------------------------------------


def test_collision_report_on_hand_made_facts():
  facts = [np.array([1, 2, 3, 3]), np.array([3, 4]), np.array([5, -1]), np.array([5, 6]), np.array([7])]
  report = collisions_lib.collision_report(facts)
  assert report.num_facts == 5
  assert report.experts_used == 7
  assert report.shared_experts == 2  # 3 and 5
  assert report.facts_with_collision == 4
  assert math.isclose(report.fraction_facts_with_collision, 0.8)
  assert report.pair_collisions == 2
  np.testing.assert_array_equal(report.facts_per_expert_hist, [0, 5, 2])


def test_fact_experts_is_the_union_over_each_facts_tokens():
  idx = np.array([[4, 1], [1, 9], [7, 7], [2, 3]])
  fact = np.array([0, 0, -1, 2])
  got = collisions_lib.fact_experts(idx, fact, 3)
  assert [g.tolist() for g in got] == [[1, 4, 9], [], [2, 3]]
  # Tokens of many facts, unordered: each fact's union of Python sets.
  rng = np.random.default_rng(0)
  fact, idx = rng.integers(-1, 40, size=500), rng.integers(0, 300, size=(500, 3))
  want = [sorted({int(e) for t in np.flatnonzero(fact == f) for e in idx[t]}) for f in range(40)]
  assert [g.tolist() for g in collisions_lib.fact_experts(idx, fact, 40)] == want


def test_score_std_is_the_std_of_every_half_score_in_float64():
  # What `balance_router` scales its steps by, in token chunks instead of whole score tables:
  # 37 tokens in chunks of 8 (the last one padded) and in one chunk.
  cfg = mome_config.MomeConfig(num_experts=63 * 65, embed_dim=16, num_heads=2, key_dim=8, top_k=2)
  router = router_lib.init_router(jax.random.PRNGKey(1), cfg)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(37, 16)) + 0.5, jnp.float32)
  q = np.einsum("td,daq->atq", np.asarray(x, np.float64), np.asarray(router["query"], np.float64))
  s1 = np.einsum("atc,aic->ati", q[..., :4], np.asarray(router["keys1"], np.float64))
  s2 = np.einsum("atc,ajc->atj", q[..., 4:], np.asarray(router["keys2"], np.float64))
  want = np.std(np.concatenate([s1.ravel(), s2.ravel()]))
  for chunk in (8, None):
    np.testing.assert_allclose(float(router_lib.score_std(router, x, chunk)), want, rtol=1e-5)


def _clustered_facts(num_facts=23, length=2):
  """(cfg, router, x [facts * length, 16], fact of each row): facts of 2 tokens whose hidden
  states share one dominant direction, so without help they pick the same few sub-keys."""
  cfg = mome_config.MomeConfig(num_experts=63 * 65, embed_dim=16, num_heads=2, key_dim=8, top_k=2)
  router = router_lib.init_router(jax.random.PRNGKey(0), cfg)
  rng = np.random.default_rng(0)
  x = (rng.normal(size=16) + 0.3 * rng.normal(size=(num_facts, 1, 16))
       + 0.05 * rng.normal(size=(num_facts, length, 16)))
  return cfg, router, x.reshape(-1, 16).astype(np.float32), np.repeat(np.arange(num_facts), length)


def test_balance_router_lowers_collisions_of_clustered_facts():
  # Without the bias the clustered facts all pick the same few sub-keys and collide.
  cfg, router, x, fact = _clustered_facts()
  x, num_facts = jnp.asarray(x), fact.max() + 1

  route = jax.jit(functools.partial(router_lib.route, cfg=cfg))

  def report(balance):
    idx, _ = route(router, x, balance=balance)
    return collisions_lib.collision_report(collisions_lib.fact_experts(np.asarray(idx), fact, num_facts))

  balance = collisions_lib.balance_router(router, x, cfg)
  before, after = report(None), report(balance)
  assert before.fraction_facts_with_collision > 0.9
  assert after.fraction_facts_with_collision < 0.5 * before.fraction_facts_with_collision
  assert after.pair_collisions < 0.1 * before.pair_collisions
  # Deterministic, and it moves selection only: weights come from unbiased scores.
  again = collisions_lib.balance_router(router, x, cfg)
  for name in balance:
    np.testing.assert_array_equal(np.asarray(balance[name]), np.asarray(again[name]))
  idx_b, w_b = route(router, x, balance=balance)
  s1, s2 = router_lib.half_scores(router, x)
  e = np.asarray(idx_b).reshape(-1, cfg.num_heads, cfg.top_k).transpose(1, 0, 2)
  n2 = cfg.grid[1]
  raw = np.take_along_axis(np.asarray(s1), e // n2, -1) + np.take_along_axis(np.asarray(s2), e % n2, -1)
  ref = np.exp(raw - raw.max(-1, keepdims=True))
  ref = (ref / ref.sum(-1, keepdims=True)).transpose(1, 0, 2).reshape(w_b.shape)
  np.testing.assert_allclose(np.asarray(w_b), ref, rtol=1e-5, atol=1e-6)


def test_whitened_query_decorrelates_its_inputs_and_spreads_clustered_facts():
  # The clustered facts of the balance test: whitening alone spreads them over the experts.
  cfg, router, x, fact = _clustered_facts()
  num_facts = fact.max() + 1
  white = router_lib.whitened(router, x, floor=0.0, chunk=10)  # rows in 5 chunks

  # The new query is W @ query with W symmetric and W M W = mean(eig M) I for the second moment M
  # of the inputs (float64): the query sees inputs whose second moment is a multiple of I.
  q_DxE = np.asarray(router["query"], np.float64).reshape(16, -1)
  w_DxD = np.asarray(white["query"], np.float64).reshape(16, -1) @ np.linalg.inv(q_DxE)
  x64 = x.astype(np.float64)
  m_DxD = x64.T @ x64 / len(x64)
  np.testing.assert_allclose(w_DxD, w_DxD.T, atol=1e-5)
  np.testing.assert_allclose(w_DxD @ m_DxD @ w_DxD, np.trace(m_DxD) / 16 * np.eye(16), atol=1e-4)
  assert {k: v.shape for k, v in white.items()} == {k: v.shape for k, v in router.items()}
  for name in ("keys1", "keys2"):
    np.testing.assert_array_equal(np.asarray(white[name]), np.asarray(router[name]))

  def report(r):
    idx, _ = router_lib.route_jit(r, jnp.asarray(x), cfg)
    return collisions_lib.collision_report(collisions_lib.fact_experts(np.asarray(idx), fact, num_facts))

  before, after = report(router), report(white)
  assert after.pair_collisions < 0.2 * before.pair_collisions
  assert after.experts_used > 3 * before.experts_used
  with pytest.raises(ValueError, match="all zero"):
    router_lib.whitened(router, np.zeros((4, 16), np.float32))
  with pytest.raises(ValueError, match=r"shape \(4, 15\), need \(rows >= 1, 16\)"):
    router_lib.whitened(router, np.ones((4, 15), np.float32))
