"""The paper's cost audit: every expected figure is recomputed here by plain arithmetic."""

import dataclasses

import pytest

from experiments import compute_cost
from lamini_jax import config
from lamini_jax import flops
from lamini_jax import paper_cost


def _close(got, want, rel=1e-12):
  assert got == pytest.approx(want, rel=rel), (got, want)


def test_paper_scenario_matches_hand_arithmetic():
  e = paper_cost.paper_scenario(paper_cost.Assumptions())
  n = 400e9
  total = 6 * n * (20 * n) * 100                           # 6 N D epochs, D = 20 N
  _close(e.flops, 1.92e27)
  _close(e.flops, total)
  gpu_s = total / (1307.4e12 * 0.45)                       # MI300X dense bf16 at 45% MFU
  _close(e.accelerator_seconds, gpu_s)
  _close(e.wall_seconds, gpu_s / 350_000)
  assert 107.9 < e.wall_seconds / 86_400 < 108.0          # 9.3245e6 s
  _close(e.avg_power_mw, 350_000 * 750 * 1.2 / 1e6)       # 315 MW with PUE 1.2
  kwh = 350_000 * 750 * 1.2 / 1000 * (gpu_s / 350_000) / 3600
  _close(e.energy_kwh, kwh)
  _close(e.energy_usd, kwh * 0.09)
  _close(e.co2_t, kwh * 0.394 / 1000)
  _close(e.household_years, kwh * 0.394 / 1000 / 7.94)
  assert e.rental_usd is None


def test_training_flops_is_six_n_d():
  assert paper_cost.training_flops(1e9, 2e10) == 6e9 * 2e10
  assert paper_cost.training_flops(1e9, 2e10, epochs=3, flops_per_token=7e9) == 7e9 * 2e10 * 3


def test_estimate_on_an_odd_cluster():
  acc = paper_cost.Accelerator("odd", peak_flops_bf16=123e12, power_watts=321.0, source="test")
  c = paper_cost.Cluster(accelerator=acc, count=7, mfu=0.37, pue=1.13, usd_per_kwh=0.11,
                         kg_co2_per_kwh=0.5, household_t_co2_per_year=6.1,
                         usd_per_accelerator_hour=2.5)
  e = paper_cost.estimate(1.7e20, c)
  gpu_s = 1.7e20 / (123e12 * 0.37)
  kwh = 321 * 1.13 * gpu_s / 3600 / 1000
  _close(e.wall_seconds, gpu_s / 7)
  _close(e.avg_power_mw, 7 * 321 * 1.13 / 1e6)
  _close(e.energy_usd, kwh * 0.11)
  _close(e.household_years, kwh * 0.5 / 1000 / 6.1)
  _close(e.rental_usd, gpu_s / 3600 * 2.5)
  tpu = paper_cost.accelerator("tpu v5p")
  no_power = paper_cost.estimate(1.7e20, dataclasses.replace(c, accelerator=tpu))
  assert no_power.energy_kwh is None and no_power.household_years is None
  _close(no_power.wall_seconds, 1.7e20 / (459e12 * 0.37) / 7)
  _close(paper_cost.estimate(1.7e20, dataclasses.replace(c, watts=500.0)).avg_power_mw,
         7 * 500 * 1.13 / 1e6)


def test_compare_against_the_papers_figures():
  rows = {r.quantity: r for r in paper_cost.compare(paper_cost.Assumptions())}
  total = rows["total training FLOPs"]
  assert total.paper == 3.43e24
  _close(total.ratio, 1.92e27 / 3.43e24)
  months = rows["wall time (months)"]
  _close(months.model, 1.92e27 / (350_000 * 1307.4e12 * 0.45) / 86_400 / 30)
  energy = rows["energy (GWh; paper's = power x time)"]
  _close(energy.paper, 350e3 * 90 * 24 / 1e6)             # 756 GWh
  _close(rows["cost of power ($M)"].paper, 68.0)
  _close(rows["US household-years of CO2"].paper, 62_000)


def test_findings_flag_the_inconsistencies():
  text = "\n".join(paper_cost.findings(paper_cost.Assumptions()))
  n = 400e9
  model_flops = 6 * n * (20 * n) * 100                     # 1.92e27
  assert f"is {model_flops / 3.43e24:.3g}x smaller than" in text and "1.92e+27" in text  # 560x
  assert "10^3 times the printed figure" in text           # 3.43e27 = 6 * 520e9 * 11e12 * 100
  printed_hours = 3.43e24 / (350_000 * 1307.4e12 * 0.45) / 3600
  assert f"the printed 3.43e+24 would take {printed_hours:.1f} hours" in text  # 4.6 hours
  assert "1,000 W each" in text and "1.33" in text         # 350 MW / 350k GPUs vs 750 W
  assert f"${350e3 * 90 * 24 * 0.09 / 1e6:.1f}M" in text   # $68.0M
  implied = 62_000 * 7.94 / (350e3 * 90 * 24) * 1e3        # kg CO2/kWh that gives 62,000 homes
  assert f"{implied:.3f} kg CO2/kWh" in text
  # With the FLOPs made consistent the FLOPs finding reports agreement (ratio 1).
  n = (3.43e24 / 6 / 20 / 100) ** 0.5
  text = paper_cost.findings(paper_cost.Assumptions(params=n))[0]
  assert "agrees with" in text and "smaller" not in text
  # A 1B model's 1.2e22 FLOPs are fewer than the paper's: its figure is the larger one.
  text = paper_cost.findings(paper_cost.Assumptions(params=1e9))[0]
  assert f"is {3.43e24 / (6 * 1e9 * 20e9 * 100):.3g}x larger than" in text  # 286x


@pytest.mark.parametrize("bad, match", [
    (dict(mfu=1.5), "Cluster.mfu"), (dict(count=0), "Cluster.count"), (dict(pue=0.9), "Cluster.pue"),
    (dict(usd_per_kwh=-1.0), "Cluster.usd_per_kwh")])
def test_validation_names_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    paper_cost.Cluster(**bad)
  with pytest.raises(ValueError, match="Assumptions.epochs"):
    paper_cost.Assumptions(epochs=0)
  with pytest.raises(ValueError, match="unknown accelerator 'B300'"):
    paper_cost.accelerator("B300")


def test_cli_prints_the_papers_figures_and_a_price(capsys):
  assert compute_cost.main([]) == 0
  out = capsys.readouterr().out
  for figure in ("3.43e+24", "| 350 |", "| 68 |", "6.2e+04", "1307.4 TFLOP/s", "0.394 kg/kWh",
                 "| pue | 1.2 |", "Findings", "560x smaller"):
    assert figure in out, figure
  assert "Price of a memory-tuning run" not in out
  assert compute_cost.main(["--llama3-8b-lora", "--accelerator", "H100", "--usd-per-gpu-hour", "3",
                            "--pue", "1.5"]) == 0
  out = capsys.readouterr().out
  assert "8 x H100 at 45% MFU" in out and "| pue | 1.5 | set by the user |" in out
  backbone = flops.llama_matmul_params(config.llama3_8b())
  per_token = 4 * backbone + 6 * 83_886_080 + 12 * 32 * 48 * 4096
  total = per_token * 817 * 48 * 100
  assert f"| FLOPs | {total:.3g} |" in out
  assert f"| rental ($) | {total / (989.4e12 * 0.45) / 3600 * 3:.3g} |" in out
  with pytest.raises(SystemExit):
    compute_cost.main(["--backbone-params", "8e9"])
