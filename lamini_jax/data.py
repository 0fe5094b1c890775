"""Data layer: datasets, memory-tuning facts, token arrays and batches (host side, numpy).

Where data comes from (`resolve_data_dir`), first match wins:
  1. the `data_dir` argument (the CLI's --data-dir),
  2. the directory in $LAMINI_JAX_DATA,
  3. `<repo>/../shared/data` (`SHARED_DATA_DIR`) if it exists,
  4. the Hugging Face hub (`truthfulqa/truthful_qa`, `cais/mmlu`) through `datasets.load_dataset`.
A local directory that lacks a dataset is an error, not a silent switch to the hub.
Local CSV files are checked row by row with the `csv` module (errors name the file and the
1-based row, header included), then loaded with `datasets.load_dataset("csv")` as strings.

Token conventions (`encode_fact`): tokens = [BOS] + prompt + answer + [EOS]; `loss_mask[t]` is
True where token t is a training target (answer tokens and the EOS), so a loss pairs
`logits[:, :-1]` with `tokens[:, 1:]` and `loss_mask[:, 1:]`. `encode_prompt` returns exactly the
tokens before the answer. The prompt text and the answer are joined by one space and tokenized
together; the answer tokens are what the joined text adds after the prompt's own tokens. With
the Llama SentencePiece tokenizer (Metaspace, dummy prefix) these equal the answer tokenized on
its own, and decode back to the answer.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import json
import os
import pathlib
import string
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import datasets
import numpy as np

DATA_ENV_VAR = "LAMINI_JAX_DATA"
SHARED_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

TRUTHFULQA_HUB_ID = "truthfulqa/truthful_qa"
TRUTHFULQA_HUB_CONFIG = "generation"
TRUTHFULQA_HUB_SPLIT = "validation"
TRUTHFULQA_CSV = pathlib.Path("truthfulqa") / "TruthfulQA.csv"
TRUTHFULQA_COLUMNS = (
    "Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")
_TRUTHFULQA_USED_COLUMNS = (
    "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers")

MMLU_HUB_ID = "cais/mmlu"
MMLU_SPLITS = ("dev", "val", "test")
_MMLU_HUB_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}
MMLU_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions")

RANDOM_ANSWER_ALPHABET = string.ascii_uppercase + string.digits
RANDOM_ANSWER_LEN = 32
# First word of every seed sequence, so that the streams of different uses never coincide.
_RANDOM_ANSWER_STREAM = 1
_SPLIT_STREAM = 2
_SHUFFLE_STREAM = 3

AnswerMode = Literal["real", "random"]
T = TypeVar("T")


class DataNotFoundError(FileNotFoundError):
  """A dataset is in none of the places looked at; the message lists them."""


# ---------------------------------------------------------------------------------------------
# Data-directory resolution and the hub.


def _resolve(data_dir: str | os.PathLike | None) -> tuple[pathlib.Path | None, tuple[str, ...]]:
  """Returns the local data directory (None: use the hub) and the places looked at, in words."""
  if data_dir is not None:
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_dir():
      raise DataNotFoundError(f"--data-dir {str(path)!r} is not an existing directory")
    return path, (f"--data-dir: {path}",)
  tried = ["--data-dir: not given"]
  env_value = os.environ.get(DATA_ENV_VAR, "")
  if env_value:
    path = pathlib.Path(env_value).expanduser()
    if not path.is_dir():
      raise DataNotFoundError(f"${DATA_ENV_VAR}={env_value!r} is not an existing directory")
    return path, (*tried, f"${DATA_ENV_VAR}: {path}")
  tried.append(f"${DATA_ENV_VAR}: not set")
  shared = pathlib.Path(SHARED_DATA_DIR)
  if shared.is_dir():
    return shared, (*tried, f"shared data: {shared}")
  tried.append(f"shared data {shared}: does not exist")
  return None, tuple(tried)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
  """The local data directory to read, or None to use the Hugging Face hub (see module doc)."""
  return _resolve(data_dir)[0]


def _not_found(what: str, tried: Sequence[str], last: str) -> DataNotFoundError:
  places = "\n  ".join([*tried, last])
  return DataNotFoundError(
      f"cannot load {what}; looked at, in order:\n  {places}\n"
      f"Pass --data-dir DIR, set ${DATA_ENV_VAR}=DIR, or go online for the hub.")


def _load_hub(what: str, tried: Sequence[str], path: str, name: str | None, split: str):
  try:
    return datasets.load_dataset(path, name, split=split)
  except Exception as e:  # offline, not cached, unknown config: all end the search.
    raise _not_found(
        what, tried,
        f"hub {path!r} (config {name!r}, split {split!r}): {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _no_progress_bars():
  was_enabled = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  try:
    yield
  finally:
    if was_enabled:
      datasets.enable_progress_bars()


def _load_csv_strings(paths: Sequence[pathlib.Path],
                      column_names: Sequence[str]) -> list[dict[str, str]]:
  """Rows of `paths` read without a header, concatenated in order, every cell a string.

  The Arrow cache goes to a temporary directory: the CSV files stay the only copy.
  """
  features = datasets.Features({name: datasets.Value("string") for name in column_names})
  with tempfile.TemporaryDirectory() as cache_dir, _no_progress_bars():
    table = datasets.load_dataset(
        "csv", data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir,
        keep_in_memory=True, column_names=list(column_names), features=features,
        keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    return table.to_list()


def _read_csv_rows(path: pathlib.Path) -> list[list[str]]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    return list(csv.reader(f))


def _check_loaded(path: pathlib.Path, n_csv: int, n_loaded: int) -> None:
  if n_csv != n_loaded:
    raise ValueError(
        f"{path}: the csv module reads {n_csv} rows but datasets reads {n_loaded}; "
        "check the file's quoting and blank lines")


# ---------------------------------------------------------------------------------------------
# TruthfulQA.


@dataclasses.dataclass(frozen=True)
class TruthfulQAItem:
  question: str
  best_answer: str
  correct_answers: tuple[str, ...]
  incorrect_answers: tuple[str, ...]
  category: str

  def __post_init__(self):
    if not self.question.strip():
      raise ValueError(f"TruthfulQAItem.question must be non-empty, got {self.question!r}")
    if not self.best_answer.strip():
      raise ValueError(
          f"TruthfulQAItem.best_answer must be non-empty for question {self.question!r}")
    if self.best_answer not in self.correct_answers:
      raise ValueError(
          f"TruthfulQAItem.correct_answers {self.correct_answers!r} must contain best_answer "
          f"{self.best_answer!r}")


def _split_answers(cell: str) -> tuple[str, ...]:
  """Answers of one TruthfulQA CSV cell, separated by ';' (some cells end with a stray ';')."""
  return tuple(a.strip() for a in cell.split(";") if a.strip())


def _truthfulqa_item(question: str, best: str, correct: Sequence[str], incorrect: Sequence[str],
                     category: str) -> TruthfulQAItem:
  best = best.strip()
  correct = tuple(a.strip() for a in correct if a.strip())
  if best not in correct:
    correct = (best, *correct)
  return TruthfulQAItem(
      question=question.strip(), best_answer=best, correct_answers=correct,
      incorrect_answers=tuple(a.strip() for a in incorrect if a.strip()),
      category=category.strip())


def _validate_truthfulqa_csv(path: pathlib.Path) -> tuple[list[str], int]:
  """Checks the header and every row; returns the header and the number of data rows."""
  rows = _read_csv_rows(path)
  if not rows:
    raise ValueError(f"{path}: empty file, expected the header {','.join(TRUTHFULQA_COLUMNS)}")
  header = rows[0]
  missing = [c for c in _TRUTHFULQA_USED_COLUMNS if c not in header]
  if missing:
    raise ValueError(
        f"{path}: row 1 (header) lacks columns {missing}; got {header}, expected the TruthfulQA "
        f"columns {list(TRUTHFULQA_COLUMNS)}")
  if len(set(header)) != len(header):
    raise ValueError(f"{path}: row 1 (header) repeats a column name: {header}")
  question_col, best_col = header.index("Question"), header.index("Best Answer")
  for row_num, row in enumerate(rows[1:], start=2):
    if len(row) != len(header):
      raise ValueError(
          f"{path}: row {row_num}: expected {len(header)} columns like the header, got {len(row)}")
    if not row[question_col].strip():
      raise ValueError(f"{path}: row {row_num}: empty 'Question'")
    if not row[best_col].strip():
      raise ValueError(f"{path}: row {row_num}: empty 'Best Answer'")
  return header, len(rows) - 1


def _load_truthfulqa_csv(path: pathlib.Path) -> list[TruthfulQAItem]:
  header, n_rows = _validate_truthfulqa_csv(path)
  records = _load_csv_strings([path], header)
  _check_loaded(path, n_rows + 1, len(records))
  return [
      _truthfulqa_item(r["Question"], r["Best Answer"], _split_answers(r["Correct Answers"]),
                       _split_answers(r["Incorrect Answers"]), r["Category"])
      for r in records[1:]]


def load_truthfulqa(data_dir: str | os.PathLike | None = None) -> list[TruthfulQAItem]:
  """The 817 TruthfulQA questions from `<data_dir>/truthfulqa/TruthfulQA.csv` or the hub.

  Answers are stripped, cells split on ';', and `correct_answers` always contains `best_answer`
  (put first when the source lacks it).
  """
  root, tried = _resolve(data_dir)
  if root is not None:
    path = root / TRUTHFULQA_CSV
    if not path.is_file():
      raise _not_found("TruthfulQA", tried, f"{path}: does not exist")
    return _load_truthfulqa_csv(path)
  table = _load_hub("TruthfulQA", tried, TRUTHFULQA_HUB_ID, TRUTHFULQA_HUB_CONFIG,
                    TRUTHFULQA_HUB_SPLIT)
  return [
      _truthfulqa_item(r["question"], r["best_answer"], r["correct_answers"],
                       r["incorrect_answers"], r["category"])
      for r in table]


# ---------------------------------------------------------------------------------------------
# MMLU.


@dataclasses.dataclass(frozen=True)
class MMLUItem:
  subject: str
  question: str
  choices: tuple[str, str, str, str]
  answer: int

  def __post_init__(self):
    if not self.subject:
      raise ValueError("MMLUItem.subject must be non-empty")
    if not self.question.strip():
      raise ValueError(f"MMLUItem.question must be non-empty (subject {self.subject!r})")
    if len(self.choices) != 4 or not all(isinstance(c, str) for c in self.choices):
      raise ValueError(f"MMLUItem.choices must be 4 strings, got {self.choices!r}")
    if self.answer not in (0, 1, 2, 3):
      raise ValueError(f"MMLUItem.answer must be 0-3, got {self.answer!r}")


def _mmlu_split_dir(root: pathlib.Path, split: str) -> tuple[pathlib.Path | None, list[str]]:
  candidates = [root / "mmlu" / split, root / "mmlu" / "data" / split, root / split]
  for candidate in candidates:
    if candidate.is_dir():
      return candidate, []
  return None, [f"{c}: does not exist" for c in candidates]


def _validate_mmlu_csv(path: pathlib.Path) -> tuple[bool, int]:
  """Checks every row; returns (has the shared-layout header, number of data rows)."""
  rows = _read_csv_rows(path)
  if not rows:
    raise ValueError(f"{path}: empty file")
  has_header = tuple(c.strip() for c in rows[0]) == MMLU_HEADER
  valid_answers = ("0", "1", "2", "3") if has_header else MMLU_LETTERS
  layout = ("shared layout (header row, answer index 0-3)" if has_header else
            "original layout (no header row, answer letter A-D)")
  for row_num, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
    if len(row) != len(MMLU_HEADER):
      raise ValueError(
          f"{path}: row {row_num}: expected {len(MMLU_HEADER)} columns "
          f"({','.join(MMLU_HEADER)}), got {len(row)}")
    if not row[0].strip():
      raise ValueError(f"{path}: row {row_num}: empty question")
    if row[5].strip() not in valid_answers:
      raise ValueError(
          f"{path}: row {row_num}: answer {row[5]!r} is not one of {', '.join(valid_answers)} "
          f"({layout}, detected from row 1)")
  return has_header, len(rows) - has_header


def _mmlu_files(split_dir: pathlib.Path, split: str,
                subjects: Sequence[str] | None) -> list[tuple[str, pathlib.Path]]:
  suffix = f"_{split}.csv"
  found = {p.name[:-len(suffix)]: p for p in split_dir.glob(f"*{suffix}") if p.is_file()}
  if subjects is None:
    if not found:
      raise DataNotFoundError(f"MMLU: no *{suffix} files in {split_dir}")
    return sorted(found.items())
  missing = [s for s in subjects if s not in found]
  if missing:
    raise DataNotFoundError(
        f"MMLU: no {split} file for subjects {missing} in {split_dir} "
        f"(found {len(found)} subjects: {sorted(found)[:5]}...)")
  return [(s, found[s]) for s in subjects]


def _load_mmlu_csvs(files: Sequence[tuple[str, pathlib.Path]]) -> list[MMLUItem]:
  checked = [(subject, path, *_validate_mmlu_csv(path)) for subject, path in files]
  records = _load_csv_strings([path for _, path, _, _ in checked], MMLU_HEADER)
  _check_loaded(files[0][1].parent, sum(h + n for _, _, h, n in checked), len(records))
  items = []
  start = 0
  for subject, path, has_header, n_rows in checked:
    if has_header and tuple(v.strip() for v in records[start].values()) != MMLU_HEADER:
      raise ValueError(f"{path}: datasets does not read row 1 as the header the csv module reads")
    start += has_header
    for r in records[start:start + n_rows]:
      answer = r["answer"].strip()
      items.append(MMLUItem(
          subject=subject, question=r["question"],
          choices=(r["choice0"], r["choice1"], r["choice2"], r["choice3"]),
          answer=int(answer) if has_header else MMLU_LETTERS.index(answer)))
    start += n_rows
  return items


def _mmlu_from_hub(table, subject: str | None) -> list[MMLUItem]:
  return [
      MMLUItem(subject=r["subject"] or subject, question=r["question"],
               choices=tuple(r["choices"]), answer=int(r["answer"]))
      for r in table]


def load_mmlu(data_dir: str | os.PathLike | None = None, split: str = "test",
              subjects: Sequence[str] | None = None) -> list[MMLUItem]:
  """MMLU items of one split ("dev", "val" or "test"), by subject, rows in file order.

  Local files `<subject>_<split>.csv` are looked for in `<data_dir>/mmlu/<split>/`, then
  `<data_dir>/mmlu/data/<split>/`, then `<data_dir>/<split>/` (so `data_dir` may be the original
  Hendrycks `data/` folder). Each file is in either layout, detected from its first row: the
  shared layout (header `question,choice0,choice1,choice2,choice3,answer`, answer 0-3) or the
  original one (no header, answer A-D). On the hub: `cais/mmlu`, config "all" or one per subject.
  `subjects=None` means every subject found (sorted); otherwise the given order.
  """
  if split not in MMLU_SPLITS:
    raise ValueError(f"load_mmlu: split must be one of {MMLU_SPLITS}, got {split!r}")
  if isinstance(subjects, str):
    raise ValueError(
        f"load_mmlu: subjects must be a sequence of names, got the string {subjects!r}")
  if subjects is not None:
    subjects = list(dict.fromkeys(subjects))
    if not subjects:
      raise ValueError("load_mmlu: subjects is empty; pass None for all subjects")
  root, tried = _resolve(data_dir)
  if root is not None:
    split_dir, looked = _mmlu_split_dir(root, split)
    if split_dir is None:
      raise _not_found(f"MMLU {split}", tried, "; ".join(looked))
    return _load_mmlu_csvs(_mmlu_files(split_dir, split, subjects))
  hub_split = _MMLU_HUB_SPLITS[split]
  if subjects is None:
    items = _mmlu_from_hub(
        _load_hub(f"MMLU {split}", tried, MMLU_HUB_ID, "all", hub_split), None)
    return sorted(items, key=lambda item: item.subject)  # Stable: file order within a subject.
  items = []
  for subject in subjects:
    table = _load_hub(f"MMLU {split}", tried, MMLU_HUB_ID, subject, hub_split)
    items.extend(_mmlu_from_hub(table, subject))
  return items


# ---------------------------------------------------------------------------------------------
# Memory-tuning facts.


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
    rows = _read_csv_rows(path)
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


# ---------------------------------------------------------------------------------------------
# Prompts and token arrays.


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """Text before the answer; `{question}` is replaced. The answer follows after one space.

  `answer_end` is a stop sequence written after every trained answer (before EOS,
  and trained like it): greedy decoding counts an answer as finished at EOS or at
  `answer_end`. A newline suits models that never learned to emit EOS (such as
  the shared stories260K) and is harmless for those that did; "" disables it.
  `train_eos=False` leaves the EOS token out of trained facts, for a backbone
  whose EOS embedding was never trained (it cannot be learned with the
  embeddings frozen, and would put a floor under every fact's loss).
  """
  prompt: str = "Question: {question}\nAnswer:"
  answer_end: str = "\n"
  train_eos: bool = True

  def __post_init__(self):
    if "{question}" not in self.prompt:
      raise ValueError(f"PromptTemplate.prompt must contain '{{question}}', got {self.prompt!r}")
    try:
      self.prompt.format(question="")
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(
          f"PromptTemplate.prompt {self.prompt!r} has a format field other than {{question}} "
          f"({type(e).__name__}: {e}); write literal braces as '{{{{' and '}}}}'") from e
    if self.prompt.endswith((" ", "\t")):
      raise ValueError(
          f"PromptTemplate.prompt must not end with a space or tab, got {self.prompt!r}: "
          "the answer is joined to it with one space")

  def render(self, question: str) -> str:
    return self.prompt.format(question=question)

  def join(self, question: str, answer: str) -> str:
    """The rendered prompt, one space (none if it ends in whitespace: a newline), the answer."""
    text = self.render(question)
    return text + answer if text[-1:].isspace() else f"{text} {answer}"


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedFact:
  """tokens [T] int32 and loss_mask [T] bool; loss_mask[t] marks token t as a target."""
  tokens: np.ndarray
  loss_mask: np.ndarray

  def __post_init__(self):
    if self.tokens.ndim != 1 or self.tokens.dtype != np.int32:
      raise ValueError(f"EncodedFact.tokens must be 1-D int32, got {self.tokens.dtype} "
                       f"{self.tokens.shape}")
    if self.loss_mask.shape != self.tokens.shape or self.loss_mask.dtype != np.bool_:
      raise ValueError(f"EncodedFact.loss_mask must be bool of shape {self.tokens.shape}, got "
                       f"{self.loss_mask.dtype} {self.loss_mask.shape}")

  @property
  def prompt_len(self) -> int:
    """Number of tokens before the first target (BOS and prompt)."""
    return int(np.argmax(self.loss_mask)) if self.loss_mask.any() else len(self.tokens)


def _bos(tokenizer) -> list[int]:
  return [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
  return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _prompt_and_answer_ids(tokenizer, template: PromptTemplate, pairs: Sequence[tuple[str, str]],
                           names: Sequence[str]) -> list[tuple[list[int], list[int]]]:
  """For each (question, answer): BOS + prompt token ids, and the ids the answer adds after them.

  One batched tokenizer call for all prompts and all prompt + answer texts.
  """
  texts = [template.render(q) for q, _ in pairs] + [template.join(q, a) for q, a in pairs]
  ids = _token_ids(tokenizer, texts)
  bos = _bos(tokenizer)
  result = []
  for name, prompt_ids, joined in zip(names, ids[:len(pairs)], ids[len(pairs):]):
    if joined[:len(prompt_ids)] != prompt_ids:
      raise ValueError(
          f"{name}: the tokens of the prompt are not a prefix of the tokens of prompt + answer; "
          f"the end of the template {template.prompt[-12:]!r} merges with the answer. "
          "End the template with punctuation, e.g. 'Answer:'")
    if len(joined) == len(prompt_ids):
      raise ValueError(f"{name}: the answer adds no tokens")
    result.append((bos + prompt_ids, joined[len(prompt_ids):]))
  return result


def _encoded(prefix: list[int], answer: list[int]) -> EncodedFact:
  return EncodedFact(
      tokens=np.asarray(prefix + answer, np.int32),
      loss_mask=np.asarray([False] * len(prefix) + [True] * len(answer)))


def encode_facts(tokenizer, template: PromptTemplate, facts: Sequence[Fact],
                 max_len: int) -> list[EncodedFact]:
  """`encode_fact` for each fact, with one batched tokenizer call."""
  if tokenizer.eos_token_id is None:
    raise ValueError("encode_fact: the tokenizer has no eos_token_id; facts end with EOS")
  eos = int(tokenizer.eos_token_id)
  names = [f"fact {fact.fact_id!r}" for fact in facts]
  split_ids = _prompt_and_answer_ids(
      tokenizer, template, [(fact.question, fact.answer + template.answer_end) for fact in facts],
      names)
  encoded = []
  for name, (prefix, answer) in zip(names, split_ids):
    encoded.append(_encoded(prefix, answer + [eos] if template.train_eos else answer))
    if len(encoded[-1].tokens) > max_len:
      raise ValueError(f"{name}: {len(encoded[-1].tokens)} tokens, more than max_len={max_len}")
  return encoded


def encode_fact(tokenizer, template: PromptTemplate, fact: Fact, max_len: int) -> EncodedFact:
  """[BOS] + prompt + answer + answer_end + EOS (if `train_eos`); loss mask on all after the prompt."""
  return encode_facts(tokenizer, template, [fact], max_len)[0]


def encode_prompt(tokenizer, template: PromptTemplate, question: str) -> np.ndarray:
  """[T] int32: the tokens `encode_fact` puts before the answer; generation starts here."""
  prompt_ids = _token_ids(tokenizer, [template.render(question)])[0]
  return np.asarray(_bos(tokenizer) + prompt_ids, np.int32)


def encode_choices(tokenizer, template: PromptTemplate, question: str,
                   choices: Sequence[str]) -> list[EncodedFact]:
  """One sequence per choice: [BOS] + prompt + choice, mask on the choice tokens.

  No EOS is appended, so a choice's masked log-likelihood scores the choice text alone (as in
  the TruthfulQA MC and MMLU evaluations).
  """
  names = [f"choice {i} ({c!r}) of question {question[:40]!r}" for i, c in enumerate(choices)]
  split_ids = _prompt_and_answer_ids(tokenizer, template, [(question, c) for c in choices], names)
  return [_encoded(prefix, answer) for prefix, answer in split_ids]


def _format_mmlu_item(item: MMLUItem, with_answer: bool) -> str:
  text = item.question + "".join(
      f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, item.choices))
  text += "\nAnswer:"
  return text + f" {MMLU_LETTERS[item.answer]}\n\n" if with_answer else text


def mmlu_prompt(dev_items: Sequence[MMLUItem], item: MMLUItem, k: int) -> str:
  """The standard k-shot MMLU prompt, ending in "Answer:"; score " A".." " D" after it.

  The shots are the first k of `dev_items` with the item's subject (others are ignored); the
  header names the subject with spaces for underscores.
  """
  shots = [d for d in dev_items if d.subject == item.subject]
  if not 0 <= k <= len(shots):
    raise ValueError(
        f"mmlu_prompt: k={k} shots asked, {len(shots)} dev items of subject {item.subject!r}")
  header = ("The following are multiple choice questions (with answers) about "
            f"{item.subject.replace('_', ' ')}.\n\n")
  return header + "".join(_format_mmlu_item(s, True) for s in shots[:k]) + _format_mmlu_item(
      item, False)


def corpus_windows(tokenizer, path: str | os.PathLike, seq_len: int,
                   max_windows: int) -> np.ndarray:
  """[W, seq_len + 1] int32 windows over the tokenized text file, W <= max_windows.

  The whole file is tokenized at once and cut into consecutive chunks of seq_len tokens from
  the start; each text token is a target (not column 0) in exactly one window. With a BOS token
  each window is [BOS] + chunk; without one, column 0 is the token before the chunk (window 0
  starts at the first token).
  """
  if seq_len < 1 or max_windows < 1:
    raise ValueError(
        f"corpus_windows: seq_len={seq_len} and max_windows={max_windows} must be >= 1")
  path = pathlib.Path(path)
  text = path.read_text(encoding="utf-8")
  ids = np.asarray(_token_ids(tokenizer, [text])[0], np.int32)
  bos = _bos(tokenizer)
  if bos:
    n = min(max_windows, len(ids) // seq_len)
    chunks = ids[:n * seq_len].reshape(n, seq_len)
    windows = np.concatenate([np.full((n, 1), bos[0], np.int32), chunks], axis=1)
  else:
    n = min(max_windows, max(len(ids) - 1, 0) // seq_len)
    starts = np.arange(n) * seq_len
    windows = ids[starts[:, None] + np.arange(seq_len + 1)[None, :]]
  if n == 0:
    raise ValueError(f"{path}: {len(ids)} tokens, not enough for one window of seq_len={seq_len}")
  return windows.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Training batches.


class Batch(NamedTuple):
  """One training batch; rows with valid_B False are padding (mask 0, fact_index -1)."""
  tokens_BxT: np.ndarray  # int32
  loss_mask_BxT: np.ndarray  # float32
  fact_index_B: np.ndarray  # int32, index into the `encoded` list
  valid_B: np.ndarray  # bool


def num_batches(n: int, batch_size: int) -> int:
  """Batches per epoch of n facts: ceil(n / batch_size); the last one is padded."""
  if n < 0 or batch_size < 1:
    raise ValueError(f"num_batches: n={n} must be >= 0 and batch_size={batch_size} >= 1")
  return -(-n // batch_size)


def stack_encoded(encoded: Sequence[EncodedFact], seq_len: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens_NxT int32 right-padded with pad_id, and loss_mask_NxT float32 (0 on padding)."""
  tokens_NxT = np.full((len(encoded), seq_len), pad_id, np.int32)
  mask_NxT = np.zeros((len(encoded), seq_len), np.float32)
  for i, e in enumerate(encoded):
    if len(e.tokens) > seq_len:
      raise ValueError(f"encoded fact {i}: {len(e.tokens)} tokens, more than seq_len={seq_len}")
    tokens_NxT[i, :len(e.tokens)] = e.tokens
    mask_NxT[i, :len(e.tokens)] = e.loss_mask
  return tokens_NxT, mask_NxT


def epoch_batches(encoded: Sequence[EncodedFact], batch_size: int, seq_len: int, pad_id: int,
                  seed: int, epoch: int, length_bucket: int | None = None) -> Iterator[Batch]:
  """The batches of one epoch: every fact once, in an order fixed by (seed, epoch).

  All batches have `batch_size` rows; the last is filled with invalid rows. Without
  `length_bucket` every batch is `seq_len` wide. With it, facts of similar length
  share a batch ("sortish": a seeded shuffle, sorted by length within windows of
  16 batches, the batches then shuffled) and each batch is only as wide as its
  longest fact rounded up to a multiple of `length_bucket` (at most `seq_len`), so
  a jitted step compiles once per width and computes far less padding.
  """
  if not encoded:
    raise ValueError("epoch_batches: no encoded facts")
  if length_bucket is not None and length_bucket <= 0:
    raise ValueError(f"epoch_batches: length_bucket must be positive, got {length_bucket}")
  n_batches = num_batches(len(encoded), batch_size)
  tokens_NxT, mask_NxT = stack_encoded(encoded, seq_len, pad_id)
  rng = np.random.default_rng([_SHUFFLE_STREAM, seed, epoch])
  order = rng.permutation(len(encoded))
  if length_bucket is not None:
    lengths = np.array([len(e.tokens) for e in encoded])
    window = 16 * batch_size
    order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                            for chunk in np.array_split(order, range(window, len(order), window))])
  groups = [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
  widths = [seq_len] * n_batches
  if length_bucket is not None:
    groups = [groups[i] for i in rng.permutation(n_batches)]
    widths = [min(seq_len, -(-int(lengths[g].max()) // length_bucket) * length_bucket) for g in groups]

  def batches() -> Iterator[Batch]:
    for index, width in zip(groups, widths):
      n = len(index)
      tokens_BxT = np.full((batch_size, width), pad_id, np.int32)
      mask_BxT = np.zeros((batch_size, width), np.float32)
      fact_index_B = np.full((batch_size,), -1, np.int32)
      tokens_BxT[:n], mask_BxT[:n], fact_index_B[:n] = (
          tokens_NxT[index, :width], mask_NxT[index, :width], index)
      yield Batch(tokens_BxT, mask_BxT, fact_index_B, np.arange(batch_size) < n)

  return batches()
