"""models.checkpoint: bit-exact round trip; every way a checkpoint can be broken is a FedkbError.
models.train: a seeded fit is bit-for-bit reproducible."""

from __future__ import annotations

import json
import os
import re
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
    """Edit one tensor of the weights file, written as save_tensors would (checksum included) but
    unchecked: save_tensors itself refuses NaN."""
    from safetensors.torch import save

    from models import tensorfile

    t = load_tensors(d / "model.safetensors")
    t[key] = fn(t[key])
    (d / "model.safetensors").write_bytes(tensorfile.with_checksum(save(t)))


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


def _edit_json(d: Path, fn) -> None:
    obj = json.loads((d / "model.json").read_text())
    fn(obj)
    (d / "model.json").write_text(json.dumps(obj))


def _vocab(**changes):
    return lambda o: o["vocab"].update(changes)


JSON_BREAKERS = {  # model.json edits that loaded silently (wrong suggestions) or ended in a traceback
    "meta a list": (lambda o: o.update(meta=["x"]), r"meta is list"),  # AttributeError in fedkb predict/eval/keyboard
    "meta a string": (lambda o: o.update(meta="hello"), r"meta is str"),
    "a word that is a number": (lambda o: o["vocab"]["words"].append(5), r"vocab\.words\[\d+\] is 5, not a string"),
    "words cut short": (lambda o: o["vocab"].update(words=o["vocab"]["words"][:50]), r"vocab\.base_size is \d+, not .* to 50"),
    "words a string": (_vocab(words="<s><unk>abc"), r"vocab\.words is '<s><unk>abc', not a list"),
    "base_size negative": (_vocab(base_size=-5), r"vocab\.base_size is -5"),
    "base_size a string": (lambda o: o["vocab"].update(base_size=str(o["vocab"]["base_size"])), r"vocab\.base_size is '\d+'"),
    "base_size a float": (_vocab(base_size=9.5), r"vocab\.base_size is 9\.5"),
    "base_size a bool": (_vocab(base_size=True), r"vocab\.base_size is True"),
    "base_size missing": (lambda o: o["vocab"].pop("base_size"), r"vocab\.base_size is missing"),
    "version negative": (_vocab(version=-3), r"vocab\.version is -3"),
    "version a float": (_vocab(version=1.0), r"vocab\.version is 1\.0"),
    "vocab a list": (lambda o: o.update(vocab=[1, 2]), r"vocab is \[1, 2\], not an object"),
    "vocab missing": (lambda o: o.pop("vocab"), r"vocab is missing"),
    "two words in one": (lambda o: o["vocab"]["words"].append("hello world"), r"vocab\.words\[\d+\] is 'hello world', not a vocabulary word"),
    "an empty word": (lambda o: o["vocab"]["words"].append(""), r"vocab\.words\[\d+\] is '', not a vocabulary word"),
    "a symbol": (lambda o: o["vocab"]["words"].append("a$b"), r"'a\$b', not a vocabulary word"),
    "upper case": (lambda o: o["vocab"]["words"].append("Yeet"), r"'Yeet', not a vocabulary word"),
    "a special twice": (lambda o: o["vocab"]["words"].append("<s>"), r"'<s>', not a vocabulary word"),
    "a word too long": (lambda o: o["vocab"]["words"].append("x" * 5000), r"'xxx.*\.\.\., not a vocabulary word"),
    "a word twice": (lambda o: o["vocab"]["words"].append(o["vocab"]["words"][5]), r"vocab\.words holds '.+' twice"),
    "base_size past the residual rows": (lambda o: o["vocab"].update(words=o["vocab"]["words"] + ["zzqword"],
                                                                    base_size=o["config"]["base_vocab"] + 1),
                                         r"vocab\.base_size is \d+, more than config\.base_vocab"),
    "format_version true": (lambda o: o.update(format_version=True), r"format version True"),
}


@pytest.mark.parametrize("name", list(JSON_BREAKERS))
def test_model_json_fields_are_type_checked(tiny, tmp_path, name):
    """Each edit is refused in one line naming the file and the field, by both readers."""
    from models.modelfile import read_model

    edit, message = JSON_BREAKERS[name]
    d = _copy(tiny, tmp_path)
    _edit_json(d, edit)
    for load in (lambda: read_model(d, Tokenizer(tiny[1])), lambda: load_model(d, tiny[1])):
        with pytest.raises(FedkbError, match=re.escape(str(d / "model.json")) + ".*" + message) as e:
            load()
        assert "\n" not in str(e.value)


def test_model_json_without_meta_loads_with_empty_meta(tiny, tmp_path):
    from models.modelfile import read_model

    for edit in (lambda o: o.pop("meta"), lambda o: o.update(meta=None)):
        d = _copy(tiny, tmp_path)
        _edit_json(d, edit)
        assert read_model(d, Tokenizer(tiny[1])).meta == {} and load_model(d, tiny[1])[0].meta == {}
        shutil.rmtree(d)


def test_the_shipped_vocabulary_passes_the_checks():
    """The shipped artifact data/base; skipped where it is absent (no other test needs it)."""
    from models.modelfile import default_paths
    from models.vocab import Vocabulary

    path = default_paths()[0] / "model.json"
    if not path.is_file():
        pytest.skip(f"no shipped base model to check ({path} is absent)")
    obj = json.loads(path.read_text())
    v = Vocabulary.from_json(obj["vocab"], "model.json")
    assert v.base_size == obj["config"]["base_vocab"] == len(v)


def test_a_tensor_file_that_is_not_a_regular_file_is_refused_unread(tmp_path):
    """A link to /dev/zero was read until memory ran out (MemoryError); a directory, a pipe: refused before opening."""
    cases = {"dir.safetensors": lambda p: p.mkdir(), "pipe.safetensors": lambda p: os.mkfifo(p)}
    if Path("/dev/zero").exists():
        cases["zero.safetensors"] = lambda p: p.symlink_to("/dev/zero")
    for name, make in cases.items():
        make(tmp_path / name)
        with pytest.raises(FedkbError, match=f"{name} is not a valid safetensors file .*not a regular file"):
            load_tensors(tmp_path / name)


def test_a_tensor_file_is_refused_when_too_large_or_not_the_size_its_header_says(tmp_path, monkeypatch):
    from models import tensorfile

    save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(300)})
    blob = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "long.safetensors").write_bytes(blob + b"\0" * 64)
    (tmp_path / "short.safetensors").write_bytes(blob[:-64])
    with pytest.raises(FedkbError, match=rf"long.safetensors is not a valid safetensors file \(its header describes {len(blob)} bytes, the file holds {len(blob) + 64}: extra bytes\)"):
        load_tensors(tmp_path / "long.safetensors")
    with pytest.raises(FedkbError, match="short.safetensors .*header describes .*: cut short"):
        load_tensors(tmp_path / "short.safetensors")
    monkeypatch.setattr(tensorfile, "MAX_BYTES", len(blob) - 1)
    with pytest.raises(FedkbError, match=rf"t.safetensors is {len(blob):,} bytes, more than a fedkb tensor file can be \({len(blob) - 1:,}\): not read"):
        load_tensors(tmp_path / "t.safetensors")
    monkeypatch.setattr(tensorfile, "MAX_BYTES", len(blob))
    assert torch.equal(load_tensors(tmp_path / "t.safetensors")["a"], torch.ones(300))


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


def test_an_interrupted_save_leaves_the_old_pair(tiny_loaded, tmp_path, monkeypatch):
    """Weights were replaced before the JSON was written: cut short between the two, the folder
    held new weights under the old vocabulary, and loaded without a word."""
    from models import atomic

    ckpt, tok = tiny_loaded
    d = tmp_path / "c"
    save_checkpoint(d, ckpt.model, ckpt.vocab, tok, meta={"round": 1})
    before = {f: (d / f).read_bytes() for f in ("model.safetensors", "model.json")}
    real = atomic._temporary

    def ctrl_c_at_the_json(path, data, mode):
        if path.name == "model.json":
            raise KeyboardInterrupt
        return real(path, data, mode)

    monkeypatch.setattr(atomic, "_temporary", ctrl_c_at_the_json)
    with torch.no_grad():
        ckpt.model.residual.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, ckpt.model, ckpt.vocab.add(["newword"]), tok, meta={"round": 2})
    assert {f: (d / f).read_bytes() for f in before} == before and sorted(p.name for p in d.iterdir()) == sorted(before)


def test_a_kill_between_the_two_renames_is_refused_on_loading(tiny_loaded, tmp_path, killed_renames):
    """The weights were renamed into place and the JSON not (a kill in that window): the folder
    held the new weights under the old model.json and loaded as one model.  model.json now
    records its weights' checksum, and both readers refuse the pair; a folder saved before that
    record existed (the shipped base model) loads as before."""
    from models.modelfile import read_model

    ckpt, tok = tiny_loaded
    d = tmp_path / "c"
    save_checkpoint(d, ckpt.model, ckpt.vocab, tok, meta={"round": 1})
    killed_renames.arm()
    with torch.no_grad():
        ckpt.model.residual.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, ckpt.model, ckpt.vocab, tok, meta={"round": 2})
    killed_renames.disarm()
    assert [Path(r).name for r in killed_renames.renamed] == ["model.safetensors"]
    for load in (lambda: read_model(d, tok), lambda: load_checkpoint(d, tok)):
        with pytest.raises(FedkbError, match=r"model.safetensors is not the weights its model.json was saved with"):
            load()
    _edit_json(d, lambda o: o.pop("weights_sha256"))  # as written before the record: no pair to check
    assert load_checkpoint(d, tok).meta == {"round": 1}
    _edit_json(d, lambda o: o.update(weights_sha256=5))
    with pytest.raises(FedkbError, match=r"model.json: weights_sha256 is 5, not a checksum"):
        read_model(d, tok)


def test_write_files_makes_its_renames_durable(tmp_path, monkeypatch):
    """A rename is on disk only once its folder is fsynced: each folder written to is."""
    from models import atomic

    synced, real = [], os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    (tmp_path / "a").mkdir()
    atomic.write_files({tmp_path / "a" / "x": b"1", tmp_path / "a" / "y": b"2", tmp_path / "b" / "z": b"3"})
    assert synced[-2:] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_save_tensors_refuses_what_every_reader_would_refuse(tmp_path):
    """NaN was written without complaint; only the next read said the file was broken."""
    save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(3)})
    before = (tmp_path / "t.safetensors").read_bytes()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FedkbError, match=r"not writing .*t.safetensors: it would hold NaN or infinite values"):
            save_tensors(tmp_path / "t.safetensors", {"a": torch.tensor([1.0, bad])})
    assert (tmp_path / "t.safetensors").read_bytes() == before
