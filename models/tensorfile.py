"""A checksum inside every safetensors file fedkb writes, checked on every read.

safetensors validates a file's header (offsets, shapes, dtypes) but not its data: a file
damaged after it was written (a bad disk, a partial copy, an edit) loads with some weights
silently changed.  fedkb therefore writes the SHA-256 of the data section (everything after
the header) into the header's metadata, under `data_sha256`, and refuses a file whose data
no longer matches it.  Files written before the checksum existed have none and load as
before.  Torch-free: every tensor file is read here (`read`), as NumPy arrays, by the typing
side (models/modelfile.py) and the training side (models/checkpoint.py) alike.

File layout (the safetensors format): 8 bytes little-endian header length n, n bytes of
JSON header ({"__metadata__": {str: str}, name: {dtype, shape, data_offsets}, ...}), data.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

from models.errors import FedkbError

CHECKSUM = "data_sha256"


def _split(blob: bytes) -> tuple[dict, memoryview]:
    """(header, data section); ValueError if the bytes are too short to hold the header they announce."""
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if 8 + n > len(blob):
        raise ValueError(f"header of {n} bytes in a file of {len(blob)}")
    header = json.loads(bytes(blob[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, memoryview(blob)[8 + n :]


def with_checksum(blob: bytes) -> bytes:
    """The safetensors file `blob` with the SHA-256 of its data section added to its header's metadata.

    Only the header is rewritten (padded with spaces to a multiple of 8 bytes, as safetensors
    writes it, so the data stays aligned); the data section is the same bytes."""
    header, data = _split(blob)
    meta = header.get("__metadata__") or {}
    header = {"__metadata__": {**meta, CHECKSUM: hashlib.sha256(data).hexdigest()},
              **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def check(path: Path, blob: bytes) -> str | None:
    """Raise FedkbError if `blob` (the bytes of `path`) carries a checksum its data does not match;
    the checksum (None for a file written without one)."""
    try:
        header, data = _split(blob)
    except (ValueError, UnicodeDecodeError) as e:
        raise FedkbError(f"{path} is not a valid safetensors file ({e})") from None
    meta = header.get("__metadata__") or {}
    want = meta.get(CHECKSUM) if isinstance(meta, dict) else None
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise FedkbError(f"{path} is damaged: its data no longer matches the checksum it was written with")
    return want


def checksum(blob: bytes) -> str | None:
    """The checksum `with_checksum` wrote into safetensors file `blob`'s header (None if it has none)."""
    meta = _split(blob)[0].get("__metadata__") or {}
    return meta.get(CHECKSUM) if isinstance(meta, dict) else None


def read(path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """A safetensors file's tensors as NumPy arrays (writable), its checksum checked, and that
    checksum (None where it has none): what every
    reader of fedkb's tensor files starts from (models.modelfile.read_arrays checks the arrays).
    FedkbError for a missing, unreadable or damaged file, and, before its data is read, for what
    is not a regular file (a link to /dev/zero would be read until memory runs out), a file over
    MAX_BYTES, or one whose size is not the size its header describes."""
    path = Path(path)
    try:
        blob = _read_bytes(path)
        arrays = load(blob)
    except FileNotFoundError:
        raise FedkbError(f"{path} does not exist") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FedkbError(f"{path} is not a valid safetensors file ({e})") from None
    except (KeyError, TypeError) as e:  # a dtype NumPy has no type for (bfloat16, ...); fedkb writes none
        raise FedkbError(f"{path} holds a dtype NumPy cannot read ({e})") from None
    except MemoryError:
        raise FedkbError(f"{path} is too large to read into memory") from None
    return arrays, check(path, blob)


MAX_BYTES = 1 << 30  # no fedkb tensor file comes near this: the shipped model is 7.8 MB
_HEADER_MAX = 100_000_000  # safetensors' own limit on the header's length


def _read_bytes(path: Path) -> bytes:
    """The bytes of tensor file `path`; FedkbError, before reading its data, where it is not a
    regular file, is larger than MAX_BYTES, or is not the size its header describes."""

    def sized(st: os.stat_result) -> int:
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
            raise FedkbError(f"{path} is not a valid safetensors file (it is {kind}, not a regular file)")
        if st.st_size > MAX_BYTES:
            raise FedkbError(f"{path} is {st.st_size:,} bytes, more than a fedkb tensor file can be "
                             f"({MAX_BYTES:,}): not read")
        return st.st_size

    sized(os.stat(path))  # nothing but a regular file is even opened (opening a pipe would wait)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        size = sized(os.fstat(f.fileno()))  # the file opened, should `path` have changed since
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if 0 <= n <= min(_HEADER_MAX, size - 8):
            described = _described_size(n, f.read(n))
            if described is not None and described != size:
                raise FedkbError(f"{path} is not a valid safetensors file (its header describes {described} "
                                 f"bytes, the file holds {size}: {'cut short' if size < described else 'extra bytes'})")
        f.seek(0)
        return f.read(size)


def _described_size(n: int, header: bytes) -> int | None:
    """The file size a safetensors header of `n` bytes describes: 8 + n + the end of the last
    tensor's data.  None where the header cannot be read that far (safetensors then says why)."""
    try:
        obj = json.loads(header)
        ends = [v["data_offsets"][1] for k, v in obj.items() if k != "__metadata__"]
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError, RecursionError):
        return None
    if not all(type(e) is int and e >= 0 for e in ends):
        return None
    return 8 + n + max(ends, default=0)
