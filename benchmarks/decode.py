"""Tokens per second of greedy decoding through `lamini_jax.generate.generate`.

Models: the pretrained stories260K from `../shared`, and a random
Llama-3-8B-shaped model (`lamini_jax.config.llama3_8b`) cut to 2 layers
(bfloat16 by default). Each (model,
batch) pair runs the library's own path (jitted prefill, then a
`lax.while_loop` of one-token steps over the KV cache) on prompts of fixed
length, with no end-of-sequence id so that every call makes exactly N tokens.
The first call of each length is compile plus one run; then `--repeats` timed
calls alternate between `max_new_tokens=N` and `max_new_tokens=1` (prefill,
first token and the fixed cost of a call), and their medians T(N), T(1) give

  decode step = (T(N) - T(1)) / (N - 1),  decode tokens/s = batch / decode step,
  end-to-end tokens/s = batch * N / T(N).

`generate` returns host lists, so every timed call includes the device sync.

  python -m benchmarks.decode [--models stories,llama3-8b-2l] [--batches 1,16]
      [--new-tokens N] [--prompt-len P] [--repeats 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.config import ModelConfig, llama3_8b
from lamini_jax.generate import SamplingConfig, generate
from lamini_jax import hf
from lamini_jax import model as model_lib

from benchmarks._log import progress

_DTYPES = ("float32", "bfloat16")
# Default (new tokens, prompt length) per model: sized so the whole CPU run takes minutes.
MODEL_DEFAULTS = {"stories": (64, 32), "llama3-8b-2l": (16, 32)}
_REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_STORIES_DIR = _REPO.parent / "shared" / "models" / "stories260K-hf"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """`new_tokens` / `prompt_len` of None take each model's default (MODEL_DEFAULTS)."""

  models: tuple[str, ...] = ("stories", "llama3-8b-2l")
  batches: tuple[int, ...] = (1, 16)
  new_tokens: int | None = None
  prompt_len: int | None = None
  repeats: int = 5
  dtype: str = "bfloat16"  # llama3-8b-2l parameters
  compute_dtype: str | None = None  # llama3-8b-2l matmul inputs; None: same as dtype
  stories_dtype: str = "float32"
  stories_dir: str = str(DEFAULT_STORIES_DIR)
  seed: int = 0

  def __post_init__(self):
    unknown = [m for m in self.models if m not in MODEL_DEFAULTS]
    if not self.models or unknown:
      raise ValueError(f"BenchConfig.models={self.models} must be a non-empty subset of "
                       f"{sorted(MODEL_DEFAULTS)}")
    if not self.batches or min(self.batches) < 1:
      raise ValueError(f"BenchConfig.batches={self.batches} must be non-empty, each >= 1")
    # N >= 2: the decode step is measured as T(N) - T(1).
    if self.new_tokens is not None and self.new_tokens < 2:
      raise ValueError(f"BenchConfig.new_tokens={self.new_tokens} must be >= 2")
    if self.prompt_len is not None and self.prompt_len < 1:
      raise ValueError(f"BenchConfig.prompt_len={self.prompt_len} must be >= 1")
    if self.repeats < 1:
      raise ValueError(f"BenchConfig.repeats={self.repeats} must be >= 1")
    for field in ("dtype", "compute_dtype", "stories_dtype"):
      value = getattr(self, field)
      if value not in _DTYPES and not (field == "compute_dtype" and value is None):
        raise ValueError(f"BenchConfig.{field}={value!r} must be one of {_DTYPES}")

  def sizes(self, name: str) -> tuple[int, int]:
    """(new tokens, prompt length) of one model."""
    new, prompt = MODEL_DEFAULTS[name]
    return self.new_tokens or new, self.prompt_len or prompt


def load_model(name: str, bench: BenchConfig) -> tuple[ModelConfig, dict[str, Any]]:
  """(config, variables) of a benchmark model, with no end-of-sequence id.

  `generate` falls back to eos id -1 when `eos_token_ids` is empty; argmax never
  returns -1, so the decode loop runs all N steps and every row gets N tokens.
  """
  if name == "stories":
    cfg, params, _ = hf.load_pretrained(bench.stories_dir, bench.stories_dtype, bench.stories_dtype)
    variables = {"params": params}
  else:
    cfg = llama3_8b(2, param_dtype=bench.dtype, compute_dtype=bench.compute_dtype or bench.dtype)
    variables = random_variables(model_lib.Transformer(cfg), bench.seed)
  return cfg.replace(eos_token_ids=()), variables


def _chunks(shape: tuple[int, ...], max_elements: int = 2**24) -> int:
  """The fewest slices of axis 0, dividing it evenly, of at most `max_elements` each."""
  rest = int(np.prod(shape[1:]))
  return next((c for c in range(1, shape[0] + 1)
               if shape[0] % c == 0 and shape[0] // c * rest <= max_elements), shape[0])


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(out: jax.Array, x: jax.Array, start: int) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(out, x.astype(out.dtype), start, axis=0)


def random_variables(module: model_lib.Transformer, seed: int) -> dict[str, Any]:
  """Random variables: kernels uniform with std 0.02, norm scales 1.

  Drawn on the host one slice of at most 2**24 values at a time and written in
  place into the (donated) device array, so memory peaks near the weights.
  `model.init_variables` (one jitted init of the whole tree) peaks at 18.6 GB of
  host memory and takes 80 s on a 2-core CPU for the 8B-shaped 2-layer model in
  bfloat16 (3 GB of weights).
  """
  rng = np.random.default_rng(seed)
  half_width = np.float32(0.02 * 3**0.5)
  shapes = nn.meta.unbox(model_lib.abstract_variables(module))
  leaves, treedef = jax.tree.flatten(shapes)
  made = []
  for leaf in leaves:
    if leaf.ndim == 1:
      made.append(jnp.ones(leaf.shape, leaf.dtype))
      continue
    out = jnp.zeros(leaf.shape, leaf.dtype)
    rows = leaf.shape[0] // _chunks(leaf.shape)
    for start in range(0, leaf.shape[0], rows):
      x = rng.random((rows,) + leaf.shape[1:], np.float32)
      x -= 0.5
      x *= 2 * half_width
      out = jax.block_until_ready(_write_rows(out, x, start))
    made.append(out)
  return jax.tree.unflatten(treedef, made)


def random_prompts(cfg: ModelConfig, batch: int, length: int, seed: int) -> list[list[int]]:
  """`batch` prompts of `length` ids: BOS, then uniform ids above the special ones."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.vocab_size, size=(batch, length))
  if cfg.bos_token_id is not None:
    ids[:, 0] = cfg.bos_token_id
  return ids.tolist()


def _timed(fn) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def measure(module: model_lib.Transformer, variables: Any, prompts: list[list[int]],
            new_tokens: int, repeats: int) -> dict[str, float]:
  """Seconds: first calls (compile + run) and medians of the timed calls."""
  full = SamplingConfig(max_new_tokens=new_tokens)
  one = SamplingConfig(max_new_tokens=1)
  progress(f"batch {len(prompts)}: first call, {new_tokens} new tokens (compiles)")
  first_full, out = _timed(lambda: generate(module, variables, prompts, full))
  progress(f"first call {first_full:.1f} s")
  if any(len(row) != new_tokens for row in out):
    raise RuntimeError(f"decoding stopped early: lengths {sorted({len(r) for r in out})}, "
                       f"expected {new_tokens}")
  first_one, _ = _timed(lambda: generate(module, variables, prompts, one))
  full_s, one_s = [], []
  for _ in range(repeats):
    full_s.append(_timed(lambda: generate(module, variables, prompts, full))[0])
    one_s.append(_timed(lambda: generate(module, variables, prompts, one))[0])
  t_full, t_one = statistics.median(full_s), statistics.median(one_s)
  return {"first_full": first_full, "first_one": first_one, "full": t_full, "one": t_one,
          "full_min": min(full_s), "full_max": max(full_s),
          "step": (t_full - t_one) / (new_tokens - 1)}


def run(bench: BenchConfig) -> list[dict[str, Any]]:
  rows = []
  for name in bench.models:
    progress(f"loading {name}")
    cfg, variables = load_model(name, bench)
    module = model_lib.Transformer(cfg)
    new_tokens, prompt_len = bench.sizes(name)
    for batch in bench.batches:
      prompts = random_prompts(cfg, batch, prompt_len, bench.seed)
      dtype = cfg.param_dtype if cfg.param_dtype == cfg.compute_dtype else (
          f"{cfg.param_dtype} params, {cfg.compute_dtype} matmuls")
      rows.append({"model": name, "dtype": dtype, "batch": batch, "prompt": prompt_len,
                   "new": new_tokens,
                   **measure(module, variables, prompts, new_tokens, bench.repeats)})
    del variables
  return rows


def format_table(bench: BenchConfig, rows: list[dict[str, Any]]) -> str:
  dev = jax.devices()[0]
  lines = [
      f"Greedy decoding, lamini_jax.generate; device: {dev.device_kind} ({dev.platform}) "
      f"x{jax.device_count()}, jax {jax.__version__}; median of {bench.repeats} timed calls "
      "after one compile call.",
      "decode tok/s = batch / step; step = (T(N) - T(1)) / (N - 1); T(1) = prefill + first "
      "token + fixed cost of a call;",
      "e2e tok/s = batch * N / T(N); compile = first calls - medians.",
      "",
      "| model | dtype | batch | prompt | new N | decode tok/s | step ms | T(1) ms | e2e tok/s "
      "| T(N) s (min-max) | compile s |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    step = r["step"]
    tps = f"{r['batch'] / step:.1f}" if step > 0 else "n/a"
    compile_s = r["first_full"] - r["full"] + r["first_one"] - r["one"]
    lines.append(
        f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['prompt']} | {r['new']} | {tps} "
        f"| {1e3 * step:.2f} | {1e3 * r['one']:.1f} | {r['batch'] * r['new'] / r['full']:.1f} "
        f"| {r['full']:.3f} ({r['full_min']:.3f}-{r['full_max']:.3f}) | {compile_s:.1f} |")
  return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(s) for s in text.split(",") if s)


def main() -> None:
  d = BenchConfig()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(d.models),
                      help=f"comma-separated, from {','.join(MODEL_DEFAULTS)}")
  parser.add_argument("--batches", default=",".join(map(str, d.batches)))
  parser.add_argument("--new-tokens", type=int, default=None,
                      help="new tokens per row, all models (default: stories 64, llama3-8b-2l 16)")
  parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32)")
  parser.add_argument("--repeats", type=int, default=d.repeats)
  parser.add_argument("--dtype", choices=_DTYPES, default=d.dtype,
                      help="llama3-8b-2l parameter dtype (accumulation is always float32)")
  parser.add_argument("--compute-dtype", choices=_DTYPES, default=None,
                      help="llama3-8b-2l matmul input dtype (default: --dtype)")
  parser.add_argument("--stories-dtype", choices=_DTYPES, default=d.stories_dtype)
  parser.add_argument("--stories-dir", default=d.stories_dir)
  args = parser.parse_args()
  bench = BenchConfig(
      models=tuple(m for m in args.models.split(",") if m), batches=_ints(args.batches),
      new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats,
      dtype=args.dtype, compute_dtype=args.compute_dtype, stories_dtype=args.stories_dtype,
      stories_dir=args.stories_dir)
  print(format_table(bench, run(bench)))


if __name__ == "__main__":
  main()
