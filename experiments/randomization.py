"""The paper's randomization and regularization tests (sections 2-3, Appendix A).

    python -m experiments.randomization                      # CPU default, offline
    python -m experiments.randomization --config configs/llama3_8b_paper.yaml
    python -m experiments.randomization --dataset mmlu --set train.epochs=50 --resume

Memorizes the same facts twice into a frozen pretrained backbone, once with the
real answers and once with random 32-character answers, then evaluates the base,
real-trained and random-trained models on the same held-out questions. Writes
`metrics.jsonl`, `loss_curves.png`, `table1.md`, `summary.json` and `report.md`
into the run directory and prints the summary table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from lamini_jax import data as data_lib
from lamini_jax import evaluate as eval_lib
from lamini_jax import memory_tuning as mt
from lamini_jax import report
from lamini_jax import yaml_config

DEFAULT_CONFIG = mt.REPO / "configs" / "randomization_cpu.yaml"


def _machine() -> str:
  dev = jax.devices()[0]
  return f"{platform.processor() or platform.machine()}, {jax.device_count()}x {dev.platform}:{dev.device_kind}"


def _check_same_config(run_dir: pathlib.Path, text: str, resume: bool) -> None:
  path = run_dir / mt.CONFIG_FILE
  if path.exists() and resume and path.read_text() != text:
    raise yaml_config.ConfigError(
        f"--resume: the config differs from the one in {path}; resume with the same config "
        "or choose another run_dir")
  if path.exists() and not resume and (run_dir / "checkpoints").exists():
    raise yaml_config.ConfigError(
        f"{run_dir} already holds a run: pass --resume to continue it, or set --run-dir")


def run(cfg: mt.RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
  """Runs the experiment described by `cfg`; returns the summary (also written to disk)."""
  t_start = time.perf_counter()
  run_dir = pathlib.Path(cfg.run_dir)
  config_text = yaml_config.dump(cfg)
  _check_same_config(run_dir, config_text, resume)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / mt.CONFIG_FILE).write_text(config_text)
  if not resume:
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
  if cfg.method != "lora":
    raise NotImplementedError(f"method={cfg.method!r}: the MoME method is not built yet; use lora")

  model_cfg, params, tokenizer, model_dir = mt.load_backbone(cfg.model)
  template = mt.prompt_template(cfg.data)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  facts_by_mode, held, trained_mmlu = {}, None, []
  for mode in cfg.answers:
    facts_by_mode[mode], held, trained_mmlu = mt.facts_and_heldout(cfg.data, mode)
  heldout = eval_lib.load_heldout(tokenizer, cfg.data.data_dir, held, cfg.eval.mmlu_questions,
                                  cfg.eval.mmlu_k, cfg.eval.ppl_windows, cfg.eval.ppl_seq_len,
                                  template, cfg.data.seed, cfg.eval.corpus, exclude_mmlu=trained_mmlu)
  any_facts = next(iter(facts_by_mode.values()))
  n_rows = cfg.eval.table_rows
  table_questions = [i.question for i in held[:n_rows]] + [f.question for f in any_facts[:n_rows]]

  def answers_of(model, variables) -> list[str]:
    return eval_lib.generate_answers(model, variables, tokenizer, table_questions, template,
                                     cfg.eval.answer_tokens)

  base_model = mt.Transformer(model_cfg)
  base_vars = {"params": params}
  models: dict[str, dict[str, Any]] = {}
  answers: dict[str, list[str]] = {}
  print("evaluating the base model on held-out questions ...", flush=True)
  models["base"] = eval_lib.heldout_metrics(base_model, base_vars, tokenizer, heldout)
  answers["base"] = answers_of(base_model, base_vars)
  histories = {}
  for mode, facts in facts_by_mode.items():
    label = f"lora-{mode}"
    encoded = data_lib.encode_facts(tokenizer, template, facts, cfg.data.max_len)
    longest = max(len(e.tokens) for e in encoded)
    if longest > cfg.train.seq_len:
      raise yaml_config.ConfigError(
          f"train.seq_len={cfg.train.seq_len} is shorter than the longest encoded fact "
          f"({longest} tokens): raise train.seq_len")
    hook = mt.recall_callback(mt.lora_model(model_cfg, cfg.lora),
                              lambda state: {"params": params, "lora": state.trainable}, tokenizer,
                              facts, template, cfg.eval.recall_every, cfg.eval.stop_at_full_recall)
    print(f"memory tuning {label}: {len(facts)} facts ...", flush=True)
    model, variables, result = mt.tune_lora(
        model_cfg, params, encoded, cfg.lora, cfg.train, pad_id=pad_id, run_dir=run_dir, label=label,
        resume=resume, progress=progress, on_epoch=hook)
    histories[label] = result.history
    rec = eval_lib.recall(model, variables, tokenizer, facts, template)
    metrics = eval_lib.heldout_metrics(model, variables, tokenizer, heldout)
    full = [r["epoch"] + 1 for r in result.history if r.get("recall") == 1.0]
    metrics.update({
        "recall": rec.rate,
        "fact_loss": float(np.mean(eval_lib.fact_losses(model, variables, encoded))),
        "epochs": len(result.history),
        "epochs_to_full_recall": full[0] if full else None,
        "train_seconds": float(sum(r["epoch_seconds"] for r in result.history)),
    })
    models[label] = metrics
    answers[label] = answers_of(model, variables)

  real_facts = facts_by_mode.get("real") or mt.facts_and_heldout(cfg.data, "real")[0]
  random_facts = facts_by_mode.get("random")
  rows = []
  for k, q in enumerate(table_questions):
    trained = k >= len(held[:n_rows])
    j = k - len(held[:n_rows])
    row = {"question": q, "trained": "yes" if trained else "no (held out)",
           "gold": real_facts[j].answer if trained else held[k].best_answer,
           "random": random_facts[j].answer if trained and random_facts else "-"}
    row.update({m: answers[m][k] for m in models})
    rows.append(row)
  (run_dir / "table1.md").write_text(report.table1(rows, list(models)))
  report.plot_loss_curves(histories, run_dir / "loss_curves.png",
                          f"{model_cfg.architecture} {len(any_facts)} {cfg.data.dataset} facts")
  summary = {
      "backbone": str(cfg.model.path), "dataset": cfg.data.dataset, "n_facts": len(any_facts),
      "n_heldout": len(held), "mmlu_scored": models["base"].get("mmlu_scored", 0),
      "mmlu_k": cfg.eval.mmlu_k, "ppl_windows": cfg.eval.ppl_windows, "corpus": cfg.eval.corpus,
      "machine": _machine(), "wall_seconds": time.perf_counter() - t_start, "models": models,
  }
  (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  (run_dir / "report.md").write_text(report.report_markdown(summary, config_text))
  print(report.summary_table(summary))
  print(f"\nwrote {run_dir}/{{report.md,summary.json,table1.md,loss_curves.png,metrics.jsonl}}")
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.randomization",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG,
                      help=f"YAML config (default {DEFAULT_CONFIG.relative_to(mt.REPO)})")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override any config field, e.g. --set train.optimizer.learning_rate=1e-3")
  parser.add_argument("--method", choices=("lora", "mome", "both"), help="same as --set method=...")
  parser.add_argument("--dataset", choices=("truthfulqa", "mmlu", "facts"), help="same as --set data.dataset=...")
  parser.add_argument("--run-dir", help="same as --set run_dir=...")
  parser.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoints")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  overrides = list(args.set)
  for flag, field in (("method", "method"), ("dataset", "data.dataset"), ("run_dir", "run_dir")):
    if getattr(args, flag) is not None:
      overrides.append(f"{field}={getattr(args, flag)}")
  try:
    cfg = mt.load_run_config(args.config, overrides)
    run(cfg, resume=args.resume, progress=not args.no_progress)
  except (yaml_config.ConfigError, FileNotFoundError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
