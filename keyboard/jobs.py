"""Background jobs of the keyboard, each in a process of its own, talking in JSON lines.

A phone's keyboard does not train in its UI process: on-device training runs as a
background job the OS schedules (Bonawitz et al. 2019, "Towards Federated Learning at
Scale: System Design"), and the keyboard picks up the model it leaves.  Here the keyboard
types on NumPy and never imports torch; what trains runs as

    python -m MODULE SPEC_JSON

with one torch thread (the other core types), and reports on stdout, one JSON object a
line.  Each job module defines its own messages; two are common to all of them:

    {"error": "one line"}      a user error (corrupt files, a full disk): exit status 2
    anything not JSON          ignored (a library printing to stdout)

The jobs are "Learn now" (keyboard/learner.py) and the live federation's rounds
(keyboard/federator.py).  `JobProcess.follow` blocks: call it from a worker thread.
`stop()` ends the process at once, from any thread: SIGTERM, which the job turns into
SystemExit (`exit_on_sigterm`); whatever a job writes is written atomically, so a stopped
job leaves the last whole file it wrote, or none, and no temporary file.  A job's process
ends through `exit_now`, without the interpreter's shutdown (with torch loaded, ~3 s that
every result and every stop waited for).  `stop(wait=S)`
also waits for it to exit (killing it after S seconds), for a caller that then removes
the folder it writes into (clearing the device).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, NoReturn

from models.errors import FedkbError

_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the keyboard package


def exit_on_sigterm() -> None:
    """The job's side: `stop()`'s SIGTERM becomes SystemExit, so `finally` blocks run (an atomic
    write removes its temporary file, an engine ends its workers, a run folder is unlocked); so
    does SIGHUP, which a closing terminal sends (`fedkb simulate` installs this too).  Only the
    first signal: another one (the keyboard stops a job twice, a terminal closes as it quits) would
    cut those blocks short, and raise past `exit_now` into the interpreter's slow shutdown."""
    first = []

    def stop(signum, frame):
        if not first:
            first.append(signum)
            sys.exit(128 + signum)

    for sig in (signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])):
        signal.signal(sig, stop)


def exit_now(main: Callable[[], int]) -> NoReturn:
    """The job's side, as its `__main__`: run `main` and end the process with its status at once
    (`os._exit`), once its `finally` blocks have run (after SIGTERM too).  Every file a job writes
    is written and fsynced by then (models/atomic.py), so the interpreter's shutdown, which
    takes seconds with torch loaded, has nothing left to do.  An unexpected exception still
    ends it the usual way (a traceback on stderr, exit status 1)."""
    try:
        code = main()
    except SystemExit as e:  # SIGTERM or SIGHUP (exit_on_sigterm)
        code = e.code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the keyboard has gone: no one reads it
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def emit(obj: dict) -> None:
    """The job's side: one message, flushed at once so that the keyboard sees it now."""
    print(json.dumps(obj), flush=True)


class JobProcess:
    """`python -m module SPEC_JSON`, followed line by line; `what` names it in errors ("learning")."""

    def __init__(self, module: str, spec: dict, what: str):
        self.module, self.spec, self.what = module, spec, what
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def follow(self, on_message: Callable[[dict], None]) -> None:
        """Run the job to its end, calling `on_message` with each message in this thread.

        FedkbError: "WHAT stopped" after `stop()`, the job's own `{"error": ...}`, or the
        last line of its stderr when it died otherwise (a crash, a signal)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1",  # one core trains, the other types
               "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", self.module, json.dumps(self.spec)]
        error = None
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as err:
            with self._lock:  # a stop() that came first, before the process exists, is not lost
                if self._stopped:
                    raise FedkbError(f"{self.what} stopped")
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                              text=True, encoding="utf-8", env=env)
            try:
                for line in self._proc.stdout:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(msg, dict):
                        continue
                    if "error" in msg:
                        error = msg["error"]
                    elif not self._stopped:
                        on_message(msg)
            except BaseException:  # on_message failed: the process is not left running on its own
                self.stop()
                raise
            finally:
                self._proc.stdout.close()
                code = self._proc.wait()
            if self._stopped:
                raise FedkbError(f"{self.what} stopped")
            if error is not None:
                raise FedkbError(str(error))
            if code != 0:
                err.seek(0)
                last = (err.read().strip().splitlines() or [f"exit status {code}"])[-1]
                raise FedkbError(f"the {self.what} process failed: {last}")

    def stop(self, wait: float | None = None) -> bool:
        """End the process, if it runs (the app quits, the profile changes, the user stops it).

        With `wait`, wait up to that many seconds for it to exit, then kill it (SIGKILL) and wait as
        long again, so that it writes nothing after this returns True (it has exited, or never
        started); False: it still runs.  Without, return at once: whether it had exited."""
        with self._lock:  # a follow() yet to start its process sees _stopped and never starts it
            self._stopped = True
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
        if proc is None:
            return True
        if wait is not None:
            try:
                proc.wait(wait)  # follow()'s thread may reap it first: this then sees its status
            except subprocess.TimeoutExpired:  # SIGTERM not heeded in time
                proc.kill()
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        return proc.returncode is not None
