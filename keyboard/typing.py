"""The typing logic of the keyboard, without any UI: text -> suggestions -> accepted words -> stats.

The app hands over the whole text of the input after every keystroke
(`TypingSession.update`); this module works out what changed and keeps the
`Predictor` in step at the cost of the change, not of the text:

* a letter typed inside a word: no model call, the suggestions are a prefix
  filter over scores already computed (completions of the partial word);
* a word finished (space or punctuation typed): one LSTM step;
* anything else (a paste, an edit in the middle, a deletion across a word): the
  context is rebuilt from the last `MAX_CONTEXT_WORDS` words of the text, and
  only the last `TAIL_CHARS` characters are ever looked at, so a 1 MB paste
  costs what a 4 KB one does.

Capitalisation: the model is lower-case; suggestions are shown and inserted
capitalised at a sentence start, "i" (and "i'm", "i'll", ...) as "I", and a
partial word typed with a capital keeps it.

Keystroke savings follow models/evaluate.py (Presage's definition, 3
suggestions): every finished word costs `len(word) + 1` keys without
prediction; a word typed out costs that many, a word accepted after typing `n`
letters costs `n + 1` (the letters and the one key to accept; the space comes
free).  Words arriving several at once (a paste) are not counted as typed.

This module must not import Textual (a test checks it): the keyboard's logic is
usable, and testable, without a terminal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.ksr import keystroke_savings
from models.text import BOS, MAX_CONTEXT_WORDS, is_word, sentence_tokens, split_partial

if TYPE_CHECKING:  # either predictor (models/numpy_predictor.py, what the keyboard runs, or models/predictor.py)
    from models.suggest import IncrementalPredictor as Predictor

TAIL_CHARS = 4000  # only the end of the text matters for the next word
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s*$")
_I_FORMS = re.compile(r"^i('(m|ll|ve|d))?$")


# -- capitalisation --------------------------------------------------------------------
def at_sentence_start(context: str) -> bool:
    """True when the next word starts a sentence: nothing typed yet, or after . ! ?"""
    context = context.rstrip()
    return not context or _SENTENCE_END.search(context) is not None


def cased(word: str, sentence_start: bool, typed: str = "") -> str:
    """How to show/insert lower-case `word`: 'I' forms, capital at a sentence start or if typed so."""
    if _I_FORMS.match(word):
        return "I" + word[1:]
    if sentence_start or (typed[:1].isupper()):
        return word[:1].upper() + word[1:]
    return word


def _context_tokens(context: str) -> list[str]:
    """The model's context for the next word: tokens of `context`, with BOS if a sentence just ended."""
    toks = sentence_tokens(context)
    if toks[-1] != BOS and at_sentence_start(context):
        toks.append(BOS)
    return toks[-MAX_CONTEXT_WORDS:]


def _tail(text: str) -> str:
    """The last TAIL_CHARS characters, cut at a space so no word is cut in two."""
    if len(text) <= TAIL_CHARS:
        return text
    tail = text[-TAIL_CHARS:]
    cut = tail.find(" ")
    return tail[cut + 1 :] if 0 <= cut < len(tail) - 1 else tail


# -- stats -----------------------------------------------------------------------------
@dataclass
class LiveStats:
    """Counters of this typing session (models/evaluate.py's KSR, counted live)."""

    words: int = 0
    accepted: int = 0
    keys_typed: int = 0
    keys_selected: int = 0
    keys_without: int = 0
    messages: int = 0

    @property
    def ksr(self) -> float:
        """Keystroke savings rate in %: 1 - (typed + selected) / without prediction."""
        return keystroke_savings(self.keys_typed, self.keys_selected, self.keys_without)

    @property
    def keys_saved(self) -> int:
        return self.keys_without - self.keys_typed - self.keys_selected


@dataclass
class Update:
    """What the UI needs after a keystroke."""

    suggestions: list[str]  # display order is the UI's business; best first here, cased
    partial: str  # the word being typed ("" between words)
    new_words: list[str] = field(default_factory=list)  # finished words the vocabulary lacks


class TypingSession:
    """One text input's worth of typing state around a `Predictor`."""

    def __init__(self, predictor: Predictor, k: int = 3):
        self.predictor = predictor
        self.k = k
        self.stats = LiveStats()
        self.text = ""
        self._tokens: list[str] = [BOS]
        self._partial = ""
        self._raw_partial = ""
        self._start = True
        self._accepted_word: str | None = None  # set by accept(): the next commit is that word
        self._accepted_typed = 0
        self.suggestions: list[str] = []
        predictor.reset()
        self._suggest()

    # -- the keystroke path ------------------------------------------------------------
    def update(self, text: str) -> Update:
        """The text of the input changed to `text` (any change): resync and suggest."""
        self.text = text
        tail = _tail(text)
        context, partial = split_partial(tail)
        tokens = _context_tokens(context)
        new_words: list[str] = []
        if tokens != self._tokens:
            added = _appended(self._tokens, tokens)
            if added is None:
                self._rebuild(tokens)
            for word in added or ():
                self.predictor.commit(word)
                if word != BOS:
                    self._count_word(word)
                    if word not in self.predictor and is_word(word) and not word.isdigit():
                        new_words.append(word)
            self._tokens = tokens
        self._accepted_word = None
        self._partial = partial
        self._raw_partial = _raw_partial(tail, partial)
        self._start = at_sentence_start(context)
        self._suggest()
        return Update(list(self.suggestions), partial, new_words)

    def _rebuild(self, tokens: list[str]) -> None:
        self.predictor.reset()
        for t in tokens:
            self.predictor.commit(t)

    def _count_word(self, word: str) -> None:
        s = self.stats
        s.words += 1
        s.keys_without += len(word) + 1
        if self._accepted_word is not None and self._accepted_word == word:
            s.accepted += 1
            s.keys_typed += self._accepted_typed
            s.keys_selected += 1
        else:
            s.keys_typed += len(word) + 1

    def _suggest(self) -> None:
        words = self.predictor.suggest(self._partial, self.k)
        self.suggestions = [cased(w, self._start, self._raw_partial) for w in words]

    # -- accepting ---------------------------------------------------------------------
    def accept(self, index: int = 0) -> Update | None:
        """Accept suggestion `index` (0 = best): replace the partial word, add a space."""
        if not 0 <= index < len(self.suggestions):
            return None
        word = self.suggestions[index]
        text = self.text
        if self._raw_partial and text.endswith(self._raw_partial):
            text = text[: len(text) - len(self._raw_partial)]
        elif text and not text[-1].isspace():
            text += " "
        self._accepted_word, self._accepted_typed = word.lower(), len(self._partial)
        return self.update(text + word + " ")

    # -- messages ----------------------------------------------------------------------
    def finish(self) -> str:
        """End the message (Enter): count the last word if one was being typed, clear, return the text."""
        text = self.text
        if self._partial:
            self._count_word(self._partial)
        if text.strip():
            self.stats.messages += 1
        self.clear()
        return text

    def clear(self) -> None:
        self.text = ""
        self._tokens = [BOS]
        self._partial = self._raw_partial = ""
        self._start = True
        self._accepted_word = None
        self.predictor.reset()
        self._suggest()

    def resync(self) -> None:
        """The predictor changed (new model, vocabulary): rebuild the context from the text and suggest."""
        self._tokens = _context_tokens(split_partial(_tail(self.text))[0])
        self._rebuild(self._tokens)
        self._suggest()

    def refresh(self) -> list[str]:
        """Suggestions again, same context (after blocking a word or adding personal words)."""
        self._suggest()
        return list(self.suggestions)


def _appended(old: list[str], new: list[str], most: int = 2) -> list[str] | None:
    """The tokens `new` adds at the end of `old` (a word, maybe + BOS), None if it is not such an extension.

    Both are windows of at most MAX_CONTEXT_WORDS: a full window slides by what was added.
    """
    for d in range(1, most + 1):
        if len(new) < d:
            break
        if (old + new[-d:])[-MAX_CONTEXT_WORDS:] == new:
            return new[-d:]
    return None


def _raw_partial(tail: str, partial: str) -> str:
    """The partial word as it appears at the end of the text (original case), '' if none."""
    if not partial:
        return ""
    i = len(tail)
    while i > 0 and (tail[i - 1].isalnum() or tail[i - 1] == "'"):
        i -= 1
    return tail[i:]
