"""Configuration of a Lamini-1 MoME model exported by lamini-jax.

The backbone fields are those of `LlamaConfig` / `MistralConfig`; the MoME layers
are described by one extra field, `mome`, a dict:

  layers        decoder layers that carry a MoME branch beside their MLP
  num_experts   N experts, N = n1 * n2
  sub_keys      [n1, n2] product-key halves
  expert_rank   R
  num_heads     H router heads
  key_dim       Q router query width (even)
  top_k         S experts per head, so K = H * S experts per token
  activation    relu | gelu (tanh approximation, as jax.nn.gelu) | silu | identity
  threshold     (optional, default 0) subtracted from down^T x before the activation
  unit_input    (optional, default false) down^T sees x / |x| instead of x (the router sees x)
  stored_rows   (optional) one count per layer of `layers`: the table is stored sparse, only
                the M rows whose `up` is not all zero (`rows` [M] ascending expert ids,
                `down` [M, D, R], `up` [M, R, D]); every other expert adds exactly zero, as
                an untrained (zero-`up`) expert does. Without it the whole table is stored.
"""

import math

from transformers import LlamaConfig, MistralConfig

ACTIVATIONS = ("relu", "gelu", "silu", "identity")
_INT_FIELDS = ("num_experts", "expert_rank", "num_heads", "key_dim", "top_k")


def mome_spec(config) -> dict:
  """The validated `mome` dict of a config; errors name the field and the value."""
  spec = getattr(config, "mome", None)
  if not isinstance(spec, dict):
    raise ValueError(f"config.mome must be a dict describing the MoME layers, got {spec!r}")
  missing = [k for k in ("layers", "sub_keys", "activation", *_INT_FIELDS) if k not in spec]
  if missing:
    raise ValueError(f"config.mome is missing {', '.join(missing)}")
  for name in _INT_FIELDS:
    if not isinstance(spec[name], int) or spec[name] < 1:
      raise ValueError(f"config.mome.{name} must be a positive int, got {spec[name]!r}")
  n1, n2 = spec["sub_keys"]
  if n1 * n2 != spec["num_experts"]:
    raise ValueError(f"config.mome.sub_keys {spec['sub_keys']} must multiply to num_experts "
                     f"{spec['num_experts']}")
  if spec["key_dim"] % 2:
    raise ValueError(f"config.mome.key_dim must be even, got {spec['key_dim']}")
  if spec["activation"] not in ACTIVATIONS:
    raise ValueError(f"config.mome.activation {spec['activation']!r} is not one of {ACTIVATIONS}")
  threshold = spec.get("threshold", 0.0)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
    raise ValueError(f"config.mome.threshold must be a finite number >= 0, got {threshold!r}")
  if not isinstance(spec.get("unit_input", False), bool):
    raise ValueError(f"config.mome.unit_input must be true or false, got {spec['unit_input']!r}")
  stored = spec.get("stored_rows")
  if stored is not None and (not isinstance(stored, list) or len(stored) != len(spec["layers"])
                             or any(isinstance(m, bool) or not isinstance(m, int)
                                    or not 0 <= m <= spec["num_experts"] for m in stored)):
    raise ValueError(f"config.mome.stored_rows must list one row count in 0..num_experts per layer "
                     f"of {spec['layers']}, got {stored!r}")
  bad = [i for i in spec["layers"] if not 0 <= i < config.num_hidden_layers]
  if bad:
    raise ValueError(f"config.mome.layers {spec['layers']}: layer {bad[0]} is outside "
                     f"0..{config.num_hidden_layers - 1}")
  return spec


class LaminiMomeLlamaConfig(LlamaConfig):
  model_type = "lamini_mome_llama"


class LaminiMomeMistralConfig(MistralConfig):
  model_type = "lamini_mome_mistral"
