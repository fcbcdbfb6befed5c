"""What a new model costs the keyboard's UI thread (prints one JSON object).

    python bench/bench_swap.py [--reps 20] [--model DIR]

Twice a minute in the live rounds a new global model comes (f6), and "Learn now" ends with a
new personal delta; meanwhile the user types.  The keyboard makes each new model ready in a
worker thread (`KeyboardSession.ready`: the files read and checked, the device's delta put on
top, the word table of 10,000 words composed) and only swaps it in on the UI thread
(`KeyboardSession.install`: the device's words, the mask, the context fed again).  This
times, on the shipped model with a device that has a personal delta and a personal word, a
context of twelve words typed:

* `new_global`: a new global model (the base with every weight scaled by 0.99, written as a
  round's checkpoint);
* `new_delta`: the device's delta, just rewritten (a learning ended);

each as `worker_ms` (ready) and `ui_ms` (install, then the first suggestions), medians and
p90 over --reps, alternating with the reference measured in the same run: `one_thread_ms`,
all of it on the UI thread (`KeyboardSession.use_global` / `open`), what a key pressed
meanwhile waited for before the split.  `ui_over_one_thread` is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONTEXT = "i am going to the store and then we will see what "


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 2), "p90": round(float(np.percentile(xs, 90)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: the shipped base)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")

    import torch

    from keyboard.session import KeyboardSession
    from models.checkpoint import load_model, save_checkpoint
    from models.modelfile import default_paths

    with tempfile.TemporaryDirectory(prefix="fedkb-swap-") as folder:  # removed on errors too
        tmp = Path(folder)
        ckpt, tok = load_model(args.model)
        base = args.model or default_paths()[0]
        with torch.no_grad():
            for p in ckpt.model.parameters():
                p.mul_(0.99)
        save_checkpoint(tmp / "round1", ckpt.model, ckpt.vocab, tok, meta={"kind": "global", "round": 1})
        s = KeyboardSession(base, devices_root=tmp / "devices")
        s.add_personal_words(["zorblaxx"])

        def learned(i: int) -> None:  # a learning ended: a new delta on the device
            s._save_delta({k: g + np.float32(1e-3 * (1 + i % 2)) for k, g in s.global_weights.items()}, {"messages": 1})

        learned(0)
        s.open(s.user_id)

        out: dict = {"reps": args.reps, "vocabulary": len(s.vocab), "context_words": len(CONTEXT.split())}
        cases = {  # (before each swap, the swap's argument, the swap all on one thread)
            "new_global": (lambda i: None, lambda i: tmp / "round1" if i % 2 == 0 else base, s.use_global),
            "new_delta": (learned, lambda i: None, lambda d: s.open(s.user_id)),
        }
        for name, (before, model_dir, one_thread) in cases.items():
            worker, ui, ref = [], [], []
            for i in range(0, 2 * args.reps, 2):
                before(i)
                s.predictor.set_context(CONTEXT)
                d, ready = model_dir(i), []
                worker.append(_ms(lambda: ready.append(s.ready(d))))
                ui.append(_ms(lambda: (s.install(ready[0]), s.predictor.suggest(""))))
                before(i + 1)
                s.predictor.set_context(CONTEXT)
                d = model_dir(i + 1)
                ref.append(_ms(lambda: (one_thread(d), s.predictor.suggest(""))))
            assert s.has_delta, "the bench's device lost its delta"
            out[name] = {"worker_ms": _summary(worker), "ui_ms": _summary(ui), "one_thread_ms": _summary(ref),
                         "ui_over_one_thread": round(statistics.median(ui) / statistics.median(ref), 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        main()
    except FedkbError as e:
        sys.exit(f"bench_swap: error: {e}")
