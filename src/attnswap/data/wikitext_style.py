"""Plain articles rendered the way WikiText writes them, so that distillation sees the evaluation's formatting.

The bundled teacher learnt plain text, the distillation text is plain text, and every quality figure is measured on
WikiText, whose text went through a tokeniser: `` = Title = `` and `` = = Section = = `` headings, punctuation split off
by spaces, `` @-@ `` / `` @,@ `` / `` @.@ `` inside words and numbers, and ``<unk>`` for rare words. A student that
never saw such text during distillation matched the teacher on it worst: training KL 0.03-0.05 against validation KL
0.06-0.1 on the H200 (benchmarks/results/recipe_h200). ``render`` turns an article of the distillation text (title on
its first line, section headings as short lines ending in a period) into that form; ``rare_words`` picks the words
that become ``<unk>``. Nothing of WikiText itself is used: only its conventions.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

UNK = "<unk>"
STYLES = ("plain", "wikitext")
# Words seen fewer times than this in the corpus become <unk>. On the bundled distillation text 5 turns 5.6 % of the
# words into <unk>, as many as WikiText-2 valid has (5.5 %); 3 (WikiText-103's own cut on 103 M tokens) gives 3.6 %.
UNK_BELOW = 5
# A short line that ends in a period and holds no other sentence is a section heading in the distillation text
# ("Background.", "Racing career.", "1926: two-year-old season.").
_HEADING_WORDS = 8
# Joiners are written with stand-ins (private-use characters) until the punctuation is split, which must not touch them.
_JOINERS = {",": "\ue000", ".": "\ue001", "-": "\ue002"}
_JOINED = [(re.compile(r"(?<=\d),(?=\d)"), ","), (re.compile(r"(?<=\d)\.(?=\d)"), "."),
           (re.compile(r"(?<=\w)-(?=\w)"), "-")]
_RESTORE = str.maketrans({stand_in: mark for mark, stand_in in _JOINERS.items()})
_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Split off: brackets, quotes, commas, semicolons, colons, ! and ?, and a period that ends a word of two or more
# letters or digits (so "H. americanus" and "U.S." keep theirs, as WikiText does).
_PUNCTUATION = re.compile(r'([()\[\]{}"“”‘’,;:!?–—]|(?<=\w\w)\.(?=\s|$))')
_SPACES = re.compile(r"\s+")


def tokenise(text: str) -> str:
    """One line in WikiText's spelling: punctuation split off, joined words and numbers marked with @x@."""
    for pattern, mark in _JOINED:
        text = pattern.sub(f" @{_JOINERS[mark]}@ ", text)
    text = _CONTRACTION.sub(r"\1 \2", text)
    text = _PUNCTUATION.sub(r" \1 ", text)
    return _SPACES.sub(" ", text).strip().translate(_RESTORE)


def is_heading(line: str) -> bool:
    return line.endswith(".") and len(line.split()) <= _HEADING_WORDS and line.count(". ") == 0


def render(article: str, rare: frozenset[str] = frozenset()) -> str:
    """An article (title line, then paragraphs and heading lines) as WikiText lines; words in ``rare`` -> <unk>."""
    lines = [line.strip() for line in article.split("\n") if line.strip()]
    out = []
    for number, line in enumerate(lines):
        if number == 0:
            out.append(f"= {_unk(tokenise(line), rare)} =")
        elif is_heading(line):
            out.append(f"= = {_unk(tokenise(line[:-1]), rare)} = =")
        else:
            out.append(_unk(tokenise(line), rare))
    return "\n".join(out)


def rare_words(articles: Iterable[str], below: int) -> frozenset[str]:
    """Words (of the rendered text) seen fewer than ``below`` times in all of ``articles``: WikiText's <unk> rule,
    a vocabulary cut by frequency, applied to this corpus."""
    counts = Counter(word for article in articles for word in render(article).split())
    return frozenset(word for word, count in counts.items() if count < below)


def restyle(articles: list[str], style: str) -> list[str]:
    """``articles`` in ``style``: "plain" leaves them as they are, "wikitext" renders them with this corpus's <unk>s."""
    if style == "plain":
        return articles
    rare = rare_words(articles, UNK_BELOW)
    return [render(article, rare) for article in articles]


def _unk(line: str, rare: frozenset[str]) -> str:
    if not rare:
        return line
    return " ".join(UNK if word in rare else word for word in line.split(" "))
