"""The made-up people of `data.synthetic`: deterministic per seed, distinct, and each fact with a
second phrasing of its question that names the same person."""

import collections

import pytest

from lamini_jax.data import facts as facts_lib
from lamini_jax.data import synthetic


def test_the_same_seed_gives_the_same_facts_and_another_seed_others():
  first, again = synthetic.synthetic_facts(37, seed=3), synthetic.synthetic_facts(37, seed=3)
  assert first == again
  other = synthetic.synthetic_facts(37, seed=4)
  assert {f.person for f in first}.isdisjoint({f.person for f in other})
  assert not {f.fact.question for f in first} & {f.fact.question for f in other}
  assert synthetic.people(11, seed=3) == synthetic.people(29, seed=3)[:11]


def test_every_fact_is_a_fact_with_a_paraphrase_of_the_same_person():
  facts = synthetic.synthetic_facts(53, seed=0)
  assert len(facts) == 53
  for f in facts:
    assert isinstance(f.fact, facts_lib.Fact)
    assert f.fact.answer.strip() and f.alternative.strip() and f.alternative != f.fact.answer
    assert f.paraphrase != f.fact.question
    assert f.person in f.fact.question and f.person in f.paraphrase
    assert f.paraphrased == facts_lib.Fact(f.paraphrase, f.fact.answer, f.fact.fact_id)
    assert f.fact.fact_id.endswith(f"-{f.field}")
    question, paraphrase = synthetic.QUESTIONS[f.field]
    assert f.fact.question == question.format(name=f.person)
    assert f.paraphrase == paraphrase.format(name=f.person)
  # The fields of one person are spread over the list, and every field is asked.
  assert {f.field for f in facts} == set(synthetic.FIELDS)
  assert [f.person for f in facts[:len(synthetic.FIELDS)]] != [facts[0].person] * len(synthetic.FIELDS)


def test_answers_are_the_person_s_own_values():
  crowd = {p.name: p for p in synthetic.people(12, seed=5)}
  for f in synthetic.synthetic_facts(60, seed=5):  # 12 people, every field of each
    assert crowd[f.person].value(f.field) == f.fact.answer
  with pytest.raises(ValueError, match="field must be one of"):
    next(iter(crowd.values())).value("shoe_size")


def test_five_thousand_facts_have_distinct_questions_paraphrases_ids_and_names():
  facts = synthetic.synthetic_facts(5000, seed=1)
  for key in (lambda f: f.fact.question, lambda f: f.paraphrase, lambda f: f.fact.fact_id):
    counts = collections.Counter(map(key, facts))
    assert len(counts) == 5000, counts.most_common(2)
  names = [p.name for p in synthetic.people(1000, seed=1)]
  assert len(set(names)) == 1000
  assert set(names) == {f.person for f in facts}
  assert not {f.fact.question for f in facts} & {f.paraphrase for f in facts}


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="n must be >= 1, got 0"):
    synthetic.synthetic_facts(0)
  with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
    synthetic.synthetic_facts(3, seed=-1)
  fact = synthetic.synthetic_facts(1)[0]
  with pytest.raises(ValueError, match="paraphrase must differ"):
    synthetic.SyntheticFact(fact.fact, fact.fact.question, fact.person, fact.field, fact.alternative)
  with pytest.raises(ValueError, match="alternative must differ"):
    synthetic.SyntheticFact(fact.fact, fact.paraphrase, fact.person, fact.field, fact.fact.answer)
