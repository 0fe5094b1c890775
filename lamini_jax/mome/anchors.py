"""Anchors: text on which the MoME layers must stay silent during phase 2.

`anchor_sequences` builds the pool (corpus windows and question/answer pairs
neither trained nor held out); `anchor_penalty` is each MoME layer's mean
squared output norm over the anchor tokens of a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.mome.config import AnchorConfig


ANCHOR = "anchor"  # key of the anchor sequences in a phase-2 step's `frozen`


def anchor_penalty(outs: Any, mask_BxT: jax.Array) -> jax.Array:
  """Sum over MoME layers of the mean squared output norm over the anchor tokens.

  `outs` is the "mome_out" collection of a step whose last G rows are anchors;
  mask_BxT marks their real tokens (positions past L are padding).
  """
  g, length = mask_BxT.shape
  total = jnp.zeros((), jnp.float32)
  for y_BxTxD in jax.tree.leaves(outs):
    sq_BxT = jnp.sum(jnp.square(y_BxTxD[-g:, :length].astype(jnp.float32)), axis=-1)
    total = total + jnp.sum(sq_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)
  return total


def anchor_sequences(tokenizer, template: encoding.PromptTemplate, cfg: AnchorConfig,
                     questions: Sequence[tuple[str, str]], corpus_path=None, *,
                     pad_id: int) -> dict[str, np.ndarray]:
  """{"tokens": [A, L] int32, "mask": [A, L] float32}: the anchor pool of `make_tuning_step`.

  Corpus windows of `corpus_path` (a text file; None: none) and the (question,
  answer) pairs in the template, each cut or right-padded to L = cfg.seq_len;
  the mask marks real tokens.
  """
  length = cfg.seq_len
  seqs: list[np.ndarray] = []
  if corpus_path is not None and cfg.windows:
    seqs += list(encoding.corpus_windows(tokenizer, corpus_path, length - 1, cfg.windows))
  if questions:
    facts = [facts_lib.Fact(q, a, f"anchor {i}") for i, (q, a) in enumerate(questions)]
    encoded = encoding.encode_facts(tokenizer, template, facts, max_len=10**9)
    seqs += [e.tokens[:length] for e in encoded]
  if not seqs:
    raise ValueError("anchor_sequences: no anchor text (no corpus windows and no questions)")
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.float32)
  for i, seq in enumerate(seqs):
    tokens[i, :len(seq)], mask[i, :len(seq)] = seq, 1.0
  return {"tokens": tokens, "mask": mask}
