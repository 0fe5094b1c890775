"""The frozen router: multi-head product-key selection of experts (PEER / product-key memory).

Each of A heads projects a token to a query of width Q and scores it against two
tables of sub-keys (I and J of them, width C = Q / 2); expert e = i * J + j has
key concat(keys1[i], keys2[j]), so a head scores I + J sub-keys instead of E
keys, and `product_key_topk` returns the exact top-M over all E. A balance bias
per sub-key ("mome_balance", set by `collisions.balance_router`) shifts
selection only. `route` gives each token K = A * M expert indices and weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.mome.config import MomeConfig


ROUTER_AXES = {
    "query": ("embed", "key_heads", "key_dim"),
    "keys1": ("key_heads", "sub_keys", "key_dim"),
    "keys2": ("key_heads", "sub_keys", "key_dim"),
}


BALANCE_AXES = {"bias1": ("key_heads", "sub_keys"), "bias2": ("key_heads", "sub_keys")}


def router_shapes(cfg: MomeConfig) -> dict[str, tuple[int, ...]]:
  n1, n2 = cfg.grid
  half = cfg.key_dim // 2
  return {
      "query": (cfg.embed_dim, cfg.num_heads, cfg.key_dim),
      "keys1": (cfg.num_heads, n1, half),
      "keys2": (cfg.num_heads, n2, half),
  }


def scaled_normal(key: jax.Array, shape: Sequence[int], fan_in: int, dtype=jnp.float32) -> jax.Array:
  return jax.random.normal(key, shape, dtype) * fan_in**-0.5


def router_param_init(name: str, cfg: MomeConfig) -> Callable[[jax.Array], jax.Array]:
  shape = router_shapes(cfg)[name]
  fan_in = cfg.embed_dim if name == "query" else cfg.key_dim // 2
  return lambda key: scaled_normal(key, shape, fan_in)


def init_router(key: jax.Array, cfg: MomeConfig) -> dict[str, jax.Array]:
  """Router parameters: query projection and the two sub-key tables."""
  keys = jax.random.split(key, 3)
  return {name: router_param_init(name, cfg)(k) for name, k in zip(ROUTER_AXES, keys)}


def zero_balance(cfg: MomeConfig) -> dict[str, jax.Array]:
  n1, n2 = cfg.grid
  return {"bias1": jnp.zeros((cfg.num_heads, n1)), "bias2": jnp.zeros((cfg.num_heads, n2))}


def half_scores(router: dict[str, jax.Array], x_TxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scores of each head's query halves against the two sub-key tables: [H, T, I], [H, T, J].

  Head-major, so each head is one plain matmul (several times faster on CPU
  than a token-major layout).
  """
  q_AxTxQ = jnp.einsum("TD,DAQ->ATQ", x_TxD, router["query"])
  half = q_AxTxQ.shape[-1] // 2
  s1_AxTxI = jnp.einsum("ATC,AIC->ATI", q_AxTxQ[..., :half], router["keys1"])
  s2_AxTxJ = jnp.einsum("ATC,AJC->ATJ", q_AxTxQ[..., half:], router["keys2"])
  return s1_AxTxI, s2_AxTxJ


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


def _token_chunks(q_AxTxQ: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(q [Z, H, chunk, Q], valid [Z, chunk]): the tokens cut into Z chunks, the last zero-padded."""
  t = q_AxTxQ.shape[1]
  n_chunks = -(-t // chunk)
  padded = jnp.pad(q_AxTxQ, ((0, 0), (0, n_chunks * chunk - t), (0, 0)))
  valid_ZxC = (jnp.arange(n_chunks * chunk) < t).reshape(n_chunks, chunk)
  return einops.rearrange(padded, "a (z c) q -> z a c q", c=chunk), valid_ZxC


def _chunk_tokens(heads: int, n1: int, n2: int) -> int:
  """Tokens per chunk: a chunk's [H, chunk, max(I, J)] score table holds at most `_SELECT_CHUNK_SCORES`."""
  return max(1, _SELECT_CHUNK_SCORES // (heads * max(n1, n2)))


@functools.partial(jax.jit, static_argnames="chunk")
def score_std(router: dict[str, jax.Array], x_TxD: jax.Array, chunk: int | None = None) -> jax.Array:
  """The standard deviation over every entry of `half_scores(router, x_TxD)`, without holding them.

  Token chunk by chunk (`chunk` tokens; None: as `select_experts` cuts them), in two passes: the
  mean, then the mean squared deviation from it. The whole [H, T, sqrt(N)] tables are 2.9 GB at
  T = 44,000 answer tokens (4,000 facts), H = 8, N = 2^20; a chunk is 4 MB a half.
  """
  q_AxTxQ = jnp.einsum("TD,DAQ->ATQ", x_TxD, router["query"])
  h, t, q = q_AxTxQ.shape
  n1, n2 = router["keys1"].shape[1], router["keys2"].shape[1]
  q_ZxAxCxQ, valid_ZxC = _token_chunks(q_AxTxQ, chunk or _chunk_tokens(h, n1, n2))

  def total(fn):
    def one(args):
      q_AxCxQ, valid_C = args
      s1_AxCxI = jnp.einsum("ACX,AIX->ACI", q_AxCxQ[..., :q // 2], router["keys1"])
      s2_AxCxJ = jnp.einsum("ACX,AJX->ACJ", q_AxCxQ[..., q // 2:], router["keys2"])
      keep = valid_C[None, :, None]
      return jnp.sum(jnp.where(keep, fn(s1_AxCxI), 0.0)) + jnp.sum(jnp.where(keep, fn(s2_AxCxJ), 0.0))
    return jnp.sum(jax.lax.map(one, (q_ZxAxCxQ, valid_ZxC)))

  count = float(h * t * (n1 + n2))  # over 2^31 at 176,000 tokens
  mean = total(lambda s: s) / count
  return jnp.sqrt(total(lambda s: jnp.square(s - mean)) / count)


def select_experts(q_AxTxQ: jax.Array, keys1_AxIxC: jax.Array, keys2_AxJxC: jax.Array, top_k: int,
                   balance: dict[str, jax.Array] | None) -> jax.Array:
  """e_AxTxM: each head's product-key top-k experts (`product_key_topk`), token chunk by chunk."""
  h, t, q = q_AxTxQ.shape
  n1, n2 = keys1_AxIxC.shape[1], keys2_AxJxC.shape[1]
  if balance is not None:  # [q, 1] . [key, bias] = q . key + bias, in the matmul
    with_bias = lambda k_AxIxC, b_AxI: jnp.concatenate([k_AxIxC, b_AxI[..., None]], axis=-1)
    keys1_AxIxC = with_bias(keys1_AxIxC, balance["bias1"])
    keys2_AxJxC = with_bias(keys2_AxJxC, balance["bias2"])

  def select(q_AxTxQ):
    q1_AxTxC, q2_AxTxC = q_AxTxQ[..., :q // 2], q_AxTxQ[..., q // 2:]
    if balance is not None:
      ones = jnp.ones(q1_AxTxC.shape[:-1] + (1,), q1_AxTxC.dtype)
      q1_AxTxC = jnp.concatenate([q1_AxTxC, ones], axis=-1)
      q2_AxTxC = jnp.concatenate([q2_AxTxC, ones], axis=-1)
    s1 = jnp.einsum("ATC,AIC->ATI", q1_AxTxC, keys1_AxIxC)
    s2 = jnp.einsum("ATC,AJC->ATJ", q2_AxTxC, keys2_AxJxC)
    return product_key_topk(s1, s2, top_k)[1]

  chunk = _chunk_tokens(h, n1, n2)
  if t <= chunk:
    return select(q_AxTxQ)
  q_chunks, _ = _token_chunks(q_AxTxQ, chunk)  # z chunks of c tokens
  e_chunks = jax.lax.map(select, q_chunks)
  return einops.rearrange(e_chunks, "z a c m -> a (z c) m")[:, :t]


def route(
    router: dict[str, jax.Array],
    x_TxD: jax.Array,
    cfg: MomeConfig,
    balance: dict[str, jax.Array] | None = None,
    experts_TxK: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Selects K = H * top_k experts per token; returns (idx_TxK, w_TxK).

  `experts_TxK`: the selection, already made (`inputs.fact_routes`: in phase 2
  the first MoME layer's input, so its selection, is fixed per fact); only the
  weights are computed then. It must be what this router selects for `x_TxD`.

  Slot h * top_k + s is head h's s-th expert. Weights are a softmax over each
  head's selected scores (so they sum to H per token). The balance bias, if
  given, shifts selection only; weights use the unbiased scores.

  Selection is not differentiable, so it runs on stopped gradients, token
  chunk by token chunk (`select_experts`: the bias folded into the sub-key matmul as
  one more key column); the weights
  are recomputed from the selected sub-keys alone, so the backward pass
  touches [H, T, top_k] scores, never the [H, T, sqrt(N)] score tables.
  """
  q_AxTxQ = jnp.einsum("TD,DAQ->ATQ", x_TxD, router["query"])
  half = q_AxTxQ.shape[-1] // 2
  q1_AxTxC, q2_AxTxC = q_AxTxQ[..., :half], q_AxTxQ[..., half:]
  keys1_AxIxC, keys2_AxJxC = router["keys1"], router["keys2"]
  sg = jax.lax.stop_gradient
  if experts_TxK is None:
    e_AxTxM = select_experts(sg(q_AxTxQ), sg(keys1_AxIxC), sg(keys2_AxJxC), cfg.top_k,
                             None if balance is None else sg(balance))
  else:
    if experts_TxK.shape != (x_TxD.shape[0], cfg.slots):
      raise ValueError(f"route: experts_TxK has shape {experts_TxK.shape}, need (tokens, slots) ="
                       f" {(x_TxD.shape[0], cfg.slots)}")
    e_AxTxM = einops.rearrange(experts_TxK, "t (a m) -> a t m", a=cfg.num_heads)
  n2 = keys2_AxJxC.shape[1]
  # The selected sub-keys, [H, T, S, C]: one gather per head.
  pick = jax.vmap(lambda keys_IxC, sub_TxM: keys_IxC[sub_TxM])
  score_AxTxM = (jnp.einsum("ATC,ATMC->ATM", q1_AxTxC, pick(keys1_AxIxC, e_AxTxM // n2))
                 + jnp.einsum("ATC,ATMC->ATM", q2_AxTxC, pick(keys2_AxJxC, e_AxTxM % n2)))
  w_AxTxM = jax.nn.softmax(score_AxTxM, axis=-1)
  to_slots = lambda a_AxTxM: einops.rearrange(a_AxTxM, "a t m -> t (a m)")
  return to_slots(e_AxTxM), to_slots(w_AxTxM)


route_jit = jax.jit(route, static_argnums=2)  # route with a static MomeConfig


# `whitened`: the eigenvalues of the inputs' second moment are floored at this share of their mean.
WHITEN_FLOOR = 1e-3


def whitened(router: dict[str, jax.Array], x_PxD: np.ndarray, floor: float = WHITEN_FLOOR,
             chunk: int = 2**16) -> dict[str, jax.Array]:
  """The router with its query projection applied to x W instead of x: inputs decorrelated.

  W = U diag((lambda + floor * mean(lambda))^-1/2) U^T * mean(lambda)^1/2, where U diag(lambda) U^T
  is the second moment E[x x^T] over the rows of x_PxD (not centred: no bias is needed, so the
  router keeps its parameters and every reader of them, the export included, routes alike).
  Along every direction the inputs' mean square becomes mean(lambda) (floored directions a little
  less), so score scales stay near the router's own; a few strong shared directions no longer
  decide the selection of inputs that differ elsewhere, and near inputs share fewer experts
  (docs/tried.md, "A whitened router input"). Float64 on the host, the rows in chunks of `chunk`.
  """
  x_PxD = np.asarray(x_PxD)
  d = router["query"].shape[0]
  if x_PxD.ndim != 2 or x_PxD.shape[1] != d or not len(x_PxD):
    raise ValueError(f"whitened: inputs of shape {x_PxD.shape}, need (rows >= 1, {d})")
  m_DxD = sum(c.T @ c for c in (x_PxD[i:i + chunk].astype(np.float64)
                                for i in range(0, len(x_PxD), chunk))) / len(x_PxD)
  lam_D, u_DxD = np.linalg.eigh(m_DxD)
  mean = lam_D.mean()
  if not mean > 0:
    raise ValueError(f"whitened: the {len(x_PxD)} inputs are all zero (or not finite)")
  w_DxD = (u_DxD * np.sqrt(mean / (lam_D + floor * mean))) @ u_DxD.T
  query = np.einsum("DE,EAQ->DAQ", w_DxD, np.asarray(router["query"], np.float64))
  return {**router, "query": jnp.asarray(query, router["query"].dtype)}


# A slot whose selection score beats its head's best unselected expert by less than this share of
# that expert's score can leave the top-k under float rounding alone (another batch shape, a KV
# cache, float64): `fragile_slots`, which the exclusive slot choice writes last.
FRAGILE_MARGIN = 1e-4


@functools.partial(jax.jit, static_argnums=2)
def selection_margins(router: dict[str, jax.Array], x_TxD: jax.Array, cfg: MomeConfig,
                      balance: dict[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """(margin_TxK, next_TxK): each slot's selection score (balance bias in, as `route` selects)
  minus that of its head's best unselected expert, and that expert's score; slots as `route`'s."""
  q_AxTxQ = jnp.einsum("TD,DAQ->ATQ", x_TxD, router["query"])
  e_AxTxN = select_experts(q_AxTxQ, router["keys1"], router["keys2"], cfg.top_k + 1, balance)
  n2, half = router["keys2"].shape[1], q_AxTxQ.shape[-1] // 2
  pick = jax.vmap(lambda keys_IxC, sub_TxN: keys_IxC[sub_TxN])
  score_AxTxN = (jnp.einsum("ATC,ATNC->ATN", q_AxTxQ[..., :half], pick(router["keys1"], e_AxTxN // n2))
                 + jnp.einsum("ATC,ATNC->ATN", q_AxTxQ[..., half:], pick(router["keys2"], e_AxTxN % n2)))
  if balance is not None:
    bias = jax.vmap(lambda b_I, sub_TxN: b_I[sub_TxN])
    score_AxTxN += bias(balance["bias1"], e_AxTxN // n2) + bias(balance["bias2"], e_AxTxN % n2)
  to_slots = lambda a_AxTxM: einops.rearrange(a_AxTxM, "a t m -> t (a m)")
  next_AxTx1 = score_AxTxN[..., -1:]
  return (to_slots(score_AxTxN[..., :-1] - next_AxTx1),
          to_slots(jnp.broadcast_to(next_AxTx1, score_AxTxN[..., :-1].shape)))


def fragile_slots(router: dict[str, jax.Array], x_TxD: jax.Array, cfg: MomeConfig,
                  balance: dict[str, jax.Array] | None = None) -> np.ndarray:
  """bool [T, K]: the slots within `FRAGILE_MARGIN` of leaving their head's top-k."""
  margin_TxK, next_TxK = selection_margins(router, jnp.asarray(x_TxD), cfg, balance)
  return np.asarray(margin_TxK) < FRAGILE_MARGIN * np.abs(np.asarray(next_TxK))
