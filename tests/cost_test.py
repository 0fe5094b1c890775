"""Compute model: every expected figure is recomputed here by plain arithmetic."""

import dataclasses
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from experiments import compute_cost
from lamini_jax import config
from lamini_jax import cost


def _close(got, want, rel=1e-12):
  assert got == pytest.approx(want, rel=rel), (got, want)


def test_paper_scenario_matches_hand_arithmetic():
  e = cost.paper_scenario(cost.Assumptions())
  n = 400e9
  flops = 6 * n * (20 * n) * 100                          # 6 N D epochs, D = 20 N
  _close(e.flops, 1.92e27)
  _close(e.flops, flops)
  gpu_s = flops / (1307.4e12 * 0.45)                      # MI300X dense bf16 at 45% MFU
  _close(e.accelerator_seconds, gpu_s)
  _close(e.wall_seconds, gpu_s / 350_000)
  assert 107.9 < e.wall_seconds / 86_400 < 108.0          # 9.3245e6 s
  _close(e.avg_power_mw, 350_000 * 750 * 1.2 / 1e6)       # 315 MW with PUE 1.2
  kwh = 350_000 * 750 * 1.2 / 1000 * (gpu_s / 350_000) / 3600
  _close(e.energy_kwh, kwh)
  _close(e.energy_usd, kwh * 0.09)
  _close(e.co2_t, kwh * 0.394 / 1000)
  _close(e.household_years, kwh * 0.394 / 1000 / 7.94)
  assert e.rental_usd is None


def test_estimate_on_an_odd_cluster():
  acc = cost.Accelerator("odd", peak_flops_bf16=123e12, power_watts=321.0, source="test")
  c = cost.Cluster(accelerator=acc, count=7, mfu=0.37, pue=1.13, usd_per_kwh=0.11, kg_co2_per_kwh=0.5,
                   household_t_co2_per_year=6.1, usd_per_accelerator_hour=2.5)
  e = cost.estimate(1.7e20, c)
  gpu_s = 1.7e20 / (123e12 * 0.37)
  kwh = 321 * 1.13 * gpu_s / 3600 / 1000
  _close(e.wall_seconds, gpu_s / 7)
  _close(e.avg_power_mw, 7 * 321 * 1.13 / 1e6)
  _close(e.energy_usd, kwh * 0.11)
  _close(e.household_years, kwh * 0.5 / 1000 / 6.1)
  _close(e.rental_usd, gpu_s / 3600 * 2.5)
  no_power = cost.estimate(1.7e20, dataclasses.replace(c, accelerator=cost.accelerator("tpu v5p")))
  assert no_power.energy_kwh is None and no_power.household_years is None
  _close(no_power.wall_seconds, 1.7e20 / (459e12 * 0.37) / 7)
  _close(cost.estimate(1.7e20, dataclasses.replace(c, watts=500.0)).avg_power_mw, 7 * 500 * 1.13 / 1e6)


def test_compare_against_the_papers_figures():
  rows = {r.quantity: r for r in cost.compare(cost.Assumptions())}
  flops = rows["total training FLOPs"]
  assert flops.paper == 3.43e24
  _close(flops.ratio, 1.92e27 / 3.43e24)
  months = rows["wall time (months)"]
  _close(months.model, 1.92e27 / (350_000 * 1307.4e12 * 0.45) / 86_400 / 30)
  energy = rows["energy (GWh; paper's = power x time)"]
  _close(energy.paper, 350e3 * 90 * 24 / 1e6)             # 756 GWh
  _close(rows["cost of power ($M)"].paper, 68.0)
  _close(rows["US household-years of CO2"].paper, 62_000)


def test_findings_flag_the_inconsistencies():
  text = "\n".join(cost.findings(cost.Assumptions()))
  assert f"{1.92e27 / 3.43e24:.0f}x smaller" == "560x smaller"
  assert "560x smaller" in text and "1.92e+27" in text
  assert "10^3 times the printed figure" in text           # 3.43e27 = 6 * 520e9 * 11e12 * 100
  assert "4.6 hours" in text                               # 3.43e24 / (350000 * 1307.4e12 * .45) s
  assert f"{3.43e24 / (350_000 * 1307.4e12 * 0.45) / 3600:.1f} hours" == "4.6 hours"
  assert "1,000 W each" in text and "1.33" in text         # 350 MW / 350k GPUs vs 750 W
  assert f"${350e3 * 90 * 24 * 0.09 / 1e6:.1f}M" in text   # $68.0M
  implied = 62_000 * 7.94 / (350e3 * 90 * 24) * 1e3        # kg CO2/kWh that gives 62,000 homes
  assert f"{implied:.3f} kg CO2/kWh" in text
  # With the FLOPs made consistent the FLOPs finding reports agreement (ratio 1).
  n = (3.43e24 / 6 / 20 / 100) ** 0.5
  text = cost.findings(cost.Assumptions(params=n))[0]
  assert "agrees with" in text and "smaller" not in text


def test_lora_and_backbone_counts_of_llama3_8b():
  s = cost.LLAMA3_8B
  d, f, kv = 4096, 14336, 8 * 128
  per_layer = (d + d) + (d + kv) + (d + kv) + (d + d) + 3 * (d + f)
  assert cost.lora_params(s, 32) == 32 * 32 * per_layer == 83_886_080
  assert cost.lora_params(s, 8, targets=("q", "v")) == 32 * 8 * ((d + d) + (d + kv))
  matmul = 32 * (d * d + 2 * d * kv + d * d + 3 * d * f) + 128_256 * d
  assert cost.llama_matmul_params(s) == matmul
  with pytest.raises(ValueError, match="unknown LoRA targets"):
    cost.lora_params(s, 32, targets=("qkv",))


def test_lora_count_matches_peft_on_a_meta_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  s = cost.LLAMA3_8B
  hf = transformers.LlamaConfig(
      vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
      num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, tie_word_embeddings=False)
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(hf)
  total = sum(p.numel() for p in model.parameters())
  assert total == 8_030_261_248
  norms = (2 * s.num_layers + 1) * s.hidden_size
  assert cost.llama_matmul_params(s) == total - s.vocab_size * s.hidden_size - norms
  targets = [f"{t}_proj" for t in ("q", "k", "v", "o", "gate", "up", "down")]
  lora = peft.get_peft_model(model, peft.LoraConfig(r=32, target_modules=targets))
  n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
  assert cost.lora_params(s, 32) == n_lora


def test_matmul_params_of_a_real_checkpoint_with_its_model_config(stories_dir):
  # Takes lamini_jax.config.ModelConfig as is; the tied embedding counts once, as the head.
  cfg = config.ModelConfig.from_hf_dict(json.loads((stories_dir / "config.json").read_text()))
  tensors = {}
  for f in sorted(stories_dir.glob("*.safetensors")):
    tensors.update(safetensors.numpy.load_file(f))
  total = sum(v.size for v in tensors.values())
  norms = sum(v.size for k, v in tensors.items() if k.endswith("norm.weight"))
  assert total == 260_032 and cfg.tie_word_embeddings
  assert cost.llama_matmul_params(cfg) == total - norms
  lora_by_hand = sum(t.shape[0] + t.shape[1] for k, t in tensors.items()
                     if k.endswith("proj.weight")) * 3        # rank 3 on every projection
  assert cost.lora_params(cfg, 3) == lora_by_hand


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
  got = cost.model_flops_per_token(n_frozen, n_train,
                                   attention_flops=cost.attention_flops_per_token(1, t, q_dim))
  assert got * b * t == traced
  forward = _dot_flops(jax.make_jaxpr(loss)(lora, w(b, t, d)).jaxpr)
  assert forward == b * t * cost.model_flops_per_token(
      n_frozen, n_train, attention_flops=4 * t * q_dim, backward=False)


def test_full_training_is_six_n_and_mfu_inverts_it():
  assert cost.model_flops_per_token(0, 1e9) == 6e9
  assert cost.training_flops(1e9, 2e10) == 6e9 * 2e10
  h100 = cost.accelerator("H100-SXM")
  _close(cost.mfu(1000.0, 6e9, h100, count=8), 1000 * 6e9 / (8 * 989.4e12))


def test_memory_tuning_price_of_the_appendix_a_run():
  w = cost.llama3_8b_lora_workload()
  n_f, n_t = cost.llama_matmul_params(cost.LLAMA3_8B), 83_886_080
  per_token = 4 * n_f + 6 * n_t + 3 * 4 * 32 * 48 * 4096
  _close(w.flops_per_token, per_token)
  _close(cost.memory_tuning_flops(w), per_token * 817 * 48 * 100)
  c = cost.Cluster(accelerator=cost.accelerator("mi300x"), count=8, mfu=0.45)
  _close(cost.price_run(w, c).wall_seconds, per_token * 817 * 48 * 100 / (8 * 1307.4e12 * 0.45))
  moe = cost.Workload(7e9, 3e6, 1e5, 10, router_params=2e6)
  _close(cost.memory_tuning_flops(moe), (4 * (7e9 + 2e6) + 6 * 3e6) * 1e5 * 10)


@pytest.mark.parametrize("bad, match", [
    (dict(mfu=1.5), "Cluster.mfu"), (dict(count=0), "Cluster.count"), (dict(pue=0.9), "Cluster.pue"),
    (dict(usd_per_kwh=-1.0), "Cluster.usd_per_kwh")])
def test_validation_names_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    cost.Cluster(**bad)
  with pytest.raises(ValueError, match="Workload.epochs"):
    cost.Workload(1e9, 1e6, 1e4, 0)
  with pytest.raises(ValueError, match="unknown accelerator 'B300'"):
    cost.accelerator("B300")


def test_cli_prints_the_papers_figures_and_a_price(capsys):
  assert compute_cost.main([]) == 0
  out = capsys.readouterr().out
  for figure in ("3.43e+24", "| 350 |", "| 68 |", "6.2e+04", "1307.4 TFLOP/s", "0.394 kg/kWh",
                 "| pue | 1.2 |", "Findings", "560x smaller"):
    assert figure in out, figure
  assert "Price of a memory-tuning run" not in out
  assert compute_cost.main(["--llama3-8b-lora", "--accelerator", "H100", "--usd-per-gpu-hour", "3",
                            "--pue", "1.5"]) == 0
  out = capsys.readouterr().out
  assert "8 x H100 at 45% MFU" in out and "| pue | 1.5 | set by the user |" in out
  per_token = 4 * cost.llama_matmul_params(cost.LLAMA3_8B) + 6 * 83_886_080 + 12 * 32 * 48 * 4096
  flops = per_token * 817 * 48 * 100
  assert f"| FLOPs | {flops:.3g} |" in out
  assert f"| rental ($) | {flops / (989.4e12 * 0.45) / 3600 * 3:.3g} |" in out
  with pytest.raises(SystemExit):
    compute_cost.main(["--backbone-params", "8e9"])
