"""Hand-written passes for the costly parts of a training step on a CPU.

A local training step on a device is small (8 x 20 words) while its vocabulary is
large (10 k words), and autograd spent more time on bookkeeping around the
matrix products than on the products themselves.  One step on one thread went
from 61 ms to 45 ms (bench/bench_federation.py measures the engines):

* **Composing the word table** (`compose_words`): `F.embedding_bag` is fast
  forwards, but its backward sorts the 23 k piece ids and scatters every step.
  The composition is a fixed sparse matrix S (V x pieces, each word's row holds
  1/n for its n pieces), so the backward is one sparse product S^T G with S^T
  built once per vocabulary (`composition_transpose`).  The forward is unchanged, so the
  composed table, and with it every prediction and evaluation, is bit for bit
  what autograd's version gives.
* **The tied output layer with its cross-entropy** (`tied_softmax_cross_entropy`):
  logits = h E^T + b, softmax, mean NLL of the targets.  Autograd runs this as
  matmul, bias add, log-softmax, NLL, then backward through each (a zero-filled
  N x V gradient for the NLL, a second pass of exponentials for the log-softmax).
  Here the forward keeps the softmax it computes anyway, and the backward is
  (softmax - onehot) / N followed by the two matmuls the layer needs: the
  classic fused softmax-cross-entropy gradient (Bishop 2006, "Pattern
  Recognition and Machine Learning", sec. 4.3.4).
* **The LSTM** (`lstm_projected`): see `_LSTMProj`.
* **The table's two uses** (`shared_lookup`): the input lookup's gradient rows go straight into
  the output layer's table gradient, not through a zero-filled table of their own.
* **Clipping and the SGD step** (`clip_and_step`): `clip_grad_norm_` then `SGD.step()`, which
  PyTorch runs as five passes over the 1.9 M gradients (norms, scale, update), become two
  in the native kernels for plain SGD (no momentum or weight decay).

Gradients differ from autograd's only by float rounding (summation order); the
tests in tests/test_models_fused.py hold each pass to autograd's result.

Where models/native.py has loaded the native kernels (the federation engines load them), these
functions run them instead of their PyTorch passes: each element-wise part fused into one pass,
the forward's products (the LSTM's input and recurrence, the logits) by the kernels' own
packed-panel product, the backward's ATen's; the same tests hold both versions to autograd.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from models import native as _native


def _kernels(t: Tensor):
    """The native kernels (models/native.py) where loaded and `t` is a float32 CPU tensor, else None."""
    return _native.loaded() if t.device.type == "cpu" and t.dtype == torch.float32 else None


def composition_transpose(pieces: Tensor, offsets: Tensor, num_pieces: int) -> Tensor:
    """S^T as a sparse CSR (num_pieces, V) matrix, S[w, p] = (count of piece p in word w) / len(w).

    `pieces` / `offsets` are a vocabulary's flat piece ids and where each word's start (the
    `embedding_bag` layout of `models.lm.WordTable`)."""
    V = len(offsets)
    counts = torch.diff(offsets, append=offsets.new_tensor([len(pieces)]))
    if V and int(counts.min()) < 1:
        raise ValueError("every word needs at least one piece")
    rows = torch.repeat_interleave(torch.arange(V, device=offsets.device), counts)
    weights = (1.0 / counts.to(torch.float32))[rows]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two calls used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_coo_tensor(torch.stack([pieces, rows]), weights, (num_pieces, V)).coalesce().to_sparse_csr()


class _Compose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, piece_emb: Tensor, piece_bias: Tensor, residual: Tensor, word_bias: Tensor, training: bool):
        ctx.table, ctx.num_pieces, ctx.base_rows = table, piece_emb.size(0), residual.size(0)
        native = ctx.native = _kernels(piece_emb) if training else None
        if native is not None:  # training: one pass over the words (inference keeps embedding_bag's table)
            return tuple(native.compose_forward(table.pieces, table.offsets, piece_emb.contiguous(), piece_bias.contiguous(),
                                                residual.contiguous(), word_bias.contiguous(), table.residual_rows))
        emb = F.embedding_bag(table.pieces, piece_emb, table.offsets, mode="mean")
        bias = F.embedding_bag(table.pieces, piece_bias.unsqueeze(1), table.offsets, mode="mean").squeeze(1)
        r = table.residual_rows
        emb[:r] += residual[:r]
        bias[:r] += word_bias[:r]
        return emb, bias

    @staticmethod
    def backward(ctx, g_emb: Tensor, g_bias: Tensor):
        r, n = ctx.table.residual_rows, ctx.base_rows
        st = ctx.table.composition_transpose(ctx.num_pieces)
        if ctx.native:
            g_piece_emb, g_piece_bias = ctx.native.compose_backward(st.crow_indices(), st.col_indices(), st.values(),
                                                                   g_emb.contiguous(), g_bias.contiguous())
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                g_piece_emb = st @ g_emb.contiguous()  # (num_pieces, d)
                g_piece_bias = (st @ g_bias.unsqueeze(1)).squeeze(1)
        g_res, g_wbias = g_emb[:r], g_bias[:r]  # the residual rows' gradient is the word's own
        if r < n:
            g_res = torch.cat([g_res, g_emb.new_zeros(n - r, g_emb.size(1))])
            g_wbias = torch.cat([g_wbias, g_bias.new_zeros(n - r)])
        return None, g_piece_emb, g_piece_bias, g_res, g_wbias, None


def compose_words(table, piece_emb: Tensor, piece_bias: Tensor, residual: Tensor, word_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Word embeddings (V, d) and output biases (V,): the mean of each word's pieces' rows, plus
    the word's own residual row for the first `table.residual_rows` words (the base vocabulary)."""
    training = torch.is_grad_enabled() and piece_emb.requires_grad
    return _Compose.apply(table, piece_emb, piece_bias, residual, word_bias, training)


class _SharedTable(torch.autograd.Function):
    """The word table's two uses in a training step, the input lookup emb[tokens] and the tied
    output layer, with one backward: the lookup's rows are added (index_add_) into the output
    layer's (V, d) gradient, which that layer's backward made for this node alone.  Autograd would
    zero-fill a (V, d) gradient for the lookup, scatter the rows into it and add the two: three
    passes over the 3.8 MB table each step."""

    @staticmethod
    def forward(ctx, emb: Tensor, tokens: Tensor):
        ctx.save_for_backward(tokens)
        ctx.shape = emb.shape
        return emb.view_as(emb), emb[tokens]

    @staticmethod
    def backward(ctx, g_table: Tensor | None, g_x: Tensor | None):
        (tokens,) = ctx.saved_tensors
        if g_x is None:
            return g_table, None
        rows = g_x.reshape(-1, g_x.size(-1))
        if g_table is None:
            g_table = rows.new_zeros(ctx.shape)
        elif not g_table.is_contiguous():  # not one the output layer made: leave it as it is
            return g_table.index_add(0, tokens.reshape(-1), rows), None
        return g_table.index_add_(0, tokens.reshape(-1), rows), None


def shared_lookup(emb: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(the table for the tied output layer, emb[tokens]): the same values as (emb, emb[tokens]),
    with the two uses' gradients summed in place (`_SharedTable`)."""
    return _SharedTable.apply(emb, tokens)


class _TiedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, emb: Tensor, bias: Tensor, targets: Tensor):
        native = _kernels(h)
        if native is not None:  # logits, softmax and its gradient (1/N included), chunk by chunk in cache
            grad, rows, g_bias = native.tied_softmax_xent(h.contiguous(), emb.contiguous(), bias.contiguous(),
                                                          targets.contiguous(), 1.0 / max(1, len(targets)))  # no targets: NaN, as below
            ctx.save_for_backward(h, emb, grad, g_bias)
            ctx.done, ctx.native = False, True
            return rows.mean()
        ctx.native = False
        logits = torch.addmm(bias, h, emb.t())  # (N, V)
        picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(top).exp_()  # in place: the logits are not needed again
        total = probs.sum(dim=1, keepdim=True)
        probs.div_(total)
        loss = (top.squeeze(1) + total.squeeze(1).log() - picked).mean()
        ctx.save_for_backward(h, emb, probs, targets)
        ctx.done = False
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.done:
            raise RuntimeError("tied_softmax_cross_entropy: backward twice through one graph is not supported")
        ctx.done = True
        if ctx.native:  # already (softmax - onehot) / N, with its column sums
            h, emb, grad, g_bias = ctx.saved_tensors
            if float(g) != 1.0:
                grad.mul_(g), g_bias.mul_(g)
            return grad @ emb, grad.t() @ h, g_bias, None
        h, emb, probs, targets = ctx.saved_tensors
        grad = probs  # reused in place: backward runs once (no retain_graph through this node)
        grad[torch.arange(len(targets), device=targets.device), targets] -= 1.0
        grad.mul_(g / len(targets))
        return grad @ emb, grad.t() @ h, grad.sum(0), None


def tied_softmax_cross_entropy(h: Tensor, emb: Tensor, bias: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of `targets` (N,) under softmax(h @ emb.T + bias), h (N, d): a scalar."""
    return _TiedSoftmaxCE.apply(h, emb, bias, targets)


class _LSTMProj(torch.autograd.Function):
    """One LSTM layer with a projection (nn.LSTM's `proj_size`), forwards and backwards by hand.

    Autograd replays the recurrence as ~40 tiny operations per time step.  Here the
    backward loop does only what must be sequential (the gradient flowing back through
    h and c) and the weight gradients become four large matrix products over all
    steps at once: backpropagation through time (Werbos 1990, "Backpropagation
    Through Time: What It Does and How to Do It") with the LSTM's gate derivatives
    (Hochreiter & Schmidhuber 1997).  Tensors are time-major inside.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, w_hr: Tensor):
        T, B = x.size(1), x.size(0)
        H, P = w_hr.size(1), w_hr.size(0)
        xs = x.transpose(0, 1).contiguous()  # (T, B, d)
        native = ctx.native = _kernels(x)
        if native is not None:  # the same, the input products by the kernels' own, each step's gates in one fused pass
            gates, cs, tcs, hfs, hs = native.lstm_forward(xs, w_ih.contiguous(), b_ih + b_hh, w_hh.contiguous(), w_hr.contiguous(),
                                                          h0.contiguous(), c0.contiguous())
            ctx.save_for_backward(xs, gates, cs, tcs, hfs, hs, w_ih, w_hh, w_hr)
            return hs[1:].transpose(0, 1).contiguous(), hs[T].clone(), cs[T].clone()
        gates = torch.addmm(b_ih + b_hh, xs.view(T * B, -1), w_ih.t()).view(T, B, 4 * H)  # input part, all steps at once
        cs = x.new_empty(T + 1, B, H)  # cell states, cs[0] = c0
        tcs = x.new_empty(T, B, H)  # tanh(c)
        hfs = x.new_empty(T, B, H)  # o * tanh(c), before the projection
        hs = x.new_empty(T + 1, B, P)  # projected outputs, hs[0] = h0
        cs[0], hs[0] = c0, h0
        for t in range(T):
            a = gates[t].addmm_(hs[t], w_hh.t())  # gate pre-activations, then activations in place
            a[:, : 2 * H].sigmoid_()  # input, forget
            a[:, 2 * H : 3 * H].tanh_()  # cell candidate
            a[:, 3 * H :].sigmoid_()  # output
            i, f, g, o = a.split(H, dim=1)
            torch.mul(f, cs[t], out=cs[t + 1]).addcmul_(i, g)
            torch.tanh(cs[t + 1], out=tcs[t])
            torch.mul(o, tcs[t], out=hfs[t])
            torch.mm(hfs[t], w_hr.t(), out=hs[t + 1])
        ctx.save_for_backward(xs, gates, cs, tcs, hfs, hs, w_ih, w_hh, w_hr)
        return hs[1:].transpose(0, 1).contiguous(), hs[T].clone(), cs[T].clone()

    @staticmethod
    def backward(ctx, g_out: Tensor, g_hT: Tensor, g_cT: Tensor):
        xs, acts, cs, tcs, hfs, hs, w_ih, w_hh, w_hr = ctx.saved_tensors
        T, B, H = tcs.shape
        if ctx.native:
            g_hs = g_out.transpose(0, 1).clone(memory_format=torch.contiguous_format) if g_out is not None else hs.new_zeros(T, B, hs.size(2))
            dh = g_hT.contiguous() if g_hT is not None else hs.new_zeros(B, hs.size(2))
            dc = g_cT.contiguous() if g_cT is not None else cs.new_zeros(B, H)
            d_gates, dh, dc = ctx.native.lstm_backward(acts, cs, tcs, g_hs, w_hh.contiguous(), w_hr.contiguous(), dh, dc)
            return _lstm_weight_grads(d_gates, g_hs, xs, hs, hfs, w_ih, dh, dc)
        # local derivatives of the activations, all steps at once: s(1-s) for sigmoids, 1-g^2 for tanh
        deriv = acts * (1 - acts)
        deriv[..., 2 * H : 3 * H] = 1 - acts[..., 2 * H : 3 * H].square()
        dc_dhf = acts[..., 3 * H :] * (1 - tcs.square())  # d(o * tanh c) / dc
        # a time-major copy (never the incoming gradient itself: it is updated in place below)
        g_hs = g_out.transpose(0, 1).clone(memory_format=torch.contiguous_format) if g_out is not None else hs.new_zeros(T, B, hs.size(2))
        d_gates = torch.empty_like(acts)
        dh = g_hT.clone() if g_hT is not None else hs.new_zeros(B, hs.size(2))
        dc = g_cT.clone() if g_cT is not None else cs.new_zeros(B, H)
        for t in reversed(range(T)):
            dh_t = g_hs[t].add_(dh)  # total gradient at the projected output of step t (kept for w_hr)
            dhf = dh_t @ w_hr
            dc.addcmul_(dhf, dc_dhf[t])
            i, f, g, _ = acts[t].split(H, dim=1)
            di, df, dg, do = d_gates[t].split(H, dim=1)
            torch.mul(dc, g, out=di)
            torch.mul(dc, cs[t], out=df)
            torch.mul(dc, i, out=dg)
            torch.mul(dhf, tcs[t], out=do)
            d_gates[t].mul_(deriv[t])
            dc = dc * f
            dh = d_gates[t] @ w_hh
        return _lstm_weight_grads(d_gates, g_hs, xs, hs, hfs, w_ih, dh, dc)


def _lstm_weight_grads(d_gates: Tensor, g_hs: Tensor, xs: Tensor, hs: Tensor, hfs: Tensor, w_ih: Tensor, dh: Tensor, dc: Tensor):
    """The backward's outputs from the gate gradients: four large products over all steps at once."""
    T, B, H4 = d_gates.shape
    H = H4 // 4
    flat = d_gates.view(T * B, 4 * H)
    g_x = (flat @ w_ih).view(T, B, -1).transpose(0, 1)
    g_w_ih = flat.t() @ xs.view(T * B, -1)
    g_w_hh = flat.t() @ hs[:T].reshape(T * B, -1)
    g_b = flat.sum(0)
    g_w_hr = g_hs.view(T * B, -1).t() @ hfs.view(T * B, H)
    return g_x, dh, dc, g_w_ih, g_w_hh, g_b, g_b.clone(), g_w_hr  # two bias vectors, one gradient


def lstm_projected(lstm: torch.nn.LSTM, x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`lstm(x, state)` for a one-layer, batch-first LSTM with a projection, with the backward of `_LSTMProj`."""
    if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first or not lstm.proj_size:
        raise ValueError("lstm_projected handles one unidirectional, batch-first layer with a projection")
    B = x.size(0)
    if state is None:
        h0, c0 = x.new_zeros(B, lstm.proj_size), x.new_zeros(B, lstm.hidden_size)
    else:
        h0, c0 = state[0].squeeze(0), state[1].squeeze(0)
    out, hT, cT = _LSTMProj.apply(x, h0, c0, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, lstm.weight_hr_l0)
    return out, (hT.unsqueeze(0), cT.unsqueeze(0))


def clip_and_step(opt: torch.optim.Optimizer, params: list[Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)` then `opt.step()`.

    For plain SGD on float32 CPU tensors with the native kernels loaded, both in one kernel
    (the norm, then p -= lr * g * min(1, max_norm / (norm + 1e-6))); the same update to float
    rounding.  Anything else (Adam, momentum, a GPU) runs the two PyTorch calls."""
    native = _kernels(params[0]) if params else None
    if native is not None and type(opt) is torch.optim.SGD and len(opt.param_groups) == 1:
        group = opt.param_groups[0]
        plain = not (group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"])
        have = [p for p in params if p.grad is not None]
        if plain and all(_kernels(p) is not None and p.is_contiguous() and not p.grad.is_sparse and p.grad.is_contiguous()
                         and p.grad.dtype == torch.float32 for p in have):
            with torch.no_grad():
                native.clip_sgd_([p.detach() for p in have], [p.grad for p in have], float(max_norm), float(group["lr"]))
            return
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
