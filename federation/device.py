"""A device is a folder: everything a user types stays in it.

    <root>/<user_id>/
        history.jsonl        finished messages, one JSON string per line (appended; rewritten to forget a word)
        future.jsonl         simulated users only: held-out future typing (never trained on)
        personal.safetensors the personal delta (local - global it was trained from) + personal.json
        words.json           {"personal": [...], "blocked": [...], "oov_counts": {word: n}}

The folders are made 0700 and history/future/words 0600 (atomic.PRIVATE): readable by the user only.
Only what a protocol explicitly computes from this folder (a clipped model
delta, a vote for a word prefix) ever leaves it; the server never reads these files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from models import atomic
from models.errors import FedkbError
from models.jsonvalues import is_int
from models.text import is_word, normalize_text, without_word, words

MAX_MESSAGE_CHARS = 10_000  # a longer paste is stored truncated
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class Device:
    root: Path
    user_id: str

    def __post_init__(self):
        if not _ID.match(self.user_id) or self.user_id in (".", ".."):
            raise FedkbError(f"invalid user id {self.user_id!r} (letters, digits, _ . - only)")
        self.path = Path(self.root) / self.user_id

    # -- files ---------------------------------------------------------------------------
    @property
    def history_file(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def future_file(self) -> Path:
        return self.path / "future.jsonl"

    @property
    def words_file(self) -> Path:
        return self.path / "words.json"

    @property
    def delta_dir(self) -> Path:
        return self.path / "personal"

    def exists(self) -> bool:
        return self.path.is_dir()

    # -- typed history -------------------------------------------------------------------
    def history(self) -> list[str]:
        return _read_jsonl(self.history_file)

    def future(self) -> list[str]:
        return _read_jsonl(self.future_file)

    def append_message(self, text: str, vocab: Iterable[str] | None = None) -> None:
        """Store one finished message; count its words missing from `vocab` (the global vocabulary).

        All or nothing: words.json is read before the message is appended, and the message is
        truncated away again if writing words.json fails."""
        text = normalize_text(text)[:MAX_MESSAGE_CHARS]
        if not text:
            return
        state = self._counted(text, vocab)
        self.make_folder()
        size = atomic.append_line(self.history_file, json.dumps(text, ensure_ascii=False), atomic.PRIVATE)
        if state is not None:
            try:
                self._write_words(state)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.truncate(self.history_file, size)
                raise

    def _counted(self, text: str, vocab: Iterable[str] | None) -> dict | None:
        """words.json's state with `text`'s words missing from `vocab` counted (a forgotten word is
        not); None if there is nothing to count."""
        missing = [w for w in words(text) if w not in vocab and is_word(w)] if vocab is not None else []
        if not missing:
            return None
        state = self.word_state()
        blocked = set(state["blocked"])
        missing = [w for w in missing if w not in blocked]
        if not missing:
            return None
        counts = Counter(state["oov_counts"])
        counts.update(missing)
        state["oov_counts"] = dict(counts)
        return state

    def write_simulated(self, history: Iterable[str], future: Iterable[str]) -> None:
        """Lay out a simulated user's folder (history + held-out future), atomically per file."""
        self.make_folder()
        for file, texts in ((self.history_file, history), (self.future_file, future)):
            atomic.write_text(file, atomic.jsonl_text(texts), atomic.PRIVATE)

    def make_folder(self) -> None:
        """The devices folder and this device's, each made 0700 if it does not exist."""
        Path(self.root).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)

    # -- personal words ------------------------------------------------------------------
    def word_state(self) -> dict:
        empty = {"personal": [], "blocked": [], "oov_counts": {}}
        if not self.words_file.exists():
            return empty
        try:
            obj = json.loads(self.words_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise FedkbError(f"{self.words_file} is corrupt; fix or delete it") from None
        state = {k: obj.get(k, v) for k, v in empty.items()} if isinstance(obj, dict) else None
        if state is None or not (all(isinstance(state[k], list) and all(isinstance(w, str) for w in state[k])
                                     for k in ("personal", "blocked"))
                                 and isinstance(state["oov_counts"], dict)
                                 and all(is_int(n) for n in state["oov_counts"].values())):
            raise FedkbError(f"{self.words_file} is corrupt (not lists of words and word counts); fix or delete it")
        return state

    def _write_words(self, state: dict) -> None:
        self.make_folder()
        atomic.write_json(self.words_file, state, atomic.PRIVATE)

    def personal_words(self) -> list[str]:
        return list(self.word_state()["personal"])

    def blocked_words(self) -> set[str]:
        return set(self.word_state()["blocked"])

    def oov_counts(self) -> Counter:
        return Counter(self.word_state()["oov_counts"])

    def add_personal_words(self, new: Iterable[str]) -> list[str]:
        state = self.word_state()
        have = set(state["personal"]) | set(state["blocked"])
        added = [w for w in dict.fromkeys(w.lower() for w in new) if is_word(w) and w not in have]
        if added:
            state["personal"] = state["personal"] + added
            self._write_words(state)
        return added

    def remove_personal_words(self, words: Iterable[str]) -> list[str]:
        """Take `words` off this device's personal words (not blocked: they may be added again); the
        personal words left."""
        state = self.word_state()
        gone = {w.lower() for w in words}
        keep = [w for w in state["personal"] if w not in gone]
        if len(keep) < len(state["personal"]):
            state["personal"] = keep
            self._write_words(state)
        return keep

    def block_word(self, word: str) -> None:
        """Forget `word`: never suggested again on this device, and erased from its personal words, its
        word counts and its typed history (not from future.jsonl, which the user never typed).

        words.json and history.jsonl are replaced together: an error leaves both as they were.  The
        history is renamed into place first: a kill between the two renames leaves the word erased
        from what was typed (and not yet blocked), never blocked but still in the history."""
        word = word.lower()
        state = self.word_state()
        if word not in state["blocked"]:
            state["blocked"] = state["blocked"] + [word]
        state["personal"] = [w for w in state["personal"] if w != word]
        state["oov_counts"] = {w: n for w, n in state["oov_counts"].items() if w != word}
        files = {}
        if self.history_file.exists():
            files[self.history_file] = atomic.jsonl_text(_erased(self.history(), word)).encode("utf-8")
        files[self.words_file] = atomic.json_bytes(state)
        self.make_folder()
        atomic.write_files(files, atomic.PRIVATE)

    # -- clearing ------------------------------------------------------------------------
    def clear(self) -> None:
        """Delete everything learned and typed on this device.  A device folder that is a link (a
        profile moved to another disk) keeps the link and loses what it points to's contents."""
        if self.path.is_symlink():
            for entry in self.path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif self.path.exists():
            shutil.rmtree(self.path)


def _erased(messages: Iterable[str], word: str) -> list[str]:
    """The messages with each occurrence of `word` (as `words` finds and lower-cases it) taken out;
    a message left with no words is dropped."""
    out = []
    for text in messages:
        if word in words(text):
            text = without_word(text, word)
            if not words(text):
                continue
        out.append(text)
    return out


def _read_jsonl(path: Path) -> list[str]:
    """The messages of a history/future file (a torn last line after a crash is skipped)."""
    return [v for v in atomic.read_jsonl(path) if isinstance(v, str)]
