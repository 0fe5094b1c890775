"""Prompt encoding: the prompt template, facts and choices as token arrays, corpus windows.

Token conventions (`encode_fact`): tokens = [BOS] + prompt + answer + [EOS]; `loss_mask[t]` is
True where token t is a training target (answer tokens and the EOS), so a loss pairs
`logits[:, :-1]` with `tokens[:, 1:]` and `loss_mask[:, 1:]`. `encode_prompt` returns exactly the
tokens before the answer. The prompt and its continuation (one space and the answer, as
`PromptTemplate.join` writes them) are tokenized apart and joined, as generation sees them, so a
tokenizer that merges the prompt's last piece with the following space (`:▁`) cannot make a fact
untrainable. With the Llama SentencePiece tokenizers in `../shared` this gives the same tokens as
tokenizing the joined text, for every TruthfulQA fact (real and random answers), the first 3,000
MMLU facts and 2,088 TruthfulQA choices (checked 2026-12-02); templates that end in white space
(`A:\n`) get the answer's own first piece (`▁Port` rather than `Port`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from lamini_jax.data.facts import Fact


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """Text before the answer; `{question}` is replaced. The answer follows after one space.

  `answer_end` is a stop sequence written after every trained answer (before EOS,
  and trained like it): greedy decoding counts an answer as finished at EOS or at
  `answer_end`. A newline suits models that never learned to emit EOS (such as
  the shared stories260K) and is harmless for those that did; "" disables it.
  `train_eos=False` leaves the EOS token out of trained facts, for a backbone
  whose EOS embedding was never trained (it cannot be learned with the
  embeddings frozen, and would put a floor under every fact's loss).
  """
  prompt: str = "Question: {question}\nAnswer:"
  answer_end: str = "\n"
  train_eos: bool = True

  def __post_init__(self):
    if "{question}" not in self.prompt:
      raise ValueError(f"PromptTemplate.prompt must contain '{{question}}', got {self.prompt!r}")
    try:
      self.prompt.format(question="")
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(
          f"PromptTemplate.prompt {self.prompt!r} has a format field other than {{question}} "
          f"({type(e).__name__}: {e}); write literal braces as '{{{{' and '}}}}'") from e
    if self.prompt.endswith((" ", "\t")):
      raise ValueError(
          f"PromptTemplate.prompt must not end with a space or tab, got {self.prompt!r}: "
          "the answer is joined to it with one space")

  def render(self, question: str) -> str:
    return self.prompt.format(question=question)

  def join(self, question: str, answer: str) -> str:
    """The rendered prompt, one space (none if it ends in whitespace: a newline), the answer."""
    text = self.render(question)
    return text + answer if text[-1:].isspace() else f"{text} {answer}"


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedFact:
  """tokens [T] int32 and loss_mask [T] bool; loss_mask[t] marks token t as a target."""
  tokens: np.ndarray
  loss_mask: np.ndarray

  def __post_init__(self):
    if self.tokens.ndim != 1 or self.tokens.dtype != np.int32:
      raise ValueError(f"EncodedFact.tokens must be 1-D int32, got {self.tokens.dtype} "
                       f"{self.tokens.shape}")
    if self.loss_mask.shape != self.tokens.shape or self.loss_mask.dtype != np.bool_:
      raise ValueError(f"EncodedFact.loss_mask must be bool of shape {self.tokens.shape}, got "
                       f"{self.loss_mask.dtype} {self.loss_mask.shape}")

  @property
  def prompt_len(self) -> int:
    """Number of tokens before the first target (BOS and prompt)."""
    return int(np.argmax(self.loss_mask)) if self.loss_mask.any() else len(self.tokens)


def _bos(tokenizer) -> list[int]:
  return [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
  return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _prompt_and_answer_ids(tokenizer, template: PromptTemplate, pairs: Sequence[tuple[str, str]],
                           names: Sequence[str]) -> list[tuple[list[int], list[int]]]:
  """For each (question, answer): BOS + prompt token ids, and the answer's ids after them.

  The prompt and the continuation (the text `template.join` puts after the prompt:
  a space, the answer) are tokenized apart and joined, which is what generation
  sees: it starts from the prompt's own tokens. No tokenizer's merges across the
  boundary (a piece like ':▁' that takes the space after the prompt) can then
  make a fact untrainable. One batched tokenizer call for every text.
  """
  prompts = [template.render(q) for q, _ in pairs]
  continuations = [template.join(q, a)[len(p):] for (q, a), p in zip(pairs, prompts)]
  ids = _token_ids(tokenizer, prompts + continuations)
  bos = _bos(tokenizer)
  result = []
  for name, prompt_ids, answer_ids in zip(names, ids[:len(pairs)], ids[len(pairs):]):
    if not answer_ids:
      raise ValueError(f"{name}: the answer adds no tokens")
    result.append((bos + prompt_ids, answer_ids))
  return result


def _encoded(prefix: list[int], answer: list[int]) -> EncodedFact:
  return EncodedFact(
      tokens=np.asarray(prefix + answer, np.int32),
      loss_mask=np.asarray([False] * len(prefix) + [True] * len(answer)))


def encode_facts(tokenizer, template: PromptTemplate, facts: Sequence[Fact],
                 max_len: int) -> list[EncodedFact]:
  """`encode_fact` for each fact, with one batched tokenizer call."""
  if tokenizer.eos_token_id is None:
    raise ValueError("encode_fact: the tokenizer has no eos_token_id; facts end with EOS")
  eos = int(tokenizer.eos_token_id)
  names = [f"fact {fact.fact_id!r}" for fact in facts]
  split_ids = _prompt_and_answer_ids(
      tokenizer, template, [(fact.question, fact.answer + template.answer_end) for fact in facts],
      names)
  encoded = []
  for name, (prefix, answer) in zip(names, split_ids):
    encoded.append(_encoded(prefix, answer + [eos] if template.train_eos else answer))
    if len(encoded[-1].tokens) > max_len:
      raise ValueError(f"{name}: {len(encoded[-1].tokens)} tokens, more than max_len={max_len}")
  return encoded


def encode_fact(tokenizer, template: PromptTemplate, fact: Fact, max_len: int) -> EncodedFact:
  """[BOS] + prompt + answer + answer_end + EOS (if `train_eos`); loss mask on all after the prompt."""
  return encode_facts(tokenizer, template, [fact], max_len)[0]


def encode_prompt(tokenizer, template: PromptTemplate, question: str) -> np.ndarray:
  """[T] int32: the tokens `encode_fact` puts before the answer; generation starts here."""
  prompt_ids = _token_ids(tokenizer, [template.render(question)])[0]
  return np.asarray(_bos(tokenizer) + prompt_ids, np.int32)


def encode_choices(tokenizer, template: PromptTemplate, question: str,
                   choices: Sequence[str]) -> list[EncodedFact]:
  """One sequence per choice: [BOS] + prompt + choice, mask on the choice tokens.

  No EOS is appended, so a choice's masked log-likelihood scores the choice text alone (as in
  the TruthfulQA MC and MMLU evaluations).
  """
  names = [f"choice {i} ({c!r}) of question {question[:40]!r}" for i, c in enumerate(choices)]
  split_ids = _prompt_and_answer_ids(tokenizer, template, [(question, c) for c in choices], names)
  return [_encoded(prefix, answer) for prefix, answer in split_ids]


def corpus_windows(tokenizer, path: str | os.PathLike, seq_len: int,
                   max_windows: int) -> np.ndarray:
  """[W, seq_len + 1] int32 windows over the tokenized text file, W <= max_windows.

  The whole file is tokenized at once and cut into consecutive chunks of seq_len tokens from
  the start; each text token is a target (not column 0) in exactly one window. With a BOS token
  each window is [BOS] + chunk; without one, column 0 is the token before the chunk (window 0
  starts at the first token).
  """
  if seq_len < 1 or max_windows < 1:
    raise ValueError(
        f"corpus_windows: seq_len={seq_len} and max_windows={max_windows} must be >= 1")
  path = pathlib.Path(path)
  text = path.read_text(encoding="utf-8")
  ids = np.asarray(_token_ids(tokenizer, [text])[0], np.int32)
  bos = _bos(tokenizer)
  if bos:
    n = min(max_windows, len(ids) // seq_len)
    chunks = ids[:n * seq_len].reshape(n, seq_len)
    windows = np.concatenate([np.full((n, 1), bos[0], np.int32), chunks], axis=1)
  else:
    n = min(max_windows, max(len(ids) - 1, 0) // seq_len)
    starts = np.arange(n) * seq_len
    windows = ids[starts[:, None] + np.arange(seq_len + 1)[None, :]]
  if n == 0:
    raise ValueError(f"{path}: {len(ids)} tokens, not enough for one window of seq_len={seq_len}")
  return windows.astype(np.int32)
