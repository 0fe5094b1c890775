"""Collisions (facts sharing an expert, the paper's failure mode) and the balance that reduces them.

`collision_report` counts experts shared by two or more facts; `fact_collisions`
reports it per MoME layer over the facts' answer positions. `balance_router`
sets a frozen per-sub-key selection bias that spreads the given tokens over the
sub-keys (auxiliary-loss-free load balancing), and `balance_facts` runs it layer
by layer on the facts; `whiten_facts`, before it, decorrelates the router's inputs.
`exclusive_slots` chooses the slots answer positions write so that no two write one
expert; `fires_at` says where a keyed expert would fire at other positions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.data import encoding
from lamini_jax.model import Transformer
from lamini_jax.mome.config import MomeConfig
from lamini_jax.mome.inputs import fact_inputs, fact_rows, layer_key, layer_paths, tree_get, tree_set
from lamini_jax.mome.layer import BALANCE, ROUTER, TABLE
from lamini_jax.mome.router import fragile_slots, route_jit, score_std, select_experts, whitened, zero_balance


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
  idx_TxK = np.asarray(idx_TxK)
  return [np.unique(idx_TxK[rows]) for rows in fact_rows(fact_T, num_facts)]


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
  n2 = cfg.grid[1]
  base_step = rate * score_std(router, x_TxD)  # never the whole [H, T, sqrt(N)] score tables
  heads_Ax1x1 = jnp.arange(cfg.num_heads)[:, None, None]

  def rebalance(bias_AxI, sub_AxTxM, step):
    counts_AxI = jnp.zeros(bias_AxI.shape).at[heads_Ax1x1, sub_AxTxM].add(1.0)
    return bias_AxI - step * jnp.sign(counts_AxI - counts_AxI.mean(axis=-1, keepdims=True))

  q_AxTxQ = jnp.einsum("TD,DAQ->ATQ", x_TxD, router["query"])

  def one_round(balance, r):
    step = base_step * (1.0 - r / rounds)
    e_AxTxM = select_experts(q_AxTxQ, router["keys1"], router["keys2"], cfg.top_k, balance)
    return {"bias1": rebalance(balance["bias1"], e_AxTxM // n2, step),
            "bias2": rebalance(balance["bias2"], e_AxTxM % n2, step)}, None

  balance, _ = jax.lax.scan(one_round, zero_balance(cfg), jnp.arange(rounds, dtype=jnp.float32))
  return balance


def collision_summary(report: CollisionReport) -> dict[str, Any]:
  """A `CollisionReport` as JSON-ready numbers."""
  return {"num_facts": report.num_facts, "experts_used": report.experts_used,
          "shared_experts": report.shared_experts,
          "facts_with_collision": report.facts_with_collision,
          "fraction_facts_with_collision": report.fraction_facts_with_collision,
          "pair_collisions": report.pair_collisions,
          "max_facts_per_expert": int(len(report.facts_per_expert_hist) - 1)}


def exclusive_slots(idx_PxK: np.ndarray, w_PxK: np.ndarray, n: int,
                    prefer_unread: bool = False, taken: np.ndarray | None = None,
                    read: np.ndarray | None = None, avoid: np.ndarray | None = None,
                    fragile: np.ndarray | None = None) -> np.ndarray:
  """bool [P, K]: n slots of each position (row) whose experts no other position writes, where it can.

  Positions in order each take n of their slots with distinct experts: first those whose
  expert no earlier position took, else the ones taken by the fewest; among those the
  best-weighted, or, with `prefer_unread`, first the experts the fewest positions select at
  all (a keyed expert that another position selects fires there too when the inputs are
  near, as those of one place in an answer are), then the best-weighted. Host-side, one pass.

  `taken`, `read` (expert indices, repeats counted): experts that positions outside
  `idx_PxK` already write, and select without writing (a stored memory, `mome.edit.add`);
  they count as taken, and read, before the first position. `avoid` (bool [P, K]): slots to
  take only after the others that are equally free (`mome.edit`: experts whose key would fire
  at a stored fact's answer position). `fragile` (bool [P, K], `router.fragile_slots`): slots
  that float rounding alone could drop from the selection; taken last of all, since a row
  written there may not be selected where the fact is asked.
  """
  idx_PxK = np.asarray(idx_PxK)
  if idx_PxK.shape != np.shape(w_PxK) or n < 1:
    raise ValueError(f"exclusive_slots: idx {idx_PxK.shape} and weights {np.shape(w_PxK)} must match,"
                     f" n={n} >= 1")
  best_PxK = np.argsort(-np.asarray(w_PxK, np.float64), axis=1, kind="stable")
  sorted_PxK = np.sort(idx_PxK, axis=1)
  once_PxK = np.ones(idx_PxK.shape, bool)
  once_PxK[:, 1:] = sorted_PxK[:, 1:] != sorted_PxK[:, :-1]
  outside = [np.asarray(a, np.int64).ravel() for a in (taken, read) if a is not None]
  size = max([int(idx_PxK.max(initial=-1))] + [int(a.max(initial=-1)) for a in outside]) + 1
  count = lambda a: np.bincount(np.asarray(a, np.int64).ravel(), minlength=size)
  demand_E = count(sorted_PxK[once_PxK])  # positions selecting each expert
  taken_E = count(() if taken is None else taken)  # positions writing each expert so far
  if not prefer_unread:
    demand_E = np.zeros_like(demand_E)
  elif outside:
    demand_E += taken_E + count(() if read is None else read)
  avoid_PxK = np.zeros(idx_PxK.shape, bool) if avoid is None else np.asarray(avoid, bool)
  fragile_PxK = np.zeros(idx_PxK.shape, bool) if fragile is None else np.asarray(fragile, bool)
  chosen_PxK = np.zeros(idx_PxK.shape, bool)
  for p in range(idx_PxK.shape[0]):
    experts = idx_PxK[p, best_PxK[p]]
    _, first = np.unique(experts, return_index=True)  # one slot per distinct expert
    slots = best_PxK[p, np.sort(first)]
    e = idx_PxK[p, slots]
    # Not fragile, then free, then not avoided, then the least selected; stable: ties keep the
    # weight order.
    pick = slots[np.lexsort((demand_E[e], avoid_PxK[p, slots], taken_E[e], fragile_PxK[p, slots]))[:n]]
    chosen_PxK[p, pick] = True
    taken_E[idx_PxK[p, pick]] += 1
  return chosen_PxK


def fires_at(x_PxD: np.ndarray, idx_PxK: np.ndarray, x_QxD: np.ndarray, idx_QxK: np.ndarray,
             match: float) -> np.ndarray:
  """bool [P, K]: whether some position q with idx_QxK[q] holding expert idx_PxK[p, k] has
  x_q . x_p > match |x_p|^2: where that expert, keyed to x_p alone (`table.key_rows`), would fire."""
  flat = idx_PxK.ravel()
  out = np.zeros(flat.size, bool)
  order = np.argsort(flat, kind="stable")
  q, k = np.nonzero(np.isin(idx_QxK, flat))
  lo = np.searchsorted(flat[order], idx_QxK[q, k], "left")
  count = np.searchsorted(flat[order], idx_QxK[q, k], "right") - lo
  # Every (q, slot of P) pair that shares an expert: q repeated, the slots in sorted order.
  pair_q = np.repeat(q, count)
  slot = order[np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())]
  x_P = np.asarray(x_PxD, np.float64)[slot // idx_PxK.shape[1]]
  dots = np.einsum("nd,nd->n", np.asarray(x_QxD, np.float64)[pair_q], x_P)
  out[slot[dots > match * np.einsum("nd,nd->n", x_P, x_P)]] = True
  return out.reshape(idx_PxK.shape)


def written_slots(idx_PxK: np.ndarray, w_PxK: np.ndarray, train_slots: int | None,
                  choice: str = "first", taken: np.ndarray | None = None,
                  read: np.ndarray | None = None, avoid: np.ndarray | None = None,
                  fragile: np.ndarray | None = None) -> np.ndarray:
  """bool [P, K]: the slots whose experts phase 2 writes (`MomeTuningConfig.train_slot_choice`);
  `taken`, `read`, `avoid`, `fragile`: as `exclusive_slots` takes them (the exclusive choices only)."""
  if choice in ("exclusive", "exclusive_unread"):
    return exclusive_slots(idx_PxK, w_PxK, train_slots or idx_PxK.shape[1], choice == "exclusive_unread",
                           taken, read, avoid, fragile)
  if choice != "first":
    raise ValueError(f"written_slots: choice={choice!r} is not 'first', 'exclusive' or 'exclusive_unread'")
  k = np.shape(idx_PxK)[1]
  return np.broadcast_to(np.arange(k) < (train_slots or k), np.shape(idx_PxK))


def choice_fragility(router: dict[str, Any], x_PxD: np.ndarray, cfg, balance: dict[str, Any] | None,
                     choice: str) -> np.ndarray | None:
  """`router.fragile_slots` where the slot choice is exclusive (None for "first": every slot in
  order, whatever its margin)."""
  return None if choice == "first" else fragile_slots(router, x_PxD, cfg, balance)


def fact_collisions(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                    inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
                    train_slots: int | None = None, slot_choice: str = "first") -> dict[str, dict[str, Any]]:
  """`collision_report` of each MoME layer over the facts' answer tokens.

  `train_slots`, `slot_choice`: only the experts of the slots phase 2 writes count
  (`written_slots`); "rows_per_fact" is the mean number of rows a fact writes,
  "rows_written" the rows written in all and "rows_shared" those written at two or
  more answer positions (of one fact or of several).

  Two facts collide when some expert is selected by an answer token of each.
  Layers after the first see the output of the earlier MoME layers, so this is
  the selection under `variables` (the start of memory tuning). `inputs`:
  `fact_inputs` of these variables, if already computed.
  """
  x, fact_P = inputs if inputs is not None else fact_inputs(model, variables, encoded)
  out = {}
  for path in layer_paths(model):
    name = layer_key(path)
    router, balance = tree_get(variables[ROUTER], path), tree_get(variables[BALANCE], path)
    idx, w = route_jit(router, jnp.asarray(x[name]), model.mome, balance)
    idx = np.asarray(idx)
    written_PxK = written_slots(idx, np.asarray(w), train_slots, slot_choice,
                                fragile=choice_fragility(router, x[name], model.mome, balance, slot_choice))
    per_fact = [e[e >= 0] for e in fact_experts(np.where(written_PxK, idx, -1), fact_P, len(encoded))]
    pos_P = np.broadcast_to(np.arange(len(idx))[:, None], idx.shape)[written_PxK]
    _, writers = np.unique(np.unique(np.stack([idx[written_PxK], pos_P]), axis=1)[0], return_counts=True)
    out[name] = {**collision_summary(collision_report(per_fact)),
                 "rows_per_fact": float(np.mean([len(e) for e in per_fact])),
                 "rows_written": int(writers.size), "rows_shared": int(np.sum(writers >= 2))}
  return out


def adds_zero(tables: Any) -> bool:
  """Whether every MoME layer outputs exactly 0 (all `up` rows zero, as initialized).

  A reduction where the table lives (sharded over `expert` on a mesh): only one bool per
  layer reaches the host, never the table.
  """
  return all(not bool(jnp.any(t["up"])) for t in jax.tree.leaves(
      tables, is_leaf=lambda n: isinstance(n, dict) and "up" in n))


def _layer_by_layer(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                    inputs: tuple[dict[str, np.ndarray], np.ndarray] | None, collection: str,
                    update: Callable[[tuple[str, ...], np.ndarray], Any]) -> Any:
  """`variables[collection]` with each layer's entry replaced by update(path, its answer inputs).

  Layer by layer in order, each on its inputs given the updates of the earlier layers
  (recomputed unless every layer adds 0, when all see the backbone alone).
  """
  out = variables[collection]
  fixed = adds_zero(variables[TABLE])
  for path in layer_paths(model):
    if inputs is None or not fixed:
      inputs = fact_inputs(model, {**variables, collection: out}, encoded)
    out = tree_set(out, path, update(path, inputs[0][layer_key(path)]))
  return out


def balance_facts(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                  rounds: int, rate: float,
                  inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
  """The "mome_balance" collection: `balance_router` on the facts' answer tokens, layer by layer."""
  return _layer_by_layer(model, variables, encoded, inputs, BALANCE, lambda path, x: balance_router(
      tree_get(variables[ROUTER], path), jnp.asarray(x), model.mome, rounds=rounds, rate=rate))


def whiten_facts(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
                 inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
  """The "mome_router" collection with each layer's query `router.whitened` on the facts' answer
  tokens, layer by layer (`mome.whiten`)."""
  return _layer_by_layer(model, variables, encoded, inputs, ROUTER,
                         lambda path, x: whitened(tree_get(variables[ROUTER], path), x))


def shared_rows_warning(collisions: dict[str, dict[str, Any]], num_experts: int,
                        choice: str) -> str | None:
  """A warning when an exclusive slot choice left table rows written at two or more answer positions.

  `collisions`: `fact_collisions` of the selection phase 2 trains (`prepare`'s "balanced", else
  "unbalanced"). Under `exclusive` and `exclusive_unread` a position shares a row only when it
  found no free expert to write among its K (`exclusive_slots`; docs/mome.md, "Capacity"): a
  table too small for the facts, or facts whose answer positions select the same few experts.
  None for "first", which writes every slot and shares rows by design, and when no row is shared.
  """
  if choice == "first":
    return None
  shared = {name: r for name, r in collisions.items() if r["rows_shared"]}
  if not shared:
    return None
  parts = [f"{name}: {r['rows_shared']:,} rows shared, {r['rows_written']:,} written in a table of"
           f" {num_experts:,} for {r['num_facts']:,} facts asking {r['rows_per_fact']:.1f} each"
           for name, r in shared.items()]
  return ("table rows written at two or more answer positions (where a position found no free"
          f" expert to write): {'; '.join(parts)}. Facts on shared rows can miss; a larger table"
          " (mome.layer.num_experts) or fewer rows a position (mome.train_slots) shares fewer")
