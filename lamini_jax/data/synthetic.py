"""Made-up people no backbone can know, and one question-answer fact per field of each.

Every person has a name, a birth date, a birthplace and a town of residence (invented town
names built from syllables), an employer (an invented company), and a profession. A fact asks
one field of one person ("Where was Orlen Vask born?" -> "Drelby") and carries a second
phrasing of the same question ("What is the birthplace of Orlen Vask?") that is never trained,
to measure whether a memorized fact is recalled under other words, and a second value of the
field (`alternative`) that an editing experiment can update the fact to.

Everything is a function of the seed: the same (n, seed) gives the same facts, in the same
order, on every machine. Names are distinct, so questions are distinct.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lamini_jax.data.facts import Fact

_STREAM = 6  # first word of every seed sequence here (data.facts uses 1-5)

ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kl", "st", "tr", "th", "sk", "vr")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
CODAS = ("", "", "n", "r", "l", "s", "k", "m", "th", "nd", "x", "rn")
TOWN_SUFFIXES = ("by", "wick", "ford", "mere", "holm", "stead", "haven", "dale", "thorpe", "port")
COMPANY_KINDS = ("Holdings", "Works", "Foundry", "Mills", "Logistics", "Textiles", "Instruments",
                 "Shipping", "Ceramics", "Optics", "Brewery", "Press")
PROFESSIONS = ("glassblower", "cartographer", "beekeeper", "clockmaker", "bookbinder", "surveyor",
               "ferry pilot", "tanner", "lighthouse keeper", "organ tuner", "stonemason",
               "archivist", "rope maker", "falconer", "cooper", "saddler", "chemist", "weaver",
               "locksmith", "engraver", "printer", "miller", "potter", "botanist", "glazier",
               "harbour master", "sail maker", "violin maker", "typesetter", "well digger")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
YEARS = (1850, 1990)  # birth years, inclusive

# field -> (the trained question, its paraphrase: never trained); {name} is the person.
QUESTIONS = {
    "birth_date": ("When was {name} born?", "What is the date of birth of {name}?"),
    "birthplace": ("Where was {name} born?", "What is the birthplace of {name}?"),
    "employer": ("Which company does {name} work for?", "Who is the employer of {name}?"),
    "profession": ("What is the profession of {name}?", "What does {name} do for a living?"),
    "residence": ("In which town does {name} live?", "Where does {name} live now?"),
}
FIELDS = tuple(QUESTIONS)


@dataclasses.dataclass(frozen=True)
class Person:
  """One made-up person: a distinct name and a value for every field of `FIELDS`."""

  name: str
  birth_date: str
  birthplace: str
  employer: str
  profession: str
  residence: str

  def value(self, field: str) -> str:
    if field not in QUESTIONS:
      raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
    return getattr(self, field)


@dataclasses.dataclass(frozen=True)
class SyntheticFact:
  """A trained fact, its never-trained `paraphrase`, whom and which field it asks about, and
  `alternative`: another value of that field (not the answer), for updating the fact."""

  fact: Fact
  paraphrase: str
  person: str
  field: str
  alternative: str

  def __post_init__(self):
    if self.field not in QUESTIONS:
      raise ValueError(f"SyntheticFact.field must be one of {FIELDS}, got {self.field!r}")
    if self.paraphrase == self.fact.question:
      raise ValueError(f"SyntheticFact.paraphrase must differ from the question {self.fact.question!r}")
    if self.alternative == self.fact.answer:
      raise ValueError(f"SyntheticFact.alternative must differ from the answer {self.fact.answer!r}")
    if self.person not in self.fact.question or self.person not in self.paraphrase:
      raise ValueError(f"SyntheticFact: question {self.fact.question!r} and paraphrase "
                       f"{self.paraphrase!r} must both name {self.person!r}")

  @property
  def paraphrased(self) -> Fact:
    """The same fact asked with the paraphrase (same id and answer)."""
    return Fact(self.paraphrase, self.fact.answer, self.fact.fact_id)


def _word(rng: np.random.Generator, syllables: int) -> str:
  parts = [ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
           + CODAS[rng.integers(len(CODAS))] for _ in range(syllables)]
  return "".join(parts).capitalize()


def _value(rng: np.random.Generator, field: str) -> str:
  """One random value of `field` (any field but the name)."""
  if field == "birth_date":
    year = rng.integers(YEARS[0], YEARS[1] + 1)
    return f"{rng.integers(1, 29)} {MONTHS[rng.integers(12)]} {year}"
  if field in ("birthplace", "residence"):
    return _word(rng, int(rng.integers(1, 3))) + TOWN_SUFFIXES[rng.integers(len(TOWN_SUFFIXES))]
  if field == "employer":
    return f"{_word(rng, 2)} {COMPANY_KINDS[rng.integers(len(COMPANY_KINDS))]}"
  if field == "profession":
    return PROFESSIONS[rng.integers(len(PROFESSIONS))]
  raise ValueError(f"field must be one of {FIELDS}, got {field!r}")


def people(n: int, seed: int) -> list[Person]:
  """`n` made-up people with distinct names, a function of (n, seed) only; each prefix of the
  list is the list for a smaller `n`."""
  if n < 0 or seed < 0:
    raise ValueError(f"people: n={n} and seed={seed} must be >= 0")
  rng = np.random.default_rng([_STREAM, seed, 0])
  out, names = [], set()
  while len(out) < n:
    name = f"{_word(rng, int(rng.integers(1, 3)))} {_word(rng, int(rng.integers(1, 3)))}"
    values = {f: _value(rng, f) for f in FIELDS}
    if name in names or len(name) < 6:  # distinct, and not a two-letter stub like "Ba Ko"
      continue
    names.add(name)
    out.append(Person(name, **values))
  return out


def synthetic_facts(n: int, seed: int = 0) -> list[SyntheticFact]:
  """`n` facts about made-up people: a seeded order of every (person, field) of
  ceil(n / len(FIELDS)) people, so the fields of one person are spread over the list.

  Fact ids are `person<index>-<field>`; questions are distinct.
  """
  if n < 1:
    raise ValueError(f"synthetic_facts: n must be >= 1, got {n}")
  if seed < 0:
    raise ValueError(f"synthetic_facts: seed must be >= 0, got {seed}")
  crowd = people(-(-n // len(FIELDS)), seed)
  order = np.random.default_rng([_STREAM, seed, 1]).permutation(len(crowd) * len(FIELDS))[:n]
  out = []
  for k in order:
    p, field = divmod(int(k), len(FIELDS))
    person = crowd[p]
    field = FIELDS[field]
    answer = person.value(field)
    rng = np.random.default_rng([_STREAM, seed, 2, int(k)])
    alternative = _value(rng, field)
    while alternative == answer:
      alternative = _value(rng, field)
    question, paraphrase = (t.format(name=person.name) for t in QUESTIONS[field])
    out.append(SyntheticFact(Fact(question, answer, f"person{p}-{field}"), paraphrase, person.name,
                             field, alternative))
  return out
