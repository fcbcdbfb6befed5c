"""The keyboard's typing logic (keyboard/typing.py), without a terminal."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyboard.typing import TAIL_CHARS, TypingSession, at_sentence_start, cased
from models.predictor import Predictor

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture()
def predictor(tiny_loaded):
    ckpt, tok = tiny_loaded
    return Predictor(ckpt.model, ckpt.vocab, tok)


def test_typing_logic_does_not_load_textual():
    code = "import sys, keyboard.typing, keyboard.session; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cased():
    assert cased("i", False) == "I"
    assert cased("i'm", False) == "I'm"
    assert cased("hello", True) == "Hello"
    assert cased("hello", False) == "hello"
    assert cased("hello", False, typed="He") == "Hello"
    assert at_sentence_start("") and at_sentence_start("Hi there. ") and at_sentence_start("Really?!")
    assert not at_sentence_start("Hi there ")


def test_suggestions_match_the_predictor(predictor, tiny_loaded):
    ckpt, tok = tiny_loaded
    ref = Predictor(ckpt.model, ckpt.vocab, tok)
    t = TypingSession(predictor)
    text = ""
    for ch in "the king and the qu":
        text += ch
        got = [w.lower() for w in t.update(text).suggestions]
        assert got == ref.suggest_for(text)


def test_partial_word_gives_completions(predictor):
    t = TypingSession(predictor)
    u = t.update("and th")
    assert u.partial == "th"
    assert u.suggestions and all(w.lower().startswith("th") for w in u.suggestions)


def test_sentence_start_is_capitalised(predictor):
    t = TypingSession(predictor)
    assert all(w[0].isupper() for w in t.update("").suggestions)
    assert all(w[0].isupper() for w in t.update("and so. ").suggestions)


def test_accept_inserts_word_and_space_and_counts_ksr(predictor):
    t = TypingSession(predictor)
    t.update("and th")
    best = t.suggestions[0]
    t.accept(0)
    assert t.text == f"and {best} "
    # "and" typed out (4 keys), the accepted word: 2 letters + 1 key instead of len+1
    s = t.stats
    assert (s.words, s.accepted) == (2, 1)
    assert s.keys_without == 4 + len(best) + 1
    assert s.keys_typed + s.keys_selected == 4 + 2 + 1
    assert s.ksr == pytest.approx(100 * (1 - 7 / s.keys_without))


def test_accept_out_of_range_is_ignored(predictor):
    t = TypingSession(predictor)
    t.update("zzzzzzzz")
    assert t.accept(5) is None


def test_unknown_words_are_reported_once_finished(predictor):
    t = TypingSession(predictor)
    assert t.update("hello zorblaxian").new_words == []
    assert t.update("hello zorblaxian ").new_words == ["zorblaxian"]


def test_finish_clears(predictor):
    t = TypingSession(predictor)
    t.update("and the king")
    assert t.finish() == "and the king"
    assert t.text == "" and t.stats.messages == 1 and t.stats.words == 3


def test_huge_paste_only_looks_at_the_tail(predictor):
    t = TypingSession(predictor)
    big = ("the king and the queen " * 50_000)  # ~1.1 MB
    u = t.update(big + "an")
    assert u.partial == "an"
    assert len(predictor._history) <= 101
    assert len(big) > 100 * TAIL_CHARS


text_strategy = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
emoji = st.sampled_from(["😀", "👍🏽", "🇫🇷", "\u200b", "\x00", "\x1b[31m", "\r\n", "\t", "é", "ﬁ", "’", "…", "...", "!!"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(text_strategy, emoji, st.just(" "), st.just("<accept>"), st.just("<finish>"),
                               st.just("<backspace>")), max_size=25))
def test_arbitrary_keystrokes_never_crash(predictor, steps):
    t = TypingSession(predictor)
    text = ""
    for s in steps:
        if s == "<accept>":
            t.accept(0)
            text = t.text
        elif s == "<finish>":
            t.finish()
            text = ""
        elif s == "<backspace>":
            text = text[:-1]
            t.update(text)
        else:
            text += s
            u = t.update(text)
            assert len(u.suggestions) <= 3
        assert t.stats.keys_typed <= t.stats.keys_without  # counters stay sane
        assert all(isinstance(w, str) and w for w in t.suggestions)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.text(min_size=1, max_size=50))
def test_100kb_paste_never_crashes(predictor, chunk):
    t = TypingSession(predictor)
    paste = (chunk * (100_000 // len(chunk) + 1))[:100_000]
    t.update(paste)
    t.update(paste + " x")
    t.accept(0)
    assert len(t.suggestions) <= 3
