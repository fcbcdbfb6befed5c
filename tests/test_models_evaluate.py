"""models.evaluate: the batched simulation equals a slow reference typing word by word
through the Predictor the keyboard uses (commit / suggest), for the LSTM and the KN 3-gram."""

from __future__ import annotations

from pathlib import Path

from models.evaluate import TypingStats, simulate_message, simulate_typing
from models.predictor import Predictor
from models.text import BOS, sentence_tokens

FIXTURES = Path(__file__).parent / "fixtures"


def slow_reference(pred: Predictor, messages, k: int = 3) -> TypingStats:
    """Type every word through Predictor.suggest/commit, one keystroke at a time (Presage's rule)."""
    st = TypingStats()
    for m in messages:
        pred.reset()
        for word in sentence_tokens(m)[1:201]:
            if word == BOS:
                pred.commit(BOS)
                continue
            st.words += 1
            st.keys_without += len(word) + 1
            known = word in pred.vocab and word not in pred.blocked
            st.oov += not known
            first = pred.suggest("", k)
            st.top1_hits += known and first[:1] == [word]
            st.top3_hits += known and word in first
            for typed in range(len(word) if known else 0):
                if word in pred.suggest(word[:typed], k):
                    st.keys_typed += typed
                    st.keys_selected += 1
                    break
            else:
                st.keys_typed += len(word) + 1
            pred.commit(word)
    return st


def _messages(fixture_users, n=40):
    msgs = [m for u in fixture_users for m in u.future][:n]
    return msgs + ["", "!!!", "Hi. How are you? zzqxw I'm fine."]


def test_simulation_equals_the_slow_reference_lstm(tiny_loaded, fixture_users):
    ckpt, tok = tiny_loaded
    pred = Predictor(ckpt.model, ckpt.vocab, tok)
    msgs = _messages(fixture_users)
    fast = TypingStats()
    for m in msgs:
        fast.add(simulate_message(pred, m))
    assert fast == slow_reference(pred, msgs)
    assert fast.words > 100 and 0 < fast.top1_hits <= fast.top3_hits


def test_the_keyboards_numpy_predictor_measures_what_the_torch_one_does(tiny, tiny_loaded, fixture_users):
    """The keyboard measures (a profile's scores, "Learn now"'s before/after) on its NumPy predictor,
    one step a word: the same counts as the slow reference typed through it, and as the torch
    Predictor's one forward pass a message, personal and blocked words included."""
    from models.numpy_predictor import NumpyPredictor
    from models.tokenizer import Tokenizer

    ckpt, tok = tiny_loaded
    personal, blocked = ["zzqxw"], [ckpt.vocab.words[5]]
    fast = NumpyPredictor.load(tiny[0], Tokenizer(tiny[1]))
    fast.set_vocab(fast.vocab, personal)
    for w in blocked:
        fast.block(w)
    ref = Predictor(ckpt.model, ckpt.vocab, tok, personal_words=personal, blocked=blocked)
    msgs = _messages(fixture_users)
    numpy_stats, torch_stats = TypingStats(), TypingStats()
    for m in msgs:
        numpy_stats.add(simulate_message(fast, m))
        torch_stats.add(simulate_message(ref, m))
    assert numpy_stats == torch_stats == slow_reference(fast, msgs)
    assert numpy_stats.words > 100 and 0 < numpy_stats.top1_hits <= numpy_stats.top3_hits


def test_simulation_equals_the_slow_reference_kn(tiny_loaded, fixture_users):
    from models.datasets import load_pretrain_lines
    from models.ngram import kn_predictor

    ckpt, tok = tiny_loaded
    pred = kn_predictor(ckpt.vocab, tok, load_pretrain_lines(FIXTURES / "pretrain.txt.gz"))
    msgs = _messages(fixture_users)
    fast = TypingStats()
    for m in msgs:
        fast.add(simulate_message(pred, m))
    assert fast == slow_reference(pred, msgs)
    assert fast.top1_hits > 0


def test_summary_numbers():
    st = TypingStats(words=4, top1_hits=1, top3_hits=2, oov=1, keys_typed=10, keys_selected=2, keys_without=20)
    s = st.summary()
    assert (s["top1"], s["top3"], s["ksr"], s["oov_rate"]) == (25.0, 50.0, 40.0, 25.0)


def test_hand_counted_keystrokes(tiny_loaded):
    """Blocked words count as misses: a whole word plus its space; KSR 0 when nothing is ever suggested."""
    ckpt, tok = tiny_loaded
    pred = Predictor(ckpt.model, ckpt.vocab, tok, blocked=[w for w in ckpt.vocab.words[2:]])
    r = simulate_typing(pred, ["hello how are you", "fine."])
    assert r["words"] == 5 and r["keys_without"] == 6 + 4 + 4 + 4 + 5 == r["keys_typed"]
    assert r["top1"] == r["top3"] == r["ksr"] == 0.0 and r["messages"] == 2


def test_one_ksr_formula_for_offline_and_live_counts():
    from keyboard.typing import LiveStats
    from models.ksr import keystroke_savings

    assert keystroke_savings(3, 1, 8) == 50.0
    assert keystroke_savings(0, 0, 0) == 0.0  # nothing typed: nothing saved, no division by zero
    live = LiveStats(keys_typed=3, keys_selected=1, keys_without=8)
    offline = TypingStats(words=2, keys_typed=3, keys_selected=1, keys_without=8).summary()
    assert live.ksr == offline["ksr"] == 50.0
    assert LiveStats().ksr == TypingStats().summary()["ksr"] == 0.0
