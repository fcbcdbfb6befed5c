"""The n-gram baseline: an interpolated Kneser-Ney word 3-gram LM.

Chen & Goodman 1998, "An Empirical Study of Smoothing Techniques for Language
Modeling" (interpolated Kneser-Ney, one absolute discount per order,
D = n1 / (n1 + 2 n2) as in Ney, Essen & Kneser 1994):

    P3(w|u,v) = max(c(uvw) - D3, 0) / c(uv.)  +  D3 N1+(uv.) / c(uv.) * P2(w|v)
    P2(w|v)   = max(N1+(.vw) - D2, 0) / N1+(.v.)  +  D2 N1+(v.) / N1+(.v.) * P1(w)
    P1(w)     = max(N1+(.w) - D1, 0) / N1+(..)  +  D1 N1+(.) / N1+(..) * 1/V

c = raw trigram counts; the lower orders use *continuation* counts N1+(.vw) =
the number of distinct words u seen before "v w" (N1+(.v.) their sum over w,
N1+(v.) the number of distinct w with N1+(.vw) > 0).  A context never seen
falls through to the next order; the uniform 1/V floor makes every word of the
vocabulary possible, so P3(.|u,v) sums to 1 over the vocabulary exactly.

It is trained on the same text, with the same vocabulary and tokenisation
(`sentence_tokens`, OOV -> UNK) as the LSTM, and looks like a `WordLM` to
`Predictor` (`compose`, `step`, `__call__`), so `Predictor(KneserNey3(...),
vocab, tokenizer)` and `models.evaluate.simulate_typing` evaluate it with
exactly the LSTM's code path: same suggestions, same prefix filter, same
OOV handling.  Each message starts from the context (BOS, BOS).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import Tensor

from models.errors import FedkbError
from models.text import sentence_tokens
from models.vocab import Vocabulary

BOS_ID = 0  # Vocabulary: index 0 is BOS


def _discount(counts: Iterable[int]) -> float:
    """D = n1 / (n1 + 2 n2) (Ney et al. 1994); 0.5 when the counts can't estimate it."""
    hist = Counter(counts)
    n1, n2 = hist.get(1, 0), hist.get(2, 0)
    if n1 == 0 or n2 == 0:
        return 0.5
    return n1 / (n1 + 2 * n2)


class _Level:
    """One order's sparse table: context -> (word ids, counts), with the totals the formula needs."""

    def __init__(self, table: dict, discount: float):
        self.d = discount
        self.rows: dict = {}
        for ctx, row in table.items():
            ids = torch.tensor(list(row.keys()), dtype=torch.long)
            cnt = torch.tensor(list(row.values()), dtype=torch.float64)
            self.rows[ctx] = (ids, cnt, float(cnt.sum()))

    def apply(self, ctx, lower: Tensor) -> Tensor:
        """P(.|ctx) (V,) float64 from the lower order's distribution `lower`."""
        row = self.rows.get(ctx)
        if row is None:
            return lower
        ids, cnt, total = row
        out = lower * (self.d * len(ids) / total)
        out[ids] += (cnt - self.d).clamp_min(0) / total
        return out


class KneserNey3:
    """Interpolated Kneser-Ney 3-gram over a fixed `Vocabulary` (see the module docstring)."""

    def __init__(self, vocab: Vocabulary, lines: Iterable[str]):
        self.vocab = vocab
        V = len(vocab)
        tri: dict[tuple[int, int], Counter] = defaultdict(Counter)
        self.num_tokens = 0  # tokens seen, BOS included (= len(models.train.encode(lines, vocab)))
        for line in lines:
            ids = [vocab.id(t) for t in sentence_tokens(line)]
            self.num_tokens += len(ids)
            u, v = BOS_ID, ids[0]  # the message starts from (BOS, BOS): ids[0] is BOS
            for w in ids[1:]:
                tri[(u, v)][w] += 1
                u, v = v, w
        # continuation counts: N1+(.vw) = distinct u before "v w"; N1+(.w) = distinct v before w
        bi: dict[int, Counter] = defaultdict(Counter)
        for (_, v), row in tri.items():
            for w in row:
                bi[v][w] += 1
        uni: Counter = Counter()
        for row in bi.values():
            for w in row:
                uni[w] += 1
        self.d3 = _discount(c for row in tri.values() for c in row.values())
        self.d2 = _discount(c for row in bi.values() for c in row.values())
        self.d1 = _discount(uni.values())
        self.num_trigrams = sum(len(r) for r in tri.values())
        self.tri = _Level(tri, self.d3)
        self.bi = _Level(bi, self.d2)
        p1 = torch.full((V,), 1.0 / V, dtype=torch.float64)
        if uni:
            ids = torch.tensor(list(uni.keys()), dtype=torch.long)
            cnt = torch.tensor(list(uni.values()), dtype=torch.float64)
            total = float(cnt.sum())
            p1 = p1 * (self.d1 * len(ids) / total)
            p1[ids] += (cnt - self.d1).clamp_min(0) / total
        self.p1 = p1

    # -- probabilities -------------------------------------------------------------------
    def prob(self, u: int, v: int) -> Tensor:
        """P(.|u, v) over the vocabulary, (V,) float64, sums to 1."""
        return self.tri.apply((u, v), self.bi.apply(v, self.p1))

    def logprob(self, u: int, v: int) -> Tensor:
        return self.prob(u, v).log().float()

    # -- the WordLM-like interface Predictor and simulate_message use ---------------------
    cfg = SimpleNamespace(base_vocab=0)  # no residual rows: WordTable.build only needs this

    def eval(self) -> "KneserNey3":
        return self

    def compose(self, table) -> tuple[Tensor, Tensor]:
        """No embeddings: placeholders of the right length (the vocabulary is fixed at training)."""
        if table.size != len(self.vocab):
            raise FedkbError(f"the n-gram model has {len(self.vocab)} words, not {table.size} (no personal words)")
        return torch.zeros(table.size, 0), torch.zeros(table.size)

    def step(self, token: int, emb, bias, state) -> tuple[Tensor, tuple[int, int]]:
        """One word in: next-word log-probabilities (V,), state = the last two word ids."""
        u, v = state if state is not None else (BOS_ID, BOS_ID)
        u, v = v, int(token)
        return self.logprob(u, v), (u, v)

    def __call__(self, tokens: Tensor, emb=None, bias=None, state=None):
        """tokens (1, T) -> (log-probs (1, T, V), state), like WordLM.forward's (logits, state)."""
        u, v = state if state is not None else (BOS_ID, BOS_ID)
        out = []
        for t in tokens[0].tolist():
            u, v = v, int(t)
            out.append(self.logprob(u, v))
        V = len(self.vocab)
        logp = torch.stack(out).unsqueeze(0) if out else torch.zeros(1, 0, V)
        return logp, (u, v)


def kn_predictor(vocab: Vocabulary, tokenizer, lines: Iterable[str], k: int = 3):
    """A `Predictor` backed by a Kneser-Ney 3-gram trained on `lines` with `vocab`."""
    from models.predictor import Predictor

    return Predictor(KneserNey3(vocab, lines), vocab, tokenizer, k=k)
