"""Batched decoding with a KV cache: greedy, temperature and nucleus sampling.

    python -m lamini_jax.generate --model ../shared/models/stories260K-hf \
        --prompt "Once upon a time" --max-new-tokens 40

Prompts are left-padded into one batch; prefill and the whole decode loop run
in a single jitted function (a `lax.while_loop` that stops when every row has
emitted an end-of-sequence token).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lamini_jax.config import ModelConfig
from lamini_jax import export
from lamini_jax import hf
from lamini_jax import runs
from lamini_jax.model import KVCache, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """`temperature == 0` is greedy decoding."""

  max_new_tokens: int = 40
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _pick(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p"))
def _generate(model: Transformer, variables: Any, tokens_BxP: jax.Array, mask_BxP: jax.Array,
              key: jax.Array, eos_ids: jax.Array, *, max_new_tokens: int, temperature: float,
              top_p: float) -> jax.Array:
  b, p = tokens_BxP.shape
  cache = KVCache.empty(model.cfg, b, p + max_new_tokens)
  positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
  logits, cache = model.apply(variables, tokens_BxP, positions_BxP, mask_BxP, cache, last_only=True)
  key, sub = jax.random.split(key)
  first = _pick(logits[:, -1], sub, temperature, top_p)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos_ids)
  next_pos = positions_BxP[:, -1] + 1

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, out, done, pos_B, key = state
    last = out[:, step - 1]
    logits, cache = model.apply(variables, last[:, None], pos_B[:, None], None, cache)
    key, sub = jax.random.split(key)
    tok = _pick(logits[:, -1], sub, temperature, top_p)
    tok = jnp.where(done, eos_ids[0], tok)
    out = out.at[:, step].set(tok)
    return step + 1, cache, out, done | jnp.isin(tok, eos_ids), pos_B + 1, key

  state = (jnp.ones((), jnp.int32), cache, out, done, next_pos, key)
  return jax.lax.while_loop(cond, body, state)[2]


def _bucket(n: int, multiple: int = 16) -> int:
  return -(-n // multiple) * multiple


def generate(model: Transformer, variables: Any, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig = SamplingConfig(), pad_id: int = 0) -> list[list[int]]:
  """New tokens for each prompt (token ids), cut before the first end-of-sequence."""
  cfg: ModelConfig = model.cfg
  if not prompts:
    return []
  longest = max(len(p) for p in prompts)
  if any(len(p) == 0 for p in prompts):
    raise ValueError("a prompt is empty: give at least one token (the tokenizer's BOS counts)")
  if longest + sampling.max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(
        f"prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} exceeds the "
        f"model's context of {cfg.max_position_embeddings} tokens")
  width = min(_bucket(longest), cfg.max_position_embeddings - sampling.max_new_tokens)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    mask[i, width - len(p):] = True
  eos = np.asarray(cfg.eos_token_ids or (-1,), np.int32)
  out = np.asarray(_generate(model, variables, jnp.asarray(tokens), jnp.asarray(mask),
                             jax.random.key(sampling.seed), jnp.asarray(eos),
                             max_new_tokens=sampling.max_new_tokens,
                             temperature=float(sampling.temperature), top_p=float(sampling.top_p)))
  results = []
  for row in out.tolist():
    cut = next((i for i, t in enumerate(row) if t in set(eos.tolist())), len(row))
    results.append(row[:cut])
  return results


def generate_text(model: Transformer, variables: Any, tokenizer, prompts: Sequence[str],
                  sampling: SamplingConfig = SamplingConfig(), batch_size: int = 16,
                  progress: bool = False) -> list[str]:
  """Prompt plus completion, decoded, for each prompt string."""
  encoded = [tokenizer(p).input_ids for p in prompts]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  texts = []
  starts: Any = range(0, len(encoded), batch_size)
  if progress and len(encoded) > batch_size:
    starts = tqdm.tqdm(starts, desc="generating", unit="batch")
  for start in starts:
    chunk = encoded[start:start + batch_size]
    for prompt, new in zip(chunk, generate(model, variables, chunk, sampling, pad)):
      texts.append(tokenizer.decode(prompt + new, skip_special_tokens=True))
  return texts


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lamini_jax.generate", description=__doc__.split("\n")[0])
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--model", help="a local Hugging Face directory or hub id: a Llama / Mistral, or a"
                     " lamini-jax export (merged, PEFT adapter or MoME)")
  model.add_argument("--run", type=pathlib.Path, help="a run directory: answer with a model trained there,"
                     " without exporting it first")
  parser.add_argument("--label", help="with --run: which trained model (e.g. mome-random; optional"
                      " when the run holds one)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt")
  source.add_argument("--batch-file", type=pathlib.Path, help="a text file with one prompt per line")
  parser.add_argument("--max-new-tokens", type=int, default=40)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="parameter and matmul dtype (accumulation is always float32)")
  args = parser.parse_args(argv)
  if args.label is not None and args.run is None:
    parser.error("--label picks a trained model of --run; give --run RUN_DIR")
  try:
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.batch_file is not None:
      if not args.batch_file.is_file():
        raise FileNotFoundError(f"--batch-file {args.batch_file} does not exist")
      prompts = [line for line in args.batch_file.read_text().splitlines() if line.strip()]
      if not prompts:
        raise ValueError(f"--batch-file {args.batch_file} holds no prompt")
    else:
      prompts = [args.prompt]
    if args.run is not None:
      trained = runs.load_trained(args.run, args.label)
      model, variables, tokenizer = trained.model, trained.variables, trained.backbone.tokenizer
    else:
      model, variables, model_dir = export.load_export(args.model, args.dtype)
      model = model.clone(cfg=model.cfg.replace(compute_dtype=args.dtype))
      tokenizer = hf.load_tokenizer(model_dir)
    texts = generate_text(model, variables, tokenizer, prompts, sampling, args.batch_size,
                          progress=True)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for text in texts:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
