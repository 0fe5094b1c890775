"""Checks that come before an edit of a MoME memory changes anything (`mome.edit`).

`check_supported`: a run configuration that can be edited; `checked_new_facts`: facts to add;
`check_edits`: a batch of facts to forget or update. Each error names the field or the fact.
"""

from __future__ import annotations

from collections.abc import Sequence

from lamini_jax.data import facts as facts_lib
from lamini_jax.mome.config import MomeTuningConfig
from lamini_jax.mome.registry import StoredFact


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
