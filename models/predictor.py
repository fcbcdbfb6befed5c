"""Incremental next-word suggestions from the torch model (evaluation, "Learn now"'s scores).

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

    def _top(self, scores: torch.Tensor, k: int, cand: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
        top = torch.topk(scores, k)
        return (top.indices if cand is None else cand[top.indices]).tolist(), top.values.tolist()
