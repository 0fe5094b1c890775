"""Lamini memory tuning with LoRA: adapters on a frozen backbone, one jitted step.

`tune_lora` memorizes encoded facts into LoRA adapters (the `"lora"` collection,
B = 0 at step 0, so step 0 is the base model); only the adapters are
differentiated and updated, and the frozen backbone is an argument of the step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lamini_jax.config import ModelConfig
from lamini_jax.data import encoding
from lamini_jax.lora import LoraConfig
from lamini_jax.model import Transformer
from lamini_jax import train as train_lib


def lora_model(cfg: ModelConfig, lora: LoraConfig) -> Transformer:
  return Transformer(cfg, lora=lora)


def abstract_lora(model: Transformer, seed: int = 0) -> Any:
  """Shapes and dtypes of the model's `"lora"` collection (nothing is computed)."""
  abstract = jax.eval_shape(lambda k: model.init({"params": k}, jnp.zeros((1, 1), jnp.int32)),
                            jax.random.key(seed))
  if "lora" not in abstract:
    raise ValueError("the model has no LoRA adapters: give Transformer(cfg, lora=LoraConfig(...))")
  return nn.meta.unbox(abstract["lora"])


def init_lora_state(model: Transformer, optimizer_cfg: train_lib.OptimizerConfig,
                    seed: int) -> train_lib.TrainState:
  """LoRA variables (B = 0) and their optimizer state, without touching the backbone.

  One jitted function builds the whole state (run eagerly, the optimizer's zeros and the
  step counter compiled a dozen one-op programs), compiled once per (model, optimizer
  config) in a process: the seed is an argument.
  """
  abstract_lora(model, seed)  # checks that the model has adapters
  return _jitted_init(model, optimizer_cfg)(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _jitted_init(model: Transformer, optimizer_cfg: train_lib.OptimizerConfig) -> Callable:
  fresh = fresh_state(optimizer_cfg)

  def init(key):
    lora = nn.meta.unbox(model.init({"params": key}, jnp.zeros((1, 1), jnp.int32))["lora"])
    return fresh(lora, jax.random.key_data(jax.random.fold_in(key, 1)))

  return jax.jit(init)


@functools.lru_cache(maxsize=8)
def fresh_state(optimizer_cfg: train_lib.OptimizerConfig) -> Callable:
  """(adapters, rng) -> a train state at step 0 with a fresh optimizer state; jitted once per
  optimizer config (LoRA retrained from given adapters, or continued with a new optimizer)."""
  optimizer = optimizer_cfg.build()
  return jax.jit(lambda lora, rng: train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), trainable=lora, opt_state=optimizer.init(lora), rng=rng))


@functools.lru_cache(maxsize=8)
def make_lora_step(model: Transformer, optimizer_cfg: train_lib.OptimizerConfig) -> Callable:
  """The jitted LoRA step; only the `"lora"` collection is differentiated and updated.

  Cached per (model, optimizer config), so runs in one process share compilations.
  """
  optimizer = optimizer_cfg.build()

  def loss_fn(lora, frozen, tokens_BxT, mask_BxT):
    logits, _ = model.apply({"params": frozen, "lora": lora}, tokens_BxT)
    loss, row_sum, row_count = train_lib.token_nll(logits, tokens_BxT, mask_BxT)
    return loss, (row_sum, row_count)

  def step(state: train_lib.TrainState, frozen, tokens_BxT, mask_BxT):
    (loss, (row_sum, row_count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.trainable, frozen, tokens_BxT, mask_BxT)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, {"loss": loss, "row_sum": row_sum, "row_count": row_count,
                       "grad_norm": optax.global_norm(grads)}

  return jax.jit(step, donate_argnums=0)


def tune_lora(cfg: ModelConfig, params: Any, encoded: Sequence[encoding.EncodedFact], lora: LoraConfig,
              train_cfg: train_lib.TrainConfig, *, pad_id: int, paths: train_lib.RunPaths | None = None,
              label: str = "lora", resume: bool = False, progress: bool = True,
              on_epoch: Callable | None = None, stop_after_steps: int | None = None,
              ) -> tuple[Transformer, dict[str, Any], train_lib.FitResult]:
  """Memorizes `encoded` facts into LoRA adapters; returns (model, variables, result)."""
  model = lora_model(cfg, lora)
  state = init_lora_state(model, train_cfg.optimizer, train_cfg.seed)
  step = make_lora_step(model, train_cfg.optimizer)
  result = train_lib.fit(step, state, params, encoded, train_cfg, pad_id=pad_id, label=label,
                         paths=paths, resume=resume, progress=progress, on_epoch=on_epoch,
                         stop_after_steps=stop_after_steps)
  return model, {"params": params, "lora": result.state.trainable}, result
