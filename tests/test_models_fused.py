"""models.fused: each hand-written backward equals autograd's on the same function
(to float rounding), and the forwards are unchanged; every test runs twice, with the
PyTorch version of each pass and with the native kernels (models/native.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import native
from models.fused import clip_and_step, compose_words, lstm_projected, shared_lookup, tied_softmax_cross_entropy
from models.lm import WordTable


@pytest.fixture(params=["pytorch", "native"], autouse=True)
def kernels(request, monkeypatch):
    """Each test with the PyTorch passes, then with the native kernels (skipped where they can't be built)."""
    mod = None
    if request.param == "native":
        mod = native.load()
        if mod is None:
            pytest.skip("the native kernels could not be built on this machine")
    monkeypatch.setattr(native, "_module", mod)
    return mod


def _close(a, b, rel=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= rel * max(1.0, float(b.abs().max())), (a - b).abs().max()


def _autograd_compose(model, table):
    """The composition written with autograd ops only (the reference)."""
    emb = F.embedding_bag(table.pieces, model.piece_emb, table.offsets, mode="mean")
    bias = F.embedding_bag(table.pieces, model.piece_bias.unsqueeze(1), table.offsets, mode="mean").squeeze(1)
    r = table.residual_rows
    return torch.cat([emb[:r] + model.residual[:r], emb[r:]]), torch.cat([bias[:r] + model.word_bias[:r], bias[r:]])


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    emb, bias = fn()
    g = torch.Generator().manual_seed(1)
    (emb * torch.randn(emb.shape, generator=g)).sum().add((bias * torch.randn(bias.shape, generator=g)).sum()).backward()
    return emb.detach(), bias.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("new_words", [[], ["zorbleflip", "helloooo", "aaaa"]])
def test_compose_equals_autograd(tiny_loaded, new_words):
    ckpt, tok = tiny_loaded
    model = ckpt.model
    with torch.no_grad():  # non-zero residuals, so their rows matter
        model.residual.copy_(torch.randn(model.residual.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    vocab = ckpt.vocab.add(new_words) if new_words else ckpt.vocab
    table = WordTable.build(vocab, tok, model.cfg.base_vocab)
    e0, b0, g0 = _grads(model, lambda: _autograd_compose(model, table))
    e1, b1, g1 = _grads(model, lambda: compose_words(table, model.piece_emb, model.piece_bias, model.residual, model.word_bias))
    assert torch.equal(e0, e1) and torch.equal(b0, b1)  # the forward is bit-for-bit unchanged
    assert g0.keys() == g1.keys() == {"piece_emb", "piece_bias", "residual", "word_bias"}
    for k in g0:
        _close(g1[k], g0[k])


def test_compose_with_fewer_residual_rows_than_the_table(tiny_loaded):
    """A vocabulary smaller than the residual table (residual_rows < base_vocab): unused rows get zero gradient."""
    ckpt, tok = tiny_loaded
    model = ckpt.model
    table = WordTable.build(ckpt.vocab, tok, model.cfg.base_vocab)
    small = WordTable(table.pieces[: int(table.offsets[20])], table.offsets[:20], 20, 20)
    _, _, g0 = _grads(model, lambda: _autograd_compose(model, small))
    _, _, g1 = _grads(model, lambda: model.compose(small))
    for k in g0:
        _close(g1[k], g0[k])
    assert not g1["residual"][20:].any() and not g1["word_bias"][20:].any()


# (N, d, V): whole 8 x 8 tiles; a last word block with one word, a dimension that is not a multiple
# of 8 and a last token block of a few tokens; three vocabulary chunks (the native kernel's edges)
@pytest.mark.parametrize("n,d,v", [(40, 16, 300), (37, 13, 321), (45, 24, 1100)])
def test_tied_softmax_cross_entropy_equals_autograd(n, d, v):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 3).requires_grad_()
    emb = torch.randn(v, d, generator=g).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    ref = F.cross_entropy(h @ emb.t() + bias, targets)
    ref_grads = torch.autograd.grad(ref * 2.5, [h, emb, bias])
    out = tied_softmax_cross_entropy(h, emb, bias, targets)
    grads = torch.autograd.grad(out * 2.5, [h, emb, bias])
    _close(out.detach(), ref.detach())
    for a, b in zip(grads, ref_grads):
        _close(a, b)


def test_tied_softmax_cross_entropy_does_not_depend_on_the_thread_count(kernels):
    """The native kernel sums each token's softmax and each word's bias gradient in one fixed
    order, whatever the number of threads: the same bits with 1 and 2."""
    if kernels is None:
        pytest.skip("PyTorch's own reductions")
    g = torch.Generator().manual_seed(0)
    h, emb, bias = torch.randn(70, 24, generator=g), torch.randn(1500, 24, generator=g), torch.randn(1500, generator=g)
    targets = torch.randint(0, 1500, (70,), generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            grad, rows, g_bias = kernels.tied_softmax_xent(h, emb, bias, targets, 1 / 70)
            outs.append((grad.clone(), rows, g_bias))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_shared_lookup_sums_both_uses_gradients():
    """The table and its looked-up rows (tokens repeat) as two separate uses would give, gradients included:
    a fresh output-layer gradient (added into in place), an expanded one, and either use alone."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 6, generator=g, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 7), generator=g)
    w1, w2 = torch.randn(50, 6, generator=g), torch.randn(3, 7, 6, generator=g)
    table, x = shared_lookup(emb, tokens)
    assert torch.equal(table, emb) and torch.equal(x, emb[tokens])
    uses = [lambda t, x: (t * w1).sum() + (x * w2).sum(), lambda t, x: t.sum() + (x * w2).sum(),
            lambda t, x: (x * w2).sum(), lambda t, x: (t * w1).sum()]
    for use in uses:
        ref = torch.autograd.grad(use(emb, emb[tokens]), emb)[0]
        _close(torch.autograd.grad(use(*shared_lookup(emb, tokens)), emb)[0], ref)


def test_tied_softmax_cross_entropy_is_stable_for_huge_logits():
    h = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss = tied_softmax_cross_entropy(h, emb, torch.zeros(3), torch.tensor([1]))
    assert torch.isfinite(loss) and abs(float(loss.detach()) - 1000.0) < 1e-3  # log-sum-exp, no overflow
    loss.backward()
    assert torch.isfinite(h.grad).all()


def test_tied_softmax_cross_entropy_of_no_targets_is_nan_as_in_pytorch():
    """An empty batch: NaN, as F.cross_entropy gives, and zero gradients; the kernels' path divided by zero."""
    h, emb, bias = torch.zeros(0, 5, requires_grad=True), torch.randn(7, 5, requires_grad=True), torch.randn(7, requires_grad=True)
    loss = tied_softmax_cross_entropy(h, emb, bias, torch.zeros(0, dtype=torch.long))
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ emb.t() + bias, torch.zeros(0, dtype=torch.long)))
    g_emb, g_bias = torch.autograd.grad(loss, [emb, bias])
    assert torch.equal(g_emb, torch.zeros(7, 5)) and torch.equal(g_bias, torch.zeros(7))


def test_tied_softmax_cross_entropy_merges_vocabulary_chunks_stably():
    """The huge logit in the last of three vocabulary chunks, the target in the first: each chunk's
    sum is rescaled to the overall max when they are merged, never overflowing."""
    h = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    emb = torch.zeros(1200, 2)
    emb[1100, 0] = 1.0
    loss = tied_softmax_cross_entropy(h, emb, torch.zeros(1200), torch.tensor([5]))
    assert torch.isfinite(loss) and abs(float(loss.detach()) - 1000.0) < 1e-3
    loss.backward()
    assert torch.isfinite(h.grad).all() and abs(float(h.grad[0, 0]) - 1.0) < 1e-5  # softmax is all on word 1100


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("batch", [4, 7])  # 7: the native kernel's row blocks (4 or 8 rows) end in a partial one
def test_lstm_projected_equals_nn_lstm(with_state, batch):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(12, 30, proj_size=7, batch_first=True)  # 4 x 30 and 7 columns: partial panels (16 or 32 columns)
    x = torch.randn(batch, 9, 12, requires_grad=True)
    state = (torch.randn(1, batch, 7), torch.randn(1, batch, 30)) if with_state else None
    g = torch.Generator().manual_seed(1)
    gy, gh, gc = (torch.randn(batch, 9, 7, generator=g), torch.randn(1, batch, 7, generator=g),
                  torch.randn(1, batch, 30, generator=g))

    def run(fn):
        lstm.zero_grad()
        x.grad = None
        s = tuple(t.clone().requires_grad_() for t in state) if state else None
        y, (h, c) = fn(x, s)
        torch.autograd.backward([y, h, c], [gy, gh, gc])
        out = [y.detach(), h.detach(), c.detach(), x.grad.clone()] + [p.grad.clone() for p in lstm.parameters()]
        return out + ([t.grad.clone() for t in s] if s else [])

    ref = run(lambda x, s: lstm(x, s))
    mine = run(lambda x, s: lstm_projected(lstm, x, s))
    assert len(ref) == len(mine)
    for a, b in zip(mine, ref):
        _close(a, b)


def test_a_training_step_matches_autograd(tiny_loaded):
    """The whole loss (hand-written passes) against the plain autograd forward, on the real model."""
    ckpt, tok = tiny_loaded
    model = ckpt.model
    table = WordTable.build(ckpt.vocab, tok, model.cfg.base_vocab)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, table.size, (3, 6), generator=g)
    y = torch.randint(0, table.size, (3, 6), generator=g)

    model.zero_grad(set_to_none=True)
    emb, bias = _autograd_compose(model, table)
    h, _ = model.lstm(emb[x])  # nn.LSTM, autograd's backward
    ref = F.cross_entropy((h @ emb.t() + bias).reshape(-1, table.size), y.reshape(-1))
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    emb, bias = model.compose(table)
    loss, _ = model.loss(x, y, emb, bias)
    loss.backward()
    _close(loss.detach(), ref.detach())
    for k, p in model.named_parameters():
        _close(p.grad, ref_grads[k])


def test_lookup_alone_gives_the_table_a_gradient(tiny_loaded):
    """With no output layer in the graph the table's gradient is only the looked-up rows: the
    composition's backward still gives autograd's piece gradients."""
    ckpt, tok = tiny_loaded
    model = ckpt.model
    table = WordTable.build(ckpt.vocab, tok, model.cfg.base_vocab)
    x = torch.randint(0, table.size, (2, 5), generator=torch.Generator().manual_seed(0))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        emb, _ = fn()
        model.hidden(x, emb)[0].sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref = grads(lambda: _autograd_compose(model, table))
    mine = grads(lambda: model.compose(table))
    assert "piece_emb" in ref and ref.keys() <= mine.keys()
    for k in ref:
        _close(mine[k], ref[k])
    for k in mine.keys() - ref.keys():  # the unused biases: zero, where autograd gives none
        assert not mine[k].any(), k


def test_an_out_of_range_target_is_an_error_not_a_bad_read():
    h, emb = torch.randn(3, 4), torch.randn(5, 4)
    for bad in (5, -1):
        with pytest.raises((RuntimeError, IndexError)):
            tied_softmax_cross_entropy(h, emb, torch.zeros(5), torch.tensor([0, bad, 1]))


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped, and left as it is
def test_clip_and_step_equals_clip_grad_norm_then_sgd(max_norm):
    shapes = [(300, 7), (13,), (5, 5, 3)]

    def run(step):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, s in enumerate(shapes)]
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i))
        params.append(torch.zeros(3, requires_grad=True))  # no gradient: left alone by both
        opt = torch.optim.SGD(params, lr=0.3)
        step(opt, params)
        return [p.detach() for p in params]

    def reference(opt, params):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()

    for a, b in zip(run(lambda o, p: clip_and_step(o, p, max_norm)), run(reference)):
        _close(a, b)


def test_clip_and_step_with_a_nan_gradient_poisons_as_pytorch_does():
    """A NaN gradient makes the update NaN (the federation then rejects the delta) instead of a silent skip."""
    p = torch.ones(10, requires_grad=True)
    p.grad = torch.ones(10)
    p.grad[3] = float("nan")
    clip_and_step(torch.optim.SGD([p], lr=0.1), [p], 1.0)
    assert p.detach().isnan().all()


def test_clip_and_step_leaves_other_optimizers_to_pytorch():
    p = torch.ones(4, requires_grad=True)
    p.grad = torch.full((4,), 10.0)
    q = p.detach().clone().requires_grad_()
    q.grad = p.grad.clone()
    clip_and_step(torch.optim.SGD([p], lr=0.1, momentum=0.9), [p], 1.0)
    torch.nn.utils.clip_grad_norm_([q], 1.0)
    torch.optim.SGD([q], lr=0.1, momentum=0.9).step()
    assert torch.equal(p.detach(), q.detach())
