"""The keyboard's suggestions without PyTorch: NumPy inference, what typing runs on.

`import torch` alone takes ~1.5-2 s on this machine: most of a `fedkb predict` process, and
most of the keyboard's start.  Shipping keyboards run a small inference runtime, not the
training framework (Gboard: TensorFlow Lite); this is ours: a checkpoint's weights as NumPy
arrays (models/modelfile.py), the word table composed, the projected LSTM (PyTorch's gate
order i, f, g, o; h = W_hr (o * tanh c)) stepped in float32.  It has the interface of
`models.predictor.Predictor` that typing uses (reset, commit, suggest, set_context, `in`, and
the device's personal words, blocked words and new weights), and a test holds the two to the
same suggestions and log-probabilities.  The keyboard measures on it too (`message_scores`:
models/evaluate.py's simulated typing); learning, `fedkb eval` and the rounds' evaluation keep
the torch `Predictor`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.modelfile import Arrays, read_model
from models.suggest import IncrementalPredictor
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary, appended


def _row_sums(table: np.ndarray, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row i: the sum of table's rows flat[starts[i] : starts[i] + lengths[i]] (each word's pieces).

    Words of the same length are summed together, piece by piece: a handful of gathers.
    `np.add.reduceat(table[flat], starts, axis=0)` gives the same sums but took 30 ms for
    10,000 words, most of the time a new global model took to swap in while typing.
    """
    out = np.empty((len(lengths), table.shape[1]), dtype=table.dtype)
    for n in np.unique(lengths):
        rows = np.flatnonzero(lengths == n)
        first = starts[rows]
        acc = table[flat[first]]
        for j in range(1, n):
            acc += table[flat[first + j]]
        out[rows] = acc
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis."""
    m = logits.max(axis=-1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))


def _float32(weights: Arrays) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in weights.items()}


@dataclass(frozen=True, eq=False)
class Tables:
    """A model's arrays made ready to type with for one vocabulary (`NumpyPredictor.tables`):
    the weights as contiguous float32, and the word table composed from them."""

    w: dict[str, np.ndarray]
    words: tuple[str, ...]  # the vocabulary it was composed for
    base_size: int
    emb: np.ndarray  # (V, d)
    bias: np.ndarray  # (V,)


class NumpyPredictor(IncrementalPredictor):
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
        super().__init__(vocab, tokenizer, personal_words, blocked, k)
        self.meta = meta or {}
        self.set_weights(weights)

    @classmethod
    def load(cls, model_dir: Path, tokenizer: Tokenizer, k: int = 3) -> "NumpyPredictor":
        """The predictor of a checkpoint folder; FedkbError if it is missing, damaged or another model's."""
        f = read_model(Path(model_dir), tokenizer)
        return cls(f.weights, f.vocab, tokenizer, k=k, meta=f.meta)

    def set_weights(self, weights: Arrays | Tables) -> None:
        """Predict with new weights (a personal or new global model): the word table is composed (or
        taken from `tables(...)`, made ready off the UI thread) and the context is fed again."""
        if isinstance(weights, Tables):
            self.w, self._ready = weights.w, weights
        else:
            self.w = _float32(weights)
        self._build()
        self._refresh()

    def tables(self, weights: Arrays, vocab: Vocabulary) -> Tables:
        """What `set_weights` computes for `weights` and `vocab`, without changing what this predictor
        types with: safe in a worker thread while it types (only the cache of the vocabulary's
        pieces is shared).  `set_weights(tables)` then only swaps them in; where personal words were
        typed meanwhile, it composes only their rows."""
        return self._composed(_float32(weights), vocab)

    # -- the model side (models/suggest.py) ---------------------------------------------
    _layout: tuple | None = None  # (words, flat, starts, lengths) of the last vocabulary composed

    def _pieces_layout(self, words: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The vocabulary's pieces: all of them in one array, where each word's start and how many.
        Kept while the words stay the same, extended when words are appended: a new global model
        of the same vocabulary (a federated round), or a personal word typed, composes its table
        without tokenizing 10,000 words again."""
        old = self._layout  # one read: a worker thread may replace it (with another whole layout)
        if old is not None and old[0] == words:
            return old[1:]
        kept = appended(old[0] if old else None, words)
        pieces = [self.tokenizer.pieces(word) for word in words[kept:]]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        flat = np.fromiter((i for p in pieces for i in p), dtype=np.int64)
        if kept:  # a personal word typed: only it is tokenized
            lengths, flat = np.concatenate([old[3], lengths]), np.concatenate([old[1], flat])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._layout = (words, flat, starts, lengths)
        return flat, starts, lengths

    _ready: Tables | None = None  # the word table in use, and what it was composed for

    def _composed(self, w: dict, vocab: Vocabulary, prev: Tables | None = None) -> Tables:
        """The word table of `vocab` under weights `w`; where `prev` was composed for the same
        weights and `vocab` only appends words to its (a personal word typed), only those rows."""
        words = vocab.words
        flat, starts, lengths = self._pieces_layout(words)
        n0 = appended(prev.words, words) if prev is not None and prev.w is w and prev.base_size == vocab.base_size else 0
        starts, lengths = starts[n0:], lengths[n0:]
        emb = _row_sums(w["piece_emb"], flat, starts, lengths) / lengths[:, None]  # (V - n0, d)
        bias = _row_sums(w["piece_bias"][:, None], flat, starts, lengths)[:, 0] / lengths  # (V - n0,)
        r = min(vocab.base_size, w["residual"].shape[0])  # personal words past the base: pieces only
        if r > n0:
            emb[: r - n0] += w["residual"][n0:r]
            bias[: r - n0] += w["word_bias"][n0:r]
        emb, bias = emb.astype(np.float32), bias.astype(np.float32)
        if n0:
            emb, bias = np.concatenate([prev.emb, emb]), np.concatenate([prev.bias, bias])
        return Tables(w, words, vocab.base_size, emb, bias)

    def _compose(self) -> None:
        t, vocab = self._ready, self.vocab
        if t is None or t.w is not self.w or t.base_size != vocab.base_size or t.words != vocab.words:
            t = self._ready = self._composed(self.w, vocab, t)
        self.emb, self.bias = t.emb, t.bias

    def _start(self) -> None:
        self._h, self._c = self.w["start_h"].copy(), self.w["start_c"].copy()

    def _cell(self, word_id: int) -> None:
        """The LSTM's step: self._h, self._c after word `word_id`.  The logistic is the overflow-free
        0.5 (1 + tanh(x / 2)), taken of all four gates at once (g's unused), in place where it can
        be: the same bits as the textbook cell on `np.split(gates, 4)` (tested), in 3/4 of its time."""
        w, n = self.w, len(self._c)
        gates = w["lstm.weight_ih_l0"] @ self.emb[word_id]
        gates += w["lstm.bias_ih_l0"]
        gates += w["lstm.weight_hh_l0"] @ self._h
        gates += w["lstm.bias_hh_l0"]
        s = np.tanh(gates * 0.5)
        s += 1.0
        s *= 0.5
        self._c = s[n:2 * n] * self._c + s[:n] * np.tanh(gates[2 * n:3 * n])
        self._h = w["lstm.weight_hr_l0"] @ (s[3 * n:] * np.tanh(self._c))

    def _step(self, word_id: int) -> None:
        self._cell(word_id)
        self._out = None  # the output layer waits until the scores are asked for: feeding a context
        # word by word (a new context, new weights) pays for it once, not once a word

    _out: np.ndarray | None = None

    @property
    def _logp(self) -> np.ndarray:
        """The next word's log-probabilities (V,) after the words fed so far."""
        if self._out is None:
            self._out = _log_softmax(self.emb @ self._h + self.bias)
        return self._out

    def message_scores(self, word_ids: list[int], k: int) -> tuple[np.ndarray, list[list[int]]]:
        """models/suggest.py's, with the output layer of all the message's words in one product
        (the recurrence alone goes word by word), as the torch side does."""
        self._start()
        hs = []
        for i in word_ids[:-1]:
            self._cell(i)
            hs.append(self._h)
        scores = _log_softmax(np.stack(hs) @ self.emb.T + self.bias) + self._mask  # (T-1, V)
        k = min(k, scores.shape[1])
        first = [self._top(row, k)[0] for row in scores]
        self.reset()
        return scores, first

    def _zeros(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    def _index(self, ids: list[int]) -> np.ndarray:
        return np.array(ids, dtype=np.int64)

    def _top(self, scores: np.ndarray, k: int, cand: np.ndarray | None = None) -> tuple[list[int], list[float]]:
        if len(scores) > k:  # the k best without sorting all V: a partition, then those k in order
            best = np.argpartition(-scores, k)[:k + 1]  # the k best and the next
            kth = np.sort(scores[best])[1]  # the k-th best
            if np.count_nonzero(scores[best] == kth) > 1:  # a tie at or around the k-th: all the tied, by id
                best = np.flatnonzero(scores >= kth)
            best = best[np.lexsort((best, -scores[best]))][:k]
        else:
            best = np.lexsort((np.arange(len(scores)), -scores))
        return (best if cand is None else cand[best]).tolist(), scores[best].tolist()
