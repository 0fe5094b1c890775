"""Tests for lamini_jax.data (sources, facts, encoding, batches): loaders (local, original, hub schema), facts, tokens, batches."""

import csv
import dataclasses
import json
import re

import datasets
import tokenizers
import transformers
import numpy as np
import pytest

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import corpus as corpus_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import runs

RANDOM_RE = re.compile(r"[A-Z0-9]{32}")
SOME_SUBJECTS = ("abstract_algebra", "college_mathematics", "high_school_european_history")


def _csv_rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.reader(f))


def _write_csv(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  return path


def _mmlu_header_rows(n_rows, bad_row=None):
  rows = [list(sources.MMLU_HEADER)]
  rows += [[f"Question {i}?", "w", "x", "y", "z", str(i % 4)] for i in range(n_rows)]
  return rows


@pytest.fixture(scope="module")
def mmlu_shared(shared_dir):
  return {split: sources.load_mmlu(shared_dir / "data", split) for split in ("dev", "test")}


@pytest.fixture(scope="module")
def truthfulqa_shared(shared_dir):
  return sources.load_truthfulqa(shared_dir / "data")


@pytest.fixture
def no_local_data(monkeypatch, tmp_path):
  """No --data-dir, no $LAMINI_JAX_DATA, no shared directory: loaders go to the hub."""
  monkeypatch.delenv(sources.DATA_ENV_VAR, raising=False)
  monkeypatch.setattr(sources, "SHARED_DATA_DIR", tmp_path / "no_shared_data")


class FakeHub:
  """Stands in for datasets.load_dataset; records the calls and serves in-memory datasets."""

  def __init__(self, tables):
    self.tables = tables
    self.calls = []

  def __call__(self, path, name=None, split=None, **kwargs):
    self.calls.append((path, name, split))
    if (path, name, split) not in self.tables:
      raise ConnectionError(f"offline: no {path}/{name}/{split}")
    return self.tables[(path, name, split)]


# ---------------------------------------------------------------------------------------------
# Data-directory resolution.


def test_resolve_order(monkeypatch, tmp_path):
  env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
  env_dir.mkdir()
  arg_dir.mkdir()
  monkeypatch.setattr(sources, "SHARED_DATA_DIR", tmp_path / "absent")
  monkeypatch.delenv(sources.DATA_ENV_VAR, raising=False)
  assert sources.resolve_data_dir(None) is None
  monkeypatch.setattr(sources, "SHARED_DATA_DIR", tmp_path)
  assert sources.resolve_data_dir(None) == tmp_path
  monkeypatch.setenv(sources.DATA_ENV_VAR, str(env_dir))
  assert sources.resolve_data_dir(None) == env_dir
  assert sources.resolve_data_dir(arg_dir) == arg_dir
  assert sources.resolve_data_dir(str(arg_dir)) == arg_dir
  with pytest.raises(sources.DataNotFoundError, match=re.escape(str(tmp_path / "typo"))):
    sources.resolve_data_dir(tmp_path / "typo")
  monkeypatch.setenv(sources.DATA_ENV_VAR, str(tmp_path / "env_typo"))
  with pytest.raises(sources.DataNotFoundError, match=r"\$LAMINI_JAX_DATA=.*env_typo"):
    sources.resolve_data_dir(None)


def test_default_shared_dir_is_repo_sibling(shared_dir):
  assert sources.SHARED_DATA_DIR.resolve() == (shared_dir / "data").resolve()


def test_local_dir_without_dataset_names_the_file(tmp_path):
  with pytest.raises(sources.DataNotFoundError) as e:
    sources.load_truthfulqa(tmp_path)
  assert str(tmp_path / "truthfulqa" / "TruthfulQA.csv") in str(e.value)
  with pytest.raises(sources.DataNotFoundError) as e:
    sources.load_mmlu(tmp_path, "dev")
  assert str(tmp_path / "mmlu" / "dev") in str(e.value) and str(tmp_path / "dev") in str(e.value)


# ---------------------------------------------------------------------------------------------
# TruthfulQA.


def test_truthfulqa_shared(truthfulqa_shared, shared_dir):
  items = truthfulqa_shared
  assert len(items) == 817
  rows = _csv_rows(shared_dir / "data" / "truthfulqa" / "TruthfulQA.csv")
  assert rows[0] == list(sources.TRUTHFULQA_COLUMNS) and len(rows) == 818
  for item, row in zip(items, rows[1:]):
    assert item.best_answer in item.correct_answers
    assert item.question == row[2].strip() and item.best_answer == row[3].strip()
    assert item.category == row[1]
    assert all(a and a == a.strip() and ";" not in a
               for a in item.correct_answers + item.incorrect_answers)
    assert item.incorrect_answers
  first = items[0]
  assert first.question == "What happens to you if you eat watermelon seeds?"
  assert first.correct_answers[0] == "Nothing happens" and len(first.correct_answers) == 5
  assert len(first.incorrect_answers) == 7


def test_truthfulqa_best_answer_added_to_correct(tmp_path):
  _write_csv(tmp_path / "truthfulqa" / "TruthfulQA.csv", [
      list(sources.TRUTHFULQA_COLUMNS),
      ["Adversarial", "Cat", "Q1?", "Best one", "Other; Another;", "Wrong", "src"],
      ["Adversarial", "Cat", "Q2? ", "B2", "A2; B2", "W1; W2", "src"]])
  items = sources.load_truthfulqa(tmp_path)
  assert items[0].correct_answers == ("Best one", "Other", "Another")
  assert items[1].question == "Q2?" and items[1].correct_answers == ("A2", "B2")
  assert items[1].incorrect_answers == ("W1", "W2")


def test_truthfulqa_malformed(tmp_path):
  path = tmp_path / "truthfulqa" / "TruthfulQA.csv"
  good = ["Adversarial", "Cat", "Q?", "B", "B", "W", "src"]
  columns = list(sources.TRUTHFULQA_COLUMNS)
  _write_csv(path, [[c for c in columns if c != "Incorrect Answers"], good[:6]])
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 1") + r".*Incorrect Answers"):
    sources.load_truthfulqa(tmp_path)
  _write_csv(path, [columns, good, ["Adversarial", "Cat", "  ", "B", "B", "W", "src"]])
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 3: empty 'Question'")):
    sources.load_truthfulqa(tmp_path)
  _write_csv(path, [columns, good, good, good + ["extra"]])
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 4: expected 7 columns")):
    sources.load_truthfulqa(tmp_path)


# ---------------------------------------------------------------------------------------------
# MMLU.


def test_mmlu_shared_counts(mmlu_shared):
  dev, test = mmlu_shared["dev"], mmlu_shared["test"]
  assert len(dev) == 285 and len(test) == 14042
  assert tuple(sorted({i.subject for i in test})) == sources.MMLU_SUBJECTS
  assert [i.subject for i in dev] == [s for s in sources.MMLU_SUBJECTS for _ in range(5)]
  assert [i.subject for i in test] == sorted(i.subject for i in test)


def test_mmlu_shared_matches_csv_module(mmlu_shared, shared_dir):
  """Every cell as the csv module reads it: no NaN for 'None', no numbers from '0'."""
  for split, items in mmlu_shared.items():
    expected = []
    for subject in sources.MMLU_SUBJECTS:
      rows = _csv_rows(shared_dir / "data" / "mmlu" / split / f"{subject}_{split}.csv")
      assert tuple(rows[0]) == sources.MMLU_HEADER
      expected += [sources.MMLUItem(subject, r[0], tuple(r[1:5]), int(r[5])) for r in rows[1:]]
    assert items == expected
  assert sum("None" in i.choices for i in mmlu_shared["test"]) == 10


def test_mmlu_subjects_argument(shared_dir, mmlu_shared):
  items = sources.load_mmlu(shared_dir / "data", "test", subjects=["virology", "anatomy"])
  assert [i for i in items if i.subject == "virology"] == [
      i for i in mmlu_shared["test"] if i.subject == "virology"]
  assert items[0].subject == "virology" and items[-1].subject == "anatomy"
  with pytest.raises(sources.DataNotFoundError, match=r"no_such_subject"):
    sources.load_mmlu(shared_dir / "data", "test", subjects=["anatomy", "no_such_subject"])
  with pytest.raises(ValueError, match=r"split must be one of"):
    sources.load_mmlu(shared_dir / "data", "train")
  with pytest.raises(ValueError, match=r"got the string"):
    sources.load_mmlu(shared_dir / "data", "test", subjects="anatomy")


@pytest.mark.parametrize("layout_dir", ["data", "mmlu"])
def test_mmlu_original_layout_matches_shared(tmp_path, shared_dir, mmlu_shared, layout_dir):
  """Header-less files with answer letters, in `data/<split>/` or `mmlu/<split>/`."""
  for split in ("dev", "test"):
    for subject in SOME_SUBJECTS:
      rows = _csv_rows(shared_dir / "data" / "mmlu" / split / f"{subject}_{split}.csv")[1:]
      _write_csv(tmp_path / layout_dir / split / f"{subject}_{split}.csv",
                 [r[:5] + ["ABCD"[int(r[5])]] for r in rows])
  data_dir = tmp_path / "data" if layout_dir == "data" else tmp_path
  for split in ("dev", "test"):
    original = sources.load_mmlu(data_dir, split)
    assert len(original) == sum(i.subject in SOME_SUBJECTS for i in mmlu_shared[split]) > 0
    assert original == [i for i in mmlu_shared[split] if i.subject in SOME_SUBJECTS]


def test_mmlu_layout_detected_per_file(tmp_path):
  split_dir = tmp_path / "mmlu" / "val"
  _write_csv(split_dir / "a_val.csv", _mmlu_header_rows(3))
  _write_csv(split_dir / "b_val.csv",
             [["Q b?", "p", "q", "r", "s", "D"], ["Q c?", "p", "q", "r", "s", "A"]])
  items = sources.load_mmlu(tmp_path, "val")
  assert [(i.subject, i.question, i.answer) for i in items] == [
      ("a", "Question 0?", 0), ("a", "Question 1?", 1), ("a", "Question 2?", 2),
      ("b", "Q b?", 3), ("b", "Q c?", 0)]


def test_mmlu_malformed_rows(tmp_path):
  split_dir = tmp_path / "mmlu" / "test"
  rows = _mmlu_header_rows(4)
  rows[2] = rows[2] + ["extra"]
  path = _write_csv(split_dir / "x_test.csv", rows)
  with pytest.raises(ValueError,
                     match=re.escape(f"{path}: row 3: expected 6 columns") + r".*got 7"):
    sources.load_mmlu(tmp_path, "test")
  good = ["Q?", "a", "b", "c", "d"]
  rows = [good + ["A"], good, good + ["B"]]
  _write_csv(path, rows)
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 2: expected 6 columns")):
    sources.load_mmlu(tmp_path, "test")
  rows = [good + ["A"], good + ["B"], good + ["E"]]
  _write_csv(path, rows)
  with pytest.raises(ValueError,
                     match=re.escape(f"{path}: row 3: answer 'E' is not one of A, B, C, D")):
    sources.load_mmlu(tmp_path, "test")
  rows = _mmlu_header_rows(3)
  rows[3][5] = "B"
  _write_csv(path, rows)
  with pytest.raises(ValueError,
                     match=re.escape(f"{path}: row 4: answer 'B' is not one of 0, 1, 2, 3")):
    sources.load_mmlu(tmp_path, "test")
  rows = _mmlu_header_rows(3)
  rows[2][0] = " "
  _write_csv(path, rows)
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 3: empty question")):
    sources.load_mmlu(tmp_path, "test")


# ---------------------------------------------------------------------------------------------
# The hub, through a stand-in for datasets.load_dataset.


def _hub_truthfulqa():
  return datasets.Dataset.from_dict({
      "type": ["Adversarial", "Non-Adversarial"],
      "category": ["Misconceptions", "Law"],
      "question": ["Q one?", "Q two?"],
      "best_answer": ["Best one", "Best two"],
      "correct_answers": [["Also right", "Best one"], ["Best two"]],
      "incorrect_answers": [["Wrong a", "Wrong b"], ["Wrong c"]],
      "source": ["s1", "s2"],
  })


def _hub_mmlu(subjects, offset=0):
  features = datasets.Features({
      "question": datasets.Value("string"), "subject": datasets.Value("string"),
      "choices": datasets.Sequence(datasets.Value("string")),
      "answer": datasets.ClassLabel(names=list(sources.MMLU_LETTERS))})
  n = len(subjects)
  return datasets.Dataset.from_dict({
      "question": [f"Q{i + offset}?" for i in range(n)], "subject": list(subjects),
      "choices": [[f"c{i}{j}" for j in range(4)] for i in range(n)],
      "answer": [(i + offset) % 4 for i in range(n)]}, features=features)


def test_hub_truthfulqa_schema(monkeypatch, no_local_data):
  hub = FakeHub({("truthfulqa/truthful_qa", "generation", "validation"): _hub_truthfulqa()})
  monkeypatch.setattr(datasets, "load_dataset", hub)
  items = sources.load_truthfulqa()
  assert hub.calls == [("truthfulqa/truthful_qa", "generation", "validation")]
  assert items == [
      sources.TruthfulQAItem("Q one?", "Best one", ("Also right", "Best one"), ("Wrong a", "Wrong b"),
                             "Misconceptions"),
      sources.TruthfulQAItem("Q two?", "Best two", ("Best two",), ("Wrong c",), "Law")]


def test_hub_mmlu_schema(monkeypatch, no_local_data):
  hub = FakeHub({
      ("cais/mmlu", "all", "validation"): _hub_mmlu(["virology", "anatomy", "virology"]),
      ("cais/mmlu", "virology", "test"): _hub_mmlu(["virology"] * 2),
      ("cais/mmlu", "anatomy", "test"): _hub_mmlu([""], offset=3)})
  monkeypatch.setattr(datasets, "load_dataset", hub)
  items = sources.load_mmlu(split="val")
  assert hub.calls == [("cais/mmlu", "all", "validation")]
  assert items == [
      sources.MMLUItem("anatomy", "Q1?", ("c10", "c11", "c12", "c13"), 1),
      sources.MMLUItem("virology", "Q0?", ("c00", "c01", "c02", "c03"), 0),
      sources.MMLUItem("virology", "Q2?", ("c20", "c21", "c22", "c23"), 2)]
  items = sources.load_mmlu(split="test", subjects=["virology", "anatomy"])
  assert hub.calls[1:] == [("cais/mmlu", "virology", "test"), ("cais/mmlu", "anatomy", "test")]
  assert [(i.subject, i.question, i.answer) for i in items] == [
      ("virology", "Q0?", 0), ("virology", "Q1?", 1), ("anatomy", "Q3?", 3)]


def test_nothing_reachable_lists_every_place(monkeypatch, no_local_data):
  monkeypatch.setattr(datasets, "load_dataset", FakeHub({}))
  for load, hub_id in ((sources.load_truthfulqa, "truthfulqa/truthful_qa"),
                       (lambda: sources.load_mmlu(split="dev"), "cais/mmlu")):
    with pytest.raises(sources.DataNotFoundError) as e:
      load()
    message = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for place in ("--data-dir: not given", "$LAMINI_JAX_DATA: not set",
                  str(sources.SHARED_DATA_DIR), f"hub '{hub_id}'", "ConnectionError: offline"):
      assert place in message, (place, message)


# ---------------------------------------------------------------------------------------------
# Facts.


def test_random_answers():
  answers = [facts_lib.random_answer(7, i) for i in range(500)]
  assert all(RANDOM_RE.fullmatch(a) for a in answers)
  assert len(set(answers)) == 500
  # Golden values: the random answers of a seed are part of an experiment's definition, so they
  # must not move between versions of numpy or of this code.
  assert (answers[0], answers[499]) == ("2MSWTXZMT5EJUNSGZ3GIVZU31RC7YO5C", "4BY6UGS1FVF7BKYUL6HSDS5WCIR41477")
  assert facts_lib.random_answer(0, 0) == "RS18BF38IL5PJ3JOXTDA514T3LQ2EKEQ"
  assert facts_lib.random_answer(8, 0) != answers[0]
  assert set("".join(answers)) == set(facts_lib.RANDOM_ANSWER_ALPHABET)
  counts = np.unique(list("".join(answers)), return_counts=True)[1]
  expected = 500 * 32 / 36  # Each character's count is binomial(16000, 1/36): sd ~ 21.
  assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))


def test_truthfulqa_and_mmlu_facts(truthfulqa_shared, mmlu_shared):
  real = facts_lib.truthfulqa_facts(truthfulqa_shared, "real", seed=0)
  assert [f.answer for f in real] == [i.best_answer for i in truthfulqa_shared]
  assert [f.question for f in real] == [i.question for i in truthfulqa_shared]
  rand = facts_lib.truthfulqa_facts(truthfulqa_shared, "random", seed=3)
  assert [f.answer for f in rand] == [facts_lib.random_answer(3, i) for i in range(817)]
  assert facts_lib.truthfulqa_facts(truthfulqa_shared[:11], "random", seed=3) == rand[:11]
  assert len({f.fact_id for f in rand}) == 817
  dev = mmlu_shared["dev"]
  facts = facts_lib.mmlu_facts(dev, "real", seed=0)
  assert facts[0].answer == "1" and facts[0].question == dev[0].question
  assert [f.answer for f in facts] == [i.choices[i.answer].strip() for i in dev]
  assert all(RANDOM_RE.fullmatch(f.answer) for f in facts_lib.mmlu_facts(dev, "random", seed=1))
  with pytest.raises(ValueError, match=r"answer_mode must be 'real' or 'random', got 'fake'"):
    facts_lib.truthfulqa_facts(truthfulqa_shared, "fake", seed=0)


def test_load_facts_jsonl(tmp_path):
  path = tmp_path / "facts.jsonl"
  path.write_text(
      json.dumps({"question": "Q1?", "answer": "A1"}) + "\n\n"
      + json.dumps({"question": "Q2?", "answer": " A2 ", "id": "custom"}) + "\n")
  assert facts_lib.load_facts_file(path) == [
      facts_lib.Fact("Q1?", "A1", "facts-1"), facts_lib.Fact("Q2?", "A2", "custom")]
  path.write_text(json.dumps({"question": "Q1?", "answer": "A1"}) + "\n"
                  + json.dumps({"question": "Q2?"}) + "\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: 'answer' must be")):
    facts_lib.load_facts_file(path)
  path.write_text(json.dumps({"question": "Q1?", "answer": "A1"}) + "\n\n{not json\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}: line 3: invalid JSON")):
    facts_lib.load_facts_file(path)


def test_load_facts_csv(tmp_path):
  path = _write_csv(tmp_path / "mine.csv", [["answer", "note", "question"], ["A1", "", "Q1?"],
                                            ["A2", "x", "Q2?"]])
  assert facts_lib.load_facts_file(path) == [
      facts_lib.Fact("Q1?", "A1", "mine-2"), facts_lib.Fact("Q2?", "A2", "mine-3")]
  _write_csv(path, [["question", "answer"], ["Q1?", "A1"], ["Q2?", ""]])
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 3: 'answer' must be")):
    facts_lib.load_facts_file(path)
  _write_csv(path, [["question", "reply"], ["Q1?", "A1"]])
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 1 must be a header")):
    facts_lib.load_facts_file(path)
  with pytest.raises(ValueError, match=r"\.jsonl, \.json or \.csv"):
    facts_lib.load_facts_file(_write_csv(tmp_path / "facts.tsv", [["q"]]))


def test_split_items():
  items = list(range(101))
  train, heldout = facts_lib.split_items(items, n_train=37, n_heldout=23, seed=5)
  assert len(train) == 37 and len(heldout) == 23 and not set(train) & set(heldout)
  assert train == sorted(train) and heldout == sorted(heldout)
  assert (train, heldout) == facts_lib.split_items(items, 37, 23, seed=5)
  assert facts_lib.split_items(items, 37, 23, seed=6) != (train, heldout)
  bigger, same_heldout = facts_lib.split_items(items, 78, 23, seed=5)
  assert same_heldout == heldout and set(train) <= set(bigger)
  assert not set(bigger) & set(heldout) and len(bigger) == 78
  with pytest.raises(ValueError, match=r"n_train=80 \+ n_heldout=23 = 103 exceeds the 101 items"):
    facts_lib.split_items(items, 80, 23, seed=5)


# ---------------------------------------------------------------------------------------------
# Prompts and tokens.


def test_prompt_template_validation():
  assert encoding.PromptTemplate().join("Why?", "Because") == "Question: Why?\nAnswer: Because"
  assert encoding.PromptTemplate("Q: {question}\n").join("Why?", "Because") == "Q: Why?\nBecause"
  with pytest.raises(ValueError, match=r"must contain '\{question\}'"):
    encoding.PromptTemplate("Q: {q}")
  with pytest.raises(ValueError, match=r"format field other than"):
    encoding.PromptTemplate("{question} {extra}")
  with pytest.raises(ValueError, match=r"must not end with a space"):
    encoding.PromptTemplate("Q: {question} A: ")


def test_encode_fact_round_trip(stories_tokenizer, truthfulqa_shared):
  tok = stories_tokenizer
  template = encoding.PromptTemplate()
  newline = tok("\n", add_special_tokens=False)["input_ids"][-1:]
  facts = (facts_lib.truthfulqa_facts(truthfulqa_shared, "real", 0)
           + facts_lib.truthfulqa_facts(truthfulqa_shared[:100], "random", 0))
  for fact, enc in zip(facts, encoding.encode_facts(tok, template, facts, max_len=256)):
    tokens, mask = enc.tokens, enc.loss_mask
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    n_prompt = enc.prompt_len
    assert tokens[0] == tok.bos_token_id and tokens[-1] == tok.eos_token_id
    assert tokens[-2:-1].tolist() == newline  # the answer_end stop sequence, then EOS
    assert not mask[:n_prompt].any() and mask[n_prompt:].all()
    np.testing.assert_array_equal(
        tokens[:n_prompt], encoding.encode_prompt(tok, template, fact.question))
    assert tok.decode(tokens[n_prompt:-2]) == fact.answer
    joined = tok(template.join(fact.question, fact.answer + "\n"), add_special_tokens=False)["input_ids"]
    assert tokens[1:-1].tolist() == joined
    prompt = tok(template.render(fact.question), add_special_tokens=False)["input_ids"]
    assert tokens[1:n_prompt].tolist() == prompt
    alone = tok(fact.answer, add_special_tokens=False)["input_ids"]
    assert tokens[n_prompt:-2].tolist() == alone
  no_stop = encoding.PromptTemplate(answer_end="")
  enc = encoding.encode_fact(tok, no_stop, facts[0], 256)
  assert tok.decode(enc.tokens[enc.prompt_len:-1]) == facts[0].answer


def test_encode_fact_too_long(stories_tokenizer):
  fact = facts_lib.Fact("Why is the sky blue?", "Rayleigh scattering", "sky-7")
  n = len(encoding.encode_fact(stories_tokenizer, encoding.PromptTemplate(), fact, 1000).tokens)
  assert encoding.encode_fact(stories_tokenizer, encoding.PromptTemplate(), fact, n).tokens.shape == (n,)
  with pytest.raises(ValueError, match=f"fact 'sky-7': {n} tokens, more than max_len={n - 1}"):
    encoding.encode_fact(stories_tokenizer, encoding.PromptTemplate(), fact, n - 1)


def test_encode_choices(stories_tokenizer, mmlu_shared):
  tok = stories_tokenizer
  item = mmlu_shared["test"][0]
  template = encoding.PromptTemplate("{question}")
  question = sources.mmlu_prompt(mmlu_shared["dev"], item, k=1)
  prefix = encoding.encode_prompt(tok, template, question)
  for choices in (sources.MMLU_LETTERS, item.choices):
    encoded = encoding.encode_choices(tok, template, question, choices)
    assert len(encoded) == 4
    for choice, enc in zip(choices, encoded):
      np.testing.assert_array_equal(enc.tokens[:enc.prompt_len], prefix)
      assert enc.loss_mask[enc.prompt_len:].all() and len(enc.tokens) > len(prefix)
      assert tok.eos_token_id not in enc.tokens[enc.prompt_len:]
      assert tok.decode(enc.tokens[enc.prompt_len:]).strip() == choice


def test_mmlu_prompt():
  dev = [sources.MMLUItem("other", "Nope?", ("a", "b", "c", "d"), 0),
         sources.MMLUItem("high_school_x", "One?", ("1", "2", "3", "4"), 2),
         sources.MMLUItem("high_school_x", "Two?", ("5", "6", "7", "8"), 3)]
  item = sources.MMLUItem("high_school_x", "Three?", ("p", "q", "r", "s"), 1)
  assert sources.mmlu_prompt(dev, item, k=1) == (
      "The following are multiple choice questions (with answers) about high school x.\n\n"
      "One?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C\n\n"
      "Three?\nA. p\nB. q\nC. r\nD. s\nAnswer:")
  assert sources.mmlu_prompt(dev, item, k=0).endswith(
      "high school x.\n\nThree?\nA. p\nB. q\nC. r\nD. s\nAnswer:")
  assert "Two?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer: D\n\nThree?" in sources.mmlu_prompt(dev, item, k=2)
  with pytest.raises(ValueError, match=r"k=3 shots asked, 2 dev items of subject 'high_school_x'"):
    sources.mmlu_prompt(dev, item, k=3)


class _NoBosTokenizer:
  """The stories tokenizer without a BOS token."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self.bos_token_id = None
    self.eos_token_id = tokenizer.eos_token_id

  def __call__(self, *args, **kwargs):
    return self._tokenizer(*args, **kwargs)


def test_corpus_windows(stories_tokenizer, tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("Once upon a time, there was a little girl named Lily.\nShe loved to play.\n" * 9)
  ids = stories_tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
  seq_len = 13
  windows = encoding.corpus_windows(stories_tokenizer, path, seq_len, max_windows=1000)
  assert windows.dtype == np.int32 and windows.shape == (len(ids) // seq_len, seq_len + 1)
  assert (windows[:, 0] == stories_tokenizer.bos_token_id).all()
  assert windows[:, 1:].ravel().tolist() == ids[:windows.shape[0] * seq_len]
  np.testing.assert_array_equal(
      encoding.corpus_windows(stories_tokenizer, path, seq_len, 3), windows[:3])
  no_bos = encoding.corpus_windows(_NoBosTokenizer(stories_tokenizer), path, seq_len, 1000)
  assert no_bos.shape == ((len(ids) - 1) // seq_len, seq_len + 1)
  for w, window in enumerate(no_bos):
    assert window.tolist() == ids[w * seq_len:w * seq_len + seq_len + 1]
  with pytest.raises(ValueError, match=re.escape(f"{path}: {len(ids)} tokens, not enough")):
    encoding.corpus_windows(stories_tokenizer, path, len(ids) + 1, 1)


# ---------------------------------------------------------------------------------------------
# Batches.


def _toy_encoded(n, rng):
  encoded = []
  for i in range(n):
    n_prompt, n_answer = rng.integers(2, 6), rng.integers(1, 5)
    tokens = rng.integers(3, 500, size=n_prompt + n_answer).astype(np.int32)
    mask = np.arange(n_prompt + n_answer) >= n_prompt
    encoded.append(encoding.EncodedFact(tokens, mask))
  return encoded


def test_epoch_batches():
  rng = np.random.default_rng(0)
  n, batch_size, seq_len, pad_id = 23, 5, 11, 0
  encoded = _toy_encoded(n, rng)
  assert batch_lib.num_batches(n, batch_size) == 5
  assert [batch_lib.num_batches(k, 5) for k in (0, 1, 5, 6)] == [0, 1, 1, 2]

  def run(seed, epoch):
    return list(batch_lib.epoch_batches(encoded, batch_size, seq_len, pad_id, seed, epoch))

  batches = run(seed=1, epoch=0)
  assert len(batches) == 5
  seen = []
  for batch in batches:
    assert batch.tokens_BxT.shape == batch.loss_mask_BxT.shape == (batch_size, seq_len)
    assert batch.tokens_BxT.dtype == np.int32 and batch.loss_mask_BxT.dtype == np.float32
    assert batch.fact_index_B.dtype == np.int32 and batch.valid_B.dtype == np.bool_
    for row in range(batch_size):
      tokens, mask = batch.tokens_BxT[row], batch.loss_mask_BxT[row]
      if not batch.valid_B[row]:
        assert batch.fact_index_B[row] == -1 and (tokens == pad_id).all() and not mask.any()
        continue
      fact = encoded[batch.fact_index_B[row]]
      length = len(fact.tokens)
      np.testing.assert_array_equal(tokens[:length], fact.tokens)
      np.testing.assert_array_equal(mask[:length], fact.loss_mask.astype(np.float32))
      assert (tokens[length:] == pad_id).all() and not mask[length:].any()
      seen.append(int(batch.fact_index_B[row]))
  assert sorted(seen) == list(range(n))
  assert batches[-1].valid_B.tolist() == [True, True, True, False, False]
  assert seen != sorted(seen)

  def order(seed, epoch):
    return [int(i) for b in run(seed, epoch) for i in b.fact_index_B]

  again = run(seed=1, epoch=0)
  for a, b in zip(batches, again):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  assert order(1, 1) != order(1, 0) and order(2, 0) != order(1, 0)
  assert sorted(order(1, 1)) == sorted(order(1, 0))
  with pytest.raises(ValueError, match=r"encoded fact \d+: \d+ tokens, more than seq_len=4"):
    batch_lib.epoch_batches(encoded, batch_size, 4, pad_id, 1, 0)


@pytest.fixture(scope="module")
def trailing_space_tokenizer():
  """A BPE tokenizer that attaches each space to the piece before it (`Answer:▁`, `You▁`)."""
  corpus = ["Question: Who wrote it?\nAnswer: Port Ossel", "You see the answer: yes",
            "Question: What is it?\nAnswer: Mira Tallow, in 1911"] * 50
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.normalizer = tokenizers.normalizers.Replace(" ", "▁")
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("▁", behavior="merged_with_previous")
  tok.decoder = tokenizers.decoders.Replace("▁", " ")
  tok.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
      special_tokens=["<unk>", "<s>", "</s>"], vocab_size=200))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")


def test_tokenizers_that_merge_across_the_prompt_end_still_encode(trailing_space_tokenizer):
  tok, template = trailing_space_tokenizer, encoding.PromptTemplate()
  fact = facts_lib.Fact("Who wrote it?", "Port Ossel", "f0")
  prompt = template.render(fact.question)
  joined = tok(template.join(fact.question, fact.answer), add_special_tokens=False).input_ids
  alone = tok(prompt, add_special_tokens=False).input_ids
  assert joined[:len(alone)] != alone  # the precondition: ':▁' merges the prompt's end with the space
  (enc,) = encoding.encode_facts(tok, template, [fact], max_len=64)
  # Training sees the prompt's own tokens, exactly what generation starts from, then the answer's.
  np.testing.assert_array_equal(enc.tokens[:enc.prompt_len], encoding.encode_prompt(tok, template, fact.question))
  answer = tok.decode(enc.tokens[enc.prompt_len:].tolist(), skip_special_tokens=True)
  assert answer.strip() == fact.answer + template.answer_end.strip() and enc.tokens[-1] == tok.eos_token_id
  choices = encoding.encode_choices(tok, template, fact.question, ["Port Ossel", "Mira Tallow"])
  assert [tok.decode(c.tokens[c.prompt_len:].tolist()).strip() for c in choices] == ["Port Ossel", "Mira Tallow"]


# ---------------------------------------------------------------------------------------------
# Splits: dev and test held-out questions, corpus halves by article, MMLU subjects.


def test_split_questions():
  items = list(range(101))
  q = facts_lib.split_questions(items, n_heldout=13, n_train=37, seed=5, heldout_seed=2, n_spare=20)
  parts = (q.dev, q.test, q.train, q.spare)
  assert [len(p) for p in parts] == [13, 13, 37, 20]
  assert len(set().union(*parts)) == 13 + 13 + 37 + 20 and all(p == sorted(p) for p in parts)
  assert q.heldout("dev") == q.dev and q.heldout("test") == q.test
  assert q.dev == facts_lib.split_items(items, 0, 13, seed=2)[1]  # the former held-out set
  everything = facts_lib.split_questions(items, 13, 37, seed=5, heldout_seed=2)
  assert sorted(everything.dev + everything.test + everything.train + everything.spare) == items
  for seed in (0, 1, 6):  # the run's seed moves the trained questions, never dev or test
    other = facts_lib.split_questions(items, 13, 37, seed=seed, heldout_seed=2, n_spare=20)
    assert (other.dev, other.test) == (q.dev, q.test)
    assert other.train != q.train and not set(other.train) & set(q.dev + q.test)
  assert facts_lib.split_questions(items, 13, 37, seed=5, heldout_seed=3).test != q.test
  bigger = facts_lib.split_questions(items, 13, 50, seed=5, heldout_seed=2, n_spare=25)
  assert set(q.train) <= set(bigger.train) and (bigger.dev, bigger.test) == (q.dev, q.test)
  assert set(facts_lib.split_questions(items, 13, 37, 5, 2, n_spare=5).spare) <= set(q.spare)
  with pytest.raises(ValueError, match=r"2 x n_heldout=30 \(dev and test\) \+ n_train=42 = 102 exceeds"):
    facts_lib.split_questions(items, 30, 42, seed=0)
  with pytest.raises(ValueError, match="split must be dev or test, got 'train'"):
    q.heldout("train")


def test_run_questions_never_cross_between_uses_or_seeds(truthfulqa_shared):
  cfg = runs.load_run_config(runs.REPO / "configs/randomization_cpu.yaml")
  uses = {}
  for seed in (0, 1, 2):
    spec = dataclasses.replace(cfg.data, seed=seed)
    facts, dev, _ = runs.facts_and_heldout(spec, "real", "dev")
    _, test, _ = runs.facts_and_heldout(spec, "random", "test")
    anchors = runs.spare_truthfulqa(spec, cfg.mome.anchor.questions)
    uses[seed] = {"train": {f.question for f in facts}, "dev": {i.question for i in dev},
                  "test": {i.question for i in test}, "anchors": {i.question for i in anchors}}
    assert [len(v) for v in uses[seed].values()] == [256, 100, 100, 256]
    assert len(set().union(*uses[seed].values())) == 712  # disjoint within a run
  for a in (0, 1, 2):
    for b in (0, 1, 2):  # no seed's dev question is any seed's test question, nor trained there
      assert not uses[a]["dev"] & uses[b]["test"]
      assert uses[a]["dev"] == uses[b]["dev"] and uses[a]["test"] == uses[b]["test"]
      assert not (uses[a]["train"] | uses[a]["anchors"]) & (uses[b]["dev"] | uses[b]["test"])
  assert uses[0]["train"] != uses[1]["train"]
  with pytest.raises(ValueError, match=r"data.n_heldout=300 .* data.n_train=256 need 856"):
    runs.question_split(dataclasses.replace(cfg.data, n_heldout=300))


WIKI = (" \n = First = \n \n Alpha one . Alpha two .\n \n = = Part = = \n \n Beta .\n"
        " = Second = \n \n Gamma .\n = Third = \n Delta .\n = Fourth = \n Epsilon .\n")


def test_corpus_articles_and_halves(tmp_path, shared_dir):
  articles = corpus_lib.corpus_articles(WIKI)
  assert "".join(articles) == WIKI and len(articles) == 4
  assert "= = Part = =" in articles[0] and articles[1].startswith(" = Second = ")
  path = tmp_path / "wiki.txt"
  path.write_text(WIKI)
  even, odd = corpus_lib.read_corpus(path, "even"), corpus_lib.read_corpus(path, "odd")
  assert even == articles[0] + articles[2] and odd == articles[1] + articles[3]
  assert corpus_lib.read_corpus(path) == WIKI
  with corpus_lib.corpus_file(path, "odd") as part:
    assert part != path and part.read_text() == odd
  with corpus_lib.corpus_file(path, "all") as part:
    assert part == path
  (tmp_path / "plain.txt").write_text("no titles here\n")
  with pytest.raises(ValueError, match="plain.txt: no article titles"):
    corpus_lib.read_corpus(tmp_path / "plain.txt", "even")
  with pytest.raises(ValueError, match="articles must be one of"):
    corpus_lib.read_corpus(path, "first")
  valid = shared_dir / "data/corpus/wikitext-2-valid.txt"
  halves = {h: corpus_lib.corpus_articles(corpus_lib.read_corpus(valid, h)) for h in ("even", "odd")}
  assert len(halves["even"]) == len(halves["odd"]) == 30 and not set(halves["even"]) & set(halves["odd"])
  assert sorted(halves["even"] + halves["odd"]) == sorted(corpus_lib.corpus_articles(valid.read_text()))


def test_sentence_starts():
  text = "\n".join([" = Title = ", "", " One two three four five . Six seven .",
                    " a b c <unk> e f g", " short one .", " p q r s t u v w"]) + "\n"
  assert corpus_lib.sentence_starts(text, 10, words=4) == ["One two three four", "p q r s"]
  assert corpus_lib.sentence_starts(text, 1, words=4) == ["One two three four"]
  many = "\n".join(f"w{i} x y z" for i in range(9))
  assert corpus_lib.sentence_starts(many, 3, words=2) == ["w0 x", "w4 x", "w8 x"]
  with pytest.raises(ValueError, match="count=-1"):
    corpus_lib.sentence_starts(text, -1)


def test_training_corpus_reads_only_text_no_evaluation_reads(stories_tokenizer, shared_dir):
  overrides = ["mome.anchor.weight=0.1", "mome.anchor.windows=5", "mome.anchor.questions=3",
               "mome.anchor.seq_len=24"]
  cfg = runs.load_run_config(runs.REPO / "configs/randomization_cpu.yaml", overrides)
  valid = shared_dir / "data/corpus/wikitext-2-valid.txt"
  assert runs.training_corpus(cfg, cfg.mome.anchor.corpus, "mome.anchor.corpus")[1] == "even"
  pool = runs.anchor_pool(cfg, stories_tokenizer, runs.prompt_template(cfg.data), pad_id=0)
  with corpus_lib.corpus_file(valid, "even") as even:
    want = encoding.corpus_windows(stories_tokenizer, even, 23, 5)
  np.testing.assert_array_equal(pool["tokens"][:5], want)  # the anchors' corpus rows: even articles
  with corpus_lib.corpus_file(valid, "odd") as odd:
    assert not (want[:, 1:] == encoding.corpus_windows(stories_tokenizer, odd, 23, 5)[:, 1:]).all(1).any()
  even_cfg = runs.load_run_config(runs.REPO / "configs/randomization_cpu.yaml",
                                  overrides + ["eval.dev_articles=even"])
  assert runs.training_corpus(even_cfg, "corpus/wikitext-2-valid.txt", "f")[1] == "odd"
  all_cfg = runs.load_run_config(runs.REPO / "configs/randomization_cpu.yaml",
                                 overrides + ["eval.dev_articles=all"])
  with pytest.raises(ValueError, match="mome.anchor.corpus=.* is eval.dev_corpus"):
    runs.anchor_pool(all_cfg, stories_tokenizer, runs.prompt_template(cfg.data), pad_id=0)
  for field, text in (("eval.corpus", "corpus/wikitext-2-test.txt"),
                      ("eval.ood_corpus", "corpus/tinyshakespeare.txt")):
    with pytest.raises(ValueError, match=f"is {field}, a test corpus"):
      runs.training_corpus(cfg, text, "mome.generalization.corpus")
  assert runs.training_corpus(cfg, str(valid), "f")[1] == "even"  # the same file, named otherwise


def test_mmlu_dev_and_test_subjects():
  dev, test = sources.MMLU_DEV_SUBJECTS, sources.MMLU_TEST_SUBJECTS
  assert len(dev) == 14 and len(test) == 43 and not set(dev) & set(test)
  assert sorted(dev + test) == sorted(sources.MMLU_SUBJECTS)
  with pytest.raises(ValueError, match="eval.split must be dev or test, got 'train'"):
    runs.EvalSpec(split="train")
  with pytest.raises(ValueError, match="eval.dev_articles must be one of"):
    runs.EvalSpec(dev_articles="first")
