"""Round sampling: over-selection, dropout, report order; the population is resampled."""

from pathlib import Path

import torch

from federation.sampling import Population, plan_round


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
