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
    assert_same_scores_and_suggestions(Predictor(ckpt.model, ckpt.vocab, tok), NumpyPredictor.load(tiny[0], Tokenizer(tiny[1])))


def test_bad_files_are_clear_errors(tiny, tmp_path):
    tok = Tokenizer(tiny[1])
    with pytest.raises(FedkbError, match="no model"):
        NumpyPredictor.load(tmp_path, tok)
    (tmp_path / "model.json").write_text((tiny[0] / "model.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FedkbError, match="not a valid safetensors"):
        NumpyPredictor.load(tmp_path, tok)
    blob = bytearray((tiny[0] / "model.safetensors").read_bytes())
    blob[-5] ^= 0x01  # one bit of the last tensor: safetensors alone would load it
    (tmp_path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(FedkbError, match="damaged"):
        NumpyPredictor.load(tmp_path, tok)


def test_device_features_match_the_torch_predictor(tiny, tiny_loaded):
    """What the keyboard does to its predictor (personal words, blocked words, personal weights,
    a context from text) gives the torch Predictor's suggestions and scores."""
    import torch

    ckpt, tok = tiny_loaded
    fast = NumpyPredictor.load(tiny[0], Tokenizer(tiny[1]))
    personal = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
                for k, v in ckpt.model.state_dict().items()}
    ckpt.model.load_state_dict(personal)
    ref = Predictor(ckpt.model, ckpt.vocab, tok)
    fast.set_weights({k: v.numpy() for k, v in personal.items()})
    for p in (ref, fast):
        p.add_personal_words(["zorblax", "quokkaword"])
        p.block("the")
    assert "zorblax" in fast and "quokkaword" in fast.vocab and fast.base_vocab == ckpt.vocab
    assert_same_scores_and_suggestions(ref, fast, CONTEXTS + [("i", "met", "zorblax")])
    for text in ("how are y", "i met zorb", "hello. ", "zorblax and the"):
        assert fast.suggest_for(text) == ref.suggest_for(text)
    assert "the" not in fast.suggest("th", k=50)


def test_new_weights_keep_the_context(tiny):
    """set_weights feeds the words typed so far again: the same scores as committing them anew."""
    tok = Tokenizer(tiny[1])
    a, b = NumpyPredictor.load(tiny[0], tok), NumpyPredictor.load(tiny[0], tok)
    scaled = {k: v * 0.9 for k, v in a.w.items()}
    for w in ("how", "are"):
        a.commit(w)
    a.set_weights(scaled)
    b.set_weights(scaled)
    for w in ("how", "are"):
        b.commit(w)
    assert np.array_equal(a.scores(), b.scores())


def test_kept_and_extended_tables_equal_fresh_ones(tiny):
    """The word table's layout and the alphabetical order are kept across new weights and extended
    when personal words are typed one by one: the same tables, order and suggestions as a predictor
    built from scratch with those words."""
    tok = Tokenizer(tiny[1])
    a = NumpyPredictor.load(tiny[0], tok)
    a.set_weights({k: v * 0.9 for k, v in a.w.items()})  # the same words: both kept
    for w in ("zorblax", "aardvarkish", "mmmkay", "zzz"):  # appended: both extended
        a.add_personal_words([w])
    b = NumpyPredictor(a.w, a.base_vocab, tok, personal_words=["zorblax", "aardvarkish", "mmmkay", "zzz"])
    assert a.vocab.words == b.vocab.words and a._sorted == b._sorted == sorted(b.vocab.words)
    assert np.array_equal(a._sorted_idx, b._sorted_idx)
    assert np.array_equal(a.emb, b.emb) and np.array_equal(a.bias, b.bias)
    for prefix in ("", "a", "aa", "mm", "z", "zo"):
        assert a.suggest(prefix) == b.suggest(prefix)
    c = NumpyPredictor(a.w, a.base_vocab, tok)  # words removed (a device cleared): built anew
    c.set_vocab(a.vocab)
    c.set_vocab(a.base_vocab)
    assert c._sorted == sorted(a.base_vocab.words) and len(c.emb) == len(a.base_vocab)


def test_modelfile_shapes_are_the_models(tiny_loaded):
    """models/modelfile.py's shape table (what the torch-free reader checks) is WordLM's state dict."""
    from models.modelfile import shapes

    ckpt, _ = tiny_loaded
    assert shapes(ckpt.model.cfg.to_json()) == {k: tuple(v.shape) for k, v in ckpt.model.state_dict().items()}


def test_bad_weights_are_refused_without_torch(tiny, tmp_path):
    """The torch-free reader refuses what load_checkpoint refuses: another shape, NaN, a bad config."""
    import json

    from safetensors.numpy import load_file, save_file

    from models.modelfile import read_model

    tok = Tokenizer(tiny[1])
    meta = json.loads((tiny[0] / "model.json").read_text())
    weights = load_file(str(tiny[0] / "model.safetensors"))
    cases = {
        "shape": ({**weights, "residual": weights["residual"][:-1]}, meta, "residual has shape"),
        "nan": ({**weights, "word_bias": np.full_like(weights["word_bias"], np.nan)}, meta, "NaN"),
        "extra": ({**weights, "surprise": np.zeros(3, np.float32)}, meta, "unexpected"),
        "config": (weights, {**meta, "config": {**meta["config"], "hidden": 0}}, "bad config"),
    }
    for name, (w, m, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        save_file(w, str(d / "model.safetensors"))
        (d / "model.json").write_text(json.dumps(m))
        with pytest.raises(FedkbError, match=message):
            read_model(d, tok)
    import torch
    from safetensors.torch import save_file as save_torch

    from models.modelfile import read_arrays

    save_torch({"a": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "bf16.safetensors"))  # no NumPy dtype
    with pytest.raises(FedkbError, match="holds a dtype NumPy cannot read"):
        read_arrays(tmp_path / "bf16.safetensors", reference={"a": (3,)})


def test_tables_made_ready_elsewhere_are_what_set_weights_builds(tiny, monkeypatch):
    """`tables` (run in a worker thread while typing goes on) leaves the predictor as it was; swapping
    them in gives what set_weights(arrays) gives, also where a personal word was typed in between
    (its row alone composed on the swap)."""
    tok = Tokenizer(tiny[1])
    a, b = NumpyPredictor.load(tiny[0], tok), NumpyPredictor.load(tiny[0], tok)
    for p in (a, b):
        p.commit("how")
    before = a.scores().copy()
    scaled = {k: v * 0.9 for k, v in a.w.items()}
    ready = a.tables(scaled, a.vocab)
    assert np.array_equal(a.scores(), before) and a.w is not ready.w  # nothing changed yet
    for p in (a, b):
        p.add_personal_words(["zorblax"])
    import models.numpy_predictor as numpy_predictor

    composed = []
    row_sums = numpy_predictor._row_sums
    monkeypatch.setattr(numpy_predictor, "_row_sums", lambda *args: composed.append(len(args[3])) or row_sums(*args))
    a.set_weights(ready)
    assert composed == [1, 1]  # the personal word's embedding and bias rows only
    b.set_weights(scaled)
    assert a.vocab.words == b.vocab.words and a.w is ready.w
    assert np.array_equal(a.emb, b.emb) and np.array_equal(a.bias, b.bias)
    assert np.array_equal(a.scores(), b.scores()) and a.suggest("z") == b.suggest("z")


def test_the_cell_is_the_textbook_lstm_bit_for_bit(tiny):
    """The in-place cell gives the bits of the projected LSTM written out plainly (PyTorch's gate order)."""
    tok = Tokenizer(tiny[1])
    p = NumpyPredictor.load(tiny[0], tok)
    w = p.w
    sigmoid = lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))  # noqa: E731
    h, c = w["start_h"].copy(), w["start_c"].copy()
    p._start()
    for word in ("<s>", "how", "are", "you", "zzqx", "the"):
        x = p.emb[p.vocab.id(word)]
        gates = w["lstm.weight_ih_l0"] @ x + w["lstm.bias_ih_l0"] + w["lstm.weight_hh_l0"] @ h + w["lstm.bias_hh_l0"]
        i, f, g, o = np.split(gates, 4)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = w["lstm.weight_hr_l0"] @ (sigmoid(o) * np.tanh(c))
        p._cell(p.vocab.id(word))
        assert np.array_equal(p._h, h) and np.array_equal(p._c, c)


def test_equal_scores_rank_alike_in_both_predictors(tiny, tiny_loaded):
    """Equal scores go to the lower position in both predictors (the word id; within a prefix, the
    alphabetical order), so `fedkb eval` (torch) and the keyboard (NumPy) rank a tie alike: torch.topk
    orders equal scores as it likes.  Three words tie exactly: zero rows and one large bias."""
    import torch

    from models.evaluate import simulate_typing

    ckpt, tok = tiny_loaded
    ref, fast = Predictor(ckpt.model, ckpt.vocab, tok), NumpyPredictor.load(tiny[0], Tokenizer(tiny[1]))
    tied = ["the", "to", "that"]  # ids ascending, not alphabetical
    ids = [ref.vocab.index[w] for w in tied]
    assert ids == sorted(ids) and sorted(tied) != tied
    ref._emb, ref._bias, fast.emb, fast.bias = ref._emb.clone(), ref._bias.clone(), fast.emb.copy(), fast.bias.copy()
    ref._emb[ids], ref._bias[ids], fast.emb[ids], fast.bias[ids] = 0.0, 20.0, 0.0, 20.0
    for p in (ref, fast):
        p.reset()
        p.commit("how")
    assert ref.suggest("") == fast.suggest("") == tied  # by word id
    assert ref.suggest("t") == fast.suggest("t") == sorted(tied)  # by the position in the prefix's range
    message = [ref.vocab.id(w) for w in ("<s>", "how", "are", "you", "the")]
    assert ref.message_scores(message, 3)[1] == fast.message_scores(message, 3)[1] == [ids] * 4
    texts = ["how are you today", "the cat and the dog", "i think that you are right"]
    assert simulate_typing(ref, texts) == simulate_typing(fast, texts)
    scores = torch.full((50,), -1.0)
    scores[[7, 3, 40, 12]] = torch.tensor([2.0, 0.0, 0.0, 0.0])  # three tie for the last two places
    assert ref._top(scores, 3) == ([7, 3, 12], [2.0, 0.0, 0.0])
    assert ref._top(scores, 3, torch.arange(100, 150)) == ([107, 103, 112], [2.0, 0.0, 0.0])
    assert fast._top(scores.numpy(), 3) == ([7, 3, 12], [2.0, 0.0, 0.0])  # argpartition picked any two of the three
    assert fast._top(np.zeros(800, np.float32), 3)[0] == ref._top(torch.zeros(800), 3)[0] == [0, 1, 2]
