"""Aggregation and DP: plain FedAvg exactly with noise 0 / no clip; bad updates never corrupt the model."""

import math
from dataclasses import replace

import pytest
import torch

from federation import privacy
from federation.aggregate import Aggregator
from federation.client import client_update
from federation.config import AggregationConfig, PrivacyConfig, ServerConfig, SimulationConfig
from federation.engine_sequential import SequentialEngine
from federation.rounds import client_seeds, run_round
from federation.sampling import build_population, plan_round, sampling_rate
from federation.secagg import SecAggRound
from federation.server import init_state
from models import params as P
from models.lm import START_STATE_KEYS, WordLM

REF = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
PLAIN = AggregationConfig(max_update_norm=None, secure_aggregation=False)


def _upd(v):
    return {"a": torch.full((3,), float(v)), "b": torch.full((2, 2), float(v))}


def test_weighted_mean_exact():
    agg = Aggregator(REF, PLAIN, PrivacyConfig())
    for i, (v, w) in enumerate([(1.0, 10), (4.0, 30), (-2.0, 60)]):
        agg.add(i, _upd(v), w)
    mean, weight = agg.result(set(), torch.Generator())
    assert weight == 100
    assert torch.equal(mean["a"], torch.full((3,), 0.1)) and torch.equal(mean["b"], torch.full((2, 2), 0.1))  # (10 + 120 - 120) / 100
    assert mean["a"].dtype == torch.float32


@pytest.mark.parametrize("bad, why", [
    ({"a": torch.tensor([1.0, float("nan"), 0.0]), "b": torch.zeros(2, 2)}, "NaN"),
    ({"a": torch.tensor([1.0, float("inf"), 0.0]), "b": torch.zeros(2, 2)}, "NaN or Inf"),
    ({"a": torch.zeros(4), "b": torch.zeros(2, 2)}, "shape"),
    ({"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, 2)}, "dtype"),
    ({"a": torch.zeros(3)}, "keys"),
])
def test_invalid_updates_are_rejected_and_counted(bad, why):
    agg = Aggregator(REF, AggregationConfig(secure_aggregation=False), PrivacyConfig())
    assert agg.add(0, _upd(1.0), 5)
    assert not agg.add(1, bad, 5)
    mean, _ = agg.result(set(), torch.Generator())
    assert agg.rejected == 1 and agg.count == 1 and why.split()[0] in agg.reasons[0]
    assert torch.equal(mean["a"], torch.ones(3))


def test_huge_norm_is_clipped_and_counted():
    agg = Aggregator(REF, AggregationConfig(max_update_norm=10.0, secure_aggregation=True), PrivacyConfig())
    agg.secagg = None  # plain sum for an exact check
    agg.add(0, _upd(1e30), 1)
    mean, _ = agg.result(set(), torch.Generator())
    assert agg.robust_clipped == 1
    assert math.isclose(P.global_norm(mean), 10.0, rel_tol=1e-5)


def test_dp_clip_and_noise():
    cfg = PrivacyConfig(clip=1.0, noise_multiplier=1.0, weight_cap_words=10)
    assert privacy.client_weight(5, cfg) == 0.5 and privacy.client_weight(500, cfg) == 1.0
    clipped, was = privacy.clip(_upd(3.0), cfg)
    assert was and math.isclose(P.global_norm(clipped), 1.0, rel_tol=1e-6)
    noisy = privacy.add_noise(torch.zeros(10_000, dtype=torch.float64), cfg, torch.Generator().manual_seed(0))
    assert 0.95 < float(noisy.std()) < 1.05
    e1, e2 = privacy.epsilon(cfg, 0.01, 10), privacy.epsilon(cfg, 0.01, 100)
    assert 0 < e1 < e2
    assert privacy.epsilon(replace(cfg, noise_multiplier=2.0), 0.01, 100) < e2
    assert privacy.epsilon(PrivacyConfig(), 0.01, 100) is None


def test_noise_zero_no_clip_is_identity():
    cfg = PrivacyConfig()
    u = _upd(7.0)
    assert privacy.clip(u, cfg)[0] is u and privacy.client_weight(42, cfg) == 42.0
    t = torch.randn(5, dtype=torch.float64)
    assert privacy.add_noise(t, cfg, torch.Generator()) is t


@pytest.fixture()
def setup(tiny_loaded, fixture_users, tmp_path, tiny):
    ck, tok = tiny_loaded
    pop = build_population(tmp_path / "devices", fixture_users)
    return ck, tok, pop, tiny[1]


def test_round_with_noise_zero_no_clip_equals_plain_fedavg(setup):
    """A full round (sampling, engine, aggregation, server step) == global + sum n_k d_k / sum n_k."""
    ck, tok, pop, tok_path = setup
    sim = SimulationConfig(clients_per_round=4, server=ServerConfig(optimizer="fedavg", lr=1.0),
                           aggregation=PLAIN, privacy=PrivacyConfig(noise_multiplier=0.0, clip=None))
    state = init_state(ck.model.state_dict(), ck.vocab, sim.server)
    gen = torch.Generator().manual_seed(5)
    probe = torch.Generator().manual_seed(5)
    plan = plan_round(pop.size, 4, sim.over_selection, sim.dropout_min, sim.dropout_max, probe)
    seeds = client_seeds(len(plan.reporting), probe)
    with SequentialEngine(ck.model.cfg, tok_path, pop.root, sim.client) as eng:
        new, m = run_round(state, pop, sim, eng, gen)
    # the reference, written out plainly
    ws = WordLM(ck.model.cfg)
    total, weight = None, 0
    for u, seed in zip(plan.reporting, seeds):
        texts = pop.device(u).history()
        r = client_update(state.params, ws, ck.vocab, tok, texts, sim.client, torch.Generator().manual_seed(seed))
        term = {k: v.double() * r.num_words for k, v in r.delta.items()}
        total = term if total is None else {k: total[k] + term[k] for k in term}
        weight += r.num_words
    expect = {k: (state.params[k] + (total[k] / weight).float()) for k in total}
    assert m["aggregated"] == len(plan.reporting) and m["rejected"] == 0 and m["clipped"] == 0
    for k in expect:
        assert torch.equal(new.params[k], expect[k]), k


def test_bad_clients_never_corrupt_the_global_model(setup):
    ck, tok, pop, tok_path = setup
    sim = SimulationConfig(clients_per_round=6, aggregation=AggregationConfig(max_update_norm=50.0))
    state = init_state(ck.model.state_dict(), ck.vocab, sim.server)

    def tamper(task, delta):
        k0 = sorted(delta)[0]
        d = dict(delta)
        if task.slot == 0:
            d[k0] = torch.full_like(d[k0], float("nan"))
        elif task.slot == 1:
            d[k0] = torch.full_like(d[k0], float("inf"))
        elif task.slot == 2:
            d[k0] = torch.zeros(3)
        elif task.slot == 3:
            d[k0] = d[k0].double()
        elif task.slot == 4:
            d[k0] = torch.full_like(d[k0], 1e12)
        return d

    with SequentialEngine(ck.model.cfg, tok_path, pop.root, sim.client) as eng:
        new, m = run_round(state, pop, sim, eng, torch.Generator().manual_seed(0), tamper=tamper)
    assert m["rejected"] == 4 and m["robust_clipped"] == 1 and m["aggregated"] == 2
    assert P.all_finite(new.params)
    assert P.global_norm(P.delta(new.params, state.params)) <= 50.0 * 1.0001


def test_dp_mean_divides_by_the_fixed_denominator_not_the_round_total():
    """DP-FedAvg's estimator f~_f (McMahan et al. 2018, Algorithm 1): (sum w_k d_k + noise) / qW.
    Dividing by the round's own total weight would make the noise's scale, and one user's pull on
    the mean, depend on who took part."""
    cfg = PrivacyConfig(clip=1000.0, noise_multiplier=1e-9, weight_cap_words=10)  # no clipping; noise far below the checks
    big = {"a": torch.zeros(20000), "b": torch.zeros(2, 2)}
    means = []
    for n_users in (3, 5):  # two rounds with different total weights
        agg = Aggregator(big, PLAIN, cfg)
        for i in range(n_users):
            agg.add(i, {"a": torch.full((20000,), 1.0), "b": torch.zeros(2, 2)}, 10)  # weight 1 each
        mean, weight = agg.result(set(), torch.Generator().manual_seed(0), denominator=4.0)
        assert weight == n_users
        means.append(float(mean["a"].mean()))
    assert means == pytest.approx([3 / 4, 5 / 4], rel=1e-6)
    # the noise on the mean has the fixed scale z C / qW, whatever the round's total weight
    cfg = PrivacyConfig(clip=1.0, noise_multiplier=2.0, weight_cap_words=10)
    for n_users in (1, 7):
        agg = Aggregator(big, PLAIN, cfg)
        for i in range(n_users):
            agg.add(i, {"a": torch.zeros(20000), "b": torch.zeros(2, 2)}, 1000)
        mean, _ = agg.result(set(), torch.Generator().manual_seed(1), denominator=4.0)
        assert float(mean["a"].std()) == pytest.approx(2.0 * 1.0 / 4.0, rel=0.03)


def test_fixed_denominator_is_the_expected_number_of_reports():
    assert privacy.fixed_denominator(1000, 0.13, 0.06, 0.10) == pytest.approx(130 * 0.92)


def test_an_update_clipped_twice_is_counted_once():
    agg = Aggregator(REF, AggregationConfig(max_update_norm=10.0, secure_aggregation=False), PrivacyConfig(clip=1.0))
    agg.add(0, _upd(100.0), 1)  # above both bounds
    agg.add(1, _upd(0.1), 1)  # below both
    assert (agg.robust_clipped, agg.dp_clipped, agg.clipped) == (1, 1, 1)


def test_secure_aggregation_rejects_what_its_fixed_point_cannot_hold():
    """Without a robust bound, one finite but huge update would wrap around Z_2^64 and decode to
    a wrong sum (or a weight of 0) with nothing counted; it is rejected and named instead."""
    agg = Aggregator(REF, AggregationConfig(max_update_norm=None, secure_aggregation=True), PrivacyConfig())
    agg.secagg = SecAggRound([0, 1, 2], 8, 2, 0.5, 32, torch.Generator().manual_seed(0))
    assert agg.add(0, _upd(1.0), 10)
    assert not agg.add(1, _upd(1e7), 5000)  # 5e10 after weighting: past 2^30 / 3
    assert agg.rejected == 1 and "fixed point" in agg.reasons[0]
    assert agg.add(2, _upd(3.0), 30)
    mean, weight = agg.result({0, 1, 2}, torch.Generator())
    assert weight == pytest.approx(40, abs=1e-6)
    assert torch.allclose(mean["a"], torch.full((3,), (10 + 90) / 40))


def test_a_dp_round_samples_devices_independently_and_reports_fixed_q(setup):
    """With noise, a round Poisson-samples (every survivor reports, none is surplus), epsilon is
    accounted at the fixed q, and the mean is divided by q N (1 - mean dropout)."""
    ck, tok, pop, tok_path = setup
    sim = SimulationConfig(clients_per_round=3, aggregation=PLAIN, over_selection=1.0, dropout_min=0.0, dropout_max=0.0,
                           privacy=PrivacyConfig(clip=0.5, noise_multiplier=1e-6))
    state = init_state(ck.model.state_dict(), ck.vocab, sim.server)
    probe = torch.Generator().manual_seed(2)
    plan = plan_round(pop.size, 3, 1.0, 0.0, 0.0, probe, poisson=True)
    with SequentialEngine(ck.model.cfg, tok_path, pop.root, sim.client) as eng:
        new, m = run_round(state, pop, sim, eng, torch.Generator().manual_seed(2))
    q = 3 / pop.size
    assert m["selected"] == len(plan.selected) == m["reporting"] and m["surplus"] == 0
    assert m["epsilon"] == pytest.approx(privacy.epsilon(sim.privacy, q, 1))
    assert m["train_words"] is None  # the total weight is not released
    # the reference, written out plainly: clipped updates, capped weights, over q N = 3 (not their total weight)
    seeds = client_seeds(len(plan.reporting), probe)
    ws, total, weight = WordLM(ck.model.cfg), None, 0.0
    for u, seed in zip(plan.reporting, seeds):
        r = client_update(state.params, ws, ck.vocab, tok, pop.device(u).history(), sim.client, torch.Generator().manual_seed(seed))
        d, _ = P.clip_by_norm(r.delta, 0.5)
        w = min(r.num_words / 500, 1.0)
        total = {k: v.double() * w for k, v in d.items()} if total is None else {k: total[k] + d[k].double() * w for k in d}
        weight += w
    assert weight != 3  # so the two denominators differ
    for k in total:
        if k not in START_STATE_KEYS:
            assert torch.allclose(new.params[k], state.params[k] + (total[k] / 3).float(), atol=1e-5), k


def test_a_server_step_that_overflows_commits_nothing(setup):
    """Every update is finite, but a finite learning rate can still overflow float32: the round
    stops with a reason instead of handing on (and checkpointing) a model of infinities."""
    from models.errors import FedkbError

    ck, tok, pop, tok_path = setup
    sim = SimulationConfig(clients_per_round=2, aggregation=PLAIN, server=ServerConfig(optimizer="fedavg", lr=1e300))
    state = init_state(ck.model.state_dict(), ck.vocab, sim.server)
    with SequentialEngine(ck.model.cfg, tok_path, pop.root, sim.client) as eng:
        with pytest.raises(FedkbError, match="non-finite .* round 0 is the run's last"):
            run_round(state, pop, sim, eng, torch.Generator().manual_seed(0))


def test_a_server_optimizer_state_that_overflows_commits_nothing(setup):
    """FedAdam's second moment at infinity makes every step m / (inf + tau) = 0: finite weights, a model
    frozen for good, and the state checkpointed.  The round now stops as for non-finite weights."""
    from models.errors import FedkbError

    ck, tok, pop, tok_path = setup
    sim = SimulationConfig(clients_per_round=2, aggregation=PLAIN, server=ServerConfig(optimizer="fedadam", lr=0.01))
    state = init_state(ck.model.state_dict(), ck.vocab, sim.server)
    state = replace(state, opt_state={"v": {k: torch.full_like(v, math.inf) for k, v in state.params.items()}})
    with SequentialEngine(ck.model.cfg, tok_path, pop.root, sim.client) as eng:
        with pytest.raises(FedkbError, match="non-finite .*--server-lr.* round 0 is the run's last"):
            run_round(state, pop, sim, eng, torch.Generator().manual_seed(0))


def test_epsilon_does_not_log_the_accountants_fallback(caplog):
    """At q = 26 / 401 and z = 1 two RDP orders do not converge; the accountant drops them (its
    fallback) and used to log a warning for each, every round, into `fedkb simulate`'s output."""
    e = privacy.epsilon(PrivacyConfig(clip=0.5, noise_multiplier=1.0), 26 / 401, 10)
    assert 0 < e < 10 and not [r for r in caplog.records if r.name == "absl"]


def test_epsilon_is_never_zero_or_a_traceback_where_the_accountant_underflows():
    """The config refuses such noise; below its range the accountant said epsilon 0.0 (z = 1e-155: no
    privacy at all) or raised ZeroDivisionError (z <= 1e-162): both are now one FedkbError."""
    from models.errors import FedkbError

    for z in (1e-155, 1e-170):
        cfg = PrivacyConfig(clip=1.0, noise_multiplier=1.0)
        object.__setattr__(cfg, "noise_multiplier", z)  # past the config's check, as an old run's config.json could be
        with pytest.raises(FedkbError, match="the privacy accountant cannot account for noise multiplier"):
            privacy.epsilon(cfg, 0.1, 2)
    assert privacy.epsilon(PrivacyConfig(clip=1.0, noise_multiplier=1e-100), 0.1, 2) > 1e100  # the range's ends work
    assert privacy.epsilon(PrivacyConfig(clip=1.0, noise_multiplier=1e6), 1.0, 1) >= 0


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1])
def test_a_weight_that_is_not_a_finite_count_is_rejected(weight):
    """A NaN weight was accepted: counted as aggregated while it made the whole sum NaN (or, with
    secure aggregation, INT64_MIN in the masked sum), and the round silently dropped."""
    ref = {"w": torch.zeros(3)}
    agg = Aggregator(ref, PLAIN, PrivacyConfig())
    assert agg.add(0, {"w": torch.ones(3)}, 5)
    assert not agg.add(1, {"w": torch.ones(3)}, weight)
    assert agg.rejected == 1 and "is not a finite number >= 0" in agg.reasons[0]
    mean, total = agg.result({0, 1}, torch.Generator())
    assert total == 5.0 and mean["w"].tolist() == [1.0, 1.0, 1.0]


def test_an_empty_dp_cohort_still_releases_noise():
    """With DP every round adds noise (the mechanism the accountant composes), so a round with no
    update releases noise / q W, never "model unchanged"; without DP it is None, as before."""
    big = {"a": torch.zeros(20000), "b": torch.zeros(2, 2), "start_h": torch.zeros(3)}
    cfg = PrivacyConfig(clip=0.5, noise_multiplier=2.0)
    mean, weight = Aggregator(big, PLAIN, cfg).result(set(), torch.Generator().manual_seed(0), denominator=4.0)
    assert weight == 0.0 and mean["start_h"].tolist() == [0.0, 0.0, 0.0]
    assert float(mean["a"].std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.03) and abs(float(mean["a"].mean())) < 0.01
    assert Aggregator(big, PLAIN, PrivacyConfig()).result(set(), torch.Generator()) == (None, 0.0)


@pytest.mark.parametrize("dp", [False, True])
def test_an_aborted_round_counts_nothing_as_aggregated_and_with_dp_releases_noise(dp, setup, monkeypatch):
    """Secure aggregation aborts: no update reaches the model, so `aggregated` is 0 (the masked ones are
    counted apart); without DP the model is unchanged, with DP it moves by noise / q W."""
    from federation.secagg import SecAggAborted

    def abort(self, alive):
        raise SecAggAborted("device 0: 0 live neighbours < threshold 1")

    monkeypatch.setattr(SecAggRound, "unmask", abort)
    ck, tok, pop, tok_path = setup
    priv = PrivacyConfig(clip=0.5, noise_multiplier=1.0) if dp else PrivacyConfig()
    sim = SimulationConfig(clients_per_round=3, privacy=priv)
    state = init_state(ck.model.state_dict(), ck.vocab, sim.server)
    with SequentialEngine(ck.model.cfg, tok_path, pop.root, sim.client) as eng:
        new, m = run_round(state, pop, sim, eng, torch.Generator().manual_seed(2))
    assert m["secagg_aborted"] and m["aggregated"] == 0 and m["masked"] == m["reporting"] > 0
    moved = P.delta(new.params, state.params)
    if not dp:
        assert all(torch.equal(new.params[k], state.params[k]) for k in state.params)
        return
    den = privacy.fixed_denominator(pop.size, sampling_rate(pop.size, 3, sim.over_selection), sim.dropout_min, sim.dropout_max)
    big = max((k for k in moved if k not in START_STATE_KEYS), key=lambda k: moved[k].numel())
    assert moved[big].numel() > 5000
    assert float(moved[big].std()) == pytest.approx(1.0 * 0.5 / den, rel=0.05)
    assert all(not moved[k].any() for k in START_STATE_KEYS if k in moved)


def _replay_noise(sim: SimulationConfig, pop, state, seed: int) -> torch.Tensor:
    """What an observer holding the seed recomputes as a DP round's noise: the seeded generator's draws
    replayed in the round's order (sampling, client seeds, then the noise; no secure aggregation)."""
    g = torch.Generator().manual_seed(seed)
    plan = plan_round(pop.size, sim.clients_per_round, sim.over_selection, sim.dropout_min, sim.dropout_max, g, poisson=True)
    client_seeds(len(plan.reporting), g)
    n = sum(v.numel() for v in state.params.values())
    return sim.privacy.noise_multiplier * sim.privacy.clip * torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("secret", [False, True])
def test_replaying_the_seeded_generator_recovers_the_sum_only_without_secret_noise(secret, setup, monkeypatch):
    """By default the noise comes from the run's seeded generator: replaying it and subtracting the noise
    from the released step gives back the un-noised sum (README says so). With secret_noise the noise
    comes from OS entropy and the same replay is off by the whole noise; the server generator is not
    advanced by it, so two runs of one seed sample the same devices."""
    ck, tok, pop, tok_path = setup
    sim = SimulationConfig(clients_per_round=3, aggregation=PLAIN,
                           privacy=PrivacyConfig(clip=0.5, noise_multiplier=1.0, secret_noise=secret))
    state = init_state(ck.model.state_dict(), ck.vocab, sim.server)
    truth, add_noise = [], privacy.add_noise
    monkeypatch.setattr(privacy, "add_noise", lambda total, cfg, g: truth.append(total.clone()) or add_noise(total, cfg, g))
    runs = []
    with SequentialEngine(ck.model.cfg, tok_path, pop.root, sim.client) as eng:
        for _ in range(2):
            gen = torch.Generator().manual_seed(4)
            new, m = run_round(state, pop, sim, eng, gen)
            runs.append((new, m, gen.get_state()))
    (new, m, g_state), (new2, m2, g_state2) = runs
    assert torch.equal(truth[0], truth[1])  # the same clients trained on the same data
    keys = [k for k in sorted(state.params) if k not in START_STATE_KEYS]  # zeroed after the noise
    den = privacy.fixed_denominator(pop.size, sampling_rate(pop.size, 3, sim.over_selection), sim.dropout_min, sim.dropout_max)
    step = P.flatten({k: new.params[k].double() - state.params[k].double() for k in state.params}) * den
    mask = torch.cat([torch.full((state.params[k].numel(),), k not in START_STATE_KEYS) for k in sorted(state.params)])
    err = (step - _replay_noise(sim, pop, state, 4) - truth[0])[mask]
    assert keys and float(truth[0][mask].norm()) > 0.1
    same = all(torch.equal(new.params[k], new2.params[k]) for k in keys)
    assert [m[k] for k in ("selected", "dropouts", "reporting")] == [m2[k] for k in ("selected", "dropouts", "reporting")]
    assert torch.equal(g_state, g_state2)
    if not secret:
        assert float(err.abs().max()) < 1e-4 and same  # the noise is removed exactly, up to float32 rounding
    else:
        assert float(err.norm()) > 10 * float(truth[0][mask].norm()) and not same
