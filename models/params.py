"""Arithmetic on parameter dicts (`dict[str, Tensor]`): the one place it lives.

Sign convention, written once: a *delta* is `local - global` (the direction the
client moved).  The server applies `global + server_lr * aggregate(deltas)`.
No function here mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


def clone(p: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().clone() for k, v in p.items()}


def zeros_like(p: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in p.items()}


def delta(local: Mapping[str, Tensor], global_: Mapping[str, Tensor], out: Params | None = None) -> Params:
    """local - global: the update a client reports (written into `out`'s tensors when given)."""
    if out is None:
        return {k: local[k].detach() - global_[k].detach() for k in global_}
    for k in global_:
        torch.sub(local[k].detach(), global_[k].detach(), out=out[k])
    return out


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], scale: float = 1.0) -> Params:
    """a + scale * b."""
    return {k: a[k] + scale * b[k] for k in a}


def scale(a: Mapping[str, Tensor], s: float) -> Params:
    return {k: v * s for k, v in a.items()}


def global_norm(a: Mapping[str, Tensor]) -> float:
    """L2 norm of all tensors taken as one vector (float64 accumulation)."""
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in a.values())))


def clip_by_norm(a: Mapping[str, Tensor], max_norm: float) -> tuple[Params, bool]:
    """Scale `a` down to L2 norm <= max_norm. Returns (clipped, was_clipped)."""
    n = global_norm(a)
    if n <= max_norm or n == 0.0:
        return dict(a), False
    return scale(a, max_norm / n), True


def all_finite(a: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())


def check_compatible(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> str | None:
    """None if `update` has exactly reference's keys, shapes and dtypes, else why not."""
    if set(update) != set(reference):
        missing, extra = set(reference) - set(update), set(update) - set(reference)
        return f"keys differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for k, ref in reference.items():
        u = update[k]
        if not isinstance(u, Tensor):
            return f"{k} is not a tensor"
        if u.shape != ref.shape:
            return f"{k} has shape {tuple(u.shape)}, expected {tuple(ref.shape)}"
        if u.dtype != ref.dtype:
            return f"{k} has dtype {u.dtype}, expected {ref.dtype}"
    return None


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    """All tensors as one 1-D vector, in sorted key order."""
    return torch.cat([a[k].reshape(-1) for k in sorted(a)])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vec[i : i + n].view_as(like[k]).clone()
        i += n
    return out
