"""One plain-SGD training step by direct calls to the native kernels, without autograd.

A federated client's step is small (8 x 20 words), and autograd's bookkeeping around it (graph
nodes, saved tensors, the Python `Function`s of models/fused.py, gradient accumulation,
`zero_grad`, the optimizer's checks) cost about a tenth of it.  `SGDStep` runs the step `fit`
runs through autograd as one straight sequence of calls: the forward, then backpropagation
written out by hand (Rumelhart, Hinton & Williams 1986, "Learning representations by
back-propagating errors"), each gradient by the same kernel or product, in the same order, as
the `Function` it replaces; then clipping by global norm and the SGD update
(`native.clip_sgd_`).  Its losses and parameters are the autograd step's bit for bit
(tests/test_models_sgd_step.py), so seeded runs do not depend on which one ran.

`fit` takes it where it applies (`applies`): the native kernels loaded, plain SGD over all of a
CPU float32 model's parameters, the exact softmax.  Anything else (Adam, momentum, sampled
softmax, a GPU, no kernels) runs the autograd step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models import native


def applies(model, optimizer: torch.optim.Optimizer, sampled_softmax: int) -> bool:
    """Whether `SGDStep` computes exactly what `fit`'s autograd step would for this model and optimizer."""
    if native.loaded() is None or sampled_softmax or type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    if group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"]:
        return False
    params = list(model.parameters())
    lstm = model.lstm
    return (len(group["params"]) == len(params) and all(a is b for a, b in zip(group["params"], params))
            and all(p.requires_grad and p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in params)
            and lstm.num_layers == 1 and not lstm.bidirectional and lstm.batch_first and lstm.proj_size > 0 and lstm.bias)


_MASKS_MATCH: bool | None = None


def native_masks_match() -> bool:
    """Whether the kernels' `bernoulli_mask` gives this torch's `bernoulli_` numbers and leaves the
    generator where it does (checked once per process on a few seeds, sizes and rates); the step
    draws dropout masks with it only then."""
    global _MASKS_MATCH
    if _MASKS_MATCH is None:
        k, ok = native.loaded(), True
        for seed, shape, keep in ((0, (8, 20, 96), 0.9), (1, (3, 700), 0.5), (2, (1,), 0.9)):
            a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            for _ in range(3):
                ok &= torch.equal(torch.empty(shape).bernoulli_(keep, generator=a), k.bernoulli_mask(torch.empty(shape), keep, b))
            ok &= torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
        _MASKS_MATCH = bool(ok)
    return _MASKS_MATCH


class SGDStep:
    """`step(x, y, state, generator, lr, max_norm)` for one model and word table: updates the
    model's parameters in place, returns the mean loss and the LSTM state to carry on.

    `on_part(name)`, if given, is called as each part of the step ends (PARTS, in order), for a
    profiler (bench/bench_train_step.py times the parts of this step with it)."""

    PARTS = ("compose", "lstm_fwd", "output_fwd", "output_bwd", "lstm_bwd", "compose_bwd", "clip_and_step")

    def __init__(self, model, table, on_part=None):
        self.on_part = on_part
        self.kernels = native.loaded()
        self.model = model
        self.table = table
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p.detach() for p in model.parameters()]
        st = table.composition_transpose(model.piece_emb.size(0))
        self.st = (st.crow_indices(), st.col_indices(), st.values())
        self.fast_masks = native_masks_match()

    def _keep_mask(self, like: Tensor, keep: float, generator: torch.Generator) -> Tensor:
        """models.lm._dropout's mask: torch.empty_like(like).bernoulli_(keep, generator), the same numbers
        from the kernels' bulk generator where they match (9x faster on 8 x 20 x 96)."""
        if self.fast_masks:
            return self.kernels.bernoulli_mask(like, keep, generator)
        return torch.empty_like(like).bernoulli_(keep, generator=generator)

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor, state, generator: torch.Generator | None, lr: float, max_norm: float):
        k, m, table, mark = self.kernels, self.model, self.table, self.on_part
        P = dict(zip(self.names, self.params))
        w_ih, w_hh, w_hr = P["lstm.weight_ih_l0"], P["lstm.weight_hh_l0"], P["lstm.weight_hr_l0"]
        p = m.cfg.dropout if generator is not None else 0.0
        B, T = x.shape
        # forward: WordLM.compose, then WordLM.loss (shared_lookup, run_lstm, the tied output layer)
        emb, bias = k.compose_forward(table.pieces, table.offsets, P["piece_emb"], P["piece_bias"], P["residual"],
                                      P["word_bias"], table.residual_rows)
        if mark:
            mark("compose")
        xe = emb[x]
        if state is None:
            state = m.start_state(B)
        if p > 0:  # models.lm._dropout, its mask drawn from the same generator in the same order
            mask_x = self._keep_mask(xe, 1 - p, generator)
            xe = xe * mask_x / (1 - p)
        xs = xe.transpose(0, 1).contiguous()  # (T, B, d)
        acts, cs, tcs, hfs, hs = k.lstm_forward(xs, w_ih, P["lstm.bias_ih_l0"] + P["lstm.bias_hh_l0"], w_hh, w_hr,
                                                state[0].squeeze(0).contiguous(), state[1].squeeze(0).contiguous())
        out = hs[1:].transpose(0, 1).contiguous()  # (B, T, d)
        new_state = (hs[T].clone().unsqueeze(0), cs[T].clone().unsqueeze(0))
        if p > 0:
            mask_h = self._keep_mask(out, 1 - p, generator)
            out = out * mask_h / (1 - p)
        if mark:
            mark("lstm_fwd")
        h = out.reshape(-1, out.size(-1))
        grad, rows, g_bias = k.tied_softmax_xent(h, emb, bias, y.reshape(-1).contiguous(), 1.0 / y.numel())
        loss = rows.mean()
        if mark:
            mark("output_fwd")
        # backward, as models/fused.py's Functions and autograd's views and products run it
        g_h = (grad @ emb).view(B, T, -1)
        g_emb = grad.t() @ h
        if mark:
            mark("output_bwd")
        if p > 0:
            g_h = g_h / (1 - p) * mask_h
        g_hs = g_h.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        d_gates, _, _ = k.lstm_backward(acts, cs, tcs, g_hs, w_hh, w_hr, hs.new_zeros(B, hs.size(2)), cs.new_zeros(B, cs.size(2)))
        flat = d_gates.view(T * B, -1)
        g_x = (flat @ w_ih).view(T, B, -1).transpose(0, 1)
        grads = {"lstm.weight_ih_l0": flat.t() @ xs.view(T * B, -1), "lstm.weight_hh_l0": flat.t() @ hs[:T].reshape(T * B, -1)}
        grads["lstm.bias_ih_l0"] = grads["lstm.bias_hh_l0"] = flat.sum(0)
        grads["lstm.weight_hr_l0"] = g_hs.view(T * B, -1).t() @ hfs.view(T * B, -1)
        if p > 0:
            g_x = g_x / (1 - p) * mask_x
        g_emb.index_add_(0, x.reshape(-1), g_x.reshape(-1, g_x.size(-1)))  # the lookup's rows (models.fused.shared_lookup)
        if mark:
            mark("lstm_bwd")
        grads["piece_emb"], grads["piece_bias"] = k.compose_backward(*self.st, g_emb, g_bias)
        r, n = table.residual_rows, P["residual"].size(0)
        g_res, g_wbias = g_emb[:r], g_bias[:r]
        if r < n:
            g_res = torch.cat([g_res, g_emb.new_zeros(n - r, g_emb.size(1))])
            g_wbias = torch.cat([g_wbias, g_bias.new_zeros(n - r)])
        grads["residual"], grads["word_bias"] = g_res, g_wbias
        if mark:
            mark("compose_bwd")
        k.clip_sgd_(self.params, [grads[name] for name in self.names], float(max_norm), float(lr))
        if mark:
            mark("clip_and_step")
        return loss.item(), new_state
