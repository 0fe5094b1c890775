"""Run reports: loss-curve figures, Table 1, the summary table and report.md."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

MODEL_COLUMNS = ("perplexity", "mc1", "mc2", "answer_loss", "answer_loss_head", "answer_loss_tail",
                 "mmlu_acc")


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


def summary_table(summary: dict[str, Any]) -> str:
  """Held-out metrics and memorization figures, one column per model."""
  models = list(summary["models"])
  rows = [("held-out " + k, k) for k in MODEL_COLUMNS] + [
      ("trained facts: recall", "recall"), ("trained facts: loss", "fact_loss"),
      ("epochs trained", "epochs"), ("epochs to 100% recall", "epochs_to_full_recall"),
      ("train seconds", "train_seconds"),
      ("tuning seconds (all)", "tuning_seconds")]
  width = max(len(r[0]) for r in rows)
  lines = [f"{'':<{width}}  " + "  ".join(f"{m:>14}" for m in models)]
  for title, key in rows:
    values = [summary["models"][m].get(key) for m in models]
    if all(v is None for v in values):
      continue
    lines.append(f"{title:<{width}}  " + "  ".join(f"{_fmt(v):>14}" for v in values))
  return "\n".join(lines)


def report_markdown(summary: dict[str, Any], config_yaml: str) -> str:
  s = summary
  parts = [
      "# Randomization test\n",
      f"Backbone `{s['backbone']}`; {s['n_facts']} trained {s['dataset']} facts, "
      f"{s['n_heldout']} held-out TruthfulQA questions, {s['mmlu_scored']} MMLU questions "
      f"({s['mmlu_k']}-shot), perplexity on {s['ppl_windows']} windows of `{s['corpus']}`. "
      f"Machine: {s['machine']}. Wall time of the whole run: {s['wall_seconds']:.0f} s.\n",
      "## Summary\n", "```", summary_table(s), "```\n",
      "Held-out metrics are computed on questions no model was trained on; 'recall' is exact-match "
      "greedy recall of the trained answers (the hallucination rate is 1 - recall). 'train "
      "seconds' add up the training epochs (compilation included); 'tuning seconds (all)' is the "
      "whole memory tuning of a model: set-up (MoME: routing, balance, anchors), training and "
      "the recall checks.\n",
      "![loss curves](loss_curves.png)\n",
      "See `table1.md` for answers to held-out and trained questions, `metrics.jsonl` for every "
      "epoch and `summary.json` for all figures.\n",
      "## Config\n", "```yaml", config_yaml.rstrip(), "```\n",
  ]
  return "\n".join(parts)
