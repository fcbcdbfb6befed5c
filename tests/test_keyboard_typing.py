"""The keyboard's typing logic (keyboard/typing.py), without a terminal."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyboard.typing import _ATTACHES, TAIL_CHARS, MessageFull, TypingSession, at_sentence_start, cased
from models.predictor import Predictor
from models.text import BOS, context_tokens, split_partial

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


# -- the cursor, the partial word's span, stats per word, auto-space, the length limit ---------------

def test_suggestions_and_accept_follow_the_cursor(predictor, tiny_loaded):
    """The strip was for the end of the text wherever the cursor was, and accept rewrote the text's last
    word and jumped to the end: editing mid-text showed, and accepted, the wrong word."""
    ckpt, tok = tiny_loaded
    ref = Predictor(ckpt.model, ckpt.vocab, tok)
    t = TypingSession(predictor)
    t.update("and the king")
    text = "and th the king"  # "th" typed after "and ", the cursor after it
    u = t.update(text, 6)
    assert u.partial == "th" and [w.lower() for w in u.suggestions] == ref.suggest_for("and th")
    best = t.suggestions[0]
    u = t.accept(0)
    assert t.text == f"and {best} the king" and u.text == t.text  # the space there is kept, not doubled
    assert t.cursor == u.cursor == len(f"and {best} ")
    # inside a word: the word ending at the cursor is completed, what follows stays
    t.update("and the qu king", 10)
    assert t._partial == "qu" and [w.lower() for w in t.suggestions] == ref.suggest_for("and the qu")
    w = t.suggestions[0]
    t.accept(0)
    assert t.text == f"and the {w} king" and t.cursor == len(f"and the {w} ")
    # between words: next-word suggestions for the text before the cursor, inserted there with a space
    t.update("and king", 4)
    assert [s.lower() for s in t.suggestions] == ref.suggest_for("and ")
    w = t.suggestions[0]
    t.accept(0)
    assert t.text == f"and {w} king" and t.cursor == len(f"and {w} ")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["type", "type", "type", "move", "backspace", "accept"]),
                                st.sampled_from(list("abcdefghilmnorstu")) | st.sampled_from([" ", ". ", ",", "’", "'", "e\u0301"]),
                                st.floats(0, 1)), max_size=40))
def test_edits_anywhere_suggest_as_a_fresh_session_at_the_cursor(predictor, tiny_loaded, steps):
    """Typing, deleting, moving and accepting anywhere: the strip is always what a fresh session (and
    the predictor's own set_context) gives for the text before the cursor; an accept puts the word
    right before the cursor; the counters stay sane."""
    ckpt, tok = tiny_loaded
    ref = Predictor(ckpt.model, ckpt.vocab, tok)
    t = TypingSession(predictor)
    text, cursor = "", 0
    for op, ch, where in steps:
        if op == "accept" and t.suggestions:
            word = t.suggestions[0]
            u = t.accept(0)
            text, cursor = u.text, u.cursor
            head = text[:cursor]
            head = head[:-1] if head[-1:] in _ATTACHES else head  # the cursor goes past a mark that attaches (". ")
            assert head.rstrip().endswith(word) and text.count(word) >= 1
            continue
        if op == "type":
            text, cursor = text[:cursor] + ch + text[cursor:], cursor + len(ch)
        elif op == "backspace" and cursor:
            text, cursor = text[: cursor - 1] + text[cursor:], cursor - 1
        elif op == "move":
            cursor = round(where * len(text))
        u = t.update(text, cursor)
        text, cursor = u.text, u.cursor
        assert [w.lower() for w in u.suggestions] == ref.suggest_for(text[:cursor])
        assert u.suggestions == TypingSession(ref).update(text, cursor).suggestions
        s = t.stats
        assert min(s.words, s.accepted, s.keys_typed, s.keys_selected, s.keys_without) >= 0
        assert s.keys_typed + s.keys_selected <= s.keys_without + s.words


@pytest.mark.parametrize("typed, partial", [
    ("I don\u2019", "don'"), ("I don\u2019t", "don't"), ("I don`", "don'"), ("I DON\u2019T", "don't"),
    ("the cafe\u0301", "café"), ("the cafe\u0301s", "cafés"), ("she said \u2018cafe\u0301", "café")])
def test_accept_replaces_a_partial_with_curly_apostrophes_or_combining_marks(predictor, typed, partial):
    """The partial word's span in the raw text stopped at ’, ` or a combining mark: accept kept the typed
    word and added the suggestion after it ("I don’ don't", "the cafécafés")."""
    predictor.add_personal_words(["cafés", "café"])
    t = TypingSession(predictor)
    u = t.update(typed)
    assert u.partial == partial
    best = t.suggestions[0]
    assert best.lower().startswith(partial)
    u = t.accept(0)
    head = typed[: len(typed) - len(typed.split()[-1])]
    quote = "\u2018" if "\u2018" in typed else ""
    assert u.text == f"{head}{quote}{best} " and u.cursor == len(u.text)
    assert (best[0].isupper()) == (typed.split()[-1].lstrip("\u2018")[0].isupper() or best.startswith("I"))


def test_a_leading_quote_is_not_part_of_the_word(predictor, tiny_loaded):
    """No word starts with "'": after an opening single quote the strip was empty."""
    ckpt, tok = tiny_loaded
    ref = Predictor(ckpt.model, ckpt.vocab, tok)
    t = TypingSession(predictor)
    u = t.update("she said 'th")
    assert u.partial == "th" and u.suggestions and [w.lower() for w in u.suggestions] == ref.suggest_for("she said th")
    best = t.suggestions[0]
    assert t.accept(0).text == f"she said '{best} "
    u = t.update("she said '")
    assert u.partial == "" and [w.lower() for w in u.suggestions] == ref.suggest_for("she said ")
    assert t.accept(0).text == f"she said '{t.text.split(chr(39))[1].split()[0]} "  # no space after the opening quote
    assert split_partial("'hel") == ("'", "hel") and split_partial("a ''") == ("a ''", "")


@pytest.mark.parametrize("text", ["Hi! \U0001f44b ", "thanks! :) ", "haha. - ", 'music! "', "\U0001f44d ", "(", '"', "- "])
def test_a_sentence_start_is_read_from_the_tokens(predictor, tiny_loaded, text):
    """A sentence end followed by an emoji, emoticon, quote or dash, and a message starting with a symbol,
    start a sentence as models/evaluate.py reads a message (BOS, capitals), for the keyboard and for the
    predictor's set_context (`suggest_for`) alike."""
    ckpt, tok = tiny_loaded
    ref = Predictor(ckpt.model, ckpt.vocab, tok)
    assert at_sentence_start(text)
    u = TypingSession(predictor).update(text)
    assert all(w[0].isupper() for w in u.suggestions)
    ends = text.rstrip(" \U0001f44b:)-\"\U0001f44d(")  # the same text with its sentence end last
    assert [w.lower() for w in u.suggestions] == ref.suggest_for(text) == ref.suggest_for(ends + " " if ends else "")
    assert context_tokens(text)[-1] == BOS


@pytest.mark.parametrize("text", ["hello. ", "thanks! ", "ok? ", "and so. the"])
def test_suggest_for_starts_a_sentence_after_a_sentence_end(predictor, tiny_loaded, text):
    """set_context dropped a sentence end at the end of the text: suggest_for("hello. ") continued "hello"."""
    ckpt, tok = tiny_loaded
    ref = Predictor(ckpt.model, ckpt.vocab, tok)
    assert ref.suggest_for(text) == [w.lower() for w in TypingSession(predictor).update(text).suggestions]
    ref.set_context(text)
    assert ref._history[-1] == BOS  # the word after a sentence end is read as a sentence start


def test_a_word_taken_back_and_finished_again_is_counted_once(predictor):
    """Accept, backspace the space, type "!": the word was counted twice, the second time as typed out."""
    t = TypingSession(predictor)
    t.update("and th")
    best = t.suggestions[0].lower()
    t.accept(0)
    before = (t.stats.words, t.stats.accepted, t.stats.keys_typed, t.stats.keys_selected, t.stats.keys_without)
    assert before == (2, 1, 4 + 2, 1, 4 + len(best) + 1)
    t.update(t.text[:-1])  # the space taken back: the word is the partial word again
    assert t.stats.words == 1
    t.update(t.text + "!")
    assert (t.stats.words, t.stats.accepted, t.stats.keys_typed, t.stats.keys_selected, t.stats.keys_without) == before
    # a typo fixed after its space: one word, counted as what it became
    t = TypingSession(predictor)
    for text in ["t", "te", "teh", "teh ", "teh", "te", "t", "th", "the", "the "]:
        t.update(text)
    assert (t.stats.words, t.stats.keys_typed, t.stats.keys_without) == (1, 4, 4)
    # a word inserted mid-text, then Enter with the cursor there: every word of the message once
    t = TypingSession(predictor)
    for i in range(1, len("and the king ") + 1):
        t.update("and the king "[:i])
    t.update("and the king ", 4)
    t.update("and so the king ", 7)
    t.finish()
    assert (t.stats.words, t.stats.keys_without) == (4, 4 + 3 + 4 + 5)
    # the same word as the next one inserted before it: both counted
    t = TypingSession(predictor)
    t.update("the ")
    t.update("the ", 0)
    t.update("the the ", 4)
    t.finish()
    assert t.stats.words == 2


def test_punctuation_after_an_accepted_word_takes_its_space(predictor):
    """"see you tomorrow ." : the space the accept added stayed before the punctuation typed next."""
    t = TypingSession(predictor)
    t.update("and th")
    best = t.suggestions[0]
    t.accept(0)
    u = t.update(t.text + ".")
    assert u.edited and u.text == t.text == f"and {best}." and u.cursor == len(u.text)
    assert t.stats.words == 2 and t.stats.accepted == 1
    assert all(w[0].isupper() for w in u.suggestions)  # a sentence starts
    # mid-text too, and only for the key right after the accept
    t.update("and king", 4)
    w = t.suggestions[0]
    t.accept(0)
    u = t.update(f"and {w} ,king", len(f"and {w} ,"))
    assert u.edited and u.text == f"and {w},king" and u.cursor == len(f"and {w},")
    t.update("and th")
    t.accept(0)
    t.update(t.text + "a")
    assert not t.update(t.text + ".").edited and t.text.endswith(" a.")
    t.accept(0)  # a space that was there already is not the accept's
    assert not t.update(t.text + "x").edited


def test_accept_never_passes_the_length_limit(predictor):
    """The input's max_length applies to keys, not to a value set in code: an accept pushed a message
    past 10,000 characters, which the device then cut mid-word."""
    t = TypingSession(predictor, max_chars=12)
    t.update("and the th")
    assert any(len(f"and the {w} ") > 12 for w in t.suggestions)
    long = next(i for i, w in enumerate(t.suggestions) if len(f"and the {w} ") > 12)
    with pytest.raises(MessageFull):
        t.accept(long)
    assert t.text == "and the th" and t.stats.words == 2
    short = TypingSession(predictor, max_chars=100)
    short.update("and the th")
    assert short.accept(0).text.startswith("and the ")


def test_accept_inside_a_word_replaces_all_of_it(predictor):
    """The cursor in "ki|ng", tab: "the kind ng is here" (only the part before the cursor was replaced)."""
    t = TypingSession(predictor)
    for i in range(1, len("the king is here ") + 1):
        t.update("the king is here "[:i])
    assert t.update("the king is here ", 6).partial == "ki"
    w = t.suggestions[0]
    u = t.accept(0)
    assert u.text == f"the {w} is here " and u.cursor == len(f"the {w} ")
    t.update(u.text)  # the cursor to the end: each word of the message counted once, "king" no more
    assert t.stats.words == 4
    # an apostrophe or a combining mark inside the word is part of it; a bracket after it is not
    for text, cursor, start, rest in [("the kin’s here", 6, "the ", " here"), ("(see kin) now", 7, "(see ", ") now"),
                                      ("the cafe\u0301s now", 6, "the ", " now")]:
        t = TypingSession(predictor)
        t.update(text, cursor)
        w = t.suggestions[0]
        assert t.accept(0).text == start + w + rest


def test_accept_before_attaching_punctuation_adds_no_space(predictor):
    """"see you tomorro|." + tab was "see you tomorrow ."."""
    t = TypingSession(predictor)
    for i in range(1, len("and th") + 1):
        t.update("and th"[:i])
    t.update("and th.", 6)
    w = t.suggestions[0]
    u = t.accept(0)
    assert u.text == f"and {w}." and u.cursor == len(u.text)
    assert (t.stats.words, t.stats.accepted) == (2, 1)
    t = TypingSession(predictor)
    t.update("and th, so", 6)
    w = t.suggestions[0]
    assert t.accept(0).text == f"and {w}, so" and t.cursor == len(f"and {w},")


def test_the_shown_stats_count_the_words_after_the_cursor(predictor):
    """Home made the stats bar drop to the words before the cursor (0 words, 0 keys saved)."""
    t = TypingSession(predictor)
    for i in range(1, len("and th") + 1):
        t.update("and th"[:i])
    t.accept(0)
    t.update(t.text + "king ")
    full = t.shown_stats()
    assert full == t.stats and full.words == 3 and full.accepted == 1
    for cursor in (0, 2, 4, len(t.text) - 3):
        t.update(t.text, cursor)
        assert t.shown_stats() == full and t.stats.words < 3
    t.update(t.text)
    assert t.stats == full
