"""keyboard/learner.py: "Learn now" in a process of its own; its errors, and stopping it."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from federation.config import ClientConfig
from keyboard import learner
from keyboard.learner import LearnerProcess
from keyboard.session import DELTA_FILE, KeyboardSession, LearnConfig
from models.errors import FedkbError
from models.modelfile import read_arrays
from tests.conftest import FIXTURES

FAST = LearnConfig(client=ClientConfig(epochs=1.0, batch_size=2, bptt=8), eval_messages=5)


def _session(tiny, tmp_path, user="u0001", learn=FAST):
    model, tok = tiny
    return KeyboardSession(model, tok, tmp_path / "devices", user, users_file=FIXTURES / "users.jsonl.gz", learn_cfg=learn)


def test_the_process_learns_the_delta_a_thread_would(tiny, tmp_path, monkeypatch):
    """The same seed, the same history: the process writes the delta `KeyboardSession.learn` would
    (both with the PyTorch passes: the keyboard never loads the native kernels, which other tests
    may have loaded into this process)."""
    from models import native

    monkeypatch.setattr(native, "_module", None)
    s = _session(tiny, tmp_path)
    steps = []
    result = LearnerProcess(s).run(on_step=lambda step, total, loss: steps.append((step, total)))
    assert steps and steps[-1][0] == steps[-1][1] and result.messages == len(s.device.history())
    in_process = _session(tiny, tmp_path / "other")
    thread_result = in_process.learn()
    a, b = (read_arrays(x.device.delta_dir / DELTA_FILE) for x in (s, in_process))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit for bit
    assert (result.before, result.after, result.messages) == (thread_result.before, thread_result.after, thread_result.messages)


def test_a_bad_spec_is_one_json_error_line(capsys):
    assert learner.main(["{not json"]) == 2
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line)["error"].startswith("usage: python -m keyboard.learner SPEC_JSON")


def test_the_processs_error_is_the_learnings_error(tiny, tmp_path):
    """A user error in the process (here: its model folder is gone) comes back as one line, no traceback."""
    p = LearnerProcess(_session(tiny, tmp_path))
    p.spec["model"] = str(tmp_path / "gone")
    with pytest.raises(FedkbError, match="gone") as e:
        p.run()
    assert "Traceback" not in str(e.value)


def test_stop_ends_the_process_and_no_delta_is_written(tiny, tmp_path):
    many = LearnConfig(client=ClientConfig(epochs=50.0, batch_size=2, bptt=8), eval_messages=5)  # long enough to stop
    s = _session(tiny, tmp_path, learn=many)
    p = LearnerProcess(s)
    started = threading.Event()
    p_run = []

    def go():
        try:
            p.run(on_step=lambda *a: started.set())
        except FedkbError as e:
            p_run.append(str(e))

    t = threading.Thread(target=go)
    t.start()
    assert started.wait(120)
    p.stop()
    t.join(60)
    assert not t.is_alive() and p_run == ["learning stopped"]
    assert p._proc.poll() == 128 + 15  # SIGTERM became SystemExit (keyboard/jobs.py's exit_on_sigterm)
    assert not (s.device.delta_dir / DELTA_FILE).exists()
    assert not list(s.device.path.rglob("*.tmp"))  # no atomic write left a temporary file behind


def test_the_personal_delta_is_private(tiny, tmp_path):
    """The delta holds what the history taught: 0600 in a 0700 folder, as the device's other files."""
    import os
    import stat

    from keyboard.session import DELTA_META

    old = os.umask(0o022)
    try:
        s = _session(tiny, tmp_path)
        s.learn()
    finally:
        os.umask(old)
    d = s.device.delta_dir
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert (mode(d), mode(d / DELTA_FILE), mode(d / DELTA_META)) == (0o700, 0o600, 0o600)


def test_the_delta_and_its_record_are_written_together(tiny, tmp_path, monkeypatch):
    """A disk that fills while the record (delta.json) is written leaves the last learning's delta and
    record, both: the new delta was committed first, so a learning said to have failed was typed with
    later, beside the older learning's record. The delta is the bytes `save_tensors` writes (its checksum)."""
    import errno
    import os

    import torch

    from keyboard.session import DELTA_META
    from models import atomic
    from models.checkpoint import save_tensors

    s = _session(tiny, tmp_path)
    s.learn()
    d = s.device.delta_dir
    first = {name: (d / name).read_bytes() for name in (DELTA_FILE, DELTA_META)}
    delta = read_arrays(d / DELTA_FILE)
    save_tensors(tmp_path / "as_before", {k: torch.from_numpy(a) for k, a in delta.items()}, meta={"global": "base"})
    assert first[DELTA_FILE] == (tmp_path / "as_before").read_bytes()  # old and new deltas read the same
    s.device.append_message("one more message to learn from")
    temporary = atomic._temporary

    def full_disk(path, data, mode):
        if path.name == DELTA_META:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return temporary(path, data, mode)

    monkeypatch.setattr(atomic, "_temporary", full_disk)
    with pytest.raises(OSError, match="No space"):
        s.learn()
    assert {name: (d / name).read_bytes() for name in first} == first
    assert not list(d.glob("*.tmp"))
