"""Locality by generation against greedy decoding without a KV cache (full forward passes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamini_jax.data import encoding
from lamini_jax import generate as gen
from lamini_jax import locality
from lamini_jax import model as model_lib

TEMPLATE = encoding.PromptTemplate()
QUESTIONS = ("Why is the sky blue?", "Who is the president of the United States in 2019?",
             "What happens if you eat watermelon seeds?")
TEXTS = ("He had a recurring role in 2003 on two episodes", "The island has several Neolithic sites")
N_NEW = 11  # odd, and not the default 32: this file's own compilation


@functools.lru_cache(maxsize=None)
def _forward(m):
  return jax.jit(lambda v, t: m.apply(v, t)[0])


def _greedy_reference(m, variables, prompt, n, eos=(), width=96):
  """n greedy tokens by full forward passes over a right-padded buffer, STOPPED after an EOS."""
  tokens = list(prompt)
  out = []
  for _ in range(n):
    buffer = np.zeros((1, width), np.int32)
    buffer[0, :len(tokens)] = tokens
    t = int(np.argmax(_forward(m)(variables, jnp.asarray(buffer))[0, len(tokens) - 1]))
    if t in eos:
      break
    out.append(t)
    tokens.append(t)
  return out + [locality.STOPPED] * (n - len(out))


@pytest.fixture(scope="module")
def base(stories, stories_tokenizer):
  cfg, params = stories
  m = model_lib.Transformer(cfg)
  return m, {"params": params}, locality.reference(m, {"params": params}, stories_tokenizer, QUESTIONS,
                                                   TEMPLATE, TEXTS, N_NEW)


def _perturbed(params, scale):
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), params)


def test_agreement_against_numpy():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 5, size=(7, 13)).astype(np.int32)
  base[2, 9:] = locality.STOPPED
  tokens = base.copy()
  tokens[0, 4] += 1  # differs late
  tokens[1, 0] += 1  # differs first
  tokens[2, 9:] = 3  # base stopped, this one did not
  tokens[3, 12] = locality.STOPPED  # stopped one token early
  got = locality.agreement(tokens, base)
  same = [[int(a == b) for a, b in zip(r, q)] for r, q in zip(tokens.tolist(), base.tolist())]
  assert got["exact"] == sum(all(r) for r in same) / 7 == 3 / 7
  assert got["tokens"] == sum(map(sum, same)) / (7 * 13)
  assert got["first"] == sum(r[0] for r in same) / 7 == 6 / 7
  assert locality.agreement(base, base) == {"exact": 1.0, "tokens": 1.0, "first": 1.0}
  with pytest.raises(ValueError, match=r"shape \(7, 12\)"):
    locality.agreement(tokens, base[:, :12])


def test_greedy_tokens_equal_uncached_decoding_and_compile_once(stories, stories_tokenizer):
  cfg, params = stories
  eos = 455  # a frequent second answer token of stories260K: some answers stop early
  m = model_lib.Transformer(cfg.replace(eos_token_ids=(eos,)))
  prompts = [encoding.encode_prompt(stories_tokenizer, TEMPLATE, q).tolist() for q in QUESTIONS]
  prompts += [stories_tokenizer(t).input_ids for t in TEXTS] + [[1] + [450] * 40]  # 3 width buckets
  want = np.array([_greedy_reference(m, {"params": params}, p, N_NEW, (eos,)) for p in prompts])
  assert (want == locality.STOPPED).any() and (want != locality.STOPPED).all(axis=1).any()
  before = gen._generate._cache_size()
  got = locality.greedy_tokens(m, {"params": params}, prompts, N_NEW, batch_size=3)  # 3 calls
  assert gen._generate._cache_size() == before + 1  # one shape for every chunk
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(locality.greedy_tokens(m, {"params": params}, prompts, N_NEW), want)


def test_base_model_has_locality_one(base):
  m, variables, ref = base
  assert ref.base_questions_NxT.shape == (3, N_NEW) and ref.base_texts_MxT.shape == (2, N_NEW)
  got = locality.locality_metrics(m, variables, ref)
  assert got == {f"{p}{k}": 1.0 for p in ("locality_", "locality_text_")
                 for k in ("exact", "tokens", "first")}
  for prompt, answer in zip(ref.questions + ref.texts,
                            np.concatenate([ref.base_questions_NxT, ref.base_texts_MxT])):
    assert answer.tolist() == _greedy_reference(m, variables, prompt, N_NEW)


def test_perturbed_model_has_lower_locality(base):
  m, variables, ref = base
  got = {}
  for scale in (1e-7, 0.05):
    noisy = {"params": _perturbed(variables["params"], scale)}
    got[scale] = locality.locality_metrics(m, noisy, ref)
    want_q = np.array([_greedy_reference(m, noisy, p, N_NEW) for p in ref.questions])
    want_t = np.array([_greedy_reference(m, noisy, p, N_NEW) for p in ref.texts])
    for prefix, want, base_tokens in (("locality_", want_q, ref.base_questions_NxT),
                                      ("locality_text_", want_t, ref.base_texts_MxT)):
      for k, v in locality.agreement(want, base_tokens).items():
        assert got[scale][prefix + k] == v, (scale, prefix, k)
  assert got[0.05]["locality_tokens"] < 1.0 and got[0.05]["locality_text_tokens"] < 1.0
  assert got[0.05]["locality_exact"] < 1.0


def test_no_prompts():
  assert locality.greedy_tokens(None, None, [], 5).shape == (0, 5)
  assert np.isnan(locality.agreement(np.zeros((0, 5)), np.zeros((0, 5)))["exact"])
