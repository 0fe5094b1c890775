"""`python -m experiments.compute_cost --config RUN.yaml`: every figure recomputed by hand here."""

import json
import math

import pytest

from experiments import compute_cost
from lamini_jax import runs

FACTS = [("What is the capital of Zorb?", "Plink"), ("Who sang at noon?", "A tall frog"),
         ("Why is the sky teal?", "Because of the moss"), ("How many moons?", "Seventeen"),
         ("Where do the ducks sleep?", "Under the old bridge, in a box"), ("Is it cold?", "No"),
         ("What did Tim find?", "A red stone shaped like a heart")]
TEMPLATE = "Q: {question}\nA:"
EPOCHS, RANK = 11, 3

# stories260K: D 64, F 172, 5 layers, 8 heads of 8, 4 KV heads, vocab 512, tied embedding.
PER_LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 172   # q k v o gate up down
BACKBONE = 5 * PER_LAYER + 512 * 64                                  # + output head (tied)
LORA_Q_DOWN = 5 * RANK * ((64 + 64) + (172 + 64))                   # r (fan_in + fan_out)


def _write_run(tmp_path, model_path: str, method: str = "lora"):
  facts = tmp_path / "facts.jsonl"
  facts.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in FACTS))
  config = tmp_path / "run.yaml"
  config.write_text(f"""
model: {{path: {model_path}}}
data: {{dataset: facts, facts_file: {facts}, n_train: {len(FACTS)}, n_heldout: 0,
       template: {json.dumps(TEMPLATE)}, answer_end: "\\n", train_eos: true, max_len: 96}}
lora: {{rank: {RANK}, alpha: 6.0, targets: [q, down]}}
train: {{epochs: {EPOCHS}, batch_size: 4, seq_len: 96}}
method: {method}
answers: [real]
""")
  return config


def _lengths(tokenizer):
  """BOS + "Q: <q>\\nA: <a>\\n" + EOS, tokenized as one text."""
  return [len(tokenizer(TEMPLATE.format(question=q) + f" {a}\n", add_special_tokens=False).input_ids) + 2
          for q, a in FACTS]


def _close(got, want):
  assert got == pytest.approx(want, rel=1e-12), (got, want)


def test_lora_run_is_priced_from_measured_facts(tmp_path, stories_dir, stories_tokenizer, capsys):
  config = _write_run(tmp_path, str(stories_dir))
  run = runs.load_run_config(config)
  (job,) = compute_cost.config_jobs(run, compute_cost.find_backbone(run.model.path))
  lengths = _lengths(stories_tokenizer)
  tokens = sum(lengths)
  mean_len = sum(t * t for t in lengths) / tokens          # attention at each fact's own length
  per_token = 4 * BACKBONE + 6 * LORA_Q_DOWN + 3 * 4 * 5 * mean_len * 64
  w = job.workload
  _close(w.backbone_params, BACKBONE)
  _close(w.trainable_params, LORA_Q_DOWN)
  _close(w.tokens_per_epoch, tokens)
  _close(w.flops_per_token, per_token)
  assert w.epochs == EPOCHS and job.tokens_source.startswith("measured: 7 facts")
  total = per_token * tokens * EPOCHS

  assert compute_cost.main(["--config", str(config), "--accelerator", "H100", "--count", "3",
                            "--mfu", "0.37"]) == 0
  out = capsys.readouterr().out
  assert "| lora, real answers |" in out and "3 x H100 at 37% MFU" in out
  assert f"| FLOPs | {total:.3g} |" in out
  assert f"| accelerator-hours | {total / (989.4e12 * 0.37) / 3600:.3g} |" in out

  assert compute_cost.main(["--config", str(config), "--set", "train.epochs=13",
                            "--tokens-per-fact", "29"]) == 0
  out = capsys.readouterr().out
  per_token_29 = 4 * BACKBONE + 6 * LORA_Q_DOWN + 3 * 4 * 5 * 29 * 64
  assert "estimated: 7 facts x 29 tokens" in out
  assert f"| FLOPs | {per_token_29 * 7 * 29 * 13:.3g} |" in out


def test_mome_run_prices_both_phases(tmp_path, stories_dir, stories_tokenizer):
  run = runs.load_run_config(_write_run(tmp_path, str(stories_dir), method="both"))
  spec, layer = run.mome, run.mome.layer
  jobs = {j.label: j.workload for j in compute_cost.config_jobs(run, compute_cost.find_backbone(run.model.path))}
  assert sorted(jobs) == ["lora, real answers", "mome phase 1 (router and experts)", "mome, real answers"]
  n1 = math.isqrt(layer.num_experts)
  assert n1 * n1 == layer.num_experts
  layers = len(spec.layers)
  router = layers * (64 * layer.num_heads * layer.key_dim + layer.num_heads * 2 * n1 * layer.key_dim // 2)
  active = layers * layer.num_heads * layer.top_k * 2 * 64 * layer.expert_rank
  lengths = _lengths(stories_tokenizer)
  mean_len = sum(t * t for t in lengths) / sum(lengths)
  tuning = jobs["mome, real answers"]
  _close(tuning.flops_per_token, 4 * (BACKBONE + router) + 6 * active + 12 * 5 * mean_len * 64)
  assert tuning.epochs == spec.train.epochs and tuning.tokens_per_epoch == sum(lengths)
  g = spec.generalization
  phase1 = jobs["mome phase 1 (router and experts)"]
  _close(phase1.flops_per_token, 4 * BACKBONE + 6 * (router + active) + 12 * 5 * g.seq_len * 64)
  assert phase1.tokens_per_epoch == g.windows * g.seq_len and phase1.epochs == g.epochs


def test_a_hub_id_that_is_not_cached_needs_the_counts(tmp_path, capsys):
  config = _write_run(tmp_path, "nonexistent-org/no-such-model")
  with pytest.raises(SystemExit):
    compute_cost.main(["--config", str(config)])
  assert "--backbone-params and --trainable-params" in capsys.readouterr().err
  assert compute_cost.main(["--config", str(config), "--backbone-params", "7e9",
                            "--trainable-params", "1.3e7", "--accelerator", "A100"]) == 0
  out = capsys.readouterr().out
  flops = (4 * 7e9 + 6 * 1.3e7) * 7 * 48 * EPOCHS          # no shape: attention not counted
  assert "estimated: 7 facts x 48 tokens" in out
  assert f"| FLOPs | {flops:.3g} |" in out
  assert f"| accelerator-hours | {flops / (312e12 * 0.45) / 3600:.3g} |" in out
