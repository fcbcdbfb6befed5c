"""Incremental next-word suggestions from the torch model (`fedkb eval`, the rounds' evaluation, the report).

The keyboard and `fedkb predict` run the same logic on NumPy (models/numpy_predictor.py, held
to this one by a test), so typing never imports torch.  Everything but the model's part (the
device's vocabulary, the context, prefix filtering) is models/suggest.py's, shared by both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from models.lm import WordLM, WordTable
from models.suggest import IncrementalPredictor
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary


class Predictor(IncrementalPredictor):
    def __init__(
        self,
        model: WordLM,
        vocab: Vocabulary,
        tokenizer: Tokenizer,
        personal_words: Iterable[str] = (),
        blocked: Iterable[str] = (),
        k: int = 3,
    ):
        super().__init__(vocab, tokenizer, personal_words, blocked, k)
        self.model = model.eval()
        self._build()
        self.reset()

    # -- the model side (models/suggest.py) ---------------------------------------------
    def _compose(self) -> None:
        table = WordTable.build(self.vocab, self.tokenizer, self.model.cfg.base_vocab)
        with torch.no_grad():
            self._emb, self._bias = self.model.compose(table)

    def _start(self) -> None:
        self._state = None

    def _step(self, word_id: int) -> None:
        with torch.no_grad():
            self._logp, self._state = self.model.step(word_id, self._emb, self._bias, self._state)

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n)

    def _index(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def message_scores(self, word_ids: list[int], k: int) -> tuple[torch.Tensor, list[list[int]]]:
        """models/suggest.py's, in one forward pass over the message (the context is not touched)."""
        ids = torch.tensor(word_ids, dtype=torch.long)
        logits, _ = self.model(ids[None, :-1], self._emb, self._bias)
        scores = torch.log_softmax(logits[0], dim=-1) + self._mask  # (T-1, V): scores for word_ids[1:]
        k = min(k, scores.size(-1))  # k > V: all of them
        values, idx = torch.topk(scores, min(k + 1, scores.size(-1)), dim=-1)
        first = idx[:, :k].tolist()
        for r, vals in enumerate(values.tolist()):
            if _tie(vals):
                first[r] = _by_position(scores[r], vals[k - 1], k).tolist()
        return scores, first

    def _top(self, scores: torch.Tensor, k: int, cand: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
        values, idx = torch.topk(scores, min(k + 1, len(scores)))
        vals = values.tolist()
        best = _by_position(scores, vals[k - 1], k) if _tie(vals) else idx[:k]
        return (best if cand is None else cand[best]).tolist(), vals[:k]


# Equal scores rank by the lower position, as in models/numpy_predictor.py (torch.topk orders them as
# it likes): where the k + 1 best (the k and the next one) hold a tie, the k are picked again.
def _tie(values: list[float]) -> bool:
    return any(a == b for a, b in zip(values, values[1:]))


def _by_position(scores: torch.Tensor, kth: float, k: int) -> torch.Tensor:
    """The positions of the k best of `scores` (V,), whose k-th best is `kth`: best first, equal ones by position."""
    tied = (scores >= kth).nonzero()[:, 0]
    return tied[scores[tied].sort(descending=True, stable=True).indices[:k]]
