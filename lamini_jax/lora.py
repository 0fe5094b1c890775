"""LoRA adapters: configuration, and folding them into the base weights.

LoRA variables live in their own Flax collection, `"lora"`, beside the frozen
`"params"`; the optimizer only ever sees the `"lora"` tree. For a projection with
kernel W (any einsum layout) the adapter adds `scale * (x @ A) @ B`, with A over
W's input dimensions plus R, and B over R plus W's output dimensions. B starts at
zero, so step 0 reproduces the base model exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, alpha and target projections; `scale = alpha / rank`."""

  rank: int = 32
  alpha: float = 32.0
  targets: tuple[str, ...] = PROJECTIONS

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
    if self.alpha <= 0:
      raise ValueError(f"LoraConfig.alpha must be positive, got {self.alpha!r}")
    object.__setattr__(self, "targets", tuple(self.targets))
    bad = [t for t in self.targets if t not in PROJECTIONS]
    if bad or not self.targets:
      raise ValueError(
          f"LoraConfig.targets {list(self.targets)} invalid: choose from {', '.join(PROJECTIONS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_specs(eqn: str, rank: int) -> tuple[str, str, str]:
  """Splits a projection einsum `'<x>,<w>-><y>'` into the A and B einsums.

  Returns (a_eqn, b_eqn, r_letter) where A's kernel carries W's contracted
  letters then R, and B's kernel carries R then W's output letters.
  """
  del rank
  lhs, out = eqn.split("->")
  x_spec, w_spec = lhs.split(",")
  r = "R"
  if r in eqn:
    raise ValueError(f"einsum {eqn!r} already uses the letter R reserved for the adapter rank")
  contracted = "".join(c for c in w_spec if c not in out)
  free = "".join(c for c in w_spec if c in out)
  mid = "".join(c for c in x_spec if c not in contracted) + r
  return f"{x_spec},{contracted}{r}->{mid}", f"{mid},{r}{free}->{out}", r


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, eqn: str, scale: float) -> jax.Array:
  """W + scale * A @ B in W's layout and dtype (computed in float32)."""
  _, w_spec = eqn.split("->")[0].split(",")
  _, out = eqn.split("->")
  contracted = "".join(c for c in w_spec if c not in out)
  free = "".join(c for c in w_spec if c in out)
  delta = jnp.einsum(f"{contracted}R,R{free}->{contracted}{free}",
                     a.astype(jnp.float32), b.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  perm = [f"{contracted}{free}".index(c) for c in w_spec]
  delta = jnp.transpose(delta, perm)
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
