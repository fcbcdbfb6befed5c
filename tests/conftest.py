"""Shared fixtures: a tiny tokenizer + model trained in seconds on the test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings as _hypothesis_settings

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)  # tiny models: threads only add overhead, and keep tests deterministic

# property tests draw the same examples on every run, so a CI run is reproducible (a random draw
# once failed CI on an example no earlier run had met); HYPOTHESIS_PROFILE=explore draws afresh
_hypothesis_settings.register_profile("ci", derandomize=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(checkpoint_dir, tokenizer_path): a small LM trained briefly on the fixture pretraining text."""
    from models.checkpoint import save_checkpoint
    from models.datasets import load_pretrain_lines
    from models.lm import LMConfig, WordLM, WordTable
    from models.text import sentence_tokens
    from models.tokenizer import Tokenizer, train_tokenizer
    from models.train import TrainConfig, encode, fit
    from models.vocab import build_vocab

    d = tmp_path_factory.mktemp("tiny")
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")
    train_tokenizer(lines, d / "tokenizer.model", vocab_size=600)
    tok = Tokenizer(d / "tokenizer.model")
    cfg = LMConfig(num_pieces=tok.num_pieces, base_vocab=800, embed_dim=16, hidden=32, dropout=0.1)
    vocab = build_vocab((sentence_tokens(l) for l in lines), cfg.base_vocab)
    model = WordLM(cfg)
    gen = torch.Generator().manual_seed(0)
    model.reset_parameters(gen)
    table = WordTable.build(vocab, tok, cfg.base_vocab)
    fit(model, table, encode(lines, vocab), TrainConfig(epochs=1, batch_size=16, bptt=16, lr=1e-2), gen)
    save_checkpoint(d / "model", model, vocab, tok, meta={"kind": "base", "round": 0})
    return d / "model", d / "tokenizer.model"


@pytest.fixture()
def tiny_loaded(tiny):
    """(Checkpoint, Tokenizer) freshly loaded (safe to mutate)."""
    from models.checkpoint import load_model

    return load_model(*tiny)


@pytest.fixture()
def fixture_users():
    from models.datasets import load_users

    return load_users(FIXTURES / "users.jsonl.gz")


class KilledRenames:
    """Stands for a process killed between two renames of one atomic write: once armed,
    ``os.replace`` in models.atomic does one rename and raises KeyboardInterrupt on the next;
    ``renamed`` lists the destinations it did rename, ``disarm()`` puts the real one back."""

    def __init__(self, monkeypatch):
        from models import atomic

        self._monkeypatch, self._atomic, self._real = monkeypatch, atomic, atomic.os.replace
        self.renamed: list = []

    def _replace(self, src, dst):
        if self.renamed:
            raise KeyboardInterrupt
        self.renamed.append(dst)
        self._real(src, dst)

    def arm(self) -> None:
        self._monkeypatch.setattr(self._atomic.os, "replace", self._replace)

    def disarm(self) -> None:
        self._monkeypatch.setattr(self._atomic.os, "replace", self._real)


@pytest.fixture()
def killed_renames(monkeypatch):
    return KilledRenames(monkeypatch)
