"""One engine alone: the same K clients, round after round (prints one JSON object).

    python bench/bench_engine.py [--engine sequential] [--threads 1] [--k 30] [--rounds 4] [--model DIR]

bench_federation.py compares the engines; this runs one of them, after one warm-up round on two
clients, so that a profiler sees only client updates.  `--engine sequential --threads 1` is what
each of the parallel engine's workers runs.  Where a worker's time goes (README, Results,
"Session 18"):

    perf record -D 9000 -o /tmp/perf.data python bench/bench_engine.py
    perf report -i /tmp/perf.data --no-children --sort dso,symbol

(-D: start recording after 9 s, once the setup is done; the JSON's setup_s says how long it took.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from bench_federation import add_setup_args, setup, tasks_for, time_engine, train_flops_per_token  # noqa: E402


def main() -> None:
    from federation.engine_parallel import make_engine

    p = argparse.ArgumentParser()
    add_setup_args(p)
    p.add_argument("--engine", choices=("sequential", "parallel"), default="sequential")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (default: 1, a worker's)")
    p.add_argument("--workers", type=int, default=2, help="the parallel engine's worker processes")
    p.add_argument("--k", type=int, default=30, help="clients a round (default: 30)")
    p.add_argument("--rounds", type=int, default=4, help="rounds over the same clients (default: 4)")
    args = p.parse_args()
    if args.k < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--k, --rounds and --threads must be >= 1")

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        ck, tok, pop, client = setup(args, Path(d))
        tasks = tasks_for(pop, args.k)
        flops = train_flops_per_token(ck.model.cfg, len(ck.vocab))
        with make_engine(args.engine, ck.model.cfg, tok.path, pop.root, client, args.workers) as eng:
            eng.run(ck.model.state_dict(), ck.vocab, tasks[:2], lambda t, r: None)  # warm-up
            setup_s = time.perf_counter() - t0
            rows = []
            for _ in range(args.rounds):
                s, words = time_engine(eng, ck, tasks)
                rows.append({"seconds": round(s, 3), "words": words, "words_per_s": round(words / s, 1),
                             "gflops": round(words / s * flops / 1e9, 1)})
    print(json.dumps({"engine": args.engine, "threads": args.threads, "k": len(tasks), "setup_s": round(setup_s, 1),
                      "train_flops_per_word": flops, "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
