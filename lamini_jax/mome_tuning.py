"""Lamini-1 memory tuning: a Mixture of Memory Experts on a frozen backbone.

Two phases (paper section 7.1), both built on `train.fit`:

  1. generalization (`GeneralizationConfig`, skipped when `epochs = 0`): the
     router and the expert table of every MoME layer train on general text
     (corpus windows), the backbone frozen. The router gets a dense optax
     update (it is small); the table gets sparse row updates. The result is
     cached in the run directory (`mome/general`) and reused by every later
     call with the same configuration, so a resumed run never redoes it.
  2. memory tuning (`tune_mome`): the router is frozen (and, with `balance`,
     given a frozen selection bias from `mome.balance_router` that spreads the
     facts over the experts), so each fact selects the same experts on every
     step. A step differentiates only the gathered expert rows (the
     `"mome_delta"` collection), applies the per-row optimizer to those rows and
     their optimizer state, and writes them back into the donated table:
     unselected experts, the router and the backbone stay bit-for-bit unchanged.
     The loss is the token NLL plus, with `margin > 0`, `decision_hinge`, which
     asks greedy decoding to pick every trained token with some room.

Collisions (two facts sharing an expert, the paper's named failure mode) are
measured after phase 1 over each fact's answer tokens (`answer_positions`), per
MoME layer, with and without the balance, and stored with the run.

Run-directory layout (beside `train.fit`'s `metrics.jsonl` and
`checkpoints/<label>`): `mome/general/` the phase-1 router and table;
`mome/<label>/` the frozen router and balance of one memory-tuning run and its
collision report (`collisions.json`). `load_mome` rebuilds a trained model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from kernels.gather_apply import GatherApplyFn, gather_apply_reference
from lamini_jax import data as data_lib
from lamini_jax import mome
from lamini_jax import sharding
from lamini_jax import train as train_lib
from lamini_jax import yaml_config
from lamini_jax.checkpoint import Checkpointer
from lamini_jax.config import ModelConfig
from lamini_jax.model import Transformer

GENERAL_LABEL = "mome-general"
MOME_DIR = "mome"
COLLISIONS_FILE = "collisions.json"


@dataclasses.dataclass(frozen=True)
class GeneralizationConfig:
  """Phase 1: router and experts on general text. `epochs = 0` skips it.

  `corpus` is a text file, relative to the data directory unless absolute; it is
  cut into `windows` windows of `seq_len` tokens (`data.corpus_windows`).
  """

  epochs: int = 1
  corpus: str = "corpus/wikitext-2-valid.txt"
  windows: int = 256
  seq_len: int = 128
  batch_size: int = 32
  router_learning_rate: float = 1e-3
  expert_learning_rate: float = 1e-3

  def __post_init__(self):
    for name in ("windows", "seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"mome.generalization.{name} must be >= 1, got {getattr(self, name)}")
    if self.epochs < 0:
      raise ValueError(f"mome.generalization.epochs must be >= 0 (0 skips phase 1), got {self.epochs}")
    for name in ("router_learning_rate", "expert_learning_rate"):
      if not getattr(self, name) > 0:
        raise ValueError(f"mome.generalization.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Phase-2 anchors: text on which the MoME layers must stay silent. `weight = 0`: off.

  Each phase-2 step runs `batch_size` anchor sequences beside the facts and adds
  `weight` x the mean over their tokens of each MoME layer's squared output
  norm to the loss. The backbone is frozen and every MoME layer a residual
  branch, so a zero output on a text is the base model's behaviour on it: the
  penalty teaches a trained expert to answer its fact's positions and stay
  near zero on other text that selects it too (no expert gets trained by the
  anchors alone: they have no answer positions). Sources, cut or padded to
  `seq_len` tokens: `windows` windows of the `corpus` text file (relative to
  the data directory unless absolute; "" for none) and `questions` TruthfulQA
  questions with their best answers in the prompt template, taken from those
  neither trained nor held out (`data.spare_items`).
  """

  weight: float = 0.0
  batch_size: int = 16
  seq_len: int = 64
  corpus: str = "corpus/wikitext-2-valid.txt"
  windows: int = 256
  questions: int = 256

  def __post_init__(self):
    if self.weight < 0:
      raise ValueError(f"mome.anchor.weight must be >= 0, got {self.weight}")
    for name in ("batch_size", "seq_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"mome.anchor.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("windows", "questions"):
      if getattr(self, name) < 0:
        raise ValueError(f"mome.anchor.{name} must be >= 0, got {getattr(self, name)}")
    if self.weight and not (self.windows and self.corpus) and not self.questions:
      raise ValueError("mome.anchor.weight > 0 needs anchor text: mome.anchor.windows with a"
                       " corpus, or mome.anchor.questions")


TRAIN_POSITIONS = ("answer", "all")

_DEFAULT_TRAIN = train_lib.TrainConfig(
    epochs=20, batch_size=32, seq_len=192, checkpoint_every=50,
    optimizer=train_lib.OptimizerConfig(learning_rate=0.1, multiply_by_parameter_scale=False))


@dataclasses.dataclass(frozen=True)
class MomeTuningConfig:
  """The `mome:` section of a run: MoME layers, both phases, collision mitigation.

  The layer fields are those of `mome.MomeConfig` (its `embed_dim` is the
  backbone's width). With several layers, a later layer's router sees the
  output of the earlier MoME layers, so in phase 2 only the first layer's
  selection is fixed exactly; later layers' inputs move as the earlier
  experts train (their router weights stay frozen).
  `balance` turns on `mome.balance_router` before phase 2 (collision
  mitigation). `margin` adds `decision_hinge` to the phase-2 loss (0: cross-
  entropy only). `train` is phase 2: its optimizer is applied per expert row
  (keep Adafactor's `multiply_by_parameter_scale` off, since `up` starts at 0).
  `recall_every`: epochs between exact-match recall checks in experiments.
  `train_positions`: "answer" (phase 2 trains only the experts selected at the
  positions that predict a trained token, `answer_positions`; the experts of
  prompt tokens, which general text selects too, stay as they were) or "all".
  `anchor`: the phase-2 penalty that keeps the MoME silent on other text.
  `key_match` (0: off; needs `threshold` > 0): before phase 2, the experts of
  the facts' answer positions are keyed to them (`mome.key_rows`), so that an
  expert fires only on inputs that project onto its facts' mean input at
  least `key_match` of its length; other text that selects it leaves it silent.
  """

  layers: tuple[int, ...] = (3, 4)
  num_experts: int = 2**18
  expert_rank: int = 1
  num_heads: int = 8
  key_dim: int = 32
  top_k: int = 2
  activation: str = "gelu"
  threshold: float = 0.0
  key_match: float = 0.0
  balance: bool = True
  balance_rounds: int = 30
  balance_rate: float = 0.15
  margin: float = 1.0
  recall_every: int = 2
  train_positions: str = "answer"
  seed: int = 0
  generalization: GeneralizationConfig = GeneralizationConfig()
  anchor: AnchorConfig = AnchorConfig()
  train: train_lib.TrainConfig = _DEFAULT_TRAIN

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
      raise ValueError(f"mome.layers must be distinct non-negative layer indices, got {list(self.layers)}")
    if self.margin < 0 or self.recall_every < 0:
      raise ValueError(f"mome.margin={self.margin} and mome.recall_every={self.recall_every} must be >= 0")
    if self.balance_rounds < 0 or self.balance_rate < 0:
      raise ValueError(f"mome.balance_rounds={self.balance_rounds} and mome.balance_rate="
                       f"{self.balance_rate} must be >= 0")
    if self.train_positions not in TRAIN_POSITIONS:
      raise ValueError(f"mome.train_positions must be one of {list(TRAIN_POSITIONS)}, got"
                       f" {self.train_positions!r}")
    self.layer_config(2)  # validates the layer fields
    if self.key_match and not (0 < self.key_match < 1 and self.threshold > 0):
      raise ValueError(f"mome.key_match={self.key_match} must be in (0, 1) with mome.threshold > 0"
                       f" (got threshold={self.threshold}); 0 turns keying off")

  def layer_config(self, embed_dim: int) -> mome.MomeConfig:
    try:
      return mome.MomeConfig(
          num_experts=self.num_experts, embed_dim=embed_dim, expert_rank=self.expert_rank,
          num_heads=self.num_heads, key_dim=self.key_dim, top_k=self.top_k,
          activation=self.activation, threshold=self.threshold)
    except ValueError as e:
      raise ValueError(f"mome: {e}") from None

  def phase1_key(self) -> str:
    """What the phase-1 result depends on (its cache is reused only when this matches)."""
    fields = ("layers", "num_experts", "expert_rank", "num_heads", "key_dim", "top_k", "activation",
              "threshold", "seed", "generalization")
    return json.dumps({k: yaml_config.to_dict(getattr(self, k)) for k in fields}, sort_keys=True)


# ----------------------------------------------------------------------------
# Model and variables.
# ----------------------------------------------------------------------------


def mome_model(cfg: ModelConfig, spec: MomeTuningConfig, *, mesh: Mesh | None = None,
               gather_apply: GatherApplyFn = gather_apply_reference) -> Transformer:
  """The backbone with a MoME residual branch at `spec.layers`."""
  bad = [i for i in spec.layers if i >= cfg.num_layers]
  if bad:
    raise ValueError(f"mome.layers {list(spec.layers)}: layer {bad[0]} is outside 0..{cfg.num_layers - 1}"
                     " of the backbone")
  return Transformer(cfg, mome=spec.layer_config(cfg.hidden_size), mome_layers=tuple(spec.layers),
                     mome_gather_apply=gather_apply, mome_mesh=mesh)


def _mome_collections(model: Transformer, key: jax.Array) -> dict[str, Any]:
  # Only the MoME collections are returned, so XLA drops the backbone initializers.
  variables = model.clone(mome_mesh=None).init({"params": key}, jnp.zeros((1, 1), jnp.int32))
  return {c: variables[c] for c in (mome.ROUTER, mome.BALANCE, mome.TABLE)}


def init_mome(model: Transformer, seed: int, mesh: Mesh | None = None,
              zero_down: bool = False) -> dict[str, Any]:
  """Fresh router, zero balance and table (up = 0) of every MoME layer.

  With a mesh, each leaf is created directly with its sharding (the table split
  over `expert`, the rest replicated); the table never exists on one device.
  `zero_down`: down = 0 as well, and its N x D normals are never drawn (XLA
  drops them). For keyed experts without phase 1 (`generalize`): the rows the
  facts select are keyed before phase 2; any other row computes act(-threshold),
  0 with "relu" and no gradient for its up, so an expert that only a later
  layer's moving input selects in phase 2 stays silent (a random down could fire).
  """
  key = jax.random.key(seed)

  def init(k):
    fresh = nn.meta.unbox(_mome_collections(model, k))
    if zero_down:
      fresh[mome.TABLE] = mome.map_layers(lambda t: {**t, "down": jnp.zeros_like(t["down"])},
                                          fresh[mome.TABLE])
    return fresh
  if mesh is None:
    return jax.jit(init)(key)
  specs = nn.get_partition_spec(jax.eval_shape(lambda k: _mome_collections(model, k), key))
  shardings = sharding.shardings_for(specs, mesh)
  out = jax.jit(init, out_shardings=shardings)(key)
  sharding.check_expert_sharded(out[mome.TABLE], mesh)
  return out


def init_row_state(tables: Any, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> Any:
  """Per-expert optimizer state of every MoME layer (leading axis N, row-sharded on a mesh)."""
  return mome.map_layers(lambda t: mome.init_expert_opt_state(t, tx, mesh), tables)


def _replicate(tree: Any, mesh: Mesh | None) -> Any:
  return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------
# Train steps.
# ----------------------------------------------------------------------------


def _metrics(loss, row_sum, row_count):
  return {"loss": loss, "row_sum": row_sum, "row_count": row_count}


def output_rows(cfg: ModelConfig, params: Any) -> jax.Array:
  """[V, D]: logits = output_rows @ normalized final hidden state (final-norm scale folded in)."""
  scale_D = params["final_norm"]["scale"].astype(jnp.float32)
  if cfg.tie_word_embeddings:
    return params["embedding"].astype(jnp.float32) * scale_D
  return params["lm_head"].astype(jnp.float32).T * scale_D


def decision_hinge(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, mask_BxT: jax.Array,
                   rows_VxD: jax.Array, margin: float) -> jax.Array:
  """Mean over targets of relu(margin - distance to the greedy decision boundary).

  The distance is measured in the space of the normalized final hidden state
  (RMS 1): (logit of the target - best other logit) / |row_target - row_other|.
  It is zero once greedy decoding picks every target with that much room, and
  its gradient is a unit push per target whatever the logit scale, so targets
  whose output row nearly equals others' (an EOS row that was never trained)
  are learned as fast as any other.
  """
  logits = logits_BxTxV[:, :-1].astype(jnp.float32)
  target_BxT = tokens_BxT[:, 1:]
  is_target = jax.nn.one_hot(target_BxT, logits.shape[-1], dtype=bool)
  other_BxT = jnp.argmax(jnp.where(is_target, -jnp.inf, logits), axis=-1)
  gap_BxT = (jnp.take_along_axis(logits, target_BxT[..., None], axis=-1)[..., 0]
             - jnp.take_along_axis(logits, other_BxT[..., None], axis=-1)[..., 0])
  dist_BxT = jnp.linalg.norm(rows_VxD[target_BxT] - rows_VxD[other_BxT], axis=-1)
  dist_BxT = jax.lax.stop_gradient(jnp.maximum(dist_BxT, 1e-12))
  mask = mask_BxT[:, 1:].astype(jnp.float32)
  return jnp.sum(jax.nn.relu(margin - gap_BxT / dist_BxT) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def focus_positions(mask_BxT: jax.Array) -> jax.Array:
  """[B, T] bool: the positions that predict a trained token (t where mask[t + 1] > 0)."""
  return jnp.pad(mask_BxT[:, 1:] > 0, ((0, 0), (0, 1)))


def _focus(model: Transformer, mask_BxT: jax.Array) -> dict[str, Any]:
  focus = focus_positions(mask_BxT)
  tree: dict[str, Any] = {}
  for path in layer_paths(model):
    tree = _set(tree, path, {"mask": focus})
  return {mome.FOCUS: tree}


def focus_rows(encoded: Sequence[data_lib.EncodedFact], batch_size: int, spec: MomeTuningConfig) -> int:
  """Rows a phase-2 step with `train_positions="answer"` gathers per layer: a bound that holds.

  A batch has at most batch_size * (most trained tokens of one fact) focus
  positions, each selecting K experts, plus the padding index; and there are
  only N + 1 distinct indices.
  """
  most = max(int(np.count_nonzero(e.loss_mask[1:])) for e in encoded)
  cfg = spec.layer_config(2)
  return min(batch_size * most * cfg.slots, cfg.num_experts) + 1


ANCHOR = "anchor"  # key of the anchor sequences in a phase-2 step's `frozen`


def _pad_to(a_BxT: jax.Array, width: int, value) -> jax.Array:
  return jnp.pad(a_BxT, ((0, 0), (0, width - a_BxT.shape[1])), constant_values=value)


def anchor_penalty(outs: Any, mask_GxL: jax.Array) -> jax.Array:
  """Sum over MoME layers of the mean squared output norm over the anchor tokens.

  `outs` is the "mome_out" collection of a step whose last G rows are anchors;
  mask_GxL marks their real tokens (positions past L are padding).
  """
  g, length = mask_GxL.shape
  total = jnp.zeros((), jnp.float32)
  for y_BxTxD in jax.tree.leaves(outs):
    sq_GxL = jnp.sum(jnp.square(y_BxTxD[-g:, :length].astype(jnp.float32)), axis=-1)
    total = total + jnp.sum(sq_GxL * mask_GxL) / jnp.maximum(jnp.sum(mask_GxL), 1.0)
  return total


def anchor_sequences(tokenizer, template: data_lib.PromptTemplate, cfg: AnchorConfig,
                     questions: Sequence[tuple[str, str]], corpus_path=None, *,
                     pad_id: int) -> dict[str, np.ndarray]:
  """{"tokens": [A, L] int32, "mask": [A, L] float32}: the anchor pool of `make_tuning_step`.

  Corpus windows of `corpus_path` (a text file; None: none) and the (question,
  answer) pairs in the template, each cut or right-padded to L = cfg.seq_len;
  the mask marks real tokens.
  """
  length = cfg.seq_len
  seqs: list[np.ndarray] = []
  if corpus_path is not None and cfg.windows:
    seqs += list(data_lib.corpus_windows(tokenizer, corpus_path, length - 1, cfg.windows))
  if questions:
    facts = [data_lib.Fact(q, a, f"anchor {i}") for i, (q, a) in enumerate(questions)]
    encoded = data_lib.encode_facts(tokenizer, template, facts, max_len=10**9)
    seqs += [e.tokens[:length] for e in encoded]
  if not seqs:
    raise ValueError("anchor_sequences: no anchor text (no corpus windows and no questions)")
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.float32)
  for i, seq in enumerate(seqs):
    tokens[i, :len(seq)], mask[i, :len(seq)] = seq, 1.0
  return {"tokens": tokens, "mask": mask}


def make_tuning_step(model: Transformer, tx: optax.GradientTransformation,
                     mesh: Mesh | None = None, margin: float = 0.0,
                     train_positions: str = "answer", rows: int | None = None,
                     anchor: AnchorConfig | None = None, train_down: bool = True) -> Callable:
  """Phase 2, jitted with the state donated: sparse row updates of the expert tables.

  `train_down=False` trains `up` only (the down rows of keyed experts are their keys).

  `frozen` holds "params" (backbone), "mome_router" and "mome_balance"; the
  state's `trainable` is the "mome" collection, its `opt_state` the per-row
  optimizer state. Only the gathered rows ("mome_delta") are differentiated.
  With `train_positions="answer"` those are the experts of the positions that
  predict a trained token ("mome_focus"), at most `rows` per layer
  (`focus_rows`; default tokens * K). A batch with more focus positions than
  `rows` allows gets a NaN loss, which `train.fit` reports, never a silently
  partial update.

  With an `anchor` of positive weight, `frozen` also holds "anchor" (`anchor_sequences`:
  tokens and mask [A, L]); step s adds anchors s * G .. s * G + G - 1 (mod A) as
  extra rows and `anchor.weight * anchor_penalty` to the objective. The
  reported loss stays the facts' token NLL.
  """
  slots = model.mome.slots
  focused = train_positions == "answer"
  anchored = anchor is not None and anchor.weight > 0

  def loss_fn(deltas, tables, frozen, tokens_BxT, mask_BxT, anchor_mask_GxL):
    # Rows past the first b are anchors (mask 0: no loss, no answer positions).
    b = tokens_BxT.shape[0] - (0 if anchor_mask_GxL is None else anchor_mask_GxL.shape[0])
    focus = _focus(model, mask_BxT) if focused else {}
    (logits, _), aux = model.apply({**frozen, **focus, mome.TABLE: tables, mome.DELTA: deltas},
                                   tokens_BxT, mutable=[mome.UNIQ, mome.OUT])
    objective, nll = _objective(model, frozen, logits[:b], tokens_BxT[:b], mask_BxT[:b], margin)
    if anchor_mask_GxL is not None:
      objective = objective + anchor.weight * anchor_penalty(aux[mome.OUT], anchor_mask_GxL)
    return objective, (*nll, aux[mome.UNIQ])

  def step(state: train_lib.TrainState, frozen, tokens_BxT, mask_BxT):
    anchor_mask_GxL, all_tokens, all_mask = None, tokens_BxT, mask_BxT
    if anchored:
      frozen = dict(frozen)
      pool = frozen.pop(ANCHOR)
      pick_G = (state.step * anchor.batch_size + jnp.arange(anchor.batch_size)) % pool["tokens"].shape[0]
      a_tokens_GxL, anchor_mask_GxL = pool["tokens"][pick_G], pool["mask"][pick_G]
      width = max(tokens_BxT.shape[1], a_tokens_GxL.shape[1])
      all_tokens = jnp.concatenate([_pad_to(tokens_BxT, width, 0), _pad_to(a_tokens_GxL, width, 0)])
      all_mask = jnp.concatenate([_pad_to(mask_BxT, width, 0),
                                  jnp.zeros((anchor.batch_size, width), mask_BxT.dtype)])
    num_rows = all_tokens.size * slots if rows is None or not focused else rows
    deltas = mome.zero_deltas(state.trainable, num_rows)
    (_, (loss, row_sum, row_count, uniqs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        deltas, state.trainable, frozen, all_tokens, all_mask, anchor_mask_GxL)
    if not train_down:  # keyed experts: down is the key, only up learns
      grads = mome.map_layers(lambda g: {**g, "down": jnp.zeros_like(g["down"])}, grads)
    tables, opt_state = mome.sparse_step_layers(state.trainable, state.opt_state, grads, uniqs,
                                                tx=tx, mesh=mesh)
    new_state = state.replace(step=state.step + 1, trainable=tables, opt_state=opt_state)
    if focused:
      needed = jnp.minimum(jnp.sum(focus_positions(mask_BxT)) * slots, model.mome.num_experts) + 1
      overflow = needed > num_rows
      loss, row_sum = (jnp.where(overflow, jnp.nan, a) for a in (loss, row_sum))
    return new_state, _metrics(loss, row_sum, row_count)

  return jax.jit(step, donate_argnums=0)


def _objective(model: Transformer, frozen, logits_BxTxV, tokens_BxT, mask_BxT, margin: float):
  """(objective, (mean NLL, per-row NLL sums, per-row counts)): NLL plus the optional hinge."""
  loss, row_sum, row_count = train_lib.token_nll(logits_BxTxV, tokens_BxT, mask_BxT)
  objective = loss
  if margin:
    rows_VxD = output_rows(model.cfg, frozen["params"])
    objective = loss + decision_hinge(logits_BxTxV, tokens_BxT, mask_BxT, rows_VxD, margin)
  return objective, (loss, row_sum, row_count)


def make_dense_tuning_step(model: Transformer, tx: optax.GradientTransformation,
                           margin: float = 0.0) -> Callable:
  """Phase 2 with a dense [N, ...] table gradient and the optimizer on all rows (the baseline)."""

  def loss_fn(tables, frozen, tokens_BxT, mask_BxT):
    logits, _ = model.apply({**frozen, mome.TABLE: tables}, tokens_BxT)
    return _objective(model, frozen, logits, tokens_BxT, mask_BxT, margin)

  def step(state: train_lib.TrainState, frozen, tokens_BxT, mask_BxT):
    (_, (loss, row_sum, row_count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.trainable, frozen, tokens_BxT, mask_BxT)
    dense = lambda t, s, g: mome.dense_step(t, s, g, tx=tx)
    pairs = mome.map_layers(dense, state.trainable, state.opt_state, grads)
    tables = mome.map_layers(lambda t, p: p[0], state.trainable, pairs)
    opt_state = mome.map_layers(lambda t, p: p[1], state.trainable, pairs)
    new_state = state.replace(step=state.step + 1, trainable=tables, opt_state=opt_state)
    return new_state, _metrics(loss, row_sum, row_count)

  return jax.jit(step, donate_argnums=0)


def make_generalization_step(model: Transformer, router_tx: optax.GradientTransformation,
                             row_tx: optax.GradientTransformation, mesh: Mesh | None = None) -> Callable:
  """Phase 1: dense update of the router, sparse row updates of the tables.

  The state's `trainable` is {"router": "mome_router", "table": "mome"}; `frozen`
  holds "params" and "mome_balance".
  """
  slots = model.mome.slots

  def loss_fn(router, deltas, tables, frozen, tokens_BxT, mask_BxT):
    variables = {**frozen, mome.ROUTER: router, mome.TABLE: tables, mome.DELTA: deltas}
    (logits, _), aux = model.apply(variables, tokens_BxT, mutable=[mome.UNIQ])
    loss, row_sum, row_count = train_lib.token_nll(logits, tokens_BxT, mask_BxT)
    return loss, (row_sum, row_count, aux[mome.UNIQ])

  def step(state: train_lib.TrainState, frozen, tokens_BxT, mask_BxT):
    router, tables = state.trainable["router"], state.trainable["table"]
    deltas = mome.zero_deltas(tables, tokens_BxT.size * slots)
    (loss, (row_sum, row_count, uniqs)), (g_router, g_rows) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(router, deltas, tables, frozen, tokens_BxT, mask_BxT)
    updates, router_state = router_tx.update(g_router, state.opt_state["router"], router)
    router = optax.apply_updates(router, updates)
    tables, row_state = mome.sparse_step_layers(tables, state.opt_state["table"], g_rows, uniqs,
                                                tx=row_tx, mesh=mesh)
    new_state = state.replace(step=state.step + 1, trainable={"router": router, "table": tables},
                              opt_state={"router": router_state, "table": row_state})
    return new_state, _metrics(loss, row_sum, row_count)

  return jax.jit(step, donate_argnums=0)


def _state(trainable: Any, opt_state: Any, seed: int) -> train_lib.TrainState:
  return train_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=opt_state,
                              rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)))


def tuning_state(tables: Any, tx: optax.GradientTransformation, seed: int,
                 mesh: Mesh | None = None) -> train_lib.TrainState:
  """Phase-2 train state: a copy of the tables (the state is donated) and fresh row state."""
  tables = jax.tree.map(jnp.copy, tables)
  return _state(tables, init_row_state(tables, tx, mesh), seed)


# ----------------------------------------------------------------------------
# Phase 1.
# ----------------------------------------------------------------------------


def windows_as_facts(windows_WxL: np.ndarray) -> list[data_lib.EncodedFact]:
  """Corpus windows as training sequences: every token but the first is a target."""
  mask = np.ones(windows_WxL.shape[1], bool)
  mask[0] = False
  return [data_lib.EncodedFact(np.asarray(w, np.int32), mask.copy()) for w in windows_WxL]


def generalize(model: Transformer, params: Any, spec: MomeTuningConfig, windows_WxL: np.ndarray | None,
               *, pad_id: int, run_dir=None, resume: bool = False, progress: bool = True,
               mesh: Mesh | None = None) -> tuple[dict[str, Any], float]:
  """Phase 1; returns ({"mome_router": ..., "mome": ...}, seconds spent here).

  With `run_dir`, a finished phase 1 of the same configuration (`mome/general`)
  is restored instead of recomputed; a different one there is an error.
  """
  t0 = time.perf_counter()
  g = spec.generalization
  fresh = init_mome(model, spec.seed, mesh, zero_down=bool(spec.key_match) and g.epochs == 0)
  result = {mome.ROUTER: fresh[mome.ROUTER], mome.TABLE: fresh[mome.TABLE]}
  if g.epochs == 0:
    return result, time.perf_counter() - t0
  cache = None
  if run_dir is not None:
    cache = Checkpointer(pathlib.Path(run_dir) / MOME_DIR / "general", every=0)
    restored = cache.restore(result)
    if restored is not None:
      cache.close()
      if restored[1].get("config") != spec.phase1_key():
        raise ValueError(f"{run_dir}/{MOME_DIR}/general holds phase 1 of another MoME configuration;"
                         " use another run_dir")
      return restored[0], time.perf_counter() - t0
  if windows_WxL is None:
    raise ValueError("mome.generalization.epochs > 0 needs corpus windows (general_windows)")
  router_tx = optax.adafactor(g.router_learning_rate, multiply_by_parameter_scale=False)
  row_tx = optax.adafactor(g.expert_learning_rate, multiply_by_parameter_scale=False)
  trainable = {"router": result[mome.ROUTER], "table": jax.tree.map(jnp.copy, result[mome.TABLE])}
  state = _state(trainable, {"router": router_tx.init(trainable["router"]),
                             "table": init_row_state(trainable["table"], row_tx, mesh)}, spec.seed)
  frozen = _replicate({"params": params, mome.BALANCE: fresh[mome.BALANCE]}, mesh)
  train_cfg = train_lib.TrainConfig(
      epochs=g.epochs, batch_size=g.batch_size, seq_len=windows_WxL.shape[1], seed=spec.seed,
      checkpoint_every=spec.train.checkpoint_every)
  step = make_generalization_step(model, router_tx, row_tx, mesh)
  fit = train_lib.fit(step, state, frozen, windows_as_facts(windows_WxL), train_cfg, pad_id=pad_id,
                      label=GENERAL_LABEL, run_dir=run_dir, resume=resume, progress=progress)
  result = {mome.ROUTER: fit.state.trainable["router"], mome.TABLE: fit.state.trainable["table"]}
  if cache is not None:
    cache.save(int(fit.state.step), result, {"config": spec.phase1_key()})
    cache.close()
  return result, time.perf_counter() - t0


# ----------------------------------------------------------------------------
# Routing of the facts: collisions and balance.
# ----------------------------------------------------------------------------


def layer_paths(model: Transformer) -> list[tuple[str, ...]]:
  """Paths of the MoME layers inside the MoME collections, in layer order."""
  return [(f"layers_{i}", "mome") for i in sorted(model.mome_layers)]


def _layer_key(path: Sequence[str]) -> str:
  return "/".join(path)


def _get(tree: dict, path: Sequence[str]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> dict:
  if not path:
    return value
  return {**tree, path[0]: _set(tree.get(path[0], {}), path[1:], value)}


def mome_inputs(model: Transformer, variables: Any, tokens_BxT: jax.Array) -> dict[str, jax.Array]:
  """The input [B, T, D] of every MoME layer (what its router sees), by layer path."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, mome.MomeLayer) and context.method_name == "__call__":
      captured[_layer_key(context.module.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, tokens_BxT)
  return captured


_mome_inputs = jax.jit(mome_inputs, static_argnums=0)
_route = jax.jit(mome.route, static_argnums=2)


def answer_positions(encoded: Sequence[data_lib.EncodedFact]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [F, T], positions [F, T] bool): the positions that produce each fact's answer.

  Position t is marked when token t + 1 is trained (an answer token, the answer
  end or EOS): the last prompt token through the last answer token. The last
  prompt token, where the question is summed up, is the one that picks the
  first answer token.
  """
  seq_len = -(-max(len(e.tokens) for e in encoded) // 32) * 32
  tokens, mask = data_lib.stack_encoded(encoded, seq_len, 0)
  pred = np.zeros(mask.shape, bool)
  pred[:, :-1] = mask[:, 1:] > 0
  return tokens, pred


def fact_inputs(model: Transformer, variables: Any, encoded: Sequence[data_lib.EncodedFact],
                batch_size: int = 32) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Each MoME layer's input at the facts' answer positions [P, D], and their fact index [P]."""
  tokens, pred = answer_positions(encoded)
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(encoded), batch_size):
    block = tokens[start:start + batch_size]
    n = len(block)
    x = _mome_inputs(model, variables, jnp.asarray(np.pad(block, ((0, batch_size - n), (0, 0)))))
    for name, x_BxTxD in x.items():
      chunks.setdefault(name, []).append(np.asarray(x_BxTxD)[:n][pred[start:start + n]])
  return {name: np.concatenate(c) for name, c in chunks.items()}, np.nonzero(pred)[0]


def collision_summary(report: mome.CollisionReport) -> dict[str, Any]:
  """A `mome.CollisionReport` as JSON-ready numbers."""
  return {"num_facts": report.num_facts, "experts_used": report.experts_used,
          "shared_experts": report.shared_experts,
          "facts_with_collision": report.facts_with_collision,
          "fraction_facts_with_collision": report.fraction_facts_with_collision,
          "pair_collisions": report.pair_collisions,
          "max_facts_per_expert": int(len(report.facts_per_expert_hist) - 1)}


def fact_collisions(model: Transformer, variables: Any, encoded: Sequence[data_lib.EncodedFact],
                    inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
                    ) -> dict[str, dict[str, Any]]:
  """`mome.collision_report` of each MoME layer over the facts' answer tokens.

  Two facts collide when some expert is selected by an answer token of each.
  Layers after the first see the output of the earlier MoME layers, so this is
  the selection under `variables` (the start of memory tuning). `inputs`:
  `fact_inputs` of these variables, if already computed.
  """
  x, fact_P = inputs if inputs is not None else fact_inputs(model, variables, encoded)
  out = {}
  for path in layer_paths(model):
    name = _layer_key(path)
    idx, _ = _route(_get(variables[mome.ROUTER], path), jnp.asarray(x[name]), model.mome,
                    _get(variables[mome.BALANCE], path))
    out[name] = collision_summary(mome.collision_report(
        mome.fact_experts(np.asarray(idx), fact_P, len(encoded))))
  return out


def _adds_zero(tables: Any) -> bool:
  """Whether every MoME layer outputs exactly 0 (all `up` rows zero, as initialized)."""
  return all(not np.any(np.asarray(t["up"])) for t in jax.tree.leaves(
      tables, is_leaf=lambda n: isinstance(n, dict) and "up" in n))


def balance(model: Transformer, variables: Any, encoded: Sequence[data_lib.EncodedFact],
            rounds: int, rate: float,
            inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
  """The "mome_balance" collection: `mome.balance_router` on the facts' answer tokens.

  Layer by layer in order, each on its inputs given the balance of the earlier
  layers (recomputed unless every layer adds 0, when all see the backbone alone).
  """
  bias = variables[mome.BALANCE]
  fixed = _adds_zero(variables[mome.TABLE])
  for path in layer_paths(model):
    if inputs is None or not fixed:
      inputs = fact_inputs(model, {**variables, mome.BALANCE: bias}, encoded)
    layer_bias = mome.balance_router(_get(variables[mome.ROUTER], path),
                                     jnp.asarray(inputs[0][_layer_key(path)]), model.mome,
                                     rounds=rounds, rate=rate)
    bias = _set(bias, path, layer_bias)
  return bias


def key_experts(model: Transformer, variables: Any, encoded: Sequence[data_lib.EncodedFact],
                match: float, inputs: tuple[dict[str, np.ndarray], np.ndarray] | None = None) -> Any:
  """The "mome" collection with each layer's answer-position experts keyed (`mome.key_rows`).

  Layer by layer in order, each keyed to its inputs at the start of phase 2
  given the keys of the earlier layers (recomputed unless every layer adds 0,
  as before phase 2 without phase 1); `inputs`: `fact_inputs` of `variables`,
  if already computed. The layer tables of `variables` are donated.
  """
  tables = variables[mome.TABLE]
  fixed = _adds_zero(tables)
  x = None if inputs is None else inputs[0]
  for path in layer_paths(model):
    if x is None or not fixed:
      x, _ = fact_inputs(model, {**variables, mome.TABLE: tables}, encoded)
    name = _layer_key(path)
    idx, _ = _route(_get(variables[mome.ROUTER], path), jnp.asarray(x[name]), model.mome,
                    _get(variables[mome.BALANCE], path))
    tables = _set(tables, path, mome.key_rows(_get(tables, path), np.asarray(idx), x[name],
                                              model.mome, match))
  return tables


# ----------------------------------------------------------------------------
# Both phases.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
  """A MoME model ready for memory tuning: phase 1 done, router frozen.

  `frozen` holds "params", "mome_router" and "mome_balance"; `table` is the
  starting "mome" collection; `collisions` maps "unbalanced" (and, with
  balance, "balanced") to each layer's collision figures.
  """

  model: Transformer
  frozen: dict[str, Any]
  table: Any
  collisions: dict[str, Any]
  generalization_seconds: float
  seconds: float  # all of `prepare`, phase 1 included

  def variables(self, table: Any) -> dict[str, Any]:
    return {**self.frozen, mome.TABLE: table}

  def variables_of(self, state: train_lib.TrainState) -> dict[str, Any]:
    """Model variables for a phase-2 train state (for `memory_tuning.recall_callback`)."""
    return self.variables(state.trainable)


def _frozen_store(run_dir, label: str) -> pathlib.Path:
  return pathlib.Path(run_dir) / MOME_DIR / label


def prepare(cfg: ModelConfig, params: Any, encoded: Sequence[data_lib.EncodedFact],
            spec: MomeTuningConfig, *, pad_id: int, general_windows: np.ndarray | None = None, run_dir=None, label: str = "mome",
            resume: bool = False, progress: bool = True, mesh: Mesh | None = None,
            gather_apply: GatherApplyFn = gather_apply_reference) -> Prepared:
  """Phase 1 (or its cache), the optional balance, and the collision report of the facts.

  With `run_dir`, the frozen router and balance are written to `mome/<label>`
  with the collision report, and restored from there on resume.
  """
  t0 = time.perf_counter()
  model = mome_model(cfg, spec, mesh=mesh, gather_apply=gather_apply)
  general, general_seconds = generalize(
      model, params, spec, general_windows, pad_id=pad_id, run_dir=run_dir, resume=resume,
      progress=progress, mesh=mesh)
  zero_bias = {}
  for path in layer_paths(model):
    zero_bias = _set(zero_bias, path, mome.zero_balance(model.mome))
  variables = {"params": params, mome.ROUTER: general[mome.ROUTER],
               mome.BALANCE: _replicate(zero_bias, mesh), mome.TABLE: general[mome.TABLE]}
  store = None if run_dir is None else _frozen_store(run_dir, label)
  restored, inputs = None, None
  if store is not None and resume and (store / COLLISIONS_FILE).is_file():
    ckpt = Checkpointer(store / "router", every=0)
    restored = ckpt.restore({mome.ROUTER: variables[mome.ROUTER], mome.BALANCE: variables[mome.BALANCE]})
    ckpt.close()
  if restored is not None:
    variables.update(restored[0])
    collisions = json.loads((store / COLLISIONS_FILE).read_text())
  else:
    plain = model.clone(mome_mesh=None)  # one host-side pass over the facts: no mesh needed
    inputs = fact_inputs(plain, variables, encoded)
    collisions = {"unbalanced": fact_collisions(plain, variables, encoded, inputs)}
    if spec.balance:
      variables[mome.BALANCE] = balance(plain, variables, encoded, spec.balance_rounds,
                                        spec.balance_rate, inputs)
      if not _adds_zero(variables[mome.TABLE]):
        inputs = None
      collisions["balanced"] = fact_collisions(plain, variables, encoded, inputs)
    if store is not None:
      ckpt = Checkpointer(store / "router", every=0)
      ckpt.save(0, {mome.ROUTER: variables[mome.ROUTER], mome.BALANCE: variables[mome.BALANCE]},
                {"label": label})
      ckpt.close()
      (store / COLLISIONS_FILE).write_text(json.dumps(collisions, indent=2) + "\n")
  if spec.key_match:
    variables[mome.TABLE] = key_experts(model.clone(mome_mesh=None), variables, encoded,
                                        spec.key_match, inputs)
  frozen = _replicate({k: variables[k] for k in ("params", mome.ROUTER, mome.BALANCE)}, mesh)
  return Prepared(model, frozen, variables[mome.TABLE], collisions, general_seconds,
                  time.perf_counter() - t0)


def tune_mome(cfg: ModelConfig, params: Any, encoded: Sequence[data_lib.EncodedFact],
              mome_cfg: MomeTuningConfig, train_cfg: train_lib.TrainConfig, *, pad_id: int,
              run_dir=None, label: str = "mome", resume: bool = False, progress: bool = True,
              on_epoch: Callable | None = None, stop_after_steps: int | None = None,
              general_windows: np.ndarray | None = None, prepared: Prepared | None = None,
              mesh: Mesh | None = None, gather_apply: GatherApplyFn = gather_apply_reference,
              anchors: dict[str, np.ndarray] | None = None,
              ) -> tuple[Transformer, dict[str, Any], train_lib.FitResult]:
  """Memorizes `encoded` facts into their selected experts; returns (model, variables, result).

  `anchors` (`anchor_sequences`) is needed when `mome_cfg.anchor.weight > 0`.

  Runs `prepare` first unless `prepared` is given (build it first to hand
  `prepared.variables_of` to an `on_epoch` recall hook). Phase 2 trains with
  `train_cfg`, its optimizer applied per expert row, and `mome_cfg.margin`.
  """
  if prepared is None:
    prepared = prepare(cfg, params, encoded, mome_cfg, pad_id=pad_id, general_windows=general_windows, run_dir=run_dir, label=label, resume=resume,
                       progress=progress, mesh=mesh, gather_apply=gather_apply)
  tx = train_cfg.optimizer.build()
  state = tuning_state(prepared.table, tx, train_cfg.seed, mesh)
  anchor_cfg = mome_cfg.anchor if mome_cfg.anchor.weight > 0 else None
  frozen = prepared.frozen
  if anchor_cfg is not None:
    if anchors is None:
      raise ValueError("mome.anchor.weight > 0 needs the anchor pool (tune_mome(anchors=...),"
                       " see anchor_sequences)")
    frozen = {**frozen, ANCHOR: _replicate(jax.tree.map(jnp.asarray, anchors), mesh)}
  step = make_tuning_step(prepared.model, tx, mesh, mome_cfg.margin, mome_cfg.train_positions,
                          focus_rows(encoded, train_cfg.batch_size, mome_cfg), anchor_cfg,
                          train_down=not mome_cfg.key_match)
  result = train_lib.fit(step, state, frozen, encoded, train_cfg, pad_id=pad_id, label=label,
                         run_dir=run_dir, resume=resume, progress=progress, on_epoch=on_epoch,
                         stop_after_steps=stop_after_steps)
  return prepared.model, prepared.variables(result.state.trainable), result


def is_mome_run(run_dir, label: str) -> bool:
  """Whether `label` in a run directory is a MoME run (has a frozen router there)."""
  return (_frozen_store(run_dir, label) / COLLISIONS_FILE).is_file()


def load_mome(run_dir, label: str, cfg: ModelConfig, params: Any) -> tuple[Transformer, dict[str, Any]]:
  """(model, variables) of the MoME run `label` in a run directory of `experiments.randomization`."""
  from lamini_jax import memory_tuning  # pylint: disable=g-import-not-at-top  (it imports this module)
  run_dir = pathlib.Path(run_dir)
  run_cfg = memory_tuning.load_run_config(run_dir / memory_tuning.CONFIG_FILE)
  spec = run_cfg.mome
  model = mome_model(cfg, spec)
  fresh = init_mome(model, spec.seed)
  store = _frozen_store(run_dir, label)
  ckpt = Checkpointer(store / "router", every=0)
  frozen = ckpt.restore({mome.ROUTER: fresh[mome.ROUTER], mome.BALANCE: fresh[mome.BALANCE]})
  ckpt.close()
  if frozen is None:
    raise FileNotFoundError(f"{store}/router: no frozen router of MoME run {label!r}")
  tx = spec.train.optimizer.build()
  like = jax.eval_shape(lambda t: tuning_state(t, tx, spec.train.seed), fresh[mome.TABLE])
  ckpt = Checkpointer(run_dir / "checkpoints" / label, every=0)
  restored = ckpt.restore(like)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{run_dir}/checkpoints/{label}: no checkpoint (train.checkpoint_every"
                            " must be > 0 for a run to be loadable)")
  return model, {"params": params, **frozen[0], mome.TABLE: restored[0].trainable}
