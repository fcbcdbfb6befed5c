"""The typing logic of the keyboard, without any UI: text -> suggestions -> accepted words -> stats.

The app hands over the whole text of the input and its cursor after every keystroke
(`TypingSession.update`); the suggestions are for the cursor: the context is the
text before it, the partial word the word that ends at it, and accepting replaces
that word (wherever the cursor is; all of it where the cursor is inside one) and
puts the cursor after the word and its space.  This module works out what changed
and keeps the `Predictor` in step at the cost of the change, not of the text:

* a letter typed inside a word: no model call, the suggestions are a prefix
  filter over scores already computed (completions of the partial word);
* a word finished (space or punctuation typed): one LSTM step;
* anything else (a paste, a cursor moved, a deletion across a word): the
  context is rebuilt from the last `MAX_CONTEXT_WORDS` words before the cursor,
  and only the last `TAIL_CHARS` characters before it are ever looked at, so a
  1 MB paste costs what a 4 KB one does.

Capitalisation: the model is lower-case; suggestions are shown and inserted
capitalised at a sentence start (where the context's tokens end in BOS, as
models/text.py's sentence_tokens reads a message, so also after "Hi! 👋 " and at
a message starting with a symbol), "i" (and "i'm", "i'll", ...) as "I", and a
partial word typed with a capital keeps it.

Punctuation typed right after the space an accept added (".,!?;:)") takes that
space's place: "tomorrow." rather than "tomorrow ." (`Update.edited`: the app
writes the text back).

Keystroke savings follow models/evaluate.py (Presage's definition, 3
suggestions): every finished word costs `len(word) + 1` keys without
prediction; a word typed out costs that many, a word accepted after typing `n`
letters costs `n + 1` (the letters and the one key to accept; the space comes
free).  Words arriving several at once (a paste) are not counted as typed.
They are counted per word of the message, not per commit: a word taken back
(a backspace into it, the cursor moved before it) and finished again as the
same word keeps its first cost (an accepted word stays accepted), and a word
corrected after its space is counted once, as what it became.

This module must not import Textual (a test checks it): the keyboard's logic is
usable, and testable, without a terminal.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from models.ksr import keystroke_savings
from models.text import BOS, MAX_CONTEXT_WORDS, context_tokens, is_word, partial_start, sentence_tokens, split_partial, words

if TYPE_CHECKING:  # either predictor (models/numpy_predictor.py, what the keyboard runs, or models/predictor.py)
    from models.suggest import IncrementalPredictor as Predictor

TAIL_CHARS = 4000  # only the end of the text matters for the next word
_I_FORMS = re.compile(r"^i('(m|ll|ve|d))?$")
_ATTACHES = frozenset(".,!?;:)")  # typed right after an accept's space, takes its place
_OPENERS = "([{\u201c\u2018\u00ab\u00bf\u00a1"  # an accepted word follows these without a space
_QUOTES = "\"'`\u2019\u02bc"  # ... and these where they open a quote (after a space or an opener)
_APOSTROPHES = "'`\u2019\u2018\u02bc\uff07"  # inside a word, as models.text reads a partial word


# -- capitalisation --------------------------------------------------------------------
def at_sentence_start(context: str) -> bool:
    """True when the next word starts a sentence: nothing typed yet (but symbols), or after . ! ?
    (and whatever non-word characters follow them), as sentence_tokens reads a message."""
    return context_tokens(context)[-1] == BOS


def cased(word: str, sentence_start: bool, typed: str = "") -> str:
    """How to show/insert lower-case `word`: 'I' forms, capital at a sentence start or if typed so."""
    if _I_FORMS.match(word):
        return "I" + word[1:]
    if sentence_start or (typed[:1].isupper()):
        return word[:1].upper() + word[1:]
    return word


def _tail(text: str, end: int | None = None) -> str:
    """The last TAIL_CHARS characters of text[:end], cut at a space so no word is cut in two."""
    if end is None:
        end = len(text)
    if end <= TAIL_CHARS:
        return text[:end]  # the text itself (no copy) where end is its end
    tail = text[end - TAIL_CHARS : end]
    cut = tail.find(" ")
    return tail[cut + 1 :] if 0 <= cut < len(tail) - 1 else tail


def _context(text: str, cursor: int) -> tuple[str, str, list[str], bool]:
    """What the suggestions at `cursor` go with: (the tail of the text before it, the partial word,
    the context's tokens as context_tokens reads them but uncut, whether the tail left text out)."""
    tail = _tail(text, cursor)
    context, partial = split_partial(tail)
    return tail, partial, sentence_tokens(context, keep_end=True), len(tail) < cursor


def _needs_space(before: str) -> bool:
    """Whether a word inserted after `before` (no partial word there) needs a space first."""
    if not before or before[-1].isspace() or before[-1] in _OPENERS:
        return False
    if before[-1] in _QUOTES and (len(before) == 1 or before[-2].isspace() or before[-2] in _OPENERS):
        return False  # an opening quote: 'she said "' + hello
    return True


def _word_end(text: str, i: int) -> int:
    """Where the word that position `i` is inside of ends: past the letters, digits, apostrophes and
    combining marks from `i` on (models.text.partial_start's rule, forwards), no trailing apostrophe."""
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] in _APOSTROPHES or unicodedata.category(text[j])[0] == "M"):
        j += 1
    while j > i and text[j - 1] in _APOSTROPHES:  # a closing quote: 'hello'
        j -= 1
    return j


class MessageFull(ValueError):
    """Accepting the suggestion would make the message longer than the limit: nothing was inserted."""


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

    def _add(self, cost: tuple, sign: int = 1) -> None:
        _, words, accepted, typed, selected, without = cost
        self.words += sign * words
        self.accepted += sign * accepted
        self.keys_typed += sign * typed
        self.keys_selected += sign * selected
        self.keys_without += sign * without


def _typed(word: str) -> tuple:
    """A word's cost, typed out: (word, words, accepted, keys typed, keys selected, keys without)."""
    return (word, 1, 0, len(word) + 1, 0, len(word) + 1)


@dataclass
class Update:
    """What the UI needs after a keystroke."""

    suggestions: list[str]  # display order is the UI's business; best first here, cased
    partial: str  # the word being typed ("" between words)
    new_words: list[str] = field(default_factory=list)  # finished words the vocabulary lacks
    text: str = ""  # the text now, and the cursor in it
    cursor: int = 0
    edited: bool = False  # the session changed the text it was given (punctuation took an auto-space's place)


class TypingSession:
    """One text input's worth of typing state around a `Predictor`."""

    def __init__(self, predictor: Predictor, k: int = 3, max_chars: int | None = None):
        self.predictor = predictor
        self.k = k
        self.max_chars = max_chars  # accept never makes the text longer (the input's limit)
        self.stats = LiveStats()
        self.suggestions: list[str] = []
        self.clear()

    # -- the keystroke path ------------------------------------------------------------
    def update(self, text: str, cursor: int | None = None) -> Update:
        """The text of the input or its cursor (None: the end) changed (any change): resync and suggest."""
        cursor = len(text) if cursor is None else max(0, min(cursor, len(text)))
        edited = False
        if self._auto_space is not None:
            text, cursor, edited = self._into_auto_space(text, cursor)
            self._auto_space = None
        self.text, self.cursor = text, cursor
        tail, partial, full, cut = _context(text, cursor)
        tokens = full[-MAX_CONTEXT_WORDS:]
        new_words: list[str] = []
        if tokens != self._tokens:
            added = _appended(self._tokens, tokens)
            if added is None:
                self._rebuild(tokens)
                self._realign(tokens, len(full), cut)
            for word in added or ():
                self.predictor.commit(word)
                if word != BOS:
                    self._finished(word)
                    if word not in self.predictor and is_word(word) and not word.isdigit():
                        new_words.append(word)
            self._tokens = tokens
        self._ntokens, self._cut = len(full), cut
        self._accepted_word = None
        self._partial = partial
        self._pstart = cursor - len(tail) + partial_start(tail, partial)
        self._raw_partial = text[self._pstart : cursor] if partial else ""
        self._start = tokens[-1] == BOS
        self._suggest()
        return Update(list(self.suggestions), partial, new_words, text, cursor, edited)

    def _into_auto_space(self, text: str, cursor: int) -> tuple[str, int, bool]:
        """Punctuation typed right after the space an accept added takes its place."""
        pos, prev = self._auto_space, self.text
        if (len(text) == len(prev) + 1 and cursor == pos + 1 and text[pos] in _ATTACHES and prev[pos - 1] == " "
                and text[:pos] == prev[:pos] and text[pos + 1 :] == prev[pos:]):
            return text[: pos - 1] + text[pos:], pos, True
        return text, cursor, False

    def _rebuild(self, tokens: list[str]) -> None:
        self.predictor.reset()
        for t in tokens:
            self.predictor.commit(t)

    def _suggest(self) -> None:
        words = self.predictor.suggest(self._partial, self.k)
        self.suggestions = [cased(w, self._start, self._raw_partial) for w in words]

    # -- counting, per word of the message ---------------------------------------------
    # self._counted: the costs of the words before the cursor, in order (in self.stats);
    # self._stash: the costs of words taken back from the context (now after the cursor, or
    # deleted), the one that was first after it last: finished again as the same word, a word
    # keeps its cost.
    def _push(self, cost: tuple) -> None:
        self._counted.append(cost)
        self.stats._add(cost)

    def _finished(self, word: str) -> None:
        """`word` typed (or accepted) at the cursor: count it."""
        stash, kept = self._stash, None
        if stash and stash[-1][0] == word:  # that word taken back and finished again, unless it is still
            after = self.text[self.cursor : self.cursor + len(word) + 40]  # after the cursor (this one inserted)
            kept = stash.pop() if words(after)[:1] != [word] else None
        if self._accepted_word is not None and self._accepted_word == word:
            self._push((word, 1, 1, self._accepted_typed, 1, len(word) + 1))
        else:
            self._push(kept or _typed(word))

    def shown_stats(self) -> LiveStats:
        """`stats` with the words after the cursor counted too (they are still in the text): taken back
        from the context when the cursor moved before them, their costs wait in the stash."""
        shown = replace(self.stats)
        if self._stash:
            ahead = words(self.text[self._pstart : self._pstart + TAIL_CHARS])  # from the word the cursor is in
            if self._partial and ahead and ahead[0] != self._stash[-1][0]:
                ahead = ahead[1:]  # a word being typed there: counted once finished
            for cost, word in zip(reversed(self._stash), ahead):
                if cost[0] != word:
                    break
                shown._add(cost)
        return shown

    def _realign(self, new: list[str], n: int, cut: bool) -> None:
        """The context changed other than by words finished at its end (a backspace into a word, the
        cursor moved, a paste): take back the words it lost, and put the ones it gained back (a word
        taken back before keeps its cost; any other is not counted, as a paste)."""
        old = self._tokens
        removed = _appended(new, old)
        if removed is not None:  # a backspace into the last word
            gone, come = removed, []
        elif cut or self._cut:  # positions known within the tail only: the counts stay as they are
            return
        else:
            o0, n0 = self._ntokens - len(old), n - len(new)  # the windows' first positions in the message
            p, end = max(o0, n0), min(self._ntokens, n)
            while p < end and old[p - o0] == new[p - n0]:
                p += 1
            gone, come = old[p - o0 :], new[p - n0 :]
        for t in reversed(gone):
            if t != BOS and self._counted:
                cost = self._counted.pop()
                self.stats._add(cost, -1)
                self._stash.append(cost)
        for t in come:
            if t != BOS:
                same = self._stash and self._stash[-1][0] == t
                self._push(self._stash.pop() if same else (t, 0, 0, 0, 0, 0))

    # -- accepting ---------------------------------------------------------------------
    def accept(self, index: int = 0) -> Update | None:
        """Accept suggestion `index` (0 = best): replace the word at the cursor (all of it, where the
        cursor is inside one: "ki|ng") or insert the word there, add a space unless a space or
        punctuation that attaches (`_ATTACHES`) follows, and put the cursor after that space or mark.
        None if there is no such suggestion; MessageFull if the text would pass `max_chars`."""
        if not 0 <= index < len(self.suggestions):
            return None
        word = self.suggestions[index]
        text, cursor = self.text, self.cursor
        end = _word_end(text, cursor) if self._partial else cursor
        before, after = text[: self._pstart], text[end:]
        if self._pstart == cursor and _needs_space(before):
            before += " "
        space = not after[:1].isspace() and after[:1] not in _ATTACHES
        new = before + word + (" " if space else "") + after
        if self.max_chars is not None and len(new) > self.max_chars:
            raise MessageFull(f"message limited to {self.max_chars:,} characters: {word!r} not inserted")
        if self._partial and self._stash and words(text[self._pstart : end]) == [self._stash[-1][0]]:
            self._stash.pop()  # the word the cursor is in, counted before it moved there, is replaced
        at = len(before) + len(word) + 1
        self._accepted_word, self._accepted_typed = word.lower(), len(self._partial)
        update = self.update(new, at)
        self._auto_space = at if space else None
        return update

    # -- messages ----------------------------------------------------------------------
    def finish(self) -> str:
        """End the message (Enter): count the last word if one was being typed, clear, return the text."""
        text = self.text
        self._auto_space = None
        if self.cursor != len(text):
            self.update(text)  # the words after the cursor are the message's too
        if self._partial:
            self._finished(self._partial)
        if text.strip():
            self.stats.messages += 1
        self.clear()
        return text

    def clear(self) -> None:
        self.text = ""
        self.cursor = self._pstart = 0
        self._tokens = [BOS]
        self._ntokens, self._cut = 1, False
        self._partial = self._raw_partial = ""
        self._start = True
        self._accepted_word: str | None = None  # set by accept(): the next commit is that word
        self._accepted_typed = 0
        self._auto_space: int | None = None  # set by accept(): where its space ends
        self._counted: list[tuple] = []
        self._stash: list[tuple] = []
        self.predictor.reset()
        self._suggest()

    def resync(self) -> None:
        """The predictor changed (new model, vocabulary): rebuild the context from the text and suggest."""
        _, _, full, cut = _context(self.text, self.cursor)
        self._tokens = full[-MAX_CONTEXT_WORDS:]
        self._ntokens, self._cut = len(full), cut
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
