"""What memorization costs: the paper's compute estimate rebuilt, and a price for a run.

  python -m experiments.compute_cost
  python -m experiments.compute_cost --llama3-8b-lora --accelerator H100 --count 8
  python -m experiments.compute_cost --backbone-params 7.5e9 --trainable-params 8.4e7
      --tokens-per-epoch 4e4 --epochs 100 --accelerator MI300X --count 8 --mfu 0.3   (one line)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lamini_jax import cost


ENERGY_FLAGS = ("pue", "usd_per_kwh", "kg_co2_per_kwh", "household_t_co2_per_year")


def _num(x: float | None, fmt: str = ".3g") -> str:
  return "n/a" if x is None else format(x, fmt)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _duration(seconds: float) -> str:
  if seconds < cost.SECONDS_PER_HOUR:
    return f"{seconds:.3g} s"
  if seconds < 2 * cost.SECONDS_PER_DAY:
    return f"{seconds / cost.SECONDS_PER_HOUR:.3g} h"
  return f"{seconds / cost.SECONDS_PER_DAY:.3g} days"


def describe(e: cost.Estimate) -> str:
  rows = [
      ("FLOPs", _num(e.flops)),
      ("accelerator-hours", _num(e.accelerator_seconds / cost.SECONDS_PER_HOUR)),
      ("wall time", _duration(e.wall_seconds)),
      ("average power (MW)", _num(e.avg_power_mw)),
      ("energy (kWh, with PUE)", _num(e.energy_kwh)),
      ("cost of power ($)", _num(e.energy_usd)),
      ("CO2 (t)", _num(e.co2_t)),
      ("US household-years of CO2", _num(e.household_years)),
      ("rental ($)", _num(e.rental_usd)),
  ]
  return _table(("quantity", "value"), rows)


def paper_report(a: cost.Assumptions) -> str:
  comparisons = [(c.quantity, _num(c.paper), _num(c.model), _num(c.ratio))
                 for c in cost.compare(a)]
  return "\n\n".join([
      "## Assumptions",
      _table(("assumption", "value", "source"), cost.assumption_rows(a)),
      "## The paper's figures (section 1) versus the model's",
      _table(("quantity", "paper", "model", "model / paper"), comparisons),
      "## Findings",
      "\n".join(f"- {f}" for f in cost.findings(a)),
  ])


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("electricity, for both sections (defaults: the assumptions table)")
  for name in ENERGY_FLAGS:
    g.add_argument("--" + name.replace("_", "-"), type=float, default=None)
  r = p.add_argument_group("price a memory-tuning run")
  r.add_argument("--llama3-8b-lora", action="store_true",
                 help="the paper's Appendix A run: Llama 3 8B, LoRA r=32 on q,k,v,o,gate,up,down, "
                 "TruthfulQA (817 facts x 48 tokens), 100 epochs")
  r.add_argument("--backbone-params", type=float, help="frozen matmul parameters per token")
  r.add_argument("--trainable-params", type=float, help="trainable parameters touched per token")
  r.add_argument("--router-params", type=float, default=0.0, help="frozen router parameters per token")
  r.add_argument("--tokens-per-epoch", type=float, help="facts x tokens per fact")
  r.add_argument("--epochs", type=float, default=100.0)
  r.add_argument("--accelerator", default="MI300X", help=", ".join(cost.ACCELERATORS))
  r.add_argument("--count", type=int, default=8)
  r.add_argument("--mfu", type=float, default=0.45)
  r.add_argument("--usd-per-gpu-hour", type=float, default=None, help="rental price per accelerator")
  r.add_argument("--watts", type=float, default=None, help="override the accelerator's board power")
  return p


def workload_from_args(args: argparse.Namespace,
                       parser: argparse.ArgumentParser) -> cost.Workload | None:
  """The run to price, or None. The place to add `--config path.yaml`."""
  if args.llama3_8b_lora:
    return dataclasses.replace(cost.llama3_8b_lora_workload(), epochs=args.epochs)
  given = [args.backbone_params, args.trainable_params, args.tokens_per_epoch]
  if all(v is None for v in given):
    return None
  if any(v is None for v in given):
    parser.error("pricing a run needs --backbone-params, --trainable-params and --tokens-per-epoch "
                 "(or --llama3-8b-lora)")
  return cost.Workload(args.backbone_params, args.trainable_params, args.tokens_per_epoch,
                       args.epochs, router_params=args.router_params)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  energy = {k: v for k in ENERGY_FLAGS if (v := getattr(args, k)) is not None}
  try:
    paper = cost.Assumptions(cluster=dataclasses.replace(cost.Cluster(), **energy))
    workload = workload_from_args(args, parser)
    cluster = cost.Cluster(accelerator=cost.accelerator(args.accelerator), count=args.count,
                           mfu=args.mfu, usd_per_accelerator_hour=args.usd_per_gpu_hour,
                           watts=args.watts, **energy)
  except ValueError as e:
    parser.error(str(e))
  print("# What memorization costs (arXiv 2406.17642, section 1)\n")
  print(paper_report(paper))
  if workload is not None:
    print("\n## Price of a memory-tuning run\n")
    print(f"{workload}\n")
    print(f"{cluster.count} x {cluster.accelerator.name} at {cluster.mfu:.0%} MFU; "
          f"{workload.flops_per_token:.4g} FLOPs per token\n")
    print(describe(cost.price_run(workload, cluster)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
