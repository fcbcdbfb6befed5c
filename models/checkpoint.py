"""Checkpoints and deltas: safetensors for tensors + a small JSON for config/metadata.

Never pickle.  A checkpoint directory holds `model.safetensors` and `model.json` (the format's
names and its reader, `read_model`, live in models/modelfile.py, which works without torch):

    {"format": "fedkb-lm", "format_version": 1, "config": {...}, "vocab": {...},
     "tokenizer_sha256": "...", "weights_sha256": "...", "meta": {...}}

Loading (there) validates everything a corrupt or mismatched file could get wrong
(missing file, bad header, damaged data (a checksum, models/tensorfile.py), wrong
keys/shapes/dtypes, NaN, tokenizer mismatch) and raises `FedkbError` with a message
that says what to do; `load_tensors` does the same for any other tensor file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from models import atomic, params, tensorfile
from models.errors import FedkbError
from models.lm import LMConfig, WordLM
# the format and its reader live there, torch-free; default_paths is re-exported for callers of this module
from models.modelfile import (FORMAT, FORMAT_VERSION, META, WEIGHTS, WEIGHTS_SHA256, default_paths,  # noqa: F401
                              read_arrays, read_model)
from models.params import Params
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary



@dataclass
class Checkpoint:
    model: WordLM
    vocab: Vocabulary
    meta: dict


def save_tensors(path: Path, tensors: Params, meta: dict | None = None, mode: int = 0o666) -> None:
    """Atomically write tensors (contiguous float copies) as safetensors; `meta` goes in the header as
    strings, with the data's checksum (models/tensorfile.py); a new file gets `mode` less the umask
    (atomic.PRIVATE for a device's personal delta).  NaN or infinite values are refused (FedkbError),
    as every reader would refuse the file."""
    atomic.write_bytes(Path(path), _tensor_bytes(path, tensors, meta), mode)


def _tensor_bytes(path: Path, tensors: Params, meta: dict | None) -> bytes:
    """What `save_tensors` writes at `path`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if not params.all_finite(tensors):
        raise FedkbError(f"not writing {path}: it would hold NaN or infinite values")
    return tensorfile.with_checksum(st_save(tensors, metadata={k: str(v) for k, v in (meta or {}).items()} or None))


def load_tensors(path: Path, reference: Params | None = None) -> Params:
    """Read a safetensors file, all finite; with `reference` (a float32 state dict), require its
    keys and shapes, in float32.  models.modelfile.read_arrays does the reading and the checks.

    A model or delta saved before the start state existed lacks its two tensors; they load
    as zeros, which is what such a model started every message from (and a zero delta)."""
    shapes = {k: tuple(v.shape) for k, v in reference.items()} if reference is not None else None
    return {k: torch.from_numpy(a) for k, a in read_arrays(path, reference=shapes).items()}


def save_checkpoint(directory: Path, model: WordLM, vocab: Vocabulary, tokenizer: Tokenizer, meta: dict | None = None) -> None:
    """Write the weights and the JSON together (atomic.write_files: both temporary files first, then
    the two renames), so an error while writing leaves the folder's old pair, not new weights under
    the old vocabulary.  model.json records the weights' checksum, so a kill between the two renames
    (new weights, old JSON) is refused on loading instead of read as one model."""
    directory = Path(directory)
    weights = _tensor_bytes(directory / WEIGHTS, model.state_dict(), None)
    atomic.write_files({
        directory / WEIGHTS: weights,
        directory / META: atomic.json_bytes({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.cfg.to_json(),
            "vocab": vocab.to_json(),
            "tokenizer_sha256": tokenizer.sha256,
            WEIGHTS_SHA256: tensorfile.checksum(weights),
            "meta": meta or {},
        }),
    })


def load_checkpoint(directory: Path, tokenizer: Tokenizer) -> Checkpoint:
    """The torch model of a checkpoint folder, read and checked by models.modelfile.read_model."""
    f = read_model(directory, tokenizer)
    try:
        cfg = LMConfig.from_json(f.config)
    except (TypeError, ValueError) as e:  # the sizes are checked already; the dropout is not
        raise FedkbError(f"{Path(directory) / META}: bad config ({e})") from None
    model = WordLM(cfg)
    model.load_state_dict({k: torch.from_numpy(a) for k, a in f.weights.items()})
    model.eval()
    return Checkpoint(model, f.vocab, f.meta)


def load_model(model_dir: Path | None = None, tokenizer_path: Path | None = None) -> tuple[Checkpoint, Tokenizer]:
    """Load a checkpoint (default: the shipped base model) with its tokenizer."""
    if model_dir is None or tokenizer_path is None:
        base, tok = default_paths()
        model_dir, tokenizer_path = model_dir or base, tokenizer_path or tok
    tokenizer = Tokenizer(tokenizer_path)
    return load_checkpoint(model_dir, tokenizer), tokenizer
