"""Where the datasets come from: TruthfulQA, MMLU, its dev and test subjects, its k-shot prompts.

Where data comes from (`resolve_data_dir`), first match wins:
  1. the `data_dir` argument (the CLI's --data-dir),
  2. the directory in $LAMINI_JAX_DATA,
  3. `<repo>/../shared/data` (`SHARED_DATA_DIR`) if it exists,
  4. the Hugging Face hub (`truthfulqa/truthful_qa`, `cais/mmlu`) through `datasets.load_dataset`.
A local directory that lacks a dataset is an error, not a silent switch to the hub.
Local CSV files are checked row by row with the `csv` module (errors name the file and the
1-based row, header included), then loaded with `datasets.load_dataset("csv")` as strings.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Sequence

import datasets

DATA_ENV_VAR = "LAMINI_JAX_DATA"
SHARED_DATA_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"

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
# Every fourth subject from the second (14 of 57): settings are chosen on the test rows of these
# (a run's dev split), the other 43 are only reported (its test split). MMLU's own "dev" rows are
# the k-shot examples. Fixed, so that no seed's dev subject is another seed's test subject. (From
# the first, professional_law's long rows would be a third of the dev rows: 68% of them fit a
# 512-token context at 0 shots, against 88% here and 82% of the test rows.)
MMLU_DEV_SUBJECTS = MMLU_SUBJECTS[1::4]
MMLU_TEST_SUBJECTS = tuple(s for s in MMLU_SUBJECTS if s not in MMLU_DEV_SUBJECTS)


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


def read_csv_rows(path: pathlib.Path) -> list[list[str]]:
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
  rows = read_csv_rows(path)
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
  rows = read_csv_rows(path)
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
