""""Learn now" in a process of its own, so that typing never waits for training.

One of the keyboard's background jobs (keyboard/jobs.py: why a process, and its
protocol):

    python -m keyboard.learner SPEC_JSON

opens the same profile from its files (global model, tokenizer, device folder),
fine-tunes the personal delta (`KeyboardSession.learn`, which writes it atomically
to the device) with one torch thread, and reports on stdout, one JSON object a line:

    {"step": 3, "total": 40, "loss": 4.1}       as the steps go
    {"result": {... LearnResult ...}}           at the end (exit status 0)
    {"error": "one line"}                       a user error: corrupt files, a full disk (exit status 2)

In a thread of the keyboard's process the same training slowed typing: the worker's
Python holds the GIL between torch calls (`python bench/bench_background_latency.py`: key to
suggestions p95 23 ms and p99 66 ms while learning in a thread, and a 182 ms freeze
while torch was imported; 5.5 / 7.8 ms with this process; 3.9 / 4.4 ms idle).  The cost
is a process start, torch's import included (~1.3 s), on every "Learn now".
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from federation.config import ClientConfig
from keyboard.jobs import JobProcess, emit, exit_now, exit_on_sigterm
from keyboard.session import KeyboardSession, LearnConfig, LearnResult
from models.errors import FedkbError


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


class LearnerProcess(JobProcess):
    """One "Learn now" of a profile, run by `python -m keyboard.learner`; `run` blocks (call it from a worker)."""

    def __init__(self, session: KeyboardSession):
        super().__init__("keyboard.learner", spec(session), "learning")
        self.user_id = session.user_id

    def run(self, on_step: Callable[[int, int, float], None] | None = None) -> LearnResult:
        """Train; returns the result once the delta is on the device. FedkbError with the process's reason."""
        out = {}

        def on_message(msg: dict) -> None:
            if "step" in msg and on_step is not None:
                on_step(msg["step"], msg["total"], msg["loss"])
            if isinstance(msg.get("result"), dict):
                out["result"] = msg["result"]

        self.follow(on_message)
        if "result" not in out:
            raise FedkbError("the learning process failed: it ended without a result")
        return LearnResult(**out["result"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        s = json.loads(argv[0])
        learn = LearnConfig(**{**s["learn"], "client": ClientConfig(**s["learn"]["client"])})
    except (IndexError, KeyError, TypeError, ValueError) as e:
        emit({"error": f"usage: python -m keyboard.learner SPEC_JSON (keyboard/learner.py's spec): {e!r}"})
        return 2
    exit_on_sigterm()
    try:
        session = KeyboardSession(Path(s["model"]) if s["model"] else None, Path(s["tokenizer"]), Path(s["devices"]),
                                  s["user"], users_file=Path(s["users_file"]) if s["users_file"] else None,
                                  learn_cfg=learn)
        result = session.learn(on_step=lambda step, total, loss: emit({"step": step, "total": total, "loss": loss}))
    except (FedkbError, OSError) as e:  # OSError: the personal model could not be written (a full disk)
        emit({"error": str(e)})
        return 2
    emit({"result": asdict(result)})
    return 0


if __name__ == "__main__":
    exit_now(main)
