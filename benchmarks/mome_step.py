"""Step time of a MoME memory-tuning step versus the number of experts N.

Two modes. The default times the MoME layer alone; `--full` times the whole
memory-tuning step of `lamini_jax.mome_tuning` (frozen stories260K backbone with
MoME layers, one real batch of TruthfulQA random-answer facts, token loss,
sparse row gradients, per-row Adafactor, in-place write-back) beside the same
step with a dense [N, ...] gradient and Adafactor on every row.

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
  python -m benchmarks.mome_step --full [--sizes 10,14,17,20] [--layers 4] [--batch 32]
"""

import argparse
import dataclasses
import functools
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import steps as steps_lib
from lamini_jax.mome import table as table_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def _full_batch(batch_size: int):
  """(config, params, facts, tokens_BxT, mask_BxT): stories260K and the first batch of random facts."""
  run_cfg = runs.load_run_config(REPO / "configs" / "randomization_cpu.yaml")
  backbone = runs.load_backbone(run_cfg.model)
  model_cfg, params, tokenizer = backbone.cfg, backbone.params, backbone.tokenizer
  facts, _, _ = runs.facts_and_heldout(run_cfg.data, "random")
  encoded = encoding.encode_facts(tokenizer, runs.prompt_template(run_cfg.data), facts, run_cfg.data.max_len)
  train = run_cfg.mome.train
  batch = next(iter(batch_lib.epoch_batches(encoded, batch_size, train.seq_len, 0, train.seed, 0,
                                           train.length_bucket)))
  return model_cfg, params, encoded, jnp.asarray(batch.tokens_BxT), jnp.asarray(batch.loss_mask_BxT)


class _FullRunner:
  """One memory-tuning step variant at one N: its donated train state."""

  def __init__(self, make_step, model_cfg, params, spec, tx, tokens_BxT, mask_BxT, **step_kwargs):
    model = mome_tuning.mome_model(model_cfg, spec)
    init = mome_tuning.init_mome(model, spec.seed)
    self.frozen = {"params": params, layer_lib.ROUTER: init[layer_lib.ROUTER], layer_lib.BALANCE: init[layer_lib.BALANCE]}
    self.state = mome_tuning.tuning_state(init[layer_lib.TABLE], tx, 0)
    self.step = make_step(model, tx, margin=spec.margin, **step_kwargs)
    self.batch = (tokens_BxT, mask_BxT)
    self.times = []

  def __call__(self, timed: bool) -> None:
    start = time.perf_counter()
    self.state, metrics = self.step(self.state, self.frozen, *self.batch)
    jax.block_until_ready((self.state, metrics))
    if timed:
      self.times.append(time.perf_counter() - start)


def run_full(bench: BenchConfig, layers: tuple[int, ...], batch_size: int) -> tuple[list[dict], tuple]:
  """Median seconds of the sparse and the dense full step per N; sparse sizes round-robin."""
  model_cfg, params, encoded, tokens_BxT, mask_BxT = _full_batch(batch_size)
  tx = optax.adafactor(bench.learning_rate, multiply_by_parameter_scale=False)

  def spec(log2_n):
    return mome_config.MomeTuningConfig(layers=layers, layer=mome_config.MomeConfig(
        num_experts=2**log2_n, expert_rank=bench.expert_rank, num_heads=bench.num_heads,
        key_dim=bench.key_dim, top_k=bench.top_k))

  sparse = {n: _FullRunner(steps_lib.make_tuning_step, model_cfg, params, spec(n), tx, tokens_BxT, mask_BxT,
                           rows=steps_lib.focus_rows(encoded, batch_size, spec(n)))
            for n in bench.log2_sizes}
  for i in range(bench.warmup + bench.reps):
    for runner in sparse.values():
      runner(timed=i >= bench.warmup)
  results = [{"log2_n": n, "sparse": statistics.median(r.times), "dense": None} for n, r in sparse.items()]
  del sparse
  for row in results:
    if row["log2_n"] <= bench.dense_max_log2:
      runner = _FullRunner(steps_lib.make_dense_tuning_step, model_cfg, params, spec(row["log2_n"]), tx,
                           tokens_BxT, mask_BxT)
      for i in range(bench.warmup + bench.dense_reps):
        runner(timed=i >= bench.warmup)
      row["dense"] = statistics.median(runner.times)
      del runner
  return results, tuple(tokens_BxT.shape)


def format_full_table(bench: BenchConfig, layers, shape, results: list[dict]) -> str:
  first = results[0]
  lines = [
      f"MoME memory-tuning step, full model: stories260K with MoME at layers {list(layers)},"
      f" batch {shape[0]}x{shape[1]} tokens of random-answer facts, R={bench.expert_rank},"
      f" K={bench.num_heads}x{bench.top_k} slots, per-row optax.adafactor;"
      f" {jax.devices()[0].platform} x{jax.device_count()}",
      f"median of {bench.reps} sparse steps (sizes interleaved) / {bench.dense_reps} dense steps,"
      f" after {bench.warmup} warm-up; times in ms",
      "  sparse = backbone forward, token loss, grads of the gathered rows only, row Adafactor, in-place write",
      "  dense  = the same model and loss, dense [N,...] table gradient, Adafactor on all N rows",
      f"{'N':>9} {'sparse':>8} {'x first':>8} {'dense':>9} {'dense/sparse':>13}",
  ]
  for r in results:
    dense = "skipped" if r["dense"] is None else f"{1e3 * r['dense']:.1f}"
    ratio = "-" if r["dense"] is None else f"{r['dense'] / r['sparse']:.1f}x"
    lines.append(f"{2 ** r['log2_n']:>9} {1e3 * r['sparse']:>8.1f} {r['sparse'] / first['sparse']:>7.2f}x"
                 f" {dense:>9} {ratio:>13}")
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
  parser.add_argument("--full", action="store_true",
                      help="time the whole memory-tuning step (backbone + MoME layers)")
  parser.add_argument("--layers", default="4", help="--full: comma-separated MoME layers")
  parser.add_argument("--batch", type=int, default=32, help="--full: facts per batch")
  args = parser.parse_args()
  bench = BenchConfig(
      log2_sizes=tuple(int(s) for s in args.sizes.split(",")), reps=args.reps,
      dense_reps=args.dense_reps, dense_max_log2=args.dense_max_log2, tokens=args.tokens,
      expert_rank=args.rank, num_heads=args.heads, top_k=args.top_k)
  if args.full:
    layers = tuple(int(s) for s in args.layers.split(","))
    results, shape = run_full(bench, layers, args.batch)
    print(format_full_table(bench, layers, shape, results))
  else:
    print(format_table(bench, run(bench)))


if __name__ == "__main__":
  main()
