"""Locality by generation: does a tuned model still answer as the base model does?

Teacher-forced averages (perplexity, answer loss) can hide what a user sees. Here every
model answers the same prompts greedily, `max_new_tokens` tokens each, and is compared
with the base model's answers token by token (knowledge-editing work calls the share of
unchanged outputs on unrelated prompts "locality"). Two prompt sets: the held-out
questions in the prompt template, and unrelated text (sentence starts of the split's
corpus, `corpus.sentence_starts`). For each set:

  exact   share of prompts whose answer equals the base model's in every position
  tokens  share of answer positions whose token equals the base model's
  first   share of prompts whose first answer token equals the base model's

An answer that stopped (end of sequence) reads as `STOPPED` after its end, so two answers
that stop at the same place agree there. A model equal to the base model has 1.0 on each.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from lamini_jax.data import encoding
from lamini_jax import generate as gen

STOPPED = -1  # the token of every position after an answer's end
SETS = ("questions", "text")  # metric prefixes: locality_<measure> and locality_text_<measure>


def greedy_tokens(model, variables: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  pad_id: int = 0, batch_size: int = 128) -> np.ndarray:
  """[N, max_new_tokens] int32: each prompt's greedy answer, `STOPPED` after its end.

  Every call of the decoder has the same shape (rows filled up with the longest prompt),
  so a model compiles once however many prompts there are.
  """
  if not prompts:
    return np.zeros((0, max_new_tokens), np.int32)
  if batch_size < 2:
    raise ValueError(f"greedy_tokens: batch_size must be >= 2 (one row is filler), got {batch_size}")
  longest = list(max(prompts, key=len))
  rows = min(batch_size, len(prompts) + 1)
  sampling = gen.SamplingConfig(max_new_tokens=max_new_tokens)
  out_NxT = np.full((len(prompts), max_new_tokens), STOPPED, np.int32)
  for start in range(0, len(prompts), rows - 1):
    chunk = [list(p) for p in prompts[start:start + rows - 1]]
    answers = gen.generate(model, variables, chunk + [longest] * (rows - len(chunk)), sampling, pad_id)
    for i, new in enumerate(answers[:len(chunk)]):
      out_NxT[start + i, :len(new)] = new
  return out_NxT


def agreement(tokens_NxT: np.ndarray, base_NxT: np.ndarray) -> dict[str, float]:
  """exact, tokens and first (module doc) of answers against the base model's."""
  if tokens_NxT.shape != base_NxT.shape:
    raise ValueError(f"agreement: answers of shape {tokens_NxT.shape} against base answers of "
                     f"shape {base_NxT.shape}")
  if not tokens_NxT.size:
    return {"exact": float("nan"), "tokens": float("nan"), "first": float("nan")}
  same_NxT = tokens_NxT == base_NxT
  return {"exact": float(np.mean(same_NxT.all(axis=1))), "tokens": float(np.mean(same_NxT)),
          "first": float(np.mean(same_NxT[:, 0]))}


@dataclasses.dataclass(frozen=True)
class Reference:
  """The prompts of a locality check (token ids) and the base model's answers to them."""

  questions: tuple[tuple[int, ...], ...]
  texts: tuple[tuple[int, ...], ...]
  base_questions_NxT: np.ndarray
  base_texts_MxT: np.ndarray
  max_new_tokens: int
  pad_id: int

  def answers(self, model, variables: Any) -> tuple[np.ndarray, np.ndarray]:
    """(answers to the questions, answers to the texts) of a model, in one batched decode."""
    tokens = greedy_tokens(model, variables, self.questions + self.texts, self.max_new_tokens,
                           self.pad_id)
    return tokens[:len(self.questions)], tokens[len(self.questions):]


def reference(model, variables: Any, tokenizer, questions: Sequence[str],
              template: encoding.PromptTemplate, texts: Sequence[str],
              max_new_tokens: int = 32) -> Reference:
  """The base model's (`model`, `variables`) answers to the questions and the text prompts."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  q = tuple(tuple(encoding.encode_prompt(tokenizer, template, x).tolist()) for x in questions)
  t = tuple(tuple(tokenizer(x).input_ids) for x in texts)
  ref = Reference(q, t, np.zeros((0, max_new_tokens), np.int32),
                  np.zeros((0, max_new_tokens), np.int32), max_new_tokens, pad)
  base_q, base_t = ref.answers(model, variables)
  return dataclasses.replace(ref, base_questions_NxT=base_q, base_texts_MxT=base_t)


def locality_metrics(model, variables: Any, ref: Reference) -> dict[str, float]:
  """locality_{exact,tokens,first} on the questions, locality_text_{...} on the texts."""
  answers = ref.answers(model, variables)
  out = {}
  for name, tokens, base in zip(SETS, answers, (ref.base_questions_NxT, ref.base_texts_MxT)):
    if not len(base):
      continue
    prefix = "locality_" if name == "questions" else "locality_text_"
    out.update({prefix + k: v for k, v in agreement(tokens, base).items()})
  return out
