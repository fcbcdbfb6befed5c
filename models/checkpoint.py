"""Checkpoints and deltas: safetensors for tensors + a small JSON for config/metadata.

Never pickle.  A checkpoint directory holds `model.safetensors` and `model.json`
(the format's names and `read_meta` live in models/modelfile.py, which reads them without torch):

    {"format": "fedkb-lm", "format_version": 1, "config": {...}, "vocab": {...},
     "tokenizer_sha256": "...", "meta": {...}}

Loading validates everything a corrupt or mismatched file could get wrong
(missing file, bad header, damaged data (a checksum, models/tensorfile.py), wrong
keys/shapes/dtypes, NaN, tokenizer mismatch) and raises `FedkbError` with a message
that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from models import atomic, tensorfile
from models.errors import FedkbError
from models.lm import START_STATE_KEYS, LMConfig, WordLM
# the format's names, read without torch there; default_paths is re-exported for callers of this module
from models.modelfile import FORMAT, FORMAT_VERSION, META, WEIGHTS, default_paths, read_meta  # noqa: F401
from models.params import Params, all_finite, check_compatible
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary



@dataclass
class Checkpoint:
    model: WordLM
    vocab: Vocabulary
    meta: dict


def save_tensors(path: Path, tensors: Params, meta: dict | None = None) -> None:
    """Atomically write tensors (contiguous float copies) as safetensors; `meta` goes in the header as
    strings, with the data's checksum (models/tensorfile.py)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = tensorfile.with_checksum(st_save(tensors, metadata={k: str(v) for k, v in (meta or {}).items()} or None))
    atomic.write_bytes(Path(path), data)


def load_tensors(path: Path, reference: Params | None = None) -> Params:
    """Read a safetensors file; with `reference`, require the same keys, shapes, dtypes, all finite.

    A model or delta saved before the start state existed lacks its two tensors; they load
    as zeros, which is what such a model started every message from (and a zero delta)."""
    path = Path(path)
    tensors = {k: torch.from_numpy(a) for k, a in tensorfile.read(path).items()}  # checked there
    if reference is not None:
        for key in START_STATE_KEYS:  # written before models/start_state.py: the old all-zero start
            if key in reference and key not in tensors:
                tensors[key] = torch.zeros_like(reference[key], device="cpu")
        why = check_compatible(tensors, reference)
        if why:
            raise FedkbError(f"{path} does not fit the model: {why}")
    if not all_finite(tensors):
        raise FedkbError(f"{path} contains NaN or infinite values")
    return tensors


def save_checkpoint(directory: Path, model: WordLM, vocab: Vocabulary, tokenizer: Tokenizer, meta: dict | None = None) -> None:
    """Weights first, then the JSON (each atomic): a reader never sees new JSON with old weights."""
    directory = Path(directory)
    save_tensors(directory / WEIGHTS, model.state_dict())
    atomic.write_json(directory / META, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_json(),
        "vocab": vocab.to_json(),
        "tokenizer_sha256": tokenizer.sha256,
        "meta": meta or {},
    })


def load_checkpoint(directory: Path, tokenizer: Tokenizer) -> Checkpoint:
    directory = Path(directory)
    obj = read_meta(directory)
    if obj.get("tokenizer_sha256") != tokenizer.sha256:
        raise FedkbError(f"model {directory} was trained with a different tokenizer than {tokenizer.path}")
    try:
        cfg = LMConfig.from_json(obj["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise FedkbError(f"{directory / META}: bad config ({e})") from None
    if cfg.num_pieces != tokenizer.num_pieces:
        raise FedkbError(f"model expects {cfg.num_pieces} pieces, tokenizer has {tokenizer.num_pieces}")
    vocab = Vocabulary.from_json(obj.get("vocab", {}))
    model = WordLM(cfg)
    state = load_tensors(directory / WEIGHTS, reference=model.state_dict())
    model.load_state_dict(state)
    model.eval()
    return Checkpoint(model, vocab, obj.get("meta", {}))


def load_model(model_dir: Path | None = None, tokenizer_path: Path | None = None) -> tuple[Checkpoint, Tokenizer]:
    """Load a checkpoint (default: the shipped base model) with its tokenizer."""
    base, tok = default_paths()
    tokenizer = Tokenizer(tokenizer_path or tok)
    return load_checkpoint(model_dir or base, tokenizer), tokenizer
