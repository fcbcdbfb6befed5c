"""Incremental next-word suggestions from the torch model (evaluation, "Learn now"'s scores).

The keyboard and `fedkb predict` run the same logic on NumPy (models/numpy_predictor.py, held
to this one by a test), so typing never imports torch.

Committing a word is one LSTM step (the cached log-probabilities over the whole
vocabulary are recomputed); a keystroke inside a word costs no model call at
all: the suggestions are the top-k of the cached scores restricted to words
with the typed prefix, found by binary search in an alphabetically sorted copy
of the vocabulary.  Personal words (known only on this device) are appended to
the vocabulary locally; blocked words ("forget this word") are never suggested.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import torch

from models.lm import WordLM, WordTable
from models.text import BOS, MAX_CONTEXT_WORDS, SPECIALS, UNK, sentence_tokens, split_partial
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary

class Predictor:
    def __init__(
        self,
        model: WordLM,
        vocab: Vocabulary,
        tokenizer: Tokenizer,
        personal_words: Iterable[str] = (),
        blocked: Iterable[str] = (),
        k: int = 3,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.k = k
        self.base_vocab = vocab
        self.vocab = vocab.add(personal_words)
        self.blocked = set(blocked)
        self._build()
        self.reset()

    # -- vocabulary-dependent caches --------------------------------------------------
    def _build(self) -> None:
        table = WordTable.build(self.vocab, self.tokenizer, self.model.cfg.base_vocab)
        with torch.no_grad():
            self._emb, self._bias = self.model.compose(table)
        order = sorted(range(len(self.vocab)), key=lambda i: self.vocab.words[i])
        self._sorted = [self.vocab.words[i] for i in order]
        self._sorted_idx = torch.tensor(order, dtype=torch.long)
        self._mask = torch.zeros(len(self.vocab))
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

    def refresh_model(self) -> None:
        """Recompute caches after the model's parameters changed."""
        self._build()
        self._refresh()

    # -- context ------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty context: a new message."""
        self._history: list[str] = []
        self._state = None
        self._logp = None
        self.commit(BOS)

    def commit(self, word: str) -> None:
        """Feed one finished word (or BOS at a sentence end): one LSTM step."""
        word = word.lower()
        if word == BOS and self._history and self._history[-1] == BOS:
            return
        self._history.append(word)
        with torch.no_grad():
            self._logp, self._state = self.model.step(self.vocab.id(word), self._emb, self._bias, self._state)

    def _refresh(self) -> None:
        hist = self._history[-MAX_CONTEXT_WORDS:]
        self._history, self._state = [], None
        for w in hist:
            self.commit(w)

    def set_context(self, text: str) -> str:
        """Replace the context with `text`'s finished words; returns the partial last word."""
        context, partial = split_partial(text)
        toks = sentence_tokens(context)[-MAX_CONTEXT_WORDS:]
        self._history, self._state = [], None
        if not toks or toks[0] != BOS:
            self.commit(BOS)
        for t in toks:
            self.commit(t)
        return partial

    # -- suggestions --------------------------------------------------------------------
    def scores(self) -> torch.Tensor:
        """Next-word log-probabilities (V,) with specials and blocked words at -inf."""
        return self._logp + self._mask

    def suggest(self, prefix: str = "", k: int | None = None) -> list[str]:
        """The k most likely next words starting with `prefix` (lower-cased), best first."""
        return self.rank(self.scores(), prefix.lower(), k or self.k)

    def rank(self, scores: torch.Tensor, prefix: str, k: int) -> list[str]:
        """The k best words of `scores` (V,) that start with `prefix`: a binary search in the
        alphabetical order for the prefix's range, then a top-k over that slice only."""
        if prefix:
            lo = bisect.bisect_left(self._sorted, prefix)
            hi = bisect.bisect_left(self._sorted, prefix + "\U0010ffff", lo)
            if lo >= hi:
                return []
            cand = self._sorted_idx[lo:hi]
            scores = scores[cand]
        top = torch.topk(scores, min(k, len(scores)))
        ids = top.indices if not prefix else cand[top.indices]
        return [self.vocab.words[i] for i, s in zip(ids.tolist(), top.values.tolist()) if s > float("-inf")]

    def suggest_for(self, text: str, k: int | None = None) -> list[str]:
        """Suggestions for everything typed so far (rebuilds the context: for one-off use)."""
        partial = self.set_context(text)
        return self.suggest(partial, k)

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.vocab and word.lower() != UNK
