"""Training batches: facts padded into token arrays, seeded length-bucketed epochs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from lamini_jax.data.encoding import EncodedFact

_SHUFFLE_STREAM = 3  # first word of the epoch-order seed (see data.facts for the other streams)


class Batch(NamedTuple):
  """One training batch; rows with valid_B False are padding (mask 0, fact_index -1)."""
  tokens_BxT: np.ndarray  # int32
  loss_mask_BxT: np.ndarray  # float32
  fact_index_B: np.ndarray  # int32, index into the `encoded` list
  valid_B: np.ndarray  # bool


def num_batches(n: int, batch_size: int) -> int:
  """Batches per epoch of n facts: ceil(n / batch_size); the last one is padded."""
  if n < 0 or batch_size < 1:
    raise ValueError(f"num_batches: n={n} must be >= 0 and batch_size={batch_size} >= 1")
  return -(-n // batch_size)


def stack_encoded(encoded: Sequence[EncodedFact], seq_len: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens_NxT int32 right-padded with pad_id, and loss_mask_NxT float32 (0 on padding)."""
  tokens_NxT = np.full((len(encoded), seq_len), pad_id, np.int32)
  mask_NxT = np.zeros((len(encoded), seq_len), np.float32)
  for i, e in enumerate(encoded):
    if len(e.tokens) > seq_len:
      raise ValueError(f"encoded fact {i}: {len(e.tokens)} tokens, more than seq_len={seq_len}")
    tokens_NxT[i, :len(e.tokens)] = e.tokens
    mask_NxT[i, :len(e.tokens)] = e.loss_mask
  return tokens_NxT, mask_NxT


def epoch_batches(encoded: Sequence[EncodedFact], batch_size: int, seq_len: int, pad_id: int,
                  seed: int, epoch: int, length_bucket: int | None = None) -> Iterator[Batch]:
  """The batches of one epoch: every fact once, in an order fixed by (seed, epoch).

  All batches have `batch_size` rows; the last is filled with invalid rows. Without
  `length_bucket` every batch is `seq_len` wide. With it, facts of similar length
  share a batch ("sortish": a seeded shuffle, sorted by length within windows of
  16 batches, the batches then shuffled) and each batch is only as wide as its
  longest fact rounded up to a multiple of `length_bucket` (at most `seq_len`), so
  a jitted step compiles once per width and computes far less padding.
  """
  if not encoded:
    raise ValueError("epoch_batches: no encoded facts")
  if length_bucket is not None and length_bucket <= 0:
    raise ValueError(f"epoch_batches: length_bucket must be positive, got {length_bucket}")
  n_batches = num_batches(len(encoded), batch_size)
  tokens_NxT, mask_NxT = stack_encoded(encoded, seq_len, pad_id)
  rng = np.random.default_rng([_SHUFFLE_STREAM, seed, epoch])
  order = rng.permutation(len(encoded))
  if length_bucket is not None:
    lengths = np.array([len(e.tokens) for e in encoded])
    window = 16 * batch_size
    order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                            for chunk in np.array_split(order, range(window, len(order), window))])
  groups = [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
  widths = [seq_len] * n_batches
  if length_bucket is not None:
    groups = [groups[i] for i in rng.permutation(n_batches)]
    widths = [min(seq_len, -(-int(lengths[g].max()) // length_bucket) * length_bucket) for g in groups]

  def batches() -> Iterator[Batch]:
    for index, width in zip(groups, widths):
      n = len(index)
      tokens_BxT = np.full((batch_size, width), pad_id, np.int32)
      mask_BxT = np.zeros((batch_size, width), np.float32)
      fact_index_B = np.full((batch_size,), -1, np.int32)
      tokens_BxT[:n], mask_BxT[:n], fact_index_B[:n] = (
          tokens_NxT[index, :width], mask_NxT[index, :width], index)
      yield Batch(tokens_BxT, mask_BxT, fact_index_B, np.arange(batch_size) < n)

  return batches()
