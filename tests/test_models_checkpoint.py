"""models.checkpoint: bit-exact round trip; every way a checkpoint can be broken is a FedkbError.
models.train: a seeded fit is bit-for-bit reproducible."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, load_model, load_tensors, save_checkpoint, save_tensors
from models.errors import FedkbError
from models.lm import LMConfig, WordLM, WordTable
from models.text import sentence_tokens
from models.tokenizer import Tokenizer
from models.train import TrainConfig, encode, fit
from models.vocab import build_vocab

REPO = Path(__file__).resolve().parent.parent


def test_round_trip_is_bit_exact(tiny_loaded, tmp_path):
    ckpt, tok = tiny_loaded
    v1 = ckpt.vocab.add(["newword"])
    save_checkpoint(tmp_path / "c", ckpt.model, v1, tok, meta={"round": 3})
    back = load_checkpoint(tmp_path / "c", tok)
    a, b = ckpt.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert back.vocab == v1 and back.vocab.version == 1 and back.meta == {"round": 3}
    assert back.model.cfg == ckpt.model.cfg


def _copy(tiny, tmp_path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(tiny[0], d)
    return d


def _set_tensor(d: Path, key: str, fn) -> None:
    t = load_tensors(d / "model.safetensors")
    t[key] = fn(t[key])
    save_tensors(d / "model.safetensors", t)


def _flip_data_byte(path: Path, at: float = 0.5) -> None:
    """Flip one bit in the data section (past the header), as a bad disk or a partial copy would."""
    blob = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little")
    blob[start + int((len(blob) - start) * at)] ^= 0x10
    path.write_bytes(bytes(blob))


def _edit_config(d: Path, **changes) -> None:
    meta = json.loads((d / "model.json").read_text())
    meta["config"].update(changes)
    (d / "model.json").write_text(json.dumps(meta))


BREAKERS = {
    "missing dir": (lambda d: shutil.rmtree(d), "no model"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "does not exist"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]), "not a valid"),
    "garbage weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "not a valid"),
    "garbage json": (lambda d: (d / "model.json").write_text("{{{"), "corrupt"),
    "not a fedkb model": (lambda d: (d / "model.json").write_text("[1, 2]"), "not a fedkb model"),
    "newer format": (lambda d: (d / "model.json").write_text(json.dumps({**json.loads((d / "model.json").read_text()), "format_version": 99})), "format version"),
    "bad vocab": (lambda d: (d / "model.json").write_text(json.dumps({**json.loads((d / "model.json").read_text()), "vocab": {"words": ["x"]}})), "vocabulary"),
    "sizes edited": (lambda d: _edit_config(d, hidden=0), "bad config.*hidden=0"),  # a torch error inside WordLM before
    "a size as a string": (lambda d: _edit_config(d, embed_dim="16"), "bad config.*embed_dim='16'"),
    "one bit of the weights flipped": (lambda d: _flip_data_byte(d / "model.safetensors"), "damaged"),
    "NaN": (lambda d: _set_tensor(d, "piece_bias", lambda t: t.clone().fill_(float("nan"))), "NaN"),
    "wrong shape": (lambda d: _set_tensor(d, "piece_bias", lambda t: t[:-1].clone()), "shape"),
    "wrong dtype": (lambda d: _set_tensor(d, "piece_bias", lambda t: t.double()), "dtype"),
    "missing key": (lambda d: save_tensors(d / "model.safetensors", {k: v for k, v in load_tensors(d / "model.safetensors").items() if k != "residual"}), "keys differ"),
}


@pytest.mark.parametrize("name", list(BREAKERS))
def test_broken_checkpoint_is_a_fedkb_error(tiny, tmp_path, name):
    breakit, message = BREAKERS[name]
    d = _copy(tiny, tmp_path)
    breakit(d)
    with pytest.raises(FedkbError, match=message):
        load_model(d, tiny[1])


def test_tensor_files_carry_a_checksum_and_older_files_without_one_still_load(tmp_path):
    from safetensors.torch import save

    from models import tensorfile

    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    save_tensors(tmp_path / "new.safetensors", t, meta={"note": "x"})
    blob = (tmp_path / "new.safetensors").read_bytes()
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    assert header["__metadata__"]["note"] == "x" and len(header["__metadata__"][tensorfile.CHECKSUM]) == 64
    back = load_tensors(tmp_path / "new.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)
    for at in (0.0, 0.99):  # the first and the last tensor's bytes
        (tmp_path / "bad.safetensors").write_bytes(blob)
        _flip_data_byte(tmp_path / "bad.safetensors", at)
        with pytest.raises(FedkbError, match="bad.safetensors is damaged"):
            load_tensors(tmp_path / "bad.safetensors")
    (tmp_path / "old.safetensors").write_bytes(save(t))  # as written before the checksum: no metadata
    assert all(torch.equal(load_tensors(tmp_path / "old.safetensors")[k], t[k]) for k in t)


def test_tokenizer_mismatch_and_broken_tokenizer(tiny, tmp_path):
    with pytest.raises(FedkbError, match="different tokenizer"):
        load_model(tiny[0], REPO / "data" / "tokenizer.model")
    (tmp_path / "t.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(FedkbError, match="corrupt"):
        Tokenizer(tmp_path / "t.model")
    with pytest.raises(FedkbError, match="cannot read"):
        Tokenizer(tmp_path / "none.model")


def test_seeded_fit_is_bit_for_bit_reproducible(tiny):
    tok = Tokenizer(tiny[1])
    lines = ["hello how are you", "i am fine thanks", "how are you doing today", "fine thanks and you"] * 5
    vocab = build_vocab((sentence_tokens(l) for l in lines), 50, min_count=1)
    cfg = LMConfig(num_pieces=tok.num_pieces, base_vocab=50, embed_dim=8, hidden=12)

    def run(seed: int, sampled: int = 0):
        model = WordLM(cfg)
        gen = torch.Generator().manual_seed(seed)
        model.reset_parameters(gen)
        losses = fit(model, WordTable.build(vocab, tok, 50), encode(lines, vocab),
                     TrainConfig(epochs=2, batch_size=4, bptt=4, lr=1e-2, sampled_softmax=sampled), gen)
        return losses, model.state_dict()

    (l1, s1), (l2, s2), (l3, _) = run(0), run(0), run(1)
    assert l1 == l2 and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert l1 != l3
    (m1, t1), (m2, t2) = run(0, sampled=5), run(0, sampled=5)
    assert m1 == m2 and all(torch.equal(t1[k], t2[k]) for k in t1)
