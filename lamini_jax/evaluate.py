"""Evaluation: fact loss and exact-match recall, TruthfulQA MC1/MC2, MMLU, perplexity.

Everything is scored by one jitted function that returns each row's summed
log-likelihood over its masked target tokens, on fixed-shape batches.

    python -m lamini_jax.evaluate --model ../shared/models/stories260K-hf \
        --truthfulqa 100 --mmlu 200 --ppl-windows 32 [--facts facts.jsonl] [--run RUN --adapter random]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import generate as gen
from lamini_jax import hf
from lamini_jax.model import Transformer
from lamini_jax import runs
from lamini_jax import train as train_lib


ANSWER_HEAD = 4  # answer tokens in `answer_loss_head` (see truthfulqa_mc)


@functools.partial(jax.jit, static_argnames=("model",))
def _row_nll(model: Transformer, variables: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array):
  logits, _ = model.apply(variables, tokens_BxT)
  _, row_sum, row_count = train_lib.token_nll(logits, tokens_BxT, mask_BxT)
  return row_sum, row_count


def _bucket(n: int, multiple: int = 32) -> int:
  return -(-n // multiple) * multiple


def score(model: Transformer, variables: Any, encoded: Sequence[encoding.EncodedFact],
          batch_size: int = 32, pad_id: int = 0,
          first: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(summed log-likelihood of the masked tokens, their count) of every sequence.

  `first`: only each sequence's first `first` masked tokens count.
  """
  if not encoded:
    return np.zeros(0), np.zeros(0)
  longest = max(len(e.tokens) for e in encoded)
  if longest > model.cfg.max_position_embeddings:
    raise ValueError(f"a scored sequence has {longest} tokens, more than the model's context of "
                     f"{model.cfg.max_position_embeddings}")
  seq_len = min(_bucket(longest), model.cfg.max_position_embeddings)
  tokens_NxT, mask_NxT = batch_lib.stack_encoded(encoded, seq_len, pad_id)
  if first is not None:
    mask_NxT = mask_NxT * (np.cumsum(mask_NxT > 0, axis=1) <= first)
  n = len(encoded)
  total = -(-n // batch_size) * batch_size
  tokens_NxT = np.pad(tokens_NxT, ((0, total - n), (0, 0)), constant_values=pad_id)
  mask_NxT = np.pad(mask_NxT, ((0, total - n), (0, 0)))
  sums, counts = [], []
  for start in range(0, total, batch_size):
    row_sum, row_count = _row_nll(model, variables, jnp.asarray(tokens_NxT[start:start + batch_size]),
                                  jnp.asarray(mask_NxT[start:start + batch_size]))
    sums.append(row_sum)
    counts.append(row_count)
  return -np.concatenate([np.asarray(s) for s in sums])[:n], np.concatenate(
      [np.asarray(c) for c in counts])[:n]


def fact_losses(model, variables, encoded, batch_size=32, pad_id=0) -> np.ndarray:
  """Mean next-token NLL of each fact's answer and EOS (the training loss per fact)."""
  ll, count = score(model, variables, encoded, batch_size, pad_id)
  return -ll / np.maximum(count, 1)


@dataclasses.dataclass
class Recall:
  exact: np.ndarray  # bool per fact: greedy decoding reproduces the answer and stops
  answers: list[str]  # what the model generated for each question

  @property
  def rate(self) -> float:
    return float(np.mean(self.exact)) if len(self.exact) else float("nan")


def recall(model: Transformer, variables: Any, tokenizer, facts: Sequence[facts_lib.Fact],
           template: encoding.PromptTemplate, batch_size: int = 64) -> Recall:
  """Exact-match recall by greedy decoding (the hallucination rate is 1 - recall).

  A fact counts as recalled when the generated text up to the first stop (the
  end-of-sequence token, or the template's `answer_end`) equals the trained answer
  character for character, leading white space aside: the model must produce the
  answer and then stop. Without any stop the answer is not counted.
  """
  prompts = [encoding.encode_prompt(tokenizer, template, f.question).tolist() for f in facts]
  answer_lens = [len(tokenizer(f.answer, add_special_tokens=False).input_ids) for f in facts]
  sampling = gen.SamplingConfig(max_new_tokens=max(answer_lens) + 3)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = tokenizer.eos_token_id
  answers: list[str] = []
  stopped: list[bool] = []
  for start in range(0, len(prompts), batch_size):
    for new in gen.generate(model, variables, prompts[start:start + batch_size], sampling, pad):
      text = tokenizer.decode(new, skip_special_tokens=True)
      ended = len(new) < sampling.max_new_tokens or (eos is not None and eos in new)
      if template.answer_end and template.answer_end in text:
        text, ended = text.split(template.answer_end, 1)[0], True
      answers.append(text.strip())
      stopped.append(ended)
  exact = np.array([s and a == f.answer.strip() for a, s, f in zip(answers, stopped, facts)], bool)
  return Recall(exact, answers)


def generate_answers(model, variables, tokenizer, questions: Sequence[str],
                     template: encoding.PromptTemplate, max_new_tokens: int = 48,
                     batch_size: int = 64) -> list[str]:
  """Greedy answers to questions (for Table 1), cut at end-of-sequence or a newline."""
  prompts = [encoding.encode_prompt(tokenizer, template, q).tolist() for q in questions]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = []
  for start in range(0, len(prompts), batch_size):
    for new in gen.generate(model, variables, prompts[start:start + batch_size],
                            gen.SamplingConfig(max_new_tokens=max_new_tokens), pad):
      text = tokenizer.decode(new, skip_special_tokens=True)
      if template.answer_end:
        text = text.split(template.answer_end, 1)[0]
      out.append(text.strip().split("\n")[0])
  return out


def truthfulqa_mc(model, variables, tokenizer, items: Sequence[sources.TruthfulQAItem],
                  template: encoding.PromptTemplate, batch_size: int = 32) -> dict[str, float]:
  """MC1, MC2 and answer loss from answer log-likelihoods.

  MC1: the best answer has the highest log-likelihood among it and the incorrect
  answers. MC2: the normalised probability mass of the correct answers among all
  correct and incorrect ones. Answer loss: per-token NLL of the best answer and EOS,
  averaged per question; `answer_loss_head` and `answer_loss_tail` split it into
  the first ANSWER_HEAD answer tokens, which follow the prompt's last words most
  closely (e.g. "Answer:"), and the rest (of questions with more tokens).
  (The CSV's answer lists stand in for the hub's `mc1_targets` / `mc2_targets`.)
  """
  encoded, spans = [], []
  for item in items:
    choices = list(item.correct_answers) + list(item.incorrect_answers)
    start = len(encoded)
    encoded.extend(encoding.encode_choices(tokenizer, template, item.question, choices))
    spans.append((start, len(item.correct_answers), len(choices)))
  ll, _ = score(model, variables, encoded, batch_size)
  mc1, mc2 = [], []
  for item, (start, n_true, n_all) in zip(items, spans):
    lls = ll[start:start + n_all]
    best = item.correct_answers.index(item.best_answer)
    mc1.append(lls[best] > np.max(lls[n_true:]))
    p = np.exp(lls - np.max(lls))
    mc2.append(p[:n_true].sum() / p.sum())
  facts = [facts_lib.Fact(i.question, i.best_answer, f"heldout-{k}") for k, i in enumerate(items)]
  enc = encoding.encode_facts(tokenizer, template, facts, model.cfg.max_position_embeddings)
  ll, count = score(model, variables, enc, batch_size)
  head_ll, head_count = score(model, variables, enc, batch_size, first=ANSWER_HEAD)
  tail = count > head_count
  return {"mc1": float(np.mean(mc1)), "mc2": float(np.mean(mc2)),
          "answer_loss": float(np.mean(-ll / np.maximum(count, 1))),
          "answer_loss_head": float(np.mean(-head_ll / np.maximum(head_count, 1))),
          "answer_loss_tail": (float(np.mean((head_ll[tail] - ll[tail]) / (count - head_count)[tail]))
                               if tail.any() else float("nan"))}


def mmlu_accuracy(model, variables, tokenizer, dev: Sequence[sources.MMLUItem],
                  items: Sequence[sources.MMLUItem], k: int, batch_size: int = 32) -> dict[str, float]:
  """k-shot accuracy from the log-likelihood of the answer letters A-D.

  Items whose prompt does not fit the model's context are skipped and counted.
  """
  plain = encoding.PromptTemplate("{question}")
  encoded, kept = [], 0
  limit = model.cfg.max_position_embeddings
  answers = []
  for item in items:
    enc = encoding.encode_choices(tokenizer, plain, sources.mmlu_prompt(dev, item, k),
                                  sources.MMLU_LETTERS)
    if max(len(e.tokens) for e in enc) > limit:
      continue
    encoded.extend(enc)
    answers.append(item.answer)
    kept += 1
  if not kept:
    return {"mmlu_acc": float("nan"), "mmlu_scored": 0, "mmlu_skipped": len(items)}
  ll, _ = score(model, variables, encoded, batch_size)
  pred = ll.reshape(kept, 4).argmax(axis=1)
  return {"mmlu_acc": float(np.mean(pred == np.asarray(answers))), "mmlu_scored": kept,
          "mmlu_skipped": len(items) - kept}


def perplexity(model, variables, windows_WxT: np.ndarray, batch_size: int = 16) -> float:
  """exp(mean NLL) over every token of the windows after the first."""
  mask = np.ones_like(windows_WxT, dtype=bool)
  mask[:, 0] = False
  encoded = [encoding.EncodedFact(w.astype(np.int32), m) for w, m in zip(windows_WxT, mask)]
  ll, count = score(model, variables, encoded, batch_size)
  return float(math.exp(-ll.sum() / count.sum()))


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """The held-out material every model of a run is evaluated on."""

  truthfulqa: tuple[sources.TruthfulQAItem, ...]
  mmlu_dev: tuple[sources.MMLUItem, ...]
  mmlu: tuple[sources.MMLUItem, ...]
  mmlu_k: int
  ppl_windows: np.ndarray
  template: encoding.PromptTemplate


def heldout_metrics(model, variables, tokenizer, heldout: HeldOut) -> dict[str, float]:
  out: dict[str, float] = {}
  if heldout.truthfulqa:
    out.update(truthfulqa_mc(model, variables, tokenizer, heldout.truthfulqa, heldout.template))
  if heldout.mmlu:
    out.update(mmlu_accuracy(model, variables, tokenizer, heldout.mmlu_dev, heldout.mmlu, heldout.mmlu_k))
  if len(heldout.ppl_windows):
    out["perplexity"] = perplexity(model, variables, heldout.ppl_windows)
  return out


def load_heldout(tokenizer, data_dir, truthfulqa_items: Sequence[sources.TruthfulQAItem],
                 mmlu_questions: int, mmlu_k: int, ppl_windows: int, ppl_seq_len: int,
                 template: encoding.PromptTemplate, seed: int,
                 corpus: str = "corpus/wikitext-2-test.txt",
                 exclude_mmlu: Sequence[sources.MMLUItem] = ()) -> HeldOut:
  """Held-out TruthfulQA items (given), a seeded MMLU sample and corpus windows.

  `exclude_mmlu` (e.g. MMLU questions that were trained as facts) never enter the sample.
  """
  dev, sample = (), ()
  if mmlu_questions:
    dev = tuple(sources.load_mmlu(data_dir, split="dev"))
    excluded = set(exclude_mmlu)
    test = [item for item in sources.load_mmlu(data_dir, split="test") if item not in excluded]
    pick = np.random.default_rng([4, seed]).choice(len(test), size=min(mmlu_questions, len(test)),
                                                   replace=False)
    sample = tuple(test[i] for i in sorted(pick))
  windows = np.zeros((0, ppl_seq_len + 1), np.int32)
  if ppl_windows:
    root = sources.resolve_data_dir(data_dir)
    path = pathlib.Path(corpus) if pathlib.Path(corpus).is_absolute() or root is None else root / corpus
    if not path.is_file():
      raise FileNotFoundError(f"perplexity corpus {path} not found (set eval.corpus to a text file)")
    windows = encoding.corpus_windows(tokenizer, path, ppl_seq_len, ppl_windows)
  return HeldOut(tuple(truthfulqa_items), dev, sample, mmlu_k, windows, template)


def recall_callback(model: Transformer, variables_of: Callable[[train_lib.TrainState], dict[str, Any]],
                    tokenizer, facts: Sequence[facts_lib.Fact], template: encoding.PromptTemplate,
                    every: int, stop_at_full: bool) -> Callable:
  """A `train.fit` `on_epoch` hook: exact-match recall every `every` epochs; stops at 100%.

  `variables_of(state)` gives the model's variables for a train state.
  """

  def on_epoch(epoch: int, state: train_lib.TrainState, fact_loss: np.ndarray) -> dict[str, Any]:
    del fact_loss
    if every <= 0 or (epoch + 1) % every:
      return {}
    rate = recall(model, variables_of(state), tokenizer, facts, template).rate
    return {"recall": rate, "stop": bool(stop_at_full and rate == 1.0)}

  return on_epoch


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lamini_jax.evaluate",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--model", help="Hugging Face directory or hub id (the base model; not with --run)")
  parser.add_argument("--run", type=pathlib.Path, help="a run directory of experiments.randomization")
  parser.add_argument("--adapter", help="which trained model of --run to load (its label, e.g. lora-real,"
                      " mome-random; optional when the run holds one)")
  parser.add_argument("--facts", type=pathlib.Path, help="JSONL/CSV of question/answer facts: loss and recall")
  parser.add_argument("--truthfulqa", type=int, default=0, help="held-out TruthfulQA questions (MC1/MC2)")
  parser.add_argument("--mmlu", type=int, default=0, help="MMLU test questions (seeded sample)")
  parser.add_argument("--mmlu-k", type=int, default=0)
  parser.add_argument("--ppl-windows", type=int, default=0)
  parser.add_argument("--ppl-seq-len", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-dir")
  parser.add_argument("--template", default=encoding.PromptTemplate().prompt,
                      help="prompt template (ignored with --run, which has its own)")
  parser.add_argument("--json", type=pathlib.Path, help="also write the metrics here")
  args = parser.parse_args(argv)
  if (args.model is None) == (args.run is None):
    parser.error("give exactly one of --model (a base model) and --run (a trained model of a run)")
  if args.adapter is not None and args.run is None:
    parser.error("--adapter picks a trained model of --run; give --run RUN_DIR")
  try:
    if args.run is not None:
      trained = runs.load_trained(args.run, args.adapter)
      cfg, tokenizer = trained.backbone.cfg, trained.backbone.tokenizer
      model, variables, template = trained.model, trained.variables, trained.template
    else:
      cfg, params, model_dir = hf.load_pretrained(args.model)
      tokenizer = hf.load_tokenizer(model_dir)
      model, variables = Transformer(cfg), {"params": params}
      template = encoding.PromptTemplate(args.template.replace("\\n", "\n"))
    tqa: Sequence[sources.TruthfulQAItem] = ()
    if args.truthfulqa:
      _, tqa = facts_lib.split_items(sources.load_truthfulqa(args.data_dir), 0, args.truthfulqa,
                                     args.seed)
    heldout = load_heldout(tokenizer, args.data_dir, tqa, args.mmlu, args.mmlu_k, args.ppl_windows,
                           args.ppl_seq_len, template, args.seed)
    metrics = heldout_metrics(model, variables, tokenizer, heldout)
    if args.facts is not None:
      facts = facts_lib.load_facts_file(args.facts)
      enc = encoding.encode_facts(tokenizer, template, facts, cfg.max_position_embeddings)
      metrics["fact_loss"] = float(np.mean(fact_losses(model, variables, enc)))
      metrics["recall"] = recall(model, variables, tokenizer, facts, template).rate
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, value in metrics.items():
    print(f"{name:>14}: {value:.4f}" if isinstance(value, float) else f"{name:>14}: {value}")
  if args.json is not None:
    args.json.write_text(json.dumps(metrics, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
