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
from typing import Any, Sequence

import jax
import numpy as np

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import corpus as corpus_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import generate as gen
from lamini_jax import hf
from lamini_jax.recall import Recall, recall, recall_callback  # recall's home; kept importable here
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

  `first`: only each sequence's first `first` masked tokens count. Sequences are scored in
  order of length, each batch padded to its own longest one (rounded up to 32 tokens), so
  short sequences do not pay for the longest one: the forward pass compiles once per width.
  """
  if not encoded:
    return np.zeros(0), np.zeros(0)
  lengths = np.array([len(e.tokens) for e in encoded])
  if lengths.max() > model.cfg.max_position_embeddings:
    raise ValueError(f"a scored sequence has {lengths.max()} tokens, more than the model's context of "
                     f"{model.cfg.max_position_embeddings}")
  order = np.argsort(lengths, kind="stable")
  results = []
  for start in range(0, len(encoded), batch_size):
    rows = order[start:start + batch_size]
    seq_len = min(_bucket(int(lengths[rows].max())), model.cfg.max_position_embeddings)
    tokens_NxT, mask_NxT = batch_lib.stack_encoded([encoded[i] for i in rows], seq_len, pad_id)
    if first is not None:
      mask_NxT = mask_NxT * (np.cumsum(mask_NxT > 0, axis=1) <= first)
    fill = batch_size - len(rows)  # every batch of one width has one shape
    tokens_NxT = np.pad(tokens_NxT, ((0, fill), (0, 0)), constant_values=pad_id)
    mask_NxT = np.pad(mask_NxT, ((0, fill), (0, 0)))
    results.append((rows, _row_nll(model, variables, *jax.device_put((tokens_NxT, mask_NxT)))))
  sums, counts = np.zeros(len(encoded)), np.zeros(len(encoded))
  for rows, (row_sum, row_count) in results:
    sums[rows] = -np.asarray(row_sum)[:len(rows)]
    counts[rows] = np.asarray(row_count)[:len(rows)]
  return sums, counts


def fact_losses(model, variables, encoded, batch_size=32, pad_id=0) -> np.ndarray:
  """Mean next-token NLL of each fact's answer and EOS (the training loss per fact)."""
  ll, count = score(model, variables, encoded, batch_size, pad_id)
  return -ll / np.maximum(count, 1)


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
  """The held-out material of one split (dev or test) that every model of a run is evaluated on."""

  split: str
  truthfulqa: tuple[sources.TruthfulQAItem, ...]
  mmlu_shots: tuple[sources.MMLUItem, ...]  # MMLU's own dev rows: the k-shot examples
  mmlu: tuple[sources.MMLUItem, ...]
  mmlu_k: int
  ppl_windows: dict[str, np.ndarray]  # metric name (perplexity, perplexity_ood) -> [W, T + 1]
  template: encoding.PromptTemplate
  locality_texts: tuple[str, ...] = ()  # unrelated prompts of `locality`: sentence starts
  sources: dict[str, str] = dataclasses.field(default_factory=dict)  # figure -> its data, in words


def heldout_metrics(model, variables, tokenizer, heldout: HeldOut) -> dict[str, float]:
  """TruthfulQA MC1/MC2 and answer losses, MMLU accuracy and each perplexity of the split."""
  out: dict[str, float] = {}
  if heldout.truthfulqa:
    out.update(truthfulqa_mc(model, variables, tokenizer, heldout.truthfulqa, heldout.template))
  if heldout.mmlu:
    out.update(mmlu_accuracy(model, variables, tokenizer, heldout.mmlu_shots, heldout.mmlu,
                             heldout.mmlu_k))
  for name, windows_WxT in heldout.ppl_windows.items():
    out[name] = perplexity(model, variables, windows_WxT)
  return out


def _ppl_corpora(spec: runs.EvalSpec) -> dict[str, tuple[str, str, str]]:
  """metric name -> (corpus, articles, config field) of a split's perplexity text."""
  if spec.split == "dev":
    return {"perplexity": (spec.dev_corpus, spec.dev_articles, "eval.dev_corpus")}
  out = {"perplexity": (spec.corpus, "all", "eval.corpus")}
  if spec.ood_corpus:
    out["perplexity_ood"] = (spec.ood_corpus, "all", "eval.ood_corpus")
  return out


def load_heldout(tokenizer, spec: runs.EvalSpec, data_dir,
                 truthfulqa_items: Sequence[sources.TruthfulQAItem],
                 template: encoding.PromptTemplate, seed: int = 0,
                 exclude_mmlu: Sequence[sources.MMLUItem] = ()) -> HeldOut:
  """The material of `spec.split`: TruthfulQA items (given: `runs.facts_and_heldout`), a
  sample of the split's MMLU subjects drawn by `seed`, perplexity windows and sentence starts.

  dev: MMLU `sources.MMLU_DEV_SUBJECTS`, perplexity on the `eval.dev_articles` of
  `eval.dev_corpus`. test: the other MMLU subjects, perplexity on `eval.corpus` and (as
  `perplexity_ood`) `eval.ood_corpus`. The locality prompts are sentence starts of the
  split's `perplexity` text. `exclude_mmlu` (e.g. MMLU questions trained as facts) never
  enter the sample.
  """
  if spec.split not in runs.SPLITS:
    raise ValueError(f"eval.split must be dev or test, got {spec.split!r}")
  dev = spec.split == "dev"
  about = {"truthfulqa": f"{len(truthfulqa_items)} held-out TruthfulQA questions of the {spec.split}"
                         " split"}
  shots, sample = (), ()
  if spec.mmlu_questions:
    subjects = sources.MMLU_DEV_SUBJECTS if dev else sources.MMLU_TEST_SUBJECTS
    shots = tuple(sources.load_mmlu(data_dir, split="dev", subjects=subjects))
    excluded = set(exclude_mmlu)
    pool = [item for item in sources.load_mmlu(data_dir, split="test", subjects=subjects)
            if item not in excluded]
    pick = np.random.default_rng([4, seed]).choice(len(pool), size=min(spec.mmlu_questions, len(pool)),
                                                   replace=False)
    sample = tuple(pool[i] for i in sorted(pick))
    about["mmlu"] = (f"{len(sample)} MMLU questions drawn ({spec.mmlu_k}-shot) from the "
                     f"{len(subjects)} {spec.split} subjects; mmlu_scored: those that fit the context")
  windows, texts = {}, ()
  for name, (relative, articles, field) in _ppl_corpora(spec).items():
    locality_texts = name == "perplexity" and spec.locality_prompts
    if not (spec.ppl_windows or locality_texts):
      continue
    path = runs.data_file(data_dir, relative, field)
    text_name = relative + ("" if articles == "all" else f" ({articles} articles)")
    if spec.ppl_windows:
      with corpus_lib.corpus_file(path, articles) as part:
        windows[name] = encoding.corpus_windows(tokenizer, part, spec.ppl_seq_len, spec.ppl_windows)
      about[name] = f"{len(windows[name])} windows of {spec.ppl_seq_len} tokens of {text_name}"
    if locality_texts:
      texts = tuple(corpus_lib.sentence_starts(corpus_lib.read_corpus(path, articles),
                                               spec.locality_prompts))
      about["locality"] = (f"greedy {spec.locality_tokens} tokens against the base model's, on the "
                           f"{len(truthfulqa_items)} held-out questions and {len(texts)} sentence "
                           f"starts of {text_name}")
  return HeldOut(spec.split, tuple(truthfulqa_items), shots, sample, spec.mmlu_k, windows, template,
                 texts, about)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lamini_jax.evaluate",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--model", help="Hugging Face directory or hub id (the base model; not with --run)")
  parser.add_argument("--run", type=pathlib.Path, help="a run directory of experiments.randomization")
  parser.add_argument("--adapter", help="which trained model of --run to load (its label, e.g. lora-real,"
                      " mome-random; optional when the run holds one)")
  parser.add_argument("--facts", type=pathlib.Path, help="JSONL/CSV of question/answer facts: loss and recall")
  parser.add_argument("--truthfulqa", type=int, default=0,
                      help="held-out TruthfulQA questions of the split (MC1/MC2)")
  parser.add_argument("--mmlu", type=int, default=0,
                      help="MMLU questions of the split's subjects (seeded sample)")
  parser.add_argument("--mmlu-k", type=int, default=0)
  parser.add_argument("--ppl-windows", type=int, default=0)
  parser.add_argument("--ppl-seq-len", type=int, default=128)
  parser.add_argument("--split", choices=runs.SPLITS, default="dev",
                      help="which held-out questions, MMLU subjects and perplexity text (runs.EvalSpec)")
  parser.add_argument("--seed", type=int, default=0, help="draws the held-out questions (a run's "
                      "data.heldout_seed) and the MMLU sample")
  parser.add_argument("--data-dir")
  parser.add_argument("--template", default=encoding.PromptTemplate().prompt,
                      help="prompt template (ignored with --run, which has its own)")
  parser.add_argument("--base", action="store_true",
                      help="with --run: its backbone alone, on the run's prompt template and answer "
                      "end (the base model to compare the run with, on the same tokens)")
  parser.add_argument("--json", type=pathlib.Path, help="also write the metrics here")
  args = parser.parse_args(argv)
  if (args.model is None) == (args.run is None):
    parser.error("give exactly one of --model (a base model) and --run (a trained model of a run)")
  if args.adapter is not None and args.run is None:
    parser.error("--adapter picks a trained model of --run; give --run RUN_DIR")
  if args.base and args.run is None:
    parser.error("--base evaluates the backbone of --run; give --run RUN_DIR (or --model alone)")
  try:
    if args.run is not None:
      trained = runs.load_trained(args.run, args.adapter)
      cfg, tokenizer = trained.backbone.cfg, trained.backbone.tokenizer
      model, variables, template = trained.model, trained.variables, trained.template
      if args.base:
        model, variables = Transformer(cfg), {"params": trained.backbone.params}
    else:
      cfg, params, model_dir = hf.load_pretrained(args.model)
      tokenizer = hf.load_tokenizer(model_dir)
      model, variables = Transformer(cfg), {"params": params}
      template = encoding.PromptTemplate(args.template.replace("\\n", "\n"))
    tqa = facts_lib.split_questions(sources.load_truthfulqa(args.data_dir), args.truthfulqa, 0, 0,
                                    heldout_seed=args.seed).heldout(args.split)
    spec = runs.EvalSpec(split=args.split, mmlu_questions=args.mmlu, mmlu_k=args.mmlu_k,
                         ppl_windows=args.ppl_windows, ppl_seq_len=args.ppl_seq_len, locality_prompts=0)
    heldout = load_heldout(tokenizer, spec, args.data_dir, tqa, template, args.seed)
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
