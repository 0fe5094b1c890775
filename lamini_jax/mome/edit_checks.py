"""Checks that come before an edit of a MoME memory changes anything (`mome.edit`).

`check_supported`: a run configuration that can be edited; `checked_new_facts`: facts to add;
`check_edits`: a batch of facts to forget or update; `load_changes` and `checked_changes`: new
answers read from a file. Each error names the field, the fact, or the file and line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax.mome import registry
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


@dataclasses.dataclass(frozen=True)
class Change:
  """A new answer for the stored fact with `fact_id` or `question`; `where` names its source."""

  answer: str
  fact_id: str | None = None
  question: str | None = None
  where: str = ""

  def find(self, stored: Sequence[StoredFact]) -> StoredFact:
    """The stored fact it names: by id when it has one (and then its question, if any, matches)."""
    at = f"{self.where}: " if self.where else ""
    try:
      fact = registry.find(stored, self.fact_id, None if self.fact_id is not None else self.question)
    except KeyError as e:
      raise KeyError(at + e.args[0]) from None
    if self.fact_id is not None and self.question and self.question.strip() != fact.question:
      raise ValueError(f"{at}fact {fact.id!r} has the question {fact.question!r}, not {self.question!r}")
    return fact


def load_changes(path) -> list[Change]:
  """New answers from a JSONL (an object a line) or CSV (a header row) file, read as
  `data.facts.load_facts_file` reads facts: "answer", and "id" (or "fact_id") or "question".
  Errors name the file and the 1-based line (JSONL) or row (CSV, the header is row 1)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"facts file {path} does not exist")
  records = []
  if path.suffix in (".jsonl", ".json"):
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
      if not line.strip():
        continue
      try:
        records.append((f"{path}: line {n}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {n}: invalid JSON: {e}") from None
  elif path.suffix == ".csv":
    rows = sources.read_csv_rows(path)
    if not rows or "answer" not in rows[0] or not {"id", "fact_id", "question"} & set(rows[0]):
      raise ValueError(f"{path}: row 1 must be a header with 'answer' and 'id' or 'question', got "
                       f"{rows[:1]}")
    for n, row in enumerate(rows[1:], start=2):
      if len(row) != len(rows[0]):
        raise ValueError(f"{path}: row {n}: expected {len(rows[0])} columns like the header, got "
                         f"{len(row)}")
      records.append((f"{path}: row {n}", dict(zip(rows[0], row))))
  else:
    raise ValueError(f"{path}: facts files must end in .jsonl, .json or .csv")
  if not records:
    raise ValueError(f"{path}: no facts")
  return [_change(where, record) for where, record in records]


def _change(where: str, record: Any) -> Change:
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected an object with answer and id or question, got "
                     f"{type(record).__name__}")
  answer, question = record.get("answer"), record.get("question") or None
  fact_id = record.get("id") or record.get("fact_id") or None
  if not isinstance(answer, str) or not answer.strip():
    raise ValueError(f"{where}: 'answer' must be a non-empty string, got {answer!r}")
  if fact_id is None and not isinstance(question, str):
    raise ValueError(f"{where}: name the stored fact by 'id' or 'question', got {record!r}")
  return Change(answer.strip(), None if fact_id is None else str(fact_id), question, where)


def checked_changes(stored: Sequence[StoredFact], changes: Sequence[Change],
                    source: str) -> list[tuple[StoredFact, str]]:
  """(stored fact, new answer) of every change, checked as one batch (`check_edits`)."""
  out = [(c.find(stored), c.answer) for c in changes]
  try:
    check_edits(stored, update=out)
  except (KeyError, ValueError) as e:
    raise type(e)(f"{source}: {e.args[0]}" if source else e.args[0]) from None
  return out
