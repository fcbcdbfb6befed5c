"""Pretraining: an interrupted run resumes to exactly the uninterrupted result."""

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.datasets import load_pretrain_lines
from models.lm import LMConfig
from models.pretrain import PretrainConfig, pretrain
from models.tokenizer import Tokenizer
from models.train import TrainConfig

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


class Stop(Exception):
    pass


def _cfg():
    return PretrainConfig(
        model=LMConfig(base_vocab=300, embed_dim=8, hidden=16),
        train=TrainConfig(epochs=1.0, batch_size=8, bptt=8, lr=1e-2, lr_decay=True, sampled_softmax=64),
        seed=3,
        save_every=4,
    )


def test_pretrain_resume_is_bit_exact(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:600]
    pretrain(lines, tok, tmp_path / "a", tmp_path / "work_a", _cfg())

    def stop_at_10(step, total, loss):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", _cfg(), on_step=stop_at_10)
    assert not (tmp_path / "b").exists()
    steps = []
    pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", _cfg(), on_step=lambda s, n, l: steps.append(s))
    assert steps[0] == 9  # resumed after the last saved step (8), not from scratch

    a_ck = load_checkpoint(tmp_path / "a", tok)
    a, b = a_ck.model.state_dict(), load_checkpoint(tmp_path / "b", tok).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the saved model starts messages from its mean state at message starts (models/start_state.py)
    assert a_ck.meta["start_state"]["message_starts"] > 0 and a["start_c"].abs().sum() > 0


def test_pretrain_restarts_when_config_changes(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:300]
    pretrain(lines, tok, tmp_path / "m", tmp_path / "work", _cfg())
    steps = []
    other = PretrainConfig(model=_cfg().model, train=TrainConfig(epochs=0.5, batch_size=8, bptt=8, sampled_softmax=64), seed=4, save_every=4)
    pretrain(lines, tok, tmp_path / "m", tmp_path / "work", other, on_step=lambda s, n, l: steps.append(s))
    assert steps[0] == 1


def test_second_stage_continues_a_model_with_its_vocabulary(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:300]
    pretrain(lines, tok, tmp_path / "stage1", tmp_path / "work1", _cfg())
    first = load_checkpoint(tmp_path / "stage1", tok)
    exact = PretrainConfig(train=TrainConfig(epochs=0.5, batch_size=8, bptt=8, lr=1e-3, lr_decay=True, sampled_softmax=0), seed=5, save_every=4)
    pretrain(lines[:150], tok, tmp_path / "stage2", tmp_path / "work2", exact, init=tmp_path / "stage1")
    second = load_checkpoint(tmp_path / "stage2", tok)
    assert second.vocab == first.vocab and second.model.cfg == first.model.cfg  # `exact.model` is ignored
    a, b = first.model.state_dict(), second.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it trained
    assert second.meta["init"]["meta"]["train"]["sampled_softmax"] == 64
    assert second.meta["train"]["sampled_softmax"] == 0


def test_dropout_override_trains_with_it_and_is_recorded(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:300]
    pretrain(lines, tok, tmp_path / "stage1", tmp_path / "work1", _cfg())
    first = load_checkpoint(tmp_path / "stage1", tok)
    assert first.model.cfg.dropout == 0.1 and "dropout" not in first.meta
    exact = PretrainConfig(train=TrainConfig(epochs=0.5, batch_size=8, bptt=8, sampled_softmax=0), seed=5, save_every=4)
    runs = {}
    for p in (0.0, 0.4):  # continuing the same model: only the dropout differs
        cfg = PretrainConfig(train=exact.train, seed=5, save_every=4, dropout=p)
        pretrain(lines[:150], tok, tmp_path / f"d{p}", tmp_path / f"work{p}", cfg, init=tmp_path / "stage1")
        runs[p] = load_checkpoint(tmp_path / f"d{p}", tok)
        assert runs[p].model.cfg.dropout == p and runs[p].meta["dropout"] == p
    a, b = runs[0.0].model.state_dict(), runs[0.4].model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pretrain_on_a_gpu_resumes_and_saves_a_cpu_checkpoint(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:600]
    cfg = PretrainConfig(model=_cfg().model, train=TrainConfig(epochs=1.0, batch_size=8, bptt=8, lr=1e-2, lr_decay=True, sampled_softmax=0),
                         seed=3, save_every=4, dropout=0.2)
    pretrain(lines, tok, tmp_path / "a", tmp_path / "work_a", cfg, device="cuda")

    def stop_at_10(step, total, loss):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", cfg, on_step=stop_at_10, device="cuda")
    steps = []
    pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", cfg, on_step=lambda s, n, l: steps.append(s), device="cuda")
    assert steps[0] == 9  # resumed from the state saved at step 8
    a, b = load_checkpoint(tmp_path / "a", tok), load_checkpoint(tmp_path / "b", tok)
    assert a.meta["device"] == "cuda" and a.model.cfg.dropout == 0.2
    for k, v in a.model.state_dict().items():
        assert v.device.type == "cpu" and torch.isfinite(v).all()
        assert torch.allclose(v, b.model.state_dict()[k], atol=1e-4), k  # cuDNN: close, not promised bit for bit


def test_pretrain_cli_refuses_a_gpu_it_does_not_have(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from keyboard.cli import main

    assert main(["pretrain", "--device", "cuda", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w")]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert main(["pretrain", "--dropout", "1.5", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w")]) == 2
    assert "--dropout must be in [0, 1)" in capsys.readouterr().err
