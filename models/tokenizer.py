"""Sentencepiece word pieces: how a word is spelled for the model.

Each vocabulary word is composed from its pieces (see `models/lm.py`), so any
string that is a word — a new slang term, a name, another script — has an
embedding the moment it is added.  `byte_fallback` guarantees every character
can be encoded.  Kudo & Richardson 2018, "SentencePiece: A simple and language
independent subword tokenizer and detokenizer for Neural Text Processing".
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import sentencepiece as spm

from models import atomic
from models.errors import FedkbError
from models.text import BOS, UNK, words


def train_tokenizer(lines: list[str], model_path: Path, vocab_size: int = 4000) -> None:
    """Train a unigram sentencepiece model on the lower-cased words of `lines`, written atomically.

    The input is the word list with counts (one "sentence" per distinct word,
    repeated by frequency up to a cap) so the result depends only on the
    words, not on line order; training is single-threaded and unshuffled, hence
    deterministic without a seed.
    """
    counts = Counter(w for line in lines for w in words(line))
    sentences = []
    for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        sentences.extend([w] * min(c, 50))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    atomic.write_bytes(Path(model_path), buf.getvalue())


class Tokenizer:
    """Maps a word to its piece ids (cached). BOS and UNK map to sentencepiece's own control pieces."""

    def __init__(self, model_path: Path):
        model_path = Path(model_path)
        try:
            data = model_path.read_bytes()
        except OSError as e:
            raise FedkbError(f"cannot read tokenizer {model_path}: {e.strerror}; run `fedkb prepare`") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(data)
        except Exception:
            raise FedkbError(f"tokenizer {model_path} is corrupt; run `fedkb prepare`") from None
        self.path = model_path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.num_pieces = self.sp.get_piece_size()
        self._cache: dict[str, tuple[int, ...]] = {BOS: (self.sp.bos_id(),), UNK: (self.sp.unk_id(),)}

    def pieces(self, word: str) -> tuple[int, ...]:
        """Piece ids of one word (never empty)."""
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self.sp.encode(word)) or (self.sp.unk_id(),)
            self._cache[word] = ids
        return ids

    def piece_strings(self, word: str) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.pieces(word)]
