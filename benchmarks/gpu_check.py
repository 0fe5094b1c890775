"""Every GPU check of the project in one run, for a session that is lent a GPU for a few minutes.

    python -m benchmarks.gpu_check [--out DIR]      # on the GPU machine, from the repo root
    python -m benchmarks.gpu_check --smoke           # the same steps, tiny, on a CPU (tests the script)

Writes DIR/gpu_check.md (default `$OUT`, else `gpu_check_out/`): one table of steps with their
status and seconds, then each step's last output lines; every step's full log is beside it. Steps,
each in its own process with its own time limit (about 15 minutes at most;
`--steps` runs some of them):

  1. environment: devices, jax/jaxlib, whether jax-triton imports, which kernel `auto` takes;
  2. kernels: forward and `jax.vjp` (dx, dw, d down, d up) of every gather-and-apply kernel the
     backend has, against float32 math on the same inputs, float32 and bfloat16, with duplicate
     indices, the XLA gather + einsum's error beside it (`kernel_check` below);
  3. the scatter-add hazard: jaxlib 0.10.2 to 0.11.0 compile a float32 scatter-add under index
     contention (the expert table's backward) to a compare-and-swap loop on NVIDIA GPUs,
     reported 450-2000x slower (openxla/xla#46225, jax-ml/jax#38806); timed alone, without and
     with the LLVM option `-nvptx-allow-ftz-atomics` passed through XLA_FLAGS
     (`--xla_backend_extra_options=...`, the reported workaround), each in a fresh process
     since XLA reads XLA_FLAGS once;
  4. `benchmarks.gather_apply --preset gpu --check`; `benchmarks.train_step` at Llama 3 8B's
     shapes for MoME (the XLA gather + einsum, which `auto` takes, then Triton) and LoRA;
     `benchmarks.mome_step --config` at 2^10 and 2^20 (needs ../shared); `benchmarks.decode`.

The machine may lack packages the project needs (`datasets`, `jax-triton`): carry them as wheels
(see the device tool's README) and install them before this script; it reports what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax_kernels import dispatch
from lamini_jax_kernels import gather_apply as ga

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKAROUND = "--xla_backend_extra_options=-nvptx-allow-ftz-atomics"  # an LLVM option, through XLA
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # relative to the largest reference magnitude


@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  argv: tuple[str, ...]
  limit_s: int
  env: tuple[tuple[str, str], ...] = ()


def kernel_check(smoke: bool) -> int:
  """Forward and vjp of every kernel the backend has against the reference; prints a table."""
  backend = jax.default_backend()
  native = "triton" if backend in dispatch.GPU_BACKENDS else "pallas" if backend == "tpu" else None
  impls = [native] if native is not None and _runs(native) else []
  if native is not None and not impls:
    print(f"{native}: does not run here ({dispatch.explain('auto')[1]}); no native kernel checked")
  if not impls:  # the same kernels in TPU interpret mode, small, so the script has something to check
    impls, smoke = ["pallas_interpret"], True
  t, k, d, log2_e = (9, 4, 16, 6) if smoke else (257, 32, 512, 14)
  failures = 0
  print("max |impl - f32| / max |f32|: float32 math on the same inputs; `xla err`: the XLA gather +"
        " einsum in the same dtype, beside it")
  print(f"{'impl':<17} {'dtype':<9} {'rank':>4} {'output':<6} {'max rel err':>12} {'xla err':>9}  ok")
  for impl in impls:
    fn = dispatch.get_gather_apply(impl)
    for dtype in ("float32", "bfloat16"):
      for rank in (1, 4):
        errs = _errors(fn, t, k, d, rank, 2**log2_e, jnp.dtype(dtype))
        for out, (err, xla_err) in errs.items():
          # In bfloat16 the table gradients of both sum their duplicate rows with XLA's bfloat16
          # scatter-add: the kernel is held to the tolerance, or to 1.5x XLA's own error.
          ok = err <= TOLERANCE[dtype] or dtype == "bfloat16" and err <= 1.5 * xla_err
          failures += not ok
          print(f"{impl:<17} {dtype:<9} {rank:>4} {out:<6} {err:>12.2e} {xla_err:>9.2e}"
                f"  {'yes' if ok else 'NO'}")
  print(f"{failures} failure(s)")
  return 1 if failures or native is not None and native not in impls else 0


def _runs(impl: str) -> bool:
  try:
    dispatch.get_gather_apply(impl)
    return True
  except ImportError:
    return False


def _errors(fn, t, k, d, rank, experts, dtype) -> dict[str, tuple[float, float]]:
  """{output: (the kernel's error, XLA's error)}, each the max abs difference from float32 math on
  the same (rounded) inputs, over the largest magnitude of that float32 result.

  In bfloat16 the table gradients sum hundreds of duplicate-index terms per row: XLA's bfloat16
  scatter-add rounds at every add, so a bfloat16 reference is not the truth to compare with."""
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (t, d), dtype)
  idx = jax.random.randint(keys[1], (t, k), 0, 8).at[:, : k // 2].set(  # duplicates, within and
      jax.random.randint(keys[2], (t, k // 2), 0, experts))               # across tokens
  w = jax.random.uniform(keys[3], (t, k), dtype)
  down = (jax.random.normal(keys[4], (experts, d, rank)) * d**-0.5).astype(dtype)
  up = (jax.random.normal(keys[4], (experts, rank, d)) * rank**-0.5).astype(dtype)
  dy = jax.random.normal(keys[2], (t, d), dtype)
  f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)

  def outputs(f, x, w, down, up, dy):
    y, vjp = jax.vjp(lambda x, w, down, up: f(x, idx, w, down, up, jax.nn.gelu), x, w, down, up)
    return (y, *vjp(dy))

  args = (x, w, down, up, dy)
  got = jax.jit(lambda: outputs(fn, *args))()
  xla = jax.jit(lambda: outputs(ga.gather_apply_reference, *args))()
  truth = jax.jit(lambda: outputs(ga.gather_apply_reference, *f32(args)))()

  def err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / (jnp.max(jnp.abs(b)) + 1e-30))

  names = ("y", "dx", "dw", "ddown", "dup")
  return {n: (err(a, c), err(b, c)) for n, a, b, c in zip(names, got, xla, truth)}


def scatter_time(smoke: bool) -> int:
  """Median ms of a float32 scatter-add of T*K rows into an [E, D] table under index contention."""
  rows, experts, d = (512, 64, 16) if smoke else (4096 * 32, 2**20, 64)
  table = jnp.zeros((experts, d), jnp.float32)
  for contention, high in (("uniform over the table", experts), ("all rows into 8 experts", 8)):
    idx = jax.random.randint(jax.random.key(0), (rows,), 0, high)
    upd = jnp.ones((rows, d), jnp.float32)
    f = jax.jit(lambda tbl, i, u: tbl.at[i].add(u))
    jax.block_until_ready(f(table, idx, upd))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(f(table, idx, upd))
      times.append(time.perf_counter() - start)
    print(f"scatter-add {rows} x {d} f32 rows, {contention}: {1e3 * np.median(times):.3f} ms"
          f" (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
  return 0


def _steps(smoke: bool) -> list[Step]:
  py = (sys.executable,)
  me = py + ("-m", "benchmarks.gpu_check")
  flags = os.environ.get("XLA_FLAGS", "")
  steps = [
      Step("environment", py + ("-c", _ENV), 60),
      Step("kernels", me + ("--kernel-check",) + (("--smoke",) if smoke else ()), 150),
      Step("scatter-add", me + ("--scatter",) + (("--smoke",) if smoke else ()), 60),
      Step("scatter-add workaround", me + ("--scatter",) + (("--smoke",) if smoke else ()), 60,
           (("XLA_FLAGS", f"{flags} {WORKAROUND}".strip()),)),
  ]
  if smoke:
    return steps + [Step("gather_apply", py + ("-m", "benchmarks.gather_apply", "--preset", "cpu",
                                               "--reps", "1", "--warmup", "1"), 120)]
  shared = (REPO.parent / "shared" / "models" / "stories260K-hf").is_dir()
  steps += [Step("gather_apply", py + ("-m", "benchmarks.gather_apply", "--preset", "gpu", "--check"),
                 90)]
  mome = py + ("-m", "benchmarks.train_step", "--method", "mome", "--layers", "8", "--batch", "32",
               "--steps", "5", "--experts", str(2**20))
  steps += [  # the step timings first: with `--steps`, a short lease runs the most wanted ones
      Step("train_step mome xla", mome + ("--gather-apply", "reference"), 100),  # what auto takes
      Step("train_step mome triton", mome + ("--gather-apply", "triton"), 100),
      Step("train_step lora", py + ("-m", "benchmarks.train_step", "--method", "lora", "--layers", "8",
                                    "--batch", "32", "--steps", "5"), 120),
  ]
  if shared:
    steps.append(Step("mome_step", py + ("-m", "benchmarks.mome_step", "--config",
                                         "configs/randomization_cpu.yaml", "--sizes", "10,20",
                                         "--reps", "5", "--dense-reps", "2"), 240))
  steps.append(Step("decode", py + ("-m", "benchmarks.decode", "--models", "llama3-8b-2l",
                                    "--dtype", "bfloat16"), 200))
  return steps


_ENV = """
import importlib.util, jax, jaxlib
from lamini_jax_kernels import dispatch
print("devices:", jax.devices())
print("jax", jax.__version__, "jaxlib", jaxlib.__version__)
for name in ("jax_triton", "triton", "datasets", "transformers", "torch"):
  print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
print("gather-apply auto:", dispatch.explain("auto"))
"""


def run_all(out: pathlib.Path, smoke: bool, only: tuple[str, ...] = ()) -> int:
  steps = _steps(smoke)
  unknown = sorted(set(only) - {s.name for s in steps})
  if unknown:
    raise SystemExit(f"--steps: no step named {unknown}; steps: {', '.join(s.name for s in steps)}")
  out.mkdir(parents=True, exist_ok=True)
  rows, tails = [], []
  for step in (s for s in steps if not only or s.name in only):
    log = out / (step.name.replace(" ", "_").replace("-", "_") + ".log")
    # Offline unless told otherwise: the steps read local files only, and a lent GPU machine
    # reaches no hub (a lookup there waits out its timeouts).
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1",
           **dict(step.env)}
    start = time.perf_counter()
    with log.open("w") as sink:  # streamed, so a step that times out keeps what it printed
      try:
        done = subprocess.run(step.argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                              timeout=step.limit_s)
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
      except subprocess.TimeoutExpired:
        status = f"timed out ({step.limit_s} s)"
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    rows.append(f"| {step.name} | {status} | {seconds:.0f} | {last[:120].replace('|', '/')} |")
    env_note = f"  (env {dict(step.env)})" if step.env else ""
    tails.append(f"### {step.name}\n\n`{' '.join(step.argv[1:])}`{env_note}\n\n```\n"
                 + "\n".join(text.splitlines()[-30:]) + "\n```\n")
    print(rows[-1], flush=True)
  report = ["# GPU check" + (" (smoke run on a CPU)" if smoke else ""), "",
            f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
            "", "| step | status | s | last line |", "| --- | --- | ---: | --- |", *rows, "", *tails]
  (out / "gpu_check.md").write_text("\n".join(report))
  print(f"wrote {out / 'gpu_check.md'}")
  return 0 if all("| ok |" in r for r in rows) else 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(os.environ.get("OUT", "gpu_check_out")))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU-only steps")
  parser.add_argument("--steps", default="",
                      help="comma-separated step names to run (default: all), e.g. 'kernels,decode'")
  parser.add_argument("--kernel-check", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--scatter", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.kernel_check:
    return kernel_check(args.smoke)
  if args.scatter:
    return scatter_time(args.smoke)
  if importlib.util.find_spec("lamini_jax") is None:
    print("lamini_jax does not import: `pip install --no-deps --no-build-isolation -e .` first")
    return 2
  return run_all(args.out, args.smoke, tuple(n.strip() for n in args.steps.split(",") if n.strip()))


if __name__ == "__main__":
  sys.exit(main())
