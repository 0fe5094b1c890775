"""Run reports: loss-curve figures, Table 1, the summary table, report.md, and the mean and
standard error of every figure over seeds (`aggregate_seeds`, `seeds_markdown`,
`plot_seed_differences`)."""

from __future__ import annotations

import math
import pathlib
from typing import Any, Sequence

from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
import numpy as np

# Held-out figures of one split (evaluate.heldout_metrics, locality.locality_metrics).
MODEL_COLUMNS = ("perplexity", "perplexity_ood", "mc1", "mc2", "answer_loss", "answer_loss_head",
                 "answer_loss_tail", "mmlu_acc", "locality_exact", "locality_tokens", "locality_first",
                 "locality_text_exact", "locality_text_tokens", "locality_text_first")
MEMORY_ROWS = (("trained facts: recall", "recall"), ("trained facts: loss", "fact_loss"),
               ("epochs trained", "epochs"), ("epochs to 100% recall", "epochs_to_full_recall"),
               ("train seconds", "train_seconds"), ("tuning seconds (all)", "tuning_seconds"))
# Where a held-out figure's data is described in summary["sources"].
SOURCE_OF = {"perplexity": "perplexity", "perplexity_ood": "perplexity_ood", "mmlu_acc": "mmlu"}


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: pathlib.Path,
                     title: str) -> None:
  """Loss per epoch, one line per run label (Figure 1 / Figure 5 of the paper)."""
  methods = sorted({label.split("-")[0] for label in histories})
  fig = Figure(figsize=(6 * len(methods), 4))
  axes = fig.subplots(1, len(methods), squeeze=False)
  for ax, method in zip(axes[0], methods):
    for label, history in sorted(histories.items()):
      if not label.startswith(method + "-") or not history:
        continue
      epochs = [r["epoch"] + 1 for r in history]
      ax.plot(epochs, [r["loss"] for r in history], label=f"{label.split('-', 1)[1]} answers")
      ax.plot(epochs, [r["max_fact_loss"] for r in history], linestyle=":", alpha=0.7,
              label=f"{label.split('-', 1)[1]} answers, worst fact")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean NLL of answer tokens)")
    ax.set_title(f"{method.upper()}: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def table1(rows: Sequence[dict[str, str]], models: Sequence[str]) -> str:
  """Table 1: question, each model's answer, the gold and random answers, whether trained."""
  head = ["Question", *[f"{m} model" for m in models], "Gold answer", "Random answer trained",
          "Trained on it?"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row["question"], *[row[m] for m in models], row["gold"], row["random"], row["trained"]]
    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
  return str(value)


def _rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
  split = summary.get("split", "held-out")
  return [(f"{split} {k}", k) for k in MODEL_COLUMNS] + list(MEMORY_ROWS)


def summary_table(summary: dict[str, Any]) -> str:
  """Held-out metrics of the run's split and memorization figures, one column per model."""
  models = list(summary["models"])
  rows = _rows(summary)
  width = max(len(r[0]) for r in rows)
  lines = [f"{'':<{width}}  " + "  ".join(f"{m:>14}" for m in models)]
  for title, key in rows:
    values = [summary["models"][m].get(key) for m in models]
    if all(v is None for v in values):
      continue
    lines.append(f"{title:<{width}}  " + "  ".join(f"{_fmt(v):>14}" for v in values))
  return "\n".join(lines)


def sources_markdown(summary: dict[str, Any]) -> str:
  """Which split every held-out figure comes from, and its data."""
  split = summary.get("split", "?")
  lines = [f"Every held-out figure is from the **{split}** split"
           + (" (for choosing settings; final tables use test)." if split == "dev" else
              " (final tables only: no setting may be chosen on it).")]
  for key, text in summary.get("sources", {}).items():
    lines.append(f"- `{key}`: {text}")
  return "\n".join(lines) + "\n"


def report_markdown(summary: dict[str, Any], config_yaml: str) -> str:
  s = summary
  parts = [
      "# Randomization test\n",
      f"Backbone `{s['backbone']}`; {s['n_facts']} trained {s['dataset']} facts, "
      f"{s['n_heldout']} held-out TruthfulQA questions, {s['mmlu_scored']} MMLU questions "
      f"({s['mmlu_k']}-shot), perplexity on {s['ppl_windows']} windows per corpus. "
      f"Machine: {s['machine']}. Wall time of the whole run: {s['wall_seconds']:.0f} s.\n",
      "## Data\n", sources_markdown(s),
      "## Summary\n", "```", summary_table(s), "```\n",
      "Held-out metrics are computed on questions no model was trained on; 'recall' is exact-match "
      "greedy recall of the trained answers (the hallucination rate is 1 - recall). 'locality_*' "
      "compare each model's greedy answers (`locality.py`) with the base model's on the held-out "
      "questions ('locality_text_*': on unrelated sentence starts): 'exact' is the share of "
      "answers identical to the base model's, 'tokens' the share of answer tokens that agree "
      "position by position, 'first' the share of first tokens that agree. 'train "
      "seconds' add up the training epochs (compilation included); 'tuning seconds (all)' is the "
      "whole memory tuning of a model: set-up (MoME: routing, balance, anchors), training and "
      "the recall checks.\n",
      "![loss curves](loss_curves.png)\n",
      "See `table1.md` for answers to held-out and trained questions, `metrics.jsonl` for every "
      "epoch and `summary.json` for all figures.\n",
      "## Config\n", "```yaml", config_yaml.rstrip(), "```\n",
  ]
  return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Several seeds.


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error of the mean (sample standard deviation / sqrt(n)), in float64.

  The standard error of fewer than two values is nan.
  """
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or not x.size:
    raise ValueError(f"mean_se: expected a non-empty list of numbers, got {values!r}")
  se = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
  return float(np.mean(x)), se


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate_seeds(per_seed: Sequence[dict[str, dict[str, Any]]],
                    base: str = "base") -> dict[str, dict[str, dict[str, Any]]]:
  """Every figure of every model as mean and standard error over seeds, with its paired
  difference from the `base` model (the difference seed by seed, then its mean and SE).

  `per_seed`: one `summary["models"]` per seed, each with the same models. Returns
  {model: {figure: {"values", "mean", "se", and where `base` has the figure too,
  "diff_mean", "diff_se"}}}. A figure is aggregated where every seed gives a finite number;
  otherwise mean and SE are None (e.g. epochs to 100% recall when a seed never got there).
  """
  if not per_seed:
    raise ValueError("aggregate_seeds: no seeds")
  labels = list(per_seed[0])
  for k, models in enumerate(per_seed):
    if list(models) != labels:
      raise ValueError(f"aggregate_seeds: seed {k} has models {list(models)}, seed 0 {labels}")
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for label in labels:
    keys = [k for k in per_seed[0][label] if all(k in s[label] for s in per_seed)]
    figures = {}
    for key in keys:
      values = [s[label][key] for s in per_seed]
      if not all(_number(v) or v is None for v in values):
        continue  # e.g. MoME's collision tables
      entry: dict[str, Any] = {"values": values, "mean": None, "se": None}
      if all(_number(v) for v in values):
        entry["mean"], entry["se"] = mean_se(values)
        base_values = [s[base].get(key) for s in per_seed] if base in per_seed[0] else []
        if label != base and base_values and all(_number(v) for v in base_values):
          entry["diff_mean"], entry["diff_se"] = mean_se(np.subtract(values, base_values, dtype=np.float64))
      figures[key] = entry
    out[label] = figures
  return out


def _pm(mean: float | None, se: float | None) -> str:
  if mean is None:
    return "-"
  return _fmt(mean) if se is None or math.isnan(se) else f"{_fmt(mean)} ± {_fmt(se)}"


def seeds_table(aggregate: dict[str, dict[str, dict[str, Any]]], split: str,
                diff: bool = False) -> str:
  """Markdown: one row per figure, one column per model, mean ± SE over seeds (diff: the
  paired difference from the base model)."""
  models = [m for m in aggregate if not diff or m != "base"]
  lines = ["| | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
  for title, key in _rows({"split": split}):
    cells = []
    for m in models:
      e = aggregate[m].get(key)
      cells.append("-" if e is None else _pm(e.get("diff_mean"), e.get("diff_se")) if diff
                   else _pm(e["mean"], e["se"]))
    if any(c != "-" for c in cells):
      lines.append(f"| {title} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_seed_differences(aggregate: dict[str, dict[str, dict[str, Any]]], split: str,
                          path: pathlib.Path | None = None) -> Figure:
  """One panel per held-out figure: each model's paired difference from the base model, mean
  and a bar of 2 SE either side, over seeds; a line at zero (no change).

  Perplexities are drawn on a symmetric log axis (LoRA's can move by 10^4 where MoME's moves by
  units). A model without a finite difference for a figure (e.g. one seed) has no marker there.
  Saved to `path` when given; the figure is returned either way.
  """
  models = [m for m in aggregate if m != "base"]
  keys = [k for k in MODEL_COLUMNS
          if any(aggregate[m].get(k, {}).get("diff_mean") is not None for m in models)]
  if not keys:
    raise ValueError("plot_seed_differences: no figure has a paired difference from the base model")
  cols = min(4, len(keys))
  rows = -(-len(keys) // cols)
  fig = Figure(figsize=(4.2 * cols, 0.35 * len(models) * rows + 1.2 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  y = np.arange(len(models))[::-1]
  for i, (ax, key) in enumerate(zip(axes, keys)):
    entries = [aggregate[m].get(key, {}) for m in models]
    means = np.array([np.nan if e.get("diff_mean") is None else e["diff_mean"] for e in entries])
    ses = np.array([np.nan if e.get("diff_se") is None else e["diff_se"] for e in entries])
    ax.errorbar(means, y, xerr=2 * np.nan_to_num(ses), fmt="o", capsize=3)
    ax.axvline(0.0, color="0.4", linewidth=0.8)
    ax.margins(x=0.08)
    if key.startswith("perplexity"):
      ax.set_xscale("symlog", linthresh=10.0)
    ax.set_yticks(y, models if i % cols == 0 else [""] * len(models))
    ax.set_title(f"{split} {key}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  fig.suptitle(f"difference from the base model ({split} split), mean ± 2 SE over seeds")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig


def seeds_markdown(summary: dict[str, Any]) -> str:
  """report.md of a run over several seeds (`summary`: `experiments.randomization.run_seeds`)."""
  s = summary
  seeds = ", ".join(str(x) for x in s["seeds"])
  return "\n".join([
      "# Randomization test over seeds\n",
      f"Seeds {seeds} (each seed draws the trained questions, the random answers and every "
      "initialisation; the held-out questions and texts are the same for every seed). Every "
      f"figure is the mean ± standard error over the {len(s['seeds'])} seeds (sample standard "
      "deviation / sqrt(n)). Each seed's run is in its own directory: "
      + ", ".join(f"[{d}]({d}/report.md)" for d in s["runs"]) + ".\n",
      "## Data\n", sources_markdown(s),
      "## Mean ± SE over seeds\n", seeds_table(s["models"], s["split"]),
      "## Paired difference from the base model\n",
      "Each model's figure minus the base model's, seed by seed; mean ± SE of those differences "
      "(drawn with 2 SE bars in [differences.png](differences.png)).\n",
      seeds_table(s["models"], s["split"], diff=True),
      "![paired differences from the base model](differences.png)\n",
  ])
