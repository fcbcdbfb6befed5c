"""models.text normalisation edge cases; models.vocab versioning and serialisation."""

from __future__ import annotations

import pytest

from models.errors import FedkbError
from models.text import BOS, MAX_WORD_CHARS, UNK, is_word, normalize_text, sentence_tokens, words
from models.vocab import Vocabulary, appended, build_vocab


@pytest.mark.parametrize("raw, expected", [
    ("", ""),
    ("   \t\n ", ""),
    ("don\u2019t  stop", "don't stop"),  # curly apostrophe, double space
    ("a\u200bb\x00c", "a b c"),  # zero-width space and NUL become spaces
    ("\ufb01ne", "fine"),  # NFKC folds the ligature
    ("Ｈｅｌｌｏ", "Hello"),  # full-width letters
    ("Keep CASE", "Keep CASE"),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("", []),
    ("...!!! ,,, 😀🎉", []),
    ("Rock'n'roll isn't DEAD", ["rock'n'roll", "isn't", "dead"]),
    ("'quoted' words_with_underscores", ["quoted", "words", "with", "underscores"]),
    ("Привет, 世界 42", ["привет", "世界", "42"]),
])
def test_words(raw, expected):
    assert words(raw) == expected


def test_sentence_tokens_boundaries():
    assert sentence_tokens("Hi there. How are you?") == [BOS, "hi", "there", BOS, "how", "are", "you"]
    assert sentence_tokens("") == [BOS]
    assert sentence_tokens("?!... ok!!") == [BOS, "ok"]
    assert sentence_tokens("a.. . b") == [BOS, "a", BOS, "b"]


def test_is_word():
    assert is_word("hello") and is_word("don't") and is_word("世界")
    assert not is_word("") and not is_word("a b") and not is_word("x" * (MAX_WORD_CHARS + 1)) and not is_word("'a")


def test_vocabulary_add_is_versioned_and_append_only():
    v0 = Vocabulary((BOS, UNK, "a", "b"), 0, 4)
    v1 = v0.add(["c", "a", "not a word", "c", "d"])
    assert v1.words == (BOS, UNK, "a", "b", "c", "d") and v1.version == 1 and v1.base_size == 4
    assert all(v1.id(w) == v0.id(w) for w in v0.words)  # indices never move
    assert v1.add(["a", "b"]) is v1  # nothing new: same version
    assert v1.id("zzz") == 1 and "c" in v1 and "zzz" not in v1 and len(v1) == 6
    assert Vocabulary.from_json(v1.to_json()) == v1


@pytest.mark.parametrize("obj", [{}, {"words": ["a"], "version": 0, "base_size": 0},
                                 {"words": [BOS, UNK, "a", "a"], "version": 0, "base_size": 0},
                                 {"words": [BOS, UNK], "version": "x", "base_size": 0},
                                 {"words": [BOS, UNK, "a"], "version": 0, "base_size": 4},
                                 {"words": [BOS, UNK, "a"], "version": 0, "base_size": -1},
                                 {"words": [BOS, UNK, "a"], "version": 0, "base_size": 2.0},
                                 {"words": [BOS, UNK, "a"], "version": False, "base_size": 3},
                                 {"words": (BOS, UNK, "a"), "version": 0, "base_size": 3},
                                 {"words": [BOS, UNK, 7], "version": 0, "base_size": 3},
                                 {"words": [BOS, UNK, "A"], "version": 0, "base_size": 3},
                                 {"words": [BOS, UNK, "a b"], "version": 0, "base_size": 3},
                                 None, [BOS, UNK]])
def test_malformed_vocabulary_is_a_fedkb_error(obj):
    with pytest.raises(FedkbError, match=r"^vocab\.json: bad vocabulary: vocab"):
        Vocabulary.from_json(obj, "vocab.json")


def test_build_vocab_ranks_by_count_then_alphabet():
    v = build_vocab([[BOS, "b", "a", "b", "c", "c"], [BOS, "a", "d"]], size=5)
    assert v.words == (BOS, UNK, "a", "b", "c") and v.base_size == 5 and v.version == 0


def test_appended_counts_the_words_kept_only_when_words_were_appended():
    base = ("<s>", "<unk>", "a", "b")
    assert appended(base, base + ("zorblax",)) == 4  # a personal word typed: extend what was built
    assert appended(None, base) == 0 and appended(base, base) == 0  # nothing built yet; nothing new
    assert appended(base, base[:3]) == 0 and appended(base, ("<s>", "<unk>", "b", "a", "c")) == 0  # not an extension
