"""Server optimizers: exact numbers on tiny tensors; states are immutable."""

import math

import pytest
import torch

from federation.config import ServerConfig
from federation.server import init_state, server_update
from models.vocab import Vocabulary

V = Vocabulary(("<s>", "<unk>", "a"), 0, 3)


def _state(opt, **kw):
    return init_state({"w": torch.tensor([1.0, 2.0])}, V, ServerConfig(optimizer=opt, **kw))


def test_fedavg_adds_mean_delta():
    s = server_update(_state("fedavg"), {"w": torch.tensor([0.5, -1.0])})
    assert s.params["w"].tolist() == [1.5, 1.0] and s.round == 1


def test_fedavgm_momentum():
    s0 = _state("fedavgm", lr=1.0, momentum=0.9)
    d = {"w": torch.tensor([1.0, 0.0])}
    s1 = server_update(s0, d)
    s2 = server_update(s1, d)
    assert s1.params["w"].tolist() == [2.0, 2.0]
    assert torch.allclose(s2.params["w"], torch.tensor([2.0 + 1.9, 2.0]))
    assert s0.params["w"].tolist() == [1.0, 2.0]  # the input state is untouched


def test_fedadam_first_step_follows_reddi_algorithm_2():
    """Reddi et al. 2021, Algorithm 2 (FedAdam): m_0 = (1 - b1) d, v_0 = b2 v_{-1} + (1 - b2) d^2 with
    v_{-1} = tau^2, x_1 = x_0 + lr m_0 / (sqrt(v_0) + tau).  With v_{-1} = 0, as until session 28, the
    small coordinate's step was about twice this."""
    lr, tau, b1, b2 = 0.1, 1e-3, 0.9, 0.99
    d = [0.3, -1e-3]
    s = server_update(_state("fedadam", lr=lr, tau=tau, beta1=b1, beta2=b2), {"w": torch.tensor(d)})
    expect = [x + lr * (1 - b1) * g / (math.sqrt(b2 * tau**2 + (1 - b2) * g**2) + tau) for x, g in zip([1.0, 2.0], d)]
    assert torch.allclose(s.params["w"], torch.tensor(expect), rtol=0, atol=1e-6)
    assert torch.allclose(s.opt_state["v"]["w"], torch.tensor([b2 * tau**2 + (1 - b2) * g**2 for g in d]))


def test_fedadam_needs_tau_above_zero():
    """tau = 0 made 0/0 = NaN wherever no client moved (the start state), and every round failed."""
    with pytest.raises(ValueError, match="fedadam needs tau > 0"):
        ServerConfig(optimizer="fedadam", lr=0.01, tau=0.0)
    ServerConfig(optimizer="fedavg", tau=0.0)  # tau is FedAdam's alone


@pytest.mark.parametrize("tau", [1e200, 1e-300])
def test_fedadam_tau_stays_where_tau_squared_is_a_float32(tau):
    """tau = 1e200 raised OverflowError at tau**2; tau = 1e-300 underflowed and made 0/0 steps."""
    with pytest.raises(ValueError, match=r"tau must be 0 or in \[1e-15, 1e\+15\]"):
        ServerConfig(optimizer="fedadam", lr=0.01, tau=tau)


def test_fedadam_second_moment_of_a_key_added_later_starts_at_tau_squared():
    """A key a resumed run's saved moments lack (such as the start state) starts where a new run's does."""
    from dataclasses import replace

    tau = 1e-3
    s0 = init_state({"w": torch.tensor([1.0]), "start_h": torch.tensor([0.0])}, V,
                    ServerConfig(optimizer="fedadam", lr=0.1, tau=tau))
    s0 = replace(s0, opt_state={"m": {"w": torch.tensor([0.0])}, "v": {"w": torch.tensor([tau**2])}})
    s1 = server_update(s0, {"w": torch.tensor([0.0]), "start_h": torch.tensor([0.0])})
    assert torch.allclose(s1.opt_state["v"]["start_h"], torch.tensor([0.99 * tau**2]))
    assert s1.params["start_h"].tolist() == [0.0]


def test_no_aggregate_keeps_model():
    s0 = _state("fedavgm")
    s = server_update(s0, None)
    assert s.round == 1 and torch.equal(s.params["w"], s0.params["w"])


def test_unknown_optimizer_rejected():
    with pytest.raises(ValueError):
        ServerConfig(optimizer="sgd")


def test_moments_saved_before_a_key_existed_start_at_zero():
    # a run saved before the model had its start state resumes: the new key's moment is zero
    from dataclasses import replace

    s0 = init_state({"w": torch.tensor([1.0]), "start_h": torch.tensor([0.0])}, V,
                    ServerConfig(optimizer="fedavgm", lr=1.0, momentum=0.9))
    s0 = replace(s0, opt_state={"m": {"w": torch.tensor([1.0])}})
    s1 = server_update(s0, {"w": torch.tensor([1.0]), "start_h": torch.tensor([0.0])})
    assert torch.allclose(s1.params["w"], torch.tensor([1.0 + 1.0 + 0.9]))
    assert s1.params["start_h"].tolist() == [0.0]
