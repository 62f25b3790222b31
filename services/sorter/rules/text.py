"""Free text (SeriesDescription, ProtocolName) to word tokens, with word boundaries.

Descriptions are typed by people in several languages and are wrong about one time in ten, so the
classifier only lets them tip a decision. Tokenising must not break the keywords that matter: "+C"
(post contrast), "-K" (without contrast), "pd+t2", hyphenated words. "64dir" stays one word, so it is
never read as "dir" (double inversion recovery). Results are cached per distinct string: a cohort
repeats the same few hundred protocol names over and over.
"""

from __future__ import annotations

import re
from functools import lru_cache

from services.sorter.rules.vocabulary import vocabulary

_SPLIT = re.compile(r"[^a-z0-9]+")
_COMPOUND = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_ALPHA_HEAD = re.compile(r"^([a-z]{3,})\d")


@lru_cache(maxsize=65536)
def tokenize(text: str) -> frozenset[str]:
    """Word tokens of `text`: lower-cased words, joined compounds, canonical synonyms.

    >>> sorted(tokenize("T1 MPRAGE +C"))
    ['mprage', 'postcontrast', 't1']
    """
    if not text:
        return frozenset()
    vocab = vocabulary()
    if vocab.phrase_pattern is not None:
        text = vocab.phrase_pattern.sub(lambda m: vocab.phrases[m.group(0).lower()], text)
    lowered = text.lower()
    words = {w for w in _SPLIT.split(lowered) if w}
    # camelCase parts too ("B0Map" keeps "b0map" and adds "b0", "map")
    words.update(w for w in _SPLIT.split(_CAMEL.sub(" ", text).lower()) if w)
    for compound in _COMPOUND.findall(lowered):
        words.add(compound.replace("-", "").replace("_", ""))
    # a word with a number glued on ("rest1", "flair2", "fase3d") also counts as its letters
    for word in list(words):
        head = _ALPHA_HEAD.match(word)
        if head:
            words.add(head.group(1))
    tokens = set(words)
    for word in words:
        canon = vocab.synonyms.get(word)
        if canon:
            tokens.update(canon)
    return frozenset(tokens)
