"""Pretraining: an interrupted run resumes to exactly the uninterrupted result."""

import re

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
    """Interrupted twice: a resumed run's saves once filed Adam's moments under other parameters'
    numbers, so the second resume crashed on mismatched shapes."""
    tok = Tokenizer(tiny[1])
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:600]
    pretrain(lines, tok, tmp_path / "a", tmp_path / "work_a", _cfg())

    def stop_at(k):
        def on_step(step, total, loss):
            steps.append(step)
            if step == k:
                raise Stop
        return on_step

    for stop, first in ((10, 1), (14, 9)):  # saves every 4 steps: the second run resumes after 8, the third after 12
        steps = []
        with pytest.raises(Stop):
            pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", _cfg(), on_step=stop_at(stop))
        assert steps[0] == first
    assert not (tmp_path / "b").exists()
    steps = []
    pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", _cfg(), on_step=lambda s, n, l: steps.append(s))
    assert steps[0] == 13  # resumed after the last saved step (12), not from scratch

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


def _short(tiny):
    return Tokenizer(tiny[1]), load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:150]


def _weights(d):
    return (d / "model.safetensors").read_bytes()


def test_a_save_cut_short_resumes_from_the_last_whole_step(tiny, tmp_path, monkeypatch):
    """Killed while the step-8 state was being written (its weights already replaced, before),
    a rerun resumed from step 4's optimizer and generator with step 8's weights: another model."""
    import json

    import models.pretrain as P

    tok, lines = _short(tiny)
    pretrain(lines, tok, tmp_path / "a", tmp_path / "work_a", _cfg())
    at = {"step": 0}
    real = P.save_tensors

    def dies_at_step_8(path, tensors, *a, **k):
        if at["step"] == 8 and path.name == "optimizer.safetensors":
            raise Stop  # a kill: model.safetensors of step 8 is written, the rest of that step is not
        return real(path, tensors, *a, **k)

    monkeypatch.setattr(P, "save_tensors", dies_at_step_8)
    with pytest.raises(Stop):
        pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", _cfg(), on_step=lambda s, n, l: at.update(step=s))
    monkeypatch.setattr(P, "save_tensors", real)
    steps = []
    pretrain(lines, tok, tmp_path / "b", tmp_path / "work_b", _cfg(), on_step=lambda s, n, l: steps.append(s))
    assert steps[0] == 5 and _weights(tmp_path / "b") == _weights(tmp_path / "a")
    assert [p.name for p in (tmp_path / "work_b").iterdir() if p.is_dir()] == [f"step-{steps[-1]}"]  # older steps deleted

    # a state saved before step folders (the four files in the work folder itself) resumes too
    with pytest.raises(Stop):
        pretrain(lines, tok, tmp_path / "c", tmp_path / "work_c", _cfg(), on_step=lambda s, n, l: s == 10 and _raise(Stop))
    w = tmp_path / "work_c"
    for f in (w / "step-8").iterdir():
        f.rename(w / f.name)
    (w / "step-8").rmdir()
    st = json.loads((w / "state.json").read_text())
    del st["folder"]
    (w / "state.json").write_text(json.dumps(st))
    steps = []
    pretrain(lines, tok, tmp_path / "c", w, _cfg(), on_step=lambda s, n, l: steps.append(s))
    assert steps[0] == 9 and _weights(tmp_path / "c") == _weights(tmp_path / "a")
    assert not (w / "model.safetensors").exists()


def _raise(e):
    raise e


def test_a_diverging_run_stops_and_keeps_the_model_in_out(tiny, tmp_path):
    """--lr 1e30 trained to NaN, replaced --out with weights every reader refuses and reported success."""
    from models.errors import FedkbError

    tok, lines = _short(tiny)
    pretrain(lines, tok, tmp_path / "m", tmp_path / "work", _cfg())
    before = _weights(tmp_path / "m")
    wild = PretrainConfig(model=_cfg().model, train=TrainConfig(epochs=1.0, batch_size=8, bptt=8, lr=1e30), seed=3, save_every=4)
    with pytest.raises(FedkbError, match=r"training diverged \(.* at step \d+\): nothing written to .*m; lower the learning rate"):
        pretrain(lines, tok, tmp_path / "m", tmp_path / "work", wild)
    assert _weights(tmp_path / "m") == before
    load_checkpoint(tmp_path / "m", tok)
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(epochs=float("inf"))


def test_out_and_work_are_checked_before_training(tiny, tmp_path):
    """An --out under a file failed after the last step (hours, with the real recipe)."""
    from models.errors import FedkbError

    tok, lines = _short(tiny)
    (tmp_path / "file").write_text("x")
    steps = []
    for out, work in ((tmp_path / "file" / "m", tmp_path / "w"), (tmp_path / "m", tmp_path / "file" / "w")):
        with pytest.raises(FedkbError, match=r"cannot write .*: .*file is a file, not a folder"):
            pretrain(lines, tok, out, work, _cfg(), on_step=lambda s, n, l: steps.append(s))
    assert steps == [] and not (tmp_path / "w").exists()


def test_a_finished_run_rerun_records_its_final_loss(tiny, tmp_path):
    """The rerun trains no step; it wrote final_loss null."""
    tok, lines = _short(tiny)
    pretrain(lines, tok, tmp_path / "a", tmp_path / "work", _cfg())
    pretrain(lines, tok, tmp_path / "b", tmp_path / "work", _cfg(), on_step=lambda s, n, l: _raise(AssertionError("trained")))
    a, b = load_checkpoint(tmp_path / "a", tok), load_checkpoint(tmp_path / "b", tok)
    assert isinstance(a.meta["final_loss"], float) and b.meta["final_loss"] == a.meta["final_loss"]
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")


def test_a_damaged_work_folder_is_one_line_that_says_what_to_do(tiny, tmp_path):
    from models.errors import FedkbError

    tok, lines = _short(tiny)
    w = tmp_path / "work"
    pretrain(lines, tok, tmp_path / "m", w, _cfg())
    good = (w / "state.json").read_text()
    for text, why in (('{"step": 4, "fingerp', "Unterminated string"), ("[1, 2]", "not a JSON object"),
                      ('{"step": "4", "fingerprint": "x"}', "no fingerprint and step"),
                      (good.replace('"folder": "step-', '"folder": "../step-'), "folder '../step-\\d+' is not step-")):
        (w / "state.json").write_text(text)
        with pytest.raises(FedkbError, match=rf"state.json is damaged \({why}.*\): delete .*work to start over"):
            pretrain(lines, tok, tmp_path / "m", w, _cfg())
    (w / "state.json").write_text(good)
    step = next(w.glob("step-*"))
    (step / "optimizer.safetensors").write_bytes(b"junk")
    with pytest.raises(FedkbError, match=r"optimizer.safetensors is not a valid .*; delete .*work to start over"):
        pretrain(lines, tok, tmp_path / "m", w, _cfg())


def test_one_pretrain_at_a_time_in_a_work_folder_and_another_runs_state_is_announced(tiny, tmp_path):
    import fcntl
    import os

    from models.errors import FedkbError

    tok, lines = _short(tiny)
    w = tmp_path / "work"
    w.mkdir()
    fd = os.open(w / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process training there
    try:
        with pytest.raises(FedkbError, match="work is in use: another fedkb pretrain is training there"):
            pretrain(lines, tok, tmp_path / "m", w, _cfg())
    finally:
        os.close(fd)
    notes = []
    pretrain(lines, tok, tmp_path / "m", w, _cfg(), on_note=notes.append)
    assert notes == []
    other = PretrainConfig(model=_cfg().model, train=_cfg().train, seed=4, save_every=4)
    pretrain(lines, tok, tmp_path / "m", w, other, on_note=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"starting over: {w} holds another run's training state")


def test_a_vocabulary_size_below_three_is_refused_and_never_sliced_from_the_end():
    """--vocab-size 1 sliced ranked[:-1]: almost every word, in a model.json no command could load."""
    from models.text import SPECIALS
    from models.vocab import build_vocab

    tokens = [["a", "b", "c"]] * 3
    assert build_vocab(tokens, 1).words == build_vocab(tokens, 2).words == SPECIALS
    assert build_vocab(tokens, 3).words == SPECIALS + ("a",)
    for size in (1, 2):
        with pytest.raises(ValueError, match="vocabulary size must be >= 3"):
            PretrainConfig(model=LMConfig(base_vocab=size))


def test_a_text_with_no_repeated_word_is_refused(tiny, tmp_path):
    from models.errors import FedkbError

    with pytest.raises(FedkbError, match="no word occurs twice"):
        pretrain(["one two three", "four five six"], Tokenizer(tiny[1]), tmp_path / "m", tmp_path / "w", _cfg())
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flags, message", [
    (["--threads", "-1"], "--threads must be >= 0"),  # RuntimeError from torch before
    (["--epochs", "inf"], "must be finite numbers"),  # OverflowError, after reading the data
    (["--epochs", "1e308"], "epochs must be at most 1,000,000"),  # finite, but the step count overflowed
    (["--lr", "inf"], "must be finite numbers"),  # a model of NaNs saved over --out
    (["--seed", str(10**23)], r"seed must be a whole number in \[0, 2\^63\)"),  # ValueError from manual_seed
    (["--seed", "-1"], r"seed must be a whole number in \[0, 2\^63\)"),
    (["--vocab-size", "1000000000"], "base_vocab must be at most 1,000,000"),  # a failed 384 GB allocation
    (["--vocab-size", "1"], "vocabulary size must be >= 3"),  # a model.json no command could load
    (["--vocab-size", "2"], "vocabulary size must be >= 3"),  # a model of no words
    (["--limit-lines", "-5"], "--limit-lines must be >= 0"),  # all lines but the last 5
    (["--sotu-words", "-1"], "--sotu-words must be >= 0"),  # silently no speeches
])
def test_pretrain_cli_refuses_settings_out_of_range_in_one_line(flags, message, tmp_path, capsys):
    from keyboard.cli import main

    threads = torch.get_num_threads()
    assert main(["pretrain", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedkb pretrain: error: ") and err.count("\n") == 1
    assert re.search(message, err) and not (tmp_path / "m").exists() and not (tmp_path / "w").exists()
    assert torch.get_num_threads() == threads
