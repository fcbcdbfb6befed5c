"""Text normalisation and word splitting, shared by every layer.

The model works on lower-cased *words*: runs of letters/digits with inner
apostrophes ("don't", "rock'n'roll").  Everything else (punctuation, emoji,
symbols) is not predicted; sentence-final punctuation starts a new sentence.
"""

from __future__ import annotations

import re
import unicodedata

BOS = "<s>"  # sentence / message boundary: the context a message starts from
UNK = "<unk>"  # a word outside the vocabulary
SPECIALS = (BOS, UNK)

MAX_WORD_CHARS = 40  # longer "words" (hashes, URLs, key-mashing) are never vocabulary

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
_SPACE = re.compile(r"\s+")
# A word: letters/digits (any script) with inner apostrophes.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
# A token of the stream: a word, or a sentence-final mark.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[.!?]+")


def normalize_text(text: str) -> str:
    """NFKC, straight apostrophes, no control characters, single spaces. Keeps case."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    text = _CONTROL.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """The lower-cased words of `text`, punctuation dropped."""
    return [w.lower() for w in _WORD.findall(normalize_text(text))]


def without_word(text: str, word: str) -> str:
    """`text` (normalized) with each occurrence of `word` (as `words` finds and lower-cases it) taken out."""
    return normalize_text(_WORD.sub(lambda m: "" if m.group().lower() == word else m.group(), normalize_text(text)))


def sentence_tokens(text: str, keep_end: bool = False) -> list[str]:
    """Lower-cased words of one message with BOS at each sentence start.

    "Hi there. How are you?" -> [<s>, hi, there, <s>, how, are, you]
    The message itself starts with BOS, so every message is an independent context.
    A sentence end at the very end is dropped, unless `keep_end` (the text is the context
    of a word still to come: `context_tokens`).
    """
    out = [BOS]
    for tok in _TOKEN.findall(normalize_text(text)):
        if tok[0] in ".!?":
            if out[-1] != BOS:
                out.append(BOS)
        else:
            out.append(tok.lower())
    if len(out) > 1 and out[-1] == BOS and not keep_end:
        out.pop()
    return out


def context_tokens(context: str) -> list[str]:
    """The model's context for the word after `context` (finished text, split_partial's first part):
    its tokens as sentence_tokens reads the whole message, so ending in BOS wherever a sentence
    ended ("Hi! 👋 " as "Hi! "), at most the last MAX_CONTEXT_WORDS.  The next word starts a
    sentence exactly when the last token is BOS (also at the message start, and after "👍 ")."""
    return sentence_tokens(context, keep_end=True)[-MAX_CONTEXT_WORDS:]


def is_word(token: str) -> bool:
    """True for a string the model could have as a vocabulary word."""
    return 0 < len(token) <= MAX_WORD_CHARS and _WORD.fullmatch(token) is not None


MAX_CONTEXT_WORDS = 100  # only the last words of a huge paste are fed to the LSTM
_WORD_END = (" ", "\n", "\t", ".", ",", "!", "?", ";", ":", '"', ")", "(")
_RAW_APOSTROPHES = "'`\u2019\u2018\u02bc\uff07"  # what reads as "'" once normalised (NFKC, _APOSTROPHES)


def split_partial(text: str) -> tuple[str, str]:
    """("context", "partial word"): the last word is partial if the text doesn't end in a separator."""
    # tested on the text as the words are read (NFKC, straight apostrophes), before spaces are trimmed:
    # "q’" is the partial word "q'", as "q'" is
    tail = unicodedata.normalize("NFKC", text[-8:]).translate(_APOSTROPHES) if text else ""
    ends_word = not tail or tail.endswith(_WORD_END) or not (tail[-1].isalnum() or tail[-1] == "'")
    text = normalize_text(text)
    if ends_word or not text:
        return text, ""
    i = len(text)
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] == "'"):
        i -= 1
    while i < len(text) and text[i] == "'":  # no word starts with "'": an opening quote ("she said 'hel")
        i += 1
    return text[:i], text[i:].lower()


def _in_partial(c: str) -> bool:
    return c.isalnum() or c in _RAW_APOSTROPHES or unicodedata.category(c)[0] == "M"


def partial_start(text: str, partial: str) -> int:
    """Where split_partial(text)'s partial word `partial` starts in the raw `text` (len(text) if none):
    the span to replace when a suggestion is accepted.  Read back with split_partial's rule on the raw
    characters: letters, digits, apostrophes of any kind and combining marks ("cafe" + U+0301 + "s", "don’t"),
    no leading apostrophe; checked against `partial` as normalised, moving on if NFKC joined or split
    characters across the start."""
    if not partial:
        return len(text)
    i = len(text)
    while i > 0 and _in_partial(text[i - 1]):
        i -= 1
    while i < len(text) and text[i] in _RAW_APOSTROPHES:
        i += 1
    for j in range(i, min(i + 8, len(text))):
        if normalize_text(text[j:]).lower() == partial:
            return j
    return i
