"""Typing while a background job trains: key -> suggestions, with the job in its own process or in a thread.

    python bench/bench_background_latency.py [--job learn|rounds] [--user hamlet.HAMLET]
        [--users-file data/shakespeare.jsonl.gz] [--every 0.15] [--rounds 3] [--engine sequential|parallel]

Opens the keyboard headless (`App.run_test`) on a simulated user's profile, starts the
job, and types held-out text at one key every `--every` seconds (a fast typist) until
the job has finished.  The text is the chat users' future messages (data/users.jsonl.gz)
whatever `--user` and `--users-file` are: the same keys in every mode and run.  Each key is
timed from the key event sent to the app's driver until the suggestion strip has been given
the new suggestions (SuggestionStrip.show).
`stall_ms`: the longest time the event loop came back late for the next key (a frozen UI).

The jobs (keyboard/jobs.py):
* `learn`: "Learn now" (ctrl+l) on the profile's history;
* `rounds`: the live federation (f6, then escape back to typing): `--rounds` rounds of
  10 clients over `--users-file`'s users, from the shipped base model, each new global
  model typed with as it comes.

Three modes in one run, each on fresh device and run folders:
* `idle`: no job, the same keys (`--idle-keys` of them): the reference;
* `process`: the keyboard as it is, the job in `python -m keyboard.learner` / `keyboard.federator`;
* `thread`: the job in the app's worker thread (the job's `run` replaced by an in-process
  call, torch imported by it, one torch thread as in the process): "Learn now" as it was
  before keyboard/learner.py, the rounds as the federation screen ran them before
  keyboard/federator.py (it then stopped them when one went back to typing).

Prints one JSON object: per mode p50/p95/p99/max in ms, keys typed, the stall, the seconds
the job took from its start, the keyboard process's peak memory so far (the modes run in
the order above) and whether it imported torch, and the p95 ratios against `idle`, each over
samples of the same size (idle's first keys, as many as the mode typed, where idle typed more).
A key whose suggestions do not come within TIMEOUT_S is counted (`timeouts`) and recorded as
TIMEOUT_S.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_tui_latency import _pcts  # noqa: E402  (percentiles as the keystroke bench reports them)

TIMEOUT_S = 10.0  # a key whose suggestions have not come by then counts as a timeout


class Learn:
    """ctrl+l; done when the typing screen shows the learning's result."""

    def start(self, app) -> None:
        from textual import events

        app._driver.send_message(events.Key("ctrl+l", None))

    def done(self, app) -> bool:
        return "Learned from" in str(app.typing_screen.query_one("#learn-result").render())

    def result(self, app) -> str:
        return str(app.typing_screen.query_one("#learn-result").render())

    def in_thread(self, app):
        """`LearnerProcess.run` as an in-process call: the learning in the app's worker thread."""
        from keyboard.learner import LearnerProcess

        return LearnerProcess, lambda self, on_step=None: app.session.learn(on_step=on_step)


class Rounds:
    """f6, enter (the form's defaults), then back to typing; done when the live screen's rounds have ended."""

    def __init__(self, rounds: int, engine: str = "sequential"):
        self.rounds, self.engine = rounds, engine

    def start(self, app) -> None:
        app.push_extra("federation")
        self.screen = screen = app.screen

        def go() -> None:  # once the form is there: its defaults (ROUNDS x 10 clients), then back to typing
            screen.query_one("#fed-engine").value = self.engine
            screen.action_start()
            app.pop_screen()

        screen.call_after_refresh(go)

    def done(self, app) -> bool:
        return self.screen.ended

    def result(self, app) -> str:
        return f"{self.screen.rounds_done} rounds, typing with {app.session.label}"

    def in_thread(self, app):
        """`FederatorProcess.run` as an in-process call: the federation screen's rounds as they ran before."""
        from keyboard.federator import FederatorProcess

        def run(self, on_note, on_round):
            import torch

            from federation.config import SimulationConfig
            from federation.run import Simulation, checkpoint_dir

            torch.set_num_threads(1)
            s = self.spec
            sim = Simulation(Path(s["run_dir"]), SimulationConfig.from_json(s["sim"]), Path(s["model"]) if s["model"] else None,
                             Path(s["tokenizer"]), Path(s["users_file"]) if s["users_file"] else None)
            sim.run(on_round=lambda m: on_round(m, checkpoint_dir(sim.run_dir, m["round"])))
            return sim.round

        return FederatorProcess, run


async def _type_while(app, job, keys: list[str], every: float, max_keys: int) -> tuple[dict, list[float]]:
    from textual import events

    from keyboard.widgets.suggestions import SuggestionStrip

    shown = {"t": 0.0}
    show = SuggestionStrip.show

    def timed_show(self, words):
        show(self, words)
        shown["t"] = time.perf_counter()

    SuggestionStrip.show = timed_show
    lat, stall, timeouts = [], 0.0, 0
    try:
        async with app.run_test(size=(100, 24)) as pilot:
            await pilot.pause()
            screen = app.screen
            t_start = time.perf_counter()
            if job is not None:
                job.start(app)
                await pilot.pause()
            typed = screen.typing.text
            due = time.perf_counter()
            finished_at = None
            for k in keys[:max_keys]:
                stall = max(stall, time.perf_counter() - due)
                typed += " " if k == "space" else k
                shown["t"] = 0.0
                t0 = time.perf_counter()
                app._driver.send_message(events.Key(k, " " if k == "space" else k))
                while time.perf_counter() < t0 + TIMEOUT_S:
                    await asyncio.sleep(0)
                    if shown["t"] and screen.typing.text == typed:
                        lat.append(shown["t"] - t0)
                        break
                else:  # no suggestions within TIMEOUT_S: counted, and recorded as TIMEOUT_S (a lower bound)
                    lat.append(TIMEOUT_S)
                    timeouts += 1
                due = t0 + every
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if job is not None and job.done(app):
                    finished_at = time.perf_counter() - t_start
                    break
            result = job.result(app) if job is not None else None
    finally:
        SuggestionStrip.show = show
    return {**_pcts(lat), "timeouts": timeouts, "stall_ms": round(stall * 1000, 1),
            "job_seconds": round(finished_at, 2) if finished_at else None, "job_result": result}, lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", choices=("learn", "rounds"), default="learn")
    ap.add_argument("--users-file", type=Path, default=REPO / "data" / "shakespeare.jsonl.gz")
    ap.add_argument("--user", default="hamlet.HAMLET", help="the simulated user who types (and whose device learns)")
    ap.add_argument("--every", type=float, default=0.15, help="seconds between keys (default 0.15)")
    ap.add_argument("--max-keys", type=int, default=400, help="keys at most per job mode (default 400)")
    ap.add_argument("--idle-keys", type=int, default=150,
                    help="keys the idle reference types (default 150: about what the default jobs' modes type)")
    ap.add_argument("--rounds", type=int, default=3, help="--job rounds: rounds to run (default 3)")
    ap.add_argument("--engine", choices=("sequential", "parallel"), default="sequential",
                    help="--job rounds: the engine the live form is set to (parallel: two worker processes)")
    args = ap.parse_args(argv)
    if args.max_keys < 1 or args.idle_keys < 1 or args.rounds < 1 or not args.every >= 0:
        ap.error("--max-keys, --idle-keys and --rounds must be >= 1 and --every >= 0")

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as `fedkb` sets it
    import keyboard.screens.federation as federation_screen
    from keyboard.app import FedkbApp
    from models.datasets import load_users

    text = " ".join(m for u in load_users() for m in u.future if m.isascii()).lower()
    keys = ["space" if c == " " else c for c in text if c.isalpha() or c == " "][: max(args.max_keys, args.idle_keys)]
    federation_screen.ROUNDS = args.rounds

    out = {"job": args.job, "user": args.user, "users_file": str(args.users_file), "every_s": args.every,
           "typed_text": "the chat users' future messages (data/users.jsonl.gz)"}
    samples = {}
    if args.job == "rounds":
        out["engine"] = args.engine
    # the thread mode is the screen as it was, which ran the sequential engine only
    modes = ("idle", "process") if args.job == "rounds" and args.engine == "parallel" else ("idle", "process", "thread")
    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            federation_screen.RUNS_DIR = Path(tmp) / "runs"
            app = FedkbApp(None, None, devices_root=Path(tmp) / "devices", user_id=args.user,
                           users_file=args.users_file, cursor_blink=False,
                           extra_screens=args.job == "rounds" and mode != "idle")
            job = None if mode == "idle" else Learn() if args.job == "learn" else Rounds(args.rounds, args.engine)
            cls, process_run = (None, None)
            if mode == "thread":
                cls, thread_run = job.in_thread(app)
                process_run, cls.run = cls.run, thread_run
            try:
                out[mode], samples[mode] = asyncio.run(
                    _type_while(app, job, keys, args.every, args.idle_keys if mode == "idle" else args.max_keys))
            finally:
                if cls is not None:
                    cls.run = process_run
            out[mode]["keyboard_process_has_torch"] = "torch" in sys.modules
            # the keyboard process's peak so far: the modes run in this order, so each includes the ones before
            out[mode]["keyboard_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for mode in modes[1:]:  # against idle's first keys, as many as the mode typed: percentiles of samples of one size
        idle = _pcts(samples["idle"][: len(samples[mode])])
        out[f"{mode}_p95_over_idle"] = round(out[mode]["p95_ms"] / idle["p95_ms"], 2)
        out[f"{mode}_p95_over_idle_keys"] = idle["n"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        sys.exit(main())
    except FedkbError as e:
        sys.exit(f"bench_background_latency: error: {e}")
