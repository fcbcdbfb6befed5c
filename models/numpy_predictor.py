"""The same suggestions without PyTorch: NumPy inference for one-shot commands.

`import torch` alone takes ~2 s on this machine, which is most of a
`fedkb predict` process.  Shipping keyboards run a small inference runtime,
not the training framework (Gboard: TensorFlow Lite); this is ours: the
checkpoint's safetensors read as NumPy arrays, the word table composed, the
projected LSTM (PyTorch's gate order i, f, g, o; h = W_hr (o * tanh c)) stepped
in float32.  The interface is the part of `models.predictor.Predictor` the
typing logic uses (reset, commit, suggest, `in`), and a test holds the two to
the same suggestions and log-probabilities.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

from models import tensorfile
from models.errors import FedkbError
from models.text import BOS, SPECIALS, UNK
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary

_SHAPES = ("piece_emb", "piece_bias", "residual", "word_bias",
           "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0", "lstm.weight_hr_l0")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


class NumpyPredictor:
    def __init__(self, model_dir: Path, tokenizer: Tokenizer, k: int = 3):
        model_dir = Path(model_dir)
        try:
            meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
            vocab = Vocabulary.from_json(meta["vocab"])
            sha = meta["tokenizer_sha256"]
        except FileNotFoundError:
            raise FedkbError(f"no model at {model_dir} (model.json missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FedkbError(f"{model_dir / 'model.json'} is corrupt ({e})") from None
        if sha != tokenizer.sha256:
            raise FedkbError(f"model {model_dir} was trained with a different tokenizer than {tokenizer.path}")
        try:
            blob = (model_dir / "model.safetensors").read_bytes()
            w = load(blob)
        except FileNotFoundError:
            raise FedkbError(f"{model_dir / 'model.safetensors'} does not exist") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise FedkbError(f"{model_dir / 'model.safetensors'} is not a valid safetensors file ({e})") from None
        tensorfile.check(model_dir / "model.safetensors", blob)
        missing = [n for n in _SHAPES if n not in w]
        if missing or w["piece_emb"].shape[0] != tokenizer.num_pieces:
            raise FedkbError(f"{model_dir / 'model.safetensors'} does not fit the model (missing {missing[:3]} or wrong shapes)")
        if not all(np.isfinite(a).all() for a in w.values()):
            raise FedkbError(f"{model_dir / 'model.safetensors'} contains NaN or infinite values")
        self.w = {n: w[n].astype(np.float32) for n in _SHAPES}
        d, hidden = self.w["lstm.weight_hr_l0"].shape
        # the state messages start from (models/start_state.py); zeros in models saved before it
        self._start_h = w["start_h"].astype(np.float32) if "start_h" in w else np.zeros(d, np.float32)
        self._start_c = w["start_c"].astype(np.float32) if "start_c" in w else np.zeros(hidden, np.float32)
        if self._start_h.shape != (d,) or self._start_c.shape != (hidden,):
            raise FedkbError(f"{model_dir / 'model.safetensors'} does not fit the model (start state of the wrong shape)")
        self.tokenizer, self.vocab, self.k, self.meta = tokenizer, vocab, k, meta.get("meta", {})
        self.blocked: set[str] = set()
        self._compose()
        self.reset()

    def _compose(self) -> None:
        w, vocab = self.w, self.vocab
        pieces = [self.tokenizer.pieces(word) for word in vocab.words]
        lengths = np.array([len(p) for p in pieces])
        flat = np.fromiter((i for p in pieces for i in p), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.emb = np.add.reduceat(w["piece_emb"][flat], starts, axis=0) / lengths[:, None]  # (V, d)
        self.bias = np.add.reduceat(w["piece_bias"][flat], starts) / lengths  # (V,)
        r = min(vocab.base_size, w["residual"].shape[0])
        self.emb[:r] += w["residual"][:r]
        self.bias[:r] += w["word_bias"][:r]
        self.emb, self.bias = self.emb.astype(np.float32), self.bias.astype(np.float32)
        order = sorted(range(len(vocab)), key=lambda i: vocab.words[i])
        self._sorted = [vocab.words[i] for i in order]
        self._sorted_idx = np.array(order, dtype=np.int64)
        self._mask = np.zeros(len(vocab), dtype=np.float32)
        self._mask[[vocab.index[s] for s in SPECIALS]] = -np.inf

    def reset(self) -> None:
        self._h, self._c = self._start_h.copy(), self._start_c.copy()
        self._last = None
        self.commit(BOS)

    def commit(self, word: str) -> None:
        word = word.lower()
        if word == BOS and self._last == BOS:
            return
        self._last = word
        w = self.w
        gates = w["lstm.weight_ih_l0"] @ self.emb[self.vocab.id(word)] + w["lstm.bias_ih_l0"] \
            + w["lstm.weight_hh_l0"] @ self._h + w["lstm.bias_hh_l0"]
        i, f, g, o = np.split(gates, 4)
        self._c = _sigmoid(f) * self._c + _sigmoid(i) * np.tanh(g)
        self._h = w["lstm.weight_hr_l0"] @ (_sigmoid(o) * np.tanh(self._c))
        logits = self.emb @ self._h + self.bias
        m = logits.max()
        self._logp = logits - (m + np.log(np.exp(logits - m).sum()))

    def scores(self) -> np.ndarray:
        return self._logp + self._mask

    def suggest(self, prefix: str = "", k: int | None = None) -> list[str]:
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
        top = np.argsort(-sub, kind="stable")[:k]
        return [self.vocab.words[int(cand[i])] for i in top if np.isfinite(sub[i])]

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.vocab and word.lower() != UNK
