"""How long the keyboard takes to open (prints one JSON object).

    python bench/bench_startup.py [--reps 5] [--model DIR]

Each measurement is a fresh Python process, timed from its start until the keyboard app has
mounted its typing screen, shown its first suggestions and gone idle (headless,
`App.run_test`, the shipped model, a profile with a personal delta: the case that reads two
weight files); the process exits there.  Measured in the same run, alternating with it:

* `import_torch`: a process that only runs `import torch`, what the keyboard paid before it
  typed on NumPy (models/numpy_predictor.py) and is the floor of anything that imports it;
* `bare_textual`: a process that mounts a Textual app holding one Input: Textual's own start.

Medians over --reps, in seconds; `keyboard_over_import_torch` is the ratio of the medians.
The keyboard process also reports whether torch was ever imported (it must not be), and
both it and the `import torch` process their peak resident memory (`peak_rss_mb`, medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KEYBOARD = """
import asyncio, sys
from pathlib import Path
from keyboard.app import FedkbApp
app = FedkbApp({model}, None, devices_root=Path({devices!r}), user_id="u0000", cursor_blink=False)
async def main():
    async with app.run_test() as pilot:
        await pilot.pause()
        print(app.session.label, "|", app.screen.typing.suggestions, "|", "torch" in sys.modules, "|", {hwm})
asyncio.run(main())
"""

# the process's peak resident memory, in MB (Linux: /proc/self/status's VmHWM)
HWM = "next((int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')), 0.0)"

BARE_TEXTUAL = """
import asyncio
from textual.app import App
from textual.widgets import Input
class Bare(App):
    def compose(self):
        yield Input()
async def main():
    async with Bare().run_test() as pilot:
        await pilot.pause()
        print("mounted")
asyncio.run(main())
"""


def timed(code: str) -> tuple[float, str]:
    """Seconds for a fresh `python -c code` from its start to its exit, and its last line of output."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, (out.stdout.strip().splitlines() or [""])[-1]


def make_delta(model: Path | None, devices: Path) -> None:
    """A personal delta on simulated user u0000's device (one short Learn now)."""
    from federation.config import ClientConfig
    from keyboard.session import KeyboardSession, LearnConfig

    learn = LearnConfig(client=ClientConfig(epochs=1.0), max_messages=20, eval_messages=5)
    session = KeyboardSession(model, None, devices, "u0000", learn_cfg=learn)
    session.learn()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5, help="fresh processes of each kind, alternating (default: 5)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the shipped base)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")

    runs: dict[str, list[float]] = {"keyboard": [], "import_torch": [], "bare_textual": []}
    rss: dict[str, list[float]] = {"keyboard": [], "import_torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_delta(args.model, Path(tmp))
        codes = {"keyboard": KEYBOARD.format(model=repr(str(args.model)) if args.model else None, devices=tmp, hwm=HWM),
                 "import_torch": f"import torch; print({HWM})", "bare_textual": BARE_TEXTUAL}
        for name, code in codes.items():  # warm the file cache once
            timed(code)
        for _ in range(args.reps):
            for name, code in codes.items():
                seconds, last = timed(code)
                runs[name].append(seconds)
                if name == "keyboard":
                    label, suggestions, torch_loaded, mb = last.split(" | ")
                    rss[name].append(float(mb))
                elif name == "import_torch":
                    rss[name].append(float(last))
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    print(json.dumps({
        "reps": args.reps, "median_s": med, "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "keyboard_over_import_torch": round(med["keyboard"] / med["import_torch"], 3),
        "peak_rss_mb": {k: round(statistics.median(v), 1) for k, v in rss.items()},
        "keyboard_model": label, "keyboard_first_suggestions": suggestions, "keyboard_imported_torch": torch_loaded == "True",
    }, indent=1))


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        main()
    except FedkbError as e:
        sys.exit(f"bench_startup: error: {e}")
