"""Model configuration: one frozen dataclass for the Llama / Mistral family.

`ModelConfig.from_hf_dict` reads a Hugging Face `config.json`; `to_hf_dict` writes
one that `transformers` loads. Errors name the field and the value that is wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ROPE_TYPES = ("default", "linear", "llama3")


def dtype_of(name: str, field: str = "dtype"):
  """Maps a dtype name of a config to the jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"{field} must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (`rope_parameters` / `rope_scaling` in HF configs)."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in _ROPE_TYPES:
      raise ValueError(
          f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    if self.factor <= 0:
      raise ValueError(f"rope factor must be > 0, got {self.factor}")
    if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
          f"llama3 rope needs high_freq_factor > low_freq_factor, got "
          f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Llama-family transformer.

  `param_dtype` is the storage dtype of the weights; `compute_dtype` the dtype of
  matmul inputs. Matmuls always accumulate in float32 and the residual stream is
  float32, so `compute_dtype="bfloat16"` is "bf16 multiplication, f32 accumulation".
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  architecture: str = "llama"
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  compute_dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
          f"num_kv_heads ({self.num_kv_heads})")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
          f"ModelConfig.architecture {self.architecture!r} is not supported; "
          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"ModelConfig.sliding_window must be positive or None, got {self.sliding_window}")
    dtype_of(self.param_dtype, "ModelConfig.param_dtype")
    dtype_of(self.compute_dtype, "ModelConfig.compute_dtype")

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dictionary."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
          f"{source}: model_type {model_type!r} is not supported; lamini-jax supports "
          f"{', '.join(SUPPORTED_ARCHITECTURES)} (LlamaForCausalLM, MistralForCausalLM)")
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise ValueError(f"{source}: {flag}=true is not supported (Llama and Mistral use no biases)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: hidden_act {act!r} is not supported; only 'silu'")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = set(rope) - known
    if unknown:
      raise ValueError(f"{source}: unsupported rope parameters {sorted(unknown)}")
    eos = hf.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        rope_scaling=RopeScaling(rope_type=rope_type, **rope),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        architecture=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The Hugging Face `config.json` of this model."""
    rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
    if self.rope_scaling.rope_type == "linear":
      rope["factor"] = self.rope_scaling.factor
    elif self.rope_scaling.rope_type == "llama3":
      rope.update({f.name: getattr(self.rope_scaling, f.name)
                   for f in dataclasses.fields(RopeScaling) if f.name != "rope_type"})
    cls_name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.architecture]
    eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
    out = {
        "architectures": [cls_name],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "hidden_act": "silu",
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": self.param_dtype,
    }
    if self.rope_scaling.rope_type != "default":
      out["rope_scaling"] = rope
    if self.architecture == "mistral":
      out["sliding_window"] = self.sliding_window
    return out


# ------------------------------------------------------------------------ named presets


def llama3_8b(num_layers: int = 32, **changes: Any) -> ModelConfig:
  """Llama 3 8B: the shape of meta-llama/Meta-Llama-3-8B's config.json.

  Vocabulary 128256, hidden 4096, MLP 14336, 32 query and 8 KV heads of width 128,
  untied embeddings, rope_theta 500000, 8192 positions, BOS 128000, EOS 128001. RoPE uses
  Llama 3.1's "llama3" scaling (factor 8 over 8192 original positions; Meta-Llama-3-8B
  itself has none), which does not change any shape or FLOP count. `num_layers` cuts the
  depth (the benchmarks run 1 or 2 layers on CPU); `changes` sets any other field, e.g.
  `param_dtype="bfloat16"`.
  """
  fields = dict(
      vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=num_layers,
      num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
      rms_norm_eps=1e-5, rope_theta=500_000.0,
      rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192),
      tie_word_embeddings=False, bos_token_id=128_000, eos_token_ids=(128_001,))
  return ModelConfig(**{**fields, **changes})
