"""Crash-safe files.

* `write_*`: atomic replace (write a temporary file beside the target, fsync, rename);
* `append_line`: durable append (write, fsync): a crash leaves at most a torn last line, which the
  next append ends with a newline first, so it never swallows a later line;
* `read_jsonl`: the matching reader, which skips a torn (or blank) line and keeps the rest;
* `lock_folder`: one process at a time in a folder (a run's rounds, a pretrain's work).

A new file gets `mode` less the umask, as `open` gives it: the usual permissions by default, or
0o600 (`PRIVATE`, readable by its owner only) for a device's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from models.errors import FedkbError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders go unlocked
    fcntl = None

PRIVATE = 0o600
LOCK = ".lock"


def write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    write_files({path: data}, mode)


def write_text(path: Path, text: str, mode: int = 0o666) -> None:
    write_bytes(path, text.encode("utf-8"), mode)


def write_json(path: Path, obj, mode: int = 0o666) -> None:
    write_bytes(path, json_bytes(obj), mode)


def jsonl_text(values) -> str:
    """What a JSONL file holds for `values`: one JSON value a line (`read_jsonl` reads it back)."""
    return "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values)


def json_bytes(obj) -> bytes:
    """What `write_json` writes."""
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_files(files: dict[Path, bytes], mode: int = 0o666) -> None:
    """Replace each file atomically, all together: every temporary file is written before the first
    rename, so an error while writing (a full disk) replaces none of them.  The renames, in the
    order given, are then made durable (each folder fsynced), so a power cut cannot undo them."""
    temps = []
    try:
        for path, data in files.items():
            temps.append((_temporary(Path(path), data, mode), path))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for folder in dict.fromkeys(Path(path).parent for path in files):
        _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable (POSIX: a rename is on disk once its directory is
    fsynced); where folders cannot be opened or fsynced (Windows, some file systems), nothing."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path, data: bytes, mode: int) -> str:
    """A temporary file beside `path` holding `data`, fsynced, with `mode` less the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode & ~umask)  # mkstemp makes 0600; give the file the mode asked for
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def append_line(path: Path, line: str, mode: int = 0o666) -> int:
    """Append `line` and a newline, then fsync; returns the file's size before, to `os.truncate` back to.

    A torn last line (an append cut short by a crash or a full disk) is ended first, so it stays one
    line that `read_jsonl` skips instead of swallowing this one; a write that fails is truncated away.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, mode)
    try:
        size = os.fstat(fd).st_size
        data = (line + "\n").encode("utf-8")
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    return size


def read_jsonl(path: Path) -> list:
    """Every JSON value of a one-per-line file, in order; [] if it does not exist.

    A line that does not parse (a torn last line after a crash) is skipped, and bytes
    that are not UTF-8 (a character cut in two) are replaced, so a crash never makes
    the rest of the file unreadable. A file that cannot be read (a folder in its place,
    no permission) is a FedkbError naming it.
    """
    return [obj for _, obj in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: Path) -> list[tuple[int, object]]:
    """`read_jsonl`'s values, each with its line number (from 1), for messages that name a line."""
    path = Path(path)
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((n, json.loads(line)))
                except ValueError:
                    continue
    except (FileNotFoundError, NotADirectoryError):  # no file (or no folder where it goes): nothing yet
        return []
    except OSError as e:
        raise FedkbError(f"cannot read {path}: {e.strerror or e}") from None
    return out


def lock_folder(folder: Path, busy: str, unlocked: str) -> tuple[int | None, str | None]:
    """Lock `folder` for this process (an exclusive `flock` on FOLDER/.lock, made with the folder):
    (descriptor, None), closing which releases it; or (None, why) where the system cannot lock
    files, the caller then going on unlocked (`why` ends with `unlocked`, what that allows).
    FedkbError(`busy`) where another process holds it.  The kernel drops the lock when its holder
    exits, `kill -9` included, so a killed process never leaves its folder locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None, f"this system has no file locks: {unlocked}"
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FedkbError(busy) from None
    except OSError as e:  # a file system without locks (some network mounts)
        os.close(fd)
        return None, f"cannot lock {folder / LOCK} ({e.strerror}): {unlocked}"
    return fd, None
