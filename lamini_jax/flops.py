"""FLOP and MFU accounting of memory-tuning runs on a `lamini_jax.config.ModelConfig`.

FLOP convention (model FLOPs, as used for MFU in PaLM, Chowdhery et al. 2023, app. B;
rematerialisation is not counted). Per token, a matmul weight with P parameters costs
2P forward. Backward costs 2P for the activation gradient, plus 2P for the weight
gradient if the weight trains. So a frozen backbone of N_f matmul parameters and a
trainable part of N_t parameters touched per token cost

    forward 2 (N_f + N_t) + A,   backward 2 N_f + 4 N_t + 2 A,

where A = 4 L T d is the forward attention (scores Q K^T and probs V, full T x T, not
halved for the causal mask, as in PaLM) for L layers, sequence length T and attention
width d = heads * head_dim. Full training (N_f = 0) gives the familiar 6 N per token.
The input embedding is a lookup and is not a matmul parameter; a tied embedding counts
once, as the output head. Tokens are real tokens (packed, no padding).

Runs are priced with the hardware facts of `lamini_jax.paper_cost` (`Cluster`,
`estimate`).
"""

from __future__ import annotations

import dataclasses

from lamini_jax.config import ModelConfig, llama3_8b
from lamini_jax.mome.config import MomeConfig
from lamini_jax.paper_cost import Accelerator, Cluster, Estimate, estimate

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Appendix A run: TruthfulQA has 817 questions (the paper used "a subset", so this is an
# upper bound). 48 tokens per fact: question 15.3 tokens (with BOS) + a random 32-character
# answer 26.4 tokens, measured with the Llama 2 tokenizer, + ~6 template tokens.
TRUTHFULQA_FACTS = 817
TOKENS_PER_FACT = 48


def attention_flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
  """Forward FLOPs of Q K^T and probs V per token: 4 L T d (full T x T, PaLM convention)."""
  return 4.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def model_flops_per_token(frozen_params: float, trainable_params: float = 0.0, *,
                          attention_flops: float = 0.0, backward: bool = True) -> float:
  """Model FLOPs per token for frozen and trainable matmul parameters (module docstring).

  `attention_flops` is the forward attention cost (`attention_flops_per_token`).
  With `backward=False` this is the forward (inference / eval) cost.
  """
  forward = 2.0 * (frozen_params + trainable_params) + attention_flops
  if not backward:
    return forward
  return forward + 2.0 * frozen_params + 4.0 * trainable_params + 2.0 * attention_flops


def mfu(tokens_per_second: float, flops_per_token: float, accelerator: Accelerator,
        count: int = 1) -> float:
  """Model FLOPs utilisation of a measured throughput."""
  return tokens_per_second * flops_per_token / (accelerator.peak_flops_bf16 * count)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(fan_in, fan_out) of each projection of one decoder layer."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}


def llama_matmul_params(cfg: ModelConfig) -> int:
  """Matmul parameters per token: all layers' projections plus the output head."""
  per_layer = sum(i * o for i, o in projection_shapes(cfg).values())
  return cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def lora_params(cfg: ModelConfig, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
  """LoRA parameters: rank x (fan_in + fan_out) per targeted projection per layer."""
  shapes = projection_shapes(cfg)
  unknown = [t for t in targets if t not in shapes]
  if unknown:
    raise ValueError(f"unknown LoRA targets {unknown}; choose from {', '.join(shapes)}")
  return cfg.num_layers * rank * sum(sum(shapes[t]) for t in targets)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A memory-tuning run on a frozen backbone.

  `backbone_params`: frozen matmul parameters per token (see `llama_matmul_params`).
  `trainable_params`: trainable parameters touched per token (LoRA: all adapters; MoME:
  top-K experts x expert size). `router_params`: frozen router / index matmul parameters
  touched per token (MoME), costed like the backbone. `attention_flops`: forward attention
  FLOPs per token. `tokens_per_epoch`: facts x tokens per fact.
  """

  backbone_params: float
  trainable_params: float
  tokens_per_epoch: float
  epochs: float
  router_params: float = 0.0
  attention_flops: float = 0.0

  def __post_init__(self):
    for name in ("backbone_params", "trainable_params", "tokens_per_epoch", "epochs"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"Workload.{name} must be a positive number, got {value!r}")
    if self.router_params < 0 or self.attention_flops < 0:
      raise ValueError(f"Workload.router_params and attention_flops must be >= 0, got "
                       f"{self.router_params!r}, {self.attention_flops!r}")

  @property
  def flops_per_token(self) -> float:
    return model_flops_per_token(self.backbone_params + self.router_params, self.trainable_params,
                                 attention_flops=self.attention_flops)


def memory_tuning_flops(w: Workload) -> float:
  return w.flops_per_token * w.tokens_per_epoch * w.epochs


def price_run(w: Workload, cluster: Cluster) -> Estimate:
  return estimate(memory_tuning_flops(w), cluster)


def llama3_8b_lora_workload(rank: int = 32, facts: int = TRUTHFULQA_FACTS,
                            tokens_per_fact: int = TOKENS_PER_FACT, epochs: float = 100.0) -> Workload:
  """The paper's Appendix A run: Llama 3 8B, LoRA on every projection, 100 epochs."""
  cfg = llama3_8b()
  return Workload(
      backbone_params=llama_matmul_params(cfg), trainable_params=lora_params(cfg, rank),
      tokens_per_epoch=facts * tokens_per_fact, epochs=epochs,
      attention_flops=attention_flops_per_token(cfg, tokens_per_fact))


def mome_router_params(m: MomeConfig) -> int:
  """Router matmul parameters per token: the query D x A x Q, then each head's two
  query halves (C = Q/2 wide) against its I and J sub-keys."""
  n1, n2 = m.grid
  return m.embed_dim * m.num_heads * m.key_dim + m.num_heads * (n1 + n2) * (m.key_dim // 2)


def mome_active_params(m: MomeConfig) -> int:
  """Expert parameters touched per token: K slots x (down D x R + up R x D)."""
  return m.slots * 2 * m.embed_dim * m.expert_rank
