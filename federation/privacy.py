"""Differential privacy for FedAvg: DP-FedAvg (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models").

The paper's Algorithm 1 with its fixed-denominator estimator f~_f, composed around aggregation:
  * devices are Poisson-sampled with probability q (federation/sampling.py, `poisson`);
  * `clip`: each client's update is scaled to L2 norm <= C and its weight capped at 1
    (`client_weight`, w_k = min(n_k / w^, 1)), so adding or removing one user changes the
    weighted sum by at most C;
  * `add_noise`: Gaussian noise N(0, (z C)^2) is added ONCE to the sum, every round, an empty
    or aborted one included (federation/aggregate.py, `Aggregator.empty_result`);
  * the noised sum is divided by a fixed denominator (`fixed_denominator`), never by the round's
    actual total weight: that total depends on who took part, and dividing by it would let one
    user move the mean by up to 2C / total and reveal the total through the noise's scale.
Epsilon at delta comes from Google's `dp_accounting` RDP accountant (Mironov 2017), each round
a Poisson-subsampled Gaussian mechanism at rate q with noise multiplier z, composed over
rounds.  With z = 0 and no clip the first steps are the identity and the mean is divided by
the total weight: plain FedAvg.

Where the noise comes from (`noise_generator`): by default the run's seeded server generator,
so a run is reproducible bit for bit, and so is its noise: whoever holds the seed (config.json)
or a checkpoint's generator state can replay the noise and subtract it from the released
models.  Epsilon is then what a deployment drawing secret noise would have, not a property of
the run folder.  `secret_noise` draws it from a generator seeded from OS entropy each round,
kept nowhere; a resumed run is then not bit for bit an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings

import dp_accounting
import torch
from dp_accounting.rdp import RdpAccountant
from torch import Tensor

from federation.config import PrivacyConfig
from models import params as P
from models.errors import FedkbError


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


def noise_generator(cfg: PrivacyConfig, generator: torch.Generator) -> torch.Generator:
    """The generator a round's noise is drawn from: the server's seeded `generator`, or with
    `cfg.secret_noise` a fresh one seeded from OS entropy, never saved (the server generator is
    then not advanced by the noise, so the run's sampling stays what its seed makes it)."""
    if cfg.secret_noise:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return generator


def add_noise(total: Tensor, cfg: PrivacyConfig, generator: torch.Generator) -> Tensor:
    """sum + N(0, (z C)^2), drawn once per round (identity when z = 0)."""
    if cfg.noise_multiplier == 0:
        return total
    std = cfg.noise_multiplier * cfg.clip
    return total + std * torch.randn(total.shape, generator=generator, dtype=total.dtype)


def fixed_denominator(population_size: int, sampling_rate: float, dropout_min: float, dropout_max: float) -> float:
    """The paper's q W with every weight at its cap of 1 (W = N): the expected number of devices
    that report in a round, q N (1 - mean dropout rate).  Fixed before any data is seen; a
    device whose history is shorter than the weight cap counts for less than 1 in the sum, so
    a round's step is in expectation at most FedAvg's; a round in which more devices than
    expected report (Poisson sampling) takes a larger one."""
    return sampling_rate * population_size * (1 - (dropout_min + dropout_max) / 2)


def epsilon(cfg: PrivacyConfig, sampling_rate: float, rounds: int) -> float | None:
    """(epsilon, cfg.delta)-DP after `rounds` rounds; None without noise (no guarantee).
    FedkbError where the accountant's arithmetic fails (config.NOISE_RANGE keeps z where it does
    not): never a traceback, and never an epsilon of 0 for a noise multiplier below 1."""
    if cfg.noise_multiplier == 0 or rounds == 0:
        return None
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(min(1.0, sampling_rate), dp_accounting.GaussianDpEvent(cfg.noise_multiplier)),
        rounds)
    acc = RdpAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "failed to converge ... excluding this order": the accountant's own fallback, said once per order every round
    try:
        with warnings.catch_warnings():  # numpy's overflow warnings, where the check below has the say
            warnings.simplefilter("ignore", RuntimeWarning)
            acc.compose(event)
            eps = float(acc.get_epsilon(cfg.delta))
    except (ArithmeticError, ValueError) as e:
        eps, why = math.nan, f"{type(e).__name__}: {e}"
    else:
        why = f"epsilon came out {eps}"
    finally:
        absl.setLevel(level)
    if not math.isfinite(eps) or eps < 0 or (eps == 0 and cfg.noise_multiplier < 1):
        raise FedkbError(f"the privacy accountant cannot account for noise multiplier {cfg.noise_multiplier:g} at "
                         f"sampling rate {sampling_rate:g} over {rounds} rounds ({why})")
    return eps
