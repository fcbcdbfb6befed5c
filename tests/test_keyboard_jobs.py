"""keyboard/jobs.py: a background job's process, followed and stopped."""

from __future__ import annotations

import threading

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
