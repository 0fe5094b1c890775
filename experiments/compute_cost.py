"""What memorization costs: the paper's compute estimate rebuilt, and a price for a run.

  python -m experiments.compute_cost
  python -m experiments.compute_cost --llama3-8b-lora --accelerator H100 --count 8
  python -m experiments.compute_cost --backbone-params 7.5e9 --trainable-params 8.4e7
      --tokens-per-epoch 4e4 --epochs 100 --accelerator MI300X --count 8 --mfu 0.3   (one line)
  python -m experiments.compute_cost --config configs/randomization_cpu.yaml --accelerator H100

`--config RUN.yaml` (with `--set a.b=value` overrides) prices every training job of a
run of `experiments.randomization`: one per answer mode and method, plus MoME's phase 1.
The backbone's shape comes from its `config.json` (a local directory, or the Hugging
Face cache: nothing is downloaded; otherwise give `--backbone-params` and
`--trainable-params`, which then apply to every job and leave attention uncounted).
Tokens per epoch are measured (the facts encoded with the run's tokenizer and
template: real tokens, no padding) when the tokenizer and data are at hand, else
estimated as n_train x `--tokens-per-fact` (default `flops.TOKENS_PER_FACT`); the
table says which. Attention is costed at each fact's own length (sum T^2 / sum T).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import numpy as np

from lamini_jax.config import ModelConfig
from lamini_jax.data import encoding
from lamini_jax.data import sources
from lamini_jax import flops
from lamini_jax import hf
from lamini_jax import paper_cost
from lamini_jax import runs


ENERGY_FLAGS = ("pue", "usd_per_kwh", "kg_co2_per_kwh", "household_t_co2_per_year")


def _num(x: float | None, fmt: str = ".3g") -> str:
  return "n/a" if x is None else format(x, fmt)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _duration(seconds: float) -> str:
  if seconds < paper_cost.SECONDS_PER_HOUR:
    return f"{seconds:.3g} s"
  if seconds < 2 * paper_cost.SECONDS_PER_DAY:
    return f"{seconds / paper_cost.SECONDS_PER_HOUR:.3g} h"
  return f"{seconds / paper_cost.SECONDS_PER_DAY:.3g} days"


def describe(e: paper_cost.Estimate) -> str:
  rows = [
      ("FLOPs", _num(e.flops)),
      ("accelerator-hours", _num(e.accelerator_seconds / paper_cost.SECONDS_PER_HOUR)),
      ("wall time", _duration(e.wall_seconds)),
      ("average power (MW)", _num(e.avg_power_mw)),
      ("energy (kWh, with PUE)", _num(e.energy_kwh)),
      ("cost of power ($)", _num(e.energy_usd)),
      ("CO2 (t)", _num(e.co2_t)),
      ("US household-years of CO2", _num(e.household_years)),
      ("rental ($)", _num(e.rental_usd)),
  ]
  return _table(("quantity", "value"), rows)


def paper_report(a: paper_cost.Assumptions) -> str:
  comparisons = [(c.quantity, _num(c.paper), _num(c.model), _num(c.ratio))
                 for c in paper_cost.compare(a)]
  return "\n\n".join([
      "## Assumptions",
      _table(("assumption", "value", "source"), paper_cost.assumption_rows(a)),
      "## The paper's figures (section 1) versus the model's",
      _table(("quantity", "paper", "model", "model / paper"), comparisons),
      "## Findings",
      "\n".join(f"- {f}" for f in paper_cost.findings(a)),
  ])


# ------------------------------------------------------------ pricing a run's config


@dataclasses.dataclass(frozen=True)
class Job:
  """One training job of a run and where its tokens per epoch come from."""

  label: str
  workload: flops.Workload
  tokens_source: str


@dataclasses.dataclass(frozen=True)
class Backbone:
  """The backbone's shape (None when its config.json is not at hand) and its directory."""

  cfg: ModelConfig | None
  model_dir: pathlib.Path | None


def find_backbone(path: str) -> Backbone:
  """The backbone's config from a local directory or the Hugging Face cache; never downloads."""
  local = pathlib.Path(runs.resolve_model_path(path)).expanduser()
  if local.is_dir():
    return Backbone(hf.load_config(local), local)
  if path.count("/") == 1 and not path.startswith((".", "/", "~")):
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    cached = huggingface_hub.try_to_load_from_cache(path, hf.CONFIG_FILE)
    if isinstance(cached, str):
      return Backbone(hf.load_config(pathlib.Path(cached).parent), pathlib.Path(cached).parent)
  return Backbone(None, None)


def fact_lengths(run: runs.RunConfig, answers: str, model_dir: pathlib.Path | None):
  """Tokens of each trained fact as the run encodes them, or None without tokenizer or data."""
  if model_dir is None:
    return None
  try:
    tokenizer = hf.load_tokenizer(model_dir)
    facts = runs.facts_and_heldout(run.data, answers)[0]
  except (hf.CheckpointError, sources.DataNotFoundError, OSError):
    return None
  encoded = encoding.encode_facts(tokenizer, runs.prompt_template(run.data), facts,
                                  run.data.max_len)
  return np.array([len(e.tokens) for e in encoded], np.float64)


@dataclasses.dataclass(frozen=True)
class Overrides:
  """CLI values that replace what a config implies (None: not given)."""

  backbone_params: float | None = None
  trainable_params: float | None = None
  router_params: float | None = None
  tokens_per_fact: float | None = None
  epochs: float | None = None


def config_jobs(run: runs.RunConfig, backbone: Backbone,
                over: Overrides = Overrides()) -> list[Job]:
  """The training jobs of a run: LoRA and/or MoME per answer mode, and MoME's phase 1.

  MoME's phase 1 trains the router and the experts (both costed as trainable) on
  `windows x seq_len` corpus tokens, once per run (it is cached); `over.epochs`
  applies to the memory-tuning jobs only.
  """
  cfg = backbone.cfg
  if cfg is None and (over.backbone_params is None or over.trainable_params is None):
    raise ValueError(
        f"model.path {run.model.path!r}: no config.json locally or in the Hugging Face cache; "
        "pass --backbone-params and --trainable-params (they apply to every job)")
  frozen = over.backbone_params if over.backbone_params is not None else flops.llama_matmul_params(cfg)
  spec = run.mome
  if cfg is None:
    lora, router, experts = 0, 0, 0
  else:
    layer, n = spec.layer_config(cfg.hidden_size), len(spec.layers)
    lora = flops.lora_params(cfg, run.lora.rank, run.lora.targets)
    router, experts = n * flops.mome_router_params(layer), n * flops.mome_active_params(layer)

  def workload(trainable: int, router_params: int, tokens: float, mean_len: float, epochs: float):
    attention = 0.0 if cfg is None else flops.attention_flops_per_token(cfg, mean_len)
    pick = lambda given, derived: derived if given is None else given
    return flops.Workload(frozen, pick(over.trainable_params, trainable), tokens, epochs,
                          router_params=pick(over.router_params, router_params),
                          attention_flops=attention)

  methods = ("lora", "mome") if run.method == "both" else (run.method,)
  jobs = []
  for answers in run.answers:
    lengths = None if over.tokens_per_fact is not None else fact_lengths(run, answers,
                                                                         backbone.model_dir)
    if lengths is not None:
      tokens, mean_len = lengths.sum(), (lengths**2).sum() / lengths.sum()
      source = f"measured: {len(lengths)} facts, {tokens / len(lengths):.1f} tokens/fact"
    else:
      per_fact = flops.TOKENS_PER_FACT if over.tokens_per_fact is None else over.tokens_per_fact
      tokens, mean_len = run.data.n_train * per_fact, per_fact
      source = f"estimated: {run.data.n_train} facts x {per_fact:g} tokens"
    for method in methods:
      epochs = run.train.epochs if method == "lora" else spec.train.epochs
      epochs = epochs if over.epochs is None else over.epochs
      w = (workload(lora, 0, tokens, mean_len, epochs) if method == "lora"
           else workload(experts, router, tokens, mean_len, epochs))
      jobs.append(Job(f"{method}, {answers} answers", w, source))
  g = spec.generalization
  if "mome" in methods and g.epochs > 0:
    jobs.append(Job("mome phase 1 (router and experts)",
                    workload(router + experts, 0, g.windows * g.seq_len, g.seq_len, g.epochs),
                    f"corpus: {g.windows} windows x {g.seq_len} tokens"))
  return jobs


def jobs_table(jobs: list[Job]) -> str:
  rows = [(j.label, _num(j.workload.backbone_params), _num(j.workload.trainable_params),
           _num(j.workload.router_params), f"{j.workload.tokens_per_epoch:,.0f} ({j.tokens_source})",
           f"{j.workload.epochs:g}", _num(j.workload.flops_per_token),
           _num(flops.memory_tuning_flops(j.workload))) for j in jobs]
  return _table(("job", "frozen params", "trainable/token", "router/token", "tokens/epoch",
                 "epochs", "FLOPs/token", "FLOPs"), rows)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("electricity, for both sections (defaults: the assumptions table)")
  for name in ENERGY_FLAGS:
    g.add_argument("--" + name.replace("_", "-"), type=float, default=None)
  r = p.add_argument_group("price a memory-tuning run")
  r.add_argument("--config", help="a run's YAML (configs/*.yaml): price all of its training jobs")
  r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a field of --config (repeatable)")
  r.add_argument("--llama3-8b-lora", action="store_true",
                 help="the paper's Appendix A run: Llama 3 8B, LoRA r=32 on q,k,v,o,gate,up,down, "
                 "TruthfulQA (817 facts x 48 tokens), 100 epochs")
  r.add_argument("--backbone-params", type=float, help="frozen matmul parameters per token")
  r.add_argument("--trainable-params", type=float, help="trainable parameters touched per token")
  r.add_argument("--router-params", type=float, default=None,
                 help="frozen router parameters per token (default 0)")
  r.add_argument("--tokens-per-epoch", type=float, help="facts x tokens per fact")
  r.add_argument("--tokens-per-fact", type=float, default=None,
                 help=f"with --config: skip measuring (default estimate {flops.TOKENS_PER_FACT})")
  r.add_argument("--epochs", type=float, default=None,
                 help="default 100 (with --config: the config's train.epochs)")
  r.add_argument("--accelerator", default="MI300X", help=", ".join(paper_cost.ACCELERATORS))
  r.add_argument("--count", type=int, default=8)
  r.add_argument("--mfu", type=float, default=0.45)
  r.add_argument("--usd-per-gpu-hour", type=float, default=None, help="rental price per accelerator")
  r.add_argument("--watts", type=float, default=None, help="override the accelerator's board power")
  return p


def jobs_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Job]:
  """The training jobs to price (none: only the paper's figures)."""
  epochs = 100.0 if args.epochs is None else args.epochs
  if args.config:
    run = runs.load_run_config(args.config, args.set)
    over = Overrides(args.backbone_params, args.trainable_params, args.router_params,
                     args.tokens_per_fact, args.epochs)
    return config_jobs(run, find_backbone(run.model.path), over)
  if args.set:
    parser.error("--set overrides fields of --config; give --config RUN.yaml")
  if args.llama3_8b_lora:
    w = dataclasses.replace(flops.llama3_8b_lora_workload(), epochs=epochs)
    return [Job("llama3-8b lora", w, f"estimated: {flops.TRUTHFULQA_FACTS} facts x "
                f"{flops.TOKENS_PER_FACT} tokens")]
  given = [args.backbone_params, args.trainable_params, args.tokens_per_epoch]
  if all(v is None for v in given):
    return []
  if any(v is None for v in given):
    parser.error("pricing a run needs --backbone-params, --trainable-params and --tokens-per-epoch "
                 "(or --llama3-8b-lora, or --config RUN.yaml)")
  w = flops.Workload(args.backbone_params, args.trainable_params, args.tokens_per_epoch, epochs,
                     router_params=args.router_params or 0.0)
  return [Job("run", w, "given")]


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  energy = {k: v for k in ENERGY_FLAGS if (v := getattr(args, k)) is not None}
  try:
    paper = paper_cost.Assumptions(cluster=dataclasses.replace(paper_cost.Cluster(), **energy))
    jobs = jobs_from_args(args, parser)
    cluster = paper_cost.Cluster(accelerator=paper_cost.accelerator(args.accelerator),
                                 count=args.count, mfu=args.mfu,
                                 usd_per_accelerator_hour=args.usd_per_gpu_hour,
                                 watts=args.watts, **energy)
  except (ValueError, hf.CheckpointError) as e:
    parser.error(str(e))
  print("# What memorization costs (arXiv 2406.17642, section 1)\n")
  print(paper_report(paper))
  if jobs:
    what = f" ({args.config})" if args.config else ""
    print(f"\n## Price of a memory-tuning run{what}\n")
    print(jobs_table(jobs) + "\n")
    total = sum(flops.memory_tuning_flops(j.workload) for j in jobs)
    print(f"{cluster.count} x {cluster.accelerator.name} at {cluster.mfu:.0%} MFU; all jobs together:\n")
    print(describe(paper_cost.estimate(total, cluster)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
