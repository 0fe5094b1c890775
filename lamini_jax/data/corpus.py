"""Corpus text: WikiText articles, halves of a corpus by article, and sentence starts.

The even and odd articles of WikiText-2 valid keep two uses of it apart: the MoME anchors
read one half and dev perplexity the other (`runs.training_corpus`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator

import numpy as np

ARTICLES = ("all", "even", "odd")
# A top-level heading line of WikiText; its sections are " = = Section = = ".
_WIKITEXT_TITLE = re.compile(r"^ = [^=\n][^\n]* = $", re.MULTILINE)


def corpus_articles(text: str) -> list[str]:
  """The articles of a WikiText text, which they concatenate to: each starts at a title line
  ` = Title = ` (text before the first title goes with it). Without titles: one article."""
  starts = [m.start() for m in _WIKITEXT_TITLE.finditer(text)]
  if not starts:
    return [text]
  starts[0] = 0
  return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def read_corpus(path: str | os.PathLike, articles: str = "all") -> str:
  """The text of a corpus file: all of it, or its even (0, 2, ...) or odd (1, 3, ...) articles."""
  if articles not in ARTICLES:
    raise ValueError(f"articles must be one of {ARTICLES}, got {articles!r} (for {path})")
  text = pathlib.Path(path).read_text(encoding="utf-8")
  if articles == "all":
    return text
  parts = corpus_articles(text)
  if len(parts) < 2:
    raise ValueError(f"{path}: no article titles (' = Title = ' lines) to split into even and odd "
                     "articles; use articles=all")
  return "".join(parts[articles == "odd"::2])


@contextlib.contextmanager
def corpus_file(path: str | os.PathLike, articles: str = "all") -> Iterator[pathlib.Path]:
  """`path` itself (articles="all"), or a temporary file holding its even or odd articles:
  for readers of text files such as `encoding.corpus_windows`."""
  if articles == "all":
    yield pathlib.Path(path)
    return
  text = read_corpus(path, articles)
  with tempfile.TemporaryDirectory() as tmp:
    part = pathlib.Path(tmp) / f"{pathlib.Path(path).stem}.{articles}.txt"
    part.write_text(text, encoding="utf-8")
    yield part


def sentence_starts(text: str, count: int, words: int = 10) -> list[str]:
  """The first `words` words of `count` paragraphs' first sentences, spread evenly over `text`.

  Paragraphs are the non-blank lines that are not WikiText headings; a sentence ends at " . "
  (WikiText is word-tokenised). Sentences shorter than `words` words, or with an `<unk>` among
  them, are passed over. Fewer than `count` when the text has fewer such sentences.
  """
  if count < 0 or words < 1:
    raise ValueError(f"sentence_starts: count={count} must be >= 0 and words={words} >= 1")
  starts = []
  for line in text.split("\n"):
    line = line.strip()
    if not line or line.startswith("= "):
      continue
    first = line.split(" . ")[0].split()
    if len(first) >= words and "<unk>" not in first[:words]:
      starts.append(" ".join(first[:words]))
  if count >= len(starts):
    return starts
  return [starts[i] for i in np.linspace(0, len(starts) - 1, count).round().astype(int)]
