"""Seconds per training epoch of lamini-jax's LoRA against Hugging Face PEFT's, on one machine.

The work is the default run's (configs/randomization_cpu.yaml): the shared pretrained
stories260K, its 256 TruthfulQA questions with random 32-character answers
(`runs.facts_and_heldout`), encoded once (`encoding.encode_facts`) and trained on the
answer tokens only, LoRA of the config's rank and alpha (32, 32) on q, k, v, o, gate,
up and down, Adafactor at the config's learning rate (3e-3).

- lamini-jax: `lora_tuning.tune_lora` with the config's `train:` section (batch 32,
  length-bucketed batches), through `train.fit` as the experiment trains.
- PEFT: `transformers`' LlamaForCausalLM (float32, torch eager, `--attn` attention) with
  `peft.get_peft_model`, `transformers.optimization.Adafactor(lr, scale_parameter=False,
  relative_step=False, warmup_init=False)`, `--peft-batch` rows (16), each batch padded to
  its longest fact, the facts shuffled each epoch.

Both run in one process, one after the other (ours, then PEFT's: epochs alternating made
each framework's idle worker threads steal the other's cores). An epoch's time is its wall
time; from ours, the seconds jax spent compiling during it are subtracted and reported apart
(the step compiles once per batch width, most in the first epochs). Each side's figure is
the median over its epochs after the first; CPU seconds (user + system, the whole process)
are printed beside. The last line holds both and their ratio. On a shared machine, run it
twice: torch's threads slow down many times over when other processes take their cores.

  python -m benchmarks.lora_vs_peft [--epochs 5] [--facts 256] [--peft-batch 16]
      [--config configs/randomization_cpu.yaml] [--attn sdpa]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import peft
import torch
import transformers

from lamini_jax.data import encoding
from lamini_jax import lora_tuning
from lamini_jax import runs

DEFAULT_CONFIG = "configs/randomization_cpu.yaml"
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
             "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class Clock:
  """Wall and CPU seconds since the last `lap`, and jax's compile seconds in between."""

  compile_seconds: float = 0.0

  def __post_init__(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    self.lap()

  def _on_event(self, event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
      self.compile_seconds += seconds

  def lap(self) -> tuple[float, float, float]:
    now, cpu, compiled = time.perf_counter(), _cpu_seconds(), self.compile_seconds
    out = (now - getattr(self, "_t", now), cpu - getattr(self, "_cpu", cpu),
           compiled - getattr(self, "_compiled", compiled))
    self._t, self._cpu, self._compiled = now, cpu, compiled
    return out


def peft_batches(encoded: Sequence[encoding.EncodedFact], batch_size: int, pad_id: int,
                 epoch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
  """One epoch of `transformers` batches: the facts shuffled, each batch padded to its longest.

  `labels` hold the answer tokens and -100 elsewhere, so the model's loss is the mean
  next-token loss over the answer tokens of the batch, like `train.token_nll`.
  """
  order = np.random.default_rng([seed, epoch]).permutation(len(encoded))
  out = []
  for start in range(0, len(order), batch_size):
    rows = [encoded[i] for i in order[start:start + batch_size]]
    width = max(len(e.tokens) for e in rows)
    tokens = np.full((len(rows), width), pad_id, np.int64)
    labels = np.full((len(rows), width), -100, np.int64)
    attention = np.zeros((len(rows), width), np.int64)
    for r, e in enumerate(rows):
      tokens[r, :len(e.tokens)] = e.tokens
      labels[r, :len(e.tokens)] = np.where(e.loss_mask, e.tokens, -100)
      attention[r, :len(e.tokens)] = 1
    out.append({"input_ids": torch.from_numpy(tokens), "attention_mask": torch.from_numpy(attention),
                "labels": torch.from_numpy(labels)})
  return out


def peft_model(model_dir, cfg: runs.RunConfig, attn: str) -> tuple[Any, torch.optim.Optimizer]:
  """The PEFT LoRA model of the config's rank, alpha and targets, and its Adafactor."""
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                           attn_implementation=attn)
  lora = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, bias="none",
                         target_modules=[_HF_NAMES[t] for t in cfg.lora.targets], task_type="CAUSAL_LM")
  model = peft.get_peft_model(base, lora)
  model.train()
  optimizer = transformers.optimization.Adafactor(
      [p for p in model.parameters() if p.requires_grad], lr=cfg.train.optimizer.learning_rate,
      scale_parameter=False, relative_step=False, warmup_init=False)
  return model, optimizer


def peft_epoch(model, optimizer, batches: Sequence[dict[str, torch.Tensor]]) -> float:
  """Trains one epoch; returns the mean batch loss."""
  losses = []
  for batch in batches:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
  return float(np.mean(losses))


def run(cfg: runs.RunConfig, epochs: int, n_facts: int, peft_batch: int, attn: str) -> dict[str, Any]:
  """Both trainings, ours first; per-epoch (wall, cpu, compile) seconds and losses."""
  backbone = runs.load_backbone(cfg.model)
  template = runs.prompt_template(cfg.data)
  facts = runs.facts_and_heldout(cfg.data, "random")[0][:n_facts]
  encoded = encoding.encode_facts(backbone.tokenizer, template, facts, cfg.data.max_len)
  pad_id = backbone.tokenizer.pad_token_id or 0
  ours, theirs = [], []
  clock = Clock()

  def on_epoch(epoch: int, state, fact_loss: np.ndarray) -> dict[str, Any]:
    del epoch, state
    wall, cpu, compiled = clock.lap()
    ours.append({"wall": wall, "cpu": cpu, "compile": compiled, "loss": float(np.mean(fact_loss))})
    return {}

  train_cfg = dataclasses.replace(cfg.train, epochs=epochs, stop_loss=None)
  lora_tuning.tune_lora(backbone.cfg, backbone.params, encoded, cfg.lora, train_cfg, pad_id=pad_id,
                        progress=False, on_epoch=on_epoch)
  model, optimizer = peft_model(backbone.model_dir, cfg, attn)
  for epoch in range(epochs):
    batches = peft_batches(encoded, peft_batch, pad_id, epoch, cfg.train.seed)
    clock.lap()
    loss = peft_epoch(model, optimizer, batches)
    wall, cpu, _ = clock.lap()
    theirs.append({"wall": wall, "cpu": cpu, "loss": loss})
  return {"ours": ours, "peft": theirs, "facts": len(encoded)}


def steady(records: list[dict[str, float]], key: str, minus: str | None = None) -> float:
  """Median of `key` (less `minus`) over the epochs after the first."""
  values = [r[key] - (r[minus] if minus else 0.0) for r in records[1:] or records]
  return statistics.median(values)


def report(result: dict[str, Any], cfg: runs.RunConfig, peft_batch: int, attn: str) -> str:
  ours, theirs = result["ours"], result["peft"]
  lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax "
           f"{jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
           f"({torch.get_num_threads()} threads), peft {peft.__version__}",
           f"{result['facts']} facts; lamini-jax batch {cfg.train.batch_size} (length-bucketed), "
           f"PEFT batch {peft_batch} ({attn} attention)",
           f"{'epoch':>5} {'ours s':>8} {'compile s':>9} {'cpu s':>7} {'loss':>8}   "
           f"{'PEFT s':>8} {'cpu s':>7} {'loss':>8}"]
  for e, (a, b) in enumerate(zip(ours, theirs)):
    lines.append(f"{e:>5} {a['wall']:>8.2f} {a['compile']:>9.2f} {a['cpu']:>7.2f} {a['loss']:>8.4f}   "
                 f"{b['wall']:>8.2f} {b['cpu']:>7.2f} {b['loss']:>8.4f}")
  ours_s, peft_s = steady(ours, "wall", "compile"), steady(theirs, "wall")
  lines.append(f"steady state (median of epochs 1..{len(ours) - 1}): ours {ours_s:.2f} s/epoch wall, "
               f"{steady(ours, 'cpu'):.2f} s CPU; PEFT {peft_s:.2f} s wall, {steady(theirs, 'cpu'):.2f}"
               f" s CPU; jax compiled {sum(a['compile'] for a in ours):.1f} s in all")
  lines.append(f"lora-jax {ours_s:.2f} s/epoch, peft {peft_s:.2f} s/epoch, ratio {ours_s / peft_s:.2f}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_vs_peft",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config (default {DEFAULT_CONFIG})")
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--facts", type=int, default=256, help="the first N facts of the config's")
  parser.add_argument("--peft-batch", type=int, default=16)
  parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                      help="transformers' attention implementation for PEFT")
  args = parser.parse_args(argv)
  if args.epochs < 2 or args.facts < 1 or args.peft_batch < 1:
    parser.error("--epochs must be >= 2 (the first is left out), --facts and --peft-batch >= 1")
  cfg = runs.load_run_config(args.config)
  result = run(cfg, args.epochs, args.facts, args.peft_batch, args.attn)
  print(report(result, cfg, args.peft_batch, args.attn))
  return 0


if __name__ == "__main__":
  sys.exit(main())
