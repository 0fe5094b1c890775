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
from lamini_jax.mome.layer import MomeLayer


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


def fact_inputs(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                batch_size: int = 32) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Each MoME layer's input at the facts' answer positions [P, D], and their fact index [P]."""
  tokens, pred = answer_positions(encoded)
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(encoded), batch_size):
    block = tokens[start:start + batch_size]
    n = len(block)
    x = _layer_inputs(model, variables, jnp.asarray(np.pad(block, ((0, batch_size - n), (0, 0)))))
    for name, x_BxTxD in x.items():
      chunks.setdefault(name, []).append(np.asarray(x_BxTxD)[:n][pred[start:start + n]])
  return {name: np.concatenate(c) for name, c in chunks.items()}, np.nonzero(pred)[0]
