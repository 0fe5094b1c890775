"""Editing a memory-tuned MoME: add, forget and update facts without retraining the others.

With a frozen router each fact writes the expert rows its answer positions select
(`registry.StoredFact.experts`: the first `mome.train_slots` slots, else all K). An edit
changes only rows of the facts it edits:

  add     the rows E the new facts write are keyed (`table.key_rows`, `only=E`) to the mean
          input over every position, new or stored, that writes them, and only E trains
          (phase 2's step with a per-slot focus), on the new facts and their neighbours
          (the stored facts whose answer positions select a row of E), until every one is
          recalled exactly or the epochs run out.
  forget  a batch of facts: rows only they write go back to untrained, down = up = 0 (a
          keyed expert then adds exactly 0); rows they share with facts that remain are
          re-keyed to those and retrained from up = 0, in one retraining for the batch, on the
          remaining facts that use them, so nothing a forgotten fact wrote stays in the table.
  update  a batch of (fact, new answer): forget them all, then add them all with their new
          answers under the same ids (two retrainings for the batch).

Every other row keeps its value bit for bit, so an edit costs in proportion to the edited
facts and their neighbours, not to the facts stored. The backbone, router and balance never
change. A bad batch (`check_edits`) is an error before anything changes. Supported: one keyed
MoME layer, phase 1 off, `mome.train_slot_choice` 'first' (`check_supported`). The table passed
to an edit is donated (its buffers are written in place): use the one the edit returns.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax import evaluate as eval_lib
from lamini_jax.model import Transformer
from lamini_jax.mome.anchors import ANCHOR
from lamini_jax.mome.config import MomeTuningConfig
from lamini_jax.mome.inputs import fact_inputs, layer_key, layer_paths, token_routes, tree_get, tree_set
from lamini_jax.mome.layer import BALANCE, ROUTER, TABLE
from lamini_jax.mome import registry
from lamini_jax.mome.registry import StoredFact
from lamini_jax.mome.router import route_jit
from lamini_jax.mome.sparse_optim import LEAVES
from lamini_jax.mome.steps import make_tuning_step
from lamini_jax.mome.table import key_rows
from lamini_jax.mome.tuning import batch_routes, focus_slots, tuning_state
from lamini_jax import train as train_lib


def check_supported(spec: MomeTuningConfig) -> None:
  """Editing needs one keyed MoME layer without phase 1; an error names the field that is not so."""
  if len(spec.layers) != 1:
    raise ValueError(f"mome.layers={list(spec.layers)}: editing facts supports one MoME layer (a later "
                     "layer's inputs move when an earlier layer's rows change)")
  if not spec.key_match:
    raise ValueError("mome.key_match=0: editing facts needs keyed experts (mome.key_match > 0), so "
                     "that a row fires only near the facts that write it")
  if spec.generalization.epochs:
    raise ValueError(f"mome.generalization.epochs={spec.generalization.epochs}: editing facts needs "
                     "phase 1 off (its rows hold general text, not facts)")
  if spec.train_positions != "answer":
    raise ValueError(f"mome.train_positions={spec.train_positions!r}: editing facts needs 'answer'")
  _check_slot_choice(spec)


def _check_slot_choice(spec: MomeTuningConfig) -> None:
  if spec.train_slot_choice != "first":
    raise ValueError(f"mome.train_slot_choice={spec.train_slot_choice!r}: not supported yet by fact "
                     "editing (it writes the first mome.train_slots slots of each answer position); "
                     "edit a run made with mome.train_slot_choice='first'")


@dataclasses.dataclass(frozen=True)
class Editor:
  """What every edit of one MoME model needs; tables and registries are passed along.

  `frozen` holds "params", "mome_router" and "mome_balance"; `anchors` is the phase-2
  anchor pool with its first-layer "experts" (None when `mome.anchor.weight` is 0).
  """

  model: Transformer  # without a mesh: edits run on one device
  frozen: dict[str, Any]
  spec: MomeTuningConfig
  tokenizer: Any
  template: encoding.PromptTemplate
  pad_id: int
  anchors: dict[str, Any] | None = None

  def __post_init__(self):
    _check_slot_choice(self.spec)

  @property
  def path(self) -> tuple[str, ...]:
    return layer_paths(self.model)[0]

  @property
  def layer(self) -> str:
    return layer_key(self.path)

  def variables(self, table: Any) -> dict[str, Any]:
    return {**self.frozen, TABLE: table}

  def encode(self, facts: Sequence[facts_lib.Fact]) -> list[encoding.EncodedFact]:
    return encoding.encode_facts(self.tokenizer, self.template, facts,
                                 self.model.cfg.max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Training:
  """One retraining of some rows: on which facts, how long, and which facts are recalled after it."""

  facts: tuple[str, ...]  # ids
  rows: int
  epochs: int
  seconds: float
  recalled: dict[str, bool]


@dataclasses.dataclass(frozen=True)
class Edit:
  """The result of an edit: the new table and registry, and what changed.

  `changed`: the rows of the layer this edit wrote (keyed, trained or zeroed); every other
  row is bit for bit as before. `recalled`: exact recall, after the edit, of every fact it
  trained or whose answer positions select a changed row. `removed_recalled`: for forget
  and update, by id, whether the removed answer is still produced.
  """

  table: Any
  facts: tuple[StoredFact, ...]
  changed: np.ndarray
  trainings: tuple[Training, ...]
  recalled: dict[str, bool]
  zeroed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  removed_recalled: dict[str, bool] | None = None

  def summary(self) -> dict[str, Any]:
    return {"facts": len(self.facts), "rows_changed": int(self.changed.size),
            "rows_zeroed": int(self.zeroed.size),
            "trainings": [dataclasses.asdict(t) for t in self.trainings],
            "recalled": int(sum(self.recalled.values())), "checked": len(self.recalled),
            "not_recalled": sorted(k for k, ok in self.recalled.items() if not ok),
            "removed_answer_recalled": self.removed_recalled}


def answer_routes(ed: Editor, table: Any, encoded: Sequence[encoding.EncodedFact]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs [P, D], experts [P, K], fact index [P]) of the layer at the facts' answer positions."""
  x, fact_P = fact_inputs(ed.model, ed.variables(table), encoded)
  idx, _ = route_jit(tree_get(ed.frozen[ROUTER], ed.path), jnp.asarray(x[ed.layer]), ed.model.mome,
                     tree_get(ed.frozen[BALANCE], ed.path))
  return x[ed.layer], np.asarray(idx), fact_P


def stored_facts(ed: Editor, table: Any, facts: Sequence[facts_lib.Fact], added: str,
                 encoded: Sequence[encoding.EncodedFact] | None = None) -> list[StoredFact]:
  """Registry entries of `facts`: the rows their answer positions write and read."""
  if not facts:
    return []
  _, idx, fact_P = answer_routes(ed, table, encoded if encoded is not None else ed.encode(facts))
  slots = ed.spec.train_slots or ed.model.mome.slots
  out = []
  for i, f in enumerate(facts):
    mine = idx[fact_P == i]
    written = np.unique(mine[:, :slots])
    read = np.setdiff1d(mine[:, slots:], written)
    out.append(StoredFact(f.fact_id, f.question, f.answer, added, {ed.layer: tuple(written.tolist())},
                          {ed.layer: tuple(read.tolist())} if read.size else {}))
  return out


def as_fact(stored: StoredFact) -> facts_lib.Fact:
  return facts_lib.Fact(stored.question, stored.answer, stored.id)


def recalled(ed: Editor, table: Any, facts: Sequence[facts_lib.Fact]) -> dict[str, bool]:
  if not facts:
    return {}
  rec = eval_lib.recall(ed.model, ed.variables(table), ed.tokenizer, facts, ed.template)
  return {f.fact_id: bool(ok) for f, ok in zip(facts, rec.exact)}


def _zero_rows(table: Any, path: tuple[str, ...], rows: np.ndarray, leaves: tuple[str, ...]) -> Any:
  """The table with `rows` of `leaves` set to 0 in place: the layer passed is donated."""
  if not len(rows):
    return table
  layer = tree_get(table, path)
  idx_M = np.full(1 << (len(rows) - 1).bit_length(), len(layer["up"]), np.int32)  # pad: dropped
  idx_M[:len(rows)] = rows
  return tree_set(table, path, _zeroed(layer, jnp.asarray(idx_M), leaves))


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _zeroed(layer: dict[str, jax.Array], idx_M: jax.Array, leaves: tuple[str, ...]
            ) -> dict[str, jax.Array]:
  return {k: v.at[idx_M].set(0, mode="drop") if k in leaves else v for k, v in layer.items()}


def retrain(ed: Editor, table: Any, facts: Sequence[facts_lib.Fact], rows: np.ndarray, *,
            reset_up: bool, epochs: int, recall_every: int = 1,
            progress: bool = False) -> tuple[Any, Training]:
  """Keys `rows` to the answer positions of `facts` that write them and trains only those rows.

  `reset_up`: the rows start from up = 0. Training is phase 2's (`make_tuning_step`, the run's
  `mome.train` optimizer, margin and anchors) with a focus on the slots whose expert is one
  of `rows`, and stops once every fact is recalled exactly (checked every `recall_every`
  epochs) or after `epochs`. `table` is donated: keying, the reset and training write into
  its buffers, and no copy of the layer is made.
  """
  train_lib.release_freed_host_memory()  # the tables earlier edits freed (docs/sequential.md)
  t0 = time.perf_counter()
  spec, model = ed.spec, ed.model
  encoded = ed.encode(facts)
  x_PxD, idx_PxK, _ = answer_routes(ed, table, encoded)
  layer = key_rows(tree_get(table, ed.path), idx_PxK[:, :spec.train_slots], x_PxD, model.mome,
                   spec.key_match, only=rows)  # donates the layer: written in place
  table = tree_set(table, ed.path, layer)
  if reset_up:
    table = _zero_rows(table, ed.path, rows, ("up",))
  train_cfg = spec.train
  longest = max(len(e.tokens) for e in encoded)
  bucket = train_cfg.length_bucket or 1
  train_cfg = dataclasses.replace(train_cfg, epochs=max(epochs, 1), checkpoint_every=0,
                                  seq_len=max(train_cfg.seq_len, -(-longest // bucket) * bucket))
  most = max(int(np.count_nonzero(e.loss_mask[1:])) for e in encoded)
  tx, step = _tuning_step(model, spec, -(-most // 16) * 16, ed.anchors is not None)
  state = tuning_state(table, tx, train_cfg.seed, None, ("up",), copy=False)  # donated
  frozen = ed.frozen if ed.anchors is None else {**ed.frozen, ANCHOR: ed.anchors}
  routes_FxTxK = token_routes(model, ed.variables(table),
                              batch_lib.stack_encoded(encoded, longest, ed.pad_id)[0])
  rows_N = np.zeros(model.mome.num_experts, bool)
  rows_N[rows] = True
  hook = eval_lib.recall_callback(model, lambda s: ed.variables(s.trainable), ed.tokenizer, facts,
                                  ed.template, recall_every, stop_at_full=True)
  extras = lambda batch: (batch_routes(routes_FxTxK, batch),
                          focus_slots(routes_FxTxK, batch, rows_N, spec.train_slots))
  result = train_lib.fit(step, state, frozen, encoded, train_cfg, pad_id=ed.pad_id, label="edit",
                         progress=progress, on_epoch=hook, batch_extras=extras)
  table = result.state.trainable
  after = recalled(ed, table, facts)
  return table, Training(tuple(f.fact_id for f in facts), int(len(rows)), len(result.history),
                         time.perf_counter() - t0, after)


@functools.lru_cache(maxsize=8)
def _tuning_step(model: Transformer, spec: MomeTuningConfig, most: int, anchored: bool):
  """(optimizer, phase-2 step) for facts of at most `most` trained tokens: one compile per
  process for successive edits of one model."""
  tx = spec.train.optimizer.build()
  written = spec.train_slots or model.mome.slots
  rows = min(spec.train.batch_size * most * written, model.mome.num_experts) + 1
  return tx, make_tuning_step(model, tx, None, spec.margin, "answer", rows,
                              spec.anchor if anchored else None, train_down=False,
                              train_slots=spec.train_slots)


def checked_new_facts(stored: Sequence[StoredFact], new: Sequence[facts_lib.Fact],
                      source: str = "the new facts") -> list[facts_lib.Fact]:
  """`new` with a question repeated with its same answer kept once; errors name the conflict.

  Errors: one question with two answers, a question or an id already stored.
  """
  first: dict[str, facts_lib.Fact] = {}
  kept = []
  for f in new:
    other = first.setdefault(f.question, f)
    if other is f:
      kept.append(f)
    elif other.answer != f.answer:
      raise ValueError(f"{source}: question {f.question!r} has two answers, {other.answer!r} (fact "
                       f"{other.fact_id!r}) and {f.answer!r} (fact {f.fact_id!r}): keep one")
  by_question = {s.question: s for s in stored}
  ids = {s.id for s in stored}
  for f in kept:
    if f.question in by_question:
      s = by_question[f.question]
      raise ValueError(f"{source}: question {f.question!r} is already stored as fact {s.id!r} (answer "
                       f"{s.answer!r}); change its answer with `update --id {s.id} --answer ...`")
    if f.fact_id in ids:
      raise ValueError(f"{source}: fact id {f.fact_id!r} is already stored; give the fact another "
                       "\"id\" in the facts file")
  if not kept:
    raise ValueError(f"{source}: no facts to add")
  return kept


def _written(facts: Sequence[StoredFact], layer: str) -> np.ndarray:
  """The sorted rows of `layer` that any of `facts` writes."""
  return np.unique(np.concatenate([np.asarray(f.experts.get(layer, ()), np.int64) for f in facts]
                                  + [np.zeros(0, np.int64)]))


def add(ed: Editor, table: Any, stored: Sequence[StoredFact], new: Sequence[facts_lib.Fact], *,
        epochs: int, recall_every: int = 1, progress: bool = False, added: str | None = None,
        source: str = "the new facts") -> Edit:
  """Stores `new` facts: trains the rows they write on them and on their neighbours."""
  new = checked_new_facts(stored, new, source)
  encoded = ed.encode(new)
  entries = stored_facts(ed, table, new, added or registry.now(), encoded)
  rows = _written(entries, ed.layer)
  near = registry.neighbours(stored, {ed.layer: rows})
  table, training = retrain(ed, table, list(new) + [as_fact(s) for s in near], rows, reset_up=False,
                            epochs=epochs, recall_every=recall_every, progress=progress)
  return Edit(table, tuple(stored) + tuple(entries), rows, (training,), dict(training.recalled))


def check_edits(stored: Sequence[StoredFact], forget: Sequence[StoredFact] = (),
                update: Sequence[tuple[StoredFact, str]] = ()) -> None:
  """Checks a batch of edits before anything changes; each error names the fact id.

  Errors: an id not stored; an id named twice among the facts to forget, among the facts to
  update, or in both; a new answer that is empty or the stored one.
  """
  by_id = {s.id: s for s in stored}
  seen: dict[str, str] = {}
  for what, fact, answer in ([("forget", f, None) for f in forget]
                             + [("update", f, a) for f, a in update]):
    if fact.id not in by_id:
      raise KeyError(f"fact {fact.id!r} is not stored (`python -m lamini_jax.facts list` shows the "
                     f"{len(stored)} stored facts)")
    if fact.id in seen:
      raise ValueError(f"fact {fact.id!r} is named twice among the facts to {what}: name it once"
                       if seen[fact.id] == what else
                       f"fact {fact.id!r} is both forgotten and updated in one edit: do one of them")
    seen[fact.id] = what
    if answer is not None and not answer.strip():
      raise ValueError(f"the new answer of fact {fact.id!r} is empty")
    if answer is not None and answer.strip() == by_id[fact.id].answer:
      raise ValueError(f"fact {fact.id!r} already has the answer {by_id[fact.id].answer!r}: nothing "
                       "to update")


def forget(ed: Editor, table: Any, stored: Sequence[StoredFact], facts: Sequence[StoredFact], *,
           epochs: int, recall_every: int = 1, progress: bool = False) -> Edit:
  """Removes `facts` in one edit: the rows only they write go back to untrained (down = up = 0);
  the rows they share with facts that remain are retrained without them, in one retraining."""
  if not facts:
    raise ValueError("no facts to forget")
  check_edits(stored, forget=facts)
  gone = {f.id for f in facts}
  victims = [s for s in stored if s.id in gone]  # as the registry holds them
  rest = [s for s in stored if s.id not in gone]
  mine = _written(victims, ed.layer)
  near = registry.neighbours(rest, {ed.layer: mine})
  shared = np.intersect1d(mine, _written(near, ed.layer))
  alone = np.setdiff1d(mine, shared)
  table = _zero_rows(table, ed.path, alone, LEAVES)
  trainings: tuple[Training, ...] = ()
  if shared.size:
    users = registry.neighbours(rest, {ed.layer: shared})
    table, training = retrain(ed, table, [as_fact(s) for s in users], shared, reset_up=True,
                              epochs=epochs, recall_every=recall_every, progress=progress)
    trainings = (training,)
  checked = {k: v for t in trainings for k, v in t.recalled.items()}
  checked.update(recalled(ed, table, [as_fact(s) for s in near if s.id not in checked]))
  removed = recalled(ed, table, [as_fact(s) for s in victims])
  return Edit(table, tuple(rest), mine, trainings, checked, alone, removed)


def update(ed: Editor, table: Any, stored: Sequence[StoredFact],
           changes: Sequence[tuple[StoredFact, str]], *, epochs: int, recall_every: int = 1,
           progress: bool = False) -> Edit:
  """New answers for stored facts, (fact, answer) pairs: `forget` them all, then `add` them all
  under the same ids, places in the registry and `added` times (two retrainings in all)."""
  if not changes:
    raise ValueError("no facts to update")
  check_edits(stored, update=changes)
  was = {s.id: s for s in stored}
  new = [facts_lib.Fact(was[f.id].question, answer.strip(), f.id) for f, answer in changes]
  ids = {f.fact_id for f in new}
  removed = forget(ed, table, stored, [was[f.fact_id] for f in new], epochs=epochs,
                   recall_every=recall_every, progress=progress)
  added = add(ed, removed.table, removed.facts, new, epochs=epochs, recall_every=recall_every,
              progress=progress, source="update of " + ", ".join(repr(f.fact_id) for f in new))
  stamp, place = registry.now(), {s.id: i for i, s in enumerate(stored)}
  entries = [dataclasses.replace(s, added=was[s.id].added, updated=stamp)
             if s.id in ids else s for s in added.facts]
  old = recalled(ed, added.table, [as_fact(was[f.fact_id]) for f in new])
  return Edit(added.table, tuple(sorted(entries, key=lambda s: place[s.id])),
              np.union1d(removed.changed, added.changed), removed.trainings + added.trainings,
              {**removed.recalled, **added.recalled}, np.setdiff1d(removed.zeroed, added.changed), old)


def changed_rows(ed: Editor, table: Any, rows: np.ndarray) -> registry.Rows:
  """`registry.Rows` of the layer: rows `rows` of the table, to commit beside the registry."""
  rows = np.unique(np.asarray(rows, np.int64))
  layer = tree_get(table, ed.path)
  idx = jnp.asarray(rows, jnp.int32)
  return {ed.layer: {"rows": rows, **{k: np.asarray(jnp.take(v, idx, axis=0)) for k, v in layer.items()}}}
