"""Typing while "Learn now" trains: key -> suggestions, with the learning in its own process or in a thread.

    python bench/bench_learn_latency.py [--user hamlet.HAMLET] [--users-file data/shakespeare.jsonl.gz] [--every 0.15]

Opens the keyboard headless (`App.run_test`) on a simulated user's profile, presses
ctrl+l, and types held-out text at one key every `--every` seconds (a fast typist) until
the learning has finished.  Each key is timed from the key event sent to the app's driver
until the suggestion strip has been given the new suggestions (SuggestionStrip.show).
`stall_ms`: the longest time the event loop came back late for the next key (a frozen UI).

Three modes in one run, each on a fresh device folder:
* `idle`: no learning, the same keys: the reference;
* `process`: the keyboard as it is, "Learn now" in `python -m keyboard.learner` (keyboard/learner.py);
* `thread`: the keyboard as it was, `KeyboardSession.learn` in the app's worker thread (the
  learner's `run` replaced by an in-process call), torch imported by that first learning.

Prints one JSON object: per mode p50/p95/p99/max in ms, keys typed, the stall, the seconds
the learning took from ctrl+l, and the p95 ratios against `idle`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_tui_latency import _pcts  # noqa: E402  (percentiles as the keystroke bench reports them)


async def _type_while_learning(app, keys: list[str], every: float, learn: bool, max_keys: int) -> dict:
    from textual import events

    from keyboard.widgets.suggestions import SuggestionStrip

    shown = {"t": 0.0}
    show = SuggestionStrip.show

    def timed_show(self, words):
        show(self, words)
        shown["t"] = time.perf_counter()

    SuggestionStrip.show = timed_show
    lat, stall = [], 0.0
    try:
        async with app.run_test(size=(100, 24)) as pilot:
            await pilot.pause()
            screen = app.screen
            t_start = time.perf_counter()
            if learn:
                app._driver.send_message(events.Key("ctrl+l", None))
            typed = screen.typing.text
            due = time.perf_counter()
            learned_at = None
            for k in keys[:max_keys]:
                stall = max(stall, time.perf_counter() - due)
                typed += " " if k == "space" else k
                shown["t"] = 0.0
                t0 = time.perf_counter()
                app._driver.send_message(events.Key(k, " " if k == "space" else k))
                while time.perf_counter() < t0 + 10:
                    await asyncio.sleep(0)
                    if shown["t"] and screen.typing.text == typed:
                        break
                lat.append(shown["t"] - t0)
                due = t0 + every
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if learn and learned_at is None and "Learned from" in str(screen.query_one("#learn-result").render()):
                    learned_at = time.perf_counter() - t_start
                    break
                if not learn and len(lat) >= max_keys:
                    break
            result = str(screen.query_one("#learn-result").render())
    finally:
        SuggestionStrip.show = show
    return {**_pcts(lat), "stall_ms": round(stall * 1000, 1),
            "learn_seconds": round(learned_at, 2) if learned_at else None,
            "learn_result": result if learn else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users-file", type=Path, default=REPO / "data" / "shakespeare.jsonl.gz")
    ap.add_argument("--user", default="hamlet.HAMLET", help="the simulated user whose device learns (its history)")
    ap.add_argument("--every", type=float, default=0.15, help="seconds between keys (default 0.15)")
    ap.add_argument("--max-keys", type=int, default=400, help="keys at most per mode (idle types 60)")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as `fedkb` sets it
    from keyboard.app import FedkbApp
    from keyboard.learner import LearnerProcess
    from models.datasets import load_users

    text = " ".join(m for u in load_users() for m in u.future if m.isascii()).lower()
    keys = ["space" if c == " " else c for c in text if c.isalpha() or c == " "][: args.max_keys]

    out = {"user": args.user, "users_file": str(args.users_file), "every_s": args.every}
    process_run = LearnerProcess.run
    for mode in ("idle", "process", "thread"):
        with tempfile.TemporaryDirectory() as tmp:
            app = FedkbApp(None, None, devices_root=Path(tmp), user_id=args.user, users_file=args.users_file,
                           cursor_blink=False, extra_screens=False)
            if mode == "thread":  # the keyboard before keyboard/learner.py: the app's worker thread learns itself
                LearnerProcess.run = lambda self, on_step=None: app.session.learn(on_step=on_step)
            try:
                out[mode] = asyncio.run(_type_while_learning(app, keys, args.every, mode != "idle",
                                                             60 if mode == "idle" else args.max_keys))
            finally:
                LearnerProcess.run = process_run
            out[mode]["keyboard_process_has_torch"] = "torch" in sys.modules
    for mode in ("process", "thread"):
        out[f"{mode}_p95_over_idle"] = round(out[mode]["p95_ms"] / out["idle"]["p95_ms"], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
