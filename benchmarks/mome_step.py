"""Step time of a MoME memory-tuning step versus the number of experts N.

Two modes. The default times the MoME layer alone; `--config FILE` times the
whole memory-tuning step of exactly that run config (its backbone, MoME layers,
keyed experts, anchors, hinge, answer positions, batch and optimizer; one real
batch of its facts with random answers), as `mome.tuning.tune_mome` runs it,
beside the same model with a dense [N, ...] gradient and the optimizer on every row.

Layer mode: everything but N is fixed (T tokens, D, R, K slots). Columns:
  routed: route a fixed batch with the frozen router, gather the unique
          selected rows, forward, MSE loss, row gradients, per-row Adafactor,
          in-place write-back (lamini_jax.mome.row_grads + sparse_step);
  step:   the same with the routing precomputed (frozen router, fixed batch);
  dense:  route, gradient of the whole [N, ...] table, Adafactor on all N rows
          (lamini_jax.mome.dense_step), for comparison.
Sparse variants of all sizes are timed round-robin, so background load hits
every size alike; each figure is the median of the timed steps after warm-up.

  python -m benchmarks.mome_step [--sizes 10,14,17,20] [--reps 10] [--rank 1]
  python -m benchmarks.mome_step --config configs/randomization_cpu.yaml [--set ...] [--sizes 10,14,17,20,22]
"""

import argparse
import dataclasses
import functools
import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.mome import anchors as anchors_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import inputs as inputs_lib
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import steps as steps_lib
from lamini_jax.mome import table as table_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs

from benchmarks._log import progress



@dataclasses.dataclass(frozen=True)
class BenchConfig:
  log2_sizes: tuple[int, ...] = (10, 14, 17, 20)
  tokens: int = 1024  # T
  embed_dim: int = 64  # D
  expert_rank: int = 1  # R
  num_heads: int = 4  # H
  top_k: int = 8  # K = H * top_k = 32 slots per token
  key_dim: int = 32
  warmup: int = 2
  reps: int = 10
  dense_max_log2: int = 20  # dense steps above this N are skipped
  dense_reps: int = 3
  learning_rate: float = 1e-2

  def __post_init__(self):
    for field in ("tokens", "embed_dim", "expert_rank", "num_heads", "top_k", "key_dim", "reps",
                  "dense_reps"):
      if getattr(self, field) < 1:
        raise ValueError(f"BenchConfig.{field}={getattr(self, field)} must be >= 1")
    if not self.log2_sizes or min(self.log2_sizes) < 4:
      raise ValueError(f"BenchConfig.log2_sizes={self.log2_sizes} must be non-empty, each >= 4")

  def mome_config(self, log2_n: int) -> mome_config.MomeConfig:
    return mome_config.MomeConfig(
        num_experts=2**log2_n, embed_dim=self.embed_dim, expert_rank=self.expert_rank,
        num_heads=self.num_heads, key_dim=self.key_dim, top_k=self.top_k, activation="gelu")


def _loss(rows, idx_TxK, w_TxK, x_TxD, target_TxD, cfg):
  y_TxD = table_lib.apply_experts(x_TxD, idx_TxK, w_TxK, rows, cfg)
  return jnp.mean((y_TxD - target_TxD) ** 2)


def sparse_tuning_step(table, opt_state, idx_TxK, w_TxK, x_TxD, target_TxD, *, cfg, tx):
  """Memory-tuning step on routed tokens: unique rows, row gradients, row update."""
  loss_fn = functools.partial(_loss, cfg=cfg)
  loss, grads_rows, uniq_U = sparse_optim.row_grads(loss_fn, table, idx_TxK, w_TxK, x_TxD, target_TxD)
  table, opt_state = sparse_optim.sparse_step(table, opt_state, grads_rows, uniq_U, tx=tx)
  return table, opt_state, loss


def routed_sparse_step(table, opt_state, router, x_TxD, target_TxD, *, cfg, tx):
  idx_TxK, w_TxK = router_lib.route(router, x_TxD, cfg)
  return sparse_tuning_step(table, opt_state, idx_TxK, w_TxK, x_TxD, target_TxD, cfg=cfg, tx=tx)


def routed_dense_step(table, opt_state, router, x_TxD, target_TxD, *, cfg, tx):
  idx_TxK, w_TxK = router_lib.route(router, x_TxD, cfg)
  loss, grads = jax.value_and_grad(_loss)(table, idx_TxK, w_TxK, x_TxD, target_TxD, cfg)
  table, opt_state = sparse_optim.dense_step(table, opt_state, grads, tx=tx)
  return table, opt_state, loss


class _Runner:
  """One step variant at one N: owns its (donated) table and optimizer state."""

  def __init__(self, fn, cfg, tx, args, key):
    self.step = jax.jit(functools.partial(fn, cfg=cfg, tx=tx), donate_argnames=("table", "opt_state"))
    self.table = table_lib.init_table(key, cfg)
    self.opt_state = sparse_optim.init_expert_opt_state(self.table, tx)
    self.args = args
    self.times = []

  def __call__(self, timed: bool) -> None:
    start = time.perf_counter()
    self.table, self.opt_state, loss = self.step(self.table, self.opt_state, *self.args)
    jax.block_until_ready((self.table, self.opt_state, loss))
    if timed:
      self.times.append(time.perf_counter() - start)


def run(bench: BenchConfig) -> list[dict]:
  """Median step seconds per N; sparse variants interleaved round-robin over N."""
  tx = optax.adafactor(bench.learning_rate)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x_TxD = jax.random.normal(keys[0], (bench.tokens, bench.embed_dim))
  target_TxD = jax.random.normal(keys[1], (bench.tokens, bench.embed_dim))
  sparse = {}
  for log2_n in bench.log2_sizes:
    cfg = bench.mome_config(log2_n)
    router = router_lib.init_router(keys[2], cfg)
    idx_TxK, w_TxK = jax.jit(functools.partial(router_lib.route, cfg=cfg))(router, x_TxD)
    sparse[log2_n] = {
        "routed": _Runner(routed_sparse_step, cfg, tx, (router, x_TxD, target_TxD), keys[3]),
        "step": _Runner(sparse_tuning_step, cfg, tx, (idx_TxK, w_TxK, x_TxD, target_TxD), keys[3]),
    }
  for i in range(bench.warmup + bench.reps):
    for runners in sparse.values():
      for runner in runners.values():
        runner(timed=i >= bench.warmup)
  results = [{"log2_n": n, **{name: statistics.median(r.times) for name, r in runners.items()}}
             for n, runners in sparse.items()]
  del sparse
  for row in results:
    row["dense"] = None
    if row["log2_n"] <= bench.dense_max_log2:
      cfg = bench.mome_config(row["log2_n"])
      runner = _Runner(routed_dense_step, cfg, tx, (router_lib.init_router(keys[2], cfg), x_TxD, target_TxD),
                       keys[3])
      for i in range(bench.warmup + bench.dense_reps):
        runner(timed=i >= bench.warmup)
        progress(f"dense N=2^{row['log2_n']} call {i + 1}")
      row["dense"] = statistics.median(runner.times)
      del runner
  return results


def format_table(bench: BenchConfig, results: list[dict]) -> str:
  first = results[0]
  lines = [
      f"MoME memory-tuning step: T={bench.tokens} tokens, D={bench.embed_dim}, R={bench.expert_rank},"
      f" K={bench.num_heads}x{bench.top_k} slots, key_dim={bench.key_dim}, optax.adafactor per row;"
      f" {jax.devices()[0].platform} x{jax.device_count()}",
      f"median of {bench.reps} sparse steps (sizes interleaved) / {bench.dense_reps} dense steps,"
      f" after {bench.warmup} warm-up; times in ms",
      "  routed = route + gather + forward + row grads + row Adafactor + scatter (in place)",
      "  step   = the same with routing precomputed (frozen router, fixed batch)",
      "  dense  = route + forward + dense [N,...] grads + Adafactor on all N rows",
      f"{'N':>9} {'routed':>8} {'x first':>8} {'step':>8} {'x first':>8} {'dense':>9} {'dense/routed':>13}",
  ]
  for r in results:
    dense = "skipped" if r["dense"] is None else f"{1e3 * r['dense']:.1f}"
    ratio = "-" if r["dense"] is None else f"{r['dense'] / r['routed']:.1f}x"
    lines.append(
        f"{2 ** r['log2_n']:>9} {1e3 * r['routed']:>8.1f} {r['routed'] / first['routed']:>7.2f}x"
        f" {1e3 * r['step']:>8.1f} {r['step'] / first['step']:>7.2f}x {dense:>9} {ratio:>13}")
  skipped = [2**r["log2_n"] for r in results if r["dense"] is None]
  if skipped:
    lines.append(f"dense skipped at N={skipped}: above --dense-max-log2={bench.dense_max_log2}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Full memory-tuning step (backbone + MoME layers).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RunData:
  """What every size's step shares: the backbone, one real batch, the anchor pool."""

  config: runs.RunConfig
  model_cfg: Any
  params: Any
  encoded: list
  tokens_BxT: jax.Array
  mask_BxT: jax.Array
  anchors: dict | None


def _run_data(config: runs.RunConfig) -> _RunData:
  """The config's backbone and the first phase-2 batch of its facts with random answers."""
  backbone = runs.load_backbone(config.model)
  template = runs.prompt_template(config.data)
  facts, _, _ = runs.facts_and_heldout(config.data, "random")
  encoded = encoding.encode_facts(backbone.tokenizer, template, facts, config.data.max_len)
  train = config.mome.train
  batch = next(iter(batch_lib.epoch_batches(encoded, train.batch_size, train.seq_len, 0, train.seed, 0,
                                            train.length_bucket)))
  pad = backbone.tokenizer.pad_token_id or 0
  anchors = runs.anchor_pool(config, backbone.tokenizer, template, pad)
  return _RunData(config, backbone.cfg, backbone.params, encoded, jnp.asarray(batch.tokens_BxT),
                  jnp.asarray(batch.loss_mask_BxT), anchors)


def _spec(config: runs.RunConfig, log2_n: int) -> mome_config.MomeTuningConfig:
  spec = config.mome
  return dataclasses.replace(spec, layer=dataclasses.replace(spec.layer, num_experts=2**log2_n))


class _FullRunner:
  """The config's memory-tuning step (or its dense-gradient baseline) at one N, with its donated state."""

  def __init__(self, data: _RunData, log2_n: int, dense: bool):
    spec = _spec(data.config, log2_n)
    model = mome_tuning.mome_model(data.model_cfg, spec)
    keyed = bool(spec.key_match)
    init = mome_tuning.init_mome(model, spec.seed, zero_down=keyed and spec.generalization.epochs == 0)
    tx = spec.train.optimizer.build()
    self.frozen = {"params": data.params, layer_lib.ROUTER: init[layer_lib.ROUTER],
                   layer_lib.BALANCE: init[layer_lib.BALANCE]}
    if dense:  # dense [N, ...] gradient of the whole table, the optimizer on every row of both leaves
      self.state = mome_tuning.tuning_state(init[layer_lib.TABLE], tx, 0)
      self.step = steps_lib.make_dense_tuning_step(model, tx, spec.margin)
    else:  # exactly the step `tune_mome` runs for this config, the first layer's routes cached
      routes_of = lambda tokens: jnp.asarray(inputs_lib.token_routes(
          model, {**self.frozen, layer_lib.TABLE: init[layer_lib.TABLE]}, np.asarray(tokens)))
      anchor = spec.anchor if spec.anchor.weight > 0 else None
      if anchor is not None:
        self.frozen[anchors_lib.ANCHOR] = {**jax.tree.map(jnp.asarray, data.anchors),
                                           "experts": routes_of(data.anchors["tokens"])}
      experts = (routes_of(data.tokens_BxT),)
      leaves = sparse_optim.trained_leaves(not keyed)
      self.state = mome_tuning.tuning_state(init[layer_lib.TABLE], tx, 0, None, leaves)
      rows = steps_lib.focus_rows(data.encoded, spec.train.batch_size, spec)
      self.step = steps_lib.make_tuning_step(model, tx, None, spec.margin, spec.train_positions, rows,
                                             anchor, train_down=not keyed)
    self.batch = (data.tokens_BxT, data.mask_BxT) + (() if dense else experts)
    self.times = []

  def __call__(self, timed: bool) -> None:
    start = time.perf_counter()
    self.state, metrics = self.step(self.state, self.frozen, *self.batch)
    jax.block_until_ready((self.state, metrics))
    if timed:
      self.times.append(time.perf_counter() - start)


def run_full(bench: BenchConfig, config: runs.RunConfig) -> tuple[list[dict], _RunData]:
  """Median seconds of the config's step and of the dense step per N; sparse sizes round-robin."""
  progress(f"set-up of {config.model.path}: routes, balance, keys")
  data = _run_data(config)
  progress("set-up done; building the sparse steps")
  sparse = {n: _FullRunner(data, n, dense=False) for n in bench.log2_sizes}
  for i in range(bench.warmup + bench.reps):
    for n, runner in sparse.items():
      runner(timed=i >= bench.warmup)
      progress(f"sparse N=2^{n} call {i + 1}")
  results = [{"log2_n": n, "sparse": statistics.median(r.times), "dense": None} for n, r in sparse.items()]
  del sparse
  for row in results:
    if row["log2_n"] <= bench.dense_max_log2:
      runner = _FullRunner(data, row["log2_n"], dense=True)
      for i in range(bench.warmup + bench.dense_reps):
        runner(timed=i >= bench.warmup)
        progress(f"dense N=2^{row['log2_n']} call {i + 1}")
      row["dense"] = statistics.median(runner.times)
      del runner
  return results, data


def format_full_table(bench: BenchConfig, config_name: str, data: _RunData, results: list[dict]) -> str:
  spec, first = data.config.mome, results[0]
  b, t = data.tokens_BxT.shape
  anchors = f"{spec.anchor.batch_size} anchor rows" if spec.anchor.weight > 0 else "no anchors"
  lines = [
      f"MoME memory-tuning step of {config_name}: {data.config.model.path} with MoME at layers"
      f" {list(spec.layers)}, batch {b}x{t} tokens of random-answer facts + {anchors},"
      f" K={spec.layer.num_heads}x{spec.layer.top_k} slots, R={spec.layer.expert_rank},"
      f" keyed={bool(spec.key_match)}, margin={spec.margin}, positions={spec.train_positions};"
      f" {jax.devices()[0].platform} x{jax.device_count()}",
      f"median of {bench.reps} sparse steps (sizes interleaved) / {bench.dense_reps} dense steps,"
      f" after {bench.warmup} warm-up; times in ms",
      "  step  = the config's phase-2 step (mome.steps.make_tuning_step), as tune_mome runs it"
      " (the first MoME layer's routes cached: inputs.token_routes)",
      "  dense = the same model, token loss and hinge (no anchors, every position), dense [N,...] table"
      " gradient, the optimizer on all N rows of both leaves",
      f"{'N':>9} {'step':>8} {'x first':>8} {'dense':>9} {'dense/step':>11}",
  ]
  for r in results:
    dense = "skipped" if r["dense"] is None else f"{1e3 * r['dense']:.1f}"
    ratio = "-" if r["dense"] is None else f"{r['dense'] / r['sparse']:.1f}x"
    lines.append(f"{2 ** r['log2_n']:>9} {1e3 * r['sparse']:>8.1f} {r['sparse'] / first['sparse']:>7.2f}x"
                 f" {dense:>9} {ratio:>11}")
  skipped = [2**r["log2_n"] for r in results if r["dense"] is None]
  if skipped:
    lines.append(f"dense skipped at N={skipped}: above --dense-max-log2={bench.dense_max_log2}")
  return "\n".join(lines)


def main() -> None:
  defaults = BenchConfig()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default=",".join(map(str, defaults.log2_sizes)),
                      help="comma-separated log2 N")
  parser.add_argument("--reps", type=int, default=defaults.reps)
  parser.add_argument("--dense-reps", type=int, default=defaults.dense_reps)
  parser.add_argument("--dense-max-log2", type=int, default=defaults.dense_max_log2)
  parser.add_argument("--tokens", type=int, default=defaults.tokens)
  parser.add_argument("--rank", type=int, default=defaults.expert_rank)
  parser.add_argument("--heads", type=int, default=defaults.num_heads)
  parser.add_argument("--top-k", type=int, default=defaults.top_k)
  parser.add_argument("--config", type=pathlib.Path,
                      help="time the whole memory-tuning step of this run config (e.g."
                      " configs/randomization_cpu.yaml) instead of the layer alone")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="--config: override a field, e.g. --set mome.train.batch_size=16")
  args = parser.parse_args()
  bench = BenchConfig(
      log2_sizes=tuple(int(s) for s in args.sizes.split(",")), reps=args.reps,
      dense_reps=args.dense_reps, dense_max_log2=args.dense_max_log2, tokens=args.tokens,
      expert_rank=args.rank, num_heads=args.heads, top_k=args.top_k)
  if args.config is not None:
    results, data = run_full(bench, runs.load_run_config(args.config, args.set))
    print(format_full_table(bench, str(args.config), data, results))
  else:
    print(format_table(bench, run(bench)))


if __name__ == "__main__":
  main()
