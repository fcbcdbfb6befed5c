""""Learn now" in a process of its own, so that typing never waits for training.

A phone's keyboard does not train in its UI process: on-device training runs as a
background job the OS schedules (Bonawitz et al. 2019, "Towards Federated Learning at
Scale: System Design"), and the keyboard picks up the model it leaves.  Here too: the keyboard types on NumPy and never imports torch, and

    python -m keyboard.learner SPEC_JSON

opens the same profile from its files (global model, tokenizer, device folder),
fine-tunes the personal delta (`KeyboardSession.learn`, which writes it atomically
to the device) with one torch thread, and reports on stdout, one JSON object a line:

    {"step": 3, "total": 40, "loss": 4.1}       as the steps go
    {"result": {... LearnResult ...}}           at the end (exit status 0)
    {"error": "one line"}                       a user error: corrupt files, a full disk (exit status 2)

In a thread of the keyboard's process the same training slowed typing: the worker's
Python holds the GIL between torch calls (`python bench/bench_learn_latency.py`: key to
suggestions p95 23 ms and p99 66 ms while learning in a thread, and a 182 ms freeze
while torch was imported; 5.5 / 7.8 ms with this process; 3.9 / 4.4 ms idle).  The cost
is a process start, torch's import included (~1.3 s), on every "Learn now".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from federation.config import ClientConfig
from keyboard.session import KeyboardSession, LearnConfig, LearnResult
from models.errors import FedkbError

_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the keyboard package


def spec(session: KeyboardSession) -> dict:
    """What the learning process needs to open the same profile from files (JSON values only)."""
    return {
        "model": str(session.model_dir) if session.model_dir else None,
        "tokenizer": str(session.tokenizer.path),
        "devices": str(session.devices_root),
        "user": session.user_id,
        "users_file": str(session.users_file) if session.users_file else None,
        "learn": asdict(session.learn_cfg),
    }


class LearnerProcess:
    """One "Learn now" of a profile, run by `python -m keyboard.learner`; `run` blocks (call it from a worker)."""

    def __init__(self, session: KeyboardSession):
        self.spec = spec(session)
        self.user_id = session.user_id
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self._lock = threading.Lock()

    def run(self, on_step: Callable[[int, int, float], None] | None = None) -> LearnResult:
        """Train; returns the result once the delta is on the device. FedkbError with the process's reason."""
        env = {**os.environ, "OMP_NUM_THREADS": "1",  # one core trains, the other types
               "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "keyboard.learner", json.dumps(self.spec)]
        result = error = None
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as err:
            with self._lock:  # a stop() that came first, before the process exists, is not lost
                if self._stopped:
                    raise FedkbError("learning stopped")
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                              text=True, encoding="utf-8", env=env)
            try:
                for line in self._proc.stdout:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue  # not one of ours (a library printing to stdout)
                    if not isinstance(msg, dict):
                        continue
                    if "step" in msg and on_step is not None:
                        on_step(msg["step"], msg["total"], msg["loss"])
                    result, error = msg.get("result", result), msg.get("error", error)
            finally:
                self._proc.stdout.close()
                code = self._proc.wait()
            if self._stopped:
                raise FedkbError("learning stopped")
            if error is not None:
                raise FedkbError(str(error))
            if code != 0 or not isinstance(result, dict):
                err.seek(0)
                last = (err.read().strip().splitlines() or [f"exit status {code}"])[-1]
                raise FedkbError(f"the learning process failed: {last}")
        return LearnResult(**result)

    def stop(self) -> None:
        """End the process, if it runs (the app quits, or the profile changes); its delta is not written."""
        with self._lock:
            self._stopped = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        s = json.loads(argv[0])
        learn = LearnConfig(**{**s["learn"], "client": ClientConfig(**s["learn"]["client"])})
    except (IndexError, KeyError, TypeError, ValueError) as e:
        _emit({"error": f"usage: python -m keyboard.learner SPEC_JSON (keyboard/learner.py's spec): {e!r}"})
        return 2
    try:
        session = KeyboardSession(Path(s["model"]) if s["model"] else None, Path(s["tokenizer"]), Path(s["devices"]),
                                  s["user"], users_file=Path(s["users_file"]) if s["users_file"] else None,
                                  learn_cfg=learn)
        result = session.learn(on_step=lambda step, total, loss: _emit({"step": step, "total": total, "loss": loss}))
    except (FedkbError, OSError) as e:  # OSError: the personal model could not be written (a full disk)
        _emit({"error": str(e)})
        return 2
    _emit({"result": asdict(result)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
