"""How many synthetic facts a MoME table holds at 100% exact recall, by the table's size.

    python -m benchmarks.capacity                      # N = 2^16, 2^18, 2^20 x 1K, 4K, 16K, 64K facts
    python -m benchmarks.capacity --experts 16 --facts 1000,4000 --max-seconds 7200
    python -m benchmarks.capacity --resume             # after a kill: finished cells are kept

A benchmark, not a CI test: on a 2-core CPU the 16K- and 64K-fact cells take hours each. For
every cell (N experts, F facts), in order of increasing cost (fewest facts first, then fewest
experts), `lamini_jax.tune` memory-tunes the first F made-up facts
(`data.synthetic.synthetic_facts(F, seed)`, the trained question and answer: facts no backbone
can know) into a MoME of N experts per layer, in RUN_DIR/cell-<log2 N>-<F>, and one JSON row per
cell is appended to RUN_DIR/capacity.jsonl and synced as soon as the cell ends:

  recall, recalled            exact recall of the F facts at the end (greedy decoding)
  epochs_to_full_recall       the epoch at which every fact was recalled (recall is checked every
                              `mome.recall_every` epochs; null: not every fact by the end)
  epochs, max_epochs          epochs trained (training stops at full recall) and the budget
  missed_before_repair,       facts not recalled when the epochs ran out, and the epochs and
  repair_epochs, _seconds     seconds of their repair (`mome.repair_epochs`; 0 when none ran)
  train_seconds, seconds      `tune.TuneResult`: the epochs' seconds, and all of `tune` (backbone,
                              balance, keys, training, the final recall)
  pair_collisions             pairs of facts that share an expert: C(c, 2) for an expert that c
                              facts write, summed over experts and MoME layers (two facts that
                              share k experts count k times)
  max_facts_per_expert        the most facts that write one expert, over the layers
  rows_written_per_fact       distinct table rows the facts write, all layers, divided by F
  rows_per_fact               distinct rows one fact writes in a layer (its answer positions x
                              the slots phase 2 trains, each row once), mean over facts and layers
  layers                      each layer's collision report, as the run's collisions.json holds it
  peak_rss_mib                peak resident memory of this process so far (ru_maxrss)

The collision and row figures are those of `mome/mome/collisions.json` in the cell's run (written
by `mome.tuning.prepare`): the experts that the facts' answer positions select in the slots that
phase 2 trains, under the frozen router and its balance ("balanced"; "unbalanced" without
`mome.balance`; `pair_collisions_unbalanced` is the figure before the balance). With one MoME
layer and no phase 1 (the CPU config) these are the rows training writes; a later layer's inputs
move while an earlier one trains, so there they are the selection at the start of phase 2.

The run config is `lamini_jax.tune`'s for `--method mome` (configs/randomization_cpu.yaml's
`mome` section, its prompt fields), with `--config FILE` and `--set a.b=value` over it as
`lamini_jax.tune` takes them; `--experts` sets `mome.layer.num_experts` of each cell, whatever a
config file says. `--max-seconds S`: a cell still running when the benchmark's wall time passes
S finishes; the cells after it are skipped (and printed as skipped). `--resume` skips the cells
capacity.jsonl holds and continues a cell cut short through `tune`'s own resume; its settings
(seed, config) must be those of the run. At the end: a markdown table, a row per cell, and the
machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import yaml

from lamini_jax.data import facts as facts_lib
from lamini_jax.data import synthetic
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs
from lamini_jax import tune
from lamini_jax import yaml_config

ROWS_FILE = "capacity.jsonl"  # in the run directory: a row per finished cell
SETTINGS_FILE = "capacity.json"  # in the run directory: the seed and config every cell shares
EXPERTS_FIELD = "mome.layer.num_experts"  # set by --experts
LOG2_EXPERTS = (4, 32)  # the range --experts takes (log2 N: 16, not 65536)
CELL_FIELDS = ("run_dir", "data.facts_file", "data.n_train", EXPERTS_FIELD)  # differ between cells

# A cell's training: (its run config, its facts, resume) -> the row's figures.
CellFn = Callable[[runs.RunConfig, Sequence[facts_lib.Fact], bool], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Settings:
  """The benchmark's own choices; training settings are the run config's."""

  experts: tuple[int, ...] = (16, 18, 20)  # log2 N
  facts: tuple[int, ...] = (1000, 4000, 16000, 64000)
  seed: int = 0
  max_seconds: float | None = None
  model: str = "../shared/models/stories260K-hf"

  def __post_init__(self):
    low, high = LOG2_EXPERTS
    for flag, values, lo, hi, what in (
        ("--experts", self.experts, low, high, f"log2 of a number of experts in [{low}, {high}] (16 for "
         f"{2**16:,} experts)"),
        ("--facts", self.facts, 1, float("inf"), "a number of facts >= 1")):
      text = ",".join(map(str, values))
      if not values:
        raise ValueError(f"{flag} is empty: give comma-separated values, each {what}")
      bad = [v for v in values if not lo <= v <= hi]
      if bad:
        raise ValueError(f"{flag} {text}: {bad[0]} is not {what}")
      twice = [v for v in values if values.count(v) > 1]
      if twice:
        raise ValueError(f"{flag} {text}: {twice[0]} is given twice")
    if self.seed < 0:
      raise ValueError(f"--seed must be >= 0, got {self.seed}")
    if self.max_seconds is not None and not 0 < self.max_seconds < float("inf"):
      raise ValueError(f"--max-seconds must be a number of seconds > 0, got {self.max_seconds}")

  def cells(self) -> list[Cell]:
    """Every (N, F) in order of increasing cost: fewest facts first, then fewest experts."""
    return [Cell(n, f) for f in sorted(self.facts) for n in sorted(self.experts)]


@dataclasses.dataclass(frozen=True)
class Cell:
  log2_experts: int
  facts: int

  @property
  def experts(self) -> int:
    return 2**self.log2_experts

  @property
  def name(self) -> str:
    """Its run directory's name inside the benchmark's."""
    return f"cell-{self.log2_experts}-{self.facts}"

  @property
  def key(self) -> tuple[int, int]:
    return self.log2_experts, self.facts

  def row(self) -> dict[str, Any]:
    """The fields that name the cell in its row."""
    return {"cell": self.name, "log2_experts": self.log2_experts, "experts": self.experts,
            "facts": self.facts}


def parse_ints(flag: str, text: str) -> tuple[int, ...]:
  """`--flag 1,2,3` as ints; an item that is not one is an error that names flag and item."""
  out = []
  for item in text.split(","):
    try:
      out.append(int(item.strip()))
    except ValueError:
      raise ValueError(f"{flag} {text}: {item.strip()!r} is not an integer (give comma-separated "
                       "integers)") from None
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# The config of each cell.


def build_config(s: Settings, run_dir, config=None, overrides: Sequence[str] = ()
                 ) -> tuple[runs.RunConfig, frozenset[str]]:
  """(config, fields set): `tune.build_config` of a MoME run; each cell's is `cell_config` of it."""
  for item in overrides:
    if item.partition("=")[0].strip() == EXPERTS_FIELD:
      raise yaml_config.ConfigError(f"--set {EXPERTS_FIELD}: --experts sets it for each cell (log2 N)")
  run_dir = pathlib.Path(run_dir)
  return tune.build_config(s.model, run_dir / tune.FACTS_FILE, 1, "mome", run_dir, config, overrides)


def cell_config(base: runs.RunConfig, cell: Cell, run_dir) -> runs.RunConfig:
  """`base` for `cell`: its run directory, its N and its F facts (in the facts file `tune` writes)."""
  where = pathlib.Path(run_dir) / cell.name
  replace = dataclasses.replace
  return replace(base, run_dir=str(where),
                 data=replace(base.data, facts_file=str((where / tune.FACTS_FILE).resolve()),
                              n_train=cell.facts),
                 mome=replace(base.mome, layer=replace(base.mome.layer, num_experts=cell.experts)))


def settings_record(s: Settings, base: runs.RunConfig) -> dict[str, Any]:
  """What every cell shares and `--resume` must find unchanged: the seed and the config but
  `CELL_FIELDS`."""
  config = yaml.safe_load(yaml_config.dump(base))
  for field in CELL_FIELDS:
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    node.pop(leaf)
  return {"seed": s.seed, "config": config}


# ---------------------------------------------------------------------------------------------
# One cell.


def collision_figures(report: dict[str, Any], n_facts: int) -> dict[str, Any]:
  """The row's collision and row figures from a MoME run's collisions.json (`mome.tuning.prepare`):
  its "balanced" report (the selection phase 2 trains) when there is one, else "unbalanced"."""
  used = "balanced" if "balanced" in report else "unbalanced"
  layers = report[used]
  return {"collisions": used,
          "pair_collisions": sum(r["pair_collisions"] for r in layers.values()),
          "pair_collisions_unbalanced": sum(r["pair_collisions"] for r in report["unbalanced"].values()),
          "max_facts_per_expert": max(r["max_facts_per_expert"] for r in layers.values()),
          "rows_written_per_fact": sum(r["rows_written"] for r in layers.values()) / n_facts,
          "rows_per_fact": sum(r["rows_per_fact"] for r in layers.values()) / len(layers),
          "layers": layers}


def train_cell(cfg: runs.RunConfig, facts: Sequence[facts_lib.Fact], resume: bool, *,
               given: frozenset[str] = frozenset(), progress: bool = True) -> dict[str, Any]:
  """`tune.tune` of `facts` as `cfg` says; the row's figures from its result and collisions.json."""
  result = tune.tune(cfg, facts, given, resume=resume, progress=progress)
  store = runs.RunDir(result.run_dir).paths(result.label).store
  report = json.loads((store / mome_tuning.COLLISIONS_FILE).read_text())
  fix = result.repair or {"missed": [], "trainings": []}
  repair = fix["trainings"][0] if fix["trainings"] else {"epochs": 0, "seconds": 0.0}
  return {"recall": result.recall, "recalled": int(sum(result.exact)),
          "missed_before_repair": len(fix["missed"]), "repair_epochs": repair["epochs"],
          "repair_seconds": repair["seconds"],
          "epochs_to_full_recall": result.epochs_to_full_recall, "epochs": result.epochs,
          "max_epochs": result.config.mome.train.epochs, "train_seconds": result.train_seconds,
          "seconds": result.seconds, **collision_figures(report, len(facts))}


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ---------------------------------------------------------------------------------------------
# The cells in order, their rows.


def _leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested mapping's leaves by dotted name ({"a": {"b": 1}} -> {"a.b": 1})."""
  out = {}
  for key, value in values.items():
    out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value
               else {f"{prefix}{key}": value})
  return out


def start_rows(run_dir: pathlib.Path, record: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
  """Checks the run directory, writes the settings; returns the rows of the cells done (`resume`)."""
  settings, rows_path = run_dir / SETTINGS_FILE, run_dir / ROWS_FILE
  held = [p.name for p in (settings, rows_path) if p.exists()]
  held += sorted(p.name for p in run_dir.glob("cell-*")) if run_dir.is_dir() else []
  if held and not resume:
    raise yaml_config.ConfigError(f"{run_dir} holds a benchmark ({', '.join(held[:3])}): pass --resume "
                                  "to continue it, or choose another --run-dir")
  if settings.is_file():
    old, new = _leaves(json.loads(settings.read_text())), _leaves(record)
    diff = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted({*old, *new})
            if old.get(k) != new.get(k)]
    if diff:
      raise yaml_config.ConfigError(f"--resume: {settings} differs in {'; '.join(diff[:5])}; resume "
                                    "with the same --seed, --model, --config and --set, or choose "
                                    "another --run-dir")
  run_dir.mkdir(parents=True, exist_ok=True)
  settings.write_text(json.dumps(record, indent=2) + "\n")
  text = rows_path.read_text(encoding="utf-8") if rows_path.is_file() else ""
  rows = [json.loads(line) for line in text.split("\n")[:-1]]  # a line cut short has no newline
  rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return rows


def append_row(path: pathlib.Path, row: dict[str, Any]) -> None:
  """Appends `row` and syncs it to disk: a kill after this keeps it."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _line(row: dict[str, Any]) -> str:
  full = row["epochs_to_full_recall"]
  return (f"{row['cell']}: N=2^{row['log2_experts']}, {row['facts']} facts: recall {row['recall']:.4f}"
          + (f" (100% at epoch {full})" if full is not None else "")
          + f" after {row['epochs']}/{row['max_epochs']} epochs" + _repair(row)
          + f", {row['train_seconds']:.1f} s training, "
          f"{row['seconds']:.1f} s in all; {row['pair_collisions']} pair collisions (at most "
          f"{row['max_facts_per_expert']} facts on one expert), {row['rows_written_per_fact']:.1f} "
          f"rows written per fact; peak RSS {row['peak_rss_mib']:.0f} MiB")


def _repair(row: dict[str, Any]) -> str:
  """The repair of the facts missed when the epochs ran out (`tune`, `mome.repair_epochs`), if any."""
  if not row.get("missed_before_repair"):
    return ""
  return (f" + repair ({row['missed_before_repair']} missed, {row['repair_epochs']} epochs, "
          f"{row['repair_seconds']:.0f} s)")


def run(s: Settings, base: runs.RunConfig, run_dir, run_cell: CellFn, *, resume: bool = False,
        clock: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
  """Every cell of `s` in order (`Settings.cells`), each trained by `run_cell` unless done
  (`resume`) or past `s.max_seconds`; returns a row per cell (a skipped one: {"skipped": True})."""
  t0, run_dir = clock(), pathlib.Path(run_dir)
  configs = {c.key: cell_config(base, c, run_dir) for c in s.cells()}  # all checked before any runs
  rows = start_rows(run_dir, settings_record(s, base), resume)
  done = {(r["log2_experts"], r["facts"]): r for r in rows}
  out = []
  for cell in s.cells():
    if cell.key in done:
      print(f"{cell.name}: done in an earlier run ({run_dir / ROWS_FILE})", flush=True)
      out.append(done[cell.key])
      continue
    elapsed = clock() - t0
    if s.max_seconds is not None and elapsed >= s.max_seconds:
      print(f"{cell.name}: skipped, --max-seconds {s.max_seconds:g} passed ({elapsed:.0f} s so far)",
            flush=True)
      out.append({**cell.row(), "skipped": True})
      continue
    facts = [f.fact for f in synthetic.synthetic_facts(cell.facts, s.seed)]
    figures = run_cell(configs[cell.key], facts, resume)
    row = {**cell.row(), "seed": s.seed, **figures, "peak_rss_mib": peak_rss_mib()}
    append_row(run_dir / ROWS_FILE, row)
    print(_line(row), flush=True)
    out.append(row)
  return out


COLUMNS = ("N", "facts", "exact recall", "epochs to 100%", "epochs", "repair", "train s", "total s",
           "pair collisions", "most facts on one expert", "rows written / fact",
           "rows / fact / layer", "peak RSS MiB")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """A row per cell; a skipped cell's figures are "skipped"."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
  for r in rows:
    head = [f"2^{r['log2_experts']}", str(r["facts"])]
    if r.get("skipped"):
      cells = ["skipped (--max-seconds)"] + ["-"] * (len(COLUMNS) - 3)
    else:
      full = r["epochs_to_full_recall"]
      cells = [f"{r['recall']:.4f}", "-" if full is None else str(full),
               f"{r['epochs']}/{r['max_epochs']}", _repair(r)[len(" + repair ("):-1] or "-",
               f"{r['train_seconds']:.0f}", f"{r['seconds']:.0f}", str(r["pair_collisions"]),
               str(r["max_facts_per_expert"]), f"{r['rows_written_per_fact']:.1f}",
               f"{r['rows_per_fact']:.1f}", f"{r['peak_rss_mib']:.0f}"]
    lines.append("| " + " | ".join(head + cells) + " |")
  return "\n".join(lines)


def machine() -> str:
  return (f"machine: {platform.platform()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"({jax.default_backend()}); {datetime.date.today()}")


def main(argv: Sequence[str] | None = None) -> int:
  defaults = Settings()
  parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--experts", default=",".join(map(str, defaults.experts)),
                      help="log2 of the experts per MoME layer, comma-separated")
  parser.add_argument("--facts", default=",".join(map(str, defaults.facts)),
                      help="how many synthetic facts each cell memorizes, comma-separated")
  parser.add_argument("--seed", type=int, default=defaults.seed, help="draws the synthetic facts")
  parser.add_argument("--max-seconds", type=float, help="start no cell after this much wall time")
  parser.add_argument("--model", default=defaults.model, help="the frozen backbone")
  parser.add_argument("--run-dir", type=pathlib.Path, default=pathlib.Path("runs/capacity"))
  parser.add_argument("--config", type=pathlib.Path, help="YAML sections over lamini_jax.tune's")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--resume", action="store_true", help="continue a killed benchmark in --run-dir")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    s = Settings(parse_ints("--experts", args.experts), parse_ints("--facts", args.facts), args.seed,
                 args.max_seconds, args.model)
    base, given = build_config(s, args.run_dir, args.config, args.set)
    cell = functools.partial(train_cell, given=given, progress=not args.no_progress)
    rows = run(s, base, args.run_dir, cell, resume=args.resume)
  except (yaml_config.ConfigError, FileNotFoundError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(markdown_table(rows))
  print(machine())
  return 0


if __name__ == "__main__":
  sys.exit(main())
