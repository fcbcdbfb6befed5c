"""Crash-safe files.

* `write_*`: atomic replace (write a temporary file beside the target, fsync, rename);
* `append_line`: durable append (write, fsync): a crash leaves at most a torn last line;
* `read_jsonl`: the matching reader, which skips a torn (or blank) line and keeps the rest.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append `line` and a newline, then fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list:
    """Every JSON value of a one-per-line file, in order; [] if it does not exist.

    A line that does not parse (a torn last line after a crash) is skipped, and bytes
    that are not UTF-8 (a character cut in two) are replaced, so a crash never makes
    the rest of the file unreadable.
    """
    return [obj for _, obj in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: Path) -> list[tuple[int, object]]:
    """`read_jsonl`'s values, each with its line number (from 1), for messages that name a line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except ValueError:
                continue
    return out
