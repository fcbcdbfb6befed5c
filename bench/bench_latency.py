"""Predictor latency, `fedkb predict` process time and model size, against a same-run reference.

    python bench/bench_latency.py [--model DIR] [--calls 1000] [--threads 1]

Prints one JSON object.  "commit" = what the keyboard does when a word is
finished: `Predictor.commit(word)` (one LSTM step + log-softmax over the
vocabulary) followed by `suggest()` (top-3).  "keystroke" = a key inside a
word: `suggest(prefix)` (a prefix filter over the cached scores, no model
call).  Each is timed over `--calls` calls after warm-up, on words and
prefixes of the users' held-out text, for the torch `Predictor` and, under
"numpy", for `NumpyPredictor` (models/numpy_predictor.py: what the keyboard
and `fedkb predict` type with).  The reference is a plain (1, 96) x
(96, 10000) matmul timed the same way in the same run, so the ratios stay
meaningful on a loaded machine.  Targets (issue 2): commit p99 <= 2 ms,
keystroke p99 <= 0.5 ms, model on disk <= 10 MB, `fedkb predict` well under 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _pcts(samples_s: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples_s)
    q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]  # noqa: E731
    return {"p50_ms": round(q(0.50), 4), "p99_ms": round(q(0.99), 4), "max_ms": round(ms[-1], 4), "n": len(ms)}


def _time_calls(fn, args_list, warmup: int) -> list[float]:
    for a in args_list[:warmup]:
        fn(a)
    out = []
    for a in args_list[warmup:]:
        t = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default data/base)")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (the keyboard uses 1)")
    ap.add_argument("--predict-runs", type=int, default=5, help="whole-process `fedkb predict` runs (0 = skip)")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.threads < 1 or args.predict_runs < 0:
        ap.error("--calls and --threads must be >= 1, --warmup and --predict-runs >= 0")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # NumPy's BLAS, as `fedkb type` sets it, before it loads
    import torch

    from models.checkpoint import META, WEIGHTS, default_paths, load_model
    from models.datasets import load_users
    from models.numpy_predictor import NumpyPredictor
    from models.predictor import Predictor
    from models.text import words

    torch.set_num_threads(args.threads)
    ckpt, tok = load_model(args.model, args.tokenizer)
    model_dir = args.model or default_paths()[0]
    pred = Predictor(ckpt.model, ckpt.vocab, tok)

    stream = [w for u in load_users() for m in u.future for w in words(m)]
    n = args.calls + args.warmup
    seq = (stream * (n // max(len(stream), 1) + 1))[:n]

    known = [w for w in stream if w in pred and len(w) >= 2]
    prefixes = [w[: 1 + i % min(3, len(w) - 1)] for i, w in enumerate((known * (n // max(len(known), 1) + 1))[:n])]

    def time_keys(p) -> tuple[list[float], list[float]]:
        """A predictor's seconds per committed word (one step + top-3) and per keystroke inside a word."""
        def commit(w):
            p.commit(w)
            p.suggest()

        p.reset()
        return _time_calls(commit, seq, args.warmup), _time_calls(p.suggest, prefixes, args.warmup)

    commit_s, key_s = time_keys(pred)
    fast_commit_p, fast_key_p = map(_pcts, time_keys(NumpyPredictor.load(model_dir, tok)))  # the keyboard's predictor

    g = torch.Generator().manual_seed(0)
    h, table = torch.randn(1, 96, generator=g), torch.randn(96, 10000, generator=g)
    ref_s = _time_calls(lambda _: h @ table, list(range(n)), args.warmup)

    commit_p, key_p, ref_p = _pcts(commit_s), _pcts(key_s), _pcts(ref_s)
    size_mb = sum((Path(model_dir) / f).stat().st_size for f in (WEIGHTS, META)) / 1e6
    out = {
        "model": str(model_dir), "vocab": len(ckpt.vocab), "threads": args.threads,
        "commit": commit_p, "keystroke": key_p, "numpy": {"commit": fast_commit_p, "keystroke": fast_key_p},
        "reference_matmul_96x10000": ref_p,
        "commit_p50_over_reference": round(commit_p["p50_ms"] / ref_p["p50_ms"], 2),
        "keystroke_p50_over_reference": round(key_p["p50_ms"] / ref_p["p50_ms"], 2),
        "model_mb": round(size_mb, 3),
        "targets": {"commit_p99_ms": 2.0, "keystroke_p99_ms": 0.5, "model_mb": 10.0, "predict_process_s": 2.0},
    }
    out["meets"] = {"commit": commit_p["p99_ms"] <= 2.0, "keystroke": key_p["p99_ms"] <= 0.5, "size": size_mb <= 10.0,
                    "numpy_commit": fast_commit_p["p99_ms"] <= 2.0, "numpy_keystroke": fast_key_p["p99_ms"] <= 0.5}

    if args.predict_runs and (REPO / "keyboard" / "commands" / "predict.py").exists():
        cmd = [sys.executable, "-m", "keyboard.cli", "predict", "how are y"]
        if args.model:
            cmd += ["--model", str(args.model)]
        if args.tokenizer:
            cmd += ["--tokenizer", str(args.tokenizer)]
        walls, rc = [], 0
        for _ in range(args.predict_runs):
            t = time.perf_counter()
            rc = subprocess.run(cmd, cwd=REPO, capture_output=True).returncode or rc
            walls.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
        torch_import = time.perf_counter() - t
        out["predict_process_s"] = {"median": round(statistics.median(walls), 3), "max": round(max(walls), 3),
                                    "runs": len(walls), "rc": rc, "reference_python_import_torch_s": round(torch_import, 3)}
        out["meets"]["predict_process"] = rc == 0 and statistics.median(walls) < 2.0
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        sys.exit(main())
    except FedkbError as e:
        sys.exit(f"bench_latency: error: {e}")
