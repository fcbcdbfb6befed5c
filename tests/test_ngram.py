"""models.ngram: interpolated Kneser-Ney 3-gram, exact values on a hand-counted corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.ngram import KneserNey3
from models.predictor import Predictor
from models.text import BOS, UNK
from models.vocab import Vocabulary

# <s> a b / <s> a c / <s> b a, each message padded to the context (<s>, <s>):
#   trigram counts c(uvw):  (s,s): a 2, b 1    (s,a): b 1, c 1    (s,b): a 1
#   continuation N1+(.vw):  s: a 1, b 1        a: b 1, c 1        b: a 1
#   continuation N1+(.w):   a 2 (after s, b)   b 2 (after s, a)   c 1 (after a)
#   D3 = n1/(n1+2n2) = 4/(4+2) = 2/3;  D2: no count of 2 -> 0.5;  D1 = 1/(1+2*2) = 0.2
FIXTURES_DIR = Path(__file__).parent / "fixtures"
VOCAB = Vocabulary((BOS, UNK, "a", "b", "c"), 0, 5)
S, A, B, C = 0, 2, 3, 4
LINES = ["a b", "A c.", "b, a!"]

FLOOR = 0.2 * 3 / 5 / 5  # D1 * N1+(.) / N1+(..) * 1/V
P1 = [FLOOR, FLOOR, 1.8 / 5 + FLOOR, 1.8 / 5 + FLOOR, 0.8 / 5 + FLOOR]
P2_a = [0.5 * p for p in P1]  # row a: {b: 1, c: 1}, total 2, gamma = 0.5 * 2 / 2
P2_a[B] += 0.5 / 2
P2_a[C] += 0.5 / 2
P2_s = [0.5 * p for p in P1]  # row s: {a: 1, b: 1}
P2_s[A] += 0.25
P2_s[B] += 0.25


@pytest.fixture(scope="module")
def kn():
    return KneserNey3(VOCAB, LINES)


def test_discounts_and_counts(kn):
    assert kn.d3 == pytest.approx(2 / 3) and kn.d2 == 0.5 and kn.d1 == pytest.approx(0.2)
    assert kn.num_trigrams == 5 and kn.num_tokens == 9


def test_unigram_level(kn):
    assert kn.p1.tolist() == pytest.approx(P1, abs=1e-12)
    assert float(kn.p1.sum()) == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_trigram_probabilities(kn):
    p = kn.prob(S, A).tolist()  # row (s,a): {b: 1, c: 1}, total 2, gamma = (2/3) * 2 / 2
    assert p[B] == pytest.approx((1 - 2 / 3) / 2 + 2 / 3 * P2_a[B], abs=1e-12)
    assert p[C] == pytest.approx((1 - 2 / 3) / 2 + 2 / 3 * P2_a[C], abs=1e-12)
    assert p[A] == pytest.approx(2 / 3 * P2_a[A], abs=1e-12)
    q = kn.prob(S, S).tolist()  # row (s,s): {a: 2, b: 1}, total 3, gamma = (2/3) * 2 / 3
    assert q[A] == pytest.approx((2 - 2 / 3) / 3 + 4 / 9 * P2_s[A], abs=1e-12)
    assert q[A] == pytest.approx(0.640888889, abs=1e-8)  # on paper: 4/9 + 4/9 * 0.442


def test_unseen_contexts_back_off(kn):
    assert kn.prob(C, C).tolist() == pytest.approx(P1, abs=1e-12)  # nothing ever followed c
    assert kn.prob(C, A).tolist() == pytest.approx(P2_a, abs=1e-12)  # (c, a) unseen, a seen


@pytest.mark.parametrize("ctx", [(S, S), (S, A), (S, B), (A, B), (C, C), (1, 1)])
def test_sums_to_one(kn, ctx):
    assert float(kn.prob(*ctx).sum()) == pytest.approx(1.0, abs=1e-12)


def test_sums_to_one_on_fixture_vocabulary(tiny_loaded):
    from models.datasets import load_pretrain_lines

    ckpt, _ = tiny_loaded
    lines = load_pretrain_lines(FIXTURES_DIR / "pretrain.txt.gz")[:800]
    kn = KneserNey3(ckpt.vocab, lines)
    hi = ckpt.vocab.id("hi")
    for ctx in [(0, 0), (0, hi), (hi, 1), (1, 1), (len(ckpt.vocab) - 1, len(ckpt.vocab) - 2)]:
        p = kn.prob(*ctx)
        assert p.shape == (len(ckpt.vocab),) and bool((p > 0).all())
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)


def test_predictor_over_kn_matches_its_probabilities(kn, tiny):
    from models.tokenizer import Tokenizer

    pred = Predictor(kn, VOCAB, Tokenizer(tiny[1]))
    assert pred.suggest() == ["a", "b", "c"]  # (s,s): a 2, b 1
    pred.commit("a")
    assert torch.equal(pred.scores()[2:], kn.logprob(S, A)[2:])
    assert pred.suggest() == ["b", "c", "a"]
    assert pred.suggest("c") == ["c"]
    logp, state = kn(torch.tensor([[S, A]]))  # batched = step by step
    assert torch.equal(logp[0, 1], kn.logprob(S, A)) and state == (S, A)
    assert math.isclose(float(logp[0, 0].exp().sum()), 1.0, abs_tol=1e-5)
