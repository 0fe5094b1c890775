"""Gather-apply: the expert op of the Mixture of Memory Experts (MoME).

For T tokens, each routed to K expert slots of a table of N rank-R adapters:

  y[t] = sum_k w[t, k] * up[idx[t, k]]^T act(down[idx[t, k]]^T x[t])

with x_TxD the token inputs, idx_TxK the selected experts (int, in [0, N)),
w_TxK their weights, down_NxDxR and up_NxRxD the expert table, and `act` an
elementwise activation. R = 1 is a PEER-style single-neuron expert.

Every implementation has the signature of `GatherApplyFn`:

  gather_apply(x_TxD, idx_TxK, w_TxK, down_NxDxR, up_NxRxD, activation) -> y_TxD

and is differentiable in x, w, down and up. The MoME layer takes one as a
parameter. Accelerator kernels (Pallas, Triton) go above the reference and are
tested against it; the pure-jnp reference is at the bottom of this file.

Shape letters: T tokens, K expert slots per token, N experts, D model width,
R expert rank.
"""

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp


class GatherApplyFn(Protocol):

  def __call__(
      self,
      x_TxD: jax.Array,
      idx_TxK: jax.Array,
      w_TxK: jax.Array,
      down_NxDxR: jax.Array,
      up_NxRxD: jax.Array,
      activation: Callable[[jax.Array], jax.Array],
  ) -> jax.Array:
    ...


# ----------------------------------------------------------------------------
# Reference (pure jnp). Kernels are checked against this function.
# ----------------------------------------------------------------------------


def gather_apply_reference(
    x_TxD: jax.Array,
    idx_TxK: jax.Array,
    w_TxK: jax.Array,
    down_NxDxR: jax.Array,
    up_NxRxD: jax.Array,
    activation: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Gathers the selected expert rows and applies them; returns y_TxD.

  Indices must lie in [0, N); callers that mask slots pass a valid index with
  weight 0 (out-of-range indices are clipped, not dropped).
  """
  down_TxKxDxR = jnp.take(down_NxDxR, idx_TxK, axis=0, mode="clip")
  up_TxKxRxD = jnp.take(up_NxRxD, idx_TxK, axis=0, mode="clip")
  h_TxKxR = activation(jnp.einsum("TD,TKDR->TKR", x_TxD, down_TxKxDxR))
  return jnp.einsum("TK,TKR,TKRD->TD", w_TxK, h_TxKxR, up_TxKxRxD)
