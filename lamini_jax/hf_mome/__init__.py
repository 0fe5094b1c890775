"""PyTorch modeling code shipped inside MoME exports (`python -m lamini_jax.export --format mome`).

The two files here are copied next to the weights; `transformers` loads them with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. They need only
torch and transformers, never lamini_jax. Importing this package does not import torch.
"""

import pathlib

CONFIG_MODULE = "configuration_lamini_mome"
MODELING_MODULE = "modeling_lamini_mome"
FILES = tuple(pathlib.Path(__file__).with_name(f"{m}.py") for m in (CONFIG_MODULE, MODELING_MODULE))

# Base architecture -> (model_type, config class, model class) of the MoME export.
CLASSES = {
    "llama": ("lamini_mome_llama", "LaminiMomeLlamaConfig", "LaminiMomeLlamaForCausalLM"),
    "mistral": ("lamini_mome_mistral", "LaminiMomeMistralConfig", "LaminiMomeMistralForCausalLM"),
}


def auto_map(architecture: str) -> dict[str, str]:
  """The `auto_map` entry of config.json for a MoME export of this base architecture."""
  _, config_cls, model_cls = CLASSES[architecture]
  return {"AutoConfig": f"{CONFIG_MODULE}.{config_cls}",
          "AutoModelForCausalLM": f"{MODELING_MODULE}.{model_cls}"}
