"""Tokens per second and MFU of the memory-tuning train steps at Llama 3 8B's shapes.

Rows: the LoRA step (`train.make_lora_step`: LoRA r=32 on q, k, v, o, gate, up,
down, Adafactor as in the paper's Appendix A, `OptimizerConfig()` defaults) and
the MoME step (`steps_lib.make_tuning_step`: frozen router, sparse row
updates of a table of `--experts` rank-1 experts at the last layer, Adafactor
per row and the decision-hinge margin, `MomeTuningConfig()` defaults). The
backbone is random and Llama-3-8B-shaped (`lamini_jax.config.llama3_8b`),
`--layers` deep (default 1 on CPU, 32 on an accelerator); its parameters and
all matmul inputs are `--dtype`, accumulation float32; the LoRA weights and the
expert table are float32.

Batches are `--batch` rows of `--seq` random tokens with the loss on every
token. Default seq 64: a TruthfulQA fact is ~48 tokens with the Llama
tokenizers, and `train.fit` pads a batch to its longest fact rounded up to
`length_bucket` = 32, so the real step is 64 wide.

Timing: the step is compiled ahead of time (`jit(...).lower(...).compile()`),
run `--warmup` times, then `--steps` times, each ended by block_until_ready;
figures are medians. tokens/s = batch * seq / step time.

FLOPs per token, `lamini_jax.flops`'s convention (model FLOPs, PaLM app. B): a
frozen matmul parameter costs 4 (2 forward + 2 for the activation gradient, no
weight gradient), a trainable one 6, attention 3 * 4 L T d:
  LoRA  4 N + 6 N_lora + 3 A
  MoME  4 (N + N_router) + 6 K * 2 D R + 3 A
with N the backbone's matmul parameters (`flops.llama_matmul_params`, output head
included), N_router the router's per-token matmul parameters and K * 2 D R the
expert parameters touched per token. MFU = tokens/s * FLOPs per token / peak:
the dense bf16 datasheet peak of `paper_cost.ACCELERATORS` on a GPU or TPU, on CPU
the measured rate of a 2048^3 `jnp.dot` in `--dtype` (labelled "measured").
XLA's own count for the compiled step (`cost_analysis`) is printed beside it:
it counts what runs, e.g. no backward below the MoME layer.

  python -m benchmarks.train_step                       # CPU: 1 layer, batch 4 x 64
  python -m benchmarks.train_step --layers 32 --batch 32 --steps 10   # H100 / H200
  python -m benchmarks.train_step --method lora --batch 16,32,64
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import random_variables
from lamini_jax.config import ModelConfig, llama3_8b
from lamini_jax import flops as flops_lib
from lamini_jax.lora import LoraConfig, count_params
from lamini_jax import lora_tuning
from lamini_jax.model import Transformer, abstract_variables
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import steps as steps_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import paper_cost
from lamini_jax import train as train_lib
from lamini_jax_kernels import dispatch

METHODS = ("lora", "mome")
_DTYPES = ("bfloat16", "float32")
# Defaults by platform: (layers, batch).
CPU_DEFAULTS = (1, 4)
ACCELERATOR_DEFAULTS = (32, 32)
# device_kind substrings -> `paper_cost.ACCELERATORS` names (SXM parts; a PCIe H100 is slower).
DEVICE_KINDS = (("H100", "H100"), ("H200", "H200"), ("A100", "A100"), ("MI300X", "MI300X"),
                ("TPU v5 lite", "TPUv5e"), ("TPU v5e", "TPUv5e"), ("TPU v5p", "TPUv5p"))
PEAK_MATMUL_SIZE = 2048


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """`layers` / `batches` of None take the platform's default (CPU_DEFAULTS, ACCELERATOR_DEFAULTS)."""

  methods: tuple[str, ...] = METHODS
  layers: int | None = None
  batches: tuple[int, ...] | None = None
  seq: int = 64
  steps: int = 5
  warmup: int = 1
  dtype: str = "bfloat16"
  lora_rank: int = 32
  experts: int = 2**16
  mome_layers: tuple[int, ...] | None = None  # None: the last layer
  gather_apply: str = "auto"
  margin: float = mome_config.MomeTuningConfig().margin
  peak_tflops: float | None = None  # overrides the table / the CPU measurement
  seed: int = 0

  def __post_init__(self):
    bad = [m for m in self.methods if m not in METHODS]
    if not self.methods or bad:
      raise ValueError(f"BenchConfig.methods={self.methods} must be a non-empty subset of {METHODS}")
    for name in ("layers", "seq", "steps", "lora_rank", "experts", "peak_tflops"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"BenchConfig.{name}={value!r} must be positive")
    if self.warmup < 0 or self.margin < 0:
      raise ValueError(f"BenchConfig.warmup={self.warmup} and margin={self.margin} must be >= 0")
    if self.batches is not None and (not self.batches or min(self.batches) < 1):
      raise ValueError(f"BenchConfig.batches={self.batches} must be non-empty, each >= 1")
    if self.dtype not in _DTYPES:
      raise ValueError(f"BenchConfig.dtype={self.dtype!r} must be one of {_DTYPES}")
    if self.gather_apply not in dispatch.IMPLS:
      raise ValueError(f"BenchConfig.gather_apply={self.gather_apply!r} must be one of {dispatch.IMPLS}")
    if self.seq < 2:
      raise ValueError(f"BenchConfig.seq={self.seq} must be >= 2 (next-token loss)")

  def resolved(self, platform: str) -> "BenchConfig":
    """Fills layers, batches and MoME layers from the platform's defaults."""
    layers, batch = CPU_DEFAULTS if platform == "cpu" else ACCELERATOR_DEFAULTS
    layers = self.layers or layers
    mome_layers = self.mome_layers if self.mome_layers is not None else (layers - 1,)
    bad = [i for i in mome_layers if not 0 <= i < layers]
    if bad or not mome_layers:
      raise ValueError(f"BenchConfig.mome_layers={mome_layers} must be in 0..{layers - 1}")
    return dataclasses.replace(self, layers=layers, batches=self.batches or (batch,),
                               mome_layers=tuple(mome_layers))

  def mome_spec(self) -> mome_config.MomeTuningConfig:
    default = mome_config.MomeTuningConfig()
    return dataclasses.replace(default, layers=self.mome_layers, margin=self.margin,
                               layer=dataclasses.replace(default.layer, num_experts=self.experts))


@dataclasses.dataclass(frozen=True)
class Peak:
  flops: float
  label: str


def matmul_rate(dtype: str, n: int = PEAK_MATMUL_SIZE, reps: int = 5) -> float:
  """Median FLOP/s of an n^3 jnp.dot in `dtype` with float32 accumulation."""
  dt = jnp.dtype(dtype)
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32), dt)
  precision = jax.lax.Precision.HIGHEST if dt == jnp.float32 else None
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32, precision=precision))
  dot(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / statistics.median(times)


def peak_of(device: Any, bench: BenchConfig) -> Peak:
  """The peak MFU is reported against: given, the datasheet's, or measured on CPU."""
  if bench.peak_tflops is not None:
    return Peak(bench.peak_tflops * 1e12, f"{bench.peak_tflops:g} TFLOP/s (given)")
  if device.platform == "cpu":
    rate = matmul_rate(bench.dtype)
    return Peak(rate, f"{rate / 1e9:.0f} GFLOP/s measured ({PEAK_MATMUL_SIZE}^3 {bench.dtype} "
                f"jnp.dot, f32 accumulation)")
  kind = device.device_kind
  for part, name in DEVICE_KINDS:
    if part in kind and not any(variant in kind for variant in ("PCIe", "NVL")):
      acc = paper_cost.ACCELERATORS[name]
      return Peak(acc.peak_flops_bf16, f"{acc.peak_flops_bf16 / 1e12:.1f} TFLOP/s dense bf16 "
                  f"({acc.source})")
  raise ValueError(f"no datasheet peak for device {kind!r} in "
                   "lamini_jax.paper_cost.ACCELERATORS; pass --peak-tflops")


def backbone_params(cfg: ModelConfig, seed: int, platform: str) -> Any:
  """Random backbone parameters: drawn on the host on CPU (`benchmarks.decode.random_variables`,
  low peak memory), else leaf by leaf on the device (uniform, std 0.02; norm scales 1)."""
  module = Transformer(cfg)
  if platform == "cpu":
    return random_variables(module, seed)["params"]
  shapes = nn.meta.unbox(abstract_variables(module))["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  half_width = 0.02 * 3**0.5
  draw = jax.jit(lambda key, shape, dtype: jax.random.uniform(
      key, shape, jnp.float32, -half_width, half_width).astype(dtype), static_argnums=(1, 2))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  made = [jnp.ones(leaf.shape, leaf.dtype) if leaf.ndim == 1 else draw(key, leaf.shape, leaf.dtype)
          for key, leaf in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, made)


def model_flops_per_token(cfg: ModelConfig, method: str, bench: BenchConfig) -> tuple[float, int]:
  """(model FLOPs per token by flops.py's convention, trainable parameters touched per token)."""
  frozen = flops_lib.llama_matmul_params(cfg)
  attention = flops_lib.attention_flops_per_token(cfg, bench.seq)
  if method == "lora":
    trainable = flops_lib.lora_params(cfg, bench.lora_rank)
  else:
    layer = bench.mome_spec().layer_config(cfg.hidden_size)
    frozen += len(bench.mome_layers) * flops_lib.mome_router_params(layer)
    trainable = len(bench.mome_layers) * flops_lib.mome_active_params(layer)
  return flops_lib.model_flops_per_token(frozen, trainable, attention_flops=attention), trainable


def build_step(cfg: ModelConfig, params: Any, method: str, bench: BenchConfig):
  """(jitted step, state, frozen variables, parameters in the trained tree)."""
  if method == "lora":
    model = Transformer(cfg, lora=LoraConfig(rank=bench.lora_rank))
    opt_cfg = train_lib.OptimizerConfig()
    state = lora_tuning.init_lora_state(model, opt_cfg, bench.seed)
    return lora_tuning.make_lora_step(model, opt_cfg), state, params, count_params(state.trainable)
  spec = bench.mome_spec()
  model = mome_tuning.mome_model(cfg, spec, gather_apply=dispatch.get_gather_apply(bench.gather_apply))
  fresh = mome_tuning.init_mome(model, spec.seed)
  tx = spec.train.optimizer.build()
  state = mome_tuning.tuning_state(fresh.pop(layer_lib.TABLE), tx, spec.seed)
  frozen = {"params": params, **fresh}
  step = steps_lib.make_tuning_step(model, tx, None, spec.margin)
  return step, state, frozen, count_params(state.trainable)


def random_batch(cfg: ModelConfig, batch: int, seq: int, seed: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  tokens_BxT = rng.integers(3, cfg.vocab_size, size=(batch, seq), dtype=np.int32)
  return jnp.asarray(tokens_BxT), jnp.ones((batch, seq), jnp.float32)


def _xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def measure(cfg: ModelConfig, params: Any, method: str, batch: int, bench: BenchConfig) -> dict[str, Any]:
  """Compile seconds, XLA FLOPs and step times of one (method, batch)."""
  step, state, frozen, trained = build_step(cfg, params, method, bench)
  tokens_BxT, mask_BxT = random_batch(cfg, batch, bench.seq, bench.seed)
  row = {"method": method, "batch": batch, "trained_params": trained}
  try:
    start = time.perf_counter()
    compiled = step.lower(state, frozen, tokens_BxT, mask_BxT).compile()
    row["compile_s"] = time.perf_counter() - start
    row["xla_flops"] = _xla_flops(compiled)
    times = []
    for i in range(bench.warmup + bench.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, frozen, tokens_BxT, mask_BxT)
      jax.block_until_ready((state, metrics))
      if i >= bench.warmup:
        times.append(time.perf_counter() - start)
  except jax.errors.JaxRuntimeError as e:
    if not _is_oom(e):
      raise
    row["oom"] = str(e).splitlines()[0][:200]
    return row
  row.update(step_s=statistics.median(times), min_s=min(times), max_s=max(times),
             loss=float(metrics["loss"]))
  return row


def run(bench: BenchConfig) -> tuple[BenchConfig, ModelConfig, Peak, list[dict[str, Any]]]:
  device = jax.devices()[0]
  bench = bench.resolved(device.platform)
  cfg = llama3_8b(bench.layers, param_dtype=bench.dtype, compute_dtype=bench.dtype)
  peak = peak_of(device, bench)
  params = backbone_params(cfg, bench.seed, device.platform)
  rows = []
  for method in bench.methods:
    flops, active = model_flops_per_token(cfg, method, bench)
    for batch in bench.batches:
      row = measure(cfg, params, method, batch, bench)
      rows.append({**row, "flops_per_token": flops, "active_params": active})
  return bench, cfg, peak, rows


def format_table(bench: BenchConfig, cfg: ModelConfig, peak: Peak, rows: list[dict[str, Any]]) -> str:
  dev = jax.devices()[0]
  backbone = flops_lib.llama_matmul_params(cfg)
  spec = bench.mome_spec()
  lines = [
      f"Memory-tuning train step; device: {dev.device_kind} ({dev.platform}) x{jax.device_count()}, "
      f"jax {jax.__version__}. Llama-3-8B shapes with {cfg.num_layers} of "
      f"{llama3_8b().num_layers} layers "
      f"({backbone / 1e9:.3g} B matmul params, output head included), params and matmul inputs "
      f"{bench.dtype}, f32 accumulation; seq {bench.seq}; median of {bench.steps} steps after "
      f"{bench.warmup} warm-up.",
      f"lora: r={bench.lora_rank} on q,k,v,o,gate,up,down, Adafactor (paper's lr 2e-4). "
      f"mome: {spec.layer.num_experts} experts of rank {spec.layer.expert_rank} at layer(s) "
      f"{','.join(map(str, bench.mome_layers))}, {spec.layer.num_heads}x{spec.layer.top_k} slots per"
      " token, frozen "
      f"router, sparse Adafactor rows, margin {spec.margin:g}, gather-apply "
      f"{dispatch.resolve(bench.gather_apply)}.",
      "model GFLOP/tok: lamini_jax.flops convention (frozen 4/param, trainable 6/param, attention "
      "3 x 4LTd); XLA GFLOP/tok: cost_analysis of the compiled step.",
      f"MFU against {peak.label}.",
      "",
      "| method | batch x seq | trained params | active params/tok | step ms (min-max) | tokens/s "
      "| model GFLOP/tok | MFU | XLA GFLOP/tok | compile s |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    head = (f"| {r['method']} | {r['batch']} x {bench.seq} | {r['trained_params'] / 1e6:.3g} M "
            f"| {r['active_params'] / 1e6:.3g} M")
    if "oom" in r:
      lines.append(f"{head} | out of memory | | {r['flops_per_token'] / 1e9:.2f} | | | |")
      continue
    tps = r["batch"] * bench.seq / r["step_s"]
    xla = "n/a" if r["xla_flops"] is None else f"{r['xla_flops'] / (r['batch'] * bench.seq) / 1e9:.2f}"
    lines.append(
        f"{head} | {1e3 * r['step_s']:.0f} ({1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f}) "
        f"| {tps:,.0f} | {r['flops_per_token'] / 1e9:.2f} "
        f"| {tps * r['flops_per_token'] / peak.flops:.1%} | {xla} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(s) for s in text.split(",") if s)


def main(argv: list[str] | None = None) -> None:
  d = BenchConfig()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--method", default=",".join(d.methods), help="comma-separated: lora,mome")
  p.add_argument("--layers", type=int, default=None,
                 help=f"decoder layers (default {CPU_DEFAULTS[0]} on CPU, {ACCELERATOR_DEFAULTS[0]} otherwise)")
  p.add_argument("--batch", default=None, help=f"comma-separated batch sizes (default "
                 f"{CPU_DEFAULTS[1]} on CPU, {ACCELERATOR_DEFAULTS[1]} otherwise)")
  p.add_argument("--seq", type=int, default=d.seq)
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--warmup", type=int, default=d.warmup)
  p.add_argument("--dtype", choices=_DTYPES, default=d.dtype, help="backbone params and matmul inputs")
  p.add_argument("--lora-rank", type=int, default=d.lora_rank)
  p.add_argument("--experts", type=int, default=d.experts, help="MoME table size N")
  p.add_argument("--mome-layers", default=None, help="comma-separated (default: the last layer)")
  p.add_argument("--gather-apply", choices=dispatch.IMPLS, default=d.gather_apply)
  p.add_argument("--margin", type=float, default=d.margin,
                 help="MoME decision-hinge margin (0: cross-entropy only)")
  p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU, in TFLOP/s")
  args = p.parse_args(argv)
  try:
    bench = BenchConfig(
        methods=tuple(m for m in args.method.split(",") if m), layers=args.layers,
        batches=_ints(args.batch) if args.batch else None, seq=args.seq, steps=args.steps,
        warmup=args.warmup, dtype=args.dtype, lora_rank=args.lora_rank, experts=args.experts,
        mome_layers=_ints(args.mome_layers) if args.mome_layers else None,
        gather_apply=args.gather_apply, margin=args.margin,
        peak_tflops=args.peak_tflops).resolved(jax.devices()[0].platform)
  except ValueError as e:
    p.error(str(e))
  print(format_table(*run(bench)))


if __name__ == "__main__":
  main()
