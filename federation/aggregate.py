"""The weighted mean of client updates, as a running sum, with validation at the door.

Each arriving update goes through named steps (pfl-research style: clip each user, sum,
noise once):
  validate  -> reject (and count) NaN/Inf, wrong keys/shape/dtype: never enters the sum
  robust    -> clip (and count) norms above `max_update_norm`: a huge update cannot blow up the model
  dp clip   -> privacy.clip (per-client L2 bound, McMahan et al. 2018)
  weight    -> privacy.client_weight (words; capped with DP noise)
  sum       -> running sum, float64 or securely aggregated (secagg.py)
The running sum keeps memory flat in the number of clients (as in FedJAX's
`fed_avg`): nothing is kept per client but its norm.  The server learns only the
sum and the total weight (both through secure aggregation when it is on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from federation import privacy
from federation.config import AggregationConfig, PrivacyConfig
from federation.secagg import SecAggRound
from models import params as P
from models.lm import START_STATE_KEYS


def validate(update: dict[str, Tensor], reference: dict[str, Tensor]) -> str | None:
    """None if the update can enter the sum, else why not."""
    why = P.check_compatible(update, reference)
    if why:
        return why
    if not P.all_finite(update):
        return "contains NaN or Inf"
    return None


@dataclass
class Aggregator:
    """Accumulates one round's updates.  `reference` is the global parameter dict (shapes/dtypes)."""

    reference: dict[str, Tensor]
    agg: AggregationConfig
    dp: PrivacyConfig
    secagg: SecAggRound | None = None
    total: Tensor | None = None  # float64 running sum of weight * update (flat) + weight as the last element
    count: int = 0
    rejected: int = 0
    robust_clipped: int = 0
    dp_clipped: int = 0
    clipped: int = 0  # updates clipped by either bound, each counted once
    norms: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, device: int, update: dict[str, Tensor], num_words: int) -> bool:
        """Validate, clip, weight and sum one update; False if it was rejected."""
        why = validate(update, self.reference)
        if why is None and not (isinstance(num_words, (int, float)) and math.isfinite(num_words) and num_words >= 0):
            why = f"weight {num_words!r} is not a finite number >= 0"
        if why:
            return self._reject(why)
        norm = P.global_norm(update)
        robust = self.agg.max_update_norm is not None and norm > self.agg.max_update_norm
        if robust:
            update, _ = P.clip_by_norm(update, self.agg.max_update_norm)
        update, was = privacy.clip(update, self.dp)
        w = privacy.client_weight(num_words, self.dp)
        vec = torch.cat([P.flatten(update).double() * w, torch.tensor([w], dtype=torch.float64)])
        if self.secagg is not None and (why := self.secagg.out_of_range(vec)):
            return self._reject(why)
        self.norms.append(norm)
        self.robust_clipped += int(robust)
        self.dp_clipped += int(was)
        self.clipped += int(robust or was)
        if self.secagg is not None:
            self.secagg.add(device, self.secagg.mask(device, vec))
        elif self.total is None:
            self.total = vec
        else:
            self.total += vec
        self.count += 1
        return True

    def _reject(self, why: str) -> bool:
        """Count an update that never enters the sum, and why; False, `add`'s answer for it."""
        self.rejected += 1
        self.reasons.append(why)
        return False

    def result(self, alive: set[int], generator: torch.Generator,
               denominator: float | None = None) -> tuple[dict[str, Tensor] | None, float]:
        """(mean update in the reference dtype, total weight); None if nothing arrived (without DP).

        Noise is added once to the weighted sum (not to the weight).  The sum is divided by the
        total weight (FedAvg), or by `denominator` where one is given: DP-FedAvg's fixed q W
        (privacy.fixed_denominator), so the mean's noise scale reveals nothing.  The model's
        start state is not trained by clients, so its entries of the mean are zero.
        """
        if self.count == 0:
            return self.empty_result(generator, denominator)
        total = self.secagg.unmask(alive) if self.secagg is not None else self.total
        return self._release(total, generator, denominator)

    def empty_result(self, generator: torch.Generator,
                     denominator: float | None = None) -> tuple[dict[str, Tensor] | None, float]:
        """What a round with no sum releases (no update arrived, or secure aggregation aborted):
        without DP, None (the model stays as it is); with DP (a `denominator`), noise / q W, as
        every round of the mechanism the accountant composes adds noise, whoever took part."""
        if denominator is None:
            return None, 0.0
        n = sum(v.numel() for v in self.reference.values()) + 1
        return self._release(torch.zeros(n, dtype=torch.float64), generator, denominator)

    def _release(self, total: Tensor, generator: torch.Generator,
                 denominator: float | None) -> tuple[dict[str, Tensor] | None, float]:
        """The noised mean of the flat sum `total` (weight as its last element), and the weight."""
        weight = float(total[-1])
        s = privacy.add_noise(total[:-1], self.dp, generator)
        divide_by = weight if denominator is None else denominator
        if not divide_by > 0:
            return None, 0.0
        mean = P.unflatten(s / divide_by, self.reference)
        for key in START_STATE_KEYS:  # not trained by clients (models/start_state.py): no noise, no tampering
            if key in mean:
                mean[key] = torch.zeros_like(mean[key])
        return {k: v.to(self.reference[k].dtype) for k, v in mean.items()}, weight
