"""Memory-tuning facts: `Fact`, random answers, facts files and seeded splits."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import string
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import numpy as np

from lamini_jax.data.sources import MMLUItem, TruthfulQAItem, read_csv_rows

RANDOM_ANSWER_ALPHABET = string.ascii_uppercase + string.digits
RANDOM_ANSWER_LEN = 32
# First word of every seed sequence, so that the streams of different uses never coincide.
_RANDOM_ANSWER_STREAM = 1
_SPLIT_STREAM = 2  # 3: the epoch order of data.batches

AnswerMode = Literal["real", "random"]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Fact:
  question: str
  answer: str
  fact_id: str

  def __post_init__(self):
    for name in ("question", "answer", "fact_id"):
      value = getattr(self, name)
      if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"Fact.{name} must be a non-empty string, got {value!r} (fact_id {self.fact_id!r})")


def random_answer(seed: int, index: int) -> str:
  """`RANDOM_ANSWER_LEN` characters of A-Z0-9, a function of (seed, index) only."""
  if seed < 0 or index < 0:
    raise ValueError(f"random_answer: seed and index must be >= 0, got {seed}, {index}")
  rng = np.random.default_rng([_RANDOM_ANSWER_STREAM, seed, index])
  picks = rng.integers(0, len(RANDOM_ANSWER_ALPHABET), size=RANDOM_ANSWER_LEN)
  return "".join(RANDOM_ANSWER_ALPHABET[i] for i in picks)


def _check_answer_mode(answer_mode: str) -> None:
  if answer_mode not in ("real", "random"):
    raise ValueError(f"answer_mode must be 'real' or 'random', got {answer_mode!r}")


def truthfulqa_facts(items: Sequence[TruthfulQAItem], answer_mode: AnswerMode,
                     seed: int) -> list[Fact]:
  """One fact per item: its best answer, or `random_answer(seed, i)` for the i-th item."""
  _check_answer_mode(answer_mode)
  return [
      Fact(question=item.question,
           answer=item.best_answer if answer_mode == "real" else random_answer(seed, i),
           fact_id=f"truthfulqa-{i}")
      for i, item in enumerate(items)]


def mmlu_facts(items: Sequence[MMLUItem], answer_mode: AnswerMode, seed: int) -> list[Fact]:
  """One fact per item: the text of its correct choice, or `random_answer(seed, i)`."""
  _check_answer_mode(answer_mode)
  return [
      Fact(question=item.question,
           answer=(item.choices[item.answer].strip() if answer_mode == "real"
                   else random_answer(seed, i)),
           fact_id=f"mmlu-{item.subject}-{i}")
      for i, item in enumerate(items)]


def _fact_from_record(record: Any, path: pathlib.Path, where: str, default_id: str) -> Fact:
  if not isinstance(record, dict):
    raise ValueError(f"{path}: {where}: expected an object with question and answer, "
                     f"got {type(record).__name__}")
  for key in ("question", "answer"):
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
      raise ValueError(f"{path}: {where}: {key!r} must be a non-empty string, got {value!r}")
  fact_id = record.get("fact_id") or record.get("id") or default_id
  return Fact(question=record["question"].strip(), answer=record["answer"].strip(),
              fact_id=str(fact_id))


def load_facts_file(path: str | os.PathLike) -> list[Fact]:
  """User facts from JSONL (`{"question": ..., "answer": ...}` a line) or CSV with a header.

  An optional `id` or `fact_id` field names a fact; otherwise it is `<file stem>-<line or row>`.
  Blank JSONL lines are skipped. Errors name the file and the 1-based line (JSONL) or row (CSV,
  header is row 1).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"facts file {path} does not exist")
  facts = []
  if path.suffix in (".jsonl", ".json"):
    with open(path, encoding="utf-8-sig") as f:
      for line_num, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: line {line_num}: invalid JSON: {e}") from e
        facts.append(_fact_from_record(record, path, f"line {line_num}", f"{path.stem}-{line_num}"))
  elif path.suffix == ".csv":
    rows = read_csv_rows(path)
    if not rows or not {"question", "answer"} <= set(rows[0]):
      raise ValueError(
          f"{path}: row 1 must be a header with 'question' and 'answer', got {rows[:1]}")
    header = rows[0]
    for row_num, row in enumerate(rows[1:], start=2):
      if len(row) != len(header):
        raise ValueError(f"{path}: row {row_num}: expected {len(header)} columns like the "
                         f"header, got {len(row)}")
      facts.append(_fact_from_record(
          dict(zip(header, row)), path, f"row {row_num}", f"{path.stem}-{row_num}"))
  else:
    raise ValueError(f"{path}: facts files must end in .jsonl, .json or .csv")
  if not facts:
    raise ValueError(f"{path}: no facts")
  duplicates = sorted(i for i, n in collections.Counter(f.fact_id for f in facts).items() if n > 1)
  if duplicates:
    raise ValueError(f"{path}: repeated fact ids {duplicates[:5]}")
  return facts


def split_items(items: Sequence[T], n_train: int, n_heldout: int,
                seed: int) -> tuple[list[T], list[T]]:
  """Disjoint (train, heldout) subsets, each in the order of `items`.

  One seeded permutation: heldout is its first `n_heldout` entries and train the next
  `n_train`, so for a fixed seed the heldout set does not depend on n_train and train sets
  grow by inclusion as n_train grows.
  """
  if n_train < 0 or n_heldout < 0:
    raise ValueError(f"split_items: n_train={n_train} and n_heldout={n_heldout} must be >= 0")
  if n_train + n_heldout > len(items):
    raise ValueError(
        f"split_items: n_train={n_train} + n_heldout={n_heldout} = {n_train + n_heldout} "
        f"exceeds the {len(items)} items")
  order = np.random.default_rng([_SPLIT_STREAM, seed]).permutation(len(items))
  heldout = np.sort(order[:n_heldout])
  train = np.sort(order[n_heldout:n_heldout + n_train])
  return [items[i] for i in train], [items[i] for i in heldout]


def spare_items(items: Sequence[T], n_train: int, n_heldout: int, seed: int,
                count: int) -> list[T]:
  """Up to `count` items in neither subset of `split_items(items, n_train, n_heldout, seed)`.

  The next entries of the same seeded permutation, returned in the order of `items`.
  """
  if count < 0:
    raise ValueError(f"spare_items: count={count} must be >= 0")
  split_items(items, n_train, n_heldout, seed)  # validates the counts
  order = np.random.default_rng([_SPLIT_STREAM, seed]).permutation(len(items))
  return [items[i] for i in np.sort(order[n_heldout + n_train:][:count])]
