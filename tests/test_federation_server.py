"""Server optimizers: exact numbers on tiny tensors; states are immutable."""

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


def test_fedadam_first_step_is_lr_sign():
    s = server_update(_state("fedadam", lr=0.1, tau=0.0), {"w": torch.tensor([0.3, -0.2])})
    # m = 0.1 d, v = 0.01 d^2 -> m / sqrt(v) = sign(d)
    assert torch.allclose(s.params["w"], torch.tensor([1.1, 1.9]))


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
