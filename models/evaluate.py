"""Simulated typing: next-word accuracy and keystroke savings.

For every word of every message, the typist looks at the k suggestions before
each keystroke; as soon as the word is among them it is accepted with one key
(which also inserts the space), else the word is typed out and followed by a
space.  As in Presage's `presage_simulator`:

    KSR = (1 - (keys typed + keys to select) / keys without prediction) x 100

case-insensitive, punctuation not counted (the model predicts words only).
top-1 / top-3: the word is the first / among the k suggestions before its first
letter is typed.  Words outside the vocabulary count as misses.

The scores for all of a message's positions come from the predictor's
`message_scores` (the torch Predictor: one forward pass; the keyboard's NumpyPredictor: the
recurrence word by word and the output layer in one product, so the keyboard measures
without torch), and the prefix filtering is
exactly the predictor's, so the numbers are what a user of the keyboard would see (tests
hold them equal, and the two predictors to the same numbers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from models.ksr import keystroke_savings
from models.suggest import IncrementalPredictor
from models.text import BOS, sentence_tokens

MAX_MESSAGE_WORDS = 200


@dataclass
class TypingStats:
    words: int = 0
    top1_hits: int = 0
    top3_hits: int = 0
    oov: int = 0
    keys_typed: int = 0
    keys_selected: int = 0
    keys_without: int = 0

    def add(self, other: "TypingStats") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def summary(self) -> dict:
        w = max(self.words, 1)
        return {
            "words": self.words,
            "top1": round(100.0 * self.top1_hits / w, 3),
            "top3": round(100.0 * self.top3_hits / w, 3),
            "ksr": round(keystroke_savings(self.keys_typed, self.keys_selected, self.keys_without), 3),
            "oov_rate": round(100.0 * self.oov / w, 3),
            **{k: v for k, v in asdict(self).items() if k.startswith("keys")},
        }


def simulate_message(pred: IncrementalPredictor, message: str, k: int = 3) -> TypingStats:
    toks = sentence_tokens(message)[: MAX_MESSAGE_WORDS + 1]
    st = TypingStats()
    if len(toks) < 2:
        return st
    scores, first = pred.message_scores([pred.vocab.id(t) for t in toks], k)  # for toks[1:]
    for j, word in enumerate(toks[1:]):
        if word == BOS:
            continue
        st.words += 1
        st.keys_without += len(word) + 1
        known = word in pred.vocab and word not in pred.blocked
        if not known:
            st.oov += 1
        sugg = [pred.vocab.words[i] for i in first[j]]
        if known and sugg and sugg[0] == word:
            st.top1_hits += 1
        if known and word in sugg:
            st.top3_hits += 1
        accepted = False
        if known:
            for typed in range(len(word)):
                cands = sugg if typed == 0 else pred.rank(scores[j], word[:typed], k)
                if word in cands:
                    st.keys_typed += typed
                    st.keys_selected += 1
                    accepted = True
                    break
        if not accepted:
            st.keys_typed += len(word) + 1
    return st


def simulate_typing(pred: IncrementalPredictor, messages: Iterable[str], k: int = 3) -> dict:
    """Aggregate TypingStats over messages, as a JSON-ready summary dict."""
    total = TypingStats()
    n = 0
    for m in messages:
        total.add(simulate_message(pred, m, k))
        n += 1
    out = total.summary()
    out["messages"] = n
    return out
