"""What both predictors share: the device's vocabulary, the context, and prefix filtering.

An incremental predictor keeps next-word scores for the words committed so far.  Committing a
word is one LSTM step (`_step`, the model's part); a keystroke inside a word costs no model
call at all: the suggestions are the top-k of the cached scores restricted to words with the
typed prefix, found by binary search in an alphabetically sorted copy of the vocabulary.
Personal words (known only on this device) are appended to the vocabulary locally; blocked
words ("forget this word") are never suggested.

This class holds all of that, once, for the two model sides: models/predictor.py (torch:
`fedkb eval`, the rounds' evaluation, the report) and models/numpy_predictor.py (NumPy: the
keyboard's typing and its measurements).  A subclass gives the
word table (`_compose`), the state at a message start (`_start`), one step (`_step`), a mask
vector (`_zeros`), the top-k (`_top`) and a whole message's scores (`message_scores`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from models.text import BOS, MAX_CONTEXT_WORDS, SPECIALS, UNK, context_tokens, split_partial
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary, appended


class IncrementalPredictor:
    def __init__(self, vocab: Vocabulary, tokenizer: Tokenizer, personal_words: Iterable[str] = (),
                 blocked: Iterable[str] = (), k: int = 3):
        self.tokenizer, self.k = tokenizer, k
        self.base_vocab = vocab
        self.vocab = vocab.add(personal_words)
        self.blocked = {w.lower() for w in blocked}
        self._history: list[str] = []

    # -- the model side ----------------------------------------------------------------
    def _compose(self) -> None:
        """The word table of self.vocab, for `_step`."""
        raise NotImplementedError

    def _start(self) -> None:
        """The state a message starts from."""
        raise NotImplementedError

    def _step(self, word_id: int) -> None:
        """One LSTM step on word `word_id`; after it self._logp is the next word's log-probabilities (V,)."""
        raise NotImplementedError

    def _zeros(self, n: int):
        """A float vector of n zeros (the mask)."""
        raise NotImplementedError

    def _index(self, ids: list[int]):
        """`ids` as an index vector of the model side's kind."""
        raise NotImplementedError

    def _top(self, scores, k: int, cand=None) -> tuple[list[int], list[float]]:
        """The k largest of `scores`, best first: their positions (or `cand`'s entries at those
        positions, where `scores` is a slice picked by `cand`) and their values."""
        raise NotImplementedError

    def message_scores(self, word_ids: list[int], k: int):
        """A whole message at once (models/evaluate.py): for each word after the first, the
        scores (V,) the keyboard had before it (with the mask), as rows of a (T-1, V) matrix,
        and each row's top-k word ids, best first.  Leaves the context as it was or empty."""
        raise NotImplementedError

    # -- vocabulary-dependent caches --------------------------------------------------
    _order: tuple | None = None  # (words, their alphabetical order, the words in it) of the last vocabulary

    def _alphabetical(self) -> tuple[list[int], list[str]]:
        """The vocabulary's ids in alphabetical order, and the words in that order.  Kept while the
        words stay the same (new weights), extended when words are appended (a personal word)."""
        words, old = self.vocab.words, self._order
        if old is not None and old[0] == words:
            return old[1], old[2]
        kept = appended(old[0] if old else None, words)
        if kept:
            order, in_order = list(old[1]), list(old[2])
            for i in range(kept, len(words)):
                at = bisect.bisect_left(in_order, words[i])
                order.insert(at, i)
                in_order.insert(at, words[i])
        else:
            order = sorted(range(len(words)), key=words.__getitem__)
            in_order = [words[i] for i in order]
        self._order = (words, order, in_order)
        return order, in_order

    def _build(self) -> None:
        self._compose()
        order, self._sorted = self._alphabetical()
        self._sorted_idx = self._index(order)
        self._mask = self._zeros(len(self.vocab))
        for w in (*SPECIALS, *self.blocked):
            if w in self.vocab:
                self._mask[self.vocab.index[w]] = float("-inf")

    def set_vocab(self, vocab: Vocabulary, personal_words: Iterable[str] = ()) -> None:
        self.base_vocab = vocab
        self.vocab = vocab.add(personal_words)
        self._build()
        self.reset()

    def add_personal_words(self, words: Iterable[str]) -> None:
        new = self.vocab.add(words)
        if new is not self.vocab:
            self.vocab = new
            self._build()
            self._refresh()

    def block(self, word: str) -> None:
        """Never suggest `word` again (this predictor)."""
        self.blocked.add(word.lower())
        if word.lower() in self.vocab:
            self._mask[self.vocab.index[word.lower()]] = float("-inf")

    # -- context ------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty context: a new message."""
        self._history = []
        self._start()
        self.commit(BOS)

    def commit(self, word: str) -> None:
        """Feed one finished word (or BOS at a sentence end): one LSTM step."""
        word = word.lower()
        if word == BOS and self._history and self._history[-1] == BOS:
            return
        self._history.append(word)
        self._step(self.vocab.id(word))

    def _refresh(self) -> None:
        """Feed the context again (after the weights or the vocabulary changed)."""
        hist = self._history[-MAX_CONTEXT_WORDS:]
        self._history = []
        self._start()
        for w in hist or [BOS]:
            self.commit(w)

    def set_context(self, text: str) -> str:
        """Replace the context with `text`'s finished words; returns the partial last word.
        The context is the keyboard's (keyboard/typing.py): a sentence ended at the end of `text`
        ("hello. ") is a sentence start."""
        context, partial = split_partial(text)
        toks = context_tokens(context)
        self._history = []
        self._start()
        if not toks or toks[0] != BOS:
            self.commit(BOS)
        for t in toks:
            self.commit(t)
        return partial

    # -- suggestions --------------------------------------------------------------------
    def scores(self):
        """Next-word log-probabilities (V,) with specials and blocked words at -inf."""
        return self._logp + self._mask

    def suggest(self, prefix: str = "", k: int | None = None) -> list[str]:
        """The k most likely next words starting with `prefix` (lower-cased), best first."""
        return self.rank(self.scores(), prefix.lower(), k or self.k)

    def rank(self, scores, prefix: str, k: int) -> list[str]:
        """The k best words of `scores` (V,) that start with `prefix`: a binary search in the
        alphabetical order for the prefix's range, then a top-k over that slice only."""
        cand = None
        if prefix:
            lo = bisect.bisect_left(self._sorted, prefix)
            hi = bisect.bisect_left(self._sorted, prefix + "\U0010ffff", lo)
            if lo >= hi:
                return []
            cand = self._sorted_idx[lo:hi]
            scores = scores[cand]
        ids, values = self._top(scores, min(k, len(scores)), cand)
        return [self.vocab.words[i] for i, s in zip(ids, values) if s > float("-inf")]

    def suggest_for(self, text: str, k: int | None = None) -> list[str]:
        """Suggestions for everything typed so far (rebuilds the context: for one-off use)."""
        return self.suggest(self.set_context(text), k)

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.vocab and word.lower() != UNK
