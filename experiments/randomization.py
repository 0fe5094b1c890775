"""The paper's randomization and regularization tests (sections 2-3 and 7, Appendix A).

    python -m experiments.randomization                      # CPU default, offline (LoRA)
    python -m experiments.randomization --method mome        # Lamini-1 MoME (Figure 5)
    python -m experiments.randomization --method both        # LoRA and MoME side by side
    python -m experiments.randomization --config configs/llama3_8b_paper.yaml
    python -m experiments.randomization --dataset mmlu --set train.epochs=50 --resume
    python -m experiments.randomization --method both --split test --seeds 0,1,2   # final tables

Memorizes the same facts twice into a frozen pretrained backbone, once with the
real answers and once with random 32-character answers, with LoRA adapters
(`train:`) and/or a Mixture of Memory Experts (`mome:`), then evaluates the base
and every trained model on the same held-out questions. Writes `metrics.jsonl`,
`loss_curves.png` (one panel per method: Figure 1, Figure 5), `table1.md`,
`summary.json` and `report.md` into the run directory and prints the summary table.

Held-out figures come from one split, `--split` (`eval.split`): dev (the default) for every
choice of settings, test only for final tables (`runs.EvalSpec`). `--seeds 0,1,2` runs the
experiment once per seed, in RUN_DIR/seed-<seed>, and writes the mean and standard error of
every figure over the seeds, and each model's paired difference from the base model, to
RUN_DIR/summary.json and RUN_DIR/report.md, and draws the differences in RUN_DIR/differences.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from lamini_jax.data import encoding
from lamini_jax import dry_run
from lamini_jax import evaluate as eval_lib
from lamini_jax import locality
from lamini_jax import lora_tuning
from lamini_jax import model as model_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import report
from lamini_jax import runs
from lamini_jax import yaml_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "randomization_cpu.yaml"


def _machine() -> str:
  dev = jax.devices()[0]
  return f"{platform.processor() or platform.machine()}, {jax.device_count()}x {dev.platform}:{dev.device_kind}"


def _check_same_config(run: runs.RunDir, text: str, resume: bool) -> None:
  path = run.config_file
  if path.exists() and resume and path.read_text() != text:
    raise yaml_config.ConfigError(
        f"--resume: the config differs from the one in {path}; resume with the same config "
        "or choose another run_dir")
  if not resume and run.has_run():
    raise yaml_config.ConfigError(
        f"{run.path} already holds a run: pass --resume to continue it, or set --run-dir")


def mome_table(summary: dict[str, Any]) -> str:
  """MoME-only figures: phase times and collisions (facts sharing an expert), per run."""
  mome_runs = {k: v for k, v in summary["models"].items() if "collisions" in v}
  if not mome_runs:
    return ""
  lines = [f"{'MoME run':<14} {'phase 1 s':>9} {'prepare s':>9} {'train s':>8} {'total s':>8}"
           f"  collisions per layer (routing: facts with a shared expert, pairs, max facts/expert,"
           " rows written per fact)"]
  for label, m in mome_runs.items():
    parts = []
    for routing, layers in m["collisions"].items():
      for layer, c in layers.items():
        parts.append(f"{routing} {layer}: {c['facts_with_collision']}/{c['num_facts']},"
                     f" {c['pair_collisions']}, {c['max_facts_per_expert']},"
                     f" {c.get('rows_per_fact', float('nan')):.1f}")
    lines.append(f"{label:<14} {m['generalization_seconds']:>9.1f} {m['prepare_seconds']:>9.1f}"
                 f" {m['train_seconds']:>8.1f} {m['total_seconds']:>8.1f}  " + "; ".join(parts))
  return "\n".join(lines)


def _lead() -> bool:
  """Whether this process writes the run's files (process 0; every process when there is one)."""
  return jax.process_index() == 0


def _sync(what: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(what)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} must be an integer") from None


def init_distributed() -> None:
  """`jax.distributed.initialize` for `--distributed` (docs/distributed.md).

  On SLURM, Open MPI and Cloud TPU pods jax finds everything itself; started by hand, set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                             process_id=_env_int("JAX_PROCESS_ID"))


def run(cfg: runs.RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
  """Runs the experiment described by `cfg`; returns the summary (also written to disk)."""
  t_start = time.perf_counter()
  run = runs.RunDir(cfg.run_dir)
  run_dir = run.path
  config_text = yaml_config.dump(cfg)
  _check_same_config(run, config_text, resume)
  if _lead():
    run_dir.mkdir(parents=True, exist_ok=True)
    run.config_file.write_text(config_text)
    if not resume:
      run.metrics_file.unlink(missing_ok=True)
  _sync("run directory ready")  # no process sees another's config.yaml and calls the directory taken

  mesh = cfg.mesh.build()  # the MoME tables' mesh; None on one device
  backbone = runs.load_backbone(cfg.model)
  model_cfg, params, tokenizer = backbone.cfg, backbone.params, backbone.tokenizer
  template = runs.prompt_template(cfg.data)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  facts_by_mode, held, trained_mmlu = {}, None, []
  for mode in cfg.answers:
    facts_by_mode[mode], held, trained_mmlu = runs.facts_and_heldout(cfg.data, mode, cfg.eval.split)
  heldout = eval_lib.load_heldout(tokenizer, cfg.eval, cfg.data.data_dir, held, template,
                                  cfg.data.heldout_seed, exclude_mmlu=trained_mmlu)
  any_facts = next(iter(facts_by_mode.values()))
  n_rows = cfg.eval.table_rows
  table_questions = [i.question for i in held[:n_rows]] + [f.question for f in any_facts[:n_rows]]

  def answers_of(model, variables) -> list[str]:
    return eval_lib.generate_answers(model, variables, tokenizer, table_questions, template,
                                     cfg.eval.answer_tokens)

  base_model = model_lib.Transformer(model_cfg)
  base_vars = {"params": params}
  models: dict[str, dict[str, Any]] = {}
  answers: dict[str, list[str]] = {}
  print("evaluating the base model on held-out questions ...", flush=True)
  models["base"] = eval_lib.heldout_metrics(base_model, base_vars, tokenizer, heldout)
  base_answers = locality.reference(base_model, base_vars, tokenizer, [i.question for i in held],
                                    template, heldout.locality_texts, cfg.eval.locality_tokens)
  models["base"].update(locality.locality_metrics(base_model, base_vars, base_answers))
  answers["base"] = answers_of(base_model, base_vars)
  histories = {}
  mome_figures: dict[str, dict[str, Any]] = {}
  methods = ("lora", "mome") if cfg.method == "both" else (cfg.method,)
  for method, (mode, facts) in ((m, item) for m in methods for item in facts_by_mode.items()):
    label = f"{method}-{mode}"
    encoded = encoding.encode_facts(tokenizer, template, facts, cfg.data.max_len)
    train_cfg = cfg.train if method == "lora" else cfg.mome.train
    longest = max(len(e.tokens) for e in encoded)
    if longest > train_cfg.seq_len:
      field = "train.seq_len" if method == "lora" else "mome.train.seq_len"
      raise yaml_config.ConfigError(
          f"{field}={train_cfg.seq_len} is shorter than the longest encoded fact "
          f"({longest} tokens): raise {field}")
    print(f"memory tuning {label}: {len(facts)} facts ...", flush=True)
    t_method = time.perf_counter()
    if method == "lora":
      hook = eval_lib.recall_callback(lora_tuning.lora_model(model_cfg, cfg.lora),
                                      lambda state: {"params": params, "lora": state.trainable}, tokenizer,
                                      facts, template, cfg.eval.recall_every, cfg.eval.stop_at_full_recall)
      model, variables, result = lora_tuning.tune_lora(
          model_cfg, params, encoded, cfg.lora, train_cfg, pad_id=pad_id,
          paths=run.paths(label), label=label, resume=resume, progress=progress, on_epoch=hook)
    else:
      prepared = mome_tuning.prepare(
          model_cfg, params, encoded, cfg.mome, pad_id=pad_id,
          general_windows=runs.general_windows(cfg, tokenizer), paths=run.paths(label),
          general_paths=run.paths(runs.GENERAL_LABEL), label=label,
          resume=resume, progress=progress, mesh=mesh)
      hook = eval_lib.recall_callback(prepared.model, prepared.variables_of, tokenizer, facts, template,
                                      cfg.mome.recall_every, cfg.eval.stop_at_full_recall)
      t_anchor = time.perf_counter()
      anchors = runs.anchor_pool(cfg, tokenizer, template, pad_id)
      prepare_seconds = prepared.seconds + time.perf_counter() - t_anchor
      model, variables, result = mome_tuning.tune_mome(
          model_cfg, params, encoded, cfg.mome, train_cfg, pad_id=pad_id, paths=run.paths(label),
          label=label, resume=resume, progress=progress, on_epoch=hook, prepared=prepared,
          anchors=anchors, mesh=mesh)
      mome_figures[label] = {"prepare_seconds": prepare_seconds,
                             "generalization_seconds": prepared.generalization_seconds,
                             "collisions": prepared.collisions}
    tuning_seconds = time.perf_counter() - t_method  # set-up, training and recall checks
    histories[label] = result.history
    rec = eval_lib.recall(model, variables, tokenizer, facts, template)
    metrics = eval_lib.heldout_metrics(model, variables, tokenizer, heldout)
    metrics.update(locality.locality_metrics(model, variables, base_answers))
    full = [r["epoch"] + 1 for r in result.history if r.get("recall") == 1.0]
    train_seconds = float(sum(r["epoch_seconds"] for r in result.history))
    metrics.update({
        "recall": rec.rate,
        "fact_loss": float(np.mean(eval_lib.fact_losses(model, variables, encoded))),
        "epochs": len(result.history),
        "epochs_to_full_recall": full[0] if full else None,
        "train_seconds": train_seconds,
        "tuning_seconds": tuning_seconds,
    })
    if method == "mome":
      metrics.update(mome_figures[label])
      metrics["total_seconds"] = train_seconds + metrics["prepare_seconds"]
    models[label] = metrics
    answers[label] = answers_of(model, variables)

  real_facts = facts_by_mode.get("real") or runs.facts_and_heldout(cfg.data, "real", cfg.eval.split)[0]
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
  if _lead():
    (run_dir / "table1.md").write_text(report.table1(rows, list(models)))
    report.plot_loss_curves(histories, run_dir / "loss_curves.png",
                            f"{model_cfg.architecture} {len(any_facts)} {cfg.data.dataset} facts")
  summary = {
      "backbone": str(cfg.model.path), "dataset": cfg.data.dataset, "n_facts": len(any_facts),
      "split": cfg.eval.split, "sources": heldout.sources, "seed": cfg.data.seed,
      "n_heldout": len(held), "mmlu_scored": models["base"].get("mmlu_scored", 0),
      "mmlu_k": cfg.eval.mmlu_k, "ppl_windows": cfg.eval.ppl_windows,
      "machine": _machine(), "mesh": {"data": cfg.mesh.data, "expert": cfg.mesh.expert},
      "wall_seconds": time.perf_counter() - t_start, "models": models,
  }
  mome_text = mome_table(summary)
  if _lead():
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "report.md").write_text(report.report_markdown(summary, config_text)
                                       + (f"\n## MoME\n\n```\n{mome_text}\n```\n" if mome_text else ""))
  print(report.summary_table(summary))
  if mome_text:
    print(f"\n{mome_text}")
  print(f"\nwrote {run_dir}/{{report.md,summary.json,table1.md,loss_curves.png,metrics.jsonl}}")
  return summary


def seed_config(cfg: runs.RunConfig, seed: int) -> runs.RunConfig:
  """`cfg` with every seed set to `seed`, run in RUN_DIR/seed-<seed>: the trained questions and
  random answers (`data.seed`), LoRA's and MoME's initialisation and batch order."""
  replace = dataclasses.replace
  return replace(cfg, data=replace(cfg.data, seed=seed), train=replace(cfg.train, seed=seed),
                 mome=replace(cfg.mome, seed=seed, train=replace(cfg.mome.train, seed=seed)),
                 run_dir=str(pathlib.Path(cfg.run_dir) / f"seed-{seed}"))


def run_seeds(cfg: runs.RunConfig, seeds: Sequence[int], resume: bool = False,
              progress: bool = True) -> dict[str, Any]:
  """`run` once per seed (`seed_config`); returns the summary over seeds (also written to disk).

  With `resume`, a seed whose run finished (its summary.json beside the same config) is read back.
  """
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f"--seeds must be distinct seeds >= 0, got {list(seeds)}")
  summaries = []
  for seed in seeds:
    seed_cfg = seed_config(cfg, seed)
    sub = runs.RunDir(seed_cfg.run_dir)
    done = sub.path / "summary.json"
    if resume and done.is_file() and sub.config_file.read_text() == yaml_config.dump(seed_cfg):
      print(f"seed {seed}: finished in {sub.path}, read back", flush=True)
      summaries.append(json.loads(done.read_text()))
      continue
    print(f"seed {seed}: {sub.path}", flush=True)
    summaries.append(run(seed_cfg, resume=resume, progress=progress))
  first = summaries[0]
  summary = {
      "seeds": list(seeds), "split": cfg.eval.split, "sources": first["sources"],
      "runs": [f"seed-{seed}" for seed in seeds], "backbone": first["backbone"],
      "dataset": first["dataset"], "n_facts": first["n_facts"], "n_heldout": first["n_heldout"],
      "models": report.aggregate_seeds([s["models"] for s in summaries]),
  }
  run_dir = pathlib.Path(cfg.run_dir)
  if _lead():
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "report.md").write_text(report.seeds_markdown(summary))
    report.plot_seed_differences(summary["models"], cfg.eval.split, run_dir / "differences.png")
  print(f"\nmean ± SE over seeds {list(seeds)} ({cfg.eval.split} split):\n")
  print(report.seeds_table(summary["models"], cfg.eval.split))
  print(f"wrote {run_dir}/{{report.md,summary.json,differences.png}} and one run directory per seed")
  return summary


def _seeds(text: str) -> tuple[int, ...]:
  try:
    seeds = tuple(int(x) for x in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2, got {text!r}")
  if len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
  return seeds


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.randomization",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG,
                      help=f"YAML config (default {DEFAULT_CONFIG.relative_to(REPO)})")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override any config field, e.g. --set train.optimizer.learning_rate=1e-3")
  parser.add_argument("--method", choices=("lora", "mome", "both"), help="same as --set method=...")
  parser.add_argument("--dataset", choices=("truthfulqa", "mmlu", "facts"), help="same as --set data.dataset=...")
  parser.add_argument("--run-dir", help="same as --set run_dir=...")
  parser.add_argument("--split", choices=runs.SPLITS, help="held-out split of every figure: dev "
                      "(choosing settings) or test (final tables); same as --set eval.split=...")
  parser.add_argument("--seeds", type=_seeds, metavar="S,S,...", help="one run per seed in "
                      "RUN_DIR/seed-S, reported as mean ± SE over seeds (e.g. 0,1,2)")
  parser.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoints")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--distributed", action="store_true",
                      help="one process of several (one per host): jax.distributed.initialize first,"
                      " process 0 writes the run's files (docs/distributed.md)")
  dry_run.add_arguments(parser)
  args = parser.parse_args(argv)
  if args.distributed:
    init_distributed()
  kernels_log = logging.getLogger("lamini_jax_kernels")  # which gather-and-apply "auto" took, and why
  kernels_log.setLevel(logging.INFO)
  kernels_log.addHandler(logging.StreamHandler())
  kernels_log.propagate = False  # once, even where a library configured the root logger
  overrides = list(args.set)
  for flag, field in (("method", "method"), ("dataset", "data.dataset"), ("run_dir", "run_dir"),
                      ("split", "eval.split")):
    if getattr(args, flag) is not None:
      overrides.append(f"{field}={getattr(args, flag)}")
  try:
    cfg = runs.load_run_config(args.config, overrides)
    if args.dry_run:  # before any data or weights are read
      return dry_run.main(cfg, args, str(args.config))
    if args.seeds is not None:
      run_seeds(cfg, args.seeds, resume=args.resume, progress=not args.no_progress)
    else:
      run(cfg, resume=args.resume, progress=not args.no_progress)
  except (yaml_config.ConfigError, FileNotFoundError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
