"""Evaluation metrics against direct float64 computations from the model's logits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamini_jax.data import corpus as corpus_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import evaluate as eval_lib
from lamini_jax import model as model_lib
from lamini_jax import runs

TEMPLATE = encoding.PromptTemplate()


@functools.lru_cache(maxsize=None)
def _forward(model):
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens)[0])


def _loglik(model, params, tokens, mask, width=512):
  """Summed float64 log-likelihood of the masked tokens of one sequence.

  The sequence is right-padded to a fixed width (one compilation); causal
  attention makes the padding invisible to the positions that are scored.
  """
  return sum(_token_logliks(model, params, tokens, mask, width))


def _token_logliks(model, params, tokens, mask, width=512):
  """The float64 log-likelihood of each masked token of one sequence, in order."""
  buffer = np.zeros((1, width), np.int32)
  buffer[0, :len(tokens)] = tokens
  logits = _forward(model)(params, jnp.asarray(buffer))
  lp = np.asarray(logits[0, :len(tokens)], np.float64)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  return [lp[t - 1, tokens[t]] for t in range(1, len(tokens)) if mask[t]]


@pytest.fixture(scope="module")
def setup(stories):
  cfg, params = stories
  return model_lib.Transformer(cfg), params


def test_score_pads_and_batches_without_changing_results(setup, stories_tokenizer):
  model, params = setup
  # Scored shortest first, two at a time, each pair at its own width (a multiple of 32 tokens).
  long = " ".join(["Once upon a time Lily and Tim went to the big park to play with a ball."] * 6)
  facts = [facts_lib.Fact(long, "They were happy", "long"),
           facts_lib.Fact("Why is the sky blue?", "Because of the sun", "a"),
           facts_lib.Fact("Who won?", "Tim", "b"),
           facts_lib.Fact("What did Lily see in the big park today?", "A red ball", "c")]
  enc = encoding.encode_facts(stories_tokenizer, TEMPLATE, facts, 256)
  assert len(enc[0].tokens) > 64 >= max(len(e.tokens) for e in enc[1:])
  ll, count = eval_lib.score(model, {"params": params}, enc, batch_size=2)
  for e, got, n in zip(enc, ll, count):
    assert n == e.loss_mask[1:].sum()
    np.testing.assert_allclose(got, _loglik(model, params, e.tokens, e.loss_mask), rtol=1e-5)


def test_truthfulqa_mc_from_log_likelihoods(setup, stories_tokenizer):
  model, params = setup
  items = sources.load_truthfulqa()[:3]
  got = eval_lib.truthfulqa_mc(model, {"params": params}, stories_tokenizer, items, TEMPLATE)
  mc1, mc2 = [], []
  for item in items:
    choices = list(item.correct_answers) + list(item.incorrect_answers)
    enc = encoding.encode_choices(stories_tokenizer, TEMPLATE, item.question, choices)
    lls = np.array([_loglik(model, params, e.tokens, e.loss_mask) for e in enc])
    best = item.correct_answers.index(item.best_answer)
    n_true = len(item.correct_answers)
    mc1.append(lls[best] > lls[n_true:].max())
    p = np.exp(lls - lls.max())
    mc2.append(p[:n_true].sum() / p.sum())
  assert got["mc1"] == pytest.approx(np.mean(mc1))
  assert got["mc2"] == pytest.approx(np.mean(mc2), rel=1e-4)
  # Answer loss per question (best answer + EOS), and its first ANSWER_HEAD tokens and the rest.
  facts = [facts_lib.Fact(i.question, i.best_answer, str(k)) for k, i in enumerate(items)]
  nll = [-np.array(_token_logliks(model, params, e.tokens, e.loss_mask))
         for e in encoding.encode_facts(stories_tokenizer, TEMPLATE, facts, 512)]
  head = eval_lib.ANSWER_HEAD
  assert all(len(n) > head for n in nll)
  assert got["answer_loss"] == pytest.approx(np.mean([n.mean() for n in nll]), rel=1e-4)
  assert got["answer_loss_head"] == pytest.approx(np.mean([n[:head].mean() for n in nll]), rel=1e-4)
  assert got["answer_loss_tail"] == pytest.approx(np.mean([n[head:].mean() for n in nll]), rel=1e-4)


def test_mmlu_accuracy_and_perplexity(setup, stories_tokenizer, shared_dir):
  model, params = setup
  dev = sources.load_mmlu(split="dev", subjects=["astronomy"])
  items = sources.load_mmlu(split="test", subjects=["astronomy"])[:5]
  got = eval_lib.mmlu_accuracy(model, {"params": params}, stories_tokenizer, dev, items, k=0)
  plain = encoding.PromptTemplate("{question}")
  correct = 0
  for item in items:
    enc = encoding.encode_choices(stories_tokenizer, plain, sources.mmlu_prompt(dev, item, 0),
                                  sources.MMLU_LETTERS)
    lls = [_loglik(model, params, e.tokens, e.loss_mask) for e in enc]
    correct += int(np.argmax(lls) == item.answer)
  assert got == {"mmlu_acc": correct / 5, "mmlu_scored": 5, "mmlu_skipped": 0}
  long_k = eval_lib.mmlu_accuracy(model, {"params": params}, stories_tokenizer, dev, items, k=5)
  assert long_k["mmlu_skipped"] > 0 and long_k["mmlu_scored"] + long_k["mmlu_skipped"] == 5

  windows = encoding.corpus_windows(stories_tokenizer, shared_dir / "data/corpus/tinyshakespeare.txt", 31, 3)
  ppl = eval_lib.perplexity(model, {"params": params}, windows)
  nll = [-_loglik(model, params, w, np.r_[False, np.ones(31, bool)]) for w in windows]
  assert ppl == pytest.approx(np.exp(np.sum(nll) / (3 * 31)), rel=1e-5)


def test_base_model_recalls_no_random_fact(setup, stories_tokenizer):
  model, params = setup
  facts = facts_lib.truthfulqa_facts(sources.load_truthfulqa()[:4], "random", 0)
  rec = eval_lib.recall(model, {"params": params}, stories_tokenizer, facts, TEMPLATE)
  assert rec.rate == 0.0 and len(rec.answers) == 4


def test_load_heldout_gives_each_split_its_own_material(setup, stories_tokenizer, shared_dir):
  model, params = setup
  corpus = shared_dir / "data/corpus"
  spec = runs.EvalSpec(mmlu_questions=6, ppl_windows=2, ppl_seq_len=31, locality_prompts=4)
  items = sources.load_truthfulqa()[:2]
  got = {}
  for split in ("dev", "test"):
    s = dataclasses.replace(spec, split=split)
    got[split] = eval_lib.load_heldout(stories_tokenizer, s, None, items, TEMPLATE, seed=0)
    assert got[split].split == split and got[split].truthfulqa == tuple(items)
    assert len(got[split].mmlu) == 6 and f"of the {split} split" in got[split].sources["truthfulqa"]
    assert len(got[split].locality_texts) == 4
  dev, test = got["dev"], got["test"]
  assert {i.subject for i in dev.mmlu} <= set(sources.MMLU_DEV_SUBJECTS)
  assert {i.subject for i in test.mmlu} <= set(sources.MMLU_TEST_SUBJECTS)
  assert {i.subject for i in dev.mmlu_shots} == set(sources.MMLU_DEV_SUBJECTS)
  assert set(dev.ppl_windows) == {"perplexity"} and set(test.ppl_windows) == {"perplexity", "perplexity_ood"}
  valid = corpus / "wikitext-2-valid.txt"
  with corpus_lib.corpus_file(valid, "odd") as odd:  # dev: the articles the anchors never read
    np.testing.assert_array_equal(dev.ppl_windows["perplexity"],
                                  encoding.corpus_windows(stories_tokenizer, odd, 31, 2))
  for name, path in (("perplexity", "wikitext-2-test.txt"), ("perplexity_ood", "tinyshakespeare.txt")):
    np.testing.assert_array_equal(test.ppl_windows[name],
                                  encoding.corpus_windows(stories_tokenizer, corpus / path, 31, 2))
    assert path in test.sources[name]
  odd_text, even_text = (corpus_lib.read_corpus(valid, h) for h in ("odd", "even"))
  assert all(t in odd_text and t not in even_text for t in dev.locality_texts)
  test_text = (corpus / "wikitext-2-test.txt").read_text()
  assert all(t in test_text and t not in odd_text + even_text for t in test.locality_texts)
  metrics = eval_lib.heldout_metrics(model, {"params": params}, stories_tokenizer,
                                     dataclasses.replace(test, truthfulqa=(), mmlu=()))
  assert metrics == {name: eval_lib.perplexity(model, {"params": params}, w)
                     for name, w in test.ppl_windows.items()}
  trained = list(test.mmlu[:3])  # questions trained as facts never enter the sample
  again = eval_lib.load_heldout(stories_tokenizer, dataclasses.replace(spec, split="test"), None, items,
                                TEMPLATE, seed=0, exclude_mmlu=trained)
  assert not set(again.mmlu) & set(trained)
  bare = runs.EvalSpec(split="test", ood_corpus="", mmlu_questions=0, ppl_windows=1, locality_prompts=0)
  no_ood = eval_lib.load_heldout(stories_tokenizer, bare, None, (), TEMPLATE)
  assert set(no_ood.ppl_windows) == {"perplexity"} and no_ood.locality_texts == ()
