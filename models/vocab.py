"""The versioned word vocabulary.

Index 0 is BOS, 1 is UNK, then words.  Words are only ever appended: a word's
index never changes, and the first `base_size` words (the vocabulary the model
was pretrained with) own a residual embedding row.  Each addition makes a new
version; a checkpoint names the version its model was trained with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from models.errors import FedkbError
from models.text import SPECIALS, is_word


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]
    version: int = 0
    base_size: int = 0  # words[:base_size] have residual rows in the model
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if tuple(self.words[: len(SPECIALS)]) != SPECIALS:
            raise FedkbError(f"vocabulary must start with {SPECIALS}")
        index = {w: i for i, w in enumerate(self.words)}
        if len(index) != len(self.words):
            raise FedkbError("vocabulary has duplicate words")
        object.__setattr__(self, "index", index)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def id(self, word: str) -> int:
        """Index of `word`, UNK's index if absent."""
        return self.index.get(word, 1)

    def add(self, new_words: Iterable[str]) -> "Vocabulary":
        """A new version with `new_words` appended (known and invalid words skipped, order kept)."""
        seen = set(self.index)
        fresh = []
        for w in new_words:
            if w not in seen and is_word(w):
                fresh.append(w)
                seen.add(w)
        if not fresh:
            return self
        return Vocabulary(self.words + tuple(fresh), self.version + 1, self.base_size)

    def to_json(self) -> dict:
        return {"version": self.version, "base_size": self.base_size, "words": list(self.words)}

    @classmethod
    def from_json(cls, obj: dict) -> "Vocabulary":
        try:
            return cls(tuple(obj["words"]), int(obj["version"]), int(obj["base_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FedkbError(f"malformed vocabulary: {e}") from None


def appended(earlier: tuple[str, ...] | None, words: tuple[str, ...]) -> int:
    """How many words `words` keeps from `earlier` where it only appends to them (`Vocabulary.add`:
    a personal word typed), so that what was built for `earlier` can be extended; 0 otherwise."""
    if earlier is None or len(words) <= len(earlier) or words[: len(earlier)] != earlier:
        return 0
    return len(earlier)


def build_vocab(token_lists: Iterable[Iterable[str]], size: int, min_count: int = 2) -> Vocabulary:
    """The `size` most frequent words (ties broken alphabetically), as version 0."""
    counts: Counter[str] = Counter()
    for toks in token_lists:
        counts.update(t for t in toks if t not in SPECIALS and is_word(t))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    words = SPECIALS + tuple(ranked[: size - len(SPECIALS)])
    return Vocabulary(words, version=0, base_size=len(words))
