"""Server optimizers applied to the averaged client delta (Reddi et al. 2021, "Adaptive
Federated Optimization"): the mean delta is used as a pseudo-gradient (with the sign
convention delta = local - global, it already points downhill).

    fedavg : x <- x + lr * d                                   (McMahan et al. 2017)
    fedavgm: m <- beta m + d;  x <- x + lr * m                 (Hsu et al. 2019; Gboard: beta 0.9, lr 1)
    fedadam: m <- b1 m + (1-b1) d;  v <- b2 v + (1-b2) d^2;  x <- x + lr * m / (sqrt(v) + tau)
             (Reddi et al. 2021, Algorithm 2, FedAdam: no bias correction, tau outside the sqrt,
             m starting at 0 and v at tau^2, the paper's v_{-1} >= tau^2; tau > 0.  Until session 28
             v started at 0, which made the first steps of small coordinates up to 2x the paper's.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from federation.config import ServerConfig
from models import params as P
from models.vocab import Vocabulary


@dataclass(frozen=True)
class ServerState:
    params: dict[str, Tensor]  # the global model
    vocab: Vocabulary  # the current global vocabulary (grown by discovery)
    round: int = 0  # rounds completed
    config: ServerConfig = field(default_factory=ServerConfig)
    opt_state: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # "m" / "v" -> params-shaped


def init_state(params: dict[str, Tensor], vocab: Vocabulary, config: ServerConfig) -> ServerState:
    return ServerState(P.clone(params), vocab, 0, config, {})


def _moment(state: ServerState, name: str, like: dict[str, Tensor], start: float = 0.0) -> dict[str, Tensor]:
    """The optimizer's moment `name`, `start` where it has none (a new run, or a key that runs
    saved before it existed lack, such as the start state)."""
    return {**{k: torch.full_like(v, start) for k, v in like.items()}, **state.opt_state.get(name, {})}


def server_update(state: ServerState, aggregate: dict[str, Tensor] | None) -> ServerState:
    """One server step with the mean delta; `None` (no usable report) leaves the model as it is."""
    cfg = state.config
    if aggregate is None:
        return replace(state, round=state.round + 1)
    if cfg.optimizer == "fedavg":
        return replace(state, params=P.add(state.params, aggregate, cfg.lr), round=state.round + 1)
    if cfg.optimizer == "fedavgm":
        m_old = _moment(state, "m", aggregate)
        m = P.add(aggregate, m_old, cfg.momentum)
        return replace(state, params=P.add(state.params, m, cfg.lr), opt_state={"m": m}, round=state.round + 1)
    if cfg.optimizer == "fedadam":
        m_old = _moment(state, "m", aggregate)
        v_old = _moment(state, "v", aggregate, cfg.tau**2)  # v_{-1} = tau^2 (Algorithm 2)
        m = {k: cfg.beta1 * m_old[k] + (1 - cfg.beta1) * aggregate[k] for k in aggregate}
        v = {k: cfg.beta2 * v_old[k] + (1 - cfg.beta2) * aggregate[k] ** 2 for k in aggregate}
        step = {k: m[k] / (torch.sqrt(v[k]) + cfg.tau) for k in m}
        return replace(state, params=P.add(state.params, step, cfg.lr), opt_state={"m": m, "v": v}, round=state.round + 1)
    raise ValueError(f"unknown server optimizer {cfg.optimizer!r}")
