"""`python -m experiments.sequential`: its settings and facts, and a tiny run on the shared
stories260K (6 made-up facts in 3 batches, MoME and LoRA continued, then 1 forgotten and 1
updated), resumed after its last rows are lost."""

import json
import shutil

import pytest

from experiments import sequential
from lamini_jax import facts as facts_cli
from lamini_jax.data import sources

slow = pytest.mark.slow  # a whole (tiny) run of the experiment

# 2^12 rank-1 keyed experts without anchors (the MoME of tests/facts_test.py, smaller); LoRA as in
# tests/tune_test.py. Held-out figures on 2 TruthfulQA questions and one 32-token window.
TINY = ["--n-facts", "6", "--batches", "3", "--methods", "mome,lora-continued", "--dev-questions", "2",
        "--no-progress", "--set", "eval.ppl_windows=1", "--set", "eval.ppl_seq_len=32",
        "--set", "mome.layer.num_experts=4096", "--set", "mome.layer.num_heads=4",
        "--set", "mome.layer.top_k=2", "--set", "mome.anchor.weight=0",
        "--set", "mome.train.batch_size=8", "--set", "mome.train.optimizer.decay_steps=0",
        "--set", "mome.train.epochs=30", "--set", "train.batch_size=2", "--set", "train.epochs=40",
        "--set", "eval.recall_every=2"]


def _rows(run_dir):
  return [json.loads(line) for line in (run_dir / sequential.ROWS_FILE).read_text().splitlines()]


def test_bad_flags_are_errors_that_name_the_flag(tmp_path, capsys):
  for flags, message in ((["--methods", "mome,nope"], "--methods must be distinct names among"),
                         (["--methods", "mome,mome"], "--methods must be distinct"),
                         (["--batches", "0"], "--batches must be in [1, 2000], got 0"),
                         (["--edit-fraction", "0.7"], "--edit-fraction must be in [0, 0.5], got 0.7"),
                         (["--facts", "wiki"], "--facts must be one of synthetic, mmlu, got 'wiki'"),
                         (["--set", "data.n_train=3"], "--set data.n_train: lamini_jax.tune sets it")):
    assert sequential.main(["--run-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (flags, err)
  assert not (tmp_path / "run").exists()


def test_config_defaults_batches_and_the_retraining_schedule(tmp_path):
  s = sequential.Settings(n_facts=10, batches=3, retrain_every=2)
  assert s.ends().tolist() == [0, 3, 7, 10]
  assert s.retrained_after() == [2, 3]
  assert sequential.Settings(n_facts=20, batches=7, retrain_every=3).retrained_after() == [3, 6, 7]
  cfg, given = sequential.build_config(s, tmp_path,
                                       overrides=["eval.ppl_windows=3", "mome.train.epochs=7"])
  assert (cfg.eval.ppl_windows, cfg.eval.mmlu_questions, cfg.eval.locality_prompts) == (3, 0, 0)
  assert cfg.mome.train.epochs == 7 and {"eval.ppl_windows", "mome.train.epochs"} <= given
  assert cfg.method == "mome" and cfg.run_dir == str(tmp_path / "mome") and cfg.data.n_train == 3
  assert cfg.data.facts_file == str((tmp_path / sequential.FACTS_FILE).resolve())


def test_mmlu_facts_are_short_distinct_questions_with_their_correct_choice():
  s = sequential.Settings(facts="mmlu", n_facts=40, batches=4, seed=2)
  items, mmlu = sequential.load_items(s, None)
  assert len(items) == len(mmlu) == 40 and len({i.fact.question for i in items}) == 40
  for item, source in zip(items, mmlu):
    assert item.paraphrase is None and item.fact.question == source.question
    assert len(source.question) <= sequential.MMLU_MAX_QUESTION_CHARS
    assert item.fact.answer == source.choices[source.answer].strip()
    assert item.alternative in [c.strip() for c in source.choices]
    assert item.alternative != item.fact.answer
  assert sequential.load_items(s, None)[0] == items
  assert set(mmlu) <= set(sources.load_mmlu(None, split="test"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("sequential") / "run"
  assert sequential.main(["--run-dir", str(run_dir), *TINY]) == 0
  return run_dir


@slow
def test_every_batch_is_measured_for_every_method(tiny_run):
  rows = _rows(tiny_run)
  assert [(r["phase"], r["batch"], r["method"]) for r in rows] == [
      ("add", b, m) for b in (1, 2, 3) for m in ("mome", "lora-continued")] + [
      ("edit", 3, "mome"), ("edit", 3, "lora-continued")]
  for r in rows:
    assert r["batches"] == 3 and r["seconds"] > 0 and set(r["heldout"]) >= {"answer_loss", "perplexity"}
    assert r["generality"] is not None  # every synthetic fact has its paraphrase
  for b, (mome, lora) in enumerate(zip(rows[0:6:2], rows[1:6:2]), start=1):
    assert mome["facts"] == lora["facts"] == 2 * b and mome["batch_facts"] == 2
    assert mome["recall_all"] == mome["recall_batch"] == 1.0, mome  # MoME keeps every batch
    assert lora["trained_facts"] == 2  # continued: the new batch only
  assert rows[0]["recall_earlier"] is None and rows[2]["recall_earlier"] is not None
  summary = json.loads((tiny_run / sequential.SUMMARY_FILE).read_text())
  assert summary["batch_sizes"] == [2, 2, 2]
  assert set(summary["seconds_adding"]) == {"mome", "lora-continued"}
  assert summary["last_rows"]["mome edit"] == rows[6]
  facts = [json.loads(line) for line in (tiny_run / sequential.FACTS_FILE).read_text().splitlines()]
  assert [f["batch"] for f in facts] == [1, 1, 2, 2, 3, 3] and all(f["paraphrase"] for f in facts)


@slow
def test_forgotten_facts_are_gone_and_updated_ones_recalled(tiny_run):
  mome, lora = _rows(tiny_run)[6:]
  assert mome["forgotten"] == mome["updated"] == 1 and mome["facts"] == 5
  assert mome["recall_forgotten"] == 0.0 and mome["recall_updated"] == 1.0
  assert mome["recall_updated_old"] == 0.0 and mome["recall_kept"] == 1.0 == mome["recall_all"]
  # The forgotten answer's loss is back at the base model's (it was memorized: near 0 before).
  assert mome["forgotten_answer_loss_base"] > 1.0
  assert mome["forgotten_answer_loss"] == pytest.approx(mome["forgotten_answer_loss_base"], abs=0.05)
  assert lora["forgotten_answer_loss_base"] == mome["forgotten_answer_loss_base"]
  assert lora["trained_facts"] == 1  # continued: the updated fact only
  # The MoME run's committed memory is the edited fact set, with the new answer.
  facts = [json.loads(line) for line in (tiny_run / sequential.FACTS_FILE).read_text().splitlines()]
  _, stored = facts_cli.ensure_registry(facts_cli.open_run(tiny_run / "mome"))
  assert len(stored) == 5
  changed = [(f, s) for f in facts for s in stored if s.id == f["id"] and s.answer != f["answer"]]
  assert len(changed) == 1 and changed[0][1].answer == changed[0][0]["alternative"]


@slow
def test_resume_measures_only_what_is_missing(tiny_run, tmp_path, capsys):
  run_dir = tmp_path / "run"
  shutil.copytree(tiny_run, run_dir)
  rows = _rows(run_dir)
  # Killed while writing the first edit row, after the MoME edit was committed.
  (run_dir / sequential.ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows[:6]) + '{"pha')
  assert sequential.main(["--run-dir", str(run_dir), *TINY]) == 2  # --resume, or another directory
  assert "holds a run: pass --resume" in capsys.readouterr().err
  assert sequential.main(["--run-dir", str(run_dir), *TINY, "--resume", "--seed", "1"]) == 2
  assert "differs in settings.seed" in capsys.readouterr().err
  assert sequential.main(["--run-dir", str(run_dir), *TINY, "--resume"]) == 0
  again = _rows(run_dir)
  assert again[:6] == rows[:6] and [(r["phase"], r["method"]) for r in again[6:]] == [
      ("edit", "mome"), ("edit", "lora-continued")]
  assert again[6]["seconds"] is None and "committed before a restart" in again[6]["note"]
  assert again[6]["recall_forgotten"] == 0.0 and again[6]["recall_updated"] == 1.0
  assert again[7]["trained_facts"] == 1 and again[7]["seconds"] > 0  # from the batch-3 adapters
