"""The start state (models/start_state.py): computed as documented, saved with the model,
used by every predictor, never moved by federated aggregation."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from federation.aggregate import Aggregator
from federation.config import AggregationConfig, PrivacyConfig
from keyboard.cli import main
from models.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from models.lm import START_STATE_KEYS, WordTable
from models.numpy_predictor import NumpyPredictor
from models.predictor import Predictor
from models.start_state import mean_start_state, set_start_state
from models.text import BOS
from models.tokenizer import Tokenizer
from models.train import encode
from tests.test_numpy_predictor import assert_same_scores_and_suggestions


def _stream(ckpt):
    from models.datasets import load_pretrain_lines
    from tests.conftest import FIXTURES

    return encode(load_pretrain_lines(FIXTURES / "pretrain.txt.gz")[:300], ckpt.vocab)


def test_mean_is_the_average_state_before_each_message_start(tiny_loaded):
    ckpt, tok = tiny_loaded
    model, stream = ckpt.model, _stream(ckpt)
    table = WordTable.build(ckpt.vocab, tok, model.cfg.base_vocab)
    h, c, n = mean_start_state(model, table, ckpt.vocab, stream, columns=1, warmup=0)
    # reference: one word at a time, the state carried, recorded before each <s> after the first word
    emb, _ = model.compose(table)
    bos, hs, cs, state = ckpt.vocab.id(BOS), [], [], None
    with torch.no_grad():
        for t in stream.tolist():
            if t == bos and state is not None:
                hs.append(state[0].view(-1))
                cs.append(state[1].view(-1))
            _, state = model.lstm(emb[t].view(1, 1, -1), state)
    assert n == len(hs) > 10
    assert torch.allclose(h, torch.stack(hs).mean(0), atol=1e-5)
    assert torch.allclose(c, torch.stack(cs).mean(0), atol=1e-5)
    assert h.abs().sum() > 0 and c.abs().sum() > 0
    # columns read in parallel and a warm-up skip only change which starts are averaged
    h64, c64, n64 = mean_start_state(model, table, ckpt.vocab, stream, columns=8, warmup=4)
    assert 0 < n64 < n
    assert mean_start_state(model, table, ckpt.vocab, stream[:3])[2] == 0  # nothing to average: zeros


def test_predictors_start_every_message_from_it(tiny, tiny_loaded, tmp_path):
    ckpt, tok = tiny_loaded
    zero = Predictor(ckpt.model, ckpt.vocab, tok).scores().clone()
    torch.manual_seed(0)
    h, c = torch.randn(ckpt.model.cfg.embed_dim), torch.randn(ckpt.model.cfg.hidden)
    set_start_state(ckpt.model, h, c)
    save_checkpoint(tmp_path / "m", ckpt.model, ckpt.vocab, tok)
    loaded = load_checkpoint(tmp_path / "m", tok).model
    assert torch.equal(loaded.start_h, h) and torch.equal(loaded.start_c, c)

    ref = Predictor(loaded, ckpt.vocab, tok)
    fast = NumpyPredictor.load(tmp_path / "m", tok)
    with torch.no_grad():  # by hand: <s> read from (h, c)
        emb, bias = loaded.compose(WordTable.build(ckpt.vocab, tok, loaded.cfg.base_vocab))
        out, _ = loaded.lstm(emb[ckpt.vocab.id(BOS)].view(1, 1, -1), (h.view(1, 1, -1), c.view(1, 1, -1)))
        want = torch.log_softmax(out.view(-1) @ emb.t() + bias, -1) + ref._mask
    finite = torch.isfinite(want)
    assert torch.allclose(ref.scores()[finite], want[finite], atol=1e-5)
    assert not torch.allclose(ref.scores()[finite], zero[finite], atol=1e-3)
    assert_same_scores_and_suggestions(ref, fast, [(), ("how", "are"), ("i",)])
    # a batched forward (fedkb eval, the federated evaluator) starts each row from it too
    ids = torch.tensor([[ckpt.vocab.id(BOS), ckpt.vocab.id("how")]] * 2)
    logits, _ = loaded(ids, emb, bias)
    assert torch.allclose(torch.log_softmax(logits[1, 0], -1)[finite], want[finite], atol=1e-5)


def test_files_saved_before_it_load_with_the_old_zero_start(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    shutil.copytree(tiny[0], tmp_path / "old")
    tensors = load_file(str(tmp_path / "old" / WEIGHTS))
    save_file({k: v for k, v in tensors.items() if k not in START_STATE_KEYS}, str(tmp_path / "old" / WEIGHTS))
    meta = json.loads((tmp_path / "old" / "model.json").read_text())
    del meta["weights_sha256"]  # nor did model.json record its weights' checksum then
    (tmp_path / "old" / "model.json").write_text(json.dumps(meta))
    model = load_checkpoint(tmp_path / "old", tok).model
    assert not model.start_h.any() and not model.start_c.any()
    assert not NumpyPredictor.load(tmp_path / "old", tok).w["start_c"].any()


def test_aggregation_never_moves_it():
    ref = {"w": torch.zeros(4), "start_h": torch.zeros(2), "start_c": torch.zeros(3)}
    dp = PrivacyConfig(clip=1.0, noise_multiplier=1.0, weight_cap_words=10)
    agg = Aggregator(ref, AggregationConfig(secure_aggregation=False), dp)
    agg.add(0, {"w": torch.full((4,), 0.1), "start_h": torch.ones(2), "start_c": torch.ones(3)}, 20)  # a tampered client
    mean, _ = agg.result({0}, torch.Generator().manual_seed(0))
    assert mean["w"].abs().sum() > 0  # noise and the update reach the weights
    assert not mean["start_h"].any() and not mean["start_c"].any()


def test_cli_sets_it_in_place_and_changes_nothing_else(tiny, tmp_path, capsys):
    shutil.copytree(tiny[0], tmp_path / "m")
    before = load_file(str(tmp_path / "m" / WEIGHTS))
    args = ["start-state", "--model", str(tmp_path / "m"), "--tokenizer", str(tiny[1]), "--words", "5000", "--json"]
    assert main(args) == 0
    assert '"message_starts"' in capsys.readouterr().out
    after = load_file(str(tmp_path / "m" / WEIGHTS))
    assert all(torch.equal(before[k], after[k]) for k in before if k not in START_STATE_KEYS)
    assert after["start_c"].abs().sum() > 0
    data = (tmp_path / "m" / WEIGHTS).read_bytes()
    assert main(args) == 0  # computed from the weights alone: a second run writes the same bytes
    assert (tmp_path / "m" / WEIGHTS).read_bytes() == data
    meta = load_checkpoint(tmp_path / "m", Tokenizer(tiny[1])).meta
    assert meta["start_state"]["words"] == 5000 and meta["kind"] == "base"
    assert main(args[:-3] + ["--words", "0"]) == 2
    assert "--words must be >= 1" in capsys.readouterr().err


def test_training_passes_start_from_it_too(tiny_loaded):
    # fine-tuning (a federated client, Learn now) starts each pass where the keyboard starts a message
    from models.train import TrainConfig, batchify, fit

    ckpt, tok = tiny_loaded
    model, stream = ckpt.model, _stream(ckpt)
    table = WordTable.build(ckpt.vocab, tok, model.cfg.base_vocab)
    cfg = TrainConfig(epochs=0.01, batch_size=4, bptt=8, lr=0.0, optimizer="sgd", dropout=False)
    torch.manual_seed(1)
    set_start_state(model, torch.randn(model.cfg.embed_dim), torch.randn(model.cfg.hidden))
    losses = fit(model, table, stream, cfg, torch.Generator().manual_seed(0))
    data = batchify(stream, 4)
    emb, bias = model.compose(table)
    with torch.no_grad():
        from_start, _ = model.loss(data[:, :8], data[:, 1:9], emb, bias, model.start_state(4))
        zeros = (torch.zeros(1, 4, model.cfg.embed_dim), torch.zeros(1, 4, model.cfg.hidden))
        from_zeros, _ = model.loss(data[:, :8], data[:, 1:9], emb, bias, zeros)
    assert losses[0] == pytest.approx(float(from_start), abs=1e-5)
    assert abs(float(from_start) - float(from_zeros)) > 1e-3
