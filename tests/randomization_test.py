"""The randomization experiment end to end on a tiny setting, and kill-and-resume."""

import json
import signal
import subprocess
import sys
import time

import pytest

from experiments import randomization
from lamini_jax import evaluate
from lamini_jax import generate
from lamini_jax import model as model_lib
from lamini_jax import runs
from lamini_jax import yaml_config

pytestmark = pytest.mark.slow  # every case here needs a whole (tiny) run of the experiment

# 8 facts, trained until every one is recalled exactly (measured on this CPU, 2026-12-02: real
# answers at epoch 15, random ones at 30; the run stops there), checked every 5 epochs.
TINY = ["data.n_train=8", "data.n_heldout=4", "train.epochs=40", "train.batch_size=4",
        "train.checkpoint_every=2", "eval.mmlu_questions=4", "eval.ppl_windows=2",
        "eval.recall_every=5", "eval.table_rows=2", "train.length_bucket=null"]
RECALL_EVERY = 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("run") / "tiny"
  cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, TINY + [f"run_dir={run_dir}"])
  return run_dir, randomization.run(cfg, progress=False)


def test_run_writes_every_artifact(tiny_run):
  run_dir, summary = tiny_run
  assert set(summary["models"]) == {"base", "lora-real", "lora-random"}
  for name, metrics in summary["models"].items():
    for key in ("mc1", "mc2", "answer_loss", "mmlu_acc", "perplexity"):
      assert isinstance(metrics[key], float), (name, key)
  epochs = {}
  for name in ("lora-real", "lora-random"):
    m = summary["models"][name]
    # Memorized: every fact recalled exactly, the run stopped at the first full recall.
    assert m["recall"] == 1.0 and m["epochs_to_full_recall"] == m["epochs"] < 40, (name, m)
    assert m["fact_loss"] < 0.1, (name, m["fact_loss"])
    epochs[name] = m["epochs"]
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["run"], r["epoch"]) for r in records] == [
      (run, e) for run in ("lora-real", "lora-random") for e in range(epochs[run])]
  assert all("recall" in r for r in records if (r["epoch"] + 1) % RECALL_EVERY == 0)
  assert records[-1]["recall"] == 1.0 and records[-1]["stop"]
  assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
  table = (run_dir / "table1.md").read_text().splitlines()
  assert len(table) == 2 + 4 and table[-1].endswith("| yes |") and "no (held out)" in table[2]
  assert (run_dir / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert "held-out mc1" in (run_dir / "report.md").read_text()


def test_random_answers_are_trained_and_held_out_questions_are_not(tiny_run):
  run_dir, _ = tiny_run
  cfg = runs.load_run_config(run_dir / "config.yaml")
  facts, held, _ = runs.facts_and_heldout(cfg.data, "random")
  assert not {f.question for f in facts} & {i.question for i in held}
  assert all(len(f.answer) == 32 for f in facts)


def test_existing_run_needs_resume(tiny_run):
  run_dir, _ = tiny_run
  cfg = runs.load_run_config(run_dir / "config.yaml")
  with pytest.raises(yaml_config.ConfigError, match="--resume"):
    randomization.run(cfg, progress=False)
  assert randomization.main(["--set", "train.epochs=0", "--run-dir", str(run_dir)]) == 2


def test_sigkill_then_resume_finishes_with_the_same_metrics(tiny_run, tmp_path):
  _, reference = tiny_run
  run_dir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "experiments.randomization", "--no-progress", "--run-dir", str(run_dir)]
  cmd += [arg for item in TINY for arg in ("--set", item)]
  proc = subprocess.Popen(cmd, cwd=runs.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = run_dir / "checkpoints" / "lora-random"
  deadline = time.time() + 300
  while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
    assert proc.poll() is None and time.time() < deadline, "the run ended before a checkpoint"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (run_dir / "summary.json").exists()
  done = subprocess.run(cmd + ["--resume"], cwd=runs.REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  resumed = json.loads((run_dir / "summary.json").read_text())
  drop = ("train_seconds", "tuning_seconds")  # times differ
  for name, metrics in reference["models"].items():
    assert {k: v for k, v in resumed["models"][name].items() if k not in drop} == pytest.approx(
        {k: v for k, v in metrics.items() if k not in drop}, rel=1e-6), name
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == sum(m["epochs"] for name, m in reference["models"].items() if name != "base")


def test_evaluate_cli_reloads_a_trained_adapter(tiny_run, tmp_path, capsys):
  run_dir, summary = tiny_run
  cfg = runs.load_run_config(run_dir / "config.yaml")
  facts, _, _ = runs.facts_and_heldout(cfg.data, "random")
  facts_file = tmp_path / "facts.jsonl"
  facts_file.write_text("".join(json.dumps({"question": f.question, "answer": f.answer}) + "\n"
                                for f in facts))
  out = tmp_path / "metrics.json"
  # --run brings its own backbone (the run's model.path) and prompt template.
  assert evaluate.main(["--run", str(run_dir), "--adapter", "lora-random", "--facts", str(facts_file),
                        "--truthfulqa", "4", "--json", str(out)]) == 0
  got = json.loads(out.read_text())
  want = summary["models"]["lora-random"]
  assert got["recall"] == want["recall"]
  assert got["fact_loss"] == pytest.approx(want["fact_loss"], rel=1e-5)
  assert got["mc1"] == pytest.approx(want["mc1"]) and got["mc2"] == pytest.approx(want["mc2"], rel=1e-5)
  assert "recall" in capsys.readouterr().out
  assert evaluate.main(["--run", str(run_dir), "--adapter", "nope"]) == 2
  with pytest.raises(SystemExit):  # a base model and a run at once: which one to evaluate?
    evaluate.main(["--model", runs.resolve_model_path(cfg.model.path), "--run", str(run_dir)])


def test_generate_answers_from_a_run_without_exporting(tiny_run, capsys):
  run_dir, _ = tiny_run
  trained = runs.load_trained(run_dir, "lora-random")
  question = runs.facts_and_heldout(trained.config.data, "random")[0][0].question
  prompt = trained.template.render(question)
  assert generate.main(["--run", str(run_dir), "--label", "lora-random", "--prompt", prompt,
                        "--max-new-tokens", "12"]) == 0
  cli = capsys.readouterr().out.rstrip("\n")
  sampling = generate.SamplingConfig(max_new_tokens=12)
  tokenizer = trained.backbone.tokenizer
  want = generate.generate_text(trained.model, trained.variables, tokenizer, [prompt], sampling)[0]
  base = generate.generate_text(model_lib.Transformer(trained.backbone.cfg),
                                {"params": trained.backbone.params}, tokenizer, [prompt], sampling)[0]
  assert cli == want and want != base  # the run's adapters, not the backbone alone
  assert generate.main(["--run", str(run_dir), "--label", "nope", "--prompt", prompt]) == 2
