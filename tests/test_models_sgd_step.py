"""models.sgd_step: the training step without autograd gives the autograd step's losses and
parameters bit for bit, and `fit` takes it exactly where it applies."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from models import native, sgd_step
from models.lm import WordTable
from models.train import TrainConfig, encode, fit, make_optimizer


@pytest.fixture()
def kernels():
    mod = native.load()
    if mod is None:
        pytest.skip("the native kernels could not be built on this machine")
    return mod


def _stream(ckpt, lines, n=700):
    from models.datasets import load_pretrain_lines

    return encode(load_pretrain_lines(lines), ckpt.vocab)[:n]


def _both(model, table, stream, cfg, monkeypatch, **kw):
    """fit with the direct step and with autograd's: (losses, state dict) of each."""
    out = []
    for direct in (True, False):
        m = copy.deepcopy(model)
        with monkeypatch.context() as mp:
            if not direct:
                mp.setattr(sgd_step, "applies", lambda *a: False)
            losses = fit(m, table, stream, cfg, torch.Generator().manual_seed(7), **kw)
        out.append((losses, m.state_dict()))
    return out


def _assert_same(a, b):
    (la, sa), (lb, sb) = a, b
    assert la == lb and len(la) > 0
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


SGD = TrainConfig(epochs=1.5, batch_size=5, bptt=9, lr=0.3, optimizer="sgd", clip_grad=1.0)


@pytest.mark.parametrize("cfg", [SGD, replace(SGD, dropout=False), replace(SGD, lr_decay=True, clip_grad=0.05),
                                 replace(SGD, batch_size=1, bptt=30), replace(SGD, bptt=23)])
def test_the_direct_step_equals_autograd_bit_for_bit(kernels, tiny_loaded, monkeypatch, cfg):
    """Dropout on and off, a learning rate that decays, clipping that always bites, one column, a
    last chunk of one word (5 columns of 140: 139 = 6 x 23 + 1); 1.5 epochs, so the carried state
    restarts mid-run."""
    from tests.conftest import FIXTURES

    ckpt, tok = tiny_loaded
    table = WordTable.build(ckpt.vocab, tok, ckpt.model.cfg.base_vocab)
    direct, autograd = _both(ckpt.model, table, _stream(ckpt, FIXTURES / "pretrain.txt.gz"), cfg, monkeypatch)
    _assert_same(direct, autograd)


def test_the_direct_step_equals_autograd_with_fewer_residual_rows_and_a_carried_state(kernels, tiny_loaded, monkeypatch):
    """A vocabulary of 40 words over an 800-row residual table (rows 40.. get zero gradient), and a
    resumed run's initial state."""
    from tests.conftest import FIXTURES

    ckpt, tok = tiny_loaded
    table = WordTable.build(ckpt.vocab, tok, ckpt.model.cfg.base_vocab)
    small = WordTable(table.pieces[: int(table.offsets[40])], table.offsets[:40], 40, 40)
    stream = _stream(ckpt, FIXTURES / "pretrain.txt.gz") % 40
    g = torch.Generator().manual_seed(1)
    state = (torch.randn(1, 5, ckpt.model.cfg.embed_dim, generator=g), torch.randn(1, 5, ckpt.model.cfg.hidden, generator=g))
    direct, autograd = _both(ckpt.model, small, stream, SGD, monkeypatch, initial_state=state)
    _assert_same(direct, autograd)
    assert not torch.equal(direct[1]["residual"][:40], ckpt.model.residual[:40])
    assert torch.equal(direct[1]["residual"][40:], ckpt.model.residual[40:])


def test_fit_takes_the_direct_step_only_where_it_applies(kernels, tiny_loaded, monkeypatch):
    from federation.config import ClientConfig
    from tests.conftest import FIXTURES

    ckpt, tok = tiny_loaded
    model = ckpt.model
    client = ClientConfig().train_config()
    assert sgd_step.applies(model, make_optimizer(model, client), 0)  # a federated client's step
    assert not sgd_step.applies(model, make_optimizer(model, replace(client, optimizer="adam")), 0)
    assert not sgd_step.applies(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 0)
    assert not sgd_step.applies(model, make_optimizer(model, client), 64)  # sampled softmax
    frozen = copy.deepcopy(model)
    frozen.piece_bias.requires_grad_(False)
    assert not sgd_step.applies(frozen, torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1), 0)
    monkeypatch.setattr(native, "_module", None)  # no kernels: autograd's step
    assert not sgd_step.applies(model, make_optimizer(model, client), 0)

    monkeypatch.undo()
    calls = []
    real = sgd_step.SGDStep.__call__
    monkeypatch.setattr(sgd_step.SGDStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    table = WordTable.build(ckpt.vocab, tok, model.cfg.base_vocab)
    losses = fit(copy.deepcopy(model), table, _stream(ckpt, FIXTURES / "pretrain.txt.gz"), client, torch.Generator().manual_seed(0))
    assert len(calls) == len(losses) > 0


def test_the_kernels_dropout_masks_are_bernoullis_numbers(kernels):
    """Sizes that end mid-way through the generator's 624-word state, several masks in a row (the
    state renewed between and within them), rates 0 and 1: the same masks as bernoulli_, and the
    generator left where bernoulli_ leaves it."""
    for shape in [(8, 20, 96), (3,), (1000,), (7, 13), (5000, 3)]:
        for seed in (0, 123):
            a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            for keep in (0.9, 0.5, 0.0, 1.0, 0.123456789):
                assert torch.equal(torch.empty(shape).bernoulli_(keep, generator=a), kernels.bernoulli_mask(torch.empty(shape), keep, b))
            assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert sgd_step.native_masks_match()
    with pytest.raises(RuntimeError, match="p must be in"):
        kernels.bernoulli_mask(torch.empty(3), 1.5, torch.Generator())


def test_without_the_kernels_masks_the_step_draws_with_bernoulli(kernels, tiny_loaded, monkeypatch):
    """Where the kernels' masks did not match this torch's (checked once per process), the step
    draws them with bernoulli_ itself: still the autograd step's numbers."""
    from tests.conftest import FIXTURES

    monkeypatch.setattr(sgd_step, "_MASKS_MATCH", False)
    monkeypatch.setattr(kernels, "bernoulli_mask", None, raising=False)
    ckpt, tok = tiny_loaded
    table = WordTable.build(ckpt.vocab, tok, ckpt.model.cfg.base_vocab)
    direct, autograd = _both(ckpt.model, table, _stream(ckpt, FIXTURES / "pretrain.txt.gz"), SGD, monkeypatch)
    _assert_same(direct, autograd)
