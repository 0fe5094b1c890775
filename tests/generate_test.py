"""Decoding: the cached loop against transformers and against a cache-free loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lamini_jax import generate as gen
from lamini_jax import model as model_lib

EXPECTED = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
            "in the park. One day, she saw a big, red ball.")


def _greedy_without_cache(m, variables, prompt, n, width=64):
  """Full forward passes over a right-padded buffer: causal attention ignores the padding."""
  forward = jax.jit(lambda v, t: m.apply(v, t)[0])
  tokens = list(prompt)
  for _ in range(n):
    buffer = np.zeros((1, width), np.int32)
    buffer[0, :len(tokens)] = tokens
    logits = forward(variables, jnp.asarray(buffer))
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_greedy_matches_transformers_generate(stories, stories_torch, stories_tokenizer):
  cfg, params = stories
  m = model_lib.Transformer(cfg)
  prompt = stories_tokenizer("Once upon a time").input_ids
  ours = gen.generate(m, {"params": params}, [prompt], gen.SamplingConfig(max_new_tokens=40))[0]
  ref = stories_torch.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0]
  assert ours == ref[len(prompt):].tolist()
  assert stories_tokenizer.decode(prompt + ours, skip_special_tokens=True) == EXPECTED


def test_cache_equals_no_cache_and_batching_equals_single(stories, stories_tokenizer):
  cfg, params = stories
  m = model_lib.Transformer(cfg)
  prompts = [stories_tokenizer(p).input_ids for p in
             ("The dog", "Lily and Ben went to the park. They saw a", "Tom had a red")]
  sampling = gen.SamplingConfig(max_new_tokens=12)
  batched = gen.generate(m, {"params": params}, prompts, sampling)
  for prompt, got in zip(prompts, batched):
    assert got == _greedy_without_cache(m, {"params": params}, prompt, 12)
    assert got == gen.generate(m, {"params": params}, [prompt], sampling)[0]


def test_sampling_is_seeded_and_top_p_limits_choices(stories, stories_tokenizer):
  cfg, params = stories
  m = model_lib.Transformer(cfg)
  prompt = [stories_tokenizer("Once upon a time").input_ids]
  hot = gen.SamplingConfig(max_new_tokens=20, temperature=1.5, seed=1)
  a = gen.generate(m, {"params": params}, prompt, hot)
  assert a == gen.generate(m, {"params": params}, prompt, hot)
  other = gen.generate(m, {"params": params}, prompt, gen.SamplingConfig(20, 1.5, seed=2))
  assert a != other
  greedy = gen.generate(m, {"params": params}, prompt, gen.SamplingConfig(20))
  narrow = gen.generate(m, {"params": params}, prompt, gen.SamplingConfig(20, 1.5, top_p=1e-6, seed=1))
  assert narrow == greedy


def test_prompt_longer_than_context_is_rejected(stories):
  cfg, params = stories
  with pytest.raises(ValueError, match="exceeds the model's context of 512 tokens"):
    gen.generate(model_lib.Transformer(cfg), {"params": params}, [[1] * 500],
                 gen.SamplingConfig(max_new_tokens=40))


def test_cli_prints_the_reference_story(stories_dir, capsys, tmp_path):
  assert gen.main(["--model", str(stories_dir), "--prompt", "Once upon a time",
                   "--max-new-tokens", "40"]) == 0
  assert capsys.readouterr().out.strip() == EXPECTED
  batch = tmp_path / "prompts.txt"
  batch.write_text("Once upon a time\n\nThe cat\n")
  assert gen.main(["--model", str(stories_dir), "--batch-file", str(batch),
                   "--max-new-tokens", "40", "--dtype", "bfloat16"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and lines[1].startswith("The cat")
  assert gen.main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
  assert "does not exist" in capsys.readouterr().err
