"""What each MoME layer sees: its path in the collections, its input at the facts' answer positions.

The answer positions of a fact are those that predict a trained token (the last
prompt token through the last answer token); `fact_inputs` collects every MoME
layer's input there, which routing, collisions, balance and keyed experts use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.model import Transformer
from lamini_jax.mome.layer import BALANCE, ROUTER, MomeLayer
from lamini_jax.mome.router import route_jit


def layer_paths(model: Transformer) -> list[tuple[str, ...]]:
  """Paths of the MoME layers inside the MoME collections, in layer order."""
  return [(f"layers_{i}", "mome") for i in sorted(model.mome_layers)]


def layer_key(path: Sequence[str]) -> str:
  return "/".join(path)


def tree_get(tree: dict, path: Sequence[str]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def tree_set(tree: dict, path: Sequence[str], value: Any) -> dict:
  if not path:
    return value
  return {**tree, path[0]: tree_set(tree.get(path[0], {}), path[1:], value)}


def layer_inputs(model: Transformer, variables: Any, tokens_BxT: jax.Array) -> dict[str, jax.Array]:
  """The input [B, T, D] of every MoME layer (what its router sees), by layer path."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, MomeLayer) and context.method_name == "__call__":
      captured[layer_key(context.module.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, tokens_BxT)
  return captured


_layer_inputs = jax.jit(layer_inputs, static_argnums=0)


def answer_positions(encoded: Sequence[encoding.EncodedFact]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [F, T], positions [F, T] bool): the positions that produce each fact's answer.

  Position t is marked when token t + 1 is trained (an answer token, the answer
  end or EOS): the last prompt token through the last answer token. The last
  prompt token, where the question is summed up, is the one that picks the
  first answer token.
  """
  seq_len = -(-max(len(e.tokens) for e in encoded) // 32) * 32
  tokens, mask = batch_lib.stack_encoded(encoded, seq_len, 0)
  pred = np.zeros(mask.shape, bool)
  pred[:, :-1] = mask[:, 1:] > 0
  return tokens, pred


def fact_slots(encoded: Sequence[encoding.EncodedFact], slots_PxK: np.ndarray) -> np.ndarray:
  """bool [F, T, K]: per-position slots `slots_PxK` (rows in `fact_inputs` order) put at
  their facts' answer positions; False elsewhere (T as in `answer_positions`)."""
  _, pred_FxT = answer_positions(encoded)
  if len(slots_PxK) != pred_FxT.sum():
    raise ValueError(f"fact_slots: {len(slots_PxK)} rows of slots for {pred_FxT.sum()} answer positions")
  out_FxTxK = np.zeros(pred_FxT.shape + (np.shape(slots_PxK)[1],), bool)
  out_FxTxK[pred_FxT] = slots_PxK
  return out_FxTxK


def fact_rows(fact_P: np.ndarray, num_facts: int) -> list[np.ndarray]:
  """The rows of each fact 0 .. num_facts - 1 in fact_P (in order; other values: no fact's).

  One sort by fact, not a scan of every row per fact (64,000 facts have 690,000 answer positions).
  """
  fact_P = np.asarray(fact_P)
  order = np.argsort(fact_P, kind="stable")
  bounds = np.searchsorted(fact_P[order], np.arange(num_facts + 1))
  return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _chunk(n: int, batch_size: int) -> int:
  """Rows per forward pass over n sequences: batch_size, or the power of two that holds n when
  fewer (a handful of facts is not padded to a full chunk; few shapes compile)."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def fact_inputs(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                batch_size: int = 32) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Each MoME layer's input at the facts' answer positions [P, D], and their fact index [P]."""
  tokens, pred = answer_positions(encoded)
  batch_size = _chunk(len(encoded), batch_size)
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(encoded), batch_size):
    block = tokens[start:start + batch_size]
    n = len(block)
    x = _layer_inputs(model, variables, jnp.asarray(np.pad(block, ((0, batch_size - n), (0, 0)))))
    for name, x_BxTxD in x.items():
      chunks.setdefault(name, []).append(np.asarray(x_BxTxD)[:n][pred[start:start + n]])
  return {name: np.concatenate(c) for name, c in chunks.items()}, np.nonzero(pred)[0]


def answer_routes(model: Transformer, variables: Any, path: tuple[str, ...],
                  encoded: Sequence[encoding.EncodedFact], cache: dict[bytes, tuple] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(inputs [P, D], experts [P, K], weights [P, K], fact index [P]) of the MoME layer at `path`
  at the facts' answer positions.

  `cache` (by a fact's tokens) keeps each fact's once computed: valid while the backbone,
  router and balance stay as they are and no MoME layer sits below this one (its input is
  then the backbone's, whatever the tables hold), as when editing a run's memory.
  """
  keys = [e.tokens.tobytes() + e.loss_mask.tobytes() for e in encoded]
  cache = {} if cache is None else cache
  todo = list({k: e for k, e in zip(keys, encoded) if k not in cache}.items())
  if todo:
    x, fact_P = fact_inputs(model, variables, [e for _, e in todo])
    x_PxD = x[layer_key(path)]
    idx, w = route_jit(tree_get(variables[ROUTER], path), jnp.asarray(x_PxD), model.mome,
                       tree_get(variables[BALANCE], path))
    idx, w = np.asarray(idx), np.asarray(w)
    for (k, _), rows in zip(todo, fact_rows(fact_P, len(todo))):
      cache[k] = (x_PxD[rows], idx[rows], w[rows])
  parts = [cache[k] for k in keys]
  fact_P = np.repeat(np.arange(len(parts)), [len(p[0]) for p in parts])
  return tuple(np.concatenate([p[j] for p in parts]) for j in range(3)) + (fact_P,)


def token_routes(model: Transformer, variables: Any, tokens_NxT: np.ndarray,
                 batch_size: int = 32) -> np.ndarray:
  """int32 [N, T, K]: the experts the first MoME layer selects at every position of `tokens_NxT`.

  In phase 2 the backbone and router are frozen and no MoME layer sits below the
  first, so its input, and the experts it selects, are a fixed function of the
  tokens: the step takes them from here (layer collection "mome_route") instead of
  scoring sqrt(E) sub-keys per head and token on every step. Rows are computed
  independently (causal attention), so a row's routes do not depend on the
  padding after it or on the other rows of its chunk.
  """
  path = layer_paths(model)[0]
  name = layer_key(path)
  router, balance = tree_get(variables[ROUTER], path), tree_get(variables[BALANCE], path)
  n, t = tokens_NxT.shape
  batch_size = _chunk(n, batch_size)
  out = np.zeros((n, t, model.mome.slots), np.int32)
  for start in range(0, n, batch_size):
    block = tokens_NxT[start:start + batch_size]
    rows = len(block)
    x_BxTxD = _layer_inputs(model, variables, jnp.asarray(np.pad(block, ((0, batch_size - rows), (0, 0)))))[name]
    idx_TxK, _ = route_jit(router, x_BxTxD.reshape(-1, x_BxTxD.shape[-1]), model.mome, balance)
    out[start:start + rows] = np.asarray(idx_TxK).reshape(batch_size, t, -1)[:rows]
  return out
