"""The Llama / Mistral decoder as pure-functional Flax (linen) modules.

Shape and einsum letters: the package legend in `lamini_jax/__init__.py`.

Variable collections: `"params"` holds the (frozen) backbone, `"lora"` the LoRA
adapters, and the `"mome*"` collections the MoME router and expert table
(`lamini_jax.mome`). Every parameter carries logical axis names (`nn.with_logical_partitioning`)
that `lamini_jax.sharding` maps onto a device mesh.

Numerics: the residual stream, norms, softmax and logits are float32; matmul
inputs are cast to `compute_dtype` and accumulate in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import einops
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from lamini_jax.config import ModelConfig, dtype_of
from lamini_jax.lora import LoraConfig, lora_specs, merged_kernel
from lamini_jax.mome.config import MomeConfig
from lamini_jax.mome.layer import MomeLayer
from lamini_jax_kernels.dispatch import gather_apply_auto
from lamini_jax_kernels.gather_apply import GatherApplyFn

# einsum, kernel shape (as config attributes), logical axes, for every projection.
PROJECTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "q": ("BTD,DNH->BTNH", ("hidden_size", "num_heads", "head_dim"), ("embed", "q_heads", "head_dim")),
    "k": ("BTD,DYH->BTYH", ("hidden_size", "num_kv_heads", "head_dim"), ("embed", "kv_heads", "head_dim")),
    "v": ("BTD,DYH->BTYH", ("hidden_size", "num_kv_heads", "head_dim"), ("embed", "kv_heads", "head_dim")),
    "o": ("BTNH,NHD->BTD", ("num_heads", "head_dim", "hidden_size"), ("q_heads", "head_dim", "embed")),
    "gate": ("BTD,DF->BTF", ("hidden_size", "intermediate_size"), ("embed", "mlp")),
    "up": ("BTD,DF->BTF", ("hidden_size", "intermediate_size"), ("embed", "mlp")),
    "down": ("BTF,FD->BTD", ("intermediate_size", "hidden_size"), ("mlp", "embed")),
}
_MODULE_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


def einsum(eqn: str, x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
  """Matmul in `compute_dtype` with float32 accumulation and result.

  In a low-precision `compute_dtype` the backward matmuls also run in that dtype
  (the float32 cotangent is cast down first); left to autodiff they would be
  mixed float32 x bfloat16 dots, which XLA runs in float32.
  """
  if compute_dtype == jnp.float32:
    return jnp.einsum(eqn, x, w, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
  return _lowp_einsum(eqn, compute_dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lowp_einsum(eqn, compute_dtype, x, w):
  return jnp.einsum(eqn, x.astype(compute_dtype), w.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


def _lowp_einsum_fwd(eqn, compute_dtype, x, w):
  xc, wc = x.astype(compute_dtype), w.astype(compute_dtype)
  # Zero-size arrays carry the input dtypes (residuals must be arrays).
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return jnp.einsum(eqn, xc, wc, preferred_element_type=jnp.float32), (xc, wc, dtypes)


def _lowp_einsum_bwd(eqn, compute_dtype, residuals, g):
  xc, wc, (x_dtype, w_dtype) = residuals
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(eqn, a, b, preferred_element_type=compute_dtype), xc, wc)
  dx, dw = vjp(g.astype(compute_dtype))
  return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


_lowp_einsum.defvjp(_lowp_einsum_fwd, _lowp_einsum_bwd)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer in fixed slots, plus which slots hold tokens.

  `end` is the next free slot (shared by all rows: prompts are left-padded).
  """

  k: tuple[jax.Array, ...]  # per layer [B, Y, S, H]
  v: tuple[jax.Array, ...]
  valid_BxS: jax.Array
  end: jax.Array  # int32 scalar

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
    dt = dtype_of(cfg.compute_dtype)
    shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
    return cls(k=zeros, v=zeros, valid_BxS=jnp.zeros((batch, slots), bool),
               end=jnp.zeros((), jnp.int32))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [H/2] in float32, with `llama3` / `linear` scaling."""
  h = cfg.head_dim
  inv = (1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h))
         ).astype(np.float32)
  rs = cfg.rope_scaling
  if rs.rope_type == "linear":
    inv = inv / rs.factor
  elif rs.rope_type == "llama3":
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def apply_rope(x_BTxH: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates halves (the Hugging Face layout) of x [B, T, heads, H] by position."""
  freqs_BxTxh = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs_BxTxh, freqs_BxTxh], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x = x_BTxH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (self.cfg.hidden_size,), dtype_of(self.cfg.param_dtype))
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return scale.astype(jnp.float32) * x


class Projection(nn.Module):
  """One einsum projection with an optional LoRA adapter (collection "lora")."""

  proj: str
  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eqn, dims, axes = PROJECTIONS[self.proj]
    shape = tuple(getattr(self.cfg, d) for d in dims)
    cdt = dtype_of(self.cfg.compute_dtype)
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                        shape, dtype_of(self.cfg.param_dtype))
    y = einsum(eqn, x, kernel, cdt)
    if self.lora is None or self.proj not in self.lora.targets:
      return y
    a_eqn, b_eqn, _ = lora_specs(eqn, self.lora.rank)
    w_spec = eqn.split("->")[0].split(",")[1]
    out = eqn.split("->")[1]
    n_in = sum(1 for c in w_spec if c not in out)
    in_shape, out_shape = shape[:n_in], shape[n_in:]
    in_axes, out_axes = axes[:n_in], axes[n_in:]
    fan_in = int(np.prod(in_shape))
    bound = 1.0 / math.sqrt(fan_in)
    a_init = nn.with_logical_partitioning(
        lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound), in_axes + ("lora_rank",))
    b_init = nn.with_logical_partitioning(lambda s: jnp.zeros(s, jnp.float32), ("lora_rank",) + out_axes)
    # The init functions run only when the variables are created (make_rng is init-only).
    a = self.variable("lora", "a", lambda: a_init(self.make_rng("params"),
                                                  in_shape + (self.lora.rank,))).value
    b = self.variable("lora", "b", lambda: b_init((self.lora.rank,) + out_shape)).value
    delta = einsum(b_eqn, einsum(a_eqn, x, a, cdt), b, cdt)
    return y + self.lora.scale * delta


class Attention(nn.Module):
  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxS, q_slots_T, kv):
    """`kv` is None (keys are this call's tokens) or (k_cache, v_cache, end)."""
    cfg = self.cfg
    cdt = dtype_of(cfg.compute_dtype)
    inv_freq = rope_inv_freq(cfg)
    q_BxTxNxH = apply_rope(Projection("q", cfg, self.lora, name="q")(x_BxTxD), positions_BxT, inv_freq)
    k_BxTxYxH = apply_rope(Projection("k", cfg, self.lora, name="k")(x_BxTxD), positions_BxT, inv_freq)
    v_BxTxYxH = Projection("v", cfg, self.lora, name="v")(x_BxTxD)
    b, t = x_BxTxD.shape[:2]
    # Heads-major layouts ([B, Y, ., H]) keep the batched matmuls contiguous; XLA on
    # CPU is several times slower on the token-major layout for small head_dim.
    k_BxYxTxH = jnp.swapaxes(k_BxTxYxH, 1, 2).astype(cdt)
    v_BxYxTxH = jnp.swapaxes(v_BxTxYxH, 1, 2).astype(cdt)
    if kv is None:
      k_BxYxSxH, v_BxYxSxH, new_kv = k_BxYxTxH, v_BxYxTxH, None
    else:
      k_cache, v_cache, end = kv
      k_BxYxSxH = jax.lax.dynamic_update_slice(k_cache, k_BxYxTxH.astype(k_cache.dtype), (0, 0, end, 0))
      v_BxYxSxH = jax.lax.dynamic_update_slice(v_cache, v_BxYxTxH.astype(v_cache.dtype), (0, 0, end, 0))
      new_kv = (k_BxYxSxH, v_BxYxSxH)
    # Query rows are (group, position) pairs: [B, Y, Z = G*T, H].
    q_BxYxZxH = einops.rearrange(q_BxTxNxH, "b t (y g) h -> b y (g t) h", y=cfg.num_kv_heads)
    scores_BxYxZxS = einsum("BYZH,BYSH->BYZS", q_BxYxZxH, k_BxYxSxH, cdt) * (cfg.head_dim ** -0.5)
    k_slots_S = jnp.arange(k_BxYxSxH.shape[2])
    allowed_TxS = k_slots_S[None, :] <= q_slots_T[:, None]
    if cfg.sliding_window is not None:
      allowed_TxS &= (q_slots_T[:, None] - k_slots_S[None, :]) < cfg.sliding_window
    allowed_ZxS = jnp.tile(allowed_TxS, (cfg.num_groups, 1))
    allowed = allowed_ZxS[None, None] & mask_BxS[:, None, None, :]
    scores_BxYxZxS = jnp.where(allowed, scores_BxYxZxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxYxZxS, axis=-1)
    out_BxYxZxH = einsum("BYZS,BYSH->BYZH", probs, v_BxYxSxH, cdt)
    out_BxTxNxH = einops.rearrange(out_BxYxZxH, "b y (g t) h -> b t (y g) h", t=t)
    return Projection("o", cfg, self.lora, name="o")(out_BxTxNxH), new_kv


class MLP(nn.Module):
  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BxTxD):
    gate = Projection("gate", self.cfg, self.lora, name="gate")(x_BxTxD)
    up = Projection("up", self.cfg, self.lora, name="up")(x_BxTxD)
    return Projection("down", self.cfg, self.lora, name="down")(jax.nn.silu(gate) * up)


class Block(nn.Module):
  cfg: ModelConfig
  lora: LoraConfig | None = None
  mome: MomeConfig | None = None  # a MoME residual branch beside the MLP, fed the same normed input
  mome_gather_apply: GatherApplyFn = gather_apply_auto
  mome_mesh: Mesh | None = None

  @nn.compact
  def __call__(self, h_BxTxD, positions_BxT, mask_BxS, q_slots_T, kv):
    attn_out, new_kv = Attention(self.cfg, self.lora, name="attn")(
        RMSNorm(self.cfg, name="input_norm")(h_BxTxD), positions_BxT, mask_BxS, q_slots_T, kv)
    h_BxTxD = h_BxTxD + attn_out
    normed = RMSNorm(self.cfg, name="post_attn_norm")(h_BxTxD)
    h_BxTxD = h_BxTxD + MLP(self.cfg, self.lora, name="mlp")(normed)
    if self.mome is not None:
      h_BxTxD = h_BxTxD + MomeLayer(self.mome, self.mome_gather_apply, self.mome_mesh,
                                    name="mome")(normed)
    return h_BxTxD, new_kv


class Transformer(nn.Module):
  """Decoder-only LM. Returns float32 logits [B, T, V] and the updated cache.

  A MoME layer (`lamini_jax.mome.layer.MomeLayer` with config `mome`) is added as a
  residual branch beside the MLP of each layer in `mome_layers`, its variables
  under `layers_<i>/mome` in the MoME collections. `mome_gather_apply` is the
  gather-and-apply implementation (reference or a kernel); `mome_mesh` shards
  the expert table.
  """

  cfg: ModelConfig
  lora: LoraConfig | None = None
  mome: MomeConfig | None = None
  mome_layers: tuple[int, ...] = ()
  mome_gather_apply: GatherApplyFn = gather_apply_auto
  mome_mesh: Mesh | None = None

  def __post_init__(self):
    bad = [i for i in self.mome_layers if not 0 <= i < self.cfg.num_layers]
    if bad:
      raise ValueError(f"mome_layers {list(self.mome_layers)}: layer {bad[0]} is outside "
                       f"0..{self.cfg.num_layers - 1}")
    if self.mome_layers and self.mome is None:
      raise ValueError("mome_layers given without a mome config")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               mask_BxT: jax.Array | None = None, cache: KVCache | None = None,
               return_hidden: bool = False, last_only: bool = False):
    """`last_only`: logits of the last position only ([B, 1, V]), as prefill needs."""
    cfg = self.cfg
    b, t = tokens_BxT.shape
    if mask_BxT is None:
      mask_BxT = jnp.ones((b, t), bool)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), dtype_of(cfg.param_dtype))
    h_BxTxD = jnp.take(embedding, tokens_BxT, axis=0).astype(jnp.float32)
    if cache is None:
      q_slots_T = jnp.arange(t)
      mask_BxS = mask_BxT
    else:
      q_slots_T = cache.end + jnp.arange(t)
      mask_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, mask_BxT, (0, cache.end))
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
      kv = None if cache is None else (cache.k[i], cache.v[i], cache.end)
      mome = self.mome if i in self.mome_layers else None
      h_BxTxD, layer_kv = Block(cfg, self.lora, mome, self.mome_gather_apply, self.mome_mesh,
                                name=f"layers_{i}")(
          h_BxTxD, positions_BxT, mask_BxS, q_slots_T, kv)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    if last_only:
      h_BxTxD = h_BxTxD[:, -1:]
    h_BxTxD = RMSNorm(cfg, name="final_norm")(h_BxTxD)
    if cfg.tie_word_embeddings:
      logits = einsum("BTD,VD->BTV", h_BxTxD, embedding, dtype_of(cfg.compute_dtype))
    else:
      lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), dtype_of(cfg.param_dtype))
      logits = einsum("BTD,DV->BTV", h_BxTxD, lm_head, dtype_of(cfg.compute_dtype))
    new_cache = None if cache is None else KVCache(
        k=tuple(new_k), v=tuple(new_v), valid_BxS=mask_BxS, end=cache.end + t)
    if return_hidden:
      return logits, new_cache, h_BxTxD
    return logits, new_cache


def init_variables(model: Transformer, key: jax.Array, batch: int = 1, length: int = 8) -> dict[str, Any]:
  """Initialised variables with the logical-axis boxes removed."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  return nn.meta.unbox(model.init({"params": key}, tokens))


def abstract_variables(model: Transformer) -> Any:
  """Shapes, dtypes and logical axis boxes of every variable, without allocating."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda k: model.init({"params": k}, tokens), jax.random.key(0))


def logical_axes(model: Transformer) -> Any:
  """A tree of PartitionSpecs of logical axis names, matching the variables."""
  return nn.get_partition_spec(abstract_variables(model))


def merge_lora(params: dict, lora_vars: dict, lora: LoraConfig) -> dict:
  """Folds the adapters into the backbone kernels: a plain Llama/Mistral tree."""
  params = jax.tree.map(lambda x: x, params)  # shallow copy of the structure
  for layer, modules in lora_vars.items():
    for module, projs in modules.items():
      for proj, ab in projs.items():
        eqn = PROJECTIONS[proj][0]
        kernel = params[layer][module][proj]["kernel"]
        params[layer][module][proj]["kernel"] = merged_kernel(kernel, ab["a"], ab["b"], eqn, lora.scale)
  return params


def module_of(proj: str) -> str:
  return _MODULE_OF[proj]
