"""The keyboard's suggestions without PyTorch: NumPy inference, what typing runs on.

`import torch` alone takes ~1.5-2 s on this machine: most of a `fedkb predict` process, and
most of the keyboard's start.  Shipping keyboards run a small inference runtime, not the
training framework (Gboard: TensorFlow Lite); this is ours: a checkpoint's weights as NumPy
arrays (models/modelfile.py), the word table composed, the projected LSTM (PyTorch's gate
order i, f, g, o; h = W_hr (o * tanh c)) stepped in float32.  It has the interface of
`models.predictor.Predictor` that typing uses (reset, commit, suggest, set_context, `in`, and
the device's personal words, blocked words and new weights), and a test holds the two to the
same suggestions and log-probabilities.  Learning and evaluation keep the torch `Predictor`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from models.modelfile import Arrays, read_model
from models.text import BOS, MAX_CONTEXT_WORDS, SPECIALS, UNK, sentence_tokens, split_partial
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


class NumpyPredictor:
    def __init__(
        self,
        weights: Arrays,
        vocab: Vocabulary,
        tokenizer: Tokenizer,
        personal_words: Iterable[str] = (),
        blocked: Iterable[str] = (),
        k: int = 3,
        meta: dict | None = None,
    ):
        """`weights`: a checkpoint's arrays as models.modelfile.read_model returns them (checked)."""
        self.tokenizer, self.k, self.meta = tokenizer, k, meta or {}
        self.base_vocab = vocab
        self.vocab = vocab.add(personal_words)
        self.blocked = {w.lower() for w in blocked}
        self._history: list[str] = []
        self.set_weights(weights)

    @classmethod
    def load(cls, model_dir: Path, tokenizer: Tokenizer, k: int = 3) -> "NumpyPredictor":
        """The predictor of a checkpoint folder; FedkbError if it is missing, damaged or another model's."""
        f = read_model(Path(model_dir), tokenizer)
        return cls(f.weights, f.vocab, tokenizer, k=k, meta=f.meta)

    # -- weights and vocabulary-dependent caches ----------------------------------------
    def set_weights(self, weights: Arrays) -> None:
        """Predict with new weights (a personal or new global model): the caches are rebuilt and the
        context is fed again."""
        self.w = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in weights.items()}
        self._build()
        self._refresh()

    def _build(self) -> None:
        w, vocab = self.w, self.vocab
        pieces = [self.tokenizer.pieces(word) for word in vocab.words]
        lengths = np.array([len(p) for p in pieces])
        flat = np.fromiter((i for p in pieces for i in p), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.emb = np.add.reduceat(w["piece_emb"][flat], starts, axis=0) / lengths[:, None]  # (V, d)
        self.bias = np.add.reduceat(w["piece_bias"][flat], starts) / lengths  # (V,)
        r = min(vocab.base_size, w["residual"].shape[0])  # personal words past the base: pieces only
        self.emb[:r] += w["residual"][:r]
        self.bias[:r] += w["word_bias"][:r]
        self.emb, self.bias = self.emb.astype(np.float32), self.bias.astype(np.float32)
        order = sorted(range(len(vocab)), key=lambda i: vocab.words[i])
        self._sorted = [vocab.words[i] for i in order]
        self._sorted_idx = np.array(order, dtype=np.int64)
        self._mask = np.zeros(len(vocab), dtype=np.float32)
        for word in (*SPECIALS, *self.blocked):
            if word in vocab:
                self._mask[vocab.index[word]] = -np.inf

    def set_vocab(self, vocab: Vocabulary, personal_words: Iterable[str] = ()) -> None:
        self.base_vocab = vocab
        self.vocab = vocab.add(personal_words)
        self._build()
        self.reset()

    def add_personal_words(self, words: Iterable[str]) -> None:
        new = self.vocab.add(words)
        if new is not self.vocab:
            self.vocab = new
            self._build()
            self._refresh()

    def block(self, word: str) -> None:
        """Never suggest `word` again (this predictor)."""
        self.blocked.add(word.lower())
        if word.lower() in self.vocab:
            self._mask[self.vocab.index[word.lower()]] = -np.inf

    # -- context ------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty context: a new message."""
        self._history = []
        self._h, self._c = self.w["start_h"].copy(), self.w["start_c"].copy()
        self.commit(BOS)

    def commit(self, word: str) -> None:
        """Feed one finished word (or BOS at a sentence end): one LSTM step."""
        word = word.lower()
        if word == BOS and self._history and self._history[-1] == BOS:
            return
        self._history.append(word)
        w = self.w
        gates = w["lstm.weight_ih_l0"] @ self.emb[self.vocab.id(word)] + w["lstm.bias_ih_l0"] \
            + w["lstm.weight_hh_l0"] @ self._h + w["lstm.bias_hh_l0"]
        i, f, g, o = np.split(gates, 4)
        self._c = _sigmoid(f) * self._c + _sigmoid(i) * np.tanh(g)
        self._h = w["lstm.weight_hr_l0"] @ (_sigmoid(o) * np.tanh(self._c))
        logits = self.emb @ self._h + self.bias
        m = logits.max()
        self._logp = logits - (m + np.log(np.exp(logits - m).sum()))

    def _refresh(self) -> None:
        """Feed the context again (after the weights or the vocabulary changed)."""
        hist = self._history[-MAX_CONTEXT_WORDS:]
        self._history = []
        self._h, self._c = self.w["start_h"].copy(), self.w["start_c"].copy()
        for word in hist or [BOS]:
            self.commit(word)

    def set_context(self, text: str) -> str:
        """Replace the context with `text`'s finished words; returns the partial last word."""
        context, partial = split_partial(text)
        toks = sentence_tokens(context)[-MAX_CONTEXT_WORDS:]
        self._history = []
        self._h, self._c = self.w["start_h"].copy(), self.w["start_c"].copy()
        if not toks or toks[0] != BOS:
            self.commit(BOS)
        for t in toks:
            self.commit(t)
        return partial

    # -- suggestions --------------------------------------------------------------------
    def scores(self) -> np.ndarray:
        """Next-word log-probabilities (V,) with specials and blocked words at -inf."""
        return self._logp + self._mask

    def suggest(self, prefix: str = "", k: int | None = None) -> list[str]:
        """The k most likely next words starting with `prefix` (lower-cased), best first: a binary
        search in the alphabetical order for the prefix's range, then a top-k over that slice."""
        k = k or self.k
        prefix = prefix.lower()
        scores = self.scores()
        if prefix:
            lo = bisect.bisect_left(self._sorted, prefix)
            hi = bisect.bisect_left(self._sorted, prefix + "\U0010ffff", lo)
            cand = self._sorted_idx[lo:hi]
        else:
            cand = np.arange(len(scores))
        if len(cand) == 0:
            return []
        sub = scores[cand]
        if len(sub) > k:  # the k best without sorting all V: a partition, then those k in order
            best = np.argpartition(-sub, k - 1)[:k]
            top = best[np.lexsort((cand[best], -sub[best]))]
        else:
            top = np.lexsort((cand, -sub))
        return [self.vocab.words[int(cand[i])] for i in top if np.isfinite(sub[i])]

    def suggest_for(self, text: str, k: int | None = None) -> list[str]:
        """Suggestions for everything typed so far (rebuilds the context: for one-off use)."""
        return self.suggest(self.set_context(text), k)

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.vocab and word.lower() != UNK
