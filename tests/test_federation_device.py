"""federation.device and models.atomic's appends and reads: what a device folder holds after a
failed write, a torn line, an unreadable file, a forgotten word; and who may read it."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile

import pytest

from federation.device import Device
from models import atomic
from models.errors import FedkbError

VOCAB = {"i", "love", "my", "so", "much", "hat", "again", "first", "third", "message"}


@pytest.fixture
def dev(tmp_path) -> Device:
    return Device(tmp_path / "devices", "me")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# -- a message reported "not saved" is not saved ------------------------------------------------
def test_a_damaged_words_file_stores_no_message(dev):
    """words.json is read before the append: the error the app shows ("not saved") is true, and
    sending again does not store the message twice."""
    dev.append_message("first message", VOCAB)
    dev.words_file.write_text("{not json")
    with pytest.raises(FedkbError, match="words.json is corrupt"):
        dev.append_message("meet me at zzqxville", VOCAB)
    assert dev.history() == ["first message"]


def test_a_message_is_taken_back_when_its_word_counts_cannot_be_written(dev, monkeypatch):
    dev.append_message("first message", VOCAB)
    before = dev.history_file.read_bytes()
    monkeypatch.setattr(Device, "_write_words", _disk_full)
    with pytest.raises(OSError, match="No space"):
        dev.append_message("meet me at zzqxville", VOCAB)
    assert dev.history_file.read_bytes() == before


# -- a torn line ----------------------------------------------------------------------------
@pytest.mark.parametrize("append", [lambda d, t: d.append_message(t),
                                    lambda d, t: atomic.append_line(d.history_file, json.dumps(t))],
                         ids=["append_message", "append_line"])
def test_a_torn_last_line_never_swallows_the_next_message(dev, append):
    """An append cut short (a crash, a full disk) stays one line that is skipped when read; the
    message sent next is a line of its own (it was joined to the fragment and lost)."""
    dev.path.mkdir(parents=True)
    dev.history_file.write_text('"first message"\n"second mess')
    append(dev, "third message")
    append(dev, "fourth message")
    assert dev.history() == ["first message", "third message", "fourth message"]


def test_an_append_cut_short_is_truncated_away(dev, monkeypatch):
    """A write that fails half way (ENOSPC) leaves the file as it was, and is fsynced when it works."""
    dev.append_message("first message")
    before = dev.history_file.read_bytes()
    write = os.write
    calls = []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            _disk_full()
        return write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        dev.append_message("a long message " * 100)
    assert dev.history_file.read_bytes() == before
    monkeypatch.setattr(os, "write", write)
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    dev.append_message("third message")
    assert dev.history() == ["first message", "third message"] and synced


# -- a file that cannot be read -------------------------------------------------------------------
def test_a_history_that_cannot_be_read_is_a_one_line_error(dev):
    """A folder where history.jsonl should be: a FedkbError naming the file (an IsADirectoryError
    traceback in the app before); a file that does not exist is still an empty history."""
    assert dev.history() == []
    (dev.root / "other").parent.mkdir(parents=True)
    (dev.root / "other").write_text("a file where a device folder would be")
    assert Device(dev.root / "other", "me").history() == []
    dev.history_file.mkdir(parents=True)
    with pytest.raises(FedkbError, match=r"cannot read .*history\.jsonl: Is a directory"):
        dev.history()
    with pytest.raises(FedkbError, match="cannot read"):
        atomic.read_jsonl_numbered(dev.history_file)


# -- forgetting a word -----------------------------------------------------------------------------
def test_forget_erases_the_word_from_the_device(dev):
    dev.write_simulated([], ["xylovex in the future"])
    dev.add_personal_words(["xylovex", "zorblax"])
    for text in ["i love my Xylovex so much", "Xylovex!", "xylovex's hat", "🙂", "zorblax"]:
        dev.append_message(text, VOCAB)
    assert dev.oov_counts()["xylovex"] == 2
    dev.block_word("xylovex")
    assert dev.history() == ["i love my so much", "xylovex's hat", "🙂", "zorblax"]  # "Xylovex!" had no other word
    assert "xylovex" not in dev.history_file.read_text().lower().replace("xylovex's", "")
    assert dev.word_state() == {"personal": ["zorblax"], "blocked": ["xylovex"],
                                "oov_counts": {"xylovex's": 1, "zorblax": 1}}
    assert dev.future() == ["xylovex in the future"]  # simulated held-out text, not the user's typing
    dev.append_message("xylovex again", VOCAB)  # typed again: stored, but not counted
    assert "xylovex" not in dev.oov_counts()


def test_forget_that_cannot_be_written_changes_nothing(dev, monkeypatch):
    dev.add_personal_words(["xylovex"])
    dev.append_message("i love my xylovex", VOCAB)
    files = (dev.history_file, dev.words_file)
    before = [f.read_bytes() for f in files]
    mkstemp = tempfile.mkstemp
    made = []

    def second_fails(**kw):
        made.append(kw)
        if len(made) > 1:
            _disk_full()
        return mkstemp(**kw)

    monkeypatch.setattr(tempfile, "mkstemp", second_fails)
    with pytest.raises(OSError, match="No space"):
        dev.block_word("xylovex")
    assert [f.read_bytes() for f in files] == before and len(made) == 2
    assert not list(dev.path.glob(".*.tmp"))


def test_a_kill_between_the_two_renames_never_leaves_a_forgotten_word_in_the_history(dev, killed_renames):
    """words.json was renamed first: a kill before history.jsonl's rename left the word blocked
    but still in what the device stores of the user's typing."""
    dev.append_message("i love my xylovex", VOCAB)
    killed_renames.arm()
    with pytest.raises(KeyboardInterrupt):
        dev.block_word("xylovex")
    assert "xylovex" not in dev.history_file.read_text()


# -- who may read it ------------------------------------------------------------------------------
def test_device_files_are_private(dev, tmp_path):
    """0700 folders, 0600 files, whatever the umask; other atomic writes (checkpoints, run
    folders) keep the usual permissions."""
    old = os.umask(0o022)
    try:
        dev.append_message("i love my xylovex", VOCAB)
        dev.block_word("so")
        Device(dev.root, "u1").write_simulated(["a"], ["b"])
        atomic.write_text(tmp_path / "shared.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(dev.root) == mode(dev.path) == 0o700
    assert {f.name: mode(f) for f in dev.root.rglob("*") if f.is_file()} == {
        "history.jsonl": 0o600, "words.json": 0o600, "future.jsonl": 0o600}
    assert mode(tmp_path / "shared.json") == 0o644


def test_clearing_a_device_folder_that_is_a_link_empties_what_it_points_to(tmp_path):
    """A profile moved to another disk and linked back: clearing keeps the link (rmtree refuses
    links) and deletes everything in it."""
    elsewhere = tmp_path / "other-disk" / "me"
    Device(tmp_path / "other-disk", "me").append_message("i love my hat", VOCAB)
    (elsewhere / "personal").mkdir()
    (elsewhere / "personal" / "delta.json").write_text("{}")
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "me").symlink_to(elsewhere)
    dev = Device(tmp_path / "devices", "me")
    assert dev.history() == ["i love my hat"]
    dev.clear()
    assert dev.path.is_symlink() and list(elsewhere.iterdir()) == [] and dev.history() == []
