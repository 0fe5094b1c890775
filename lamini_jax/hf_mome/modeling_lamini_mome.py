"""Lamini-1 Mixture of Memory Experts (MoME) on a Llama / Mistral backbone, in PyTorch.

Shipped inside lamini-jax MoME exports and loaded by
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`; needs only
torch and transformers. The numerics mirror `lamini_jax.mome.router.route` and
`lamini_jax_kernels.gather_apply.gather_apply_reference`.

A MoME layer is a residual branch beside the MLP of the configured decoder
layers and reads the MLP's input x (the post-attention RMSNorm output):

  h = h + mlp(x) + mome(x)
  mome(x)[t] = sum_k w[t, k] * up[e]^T act(down[e]^T x[t]),   e = idx[t, k]

Router, per head h: q = x @ query[:, h], split into halves; sub-key scores
s1 = q[:Q/2] @ keys1[h]^T (n1 of them) and s2 = q[Q/2:] @ keys2[h]^T (n2);
expert e = i * n2 + j scores s1[i] + s2[j]. Selection is the exact top-k over
all n1 * n2 sums of the biased scores s1 + bias1[h], s2 + bias2[h] (ties go to
the lower index); the weights are a softmax over the head's selected unbiased
scores. Slot h * top_k + s holds head h's s-th expert.

The MoME branch runs in float32 whatever the model dtype, so routing decisions
are those of training. A sparse export (`mome.stored_rows` in config.json) holds only
the experts whose `up` is not all zero: `rows` [M] (ascending expert ids) with their
`down` [M, D, R] and `up` [M, R, D]; a selected expert outside `rows` adds exactly zero,
as an untrained expert of the whole table does, so both layouts give the same outputs. Tensor layouts are lamini-jax's: query [D, H, Q],
keys1 [H, n1, Q/2], keys2 [H, n2, Q/2], bias1 [H, n1], bias2 [H, n2],
down [N, D, R], up [N, R, D].

Shape letters: T tokens, D model width, H router heads, Q query width,
C = Q/2, I = n1, J = n2, S experts per head, K = H * S slots, N experts,
R expert rank.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaForCausalLM, MistralForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP

from .configuration_lamini_mome import LaminiMomeLlamaConfig, LaminiMomeMistralConfig, mome_spec

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # jax.nn.gelu's default
    "silu": F.silu,
    "identity": lambda x: x,
}


def _topk_by_index(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
  """Top-k of the last axis (ties: lower index first), returned in ascending index order."""
  idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
  idx = torch.sort(idx, dim=-1).values
  return torch.gather(s, -1, idx), idx


def product_key_topk(s1_XxI: torch.Tensor, s2_XxJ: torch.Tensor, k: int) -> torch.Tensor:
  """Experts e = i * n2 + j of the exact top-k of s1[i] + s2[j], best first, ties to lower e."""
  n2 = s2_XxJ.shape[-1]
  k1, k2 = min(k, s1_XxI.shape[-1]), min(k, n2)
  v1, i1 = _topk_by_index(s1_XxI, k1)
  v2, i2 = _topk_by_index(s2_XxJ, k2)
  cand = (v1[..., :, None] + v2[..., None, :]).flatten(-2)  # ascending expert order
  pos = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :k]
  rows = torch.gather(i1, -1, torch.div(pos, k2, rounding_mode="floor"))
  cols = torch.gather(i2, -1, pos % k2)
  return rows * n2 + cols


class LaminiMome(nn.Module):
  """One MoME layer: product-key router, frozen selection bias and the expert table."""

  def __init__(self, config, layer: int):
    super().__init__()
    spec = mome_spec(config)
    d, h, q = config.hidden_size, spec["num_heads"], spec["key_dim"]
    n1, n2 = spec["sub_keys"]
    n, r = spec["num_experts"], spec["expert_rank"]
    self.top_k = spec["top_k"]
    self.act = ACTIVATIONS[spec["activation"]]
    self.threshold = float(spec.get("threshold", 0.0))
    self.unit_input = bool(spec.get("unit_input", False))
    self.query = nn.Parameter(torch.empty(d, h, q))
    self.keys1 = nn.Parameter(torch.empty(h, n1, q // 2))
    self.keys2 = nn.Parameter(torch.empty(h, n2, q // 2))
    self.bias1 = nn.Parameter(torch.zeros(h, n1), requires_grad=False)
    self.bias2 = nn.Parameter(torch.zeros(h, n2), requires_grad=False)
    stored = spec.get("stored_rows")
    self.sparse = stored is not None
    if self.sparse:
      n = stored[spec["layers"].index(layer)]
      self.register_buffer("rows", torch.zeros(n, dtype=torch.int64))
    self.down = nn.Parameter(torch.empty(n, d, r))
    self.up = nn.Parameter(torch.empty(n, r, d))

  @torch.no_grad()
  def init_weights(self) -> None:
    """lamini-jax's fresh layer: normal router and down (std 1/sqrt(fan_in)), zero bias and up."""
    fan_in = {"query": self.query.shape[0], "keys1": self.keys1.shape[-1],
              "keys2": self.keys2.shape[-1], "down": self.down.shape[1]}
    for name, param in self.named_parameters():
      if getattr(param, "_is_hf_initialized", False):
        continue
      if name in fan_in:
        param.normal_(0.0, 1.0 / math.sqrt(fan_in[name]))
      else:
        param.zero_()

  def route(self, x_TxD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_TxK, w_TxK): K = H * top_k experts per token and their weights."""
    q_HxTxQ = torch.einsum("TD,DHQ->HTQ", x_TxD, self.query.float())
    half = q_HxTxQ.shape[-1] // 2
    s1_HxTxI = torch.einsum("HTC,HIC->HTI", q_HxTxQ[..., :half], self.keys1.float())
    s2_HxTxJ = torch.einsum("HTC,HJC->HTJ", q_HxTxQ[..., half:], self.keys2.float())
    e_HxTxS = product_key_topk(s1_HxTxI + self.bias1.float()[:, None, :],
                               s2_HxTxJ + self.bias2.float()[:, None, :], self.top_k)
    n2 = s2_HxTxJ.shape[-1]
    score_HxTxS = (torch.gather(s1_HxTxI, -1, torch.div(e_HxTxS, n2, rounding_mode="floor"))
                   + torch.gather(s2_HxTxJ, -1, e_HxTxS % n2))
    w_HxTxS = torch.softmax(score_HxTxS, dim=-1)
    t = x_TxD.shape[0]
    to_slots = lambda a_HxTxS: a_HxTxS.permute(1, 0, 2).reshape(t, -1)
    return to_slots(e_HxTxS), to_slots(w_HxTxS)

  def stored_positions(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in `rows`, whether stored) of each expert id, for a sparse table."""
    pos = torch.searchsorted(self.rows, experts).clamp_(max=self.rows.numel() - 1)
    return pos, self.rows[pos] == experts

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x_TxD = x.reshape(-1, x.shape[-1]).float()
    idx_TxK, w_TxK = self.route(x_TxD)
    t, k = idx_TxK.shape
    flat = idx_TxK.reshape(-1)
    if self.sparse:
      if self.rows.numel() == 0:
        return torch.zeros_like(x)
      flat, stored = self.stored_positions(flat)
    down_TxKxDxR = self.down.index_select(0, flat).float().reshape(t, k, *self.down.shape[1:])
    up_TxKxRxD = self.up.index_select(0, flat).float().reshape(t, k, *self.up.shape[1:])
    if self.sparse:
      up_TxKxRxD = up_TxKxRxD * stored.reshape(t, k, 1, 1)
    x_in_TxD = x_TxD / x_TxD.norm(dim=-1, keepdim=True).clamp_min(1e-30) if self.unit_input else x_TxD
    h_TxKxR = self.act(torch.einsum("TD,TKDR->TKR", x_in_TxD, down_TxKxDxR) - self.threshold)
    y_TxD = torch.einsum("TK,TKR,TKRD->TD", w_TxK, h_TxKxR, up_TxKxRxD)
    return y_TxD.reshape(x.shape).to(x.dtype)


class LaminiMomeLlamaMLP(LlamaMLP):
  """The Llama MLP with a MoME branch on the same input: mlp(x) + mome(x)."""

  def __init__(self, config, layer: int):
    super().__init__(config)
    self.mome = LaminiMome(config, layer)

  def forward(self, x):
    return super().forward(x) + self.mome(x)


class LaminiMomeMistralMLP(MistralMLP):
  """The Mistral MLP with a MoME branch on the same input: mlp(x) + mome(x)."""

  def __init__(self, config, layer: int):
    super().__init__(config)
    self.mome = LaminiMome(config, layer)

  def forward(self, x):
    return super().forward(x) + self.mome(x)


class LaminiMomeLlamaForCausalLM(LlamaForCausalLM):
  """LlamaForCausalLM whose `config.mome.layers` carry a MoME branch beside the MLP."""

  config_class = LaminiMomeLlamaConfig

  def __init__(self, config):
    super().__init__(config)
    for i in mome_spec(config)["layers"]:
      self.model.layers[i].mlp = LaminiMomeLlamaMLP(config, i)
    self.post_init()

  def _init_weights(self, module):
    super()._init_weights(module)
    if isinstance(module, LaminiMome):
      module.init_weights()


class LaminiMomeMistralForCausalLM(MistralForCausalLM):
  """MistralForCausalLM whose `config.mome.layers` carry a MoME branch beside the MLP."""

  config_class = LaminiMomeMistralConfig

  def __init__(self, config):
    super().__init__(config)
    for i in mome_spec(config)["layers"]:
      self.model.layers[i].mlp = LaminiMomeMistralMLP(config, i)
    self.post_init()

  def _init_weights(self, module):
    super()._init_weights(module)
    if isinstance(module, LaminiMome):
      module.init_weights()
