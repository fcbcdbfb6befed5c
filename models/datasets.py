"""Loading the shipped data files (built by `fedkb prepare`); no network.

`DATA_DIR` is the repository's `data/` folder, or `$FEDKB_DATA` when set.  The data are
not package data: a non-editable install (`pip install .`) has none beside its code, and
`data_dir()` says so.  Every loader raises `FedkbError` naming the file when it is missing
or corrupt, so the CLI shows one clear line instead of a traceback.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from models.errors import FedkbError

CODE_DIR = Path(__file__).resolve().parent.parent  # the folder holding models/: a checkout, or site-packages
DATA_DIR = Path(os.environ["FEDKB_DATA"]) if os.environ.get("FEDKB_DATA") else CODE_DIR / "data"

PRETRAIN_FILE = "pretrain.txt.gz"
USERS_FILE = "users.jsonl.gz"
SHAKESPEARE_FILE = "shakespeare.jsonl.gz"

HISTORY_FRACTION = 0.8  # Shakespeare roles: first 80 % of lines are history


@dataclass(frozen=True)
class UserData:
    """One simulated user: earlier typing (on-device history) and held-out later typing."""

    id: str
    history: tuple[str, ...]
    future: tuple[str, ...]


def checkout() -> Path | None:
    """The checkout fedkb runs from (a pyproject.toml beside models/), or None: a non-editable install."""
    return CODE_DIR if (CODE_DIR / "pyproject.toml").is_file() else None


def cache_dir(name: str) -> Path:
    """A checkout's .cache/NAME, or $XDG_CACHE_HOME/fedkb/NAME (~/.cache/fedkb/NAME) for an install."""
    if checkout() is not None:
        return CODE_DIR / ".cache" / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedkb" / name


def data_dir() -> Path:
    """DATA_DIR; FedkbError where it is the missing data/ beside a non-editable install's code (no
    $FEDKB_DATA), which `fedkb prepare` must not write into site-packages to make."""
    if DATA_DIR == CODE_DIR / "data" and checkout() is None and not DATA_DIR.is_dir():
        raise FedkbError(f"fedkb's data folder {DATA_DIR} is missing: install fedkb from a checkout with "
                         "`pip install -e .`, or set FEDKB_DATA to a data folder")
    return DATA_DIR


def _resolve(path: Path | str | None, default_name: str) -> Path:
    return Path(path) if path is not None else data_dir() / default_name


def _broken(path: Path, why: str) -> FedkbError:
    return FedkbError(f"{path}: {why}; run `fedkb prepare` to rebuild it")


def _read_lines(path: Path) -> Iterator[str]:
    """Lines of a gzip text file, FedkbError on a missing or corrupt file."""
    if not path.is_file():
        raise _broken(path, "missing")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise _broken(path, f"corrupt ({e})") from e


def load_pretrain_lines(path: Path | str | None = None) -> list[str]:
    """The central pretraining text: one message or sentence per line."""
    return list(_read_lines(_resolve(path, PRETRAIN_FILE)))


def _iter_objects(path: Path) -> Iterator[dict]:
    seen: set[str] = set()  # one id is one device folder: a second user with it would share (and leak) its text
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise _broken(path, f"corrupt JSON on line {n} ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise _broken(path, f"line {n} is not a user object")
        if obj["id"] in seen:
            raise _broken(path, f"user id {obj['id']!r} appears twice (line {n})")
        seen.add(obj["id"])
        yield obj


def _texts(obj: dict, key: str, path: Path) -> tuple[str, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _broken(path, f"user {obj['id']!r} has no list of strings {key!r}")
    return tuple(value)


def _user(obj: dict, path: Path) -> UserData:
    """A users file's record: `history` + `future` (chat senders), or a role's `lines` split 80/20."""
    if "lines" in obj and "history" not in obj:
        lines = _texts(obj, "lines", path)
        n_hist = min(max(1, int(len(lines) * HISTORY_FRACTION)), max(len(lines) - 1, 0))
        return UserData(obj["id"], lines[:n_hist], lines[n_hist:])
    return UserData(obj["id"], _texts(obj, "history", path), _texts(obj, "future", path))


def iter_users(path: Path | str | None = None) -> Iterator[UserData]:
    """Stream the users of a users file, one at a time: users.jsonl.gz by default, or shakespeare.jsonl.gz."""
    path = _resolve(path, USERS_FILE)
    for obj in _iter_objects(path):
        yield _user(obj, path)


def load_users(path: Path | str | None = None) -> list[UserData]:
    """All users of a users file (default: the chitchat senders), sorted by id as stored."""
    return list(iter_users(path))


def load_shakespeare(path: Path | str | None = None) -> list[UserData]:
    """Shakespeare roles as users: the first 80 % of each role's lines are history, the rest future."""
    return load_users(_resolve(path, SHAKESPEARE_FILE))
