"""Exact-match recall of trained facts: greedy decoding, and the one-pass check a training run uses.

`recall` decodes every question greedily and compares the text up to the first stop with
the trained answer. `FactRecall` gives the same verdicts for one fixed set of facts, again
and again as a model trains (`recall_callback`, every few epochs), mostly without decoding:

1. One teacher-forced, jitted forward pass over the facts' trained sequences gives, for each
   fact, whether every trained answer token is the argmax after its prefix. If so, greedy
   decoding emits exactly the trained tokens, and whether they recall the answer was
   settled once, from their text. If not, the pass also gives the first position where
   greedy decoding leaves the trained tokens and the token it emits there.
2. That prefix plus that token almost always settles the verdict as well: its text already
   differs from the answer (ignoring white space), or already ends wrongly. Only the rare
   fact whose text could still become the answer through other tokens (the answer spelled
   in other pieces, such as `▁` then `R` for `▁R`) is decoded greedily, as `recall` does,
   in batches of the one shape `recall` decodes in.

Verdicts equal `recall`'s up to float near-ties between the two ways of computing the same
logits (a full sequence here, a KV cache there): they agreed on every fact of every check
of the default LoRA runs (docs/speed.md). A fact recalled only through other tokens than its
trained ones (step 2's rare case) can sit on such a near-tie: `FactRecall.forced` says which
facts are recalled through their trained tokens, each the argmax, and `recall_callback(...,
forced=True)` stops training only when all of them are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax import generate as gen
from lamini_jax.model import Transformer
from lamini_jax import train as train_lib

WIDTH_BUCKET = 32  # teacher-forced batches are their longest sequence rounded up to this


@dataclasses.dataclass
class Recall:
  exact: np.ndarray  # bool per fact: greedy decoding reproduces the answer and stops
  answers: list[str]  # what the model generated for each question

  @property
  def rate(self) -> float:
    return float(np.mean(self.exact)) if len(self.exact) else float("nan")


def _max_new_tokens(tokenizer, facts: Sequence[facts_lib.Fact]) -> int:
  """Greedy decoding's budget: the longest answer's tokens plus 3 (for the stop)."""
  return max(len(tokenizer(f.answer, add_special_tokens=False).input_ids) for f in facts) + 3


def _answer_text(tokenizer, template: encoding.PromptTemplate, new: Sequence[int],
                 max_new_tokens: int) -> tuple[str, bool]:
  """(text up to the first stop, whether generation stopped) of new tokens cut before EOS."""
  text = tokenizer.decode(new, skip_special_tokens=True)
  eos = tokenizer.eos_token_id
  ended = len(new) < max_new_tokens or (eos is not None and eos in new)
  if template.answer_end and template.answer_end in text:
    text, ended = text.split(template.answer_end, 1)[0], True
  return text, ended


def _greedy(model: Transformer, variables: Any, tokenizer, prompts: Sequence[Sequence[int]],
            template: encoding.PromptTemplate, max_new_tokens: int, batch_size: int,
            filler: Sequence[int]) -> tuple[list[str], list[bool]]:
  """(answer text, stopped) of each prompt, decoded greedily `batch_size` prompts at a time.

  Every batch is filled up with `filler` (the longest prompt of the facts) to `batch_size + 1`
  rows, so every batch has one shape, whichever prompts it holds: `recall` and the facts
  `FactRecall` decodes share one compiled decoder.
  """
  sampling = gen.SamplingConfig(max_new_tokens=max_new_tokens)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  answers, stopped = [], []
  for start in range(0, len(prompts), batch_size):
    chunk = [list(p) for p in prompts[start:start + batch_size]]
    n = len(chunk)
    chunk += [list(filler)] * (batch_size + 1 - n)
    for new in gen.generate(model, variables, chunk, sampling, pad)[:n]:
      text, ended = _answer_text(tokenizer, template, new, max_new_tokens)
      answers.append(text.strip())
      stopped.append(ended)
  return answers, stopped


def recall(model: Transformer, variables: Any, tokenizer, facts: Sequence[facts_lib.Fact],
           template: encoding.PromptTemplate, batch_size: int = 64) -> Recall:
  """Exact-match recall by greedy decoding (the hallucination rate is 1 - recall).

  A fact counts as recalled when the generated text up to the first stop (the
  end-of-sequence token, or the template's `answer_end`) equals the trained answer
  character for character, leading white space aside: the model must produce the
  answer and then stop. Without any stop the answer is not counted.
  """
  if not facts:
    return Recall(np.zeros(0, bool), [])
  prompts = [encoding.encode_prompt(tokenizer, template, f.question).tolist() for f in facts]
  answers, stopped = _greedy(model, variables, tokenizer, prompts, template,
                             _max_new_tokens(tokenizer, facts), batch_size, max(prompts, key=len))
  exact = np.array([s and a == f.answer.strip() for a, s, f in zip(answers, stopped, facts)], bool)
  return Recall(exact, answers)


@functools.partial(jax.jit, static_argnames=("model",))
def _first_miss(model: Transformer, variables: Any, tokens_BxT: jax.Array, target_BxT: jax.Array):
  """Teacher-forced greedy check of each row: (every target token is the argmax after its
  prefix, the first position where it is not, the argmax there, the smallest logit gap over the
  target tokens: the target's logit minus the best other token's, +inf for a row without any)."""
  logits_BxTxV, _ = model.apply(variables, tokens_BxT)
  logits_BxTxV = logits_BxTxV[:, :-1].astype(jnp.float32)
  pred_BxT = jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
  next_BxT = tokens_BxT[:, 1:]
  miss_BxT = target_BxT[:, 1:] & (pred_BxT != next_BxT)
  first_B = jnp.argmax(miss_BxT, axis=1)
  own_BxT = jnp.take_along_axis(logits_BxTxV, next_BxT[..., None], axis=-1)[..., 0]
  vocab_V = jnp.arange(logits_BxTxV.shape[-1])
  other_BxT = jnp.max(jnp.where(vocab_V == next_BxT[..., None], -jnp.inf, logits_BxTxV), axis=-1)
  gap_B = jnp.min(jnp.where(target_BxT[:, 1:], own_BxT - other_BxT, jnp.inf), axis=1)
  return (~jnp.any(miss_BxT, axis=1), first_B + 1,
          jnp.take_along_axis(pred_BxT, first_B[:, None], axis=1)[:, 0], gap_B)


def _squash(text: str) -> str:
  return "".join(text.split())


class FactRecall:
  """`recall(...).exact` of fixed facts for any variables of `model`, mostly without decoding.

  See the module docstring. `undecided` holds how many facts the last call decoded, `forced`
  which facts it found recalled through their trained tokens, each the argmax after its prefix,
  `gap` each fact's smallest logit margin of a trained token over the best other token (> 0
  where every trained token is the argmax).
  """

  def __init__(self, model: Transformer, tokenizer, facts: Sequence[facts_lib.Fact],
               template: encoding.PromptTemplate, batch_size: int = 32, decode_batch_size: int = 64):
    self.model, self.tokenizer, self.template = model, tokenizer, template
    self.facts = list(facts)
    self.decode_batch_size = decode_batch_size
    self.undecided = 0
    self.forced = np.zeros(len(facts), bool)  # the last call's facts recalled through their trained tokens
    self.gap = np.zeros(len(facts))  # the last call's smallest logit gap over each fact's trained tokens
    if not self.facts:
      return
    self._eos_ids = set(model.cfg.eos_token_ids or ())
    self._max_new = _max_new_tokens(tokenizer, self.facts)
    encoded = encoding.encode_facts(tokenizer, template, self.facts, model.cfg.max_position_embeddings)
    self._prompt_len = [e.prompt_len for e in encoded]
    self._prompts = [e.tokens[:e.prompt_len].tolist() for e in encoded]
    self._targets = [e.tokens[e.prompt_len:].tolist() for e in encoded]
    self._filler = max(self._prompts, key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = np.argsort([len(e.tokens) for e in encoded], kind="stable")
    self._batches = []  # (fact indices, tokens_BxT, target_BxT), facts of similar length together
    for start in range(0, len(order), batch_size):
      index = order[start:start + batch_size]
      width = min(-(-max(len(encoded[i].tokens) for i in index) // WIDTH_BUCKET) * WIDTH_BUCKET,
                  model.cfg.max_position_embeddings)
      tokens_BxT = np.full((batch_size, width), pad, np.int32)
      target_BxT = np.zeros((batch_size, width), bool)
      for row, i in enumerate(index):
        tokens_BxT[row, :len(encoded[i].tokens)] = encoded[i].tokens
        target_BxT[row, :len(encoded[i].tokens)] = encoded[i].loss_mask
      self._batches.append((index, tokens_BxT, target_BxT))
    # What greedy decoding that emits exactly the trained tokens recalls: True, False, or
    # None where the trained tokens hold no stop (the verdict hangs on what follows).
    self._trained_verdict = [self._verdict(t, f.answer)[0] for t, f in zip(self._targets, self.facts)]

  def _verdict(self, new: list[int], answer: str) -> tuple[bool | None, str]:
    """(whether greedy output that begins with `new` recalls `answer`, if already settled; the
    text of `new` up to its first stop)."""
    cut = next((k for k, t in enumerate(new) if t in self._eos_ids), None)
    new = new[:cut] if cut is not None else new[:self._max_new]
    text = self.tokenizer.decode(new, skip_special_tokens=True)
    end = self.template.answer_end
    if end and end in text:
      return text.split(end, 1)[0].strip() == answer.strip(), text.split(end, 1)[0]
    if cut is None:
      return None, text  # no stop yet: the tokens after `new` decide
    return _answer_text(self.tokenizer, self.template, new, self._max_new)[1] and (
        text.strip() == answer.strip()), text

  def _miss_settled(self, i: int, first: int, token: int) -> bool:
    """Whether greedy decoding, leaving fact i's trained tokens at `first` for `token`, is
    certain not to recall it (else it is decoded)."""
    verdict, text = self._verdict(self._targets[i][:first - self._prompt_len[i]] + [token],
                                  self.facts[i].answer)
    said, answer = _squash(text), _squash(self.facts[i].answer)
    if verdict is None:  # not stopped: settled unless the text could still grow into the answer
      return "\ufffd" not in text and not answer.startswith(said)
    return not verdict and said != answer

  def __call__(self, variables: Any) -> np.ndarray:
    """bool per fact: greedy decoding with `variables` reproduces the answer and stops."""
    n = len(self.facts)
    exact, undecided, forced = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    outs = [(index, _first_miss(self.model, variables, tokens_BxT, target_BxT))
            for index, tokens_BxT, target_BxT in self._batches]  # dispatched together
    gap = np.full(n, -np.inf)
    for index, (hit_B, first_B, token_B, gap_B) in outs:
      hit_B, first_B, token_B = np.asarray(hit_B), np.asarray(first_B), np.asarray(token_B)
      gap[index] = np.asarray(gap_B)[:len(index)]
      for row, i in enumerate(index):
        if hit_B[row]:
          exact[i] = forced[i] = bool(self._trained_verdict[i])
          undecided[i] = self._trained_verdict[i] is None
        else:
          undecided[i] = not self._miss_settled(i, int(first_B[row]), int(token_B[row]))
    idx = np.flatnonzero(undecided)
    self.undecided, self.forced, self.gap = len(idx), forced, gap
    if len(idx):
      answers, stopped = _greedy(self.model, variables, self.tokenizer, [self._prompts[i] for i in idx],
                                 self.template, self._max_new, self.decode_batch_size, self._filler)
      exact[idx] = [s and a == self.facts[i].answer.strip() for a, s, i in zip(answers, stopped, idx)]
    return exact


# Logits by which every trained token must lead for a `forced` stop: a margin of 7.8e-4 was
# recalled by the teacher-forced pass and lost by greedy decoding (a 2,000-fact tune, 2026-12-04).
STOP_GAP = 0.05


def recall_callback(model: Transformer, variables_of: Callable[[train_lib.TrainState], dict[str, Any]],
                    tokenizer, facts: Sequence[facts_lib.Fact], template: encoding.PromptTemplate,
                    every: int, stop_at_full: bool, forced: bool = False) -> Callable:
  """A `train.fit` `on_epoch` hook: exact-match recall every `every` epochs; stops at 100%.

  `variables_of(state)` gives the model's variables for a train state. The verdicts are
  `recall`'s, computed by `FactRecall`. `forced`: stop only when every fact is also recalled
  through its trained tokens (`FactRecall.forced`), each leading the best other token by at
  least `STOP_GAP`, so that no verdict rests on a near-tie that another computation of the same
  logits (greedy decoding's) could break; the record then holds `recall_forced`, their share,
  and `recall_min_gap`, the smallest logit margin of a trained token over the best other one.
  """
  check = FactRecall(model, tokenizer, facts, template)

  def on_epoch(epoch: int, state: train_lib.TrainState, fact_loss: np.ndarray) -> dict[str, Any]:
    del fact_loss
    if every <= 0 or (epoch + 1) % every:
      return {}
    exact = check(variables_of(state))
    rate = float(np.mean(exact)) if len(exact) else float("nan")
    if not forced:
      return {"recall": rate, "stop": bool(stop_at_full and rate == 1.0)}
    through = float(np.mean(check.forced)) if len(exact) else float("nan")
    gap = float(np.min(check.gap)) if len(exact) else float("nan")
    return {"recall": rate, "recall_forced": through, "recall_min_gap": gap,
            "stop": bool(stop_at_full and rate == through == 1.0 and gap >= STOP_GAP)}

  return on_epoch
