"""The paper's cost claim, rebuilt from stated assumptions.

The paper (arXiv 2406.17642, section 1) prices "banishing hallucinations" on a Llama 3
400B-scale model trained for 100 epochs with the Chinchilla recipe: 3.43e24 FLOPs, 3 months
on 350,000 MI300X, 350 MW, $68M of power and the CO2 of 62,000 US households.
`paper_scenario` rebuilds each figure from the explicit `Assumptions`, `compare` puts them
beside the paper's, and `findings` says in words where the paper's figures disagree.

The hardware facts (`Accelerator`, `ACCELERATORS`, `Cluster`) and `estimate` (time,
energy and money of a number of FLOPs) live here too; `lamini_jax.flops` uses them to
price memory-tuning runs. Training FLOPs here are C = 6 N D (Kaplan et al. 2020), the
full-training case of `flops.model_flops_per_token`.
"""

from __future__ import annotations

import dataclasses
import math

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86_400.0
# Chinchilla (Hoffmann et al. 2022), Table 3, Approach 1: a 520B model, 11.0T tokens,
# 3.43e25 FLOPs (= 6 N D). The paper's "3.43" matches this row's mantissa.
CHINCHILLA_520B_PARAMS = 520e9
CHINCHILLA_520B_TOKENS = 11.0e12
# Older editions of the EPA Greenhouse Gas Equivalencies Calculator converted kWh with
# the AVERT national marginal rate (7.07e-4 and 7.09e-4 t CO2/kWh in editions seen),
# before it switched to the eGRID average.
EPA_OLD_MARGINAL_KG_PER_KWH = 0.709


def _positive(obj, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Dense bf16 peak (FLOP/s, no sparsity) and maximum board power (W, None if unpublished)."""

  name: str
  peak_flops_bf16: float
  power_watts: float | None
  source: str

  def __post_init__(self):
    _positive(self, "peak_flops_bf16", "power_watts")


# Datasheet figures; "dense" is without 2:4 structured sparsity (which doubles the headline).
ACCELERATORS = {a.name: a for a in (
    Accelerator("MI300X", 1307.4e12, 750.0,
                "AMD MI300X datasheet: 1307.4 TFLOP/s dense bf16 (2614.9 sparse), 750 W"),
    Accelerator("H100", 989.4e12, 700.0, "NVIDIA H100 SXM datasheet: 989.4 TFLOP/s dense bf16, 700 W"),
    Accelerator("H200", 989.4e12, 700.0, "NVIDIA H200 SXM datasheet: 989.4 TFLOP/s dense bf16, 700 W"),
    Accelerator("A100", 312e12, 400.0, "NVIDIA A100 SXM datasheet: 312 TFLOP/s dense bf16, 400 W"),
    Accelerator("TPUv5e", 197e12, None, "Google Cloud TPU v5e docs: 197 TFLOP/s bf16; power unpublished"),
    Accelerator("TPUv5p", 459e12, None, "Google Cloud TPU v5p docs: 459 TFLOP/s bf16; power unpublished"),
)}


def accelerator(name: str) -> Accelerator:
  """Looks up a preset by name, ignoring case, spaces, dashes and a trailing 'SXM'."""
  key = name.upper().replace(" ", "").replace("-", "").removesuffix("SXM")
  for preset in ACCELERATORS:
    if preset.upper() == key:
      return ACCELERATORS[preset]
  raise ValueError(f"unknown accelerator {name!r}; presets: {', '.join(ACCELERATORS)}")


def _assumed(default, source: str, unit: str = ""):
  return dataclasses.field(default=default, metadata={"source": source, "unit": unit})


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The hardware a run uses and the price, power overhead and carbon of its electricity.

  Defaults are the paper's cluster (350,000 MI300X at 45% MFU) and our energy assumptions.
  """

  accelerator: Accelerator = _assumed(ACCELERATORS["MI300X"], "paper section 1: AMD MI300X")
  count: int = _assumed(350_000, "paper section 1", "accelerators")
  mfu: float = _assumed(0.45, "paper section 1 (MFU as defined in PaLM)")
  pue: float = _assumed(
      1.2, "assumed facility overhead on board power: Google reports a fleet PUE of 1.10 (2023), "
      "the Uptime Institute an industry average of ~1.58 (2023); host CPUs/network not counted")
  usd_per_kwh: float = _assumed(0.09, "paper section 1", "$/kWh")
  kg_co2_per_kwh: float = _assumed(
      0.394, "EPA GHG Equivalencies Calculator, current edition: eGRID US average 823.1 lb "
      "CO2/MWh with 5.1% grid losses (older editions used a marginal rate of ~0.709)", "kg/kWh")
  household_t_co2_per_year: float = _assumed(
      7.94, "EPA GHG Equivalencies Calculator, 'home energy use' (editions give 7.94 to 8.35; "
      "the edition the paper used is unknown)", "t CO2/yr")
  usd_per_accelerator_hour: float | None = _assumed(None, "optional rental price", "$/h")
  watts: float | None = _assumed(None, "optional override of the accelerator's board power", "W")

  def __post_init__(self):
    if not isinstance(self.count, int) or self.count < 1:
      raise ValueError(f"Cluster.count must be a positive integer, got {self.count!r}")
    if not 0 < self.mfu <= 1:
      raise ValueError(f"Cluster.mfu must be in (0, 1], got {self.mfu!r}")
    if self.pue < 1:
      raise ValueError(f"Cluster.pue must be >= 1, got {self.pue!r}")
    _positive(self, "usd_per_kwh", "kg_co2_per_kwh", "household_t_co2_per_year",
              "usd_per_accelerator_hour", "watts")

  @property
  def facility_watts_per_accelerator(self) -> float | None:
    board = self.watts if self.watts is not None else self.accelerator.power_watts
    return None if board is None else board * self.pue


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """The paper's scenario: a Chinchilla-recipe model trained for many epochs."""

  params: float = _assumed(400e9, "paper section 1: 'Llama 3 400B scale'", "parameters")
  tokens_per_param: float = _assumed(20.0, "Chinchilla rule of thumb D = 20 N (Hoffmann et al. 2022)")
  epochs: float = _assumed(100.0, "paper section 1 and Appendix A: 100 epochs")
  flops_per_param_token: float = _assumed(6.0, "C = 6 N D (Kaplan et al. 2020; Chinchilla)")
  days_per_month: float = _assumed(
      30.0, "reads the paper's '3 months' as 90 days ($68M needs it)", "days")
  household_kwh_per_year: float = _assumed(
      10_791.0, "EIA: average US residential customer used 10,791 kWh in 2022", "kWh/yr")
  cluster: Cluster = Cluster()

  def __post_init__(self):
    _positive(self, "params", "tokens_per_param", "epochs", "flops_per_param_token",
              "days_per_month", "household_kwh_per_year")


@dataclasses.dataclass(frozen=True)
class PaperFigures:
  """The outputs the paper states in section 1."""

  flops: float = 3.43e24
  months: float = 3.0
  power_mw: float = 350.0
  power_usd: float = 68e6
  households: float = 62_000.0


PAPER = PaperFigures()


@dataclasses.dataclass(frozen=True)
class Estimate:
  """FLOPs, time, power, energy, money and CO2 of a run. Energy fields are None when the
  accelerator's power is unknown; `rental_usd` is None without a rental price."""

  flops: float
  accelerator_seconds: float
  wall_seconds: float
  avg_power_mw: float | None
  energy_kwh: float | None
  energy_usd: float | None
  co2_t: float | None
  household_years: float | None
  rental_usd: float | None


def training_flops(params: float, tokens: float, epochs: float = 1.0,
                   flops_per_token: float | None = None) -> float:
  """FLOPs of `epochs` passes over `tokens`; `flops_per_token` defaults to 6 * params."""
  per_token = 6.0 * params if flops_per_token is None else flops_per_token
  return per_token * tokens * epochs


def estimate(flops: float, cluster: Cluster) -> Estimate:
  """Time, energy and cost of `flops` on `cluster` at its MFU."""
  acc_s = flops / (cluster.accelerator.peak_flops_bf16 * cluster.mfu)
  wall_s = acc_s / cluster.count
  rental = None
  if cluster.usd_per_accelerator_hour is not None:
    rental = acc_s / SECONDS_PER_HOUR * cluster.usd_per_accelerator_hour
  watts = cluster.facility_watts_per_accelerator
  if watts is None:
    return Estimate(flops, acc_s, wall_s, None, None, None, None, None, rental)
  kwh = watts * acc_s / SECONDS_PER_HOUR / 1e3
  co2_t = kwh * cluster.kg_co2_per_kwh / 1e3
  return Estimate(flops, acc_s, wall_s, watts * cluster.count / 1e6, kwh, kwh * cluster.usd_per_kwh,
                  co2_t, co2_t / cluster.household_t_co2_per_year, rental)


def paper_scenario(a: Assumptions) -> Estimate:
  tokens = a.tokens_per_param * a.params
  return estimate(training_flops(a.params, tokens, a.epochs, a.flops_per_param_token * a.params),
                  a.cluster)


def assumption_rows(a: Assumptions) -> list[tuple[str, str, str]]:
  """(name, value, source) for every assumption; overridden values say so."""
  rows = []
  for obj in (a, a.cluster):
    for f in dataclasses.fields(obj):
      value = getattr(obj, f.name)
      if f.name == "cluster" or (value is None and f.default is None):
        continue
      source = f.metadata["source"] if value == f.default else "set by the user"
      if isinstance(value, Accelerator):
        shown = value.name
        source = value.source if value == f.default else f"set by the user; {value.source}"
      else:
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
        shown = f"{shown} {f.metadata['unit']}".strip()
      rows.append((f.name, shown, source))
  return rows


@dataclasses.dataclass(frozen=True)
class Comparison:
  quantity: str
  paper: float
  model: float | None

  @property
  def ratio(self) -> float | None:
    return None if self.model is None else self.model / self.paper


def _paper_kwh(a: Assumptions, p: PaperFigures) -> float:
  return p.power_mw * 1e3 * p.months * a.days_per_month * 24.0


def compare(a: Assumptions, p: PaperFigures = PAPER) -> list[Comparison]:
  """The paper's figures beside the model's. The paper's energy is derived (power x time)."""
  e = paper_scenario(a)
  months = e.wall_seconds / SECONDS_PER_DAY / a.days_per_month
  scaled = lambda x, k: None if x is None else x / k
  return [
      Comparison("total training FLOPs", p.flops, e.flops),
      Comparison("wall time (months)", p.months, months),
      Comparison("average power (MW)", p.power_mw, e.avg_power_mw),
      Comparison("energy (GWh; paper's = power x time)", _paper_kwh(a, p) / 1e6,
                 scaled(e.energy_kwh, 1e6)),
      Comparison("cost of power ($M)", p.power_usd / 1e6, scaled(e.energy_usd, 1e6)),
      Comparison("US household-years of CO2", p.households, e.household_years),
  ]


def _versus(paper: float, model: float, what: str = "") -> str:
  """How the paper's figure relates to the model's: agrees (within 5%) or is k times off."""
  if abs(model / paper - 1) <= 0.05:
    return f"agrees with {what}".strip()
  if model > paper:
    return f"is {model / paper:.3g}x smaller than {what}".strip()
  return f"is {paper / model:.3g}x larger than {what}".strip()


def findings(a: Assumptions, p: PaperFigures = PAPER) -> list[str]:
  """Plain-language statements of where the paper's figures (dis)agree."""
  c, acc = a.cluster, a.cluster.accelerator
  tokens = a.tokens_per_param * a.params
  model_flops = training_flops(a.params, tokens, a.epochs, a.flops_per_param_token * a.params)
  rate = c.count * acc.peak_flops_bf16 * c.mfu  # FLOP/s the cluster delivers
  days = lambda flops, r=rate: flops / r / SECONDS_PER_DAY
  paper_days = p.months * a.days_per_month
  chin = 6.0 * CHINCHILLA_520B_PARAMS * CHINCHILLA_520B_TOKENS
  out = [
      f"FLOPs: the paper's {p.flops:.3g} FLOPs {_versus(p.flops, model_flops)} "
      f"{a.flops_per_param_token:g} N D x epochs = {a.flops_per_param_token:g} x {a.params:.3g} x "
      f"{tokens:.3g} x {a.epochs:g} = {model_flops:.3g} FLOPs (D = {a.tokens_per_param:g} N). "
      f"Its mantissa matches Chinchilla's Table 3 row for a 520B model, 6 x 520e9 x 11.0e12 = "
      f"{chin:.3g} FLOPs for ONE epoch; 100 epochs of that row are {chin * 100:.3g} FLOPs, "
      f"10^{round(math.log10(chin * 100 / p.flops))} times the printed figure: "
      f"the exponent looks wrong.",
      f"Time: {p.months:g} months ({paper_days:g} days) on {c.count:,} {acc.name} at {c.mfu:.0%} "
      f"of the dense bf16 peak ({acc.peak_flops_bf16 / 1e12:.1f} TFLOP/s) deliver "
      f"{rate * paper_days * SECONDS_PER_DAY:.3g} FLOPs. At that rate {model_flops:.3g} FLOPs "
      f"take {days(model_flops):.0f} days ({days(model_flops) / a.days_per_month:.1f} months); "
      f"the printed {p.flops:.3g} would take {days(p.flops) * 24:.1f} hours; "
      f"{chin * 100:.3g} would take {days(chin * 100):.0f} days at the dense peak, or "
      f"{days(chin * 100, 2 * rate):.0f} days at the 2:4-sparsity peak "
      f"(2x dense, the datasheet's headline figure).",
  ]
  if c.facility_watts_per_accelerator is not None:
    per_acc = p.power_mw * 1e6 / c.count
    board = c.facility_watts_per_accelerator / c.pue
    out.append(
        f"Power: {p.power_mw:g} MW over {c.count:,} accelerators is {per_acc:,.0f} W each, "
        f"{per_acc / board:.2f}x the {board:g} W board power: the paper implies an all-in "
        f"overhead (PUE with host servers) of {per_acc / board:.2f}; this model uses PUE "
        f"{c.pue:g}, i.e. {board * c.pue * c.count / 1e6:.0f} MW.")
  kwh = _paper_kwh(a, p)
  usd = kwh * c.usd_per_kwh
  quarter_usd = p.power_mw * 1e3 * 365.25 / 4 * 24 * c.usd_per_kwh
  printed_kwh = p.power_mw * 1e3 * days(p.flops) * 24
  out.append(
      f"Cost: {p.power_mw:g} MW for {paper_days:g} days at ${c.usd_per_kwh}/kWh is "
      f"${usd / 1e6:.1f}M: the paper's ${p.power_usd / 1e6:.0f}M "
      f"{_versus(p.power_usd, usd, 'its own power and time')} (a 91.3-day quarter gives "
      f"${quarter_usd / 1e6:.1f}M). At the printed {p.flops:.3g} FLOPs the run would use "
      f"{printed_kwh:.3g} kWh, ${printed_kwh * c.usd_per_kwh:,.0f}.")
  needed = p.households / kwh  # (kg CO2/kWh) / (kg CO2 per household-year)
  homes = lambda kg_per_kwh: kwh * kg_per_kwh / 1e3 / c.household_t_co2_per_year
  out.append(
      f"Households: the paper's energy ({kwh:.3g} kWh) makes {p.households:,.0f} household-years "
      f"only if the grid factor is {needed * c.household_t_co2_per_year * 1e3:.3f} kg CO2/kWh "
      f"for {c.household_t_co2_per_year:g} t per home-year (or {c.kg_co2_per_kwh:g} kg/kWh for "
      f"{c.kg_co2_per_kwh / needed / 1e3:.2f} t per home-year). The assumed "
      f"{c.kg_co2_per_kwh:g} kg/kWh gives {homes(c.kg_co2_per_kwh):,.0f}; EPA's older marginal "
      f"rate {EPA_OLD_MARGINAL_KG_PER_KWH} gives {homes(EPA_OLD_MARGINAL_KG_PER_KWH):,.0f}. "
      f"Read as electricity instead, each of {p.households:,.0f} homes would use "
      f"{kwh / p.households:,.0f} kWh a year, against {a.household_kwh_per_year:,.0f} (EIA).")
  return out
