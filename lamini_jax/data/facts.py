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
_SPLIT_STREAM = 2  # 3: the epoch order of data.batches; 4: evaluate's MMLU sample
_TRAIN_STREAM = 5  # which of the questions left after the held-out splits are trained, or anchors

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


def partition(items: Sequence[T], sizes: Sequence[int], seed: int,
              stream: int = _SPLIT_STREAM) -> list[list[T]]:
  """Disjoint parts of `items`: one per size, then the rest; each in the order of `items`.

  Part k is the k-th run of `sizes[k]` entries of one permutation seeded by (stream, seed),
  so a part never depends on the sizes after it.
  """
  if any(n < 0 for n in sizes):
    raise ValueError(f"partition: sizes {list(sizes)} must be >= 0")
  if sum(sizes) > len(items):
    raise ValueError(f"partition: sizes {list(sizes)} add up to {sum(sizes)}, more than the "
                     f"{len(items)} items")
  order = np.random.default_rng([stream, seed]).permutation(len(items))
  ends = np.cumsum([0, *sizes, len(items) - sum(sizes)])
  return [[items[i] for i in np.sort(order[a:b])] for a, b in zip(ends[:-1], ends[1:])]


@dataclasses.dataclass(frozen=True)
class QuestionSplit:
  """Disjoint uses of one question set (e.g. TruthfulQA's 817) in a run, each in its order.

  `dev` and `test` depend only on `heldout_seed` and their size, never on the run's seed, so
  that no seed's dev question is another seed's test question; `train` (the facts) and
  `spare` (e.g. the anchors) come from the rest, drawn by the run's seed.
  """

  dev: list
  test: list
  train: list
  spare: list

  def heldout(self, split: str) -> list:
    """The held-out questions of `split` ("dev" or "test")."""
    if split not in ("dev", "test"):
      raise ValueError(f"split must be dev or test, got {split!r}")
    return self.dev if split == "dev" else self.test


def split_questions(items: Sequence[T], n_heldout: int, n_train: int, seed: int,
                    heldout_seed: int = 0, n_spare: int | None = None) -> QuestionSplit:
  """dev and test (`n_heldout` each), train (`n_train`), spare (up to `n_spare`; None: all).

  dev and test are the first two runs of `n_heldout` in the permutation seeded by
  `heldout_seed` (dev is `split_items(items, 0, n_heldout, heldout_seed)[1]`); train and
  spare are the first `n_train` and the next `n_spare` of the rest, in a permutation seeded
  by `seed`. Each part grows by inclusion with its size.
  """
  if n_heldout < 0 or n_train < 0 or (n_spare is not None and n_spare < 0):
    raise ValueError(f"split_questions: n_heldout={n_heldout}, n_train={n_train} and "
                     f"n_spare={n_spare} must be >= 0")
  if 2 * n_heldout + n_train > len(items):
    raise ValueError(f"split_questions: 2 x n_heldout={n_heldout} (dev and test) + n_train={n_train}"
                     f" = {2 * n_heldout + n_train} exceeds the {len(items)} items")
  dev, test, rest = partition(items, [n_heldout, n_heldout], heldout_seed)
  n_spare = len(rest) - n_train if n_spare is None else min(n_spare, len(rest) - n_train)
  train, spare, _ = partition(rest, [n_train, n_spare], seed, _TRAIN_STREAM)
  return QuestionSplit(dev, test, train, spare)
