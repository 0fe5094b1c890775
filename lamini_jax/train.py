"""The host loop of memory tuning, around a pure train step, and what every step shares.

A step is one pure function `(state, frozen, tokens, mask) -> (state, metrics)`,
jitted once with the state donated (LoRA's in `lora_tuning`, MoME's in
`mome.steps`); the frozen backbone is an argument that is never differentiated
and never updated. The host loop dispatches step t before it
reads the metrics of step t-1, keeps each fact's loss of the current epoch, writes
one JSON line per epoch, checkpoints every N steps and resumes exactly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from lamini_jax.checkpoint import Checkpointer
from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding


DECAY_FLOOR = 0.1  # OptimizerConfig.decay_steps: the learning rate ends at 10%

# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def reuse_freed_host_memory() -> bool:
  """Has glibc's malloc keep the memory a step frees for the next step; returns whether it did.

  XLA on CPU allocates all temporaries of a run as one block (a LoRA step of the CPU config:
  283 MB at 96 tokens wide, 838 MB at 192) and frees it when the run ends. glibc serves
  a block that large with a fresh `mmap` (from a worker thread's arena it always does) and
  unmaps it on free, so every step faulted all of it in again, page by page: 30% of the
  default run's CPU time was the kernel's (docs/speed.md). With one arena, no `mmap` and
  no trimming, a freed block stays in the heap and the next step reuses it; the price is
  that the process keeps its peak memory until it exits.

  Takes effect only before the first jax computation (it also turns off jax's
  asynchronous dispatch on CPU, so that each block is allocated by the calling thread,
  whose arena this configures): this module calls it when imported. Does nothing where the C library is
  not glibc, or where one of glibc's malloc environment variables is set (the user chose).
  """
  if any(name in os.environ for name in _MALLOC_ENV):
    return False
  if not hasattr(os, "confstr") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
    return False
  mallopt = ctypes.CDLL(None).mallopt
  applied = all(mallopt(param, value) == 1 for param, value in
                ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  # A thread that allocated before this call (numpy's BLAS thread) keeps its own arena, and
  # XLA's worker threads may share it: run CPU computations on the calling (main) thread,
  # whose arena is the one configured here. The user's own choice of the flag stands.
  if applied and "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  return applied


_HOST_MEMORY_KEPT = reuse_freed_host_memory()


def release_freed_host_memory() -> bool:
  """Returns the heap's free pages to the system (glibc `malloc_trim(0)`); whether it ran.

  For work whose blocks change size from one call to the next, where a kept block is not
  reused but fragments the heap: a MoME edit makes several copies of a table (512 MB at
  2^20 experts) of which none outlives it, and without this each edit left about one
  table's worth of free but kept memory behind (a 10-forget, 10-update edit phase reached
  24 GB; docs/sequential.md). Does nothing where `reuse_freed_host_memory` did not apply.
  """
  if not _HOST_MEMORY_KEPT:
    return False
  ctypes.CDLL(None).malloc_trim(0)
  return True


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optax Adafactor (the paper's optimizer) or Adam; learning-rate warm-up and decay optional.

  `multiply_by_parameter_scale` is Adafactor's relative step size: updates are scaled
  by each parameter's RMS (at least `1e-3`). LoRA's B starts at zero, so with it on,
  B's first updates are 1000x smaller than the learning rate.
  `warmup_steps`: linear warm-up from 0. `decay_steps` (0: constant): cosine decay
  from the learning rate to DECAY_FLOOR of it over that many steps after the
  warm-up, then constant. Steps are the optimizer's own count: a LoRA run's
  steps; for MoME's per-expert optimizer, each expert's own updates.
  """

  name: str = "adafactor"
  learning_rate: float = 2e-4
  multiply_by_parameter_scale: bool = True
  clipping_threshold: float | None = 1.0
  decay_rate: float = 0.8
  warmup_steps: int = 0
  decay_steps: int = 0

  def __post_init__(self):
    if self.name not in ("adafactor", "adam"):
      raise ValueError(f"optimizer.name must be 'adafactor' or 'adam', got {self.name!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")
    for name in ("warmup_steps", "decay_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"optimizer.{name} must be >= 0, got {getattr(self, name)}")

  def build(self) -> optax.GradientTransformation:
    lr: Any = self.learning_rate
    if self.decay_steps:
      lr = optax.cosine_decay_schedule(self.learning_rate, self.decay_steps, alpha=DECAY_FLOOR)
    if self.warmup_steps:
      lr = optax.join_schedules(
          [optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps),
           lr if self.decay_steps else optax.constant_schedule(self.learning_rate)],
          [self.warmup_steps])
    if self.name == "adam":
      return optax.adam(lr)
    return optax.adafactor(lr, multiply_by_parameter_scale=self.multiply_by_parameter_scale,
                           clipping_threshold=self.clipping_threshold, decay_rate=self.decay_rate)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long and how to train. `stop_loss`: stop once every fact's loss is below it."""

  epochs: int = 100
  batch_size: int = 32
  seq_len: int = 128
  seed: int = 0
  stop_loss: float | None = None
  checkpoint_every: int = 0
  length_bucket: int | None = 32  # batch width: longest fact rounded up to this (None: seq_len)
  optimizer: OptimizerConfig = OptimizerConfig()

  def __post_init__(self):
    for name in ("epochs", "batch_size", "seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
    if self.stop_loss is not None and self.stop_loss <= 0:
      raise ValueError(f"train.stop_loss must be positive or null, got {self.stop_loss}")
    if self.checkpoint_every < 0:
      raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
    if self.length_bucket is not None and self.length_bucket <= 0:
      raise ValueError(f"train.length_bucket must be positive or null, got {self.length_bucket}")


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """Where one training run writes, as laid out by `lamini_jax.runs.RunDir.paths(label)`.

  `checkpoints`: its Orbax checkpoints; `metrics`: the JSONL file it appends one
  line per epoch to; `store`: what a method keeps beside its train state (MoME:
  the frozen router and the collision report; MoME's phase 1: its result).
  """

  checkpoints: pathlib.Path
  metrics: pathlib.Path
  store: pathlib.Path


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays


def token_nll(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, mask_BxT: jax.Array):
  """Next-token NLL: (mean over masked targets, per-row sum, per-row count).

  `mask_BxT[t]` marks token t as a target, predicted from position t-1.
  """
  logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  mask = mask_BxT[:, 1:].astype(jnp.float32)
  row_sum_B = jnp.sum(nll_BxT * mask, axis=1)
  row_count_B = jnp.sum(mask, axis=1)
  return jnp.sum(row_sum_B) / jnp.maximum(jnp.sum(row_count_B), 1.0), row_sum_B, row_count_B


@dataclasses.dataclass
class FitResult:
  state: TrainState
  history: list[dict[str, Any]]  # one record per epoch
  fact_loss: np.ndarray  # last epoch's loss of every fact
  seconds: float  # training time of this process (excludes time before a resume)


class _Epoch:
  """Per-fact losses of one epoch, filled from step metrics."""

  def __init__(self, n: int):
    self.total = np.zeros(n)
    self.count = np.zeros(n)

  def add(self, fact_index_B: np.ndarray, valid_B: np.ndarray, metrics: dict[str, Any]) -> None:
    row_sum, row_count = np.asarray(metrics["row_sum"]), np.asarray(metrics["row_count"])
    idx = fact_index_B[valid_B]
    np.add.at(self.total, idx, row_sum[valid_B])
    np.add.at(self.count, idx, row_count[valid_B])

  def fact_loss(self) -> np.ndarray:
    return self.total / np.maximum(self.count, 1)


def fit(step_fn: Callable, state: TrainState, frozen: Any, encoded: Sequence[encoding.EncodedFact],
        cfg: TrainConfig, *, pad_id: int, label: str = "train",
        paths: RunPaths | None = None, resume: bool = False, progress: bool = True,
        stop_after_steps: int | None = None,
        on_epoch: Callable[[int, TrainState, np.ndarray], dict[str, Any]] | None = None,
        batch_extras: Callable[[batch_lib.Batch], tuple] | None = None) -> FitResult:
  """Trains for `cfg.epochs` (or until every fact's loss < `cfg.stop_loss`).

  With `paths`, appends one line per epoch (tagged with `label`) to `paths.metrics`
  and checkpoints into `paths.checkpoints`; `resume=True` restarts from the newest
  checkpoint there, with the same batches and the same results as
  an uninterrupted run. `stop_after_steps` ends the loop early (tests, debugging).
  `on_epoch(epoch, state, fact_loss)` may add metrics to the epoch's record; a
  true `"stop"` among them ends training after that epoch. `batch_extras(batch)`:
  more step arguments after tokens and mask (MoME: the batch's cached routes).
  """
  n = len(encoded)
  n_batches = batch_lib.num_batches(n, cfg.batch_size)
  ckpt = None
  start_epoch, start_batch, epoch_acc, history = 0, 0, _Epoch(n), []
  metrics_path = None
  if paths is not None:
    paths.metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics_path = paths.metrics
    ckpt = Checkpointer(paths.checkpoints, cfg.checkpoint_every)
    if resume:
      restored = ckpt.restore(state)
      if restored is not None:
        state, pos = restored
        start_epoch, start_batch = pos["epoch"], pos["batch"]
        epoch_acc.total, epoch_acc.count = np.asarray(pos["total"]), np.asarray(pos["count"])
        history = pos["history"]
    if metrics_path.exists():  # drop this label's records past the restored position
      kept = [line for line in metrics_path.read_text().splitlines()
              if json.loads(line).get("run") != label or json.loads(line)["epoch"] < start_epoch]
      metrics_path.write_text("".join(f"{line}\n" for line in kept))
  bar = None
  if progress:
    bar = tqdm.tqdm(total=cfg.epochs * n_batches, initial=start_epoch * n_batches + start_batch,
                    desc=label, unit="step", dynamic_ncols=True)
  t0 = time.perf_counter()
  steps_done = 0
  first_step = int(state.step)
  fact_loss = epoch_acc.fact_loss()
  for epoch in range(start_epoch, cfg.epochs):
    t_epoch = time.perf_counter()
    pending = None
    for b, batch in enumerate(batch_lib.epoch_batches(encoded, cfg.batch_size, cfg.seq_len, pad_id,
                                                      cfg.seed, epoch, cfg.length_bucket)):
      if epoch == start_epoch and b < start_batch:
        continue
      extras = () if batch_extras is None else batch_extras(batch)
      # One plain transfer; jnp.asarray of a numpy array dispatches a compiled copy per shape.
      tokens_BxT, mask_BxT = jax.device_put((batch.tokens_BxT, batch.loss_mask_BxT))
      state, metrics = step_fn(state, frozen, tokens_BxT, mask_BxT, *extras)
      if pending is not None:
        epoch_acc.add(*pending)
      pending = (batch.fact_index_B, batch.valid_B, metrics)
      steps_done += 1
      if bar is not None:
        bar.update(1)
      step = first_step + steps_done  # host-side count: reading state.step would block
      if ckpt is not None and ckpt.due(step):
        epoch_acc.add(*pending)
        pending = None
        ckpt.save(step, state, {"epoch": epoch, "batch": b + 1, "total": epoch_acc.total.tolist(),
                                "count": epoch_acc.count.tolist(), "history": history})
      if stop_after_steps is not None and steps_done >= stop_after_steps:
        if ckpt is not None:
          ckpt.close()
        if bar is not None:
          bar.close()
        return FitResult(state, history, epoch_acc.fact_loss(), time.perf_counter() - t0)
    if pending is not None:
      epoch_acc.add(*pending)
    fact_loss = epoch_acc.fact_loss()
    if not np.all(np.isfinite(fact_loss)):
      bad = np.flatnonzero(~np.isfinite(fact_loss))
      raise FloatingPointError(f"{label}: epoch {epoch}: non-finite loss for {len(bad)} facts"
                               f" (first: fact {bad[0]}); the step diverged or overflowed its bounds")
    record = {"run": label, "epoch": epoch, "step": first_step + steps_done,
              "loss": float(np.mean(fact_loss)), "max_fact_loss": float(np.max(fact_loss)),
              "frac_below_stop": (float(np.mean(fact_loss < cfg.stop_loss))
                                  if cfg.stop_loss is not None else None),
              "epoch_seconds": time.perf_counter() - t_epoch}
    extra = on_epoch(epoch, state, fact_loss) if on_epoch is not None else {}
    record.update(extra)
    history.append(record)
    if metrics_path is not None:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if bar is not None:
      bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", max=f"{record['max_fact_loss']:.3f}")
    epoch_acc = _Epoch(n)
    if extra.get("stop") or (cfg.stop_loss is not None and record["max_fact_loss"] < cfg.stop_loss):
      break
  if ckpt is not None:
    if ckpt.every:
      ckpt.save(first_step + steps_done, state, {
          "epoch": cfg.epochs, "batch": 0, "total": fact_loss.tolist(), "count": [1.0] * n,
          "history": history})
    ckpt.close()
  if bar is not None:
    bar.close()
  return FitResult(state, history, fact_loss, time.perf_counter() - t0)
