"""The torch-free predictor (used by `fedkb predict`) gives the Predictor's suggestions."""

import numpy as np
import pytest

from models.errors import FedkbError
from models.numpy_predictor import NumpyPredictor
from models.predictor import Predictor
from models.tokenizer import Tokenizer

CONTEXTS = [("how", "are", "you"), ("i",), ("<s>", "what"), ("the", "zzqx")]


def assert_same_scores_and_suggestions(ref, fast, contexts=CONTEXTS):
    """The torch Predictor `ref` and the NumpyPredictor `fast` agree after each context."""
    for words in contexts:
        ref.reset()
        fast.reset()
        for w in words:
            ref.commit(w)
            fast.commit(w)
        a, b = ref.scores().numpy(), fast.scores()
        finite = np.isfinite(a)
        assert np.array_equal(finite, np.isfinite(b))
        assert np.allclose(a[finite], b[finite], atol=1e-4)
        for prefix in ("", "t", "th", "a", "qqq"):
            assert fast.suggest(prefix) == ref.suggest(prefix)


def test_same_scores_and_suggestions(tiny, tiny_loaded):
    ckpt, tok = tiny_loaded
    assert_same_scores_and_suggestions(Predictor(ckpt.model, ckpt.vocab, tok), NumpyPredictor(tiny[0], Tokenizer(tiny[1])))


def test_bad_files_are_clear_errors(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    with pytest.raises(FedkbError, match="no model"):
        NumpyPredictor(tmp_path, tok)
    (tmp_path / "model.json").write_text((tiny[0] / "model.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FedkbError, match="not a valid safetensors"):
        NumpyPredictor(tmp_path, tok)
    blob = bytearray((tiny[0] / "model.safetensors").read_bytes())
    blob[-5] ^= 0x01  # one bit of the last tensor: safetensors alone would load it
    (tmp_path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(FedkbError, match="damaged"):
        NumpyPredictor(tmp_path, tok)
