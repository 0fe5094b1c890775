"""LoRA memory tuning: step 0, loss, frozen backbone, recall, kill-and-resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import evaluate as eval_lib
from lamini_jax.lora import LoraConfig
from lamini_jax import lora_tuning
from lamini_jax import model as model_lib
from lamini_jax import recall as recall_lib
from lamini_jax import runs
from lamini_jax import train as train_lib

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down"))
FAST = train_lib.TrainConfig(
    epochs=100, batch_size=8, seq_len=128, seed=3,
    optimizer=train_lib.OptimizerConfig(learning_rate=1e-2, multiply_by_parameter_scale=False))
TEMPLATE = encoding.PromptTemplate(train_eos=False)  # stories260K never learned </s>


@pytest.fixture(scope="module")
def facts():
  short = [i for i in sources.load_truthfulqa() if len(i.question) < 45]
  train_items, _ = facts_lib.split_items(short, 6, 0, seed=5)
  return facts_lib.truthfulqa_facts(train_items, "random", seed=5)


@pytest.fixture(scope="module")
def encoded(facts, stories_tokenizer):
  return encoding.encode_facts(stories_tokenizer, TEMPLATE, facts, 128)


def test_token_nll_matches_float64_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (3, 7))
  mask = rng.random((3, 7)) < 0.6
  mask[2] = False
  loss, row_sum, row_count = train_lib.token_nll(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  lp = logits.astype(np.float64)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  ref_rows = [-sum(lp[b, t - 1, tokens[b, t]] for t in range(1, 7) if mask[b, t]) for b in range(3)]
  np.testing.assert_allclose(row_sum, ref_rows, rtol=1e-6)
  np.testing.assert_array_equal(row_count, mask[:, 1:].sum(1))
  np.testing.assert_allclose(loss, sum(ref_rows) / mask[:, 1:].sum(), rtol=1e-6)


def test_lora_step_zero_reproduces_base_logits_exactly(stories):
  cfg, params = stories
  lora_model = model_lib.Transformer(cfg, lora=LORA)
  state = lora_tuning.init_lora_state(lora_model, FAST.optimizer, seed=0)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 512, (2, 13)))
  base, _ = model_lib.Transformer(cfg).apply({"params": params}, tokens)
  adapted, _ = lora_model.apply({"params": params, "lora": state.trainable}, tokens)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
  a_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(state.trainable) if path[-1].key == "a"]
  assert a_leaves and all(float(jnp.abs(a).max()) > 0 for a in a_leaves)  # A random, B zero
  # Another seed: other A, from the same compiled function (one compile per model and optimizer).
  other = lora_tuning.init_lora_state(lora_model, FAST.optimizer, seed=1)
  assert not np.array_equal(np.asarray(jax.tree.leaves(other.trainable)[0]),
                            np.asarray(jax.tree.leaves(state.trainable)[0]))
  assert lora_tuning._jitted_init(lora_model, FAST.optimizer)._cache_size() == 1


@pytest.fixture(scope="module")
def trained(stories, stories_tokenizer, facts, encoded):
  cfg, params = stories
  before = jax.tree.map(np.array, params)
  model, variables, result = lora_tuning.tune_lora(cfg, params, encoded, LORA, FAST, pad_id=0, progress=False,
                                                   on_epoch=eval_lib.recall_callback(
                                              model_lib.Transformer(cfg, lora=LORA),
                                              lambda s: {"params": params, "lora": s.trainable},
                                              stories_tokenizer, facts, TEMPLATE, every=10,
                                              stop_at_full=True))
  return model, variables, result, before


def test_training_lowers_loss_and_recalls_every_random_fact(trained, facts, stories_tokenizer):
  model, variables, result, _ = trained
  losses = [r["loss"] for r in result.history]
  assert losses[-1] < 0.01 * losses[0]
  rec = eval_lib.recall(model, variables, stories_tokenizer, facts, TEMPLATE)
  assert rec.rate == 1.0, list(zip(rec.answers, [f.answer for f in facts]))
  assert result.history[-1]["recall"] == 1.0 and len(result.history) < FAST.epochs


@pytest.mark.parametrize("scale", [0.0, 0.75, 0.8, 1.0])
def test_one_pass_recall_gives_greedy_decoding_s_verdicts(trained, facts, stories_tokenizer, scale):
  # B scaled toward 0 walks the trained adapters back to the base model: from every fact
  # recalled, through some (0.8: 5 of 6 here, 0.75: 1), to none.
  model, variables, _, _ = trained
  lora = jax.tree_util.tree_map_with_path(
      lambda path, x: x * scale if path[-1].key == "b" else x, variables["lora"])
  scaled = {"params": variables["params"], "lora": lora}
  check = recall_lib.FactRecall(model, stories_tokenizer, facts, TEMPLATE)
  want = eval_lib.recall(model, scaled, stories_tokenizer, facts, TEMPLATE).exact
  np.testing.assert_array_equal(check(scaled), want)
  assert check.undecided < len(facts)
  # forced: recalled through the trained tokens, each the argmax after its prefix (one fact a pass).
  encoded = encoding.encode_facts(stories_tokenizer, TEMPLATE, facts, model.cfg.max_position_embeddings)
  for i, e in enumerate(encoded):
    logits_TxV = np.asarray(model.apply(scaled, jnp.asarray(e.tokens[None]))[0][0])
    hits = all(np.argmax(logits_TxV[t - 1]) == e.tokens[t] for t in np.flatnonzero(e.loss_mask))
    assert check.forced[i] == (hits and want[i]), i
    # gap: the smallest margin of a trained token over the best other one, here in float64.
    lg = logits_TxV.astype(np.float64)
    gap = min(lg[t - 1, e.tokens[t]] - np.max(np.delete(lg[t - 1], e.tokens[t]))
              for t in np.flatnonzero(e.loss_mask))
    assert abs(check.gap[i] - gap) <= 1e-3 * max(1.0, abs(gap)), (i, check.gap[i], gap)
    assert (check.gap[i] > 0) == hits, i
  hook = recall_lib.recall_callback(model, lambda v: v, stories_tokenizer, facts, TEMPLATE, 1, True,
                                    forced=True)
  record = hook(0, scaled, None)
  assert record["recall_forced"] == np.mean(check.forced)
  assert record["recall_min_gap"] == check.gap.min()
  assert record["stop"] == bool(check.forced.all() and want.all()
                                and check.gap.min() >= recall_lib.STOP_GAP)


def test_facts_whose_trained_tokens_hold_no_stop_are_decoded(trained, facts, stories_tokenizer):
  model, variables, _, _ = trained
  no_stop = encoding.PromptTemplate(answer_end="", train_eos=False)
  check = recall_lib.FactRecall(model, stories_tokenizer, facts, no_stop, decode_batch_size=4)
  want = eval_lib.recall(model, variables, stories_tokenizer, facts, no_stop).exact
  np.testing.assert_array_equal(check(variables), want)
  assert check.undecided == len(facts)  # in 2 batches: 4 facts, then 2, each with the longest prompt


def test_a_miss_decodes_only_when_other_tokens_could_still_spell_the_answer(stories, stories_tokenizer):
  cfg, _ = stories
  fact = facts_lib.Fact("Who?", "RS18BF", "f")
  check = recall_lib.FactRecall(model_lib.Transformer(cfg), stories_tokenizer, [fact], TEMPLATE)
  trained = check._targets[0]  # ▁ R S 1 8 B F <0x0A>
  assert stories_tokenizer.convert_ids_to_tokens(trained) == ["▁", "R", "S", "1", "8", "B", "F", "<0x0A>"]
  start = check._prompt_len[0]
  r, x, newline, eos = 461, stories_tokenizer.convert_tokens_to_ids("X"), 13, 2
  assert not check._miss_settled(0, start, r)  # "R" for "▁": "R", "S", ... can still follow
  assert check._miss_settled(0, start, x)  # "X...": never the answer
  assert check._miss_settled(0, start + 1, newline)  # stops before the answer
  assert check._miss_settled(0, start + 7, x)  # "RS18BFX": past the answer without a stop
  assert not check._miss_settled(0, start + 7, eos)  # EOS for the newline: the answer, stopped
  assert check._trained_verdict == [True]


def test_frozen_backbone_is_bit_for_bit_unchanged(trained, stories):
  _, variables, _, before = trained
  # The step takes the backbone as an argument it never donates: training neither deleted
  # (donation would) nor copied its buffers, and they hold the values they had before.
  assert variables["params"] is stories[1]
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(variables["params"]))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables["params"]))


def test_merged_weights_give_the_adapted_logits(trained, stories):
  cfg, _ = stories
  model, variables, _, _ = trained
  merged = model_lib.merge_lora(variables["params"], variables["lora"], LORA)
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 512, (2, 17)))
  want, _ = model.apply(variables, tokens)
  got, _ = model_lib.Transformer(cfg).apply({"params": merged}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(stories, encoded, tmp_path):
  cfg, params = stories
  tc = train_lib.TrainConfig(epochs=3, batch_size=4, seq_len=128, seed=1, checkpoint_every=2,
                             optimizer=FAST.optimizer)
  _, full_vars, full = lora_tuning.tune_lora(cfg, params, encoded, LORA, tc, pad_id=0, progress=False,
                                             paths=runs.RunDir(tmp_path / "full").paths("lora"))
  # Stop after 3 steps (mid-epoch 1; the last checkpoint is at step 2), then resume.
  lora_tuning.tune_lora(cfg, params, encoded, LORA, tc, pad_id=0, progress=False, paths=runs.RunDir(tmp_path / "cut").paths("lora"),
                        stop_after_steps=3)
  _, vars_, resumed = lora_tuning.tune_lora(cfg, params, encoded, LORA, tc, pad_id=0, progress=False,
                                            paths=runs.RunDir(tmp_path / "cut").paths("lora"), resume=True)
  jax.tree.map(np.testing.assert_array_equal, full_vars["lora"], vars_["lora"])
  strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]
  assert strip(resumed.history) == strip(full.history) and len(full.history) == 3
  lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="train.batch_size"):
    train_lib.TrainConfig(batch_size=0)
  with pytest.raises(ValueError, match="optimizer.name"):
    train_lib.OptimizerConfig(name="sgd")
  with pytest.raises(ValueError, match="LoraConfig.targets"):
    LoraConfig(targets=("q", "w"))


@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_warmup_and_cosine_decay_follow_float64(warmup):
  # Adam on one scalar with a constant gradient moves by lr(t) per step (its
  # normalized update is 1), so the steps trace the schedule.
  decay, lr = 7, 0.5
  tx = train_lib.OptimizerConfig(name="adam", learning_rate=lr, warmup_steps=warmup,
                                 decay_steps=decay).build()
  param = jnp.zeros(())
  state = tx.init(param)
  steps = []
  for _ in range(warmup + decay + 3):
    updates, state = tx.update(jnp.ones(()), state, param)
    steps.append(-float(updates))
  want = [lr * t / warmup for t in range(warmup)]
  floor = train_lib.DECAY_FLOOR
  want += [lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(t, decay) / decay)))
           for t in range(decay + 3)]
  np.testing.assert_allclose(steps, want, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="optimizer.decay_steps"):
    train_lib.OptimizerConfig(decay_steps=-1)


def _resident_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not train_lib._HOST_MEMORY_KEPT,
                    reason="glibc's malloc settings were not applied (not glibc, or MALLOC_* set)")
def test_freed_host_memory_is_kept_until_released():
  block = np.ones(256 * 2**20 // 8)  # 256 MB from the heap: no mmap under these settings
  held = _resident_mb()
  del block
  kept = _resident_mb()
  assert kept > held - 64  # freed, but the heap keeps it (no trimming)
  assert train_lib.release_freed_host_memory()
  assert _resident_mb() < kept - 192  # malloc_trim gave the pages back
