"""Mixture of Memory Experts (MoME): router, expert table, sparse memory tuning.

A MoME layer is a residual branch added to a frozen backbone block:

  h = h + mome(norm(h))        at the configured layers,

  mome(x)[t] = sum_k w[t, k] * up[e]^T act(down[e]^T x[t] - threshold),  e = idx[t, k].

The router is multi-head cross-attention from the token to N expert keys,
with product keys (PEER / product-key memory): expert e = i * n2 + j has key
concat(keys1[h, i], keys2[h, j]), so each head scores n1 + n2 sub-keys instead
of N keys and `product_key_topk` returns the exact top-k over all N.
The expert table has N rank-R adapters, `down [N, D, R]`, `up [N, R, D]`.

Training has two phases (paper section 7.1):
  1. generalization: router and experts train on general data, backbone frozen;
  2. memory tuning: router frozen, so each fact selects the same experts every
     step; gradient steps touch only the selected experts.

Sparse steps never form a dense [N, ...] gradient, optimizer update or copy:
the step gathers the unique selected rows (`unique_rows`, fixed size U = T * K),
differentiates the loss with respect to those rows (duplicates sum), applies
the optimizer per row with `jax.vmap` over gathered optimizer state (so each
expert has its own step count), and writes rows and state back with
`.at[uniq].set(..., mode="drop")` into buffers the jitted step donates.

Flax convention (`MomeLayer`), variable collections:
  "mome_router"   query [D, H, Q], keys1 [H, n1, Q/2], keys2 [H, n2, Q/2]:
                  differentiated in phase 1 only; phase 2 freezes it by not
                  differentiating this collection.
  "mome_balance"  bias1 [H, n1], bias2 [H, n2]: a frozen selection bias set by
                  `balance_router` (collision mitigation); never differentiated.
  "mome"          down [N, D, R], up [N, R, D]: the expert table, updated by
                  `sparse_step`. Differentiate "mome_delta" instead of it (a
                  gradient w.r.t. "mome" itself is a dense [N, ...] array).
  "mome_delta"    (input, optional) zero rows [U, D, R] / [U, R, D] with
                  U = tokens * K (`zero_deltas`). When given, the layer uses
                  rows = table[uniq] + delta, so grad w.r.t. "mome_delta" is the
                  gradient of the gathered unique rows.
  "mome_uniq"     (output, mutable) the layer's uniq row indices for that step.
  "mome_focus"    (input, optional, with "mome_delta") "mask", bool with the
                  input's leading shape ([B, T]): the positions whose experts
                  train. The delta rows are then the unique experts of those
                  positions only (U >= their number; focus tokens * K bounds
                  it), so an expert selected only elsewhere is not updated
                  (memory tuning trains the experts of the positions that
                  predict answer tokens, not those of the prompt or of anchor
                  text), and the optimizer runs over U rows instead of T * K.
                  Other positions use a delta row where they select a trained
                  expert and the table elsewhere, so the gradient of a trained
                  row is its full gradient.
  "mome_out"      (output, mutable) "y": the layer's output [..., D], for
                  penalties on it (`mome_tuning.anchor_penalty`).
A sparse step over a model therefore is:

  def loss_of(deltas):
    out, aux = model.apply({..., "mome": tables, "mome_delta": deltas}, batch,
                           mutable=["mome_uniq"])
    return loss(out), aux["mome_uniq"]
  (loss, uniqs), g = jax.value_and_grad(loss_of, has_aux=True)(zero_deltas(...))
  tables, opt = sparse_step_layers(tables, opt, g, uniqs, tx=tx, mesh=mesh)

All parameters carry logical axis names (see lamini_jax.sharding). Shape
letters: T tokens, D model width, H router heads, Q query width (key_dim),
C = Q/2 sub-key width, I = n1 and J = n2 sub-keys per half, S experts per head
(top_k), K = H * S slots per token, N experts, R expert rank, U gathered rows.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from kernels.dispatch import gather_apply_auto
from kernels.gather_apply import GatherApplyFn
from lamini_jax import sharding

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "identity": lambda x: x,
}

ROUTER, BALANCE, TABLE, DELTA, UNIQ = "mome_router", "mome_balance", "mome", "mome_delta", "mome_uniq"
FOCUS, OUT = "mome_focus", "mome_out"

TABLE_AXES = {"down": ("expert", "embed", "expert_rank"), "up": ("expert", "expert_rank", "embed")}
ROUTER_AXES = {
    "query": ("embed", "key_heads", "key_dim"),
    "keys1": ("key_heads", "sub_keys", "key_dim"),
    "keys2": ("key_heads", "sub_keys", "key_dim"),
}
BALANCE_AXES = {"bias1": ("key_heads", "sub_keys"), "bias2": ("key_heads", "sub_keys")}

Table = dict[str, jax.Array]  # {"down": [N, D, R], "up": [N, R, D]}


def _square_split(n: int) -> tuple[int, int]:
  n1 = math.isqrt(n)
  while n % n1:
    n1 -= 1
  return n1, n // n1


@dataclasses.dataclass(frozen=True)
class MomeConfig:
  """One MoME layer.

  sub_keys: (n1, n2) with n1 * n2 = num_experts; None picks the most square
  split and requires n2 <= 4 * n1 (a perfect square or a power of two works).
  threshold: a constant subtracted before the activation; with "relu" an expert
  is silent unless down^T x exceeds it (`key_rows` makes experts that fire only
  near the inputs they were keyed to).
  """
  num_experts: int = 1024  # N
  embed_dim: int = 64  # D
  expert_rank: int = 1  # R
  num_heads: int = 4  # H
  key_dim: int = 32  # Q, even
  top_k: int = 8  # S experts per head
  activation: str = "gelu"
  sub_keys: tuple[int, int] | None = None
  threshold: float = 0.0

  def __post_init__(self):
    for field in ("num_experts", "embed_dim", "expert_rank", "num_heads", "key_dim", "top_k"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MomeConfig.{field}={value!r} must be a positive int")
    if self.key_dim % 2:
      raise ValueError(f"MomeConfig.key_dim={self.key_dim} must be even (two product-key halves)")
    if self.top_k > self.num_experts:
      raise ValueError(f"MomeConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"MomeConfig.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold < math.inf):
      raise ValueError(f"MomeConfig.threshold={self.threshold!r} must be a finite number >= 0")
    if self.sub_keys is not None:
      object.__setattr__(self, "sub_keys", tuple(self.sub_keys))
      n1, n2 = self.sub_keys if len(self.sub_keys) == 2 else (0, 0)
      if n1 < 1 or n2 < 1 or n1 * n2 != self.num_experts:
        raise ValueError(
            f"MomeConfig.sub_keys={self.sub_keys} must be positive with n1 * n2 ="
            f" num_experts={self.num_experts}")
    else:
      n1, n2 = _square_split(self.num_experts)
      if n2 > 4 * n1:
        raise ValueError(
            f"MomeConfig.num_experts={self.num_experts} only splits as {n1} x {n2} into"
            " product-key halves; use a perfect square or a power of two (e.g."
            f" {4 ** round(math.log(self.num_experts, 4))}), or set sub_keys=(n1, n2)")

  @property
  def grid(self) -> tuple[int, int]:
    """(n1, n2): sub-keys per product-key half."""
    return self.sub_keys if self.sub_keys is not None else _square_split(self.num_experts)

  @property
  def slots(self) -> int:
    """K = num_heads * top_k expert slots per token."""
    return self.num_heads * self.top_k

  @property
  def act(self) -> Callable[[jax.Array], jax.Array]:
    """The activation of the pre-activation down^T x, threshold included."""
    return _shifted(self.activation, float(self.threshold))


@functools.lru_cache(maxsize=None)  # one function per (name, threshold): stable under jit caches
def _shifted(activation: str, threshold: float) -> Callable[[jax.Array], jax.Array]:
  act = ACTIVATIONS[activation]
  return act if threshold == 0 else lambda z: act(z - threshold)


# ----------------------------------------------------------------------------
# Router.
# ----------------------------------------------------------------------------


def router_shapes(cfg: MomeConfig) -> dict[str, tuple[int, ...]]:
  n1, n2 = cfg.grid
  half = cfg.key_dim // 2
  return {
      "query": (cfg.embed_dim, cfg.num_heads, cfg.key_dim),
      "keys1": (cfg.num_heads, n1, half),
      "keys2": (cfg.num_heads, n2, half),
  }


def _normal(key: jax.Array, shape: Sequence[int], fan_in: int, dtype=jnp.float32) -> jax.Array:
  return jax.random.normal(key, shape, dtype) * fan_in**-0.5


def _router_init(name: str, cfg: MomeConfig) -> Callable[[jax.Array], jax.Array]:
  shape = router_shapes(cfg)[name]
  fan_in = cfg.embed_dim if name == "query" else cfg.key_dim // 2
  return lambda key: _normal(key, shape, fan_in)


def init_router(key: jax.Array, cfg: MomeConfig) -> dict[str, jax.Array]:
  """Router parameters: query projection and the two sub-key tables."""
  keys = jax.random.split(key, 3)
  return {name: _router_init(name, cfg)(k) for name, k in zip(ROUTER_AXES, keys)}


def zero_balance(cfg: MomeConfig) -> dict[str, jax.Array]:
  n1, n2 = cfg.grid
  return {"bias1": jnp.zeros((cfg.num_heads, n1)), "bias2": jnp.zeros((cfg.num_heads, n2))}


def half_scores(router: dict[str, jax.Array], x_TxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scores of each head's query halves against the two sub-key tables: [H, T, I], [H, T, J].

  Head-major, so each head is one plain matmul (several times faster on CPU
  than a token-major layout).
  """
  q_HxTxQ = jnp.einsum("TD,DHQ->HTQ", x_TxD, router["query"])
  half = q_HxTxQ.shape[-1] // 2
  s1_HxTxI = jnp.einsum("HTC,HIC->HTI", q_HxTxQ[..., :half], router["keys1"])
  s2_HxTxJ = jnp.einsum("HTC,HJC->HTJ", q_HxTxQ[..., half:], router["keys2"])
  return s1_HxTxI, s2_HxTxJ


def product_key_topk(s1_XxI: jax.Array, s2_XxJ: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k of s1[..., i] + s2[..., j] over all n1 * n2 pairs.

  Returns (scores, experts) of shape [..., k], expert = i * n2 + j, in order of
  decreasing score, ties broken by the lower expert index. Takes the top
  min(k, n1) of s1 and min(k, n2) of s2 (lower index first on ties), orders
  each list by sub-key index so the k1 * k2 candidate sums are in ascending
  expert order, and takes their top k (lower position first on ties).

  Exactness: if (i, j) is in the brute-force top k under the order (score desc,
  index asc) but i is not among the selected i', each of those k rows i' gives
  a pair (i', j) that precedes (i, j) (higher s1, or equal s1 and lower i), a
  contradiction; likewise for j. So the result equals the brute force over all
  N sums, indices included. One float caveat: if s1[i'] > s1[i] but the
  rounded sums tie, the two equal-score experts may be swapped; the returned
  scores are the exact k largest in every case.
  """
  n2 = s2_XxJ.shape[-1]
  k1, k2 = min(k, s1_XxI.shape[-1]), min(k, n2)
  v1, i1 = _topk_by_index(s1_XxI, k1)
  v2, i2 = _topk_by_index(s2_XxJ, k2)
  cand = (v1[..., :, None] + v2[..., None, :]).reshape(*v1.shape[:-1], k1 * k2)
  scores, pos = jax.lax.top_k(cand, k)
  rows = jnp.take_along_axis(i1, pos // k2, axis=-1)
  cols = jnp.take_along_axis(i2, pos % k2, axis=-1)
  return scores, rows * n2 + cols


def _block_size(n: int, k: int) -> int | None:
  """The divisor b of n nearest sqrt(n) (b >= 8, k * b < n), or None: no blocking."""
  divisors = [b for b in range(8, n // 2 + 1) if n % b == 0 and k * b < n]
  return min(divisors, key=lambda b: abs(b - math.sqrt(n))) if divisors else None


def exact_topk(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` of the last axis (same values, indices and tie order), in two levels.

  The last axis is cut into blocks of b ~ sqrt(n); the top k blocks by their
  maximum (lower block first on ties) hold the top k elements, so one max
  reduction over n and two top-k over ~sqrt(n) replace a top-k over n (2-3x
  faster on CPU for n = 512-1024). Exact: if an element of the top k sat in a
  block outside the top k blocks, each of those k blocks would hold an element
  before it (a larger value, or an equal one at a lower index).
  """
  n = s.shape[-1]
  b = _block_size(n, k)
  if b is None:
    return jax.lax.top_k(s, k)
  blocks = s.reshape(*s.shape[:-1], n // b, b)
  _, top_blocks = jax.lax.top_k(jnp.max(blocks, axis=-1), k)
  top_blocks = jnp.sort(top_blocks, axis=-1)  # candidates in ascending index order
  cand = jnp.take_along_axis(blocks, top_blocks[..., None], axis=-2).reshape(*s.shape[:-1], k * b)
  values, pos = jax.lax.top_k(cand, k)
  return values, jnp.take_along_axis(top_blocks, pos // b, axis=-1) * b + pos % b


def _topk_by_index(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k of the last axis, returned in ascending index order."""
  values, idx = exact_topk(s, k)
  idx, values = jax.lax.sort((idx, values), dimension=-1, num_keys=1)
  return values, idx


# Selection runs over token chunks of at most this many scores per half
# ([H, chunk, sqrt(N)]), so the score tables stay in cache: 2.5x faster on this
# project's CPU than whole [H, T, sqrt(N)] tables at N = 2^20, T = 3072, H = 8.
_SELECT_CHUNK_SCORES = 2**20


def _select(q_HxTxQ: jax.Array, keys1_HxIxC: jax.Array, keys2_HxJxC: jax.Array, top_k: int,
            balance: dict[str, jax.Array] | None) -> jax.Array:
  """e_HxTxS: each head's product-key top-k experts (`product_key_topk`), token chunk by chunk."""
  h, t, q = q_HxTxQ.shape
  n1, n2 = keys1_HxIxC.shape[1], keys2_HxJxC.shape[1]
  if balance is not None:  # [q, 1] . [key, bias] = q . key + bias, in the matmul
    with_bias = lambda k_HxIxC, b_HxI: jnp.concatenate([k_HxIxC, b_HxI[..., None]], axis=-1)
    keys1_HxIxC = with_bias(keys1_HxIxC, balance["bias1"])
    keys2_HxJxC = with_bias(keys2_HxJxC, balance["bias2"])

  def select(q_HxCxQ):
    q1_HxCxC, q2_HxCxC = q_HxCxQ[..., :q // 2], q_HxCxQ[..., q // 2:]
    if balance is not None:
      ones = jnp.ones(q1_HxCxC.shape[:-1] + (1,), q1_HxCxC.dtype)
      q1_HxCxC = jnp.concatenate([q1_HxCxC, ones], axis=-1)
      q2_HxCxC = jnp.concatenate([q2_HxCxC, ones], axis=-1)
    s1 = jnp.einsum("HTC,HIC->HTI", q1_HxCxC, keys1_HxIxC)
    s2 = jnp.einsum("HTC,HJC->HTJ", q2_HxCxC, keys2_HxJxC)
    return product_key_topk(s1, s2, top_k)[1]

  chunk = max(1, _SELECT_CHUNK_SCORES // (h * max(n1, n2)))
  if t <= chunk:
    return select(q_HxTxQ)
  n_chunks = -(-t // chunk)
  padded = jnp.pad(q_HxTxQ, ((0, 0), (0, n_chunks * chunk - t), (0, 0)))
  chunks_NxHxCxQ = padded.reshape(h, n_chunks, chunk, q).transpose(1, 0, 2, 3)
  e_NxHxCxS = jax.lax.map(select, chunks_NxHxCxQ)
  return e_NxHxCxS.transpose(1, 0, 2, 3).reshape(h, n_chunks * chunk, -1)[:, :t]


def route(
    router: dict[str, jax.Array],
    x_TxD: jax.Array,
    cfg: MomeConfig,
    balance: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Selects K = H * top_k experts per token; returns (idx_TxK, w_TxK).

  Slot h * top_k + s is head h's s-th expert. Weights are a softmax over each
  head's selected scores (so they sum to H per token). The balance bias, if
  given, shifts selection only; weights use the unbiased scores.

  Selection is not differentiable, so it runs on stopped gradients, token
  chunk by token chunk (`_select`: the bias folded into the sub-key matmul as
  one more key column); the weights
  are recomputed from the selected sub-keys alone, so the backward pass
  touches [H, T, top_k] scores, never the [H, T, sqrt(N)] score tables.
  """
  q_HxTxQ = jnp.einsum("TD,DHQ->HTQ", x_TxD, router["query"])
  half = q_HxTxQ.shape[-1] // 2
  q1_HxTxC, q2_HxTxC = q_HxTxQ[..., :half], q_HxTxQ[..., half:]
  keys1_HxIxC, keys2_HxJxC = router["keys1"], router["keys2"]
  sg = jax.lax.stop_gradient
  e_HxTxS = _select(sg(q_HxTxQ), sg(keys1_HxIxC), sg(keys2_HxJxC), cfg.top_k,
                    None if balance is None else sg(balance))
  n2 = keys2_HxJxC.shape[1]
  # The selected sub-keys, [H, T, S, C]: one gather per head.
  pick = jax.vmap(lambda keys_IxC, sub_TxS: keys_IxC[sub_TxS])
  score_HxTxS = (jnp.einsum("HTC,HTSC->HTS", q1_HxTxC, pick(keys1_HxIxC, e_HxTxS // n2))
                 + jnp.einsum("HTC,HTSC->HTS", q2_HxTxC, pick(keys2_HxJxC, e_HxTxS % n2)))
  w_HxTxS = jax.nn.softmax(score_HxTxS, axis=-1)
  t = x_TxD.shape[0]
  to_slots = lambda a_HxTxS: jnp.transpose(a_HxTxS, (1, 0, 2)).reshape(t, cfg.slots)
  return to_slots(e_HxTxS), to_slots(w_HxTxS)


# ----------------------------------------------------------------------------
# Expert table.
# ----------------------------------------------------------------------------


def table_shapes(cfg: MomeConfig) -> dict[str, tuple[int, ...]]:
  n, d, r = cfg.num_experts, cfg.embed_dim, cfg.expert_rank
  return {"down": (n, d, r), "up": (n, r, d)}


def _table_init(name: str, cfg: MomeConfig) -> Callable[[jax.Array], jax.Array]:
  """down ~ N(0, 1/D); up = 0, so a fresh layer adds exactly zero."""
  shape = table_shapes(cfg)[name]
  if name == "down":
    return lambda key: _normal(key, shape, cfg.embed_dim)
  return lambda key: jnp.zeros(shape, jnp.float32)


def init_table(key: jax.Array, cfg: MomeConfig, mesh: Mesh | None = None) -> Table:
  """The expert table; on a mesh it is created already split over `expert`."""

  def init(key):
    return {name: _table_init(name, cfg)(key) for name in TABLE_AXES}

  if mesh is None:
    return jax.jit(init)(key)
  shardings = sharding.shardings_for(TABLE_AXES, mesh)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init, key), shardings)
  sharding.check_expert_sharded(abstract, mesh)
  return jax.jit(init, out_shardings=shardings)(key)


def init_expert_opt_state(table: Table, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> Any:
  """Per-expert optimizer state: tx.init vmapped over rows (every leaf has leading N)."""
  init = jax.vmap(tx.init)
  if mesh is None:
    return jax.jit(init)(table)
  sharding.check_expert_sharded(table, mesh)
  return jax.jit(init, out_shardings=sharding.row_shardings(jax.eval_shape(init, table), mesh))(table)


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
  return gather_apply(x_TxD, idx_TxK, w_TxK, table["down"], table["up"], cfg.act)


def key_rows(table: Table, idx_PxK: np.ndarray, x_PxD: np.ndarray, cfg: MomeConfig,
             match: float) -> Table:
  """The table with every expert selected in idx_PxK keyed to the inputs that select it.

  Expert e, selected at positions P_e, gets down[e, :, r] = a * m / |m|^2 for
  every r, with m the mean of x over P_e and a = cfg.threshold / match, so
  down^T x - threshold = threshold * (proj(x) / match - 1), proj(x) = x . m / |m|^2:
  with a "relu" activation the expert fires (with threshold * (1 / match - 1)
  at x = m) only where x projects onto m at least `match` of m's length, and is
  exactly silent on other inputs that select it. Other rows are unchanged.
  A one-time set-up step (host aggregation and one scatter), not a training step.
  """
  if cfg.threshold <= 0:
    raise ValueError(f"key_rows: needs MomeConfig.threshold > 0, got {cfg.threshold}")
  if not 0 < match < 1:
    raise ValueError(f"key_rows: match={match} must be in (0, 1)")
  idx_PxK, x_PxD = np.asarray(idx_PxK), np.asarray(x_PxD, np.float64)
  if idx_PxK.shape[0] != x_PxD.shape[0]:
    raise ValueError(f"key_rows: {idx_PxK.shape[0]} positions of experts, {x_PxD.shape[0]} inputs")
  uniq_U, inv = np.unique(idx_PxK.ravel(), return_inverse=True)
  order = np.argsort(inv, kind="stable")  # slots grouped by expert, for one reduceat
  starts = np.searchsorted(inv[order], np.arange(len(uniq_U)))
  sums_UxD = np.add.reduceat(x_PxD[order // idx_PxK.shape[1]], starts, axis=0)
  mean_UxD = sums_UxD / np.diff(np.append(starts, len(order)))[:, None]
  norm2_U = np.maximum(np.sum(mean_UxD**2, axis=1, keepdims=True), 1e-30)
  key_UxD = (cfg.threshold / match) * mean_UxD / norm2_U
  rows_UxDxR = np.repeat(key_UxD[:, :, None], cfg.expert_rank, axis=2)
  return _set_down(table, jnp.asarray(uniq_U, jnp.int32), jnp.asarray(rows_UxDxR, table["down"].dtype))


@functools.partial(jax.jit, donate_argnums=0)
def _set_down(table: Table, uniq_U: jax.Array, rows_UxDxR: jax.Array) -> Table:
  return {**table, "down": table["down"].at[uniq_U].set(rows_UxDxR)}


# ----------------------------------------------------------------------------
# Sparse training.
# ----------------------------------------------------------------------------


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
  """Updates rows uniq_U of the table and of its per-expert state; others untouched.

  Jit it with donate_argnames=("table", "opt_state") so the writes are in place.
  Note: `up` starts at zero, and optax.adafactor's default
  multiply_by_parameter_scale=True scales a zero row's updates by its
  min_scale 1e-3; memory tuning from a fresh table wants it off.
  """
  if mesh is not None:
    return sharding.update_rows_sharded(row_update(tx), table, opt_state, grads_rows, uniq_U, mesh)
  take = lambda a: jnp.take(a, uniq_U, axis=0, mode="clip")
  put = lambda a, rows: a.at[uniq_U].set(rows, mode="drop", indices_are_sorted=True)
  new_rows, new_state_rows = row_update(tx)(
      jax.tree.map(take, table), jax.tree.map(take, opt_state), grads_rows)
  return jax.tree.map(put, table, new_rows), jax.tree.map(put, opt_state, new_state_rows)


def dense_step(
    table: Table, opt_state: Any, grads_table: Table, *, tx: optax.GradientTransformation,
) -> tuple[Table, Any]:
  """The dense baseline: per-row tx on all N rows from a dense [N, ...] gradient."""
  return row_update(tx)(table, opt_state, grads_table)


def _is_layer(node: Any) -> bool:
  return isinstance(node, dict) and "down" in node and "up" in node


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


def zero_deltas(tables: Any, num_rows: int) -> Any:
  """Zero "mome_delta" rows for every layer table: [N, a, b] -> [num_rows, a, b].

  num_rows = (tokens per layer call) * cfg.slots.
  """
  return jax.tree.map(lambda a: jnp.zeros((num_rows,) + a.shape[1:], a.dtype), tables)


# ----------------------------------------------------------------------------
# Collisions between facts, and the selection bias that reduces them.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CollisionReport:
  """How often facts share experts.

  facts_per_expert_hist[c] is the number of experts selected by exactly c facts
  (index 0 unused); pair_collisions = sum over experts of C(c, 2).
  """
  num_facts: int
  experts_used: int
  shared_experts: int
  facts_with_collision: int
  fraction_facts_with_collision: float
  pair_collisions: int
  facts_per_expert_hist: np.ndarray


def fact_experts(idx_TxK: np.ndarray, fact_T: np.ndarray, num_facts: int) -> list[np.ndarray]:
  """The union of the experts selected by each fact's tokens (fact_T[t] < 0: no fact)."""
  idx_TxK, fact_T = np.asarray(idx_TxK), np.asarray(fact_T)
  return [np.unique(idx_TxK[fact_T == f]) for f in range(num_facts)]


def collision_report(experts_per_fact: Sequence[np.ndarray]) -> CollisionReport:
  """Counts experts shared by two or more facts. Negative entries are padding."""
  sets = [np.unique(np.asarray(e)[np.asarray(e) >= 0]) for e in experts_per_fact]
  every = np.concatenate(sets) if sets else np.zeros((0,), np.int64)
  fact_of = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
  experts, inv, counts = np.unique(every, return_inverse=True, return_counts=True)
  shared = experts[counts >= 2]
  colliding = np.unique(fact_of[counts[inv] >= 2]).size  # one pass, not an isin per fact
  num_facts = len(sets)
  return CollisionReport(
      num_facts=num_facts,
      experts_used=int(experts.size),
      shared_experts=int(shared.size),
      facts_with_collision=int(colliding),
      fraction_facts_with_collision=colliding / num_facts if num_facts else 0.0,
      pair_collisions=int((counts * (counts - 1) // 2).sum()),
      facts_per_expert_hist=np.bincount(counts, minlength=2),
  )


@functools.partial(jax.jit, static_argnames=("cfg", "rounds", "rate"))
def balance_router(
    router: dict[str, jax.Array],
    x_TxD: jax.Array,
    cfg: MomeConfig,
    *,
    rounds: int = 100,
    rate: float = 0.05,
) -> dict[str, jax.Array]:
  """A frozen selection bias that spreads the given tokens over the sub-keys.

  Collision mitigation, run once between phase 1 and phase 2 on the hidden
  states x_TxD of the facts' tokens at this layer. Each round routes the
  tokens with the current bias, counts how often each sub-key of each head is
  selected, and moves the bias of over-used sub-keys down and of under-used
  ones up (sign updates, as in auxiliary-loss-free load balancing) by a step
  that decays linearly from rate * std(scores) to 0. Facts that attend to the
  same popular keys are pushed onto different ones, so fewer facts share an
  expert.

  The bias is additive per sub-key, so product-key top-k stays exact; it shifts
  selection only (weights use the unbiased scores). It is deterministic and,
  stored in "mome_balance" and never differentiated, it is part of the frozen
  router in phase 2 and at inference, where it selects the same experts.
  """
  if rounds < 0 or rate < 0:
    raise ValueError(f"balance_router: rounds={rounds} and rate={rate} must be >= 0")
  s1_HxTxI, s2_HxTxJ = half_scores(router, x_TxD)
  n2 = cfg.grid[1]
  base_step = rate * jnp.std(jnp.concatenate([s1_HxTxI.ravel(), s2_HxTxJ.ravel()]))
  heads_Hx1x1 = jnp.arange(cfg.num_heads)[:, None, None]

  def rebalance(bias_HxI, sub_HxTxS, step):
    counts_HxI = jnp.zeros(bias_HxI.shape).at[heads_Hx1x1, sub_HxTxS].add(1.0)
    return bias_HxI - step * jnp.sign(counts_HxI - counts_HxI.mean(axis=-1, keepdims=True))

  q_HxTxQ = jnp.einsum("TD,DHQ->HTQ", x_TxD, router["query"])

  def one_round(balance, r):
    step = base_step * (1.0 - r / rounds)
    e_HxTxS = _select(q_HxTxQ, router["keys1"], router["keys2"], cfg.top_k, balance)
    return {"bias1": rebalance(balance["bias1"], e_HxTxS // n2, step),
            "bias2": rebalance(balance["bias2"], e_HxTxS % n2, step)}, None

  balance, _ = jax.lax.scan(one_round, zero_balance(cfg), jnp.arange(rounds, dtype=jnp.float32))
  return balance


# ----------------------------------------------------------------------------
# Flax module.
# ----------------------------------------------------------------------------


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
    router = self._vars(ROUTER, ROUTER_AXES, _router_init)
    balance = self._vars(BALANCE, BALANCE_AXES, lambda name, c: lambda key: zero_balance(c)[name])
    table = self._vars(TABLE, TABLE_AXES, _table_init)
    x_TxD = x_XxD.reshape(-1, cfg.embed_dim)
    idx_TxK, w_TxK = route(router, x_TxD, cfg, balance)
    if not self.has_variable(DELTA, "down"):
      y_XxD = apply_experts(x_TxD, idx_TxK, w_TxK, table, cfg, self.gather_apply,
                            self.mesh).reshape(x_XxD.shape)
      self._sow_out(y_XxD)
      return y_XxD
    delta = {name: self.get_variable(DELTA, name) for name in TABLE_AXES}
    num_rows = delta["down"].shape[0]
    focus_T = None
    if self.has_variable(FOCUS, "mask"):
      focus = self.get_variable(FOCUS, "mask")
      if focus.shape != x_XxD.shape[:-1]:
        raise ValueError(f"MomeLayer: mome_focus mask has shape {focus.shape}, need the input's"
                         f" leading shape {x_XxD.shape[:-1]}")
      focus_T = focus.reshape(-1)
    elif num_rows != x_TxD.shape[0] * cfg.slots:
      raise ValueError(
          f"MomeLayer: mome_delta has {num_rows} rows, need tokens * slots ="
          f" {x_TxD.shape[0]} * {cfg.slots} = {x_TxD.shape[0] * cfg.slots} (see zero_deltas)")
    table = jax.lax.stop_gradient(table)
    trained_TxK = idx_TxK if focus_T is None else jnp.where(focus_T[:, None], idx_TxK, cfg.num_experts)
    uniq_U, inv_TxK = unique_rows(trained_TxK, cfg.num_experts, num_rows)
    rows = jax.tree.map(jnp.add, gather_rows(table, uniq_U, self.mesh), delta)
    self.sow(UNIQ, "uniq", uniq_U, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    if focus_T is None:
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
