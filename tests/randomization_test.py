"""The randomization experiment end to end on a tiny setting, kill-and-resume, and several seeds."""

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
from lamini_jax import report
from lamini_jax import runs
from lamini_jax import yaml_config

slow = pytest.mark.slow  # the cases that need a whole (tiny) run of the experiment

# 8 facts, trained until every one is recalled exactly (measured on this CPU, 2026-12-02: real
# answers at epoch 15, random ones at 30; the run stops there), checked every 5 epochs.
TINY = ["data.n_train=8", "data.n_heldout=4", "train.epochs=40", "train.batch_size=4",
        "train.checkpoint_every=2", "eval.mmlu_questions=4", "eval.ppl_windows=2",
        "eval.recall_every=5", "eval.table_rows=2", "train.length_bucket=null", "eval.locality_prompts=4"]
RECALL_EVERY = 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("run") / "tiny"
  cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, TINY + [f"run_dir={run_dir}"])
  return run_dir, randomization.run(cfg, progress=False)


@slow
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
  text = (run_dir / "report.md").read_text()
  assert "dev mc1" in text and "from the **dev** split" in text and summary["split"] == "dev"
  base = summary["models"]["base"]
  assert base["locality_exact"] == base["locality_tokens"] == base["locality_text_exact"] == 1.0
  for name in ("lora-real", "lora-random"):  # memorized facts change some greedy answers
    loc = {k: v for k, v in summary["models"][name].items() if k.startswith("locality_")}
    assert len(loc) == 6 and all(0.0 <= v <= 1.0 for v in loc.values()), loc
    assert loc["locality_exact"] <= min(loc["locality_first"], loc["locality_tokens"])
  # Recomputed one question at a time from the saved adapters, without the batched decode.
  trained = runs.load_trained(run_dir, "lora-random")
  tokenizer, n_new = trained.backbone.tokenizer, trained.config.eval.locality_tokens
  held = runs.facts_and_heldout(trained.config.data, "random")[1]
  base_vars = {"params": trained.backbone.params}
  base_model = model_lib.Transformer(trained.backbone.cfg)

  def answer(model, variables, question):
    prompt = trained.template.render(question)
    new = generate.generate(model, variables, [tokenizer(prompt).input_ids],
                            generate.SamplingConfig(max_new_tokens=n_new))[0]
    return new + [-1] * (n_new - len(new))

  same = [[a == b for a, b in zip(answer(trained.model, trained.variables, i.question),
                                  answer(base_model, base_vars, i.question))] for i in held]
  lora = summary["models"]["lora-random"]
  assert lora["locality_exact"] == sum(all(r) for r in same) / len(held)
  assert lora["locality_tokens"] == sum(map(sum, same)) / (len(held) * n_new) < 1.0


@slow
def test_random_answers_are_trained_and_held_out_questions_are_not(tiny_run):
  run_dir, _ = tiny_run
  cfg = runs.load_run_config(run_dir / "config.yaml")
  facts, held, _ = runs.facts_and_heldout(cfg.data, "random")
  _, test, _ = runs.facts_and_heldout(cfg.data, "random", "test")
  assert not {f.question for f in facts} & {i.question for i in held + test}
  assert len(held) == len(test) == 4 and not {i.question for i in held} & {i.question for i in test}
  assert all(len(f.answer) == 32 for f in facts)


@slow
def test_existing_run_needs_resume(tiny_run):
  run_dir, _ = tiny_run
  cfg = runs.load_run_config(run_dir / "config.yaml")
  with pytest.raises(yaml_config.ConfigError, match="--resume"):
    randomization.run(cfg, progress=False)
  assert randomization.main(["--set", "train.epochs=0", "--run-dir", str(run_dir)]) == 2


@slow
def test_sigkill_then_resume_finishes_with_the_same_metrics(tiny_run, tmp_path):
  _, reference = tiny_run
  run_dir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "experiments.randomization", "--no-progress", "--run-dir", str(run_dir)]
  # Random answers only (the real-answer run before it would only repeat what it checks).
  cmd += [arg for item in TINY + ["answers=[random]"] for arg in ("--set", item)]
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
  assert set(resumed["models"]) == {"base", "lora-random"}
  for name, metrics in resumed["models"].items():
    assert {k: v for k, v in metrics.items() if k not in drop} == pytest.approx(
        {k: v for k, v in reference["models"][name].items() if k not in drop}, rel=1e-6), name
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == reference["models"]["lora-random"]["epochs"]


@slow
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
  # --base: the run's backbone alone on the run's template gives the run's own base figures.
  base_out = tmp_path / "base.json"
  assert evaluate.main(["--run", str(run_dir), "--adapter", "lora-random", "--base", "--truthfulqa", "4",
                        "--json", str(base_out)]) == 0
  base, want_base = json.loads(base_out.read_text()), summary["models"]["base"]
  for name in ("mc1", "mc2", "answer_loss"):
    assert base[name] == pytest.approx(want_base[name], rel=1e-5), name
  assert base["answer_loss"] != pytest.approx(got["answer_loss"], rel=1e-3)  # not the tuned model
  assert evaluate.main(["--run", str(run_dir), "--adapter", "nope"]) == 2
  with pytest.raises(SystemExit):  # a base model and a run at once: which one to evaluate?
    evaluate.main(["--model", runs.resolve_model_path(cfg.model.path), "--run", str(run_dir)])


@slow
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


def test_seed_config_sets_every_seed():
  cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, ["run_dir=/tmp/x"])
  got = randomization.seed_config(cfg, 7)
  assert (got.data.seed, got.train.seed, got.mome.seed, got.mome.train.seed) == (7, 7, 7, 7)
  assert got.run_dir == "/tmp/x/seed-7" and got.data.heldout_seed == cfg.data.heldout_seed
  assert randomization.seed_config(cfg, 0).train == cfg.train  # the shipped seeds are 0
  with pytest.raises(SystemExit):
    randomization.main(["--seeds", "0,0"])
  with pytest.raises(SystemExit):
    randomization.main(["--seeds", "a"])


@slow
def test_seeds_on_the_test_split(tmp_path):
  run_dir = tmp_path / "seeds"
  overrides = TINY + ["train.epochs=5", "train.checkpoint_every=50", "eval.locality_prompts=3",
                      f"run_dir={run_dir}", "eval.split=test", "answers=[random]"]
  cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, overrides)
  summary = randomization.run_seeds(cfg, [0, 1], progress=False)
  per_seed = [json.loads((run_dir / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
  assert [p["seed"] for p in per_seed] == [0, 1] and all(p["split"] == "test" for p in per_seed)
  assert summary["split"] == "test" and "tinyshakespeare" in summary["sources"]["perplexity_ood"]
  assert summary["models"] == report.aggregate_seeds([p["models"] for p in per_seed])
  lora = summary["models"]["lora-random"]
  for key in ("perplexity", "perplexity_ood", "mc2", "locality_tokens", "locality_text_tokens"):
    values = [p["models"]["lora-random"][key] for p in per_seed]
    base = [p["models"]["base"][key] for p in per_seed]
    assert lora[key]["values"] == values and lora[key]["mean"] == pytest.approx(sum(values) / 2)
    assert lora[key]["diff_mean"] == pytest.approx((values[0] - base[0] + values[1] - base[1]) / 2)
  # The held-out material is the same for both seeds (the base model's figures too); the facts differ.
  assert per_seed[0]["models"]["base"] == per_seed[1]["models"]["base"]
  facts = [runs.facts_and_heldout(runs.RunDir(run_dir / f"seed-{s}").config().data, "random")[0]
           for s in (0, 1)]
  assert {f.question for f in facts[0]} != {f.question for f in facts[1]}
  text = (run_dir / "report.md").read_text()
  assert "**test** split" in text and "| test perplexity_ood |" in text and "± " in text
  assert (run_dir / "differences.png").stat().st_size > 10_000 and "(differences.png)" in text
  again = randomization.run_seeds(cfg, [0, 1], resume=True, progress=False)  # both read back
  assert again["models"] == summary["models"]
