"""Secure aggregation: masks cancel, dropped and surplus devices are unmasked via shares."""

import pytest
import torch

from federation.secagg import SecAggAborted, SecAggRound, shamir_reconstruct, shamir_share


def test_shamir_any_t_shares_reconstruct():
    g = torch.Generator().manual_seed(0)
    shares = shamir_share(123456789, [1, 2, 3, 4, 5], 3, g)
    assert shamir_reconstruct({x: shares[x] for x in (1, 3, 5)}) == 123456789
    assert shamir_reconstruct({x: shares[x] for x in (2, 4)}) != 123456789  # t-1 shares are not enough


def _round(cohort, n=64, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SecAggRound(cohort, n, k, 0.5, 32, g), g


def test_masked_reports_hide_inputs_and_masks_cancel():
    cohort = list(range(10))
    r, g = _round(cohort, k=9)  # complete graph
    xs = {u: torch.randn(64, generator=g, dtype=torch.float64) for u in cohort}
    masked = r.mask(0, xs[0])
    assert not torch.allclose(masked.double() / 2**32, xs[0])  # a single report reveals nothing useful
    for u in cohort:
        r.add(u, r.mask(u, xs[u]))
    total = r.unmask(set(cohort))
    expect = sum(xs[u] for u in cohort)
    assert torch.allclose(total, expect, atol=1e-8)


@pytest.mark.parametrize("k", [2, 4, 20])
def test_dropped_and_surplus_devices_are_unmasked(k):
    cohort = list(range(100, 113))
    r, g = _round(cohort, k=k, seed=k)
    xs = {u: torch.randn(64, generator=g, dtype=torch.float64) for u in cohort}
    included = [100, 101, 103, 105, 106, 108, 110, 111, 112]
    dropped = {102, 104}  # never answer again
    alive = set(cohort) - dropped  # 107, 109: surplus, alive but not included
    for u in included:
        r.add(u, r.mask(u, xs[u]))
    total = r.unmask(alive)
    assert torch.allclose(total, sum(xs[u] for u in included), atol=1e-8)


def test_too_few_live_neighbours_aborts():
    cohort = list(range(8))
    r, g = _round(cohort, k=2)
    for u in (0, 1):
        r.add(u, r.mask(u, torch.ones(64, dtype=torch.float64)))
    with pytest.raises(SecAggAborted):
        r.unmask({0, 1})  # everyone else vanished: device 2's key cannot be reconstructed
