"""benchmarks.lora_vs_peft trains both sides on the same rows with the same loss."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import lora_vs_peft
from lamini_jax.data import encoding
from lamini_jax import lora_tuning
from lamini_jax import runs
from lamini_jax import train as train_lib

torch = pytest.importorskip("torch")


def test_peft_batch_loss_at_step_zero_is_ours(stories, stories_dir):
  # Both adapters start at B = 0, so both models are the base model: the same rows must
  # give the same loss, over the same answer tokens, for the timings to compare like work.
  cfg_model, params = stories
  cfg = runs.load_run_config(lora_vs_peft.DEFAULT_CONFIG, [f"model.path={stories_dir}"])
  facts = runs.facts_and_heldout(cfg.data, "random")[0][:5]
  tokenizer = runs.load_backbone(cfg.model).tokenizer
  encoded = encoding.encode_facts(tokenizer, runs.prompt_template(cfg.data), facts, cfg.data.max_len)
  (batch,) = lora_vs_peft.peft_batches(encoded, 8, 0, epoch=0)
  model, _ = lora_vs_peft.peft_model(stories_dir, cfg, "eager")
  with torch.no_grad():
    theirs = float(model(**batch).loss)
  ours_model = lora_tuning.lora_model(cfg_model, cfg.lora)
  state = lora_tuning.init_lora_state(ours_model, cfg.train.optimizer, seed=0)
  tokens = jnp.asarray(batch["input_ids"].numpy(), jnp.int32)
  logits, _ = ours_model.apply({"params": params, "lora": state.trainable}, tokens)
  mask = jnp.asarray(batch["labels"].numpy() != -100)
  ours, _, count = train_lib.token_nll(logits, tokens, mask)
  assert int(count.sum()) == sum(int(e.loss_mask.sum()) for e in encoded)
  np.testing.assert_allclose(float(ours), theirs, rtol=2e-5)
