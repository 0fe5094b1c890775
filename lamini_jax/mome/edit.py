"""Editing a memory-tuned MoME: add, forget and update facts without retraining the others.

With a frozen router each fact writes the expert rows its answer positions select
(`registry.StoredFact.experts`: the slots `mome.train_slots` and `mome.train_slot_choice`
choose, else all K) and reads the others it selects. A keyed row adds exactly 0 where it does
not fire (`firing`), so a fact that reads a row only changes when the row fires at one of its
answer positions. An edit changes only rows of the facts it edits:

  add     the new facts' slots are chosen as phase 2 chose them, rows that stored facts write
          or read counting as taken; the rows E they write are keyed (`table.key_rows`,
          `only=E`) to the mean input over every position, new or stored, that writes them,
          and only E trains (phase 2's step with a per-slot focus), on the new facts, the
          stored facts that write a row of E and those at which a row of E fires, until every
          one is recalled exactly or the epochs run out.
  forget  a batch of facts: rows only they write go back to untrained, down = up = 0 (a
          keyed expert then adds exactly 0); rows they share with facts that remain are
          re-keyed to those and retrained from up = 0, in one retraining for the batch, on the
          remaining facts that use them, so nothing a forgotten fact wrote stays in the table.
          Stored facts at which a changed row fired are checked, and those no longer recalled
          retrain their own rows.
  update  a batch of (fact, new answer): forget them all, then add them all with their new
          answers under the same ids (two retrainings for the batch).
  repair  the stored facts not recalled exactly: the rows they write retrain, as for an add,
          from a fresh optimizer state (each row's learning rate starts over).

Every other row keeps its value bit for bit, so an edit costs in proportion to the edited
facts and their neighbours, not to the facts stored. The backbone, router and balance never
change. A bad batch (`check_edits`) is an error before anything changes. Supported: one keyed
MoME layer, phase 1 off (`check_supported`). The table passed to an edit is donated (its
buffers are written in place): use the one the edit returns.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax import evaluate as eval_lib
from lamini_jax.model import Transformer
from lamini_jax.mome.anchors import ANCHOR
from lamini_jax.mome.collisions import choice_fragility, fires_at, written_slots
from lamini_jax.mome.config import MomeTuningConfig
from lamini_jax.mome.edit_checks import check_edits, checked_new_facts
from lamini_jax.mome import inputs as inputs_lib
from lamini_jax.mome.inputs import fact_rows, layer_key, layer_paths, token_routes, tree_get, tree_set
from lamini_jax.mome.layer import BALANCE, ROUTER, TABLE
from lamini_jax.mome import registry
from lamini_jax.mome.registry import StoredFact
from lamini_jax.mome.sparse_optim import LEAVES
from lamini_jax.mome.sparse_table import sparse
from lamini_jax.mome.steps import make_tuning_step
from lamini_jax.mome.table import expert_input, key_rows, zero_rows
from lamini_jax.mome.tuning import batch_routes, focus_slots, tuning_state
from lamini_jax import train as train_lib


@dataclasses.dataclass(frozen=True)
class Editor:
  """What every edit of one MoME model needs; tables and registries are passed along.

  `frozen` holds "params", "mome_router" and "mome_balance"; `anchors` is the phase-2
  anchor pool with its first-layer "experts" (None when `mome.anchor.weight` is 0); `routes`
  keeps each fact's `answer_routes` (one MoME layer: they do not change with the table).
  """

  model: Transformer  # without a mesh: edits run on one device
  frozen: dict[str, Any]
  spec: MomeTuningConfig
  tokenizer: Any
  template: encoding.PromptTemplate
  pad_id: int
  anchors: dict[str, Any] | None = None
  routes: dict[bytes, tuple] = dataclasses.field(default_factory=dict, compare=False, repr=False)

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
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """`inputs.answer_routes` of the edited layer, each fact's computed once per editor."""
  return inputs_lib.answer_routes(ed.model, ed.variables(table), ed.path, encoded, ed.routes)


def _first_slots(ed: Editor) -> bool:
  return ed.spec.train_slot_choice == "first"


def stored_facts(ed: Editor, table: Any, facts: Sequence[facts_lib.Fact], added: str,
                 encoded: Sequence[encoding.EncodedFact] | None = None,
                 stored: Sequence[StoredFact] = ()) -> list[StoredFact]:
  """Registry entries of `facts`: the rows their answer positions write and read.

  With an exclusive `mome.train_slot_choice` the written slots are chosen as phase 2 chose
  them (`collisions.written_slots`, the facts' answer positions in order), the rows that
  the `stored` facts write or read counting as taken or read before the first, and among
  free rows first those whose key would fire at no stored fact's answer position
  (`_would_fire`); each entry keeps its positions' slots.
  """
  if not facts:
    return []
  x, idx, w, fact_P = answer_routes(ed, table, encoded if encoded is not None else ed.encode(facts))
  spec = ed.spec
  rows = lambda attr: np.concatenate([np.asarray(getattr(f, attr).get(ed.layer, ()), np.int64)
                                      for f in stored] + [np.zeros(0, np.int64)])
  avoid = None if _first_slots(ed) or not stored else _would_fire(ed, table, x, idx, stored)
  fragile = choice_fragility(tree_get(ed.frozen[ROUTER], ed.path), x, ed.model.mome,
                             tree_get(ed.frozen[BALANCE], ed.path), spec.train_slot_choice)
  written_PxK = written_slots(idx, w, spec.train_slots, spec.train_slot_choice,
                              rows("experts"), rows("reads"), avoid, fragile)
  out = []
  for f, at in zip(facts, fact_rows(fact_P, len(facts))):
    mine, mask = idx[at], written_PxK[at]
    written = np.unique(mine[mask])
    read = np.setdiff1d(mine, written)
    slots = {} if _first_slots(ed) else {
        ed.layer: tuple(tuple(np.flatnonzero(m).tolist()) for m in mask)}
    out.append(StoredFact(f.fact_id, f.question, f.answer, added, {ed.layer: tuple(written.tolist())},
                          {ed.layer: tuple(read.tolist())} if read.size else {}, slots=slots))
  return out


def _would_fire(ed: Editor, table: Any, x_PxD: np.ndarray, idx_PxK: np.ndarray,
                stored: Sequence[StoredFact]) -> np.ndarray:
  """bool [P, K]: whether expert idx[p, k], keyed to x[p] alone, would fire at an answer
  position of a stored fact that selects it (`collisions.fires_at`)."""
  readers = registry.neighbours(stored, {ed.layer: np.unique(idx_PxK)})
  if not readers:
    return np.zeros(idx_PxK.shape, bool)
  x_QxD, idx_QxK, _, _ = answer_routes(ed, table, ed.encode([f.fact() for f in readers]))
  cfg = ed.model.mome
  return fires_at(expert_input(x_PxD, cfg), idx_PxK, expert_input(x_QxD, cfg), idx_QxK, ed.spec.key_match)


def written_mask(ed: Editor, entries: Sequence[StoredFact], fact_P: np.ndarray, k: int) -> np.ndarray:
  """bool [P, K]: the slots each of `entries`' answer positions writes (fact_P: their fact index)."""
  if _first_slots(ed):
    return np.broadcast_to(np.arange(k) < (ed.spec.train_slots or k), (len(fact_P), k))
  mask = np.zeros((len(fact_P), k), bool)
  for i, f in enumerate(entries):
    at = np.flatnonzero(fact_P == i)
    slots = f.slots.get(ed.layer)
    if slots is None or len(slots) != len(at):
      raise ValueError(f"fact {f.id!r}: the registry holds the slots of {0 if slots is None else len(slots)}"
                       f" answer positions of layer {ed.layer}, its answer encodes to {len(at)}; was the "
                       "registry written with another tokenizer or template?")
    for p, s in zip(at, slots):
      mask[p, list(s)] = True
  return mask


def fired_rows(ed: Editor, table: Any, facts: Sequence[StoredFact], rows: np.ndarray
               ) -> list[np.ndarray]:
  """For each of `facts`, the rows of `rows` that fire at one of its answer positions, under
  their keys in `table`.

  A keyed row (relu, threshold > 0) adds exactly 0 where down . x <= threshold, whatever
  its `up`, so a fact that selects a row without firing it is not changed by training it.
  """
  out = [np.zeros(0, np.int64) for _ in facts]
  if not facts or not len(rows):
    return out
  x_PxD, idx_PxK, _, fact_P = answer_routes(ed, table, ed.encode([f.fact() for f in facts]))
  p, k = np.nonzero(np.isin(idx_PxK, rows))
  if not p.size:
    return out
  keys_HxDxR = np.asarray(jnp.take(tree_get(table, ed.path)["down"],
                                   jnp.asarray(idx_PxK[p, k], jnp.int32), axis=0), np.float64)
  pre_HxR = np.einsum("hd,hdr->hr", expert_input(x_PxD[p].astype(np.float64), ed.model.mome), keys_HxDxR)
  fires = np.any(pre_HxR > ed.model.mome.threshold * (1 - 1e-5), axis=1)  # float32's edge counts as firing
  experts = idx_PxK[p[fires], k[fires]]
  return [np.unique(experts[at]).astype(np.int64) for at in fact_rows(fact_P[p[fires]], len(facts))]


def firing(ed: Editor, table: Any, facts: Sequence[StoredFact], rows: np.ndarray) -> list[StoredFact]:
  """Those of `facts` at which one of `rows` fires (`fired_rows`)."""
  return [f for f, r in zip(facts, fired_rows(ed, table, facts, rows)) if r.size]


def recalled(ed: Editor, table: Any, facts: Sequence[facts_lib.Fact]) -> dict[str, bool]:
  if not facts:
    return {}
  rec = eval_lib.recall(ed.model, ed.variables(table), ed.tokenizer, facts, ed.template)
  return {f.fact_id: bool(ok) for f, ok in zip(facts, rec.exact)}


def retrain(ed: Editor, table: Any, entries: Sequence[StoredFact], rows: np.ndarray, *,
            reset_up: bool, epochs: int, recall_every: int = 1, progress: bool = False,
            readers: Sequence[StoredFact] = (), pool: Sequence[StoredFact] = ()
            ) -> tuple[Any, Training, np.ndarray]:
  """Keys `rows` to the answer positions of `entries` that write them and trains only those
  rows (and the rows of the readers they fire at); returns the table, the training and the
  rows trained.

  `readers`: stored facts that select some of `rows` without writing them; those at which
  one of them fires under its new key (`firing`) train with `entries`, the others are not
  changed by it. A reader that a new row fires at trains its own rows too (their keys stay),
  so that it can make up for the row (a row firing at two positions cannot serve both
  alone); then the facts of `pool` that write those rows or at which they fire train with
  them. `reset_up`: `rows` start from up = 0. Training is phase 2's (`make_tuning_step`, the
  run's `mome.train` optimizer, margin and anchors) with a focus on the slots whose expert is
  a trained row, and stops once every fact is recalled exactly (checked every `recall_every`
  epochs) or after `epochs`. `table` is donated: keying, the reset and training write into
  its buffers, and no copy of the layer is made.
  """
  train_lib.release_freed_host_memory()  # the tables earlier edits freed (docs/sequential.md)
  t0 = time.perf_counter()
  spec, model = ed.spec, ed.model
  x_PxD, idx_PxK, _, fact_P = answer_routes(ed, table, ed.encode([f.fact() for f in entries]))
  mask_PxK = written_mask(ed, entries, fact_P, idx_PxK.shape[1])
  layer = key_rows(tree_get(table, ed.path), np.where(mask_PxK, idx_PxK, -1), x_PxD, model.mome,
                   spec.key_match, only=rows)  # donates the layer: written in place
  table = tree_set(table, ed.path, layer)
  hit = firing(ed, table, readers, rows)
  own = np.setdiff1d(written_rows(hit, ed.layer), rows)
  known = {f.id for f in list(entries) + hit}
  more: list[StoredFact] = []
  if own.size and pool:  # the readers' own rows train: their writers and the facts they fire at too
    writers, others = _split(ed, [f for f in pool if f.id not in known], own)
    more = writers + firing(ed, table, others, own)
  facts = [f.fact() for f in list(entries) + hit + more]
  encoded = ed.encode(facts)
  if reset_up:
    table = tree_set(table, ed.path, zero_rows(tree_get(table, ed.path), rows, ("up",)))
  train_cfg = spec.train
  longest = max(len(e.tokens) for e in encoded)
  bucket = train_cfg.length_bucket or 1
  train_cfg = dataclasses.replace(train_cfg, epochs=max(epochs, 1), checkpoint_every=0,
                                  seq_len=max(train_cfg.seq_len, -(-longest // bucket) * bucket))
  most = max(int(np.count_nonzero(e.loss_mask[1:])) for e in encoded)
  tx, step = _tuning_step(model, spec, -(-most // 16) * 16, ed.anchors is not None)
  slot_limit = spec.train_slots if _first_slots(ed) else None  # else: every slot reading `rows`
  state = tuning_state(table, tx, train_cfg.seed, None, ("up",), copy=False)  # donated
  frozen = ed.frozen if ed.anchors is None else {**ed.frozen, ANCHOR: ed.anchors}
  routes_FxTxK = token_routes(model, ed.variables(table),
                              batch_lib.stack_encoded(encoded, longest, ed.pad_id)[0])
  rows_N = np.zeros(model.mome.num_experts, bool)
  trained = np.union1d(rows, own).astype(np.int64)
  rows_N[trained] = True
  hook = eval_lib.recall_callback(model, lambda s: ed.variables(s.trainable), ed.tokenizer, facts,
                                  ed.template, recall_every, stop_at_full=True, forced=True)
  extras = lambda batch: (batch_routes(routes_FxTxK, batch),
                          focus_slots(routes_FxTxK, batch, rows_N, slot_limit))
  result = train_lib.fit(step, state, frozen, encoded, train_cfg, pad_id=ed.pad_id, label="edit",
                         progress=progress, on_epoch=hook, batch_extras=extras)
  table = result.state.trainable
  after = recalled(ed, table, facts)
  return table, Training(tuple(f.fact_id for f in facts), int(len(trained)), len(result.history),
                         time.perf_counter() - t0, after), trained


@functools.lru_cache(maxsize=8)
def _tuning_step(model: Transformer, spec: MomeTuningConfig, most: int, anchored: bool):
  """(optimizer, phase-2 step) for facts of at most `most` trained tokens: one compile per
  process for successive edits of one model."""
  tx = spec.train.optimizer.build()
  first = spec.train_slot_choice == "first"  # else the focus is every slot that reads a trained row
  written = (spec.train_slots if first else None) or model.mome.slots
  rows = min(spec.train.batch_size * most * written, model.mome.num_experts) + 1
  return tx, make_tuning_step(model, tx, None, spec.margin, "answer", rows,
                              spec.anchor if anchored else None, train_down=False,
                              train_slots=spec.train_slots if first else None)


def written_rows(facts: Sequence[StoredFact], layer: str) -> np.ndarray:
  """The sorted rows of `layer` that any of `facts` writes."""
  return np.unique(np.concatenate([np.asarray(f.experts.get(layer, ()), np.int64) for f in facts]
                                  + [np.zeros(0, np.int64)]))


def add(ed: Editor, table: Any, stored: Sequence[StoredFact], new: Sequence[facts_lib.Fact], *,
        epochs: int, recall_every: int = 1, progress: bool = False, added: str | None = None,
        source: str = "the new facts") -> Edit:
  """Stores `new` facts: trains the rows they write on them and on their neighbours; then, with
  `mome.repair_epochs`, `repair` of those it trained that are not recalled."""
  new = checked_new_facts(stored, new, source)
  entries = stored_facts(ed, table, new, added or registry.now(), ed.encode(new), stored)
  table, training, trained = retrain_rows(ed, table, stored, written_rows(entries, ed.layer), entries,
                                          reset_up=False, epochs=epochs, recall_every=recall_every,
                                          progress=progress)
  done = Edit(table, tuple(stored) + tuple(entries), trained, (training,), dict(training.recalled))
  missed = [k for k, ok in training.recalled.items() if not ok]
  if not (missed and ed.spec.repair_epochs):
    return done
  fixed = repair(ed, table, done.facts, epochs=ed.spec.repair_epochs, progress=progress, missed=missed)
  return Edit(fixed.table, done.facts, np.union1d(trained, fixed.changed), done.trainings + fixed.trainings,
              {**done.recalled, **fixed.recalled})


def _split(ed: Editor, pool: Sequence[StoredFact], rows: np.ndarray
           ) -> tuple[list[StoredFact], list[StoredFact]]:
  """(writers, readers): the facts of `pool` that write some of `rows`, and the others that select some."""
  near = registry.neighbours(pool, {ed.layer: rows})
  writers = [s for s in near if np.intersect1d(s.experts.get(ed.layer, ()), rows).size]
  return writers, [s for s in near if s not in writers]


def retrain_rows(ed: Editor, table: Any, pool: Sequence[StoredFact], rows: np.ndarray,
                 extra: Sequence[StoredFact] = (), **kwargs) -> tuple[Any, Training, np.ndarray]:
  """`retrain` of `rows` on `extra` and the facts of `pool` that write them or fire them."""
  writers, readers = _split(ed, pool, rows)
  return retrain(ed, table, list(extra) + writers, rows, readers=readers, pool=pool, **kwargs)


def forget(ed: Editor, table: Any, stored: Sequence[StoredFact], facts: Sequence[StoredFact], *,
           epochs: int, recall_every: int = 1, progress: bool = False) -> Edit:
  """Removes `facts` in one edit: the rows only they write go back to untrained (down = up = 0);
  the rows they share with facts that remain, written or firing at their answer positions
  (an add trains a row on every stored fact it fires at), are retrained without them, in one
  retraining."""
  if not facts:
    raise ValueError("no facts to forget")
  check_edits(stored, forget=facts)
  gone = {f.id for f in facts}
  victims = [s for s in stored if s.id in gone]  # as the registry holds them
  rest = [s for s in stored if s.id not in gone]
  read = np.intersect1d(np.concatenate([v.rows(ed.layer) for v in victims]), written_rows(rest, ed.layer))
  mine = np.union1d(written_rows(victims, ed.layer),  # with the trained rows that fire at their positions
                    np.concatenate(fired_rows(ed, table, victims, read)))
  writers, readers = _split(ed, rest, mine)
  shared = np.intersect1d(mine, written_rows(writers, ed.layer))
  alone = np.setdiff1d(mine, shared)
  hit = firing(ed, table, readers, mine)  # before the reset and re-keying: the readers they change
  table = tree_set(table, ed.path, zero_rows(tree_get(table, ed.path), alone, LEAVES))
  trainings: list[Training] = []
  changed = [mine]
  train = dict(epochs=epochs, recall_every=recall_every, progress=progress)
  if shared.size:
    table, training, trained = retrain_rows(ed, table, rest, shared, reset_up=True, **train)
    trainings.append(training)
    changed.append(trained)
  checked = {k: v for t in trainings for k, v in t.recalled.items()}
  checked.update(recalled(ed, table, [s.fact() for s in writers + hit if s.id not in checked]))
  lost = [s for s in hit if not checked[s.id]]
  if lost:  # readers that relied on a reset row: their own rows learn to do without it
    table, training, trained = retrain_rows(ed, table, rest, written_rows(lost, ed.layer),
                                            reset_up=False, **train)
    trainings.append(training)
    changed.append(trained)
    checked.update(training.recalled)
  removed = recalled(ed, table, [s.fact() for s in victims])
  return Edit(table, tuple(rest), np.unique(np.concatenate(changed)), tuple(trainings), checked, alone,
              removed)


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
  old = recalled(ed, added.table, [was[f.fact_id].fact() for f in new])
  return Edit(added.table, tuple(sorted(entries, key=lambda s: place[s.id])),
              np.union1d(removed.changed, added.changed), removed.trainings + added.trainings,
              {**removed.recalled, **added.recalled}, np.setdiff1d(removed.zeroed, added.changed), old)


def repair(ed: Editor, table: Any, stored: Sequence[StoredFact], *, epochs: int,
           recall_every: int = 1, progress: bool = False, missed: Sequence[str] | None = None) -> Edit:
  """Retrains the rows that the stored facts not recalled exactly write (the ids `missed`, else
  every fact is checked), with the facts those rows serve, from a fresh optimizer state: for
  facts missed when training ran out of epochs with their rows' learning rates decayed."""
  ok = (recalled(ed, table, [s.fact() for s in stored]) if missed is None
        else {registry.find(stored, fact_id=i).id: False for i in missed})
  rows = written_rows([s for s in stored if not ok.get(s.id, True)], ed.layer)
  if not rows.size:
    return Edit(table, tuple(stored), rows, (), ok)
  table, training, trained = retrain_rows(ed, table, stored, rows, reset_up=False, epochs=epochs,
                                          recall_every=recall_every, progress=progress)
  return Edit(table, tuple(stored), trained, (training,), {**ok, **training.recalled})


def changed_rows(ed: Editor, table: Any, rows: np.ndarray) -> registry.Rows:
  """`registry.Rows` of the layer: rows `rows` of the table, to commit beside the registry."""
  return {ed.layer: sparse(tree_get(table, ed.path), rows)}
