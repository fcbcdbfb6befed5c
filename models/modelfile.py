"""Checkpoint folders and deltas read as NumPy arrays, without PyTorch: the inference side.

`import torch` alone takes ~1.5-2 s here.  A phone's keyboard runs a small inference runtime
and loads the training framework only to learn (Gboard: TensorFlow Lite for typing, TensorFlow
for on-device training; Hard et al. 2018, "Federated Learning for Mobile Keyboard
Prediction"); fedkb's typing paths (`fedkb predict`, the keyboard's suggestions) read models
here and predict with models/numpy_predictor.py, and torch is imported only by what trains.

The files are the ones models/checkpoint.py writes (`model.json` + `model.safetensors`, the
delta files of a device), checked as strictly: the format and version, the tokenizer's hash,
the data's checksum (models/tensorfile.py) and that it is the one model.json recorded (the two
files are from one save), every tensor's name, shape and dtype, all finite;
the vocabulary's every field (models.vocab.Vocabulary.from_json) and "meta" (an object).
Every problem is a `FedkbError` that names the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from models import tensorfile
from models.errors import FedkbError
from models.jsonvalues import is_int
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary

FORMAT = "fedkb-lm"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
WEIGHTS_SHA256 = "weights_sha256"  # model.json's record of its weights' checksum: the two files are one pair
START_STATE_KEYS = ("start_h", "start_c")  # models.lm.WordLM's buffers: in every state dict, never trained

Arrays = dict[str, np.ndarray]


def default_paths() -> tuple[Path, Path]:
    """(shipped base model directory, shipped tokenizer) under the data directory (FedkbError where an
    installed fedkb has none: models.datasets.data_dir)."""
    from models.datasets import data_dir

    d = data_dir()
    return d / "base", d / "tokenizer.model"


def read_meta(directory: Path) -> dict:
    """A checkpoint folder's model.json, checked for the format this fedkb reads."""
    path = Path(directory) / META
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedkbError(f"no model at {directory} ({META} missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FedkbError(f"{path} is corrupt ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FedkbError(f"{path} is not a fedkb model")
    if not is_int(obj.get("format_version")) or obj["format_version"] != FORMAT_VERSION:  # not `true` (== 1)
        raise FedkbError(f"{path} has format version {obj.get('format_version')}, this fedkb reads {FORMAT_VERSION}")
    return obj


def shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor of models.lm.WordLM's state dict and its shape, from model.json's "config"
    (a test holds this to WordLM's own state dict); ValueError for sizes that are not whole
    numbers >= 1 (models.lm.LMConfig checks its sizes here too)."""
    if not isinstance(config, Mapping):
        raise ValueError("no config object")
    try:
        p, v, d, h = (config[k] for k in ("num_pieces", "base_vocab", "embed_dim", "hidden"))
    except KeyError as e:
        raise ValueError(f"missing {e}") from None
    bad = [f"{k}={x!r}" for k, x in zip(("num_pieces", "base_vocab", "embed_dim", "hidden"), (p, v, d, h))
           if not (is_int(x) and x >= 1)]
    if bad:
        raise ValueError(f"model sizes must be whole numbers >= 1 ({', '.join(bad)})")
    return {"piece_emb": (p, d), "piece_bias": (p,), "residual": (v, d), "word_bias": (v,),
            "lstm.weight_ih_l0": (4 * h, d), "lstm.weight_hh_l0": (4 * h, d), "lstm.bias_ih_l0": (4 * h,),
            "lstm.bias_hh_l0": (4 * h,), "lstm.weight_hr_l0": (d, h), "start_h": (d,), "start_c": (h,)}


def read_arrays(path: Path, reference: Mapping[str, tuple[int, ...]] | None = None,
                checksum: str | None = None) -> Arrays:
    """A safetensors file as arrays, all finite: every tensor file fedkb reads comes through here
    (models.checkpoint.load_tensors wraps the arrays as tensors).

    With `reference` (name -> shape), the file must hold exactly those tensors, in float32, of
    those shapes; a file written before the start state existed lacks its two and they read as
    zeros (what such a model started every message from, and a zero delta).  With `checksum`, the
    file must be the one that checksum was recorded for (models/tensorfile.py)."""
    path = Path(path)
    arrays, written = tensorfile.read(path)
    if reference is not None:
        for key in START_STATE_KEYS:
            if key in reference and key not in arrays:
                arrays[key] = np.zeros(reference[key], np.float32)
        missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
        if missing or extra:
            raise FedkbError(f"{path} does not fit the model: keys differ (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]})")
        for k, shape in reference.items():
            a = arrays[k]
            if a.shape != tuple(shape):
                raise FedkbError(f"{path} does not fit the model: {k} has shape {a.shape}, expected {tuple(shape)}")
            if a.dtype != np.float32:
                raise FedkbError(f"{path} does not fit the model: {k} has dtype {a.dtype}, expected float32")
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise FedkbError(f"{path} contains NaN or infinite values")
    if checksum is not None and written != checksum:
        raise FedkbError(f"{path} is not the weights its {META} was saved with (a save interrupted between "
                         f"the two files, or one file copied from elsewhere): save or copy the folder again")
    return arrays


@dataclass
class ModelFile:
    """A checkpoint folder, read: its weights, vocabulary, model.json's "config" and "meta"."""

    directory: Path
    weights: Arrays
    vocab: Vocabulary
    config: dict
    meta: dict


def read_model(directory: Path, tokenizer: Tokenizer) -> ModelFile:
    """Read and check a checkpoint folder: every check a checkpoint gets (models.checkpoint.load_checkpoint
    builds the torch model from this)."""
    directory = Path(directory)
    obj = read_meta(directory)
    if obj.get("tokenizer_sha256") != tokenizer.sha256:
        raise FedkbError(f"model {directory} was trained with a different tokenizer than {tokenizer.path}")
    config = obj.get("config")
    try:
        want = shapes(config)
    except ValueError as e:
        raise FedkbError(f"{directory / META}: bad config ({e})") from None
    if config["num_pieces"] != tokenizer.num_pieces:
        raise FedkbError(f"model expects {config['num_pieces']} pieces, tokenizer has {tokenizer.num_pieces}")
    vocab = Vocabulary.from_json(obj.get("vocab"), directory / META)  # FedkbError naming the field
    if vocab.base_size > config["base_vocab"]:
        raise FedkbError(f"{directory / META}: bad vocabulary: vocab.base_size is {vocab.base_size}, more than "
                         f"config.base_vocab ({config['base_vocab']}), the words the model has residual rows for")
    meta = obj.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise FedkbError(f"{directory / META}: meta is {type(meta).__name__} {meta!r:.40}, not an object")
    pair = obj.get(WEIGHTS_SHA256)  # absent in folders written before it was recorded
    if pair is not None and not isinstance(pair, str):
        raise FedkbError(f"{directory / META}: {WEIGHTS_SHA256} is {pair!r:.40}, not a checksum")
    weights = read_arrays(directory / WEIGHTS, reference=want, checksum=pair)
    return ModelFile(directory, weights, vocab, dict(config), meta)
