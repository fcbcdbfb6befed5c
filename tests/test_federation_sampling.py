"""Round sampling: over-selection, dropout, report order; the population is resampled."""

from pathlib import Path

import torch

from federation.sampling import Population, plan_round, sampling_rate


def test_plan_round_over_selects_and_caps_reports():
    g = torch.Generator().manual_seed(1)
    p = plan_round(1000, 100, 1.3, 0.06, 0.10, g)
    assert len(p.selected) == 130 and len(set(p.selected)) == 130
    assert 0.06 <= p.dropout_rate <= 0.10
    assert len(p.reporting) == 100
    assert set(p.reporting) | set(p.surplus) | set(p.dropped) == set(p.selected)
    assert not set(p.dropped) & (set(p.reporting) | set(p.surplus))


def test_plan_round_is_seeded():
    a = plan_round(50, 10, 1.3, 0.06, 0.1, torch.Generator().manual_seed(3))
    b = plan_round(50, 10, 1.3, 0.06, 0.1, torch.Generator().manual_seed(3))
    assert a == b


def test_population_resamples_real_users():
    pop = Population(Path("/nonexistent"), ("a", "b", "c"), 10_000)
    assert pop.real_id(0) == "a" and pop.real_id(4) == "b" and pop.real_id(9_999) == "a"


def test_poisson_plan_selects_each_device_independently_and_caps_nothing():
    """DP-FedAvg's sampling: about q N selected, varying from round to round; every survivor reports."""
    g = torch.Generator().manual_seed(0)
    plans = [plan_round(1000, 100, 1.3, 0.06, 0.10, g, poisson=True) for _ in range(30)]
    sizes = [len(p.selected) for p in plans]
    assert 110 < sum(sizes) / len(sizes) < 150 and len(set(sizes)) > 5  # q = 130 / 1000
    for p in plans:
        assert not p.surplus and len(p.reporting) == len(p.selected) - len(p.dropped)
        assert sorted(p.reporting) == sorted(set(p.selected) - set(p.dropped))
    assert sampling_rate(1000, 100, 1.3) == 0.13 and sampling_rate(50, 100, 1.3) == 1.0
    everyone = plan_round(50, 100, 1.3, 0.0, 0.0, torch.Generator().manual_seed(1), poisson=True)
    assert sorted(everyone.reporting) == list(range(50))
