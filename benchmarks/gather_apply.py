"""Gather-apply: time and bandwidth of each implementation against the XLA baseline.

Passes, each jitted and timed alone (median of the timed calls after warm-up):
  forward  y = gather_apply(x, idx, w, down, up, act) on the [E, ...] table;
  rows     forward plus the row-gradient backward: dx, dw and RowGrads, one
           gradient row per slot, not summed (kernels: `get_gather_apply_vjp`;
           xla: gradients w.r.t. the gathered [T, K, ...] rows);
  train    the MoME sparse path: jax.grad of sum(y * dy) w.r.t. x, w and the
           U = T * K gathered unique rows, indexed by the inverse indices (the
           rows pass plus the scatter-add that sums duplicate slots);
  scatter  that scatter-add alone: zeros[U, ...].at[inv].add(rows[P, ...]) for
           down and up (the gather's transpose; jax#38806 / xla#46225 report
           GPU regressions of it).
Minimum bytes: forward reads each selected row once (P = T * K rows of down
and of up), x once, and writes y once; rows and train add a backward that reads
dy, x and the selected rows once and writes dx and the P gradient rows once;
scatter reads the P rows and writes U rows. GB/s = minimum bytes / time, and
"% copy" compares it with a measured device copy (read + write of one array).

  python -m benchmarks.gather_apply                 # small sizes for CPU
  python -m benchmarks.gather_apply --preset gpu    # T=4096 K=32 D=4096 R=1 N=2^20 bf16
  python -m benchmarks.gather_apply --check         # also errors against the f32 reference
  python -m benchmarks.gather_apply --preset gpu --triton-blocks 32,256,16,256,4

On CPU only the XLA reference and the Pallas kernels in TPU interpret mode run
(interpret mode executes each grid step on the host: slow, small sizes only).
"""

import argparse
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lamini_jax.mome import table as table_lib
from lamini_jax_kernels import dispatch
from lamini_jax_kernels import gather_apply as ga

PASSES = ("forward", "rows", "train", "scatter")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  tokens: int = 128  # T
  slots: int = 8  # K
  width: int = 512  # D
  rank: int = 1  # R
  log2_experts: int = 14  # N = 2 ** log2_experts
  dtype: str = "bfloat16"
  impls: tuple[str, ...] = ("xla", "pallas_interpret")
  passes: tuple[str, ...] = ("forward", "rows", "train", "scatter")
  warmup: int = 1
  reps: int = 3
  min_seconds: float = 1.0
  copy_mib: int = 64
  triton_blocks: tuple[int, ...] | None = None  # lamini_jax_kernels.gpu BlockSizes fields, in order

  def __post_init__(self):
    for field in ("tokens", "slots", "width", "rank", "log2_experts", "reps", "copy_mib"):
      if getattr(self, field) < 1:
        raise ValueError(f"BenchConfig.{field}={getattr(self, field)} must be >= 1")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"BenchConfig.dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
    for impl in self.impls:
      if impl != "xla" and impl not in dispatch.IMPLS[1:]:
        raise ValueError(f"BenchConfig.impls has {impl!r}; use 'xla' or one of {dispatch.IMPLS[1:]}")
    for p in self.passes:
      if p not in PASSES:
        raise ValueError(f"BenchConfig.passes has {p!r}; use some of {PASSES}")


PRESETS = {
    "cpu": BenchConfig(tokens=32, slots=4, width=256, log2_experts=12),
    "gpu": BenchConfig(tokens=4096, slots=32, width=4096, rank=1, log2_experts=20,
                       impls=("xla", "triton"), warmup=2, reps=20, copy_mib=2048),
}
ACT = jax.nn.gelu


def _time(fn: Callable[..., object], args: tuple, bench: BenchConfig) -> float:
  """Median seconds of fn(*args): bench.warmup calls, then at least bench.reps calls and
  at least min_seconds in all."""
  for _ in range(bench.warmup):
    jax.block_until_ready(fn(*args))
  times = []
  while len(times) < bench.reps or sum(times) < bench.min_seconds:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(bench: BenchConfig) -> float:
  """Bytes per second of a jitted elementwise copy (read + write) of copy_mib MiB."""
  a = jnp.zeros((bench.copy_mib * 2**20 // 4,), jnp.float32)
  seconds = _time(jax.jit(lambda a: a + 1.0), (a,), bench)
  return 2 * a.nbytes / seconds


def make_inputs(bench: BenchConfig, key: jax.Array) -> dict[str, jax.Array]:
  """Table, tokens, uniform random experts, and the gathered unique rows of the sparse path."""
  t, k, d, r, n = bench.tokens, bench.slots, bench.width, bench.rank, 2**bench.log2_experts
  dtype = jnp.dtype(bench.dtype)
  keys = jax.random.split(key, 6)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def normal(key, shape, scale):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  inputs = {
      "down": normal(keys[0], (n, d, r), d**-0.5), "up": normal(keys[1], (n, r, d), 1.0),
      "x": normal(keys[2], (t, d), 1.0), "dy": normal(keys[3], (t, d), 1.0),
      "idx": jax.random.randint(keys[4], (t, k), 0, n, jnp.int32),
      "w": jax.random.uniform(keys[5], (t, k), jnp.float32).astype(dtype),
  }

  @jax.jit
  def sparse(idx, down, up):
    uniq, inv = table_lib.unique_rows(idx, n)
    return inv, jnp.take(down, uniq, axis=0, mode="clip"), jnp.take(up, uniq, axis=0, mode="clip")

  inputs["inv"], inputs["rows_down"], inputs["rows_up"] = sparse(inputs["idx"], inputs["down"],
                                                                 inputs["up"])
  inputs["grads_down"] = normal(keys[0], (t * k, d, r), 1.0)  # per-slot row gradients
  inputs["grads_up"] = normal(keys[1], (t * k, r, d), 1.0)
  return inputs


def _xla_rows(x, idx, w, down, up, dy):
  """Gradients w.r.t. the gathered [T, K, ...] rows by XLA (the rows-API baseline)."""
  gathered = (jnp.take(down, idx, axis=0), jnp.take(up, idx, axis=0))

  def apply(x, w, down_TxKxDxR, up_TxKxRxD):
    h = ACT(jnp.einsum("TD,TKDR->TKR", x, down_TxKxDxR))
    return jnp.einsum("TK,TKR,TKRD->TD", w, h, up_TxKxRxD)

  y, vjp = jax.vjp(apply, x, w, *gathered)
  return y, vjp(dy)


def pass_fn(impl: str, name: str, bench: BenchConfig) -> tuple[Callable[..., object], tuple[str, ...]]:
  """(jitted function, names of its inputs) for one implementation and pass."""
  blocks = None
  if impl == "triton" and bench.triton_blocks is not None:
    from lamini_jax_kernels.gpu import gather_apply as gpu_ga  # pylint: disable=g-import-not-at-top
    blocks = gpu_ga.BlockSizes(*bench.triton_blocks)
  fn = (ga.gather_apply_reference if impl == "xla"
        else dispatch.get_gather_apply(impl, block_sizes=blocks))
  if name == "forward":
    return jax.jit(lambda x, idx, w, down, up: fn(x, idx, w, down, up, ACT)), (
        "x", "idx", "w", "down", "up")
  if name == "rows":
    if impl == "xla":
      return jax.jit(_xla_rows), ("x", "idx", "w", "down", "up", "dy")
    fwd = dispatch.get_gather_apply_vjp(impl, block_sizes=blocks)

    def rows(x, idx, w, down, up, dy):
      y, vjp_rows = fwd(x, idx, w, down, up, ACT)
      return y, vjp_rows(dy)

    return jax.jit(rows), ("x", "idx", "w", "down", "up", "dy")
  if name == "train":
    def loss(x, w, rows_down, rows_up, inv, dy):
      y = fn(x, inv, w, rows_down, rows_up, ACT)
      return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (
        "x", "w", "rows_down", "rows_up", "inv", "dy")
  if impl != "xla":
    raise ValueError("the scatter pass is XLA's alone")

  def scatter(rows_down, rows_up, inv, grads_down, grads_up):
    flat = inv.reshape(-1)
    return (jnp.zeros_like(rows_down).at[flat].add(grads_down),
            jnp.zeros_like(rows_up).at[flat].add(grads_up))

  return jax.jit(scatter), ("rows_down", "rows_up", "inv", "grads_down", "grads_up")


def min_bytes(bench: BenchConfig, name: str) -> int:
  """The minimum bytes each pass must move (see the module docstring)."""
  it = jnp.dtype(bench.dtype).itemsize
  rows = bench.tokens * bench.slots * bench.width * bench.rank * it  # P rows of one table
  vec = bench.tokens * bench.width * it  # one [T, D] array
  forward = 2 * rows + 2 * vec
  backward = 3 * vec + 2 * rows + 2 * rows
  return {"forward": forward, "rows": forward + backward, "train": forward + backward,
          "scatter": 4 * rows}[name]


def run(bench: BenchConfig) -> tuple[list[dict], float]:
  inputs = make_inputs(bench, jax.random.PRNGKey(0))
  results = []
  for name in bench.passes:
    for impl in bench.impls:
      if name == "scatter" and impl != "xla":
        continue
      fn, names = pass_fn(impl, name, bench)
      seconds = _time(fn, tuple(inputs[n] for n in names), bench)
      results.append({"impl": impl, "pass": name, "seconds": seconds,
                      "bytes": min_bytes(bench, name)})
  return results, copy_bandwidth(bench)


def check(bench: BenchConfig) -> list[str]:
  """Max |impl - ref| / max |ref| per output of forward and train, ref = XLA in float32.

  The kernels' forward reads the [E, ...] table (int64 row offsets at N = 2^20);
  the reference reads the same rows through the unique-rows copy (rows[inv] =
  table[idx]), so no float32 copy of the table is made.
  """
  inputs = make_inputs(bench, jax.random.PRNGKey(1))
  f32 = lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
  sparse = {**inputs, "idx": inputs["inv"], "down": inputs["rows_down"], "up": inputs["rows_up"]}
  lines = []
  for name in ("forward", "train"):
    ref_fn, names = pass_fn("xla", name, bench)
    want = jax.tree.leaves(ref_fn(*(f32(sparse[n]) for n in names)))
    for impl in bench.impls:
      if impl == "xla":
        continue
      fn, _ = pass_fn(impl, name, bench)
      got = jax.tree.leaves(fn(*(inputs[n] for n in names)))
      errs = [float(jnp.abs(g.astype(jnp.float32) - w).max() / jnp.abs(w).max())
              for g, w in zip(got, want)]
      lines.append(f"check {impl} {name}: max |impl - ref| / max |ref| per output"
                   f" {', '.join(f'{e:.1e}' for e in errs)}")
  return lines


def format_table(bench: BenchConfig, results: list[dict], copy_bps: float) -> str:
  dev = jax.devices()[0]
  xla = {r["pass"]: r["seconds"] for r in results if r["impl"] == "xla"}
  lines = [
      f"gather-apply: T={bench.tokens} K={bench.slots} D={bench.width} R={bench.rank}"
      f" N=2^{bench.log2_experts} {bench.dtype}, act=gelu; device {dev.device_kind}"
      f" ({dev.platform}), jax {jax.__version__}",
      f"median of >= {bench.reps} calls (>= {bench.min_seconds:g} s) after {bench.warmup}"
      f" warm-up; device copy"
      f" {copy_bps / 1e9:.1f} GB/s ({bench.copy_mib} MiB, read + write)",
      "",
      "| impl | pass | ms | min MB | GB/s | % copy | vs XLA |",
      "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    bps = r["bytes"] / r["seconds"]
    speedup = xla[r["pass"]] / r["seconds"] if r["pass"] in xla else float("nan")
    lines.append(
        f"| {r['impl']} | {r['pass']} | {1e3 * r['seconds']:.3f} | {r['bytes'] / 1e6:.1f}"
        f" | {bps / 1e9:.2f} | {100 * bps / copy_bps:.0f}% | {speedup:.2f}x |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="sizes and implementations (default: gpu on a GPU, else cpu)")
  parser.add_argument("--impls", help="comma-separated: xla and/or " + ",".join(dispatch.IMPLS[1:]))
  parser.add_argument("--passes", help="comma-separated: " + ",".join(PASSES))
  for field in ("tokens", "slots", "width", "rank", "log2_experts", "reps", "warmup", "copy_mib"):
    parser.add_argument(f"--{field.replace('_', '-')}", type=int)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"))
  parser.add_argument("--triton-blocks", help="dot_block_p,dot_block_d,combine_block_t,"
                      "combine_block_d,num_warps (kernels.gpu.gather_apply.BlockSizes)")
  parser.add_argument("--check", action="store_true", help="also compare with the f32 reference")
  args = parser.parse_args()
  preset = args.preset or ("gpu" if jax.default_backend() in dispatch.GPU_BACKENDS else "cpu")
  overrides = {f: getattr(args, f) for f in ("tokens", "slots", "width", "rank", "log2_experts",
                                             "reps", "warmup", "copy_mib", "dtype")
               if getattr(args, f) is not None}
  if args.impls:
    overrides["impls"] = tuple(args.impls.split(","))
  if args.passes:
    overrides["passes"] = tuple(args.passes.split(","))
  if args.triton_blocks:
    overrides["triton_blocks"] = tuple(int(b) for b in args.triton_blocks.split(","))
  bench = dataclasses.replace(PRESETS[preset], **overrides)
  if args.check:
    print("\n".join(check(bench)))
  print(format_table(bench, *run(bench)))


if __name__ == "__main__":
  main()
