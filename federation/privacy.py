"""Differential privacy for FedAvg: DP-FedAvg (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models").

Two steps composed around aggregation, nothing else changes:
  * `clip`: each client's update is scaled to L2 norm <= C (and its weight capped at 1,
    `client_weight`), so one user changes the weighted sum by at most C;
  * `add_noise`: Gaussian noise N(0, (z C)^2) is added ONCE to the sum.
Epsilon at delta comes from Google's `dp_accounting` RDP accountant (Mironov 2017), with
each round a Poisson-subsampled Gaussian mechanism at rate q = selected / population
(the usual approximation of fixed-size sampling).  With z = 0 and no clip both steps are
the identity, so the result is plain FedAvg.
"""

from __future__ import annotations

import dp_accounting
import torch
from dp_accounting.rdp import RdpAccountant
from torch import Tensor

from federation.config import PrivacyConfig
from models import params as P


def clip(update: dict[str, Tensor], cfg: PrivacyConfig) -> tuple[dict[str, Tensor], bool]:
    """Per-client L2 clipping to cfg.clip (identity when cfg.clip is None)."""
    if cfg.clip is None:
        return update, False
    return P.clip_by_norm(update, cfg.clip)


def client_weight(num_words: int, cfg: PrivacyConfig) -> float:
    """FedAvg weight: the word count; with noise, min(words / cap, 1) bounds each user's influence."""
    if cfg.noise_multiplier > 0:
        return min(num_words / cfg.weight_cap_words, 1.0)
    return float(num_words)


def add_noise(total: Tensor, cfg: PrivacyConfig, generator: torch.Generator) -> Tensor:
    """sum + N(0, (z C)^2), drawn once per round (identity when z = 0)."""
    if cfg.noise_multiplier == 0:
        return total
    std = cfg.noise_multiplier * cfg.clip
    return total + std * torch.randn(total.shape, generator=generator, dtype=total.dtype)


def epsilon(cfg: PrivacyConfig, sampling_rate: float, rounds: int) -> float | None:
    """(epsilon, cfg.delta)-DP after `rounds` rounds; None without noise (no guarantee)."""
    if cfg.noise_multiplier == 0 or rounds == 0:
        return None
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(min(1.0, sampling_rate), dp_accounting.GaussianDpEvent(cfg.noise_multiplier)),
        rounds)
    acc = RdpAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(cfg.delta))
