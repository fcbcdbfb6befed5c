"""keyboard/jobs.py: a background job's process, followed and stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keyboard.jobs import JobProcess
from models.errors import FedkbError

STUBBORN = '''
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a job that does not heed SIGTERM (yet)
print('{"started": true}', flush=True)
time.sleep(60)
'''


def test_stop_can_wait_until_the_process_has_exited(tmp_path, monkeypatch):
    """`stop(wait=S)` returns once the process is gone, killing it after S seconds: clearing the device
    removes the folder it writes into right after (stop() returned while it still ran)."""
    (tmp_path / "stubborn_job.py").write_text(STUBBORN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    job = JobProcess("stubborn_job", {}, "stubborn job")
    started, errors = threading.Event(), []

    def follow():
        try:
            job.follow(lambda msg: started.set())
        except FedkbError as e:
            errors.append(str(e))

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert started.wait(60)
    assert job.stop(wait=0.5) is True
    assert job._proc.returncode == -9  # SIGTERM ignored, so killed
    t.join(10)
    assert not t.is_alive() and errors == ["stubborn job stopped"]


def test_stop_before_the_process_starts_means_it_never_starts():
    job = JobProcess("no_such_module", {}, "job")
    assert job.stop(wait=1.0) is True
    try:
        job.follow(lambda msg: None)
    except FedkbError as e:
        assert str(e) == "job stopped"
    assert job._proc is None


CHATTY = '''
import time
print('{"first": true}', flush=True)
time.sleep(60)
print('{"second": true}', flush=True)
'''


def test_a_message_the_caller_cannot_take_ends_the_process(tmp_path, monkeypatch):
    """`on_message` failing (a bug in what draws it) ends the job's process at once: `follow` waited for
    it to exit on its own (here a minute), and it ran on unwatched."""
    (tmp_path / "chatty_job.py").write_text(CHATTY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    job = JobProcess("chatty_job", {}, "chatty job")

    def cannot_draw(msg):
        raise TypeError("'NoneType' object is not subscriptable")

    t0 = time.perf_counter()
    with pytest.raises(TypeError):
        job.follow(cannot_draw)
    assert time.perf_counter() - t0 < 30 and job._proc.returncode == -15 and job.stopped


AT_EXIT = '''
import atexit, os
atexit.register(lambda: open(os.environ["MARKER"], "w").close())  # the interpreter's shutdown ran
'''


def _without_shutdown(tmp_path, args: list[str]) -> int:
    """Run `python ARGS` with an atexit hook; its exit status, once sure that the interpreter's shutdown
    (seconds with torch loaded) was skipped."""
    (tmp_path / "sitecustomize.py").write_text(AT_EXIT)
    marker = tmp_path / "shutdown-ran"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "MARKER": str(marker), "PYTHONPATH": os.pathsep.join((str(tmp_path), root))}
    code = subprocess.run([sys.executable, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=120).returncode
    assert not marker.exists()
    return code


def test_exit_now_ends_the_process_without_the_interpreters_shutdown(tmp_path):
    """A job's status, after a return and after SIGTERM's SystemExit (its `finally` blocks run first)."""
    run = "from keyboard.jobs import exit_now\n"
    assert _without_shutdown(tmp_path, ["-c", run + "exit_now(lambda: 3)"]) == 3
    sigterm = run + "def main():\n    try:\n        raise SystemExit(143)\n    finally:\n        print('{}', flush=True)\n"
    assert _without_shutdown(tmp_path, ["-c", sigterm + "exit_now(main)"]) == 143


def test_the_jobs_end_without_the_interpreters_shutdown(tmp_path):
    """`python -m keyboard.learner` and `python -m keyboard.federator` end through `exit_now` (here after
    a bad spec): every "Learn now" result and every stop waited ~3 s for that shutdown."""
    for module in ("keyboard.learner", "keyboard.federator"):
        assert _without_shutdown(tmp_path, ["-m", module, "{not json"]) == 2


TWICE = '''
import time
from keyboard.jobs import emit, exit_now, exit_on_sigterm
def main():
    exit_on_sigterm()
    try:
        emit({"working": True})
        time.sleep(60)
    finally:
        emit({"cleaning": True})  # as an atomic write removes its temporary file, an engine ends its workers
        time.sleep(1.0)
        emit({"cleaned": True})
    return 0
exit_now(main)
'''


def test_a_second_sigterm_does_not_cut_the_jobs_cleanup_short():
    """The keyboard may stop a job twice (f8 ends a learning, then waits for its process): the second
    SIGTERM cut short the `finally` blocks that the first one runs."""
    root = str(Path(__file__).resolve().parent.parent)
    p = subprocess.Popen([sys.executable, "-c", TWICE], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYTHONPATH": root})
    try:
        assert p.stdout.readline() == '{"working": true}\n'
        p.terminate()
        assert p.stdout.readline() == '{"cleaning": true}\n'
        p.terminate()
        assert p.stdout.read() == '{"cleaned": true}\n' and p.wait(60) == 128 + 15
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
