"""models.lm / models.predictor: the vocabulary grows without changing any parameter shape,
a new word is predictable at once, and the incremental keyboard path equals the batched forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.lm import WordTable
from models.predictor import Predictor
from models.text import BOS, sentence_tokens, split_partial


def test_adding_words_changes_no_parameter_shape(tiny_loaded):
    ckpt, tok = tiny_loaded
    shapes = {k: v.shape for k, v in ckpt.model.state_dict().items()}
    v1 = ckpt.vocab.add(["zorbleflip", "helloooo"])
    t0 = WordTable.build(ckpt.vocab, tok, ckpt.model.cfg.base_vocab)
    t1 = WordTable.build(v1, tok, ckpt.model.cfg.base_vocab)
    e0, b0 = ckpt.model.compose(t0)
    e1, b1 = ckpt.model.compose(t1)
    assert {k: v.shape for k, v in ckpt.model.state_dict().items()} == shapes
    assert e1.shape == (len(ckpt.vocab) + 2, ckpt.model.cfg.embed_dim) and b1.shape == (len(ckpt.vocab) + 2,)
    assert torch.equal(e1[: len(ckpt.vocab)], e0) and torch.equal(b1[: len(ckpt.vocab)], b0)  # old words unchanged
    # a new word's embedding is the mean of its pieces' embeddings (no residual row)
    pieces = torch.tensor(tok.pieces("zorbleflip"))
    assert torch.allclose(e1[len(ckpt.vocab)], ckpt.model.piece_emb[pieces].mean(0))


def test_a_new_word_is_predictable_immediately(tiny_loaded):
    ckpt, tok = tiny_loaded
    pred = Predictor(ckpt.model, ckpt.vocab, tok)
    assert "zorbleflip" not in pred and pred.suggest("zorb") == []
    pred.set_context("hello how are ")
    pred.add_personal_words(["zorbleflip"])
    i = pred.vocab.index["zorbleflip"]
    assert torch.isfinite(pred.scores()[i])
    assert pred.suggest("zorb") == ["zorbleflip"]  # a completion at once, context kept
    assert pred.suggest("z", k=len(pred.vocab)).count("zorbleflip") == 1
    # ranked by the model, not last: it beats some known word for this context
    assert (pred.scores()[2:] < pred.scores()[i]).any()


def test_blocked_words_are_never_suggested(tiny_loaded):
    ckpt, tok = tiny_loaded
    pred = Predictor(ckpt.model, ckpt.vocab, tok)
    top = pred.suggest()[0]
    pred.block(top.upper())
    assert top not in pred.suggest(k=len(pred.vocab)) and top not in pred.suggest(top[:1], k=len(pred.vocab))


def test_incremental_state_equals_batched_forward(tiny_loaded):
    ckpt, tok = tiny_loaded
    pred = Predictor(ckpt.model, ckpt.vocab, tok)
    toks = sentence_tokens("how are you? i am fine thanks zzqx")
    ids = torch.tensor([[ckpt.vocab.id(t) for t in toks]])
    with torch.no_grad():
        logits, _ = ckpt.model(ids, pred._emb, pred._bias)
    full = F.log_softmax(logits[0], dim=-1)  # (T, V)
    pred.reset()
    assert torch.allclose(pred._logp, full[0], atol=1e-5)
    for t, w in enumerate(toks[1:], start=1):
        pred.commit(w)
        assert torch.allclose(pred._logp, full[t], atol=1e-5), w
    # set_context rebuilds the same state from text
    partial = pred.set_context("How are you? I am fine thanks zzqx ")
    assert partial == "" and torch.allclose(pred._logp, full[-1], atol=1e-5)


def test_split_partial():
    assert split_partial("") == ("", "")
    assert split_partial("how are y") == ("how are ", "y")
    assert split_partial("how are ") == ("how are", "")
    assert split_partial("Hello.") == ("Hello.", "")
    assert split_partial("i DON'") == ("i ", "don'")
    assert split_partial("😀") == ("😀", "")


def test_split_partial_reads_a_curly_apostrophe_as_the_words_do():
    # the word-end test ran before normalization: "q’" gave next-word suggestions, not "q'z"
    assert split_partial("i don\u2019") == ("i ", "don'")
    assert split_partial("q\u2018") == ("", "q'")
    assert split_partial("q\uff07") == ("", "q'")  # full-width apostrophe (NFKC)
    assert split_partial("q\u2019 ") == ("q'", "")


def test_suggestions_after_a_sentence_end_start_from_bos(tiny_loaded):
    ckpt, tok = tiny_loaded
    pred = Predictor(ckpt.model, ckpt.vocab, tok)
    assert pred.suggest_for("") == pred.suggest_for("!!! ") == pred.suggest_for("  ")
    pred.reset()
    first = pred.suggest()
    pred.commit(BOS)  # a second BOS in a row is a no-op
    assert pred.suggest() == first


def test_a_residual_table_too_large_to_allocate_is_refused():
    """--vocab-size 1000000000 asked torch for 384 GB and ended in its allocation error."""
    from models.lm import MAX_BASE_VOCAB, LMConfig

    assert LMConfig(base_vocab=MAX_BASE_VOCAB).base_vocab == MAX_BASE_VOCAB
    with pytest.raises(ValueError, match="base_vocab must be at most 1,000,000 words"):
        LMConfig(base_vocab=MAX_BASE_VOCAB + 1)
