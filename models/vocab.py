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
from models.jsonvalues import is_int
from models.text import MAX_WORD_CHARS, SPECIALS, is_word


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
    def from_json(cls, obj, source: object = None) -> "Vocabulary":
        """The vocabulary `to_json` wrote, every field checked: `words` a list of vocabulary words
        (lower-case `is_word`s after the specials), `version` and `base_size` whole numbers (not
        bools, floats or strings), 0 <= base_size <= len(words).  Every problem is one FedkbError
        naming `source` (the file it was read from, where given) and the field."""
        where = f"{source}: " if source is not None else ""

        def bad(why: str) -> FedkbError:
            return FedkbError(f"{where}bad vocabulary: {why}")

        if not isinstance(obj, dict):
            raise bad("vocab is missing" if obj is None else f"vocab is {_show(obj)}, not an object")
        for key in ("words", "version", "base_size"):
            if key not in obj:
                raise bad(f"vocab.{key} is missing")
        words, version, base_size = obj["words"], obj["version"], obj["base_size"]
        if not isinstance(words, list):
            raise bad(f"vocab.words is {_show(words)}, not a list of words")
        if not all(type(w) is str for w in words):
            i = next(i for i, w in enumerate(words) if type(w) is not str)
            raise bad(f"vocab.words[{i}] is {_show(words[i])}, not a string")
        if not is_int(version) or version < 0:
            raise bad(f"vocab.version is {_show(version)}, not a whole number >= 0")
        if not is_int(base_size) or not 0 <= base_size <= len(words):
            raise bad(f"vocab.base_size is {_show(base_size)}, not a whole number from 0 to {len(words)} "
                      "(the number of words)")
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise bad(f"vocab.words must start with {SPECIALS}")
        rest = words[len(SPECIALS):]
        joined = "\n".join(rest)  # one lower() for all: the vocabulary is lower-case (models.text.words)
        if joined != joined.lower() or not all(map(is_word, rest)):
            i = next(i for i, w in enumerate(rest) if not (is_word(w) and w == w.lower())) + len(SPECIALS)
            raise bad(f"vocab.words[{i}] is {_show(words[i])}, not a vocabulary word (lower-case letters "
                      f"and digits with inner apostrophes, at most {MAX_WORD_CHARS} characters)")
        try:
            return cls(tuple(words), version, base_size)
        except FedkbError:  # a word twice (the specials are checked above)
            seen: set[str] = set()
            twice = next(w for w in words if w in seen or seen.add(w))
            raise bad(f"vocab.words holds {_show(twice)} twice") from None


def _show(value) -> str:
    """A value from a JSON file, for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    words = SPECIALS + tuple(ranked[: max(0, size - len(SPECIALS))])  # not [:-1] for a size below the specials'
    return Vocabulary(words, version=0, base_size=len(words))
