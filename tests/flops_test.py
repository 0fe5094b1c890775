"""FLOP and MFU accounting: every expected figure is recomputed here by plain arithmetic."""

import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from lamini_jax import config
from lamini_jax import flops
from lamini_jax import paper_cost


def _close(got, want, rel=1e-12):
  assert got == pytest.approx(want, rel=rel), (got, want)


def test_llama3_8b_preset_matches_metas_config():
  # meta-llama/Meta-Llama-3-8B config.json, field by field.
  meta = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
          "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
          "hidden_act": "silu", "model_type": "llama"}
  hf = config.llama3_8b().to_hf_dict()
  assert {k: hf[k] for k in meta} == meta
  assert hf["head_dim"] == 4096 // 32
  cut = config.llama3_8b(2, param_dtype="bfloat16")
  assert (cut.num_layers, cut.param_dtype, cut.compute_dtype) == (2, "bfloat16", "float32")
  assert cut.replace(num_layers=32, param_dtype="float32") == config.llama3_8b()
  with pytest.raises(ValueError, match="ModelConfig.num_layers"):
    config.llama3_8b(0)


def test_lora_and_backbone_counts_of_llama3_8b():
  cfg = config.llama3_8b()
  d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
  per_layer = (d + d) + (d + kv) + (d + kv) + (d + d) + 3 * (d + f)
  assert flops.lora_params(cfg, 32) == 32 * 32 * per_layer == 83_886_080  # peft's count
  assert flops.lora_params(cfg, 8, targets=("q", "v")) == 32 * 8 * ((d + d) + (d + kv))
  matmul = 32 * (d * d + 2 * d * kv + d * d + 3 * d * f) + cfg.vocab_size * d
  assert flops.llama_matmul_params(cfg) == matmul
  with pytest.raises(ValueError, match="unknown LoRA targets"):
    flops.lora_params(cfg, 32, targets=("qkv",))


def test_lora_count_matches_peft_on_a_meta_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  cfg = config.llama3_8b()
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, tie_word_embeddings=False)
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(hf)
  total = sum(p.numel() for p in model.parameters())
  assert total == 8_030_261_248                           # Meta's published count
  norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
  assert flops.llama_matmul_params(cfg) == total - cfg.vocab_size * cfg.hidden_size - norms
  targets = [f"{t}_proj" for t in flops.LORA_TARGETS]
  lora = peft.get_peft_model(model, peft.LoraConfig(r=32, target_modules=targets))
  n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
  assert flops.lora_params(cfg, 32) == n_lora


def test_matmul_params_of_a_real_checkpoint_with_its_model_config(stories_dir):
  # The tied embedding counts once, as the head.
  cfg = config.ModelConfig.from_hf_dict(json.loads((stories_dir / "config.json").read_text()))
  tensors = {}
  for f in sorted(stories_dir.glob("*.safetensors")):
    tensors.update(safetensors.numpy.load_file(f))
  total = sum(v.size for v in tensors.values())
  norms = sum(v.size for k, v in tensors.items() if k.endswith("norm.weight"))
  assert total == 260_032 and cfg.tie_word_embeddings
  assert flops.llama_matmul_params(cfg) == total - norms
  lora_by_hand = sum(t.shape[0] + t.shape[1] for k, t in tensors.items()
                     if k.endswith("proj.weight")) * 3        # rank 3 on every projection
  assert flops.lora_params(cfg, 3) == lora_by_hand


def _dot_flops(jaxpr) -> int:
  """2 x (output elements) x (contracted size) summed over every dot_general, recursively."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      k = int(np.prod([eqn.invars[0].aval.shape[i] for i in lhs_contract]))
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _dot_flops(sub)
  return total


def test_flop_convention_matches_a_traced_lora_step():
  # One attention layer and one MLP with frozen weights, LoRA on q, v and up; odd sizes.
  b, t, d, h, r, f = 2, 7, 13, 3, 3, 19                   # h heads of width d_h = 5
  dh = 5
  q_dim = h * dh
  cfg = config.ModelConfig(vocab_size=11, hidden_size=d, intermediate_size=f, num_layers=1,
                           num_heads=h, num_kv_heads=h, head_dim=dh)
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  frozen = {"q": w(d, q_dim), "k": w(d, q_dim), "v": w(d, q_dim), "o": w(q_dim, d),
            "up": w(d, f), "down": w(f, d)}
  lora = {n: (w(i, r), w(r, o)) for n, (i, o) in
          {"q": (d, q_dim), "v": (d, q_dim), "up": (d, f)}.items()}

  def loss(lora, x_BxTxD):
    def proj(name, x):
      y = x @ frozen[name]
      if name in lora:
        a, bb = lora[name]
        y = y + (x @ a) @ bb
      return y
    q = proj("q", x_BxTxD).reshape(b, t, h, dh)
    k = proj("k", x_BxTxD).reshape(b, t, h, dh)
    v = proj("v", x_BxTxD).reshape(b, t, h, dh)
    probs = jax.nn.softmax(jnp.einsum("bthe,bshe->bhts", q, k), axis=-1)
    x = x_BxTxD + proj("o", jnp.einsum("bhts,bshe->bthe", probs, v).reshape(b, t, q_dim))
    return jnp.sum(proj("down", jax.nn.relu(proj("up", x))))

  # Differentiating x too asks for the first layer's input gradient, as the convention counts it.
  traced = _dot_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(lora, w(b, t, d)).jaxpr)
  n_frozen = 3 * d * q_dim + q_dim * d + 2 * d * f
  n_train = 2 * (d * r + r * q_dim) + (d * r + r * f)
  per_token = (2 * (n_frozen + n_train) + 4 * t * q_dim    # forward
               + 2 * n_frozen + 4 * n_train + 8 * t * q_dim)  # backward
  assert traced == b * t * per_token
  attention = flops.attention_flops_per_token(cfg, t)
  assert attention == 4 * t * q_dim
  got = flops.model_flops_per_token(n_frozen, n_train, attention_flops=attention)
  assert got * b * t == traced
  forward = _dot_flops(jax.make_jaxpr(loss)(lora, w(b, t, d)).jaxpr)
  assert forward == b * t * flops.model_flops_per_token(
      n_frozen, n_train, attention_flops=attention, backward=False)


def test_full_training_is_six_n_and_mfu_inverts_it():
  assert flops.model_flops_per_token(0, 1e9) == 6e9
  assert flops.model_flops_per_token(0, 1e9) * 2e10 == paper_cost.training_flops(1e9, 2e10)
  h100 = paper_cost.accelerator("H100-SXM")
  _close(flops.mfu(1000.0, 6e9, h100, count=8), 1000 * 6e9 / (8 * 989.4e12))


def test_memory_tuning_price_of_the_appendix_a_run():
  w = flops.llama3_8b_lora_workload()
  n_f, n_t = flops.llama_matmul_params(config.llama3_8b()), 83_886_080
  per_token = 4 * n_f + 6 * n_t + 3 * 4 * 32 * 48 * 4096
  _close(w.flops_per_token, per_token)
  _close(flops.memory_tuning_flops(w), per_token * 817 * 48 * 100)
  c = paper_cost.Cluster(accelerator=paper_cost.accelerator("mi300x"), count=8, mfu=0.45)
  _close(flops.price_run(w, c).wall_seconds, per_token * 817 * 48 * 100 / (8 * 1307.4e12 * 0.45))
  moe = flops.Workload(7e9, 3e6, 1e5, 10, router_params=2e6)
  _close(flops.memory_tuning_flops(moe), (4 * (7e9 + 2e6) + 6 * 3e6) * 1e5 * 10)


def test_workload_validation_names_the_field():
  with pytest.raises(ValueError, match="Workload.epochs"):
    flops.Workload(1e9, 1e6, 1e4, 0)
  with pytest.raises(ValueError, match="Workload.router_params"):
    flops.Workload(1e9, 1e6, 1e4, 1, router_params=-1.0)
