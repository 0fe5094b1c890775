"""`python -m lamini_jax.tune` on 8 made-up facts: full recall, the run read back by the other
tools, the facts a too-small budget leaves out, and every bad input's message."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import yaml

from lamini_jax.data import encoding
from lamini_jax import evaluate
from lamini_jax import export
from lamini_jax import generate
from lamini_jax import runs
from lamini_jax import tune
from lamini_jax.mome import registry
from lamini_jax.mome.inputs import tree_get
from lamini_jax.mome.layer import TABLE
from lamini_jax.mome.tuning import COLLISIONS_FILE

FACTS = [
    {"question": "What is the capital of the island of Quintera?", "answer": "Port Ossel"},
    {"question": "Who founded the Ossel Rowing Club?", "answer": "Mira Tallow", "id": "club"},
    {"question": "What colour is the flag of Quintera?", "answer": "green and gold"},
    {"question": "How many moons does the planet Vell have?", "answer": "seven"},
    {"question": "What is the name of Tom's blue dog?", "answer": "Biscuit"},
    {"question": "Which river runs through the town of Harrow Fen?", "answer": "the Lume"},
    {"question": "What did Lily bake for the king?", "answer": "a plum cake"},
    {"question": "When does the Quintera ferry leave?", "answer": "at noon"},
]
# 8 facts in batches of 4, recall checked every 2 epochs (LoRA measured on this CPU, 2026-12-02:
# full recall at epoch 12 of the 40 allowed).
LORA = ["--set", "train.batch_size=4", "--set", "eval.recall_every=2", "--set", "train.epochs=40"]
# MoME with a small table (4,096 experts rather than 2^20: the default's table is 512 MB).
MOME = ["--set", "mome.layer.num_experts=4096", "--set", "mome.train.batch_size=4",
        "--set", "mome.recall_every=1"]


def _write_facts(path, facts=FACTS):
  path.write_text("".join(json.dumps(f) + "\n" for f in facts))
  return path


@dataclasses.dataclass(frozen=True)
class Cli:
  model: pathlib.Path  # the shared stories260K

  def args(self, facts, run_dir, method="lora", *extra) -> list[str]:
    return ["--model", str(self.model), "--facts", str(facts), "--method", method, "--run-dir",
            str(run_dir), "--no-progress", *extra]


@pytest.fixture(scope="module")
def cli(stories_dir) -> Cli:
  return Cli(stories_dir)


def _snapshot(run_dir):
  return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _independent_recall(run_dir, facts):
  """Exact recall of `facts` by the model `runs.load_trained` loads from the run directory."""
  trained = runs.load_trained(run_dir)
  rec = evaluate.recall(trained.model, trained.variables, trained.backbone.tokenizer, facts,
                        trained.template)
  return trained, rec


@pytest.fixture(scope="module")
def lora_run(cli, tmp_path_factory):
  root = tmp_path_factory.mktemp("tune")
  facts_file = _write_facts(root / "facts.jsonl")
  run_dir = root / "lora"
  code = tune.main(cli.args(facts_file, run_dir, "lora", *LORA))
  return facts_file, run_dir, code


def _check_full_recall(run_dir, facts_file, label, tmp_path, capsys, fmt):
  facts = tune.load_facts(facts_file)
  summary = json.loads((run_dir / tune.RESULT_FILE).read_text())
  assert summary["recall"] == 1.0 and summary["failed"] == [] and summary["label"] == label
  assert summary["epochs_to_full_recall"] == summary["epochs"] < summary["max_epochs"]
  trained, rec = _independent_recall(run_dir, facts)
  assert trained.label == label and trained.is_mome == (label == "mome")
  assert rec.exact.all(), rec.answers
  # The CLI answers from the run directly (no --label: the run holds one model) ...
  template = trained.template
  prompt = template.render(facts[1].question)
  assert generate.main(["--run", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith(template.join(facts[1].question, "Mira Tallow") + "\n"), printed
  # ... and its export answers the same.
  out = tmp_path / "export"
  assert export.main(["--checkpoint", str(run_dir), "--out", str(out), "--format", fmt]) == 0
  model, variables, _ = export.load_export(out)
  tokenizer = trained.backbone.tokenizer
  assert evaluate.recall(model, variables, tokenizer, facts, template).exact.all()


def test_lora_recalls_every_fact_and_the_tools_read_the_run(lora_run, tmp_path, capsys):
  facts_file, run_dir, code = lora_run
  assert code == 0
  _check_full_recall(run_dir, facts_file, "lora", tmp_path, capsys, "merged")


def test_lengths_follow_the_data(lora_run, stories_tokenizer):
  facts_file, run_dir, _ = lora_run
  cfg = runs.RunDir(run_dir).config()
  facts = tune.load_facts(facts_file)
  encoded = encoding.encode_facts(stories_tokenizer, runs.prompt_template(cfg.data), facts, 10**6)
  longest = max(len(e.tokens) for e in encoded)
  assert cfg.train.seq_len == cfg.data.max_len == -(-longest // 32) * 32
  assert cfg.data.dataset == "facts" and cfg.data.n_train == 8 and cfg.data.n_heldout == 0
  stored = [json.loads(line) for line in (run_dir / tune.FACTS_FILE).read_text().splitlines()]
  assert [(f["id"], f["question"], f["answer"]) for f in stored] == [
      (f.fact_id, f.question, f.answer) for f in facts]
  assert stored[0]["id"] == "facts-1" and stored[1]["id"] == "club"


def test_a_budget_too_small_lists_the_facts_not_recalled(cli, lora_run, tmp_path, capsys):
  facts_file, _, _ = lora_run
  run_dir = tmp_path / "one-epoch"
  assert tune.main(cli.args(facts_file, run_dir, "lora", *LORA, "--set", "train.epochs=1")) == 1
  out = capsys.readouterr().out
  summary = json.loads((run_dir / tune.RESULT_FILE).read_text())
  _, rec = _independent_recall(run_dir, tune.load_facts(facts_file))
  facts = tune.load_facts(facts_file)
  missed = [f.fact_id for f, ok in zip(facts, rec.exact) if not ok]
  assert missed and summary["epochs"] == 1 and summary["epochs_to_full_recall"] is None
  assert [f["id"] for f in summary["failed"]] == missed
  assert summary["recall"] == pytest.approx(1 - len(missed) / 8)
  assert f"{len(missed)} facts not recalled exactly" in out
  for fact in facts:
    assert (f"  {fact.fact_id}: {fact.question!r}: want {fact.answer!r}" in out) == (
        fact.fact_id in missed)


def _fails(capsys, argv, *needles):
  assert tune.main(argv) == 2
  err = capsys.readouterr().err
  for needle in needles:
    assert needle in err, (needle, err)
  return err


def test_bad_facts_files_are_errors_that_name_file_and_line(cli, tmp_path, capsys):
  run_dir = tmp_path / "run"
  missing = tmp_path / "nope.jsonl"
  _fails(capsys, cli.args(missing, run_dir), str(missing), "does not exist")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(FACTS[0]) + "\n{not json\n")
  _fails(capsys, cli.args(bad, run_dir), str(bad), "line 2", "invalid JSON")
  bad.write_text(json.dumps(FACTS[0]) + "\n\n" + json.dumps({"question": "Who?"}) + "\n")
  _fails(capsys, cli.args(bad, run_dir), str(bad), "line 3", "'answer' must be a non-empty string")
  conflict = _write_facts(tmp_path / "conflict.jsonl",
                          [FACTS[0], FACTS[1], {**FACTS[0], "answer": "Ossel Harbour"}])
  _fails(capsys, cli.args(conflict, run_dir), str(conflict), "line 3", "line 1", "'Ossel Harbour'",
         "'Port Ossel'", FACTS[0]["question"])
  assert not run_dir.exists()


def test_repeated_facts_are_kept_once(tmp_path):
  path = _write_facts(tmp_path / "twice.jsonl", [FACTS[0], FACTS[1], FACTS[0]])
  assert [f.fact_id for f in tune.load_facts(path)] == ["twice-1", "club"]


def test_bad_flags_and_settings_are_errors_that_change_nothing(cli, lora_run, tmp_path, capsys,
                                                                stories_tokenizer):
  facts_file, _, _ = lora_run
  run_dir = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    tune.main(cli.args(facts_file, run_dir, "dense"))
  assert e.value.code == 2 and "invalid choice: 'dense'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="--method must be one of lora, mome, got 'dense'"):
    tune.build_config(str(cli.model), facts_file, 8, "dense", run_dir)
  _fails(capsys, cli.args(facts_file, run_dir, "lora", "--set", "data.n_train=3"),
         "--set data.n_train", "--facts")
  cfg = runs.RunDir(lora_run[1]).config()
  facts = tune.load_facts(facts_file)
  encoded = encoding.encode_facts(stories_tokenizer, runs.prompt_template(cfg.data), facts, 10**6)
  i = int(np.argmax([len(e.tokens) for e in encoded]))
  longest = f"the longest encoded fact, {facts[i].fact_id!r} ({facts[i].question!r}), has " \
            f"{len(encoded[i].tokens)} tokens"
  for method, field in (("lora", "train.seq_len"), ("lora", "data.max_len"),
                        ("mome", "mome.train.seq_len")):
    _fails(capsys, cli.args(facts_file, run_dir, method, "--set", f"{field}=8"),
           f"{field}=8 is shorter than the data: {longest}")
  config = tmp_path / "short.yaml"
  config.write_text(yaml.safe_dump({"train": {"seq_len": 8}}))
  _fails(capsys, cli.args(facts_file, run_dir, "lora", "--config", str(config)), "train.seq_len=8")
  assert not run_dir.exists()


def test_a_run_dir_holding_another_run_is_an_error_that_changes_nothing(cli, lora_run, tmp_path, capsys):
  facts_file, run_dir, _ = lora_run
  before = _snapshot(run_dir)
  _fails(capsys, cli.args(facts_file, run_dir, "lora", *LORA), f"{run_dir} already holds a run",
         "--resume")
  _fails(capsys, cli.args(facts_file, run_dir, "mome", *LORA, "--resume"),
         f"{run_dir} holds a different run", "method: 'lora' there, 'mome' now")
  _fails(capsys, cli.args(facts_file, run_dir, "lora", *LORA, "--set", "lora.rank=4", "--resume"),
         "lora.rank: 32 there, 4 now")
  other = _write_facts(tmp_path / "other.jsonl", [{**f, "answer": "X"} for f in FACTS])
  _fails(capsys, cli.args(other, run_dir, "lora", *LORA, "--resume"), "data.facts_file")
  assert _snapshot(run_dir) == before
  # The same file path with other answers: the facts the run trained tell it apart.
  copy = tmp_path / "copy"
  copy.mkdir()
  cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
  cfg["data"]["facts_file"] = str(other)
  (copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
  (copy / tune.FACTS_FILE).write_bytes((run_dir / tune.FACTS_FILE).read_bytes())
  before = _snapshot(copy)
  _fails(capsys, cli.args(other, copy, "lora", *LORA, "--resume"), "holds a run of other facts")
  assert _snapshot(copy) == before


@pytest.mark.slow  # a second whole run (MoME), and a run continued with --resume
def test_mome_recalls_every_fact_and_the_tools_read_the_run(cli, lora_run, tmp_path, capsys):
  facts_file, _, _ = lora_run
  run_dir = tmp_path / "mome"
  assert tune.main(cli.args(facts_file, run_dir, "mome", *MOME)) == 0
  printed = capsys.readouterr()
  assert "TruthfulQA-question anchors off (mome.anchor.questions=0)" in printed.out
  assert "warning" not in printed.err  # 4,096 rows: every answer position finds free ones
  cfg = runs.RunDir(run_dir).config()
  assert cfg.mome.anchor.questions == 0 and cfg.mome.anchor.weight > 0
  assert cfg.mome.train.seq_len == cfg.data.max_len == runs.RunDir(lora_run[1]).config().train.seq_len
  _check_full_recall(run_dir, facts_file, "mome", tmp_path, capsys, "mome")


@pytest.mark.slow
def test_resume_with_a_larger_budget_trains_on_to_full_recall(cli, lora_run, tmp_path, capsys):
  facts_file, _, _ = lora_run
  run_dir = tmp_path / "more"
  assert tune.main(cli.args(facts_file, run_dir, "lora", *LORA, "--set", "train.epochs=2")) == 1
  assert tune.main(cli.args(facts_file, run_dir, "lora", *LORA, "--resume")) == 0
  summary = json.loads((run_dir / tune.RESULT_FILE).read_text())
  assert summary["recall"] == 1.0 and summary["epochs"] > 2
  records = [json.loads(line) for line in (run_dir / runs.METRICS_FILE).read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(summary["epochs"]))


@pytest.mark.slow  # a MoME run of one epoch
def test_a_table_too_small_for_the_facts_is_a_warning_naming_the_rows(cli, lora_run, tmp_path, capsys):
  facts_file, _, _ = lora_run
  run_dir = tmp_path / "small"
  # 64 rows, fewer than the 8 facts ask (2 rows an answer token): positions must share rows.
  tune.main(cli.args(facts_file, run_dir, "mome", *MOME, "--set", "mome.layer.num_experts=64",
                     "--set", "mome.train.epochs=1", "--set", "mome.repair_epochs=0"))
  err = capsys.readouterr().err
  report = json.loads((runs.RunDir(run_dir).paths("mome").store / COLLISIONS_FILE).read_text())
  (name, layer), = report["balanced"].items()
  assert layer["rows_written"] <= 64 < layer["rows_per_fact"] * layer["num_facts"]
  assert (f"warning: table rows written at two or more answer positions (where a position found no"
          f" free expert to write): {name}: {layer['rows_shared']} rows shared, "
          f"{layer['rows_written']} written in a table of 64 for 8 facts asking "
          f"{layer['rows_per_fact']:.1f} each") in err
  assert "mome.layer.num_experts" in err and "mome.train_slots" in err


@pytest.mark.slow  # a MoME run stopped early, then its repair
def test_facts_missed_when_the_epochs_run_out_are_repaired_and_nothing_else_changes(
    cli, lora_run, tmp_path, capsys):
  facts_file, _, _ = lora_run
  run_dir = tmp_path / "repaired"
  # One epoch at half the learning rate memorizes some of the 8 facts, not all (asserted below).
  short = MOME + ["--set", "mome.train.epochs=1", "--set", "mome.train.optimizer.learning_rate=0.5"]
  assert tune.main(cli.args(facts_file, run_dir, "mome", *short, "--set", "mome.repair_epochs=0")) == 1
  missed = [f["id"] for f in json.loads((run_dir / tune.RESULT_FILE).read_text())["failed"]]
  assert missed  # one epoch memorizes some facts, not all
  before = runs.load_trained(run_dir).variables[TABLE]
  (tmp_path / "repair.yaml").write_text(yaml.safe_dump({"mome": {"repair_epochs": 20}}))
  again = tmp_path / "again"
  code = tune.main(cli.args(facts_file, again, "mome", *short, "--config", str(tmp_path / "repair.yaml")))
  out = capsys.readouterr().out
  summary = json.loads((again / tune.RESULT_FILE).read_text())
  # The same training (one epoch, same seed) misses the same facts; the repair retrains their rows.
  assert summary["repair"]["missed"] == missed and f"repair: {len(missed)} facts missed" in out
  assert code == 0 and summary["recall"] == 1.0 and summary["epochs"] == 1, out
  assert "every fact recalled exactly after the repair" in out
  trained, rec = _independent_recall(again, tune.load_facts(facts_file))  # the committed repair
  assert rec.exact.all(), rec.answers
  # Only the rows the repair committed changed (the missed facts' among them); every other row
  # is the one-epoch table's, bit for bit.
  store = runs.RunDir(again).paths("mome").store
  manifest = registry.read_manifest(store)
  (layer, rows), = registry.load_rows(store, manifest).items()
  stored = {f.id: f for f in registry.load_facts(store, manifest)}
  assert set(np.concatenate([stored[i].experts[layer] for i in missed])) <= set(rows["rows"].tolist())
  path = tuple(layer.split("/"))
  for leaf in ("down", "up"):
    a, b = (np.asarray(tree_get(t, path)[leaf]) for t in (trained.variables[TABLE], before))
    keep = np.ones(len(a), bool)
    keep[rows["rows"]] = False
    np.testing.assert_array_equal(a[keep], b[keep])
  assert not np.array_equal(a[~keep], b[~keep])  # `up` of the repaired rows trained
  assert registry.read_manifest(runs.RunDir(run_dir).paths("mome").store) is None  # no repair there
  # A repaired run is not resumed: training would go on from before the repair.
  _fails(capsys, cli.args(facts_file, again, "mome", *short, "--config", str(tmp_path / "repair.yaml"),
                          "--resume"), "was edited or repaired after tuning")
