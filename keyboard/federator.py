"""The live federation's rounds in a process of their own, so that typing goes on while they run.

One of the keyboard's background jobs (keyboard/jobs.py: why a process, and its
protocol).  The federation screen (keyboard/screens/federation.py) starts

    python -m keyboard.federator SPEC_JSON

which runs `federation.run.Simulation` round after round with one torch thread (as
`fedkb simulate --threads 1` does, into the same kind of run folder, discovering new words
where the spec gives a TrieHH threshold, as `--discover --theta` does) and reports on
stdout, one JSON object a line:

    {"note": "..."}                                   what the run could not do as asked, what resuming repaired
    {"round": {... the round's metrics ...}, "checkpoint": "RUN/checkpoints/round-0003"}
    {"done": 10}                                      the last round finished (exit status 0)
    {"error": "one line"}                             a user error: corrupt files, a busy run folder (exit status 2)

`stop()` (the user stops the rounds, or quits) ends the process at once: SIGTERM becomes
SystemExit, so the round under way is dropped, its temporary files are removed, the
engine's workers end and the run folder is unlocked.  Every finished round is already
committed (atomically), so the run can be resumed (`fedkb simulate --resume --out RUN`).
A round committed before the stop whose line was not read yet (or not written) is not
lost: `run` reads it from the run folder once the process has ended and reports it too.

In a thread of the keyboard's process (where the screen ran them before), the rounds'
Python holds the GIL between torch calls, and the keyboard's process would import torch
and hold the population and an evaluator: typing while 3 rounds of 10 clients run, key to
suggestions p95 10.4-18.0 ms, stalls of 127-179 ms and 684-745 MB for the keyboard's
process, against p95 3.7-3.8 ms (idle 3.7-3.9), no stall over 2.4 ms (a new global model is
made ready in a worker thread and only swapped in on the UI thread) and 147 MB with this
process (`python bench/bench_background_latency.py --job rounds`, three runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from keyboard.jobs import JobProcess, emit, exit_now, exit_on_sigterm
from federation.runfolder import checkpoint_dir, latest_round, read_metrics
from models.errors import FedkbError
from models.jsonvalues import is_int, is_number


def spec(run_dir: Path, sim, model_dir: Path | None, tokenizer_path: Path | None, users_file: Path | None,
         resume: bool, theta: int | None = None) -> dict:
    """What the rounds' process needs (JSON values only); `sim` is a federation.config.SimulationConfig;
    `theta`: discover new words with this TrieHH threshold (`fedkb simulate --discover --theta`)."""
    path = lambda p: str(p) if p is not None else None  # noqa: E731
    return {"run_dir": str(run_dir), "sim": sim.to_json(), "model": path(model_dir), "tokenizer": path(tokenizer_path),
            "users_file": path(users_file), "resume": bool(resume), "theta": theta}


_FIGURES = ("loss", "top1", "top3", "ksr", "eval_loss", "epsilon")  # each a number or null
_COUNTS = ("aggregated", "selected", "rejected")  # each a whole number


def _figure(v) -> bool:
    """A number that formats as a float (a whole number past a float's range, which JSON allows, does not)."""
    return is_number(v) and (isinstance(v, float) or abs(v) <= sys.float_info.max)


def _round_ok(m) -> bool:
    """Whether a round's metrics are what the screen draws and logs (keyboard/commands/simulate.py's
    `_line`): an integer round >= 1, its figures numbers, its counts whole numbers, its timings (where
    given) a number of seconds (anything else is ignored, like a line that is not JSON)."""
    if not isinstance(m, dict) or not (is_int(m.get("round")) and m["round"] >= 1):
        return False
    if not all(m.get(k) is None or _figure(m[k]) for k in _FIGURES) or not all(is_int(m.get(k, 0)) for k in _COUNTS):
        return False
    d, t = m.get("discovery"), m.get("timings")
    added = d.get("added", []) if isinstance(d, dict) else []
    return ((d is None or isinstance(d, dict)) and isinstance(added, list)
            and all(isinstance(a, dict) and isinstance(a.get("word"), str) for a in added)
            and ("timings" not in m or isinstance(t, dict) and _figure(t.get("round_s"))))


def committed_since(run_dir: Path, after: int) -> list[tuple[dict, Path]]:
    """The rounds after `after` that the run folder committed, each (metrics, checkpoint) as the process
    reports it."""
    lines = {m["round"]: m for m in read_metrics(run_dir) if _round_ok(m)}  # the last line of a round
    return [(lines[r], checkpoint_dir(run_dir, r)) for r in range(after + 1, (latest_round(run_dir) or 0) + 1) if r in lines]


class FederatorProcess(JobProcess):
    """Rounds of a run folder, run by `python -m keyboard.federator`; `run` blocks (call it from a worker)."""

    def __init__(self, spec: dict):
        super().__init__("keyboard.federator", spec, "federation")
        self.round = 0  # the round the run folder has reached, as far as `run` knows

    def run(self, on_note: Callable[[str], None], on_round: Callable[[dict, Path], None]) -> int:
        """Run the rounds; returns the round the run reached. FedkbError with the process's reason; after
        `stop()`, the rounds the run folder committed that the process had not reported are reported first."""
        out = {}
        run_dir = Path(self.spec["run_dir"])
        self.round = latest_round(run_dir) or 0  # before the process starts: a resumed run's rounds are not its own

        def on_message(msg: dict) -> None:
            if "note" in msg:
                on_note(str(msg["note"]))
            elif _round_ok(msg.get("round")) and isinstance(msg.get("checkpoint"), str):
                self.round = msg["round"]["round"]
                on_round(msg["round"], Path(msg["checkpoint"]))
            elif "done" in msg:
                out["done"] = msg["done"]

        try:
            self.follow(on_message)
        except FedkbError:
            if self.stopped:  # the process has ended: what it committed is all in the folder
                for m, ckpt in committed_since(run_dir, self.round):
                    self.round = m["round"]
                    on_round(m, ckpt)
            raise
        if not isinstance(out.get("done"), int):
            raise FedkbError("the federation process failed: it ended without finishing its rounds")
        return out["done"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from federation.config import SimulationConfig

    try:
        s = json.loads(argv[0])
        sim = SimulationConfig.from_json(s["sim"])
        paths = {k: Path(s[k]) if s[k] is not None else None for k in ("model", "tokenizer", "users_file")}
        run_dir, resume, theta = Path(s["run_dir"]), bool(s["resume"]), s.get("theta")
        if theta is not None and not isinstance(theta, int):
            raise TypeError(f"theta must be a whole number, not {theta!r}")
    except (IndexError, KeyError, TypeError, ValueError) as e:
        emit({"error": f"usage: python -m keyboard.federator SPEC_JSON (keyboard/federator.py's spec): {e!r}"})
        return 2
    exit_on_sigterm()
    import torch

    from federation.discovery import discovery_for_run
    from federation.run import Simulation
    from models import native

    torch.set_num_threads(1)  # one core trains, the other types
    try:
        discover = discovery_for_run(run_dir, theta, resume)
        run = Simulation(run_dir, sim, paths["model"], paths["tokenizer"], paths["users_file"], resume=resume,
                         discover=discover)
    except (FedkbError, OSError) as e:  # OSError: the run or device folders cannot be written
        emit({"error": str(e)})
        return 2
    try:
        for note in run.notes:
            emit({"note": note})
        emit({"note": f"population {run.population.size} users, {len(run.eval_ids)} held out for evaluation"})
        if native.will_compile():
            emit({"note": "compiling the native training kernels (once per machine, ~1 min) ..."})
        while not run.done:
            m = run.step()
            emit({"round": m, "checkpoint": str(checkpoint_dir(run.run_dir, m["round"]))})
    except (FedkbError, OSError) as e:
        emit({"error": str(e)})
        return 2
    finally:
        run.close()
    emit({"done": run.round})
    return 0


if __name__ == "__main__":
    exit_now(main)
