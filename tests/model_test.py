"""Backbone logits against torch `transformers` on real and random checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lamini_jax import hf
from lamini_jax import model as model_lib

ATOL = 1e-4  # float32, as the foundation issue asks


def _torch_logits(tm, tokens):
  with torch.no_grad():
    return tm(torch.tensor(tokens)).logits.double().numpy()


def _random_hf_model(tmp_path, config):
  torch.manual_seed(0)
  tm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():  # norms start at 1: perturb them so a skipped norm weight shows
    for name, p in tm.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  tm.save_pretrained(tmp_path)
  return tm


def _compare(model_dir, tm, tokens):
  cfg, params, _ = hf.load_pretrained(model_dir)
  logits, _ = model_lib.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens))
  ref = _torch_logits(tm, tokens)
  np.testing.assert_allclose(np.asarray(logits, np.float64), ref, atol=ATOL, rtol=0)
  return cfg, params


def test_stories260k_logits_match_transformers(stories_dir, stories_torch, stories_tokenizer):
  text = ["Once upon a time there was a big dog who liked to run in the park with Tim."]
  tokens = stories_tokenizer(text, return_tensors="np").input_ids
  _compare(stories_dir, stories_torch, tokens)


def test_llama3_rope_scaling_gqa_untied_logits(tmp_path):
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=40, intermediate_size=67, num_hidden_layers=3,
      num_attention_heads=5, num_key_value_heads=1, head_dim=12, max_position_embeddings=64,
      rope_theta=10000.0, tie_word_embeddings=False,
      rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
  tm = _random_hf_model(tmp_path, config)
  tokens = np.random.default_rng(1).integers(0, 97, (2, 41))
  cfg, _ = _compare(tmp_path, tm, tokens)
  assert cfg.rope_scaling.rope_type == "llama3" and not cfg.tie_word_embeddings
  assert cfg.head_dim == 12 and cfg.num_groups == 5
  # All three llama3 branches are exercised: unscaled, smoothed and scaled frequencies.
  inv = model_lib.rope_inv_freq(cfg)
  base = 10000.0 ** (-np.arange(0, 12, 2) / 12)
  ratio = base / inv
  assert np.isclose(ratio[0], 1) and np.isclose(ratio[-1], 4) and 1 < ratio[1] < 4


def test_mistral_sliding_window_shorter_than_sequence(tmp_path):
  config = transformers.MistralConfig(
      vocab_size=89, hidden_size=48, intermediate_size=53, num_hidden_layers=2,
      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, sliding_window=5)
  tm = _random_hf_model(tmp_path, config)
  tokens = np.random.default_rng(2).integers(0, 89, (2, 23))
  cfg, params = _compare(tmp_path, tm, tokens)
  assert cfg.sliding_window == 5
  # The window matters here: without it the logits differ.
  logits, _ = model_lib.Transformer(cfg.replace(sliding_window=None)).apply(
      {"params": params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(logits) - _torch_logits(tm, tokens)).max() > 1e-2


def test_kv_cache_prefill_in_chunks_equals_full_forward(stories):
  cfg, params = stories
  m = model_lib.Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, 512, (2, 19)))
  full, _ = m.apply({"params": params}, tokens)
  cache = model_lib.KVCache.empty(cfg, 2, 24)
  parts = []
  for start, stop in ((0, 7), (7, 8), (8, 19)):
    pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    logits, cache = m.apply({"params": params}, tokens[:, start:stop], pos, None, cache)
    parts.append(logits)
  np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=ATOL, rtol=0)
  assert int(cache.end) == 19


def test_bfloat16_compute_stays_close_to_float32(stories, stories_tokenizer):
  cfg, params = stories
  tokens = jnp.asarray(stories_tokenizer(["Once upon a time, Lily saw a cat."]).input_ids)
  ref, _ = model_lib.Transformer(cfg).apply({"params": params}, tokens)
  low, _ = model_lib.Transformer(cfg.replace(compute_dtype="bfloat16")).apply({"params": params}, tokens)
  assert low.dtype == jnp.float32
  err = np.abs(np.asarray(low) - np.asarray(ref)).max()
  assert 0 < err < 0.15 * np.abs(np.asarray(ref)).max()
  assert (np.asarray(low).argmax(-1) == np.asarray(ref).argmax(-1)).mean() > 0.9


def test_every_parameter_has_logical_axes(stories):
  cfg, _ = stories
  specs = model_lib.logical_axes(model_lib.Transformer(cfg))["params"]
  import jax
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: x is None or hasattr(x, "index"))
  assert leaves and all(s is not None and len(s) >= 1 for s in leaves)
  assert tuple(specs["layers_0"]["attn"]["q"]["kernel"]) == ("embed", "q_heads", "head_dim")


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="num_kv_heads"):
    model_lib.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=3, num_kv_heads=2, head_dim=4)
  with pytest.raises(ValueError, match="compute"):
    model_lib.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=2, num_kv_heads=2, head_dim=4, compute_dtype="float16")


def test_bfloat16_einsum_gradients_run_in_bfloat16_and_match_float32():
  import jax
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(7, 2, 3)), jnp.bfloat16)
  loss = lambda dt: lambda x, w: jnp.sum(jnp.sin(model_lib.einsum("BTD,DNH->BTNH", x, w, dt)))
  gx, gw = jax.grad(loss(jnp.bfloat16), argnums=(0, 1))(x, w)
  rx, rw = jax.grad(loss(jnp.float32), argnums=(0, 1))(x, w.astype(jnp.float32))
  assert gx.dtype == jnp.float32 and gw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), atol=0.1, rtol=0.05)
  np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(rw), atol=0.2, rtol=0.05)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(jnp.bfloat16), argnums=(0, 1)))(x, w))
  outputs = [line.split("=")[0].split(":")[1][:4] for line in jaxpr.splitlines() if "dot_general" in line]
  assert outputs.count("f32[") == 1 and outputs.count("bf16") >= 2  # only the forward is f32
