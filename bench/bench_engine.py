"""One engine alone: the same K clients, round after round (prints one JSON object).

    python bench/bench_engine.py [--engine sequential] [--threads 1] [--k 30] [--rounds 4] [--model DIR]

bench_federation.py compares the engines; this runs one of them, after one warm-up round on two
clients, so that a profiler sees only client updates.  `--engine sequential --threads 1` is what
each of the parallel engine's workers runs.  Where a worker's time goes (README, Results,
"Session 18"):

    perf record -D 9000 -o /tmp/perf.data python bench/bench_engine.py --no-peak
    perf report -i /tmp/perf.data --no-children --sort dso,symbol

(-D: start recording after 9 s, once the setup is done; the JSON's setup_s says how long it took.)

The reference, measured in the same run unless --no-peak (a profiler would see its products):
the float32 matmul peak of what the engine runs on, before the setup and after the rounds
(bench_federation: one process of --threads threads for the sequential engine, --workers
one-thread processes at once for the parallel one); `share_of_peak` is each round's FLOP/s
against the mean of the two.  Each round records the CPU time other processes used on this
process's cores (bench_federation.cpu_use) and is flagged `contended` above CONTENDED.
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

from bench_federation import (  # noqa: E402
    CONTENDED, add_setup_args, matmul_peak, matmul_peak_processes, setup, tasks_for, time_engine, train_flops_per_token, watched)


def main() -> None:
    from federation.engine_parallel import make_engine

    p = argparse.ArgumentParser()
    add_setup_args(p)
    p.add_argument("--engine", choices=("sequential", "parallel"), default="sequential")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (default: 1, a worker's)")
    p.add_argument("--workers", type=int, default=2, help="the parallel engine's worker processes")
    p.add_argument("--k", type=int, default=30, help="clients a round (default: 30)")
    p.add_argument("--rounds", type=int, default=4, help="rounds over the same clients (default: 4)")
    p.add_argument("--no-peak", action="store_true", help="no matmul peak (for a profiler: its products would count)")
    args = p.parse_args()
    if args.k < 1 or args.rounds < 1 or args.threads < 1 or args.workers < 1:
        p.error("--k, --rounds, --threads and --workers must be >= 1")

    def peak() -> tuple[float, dict]:  # what the engine runs on: the workers' one-thread processes, or --threads threads
        return matmul_peak_processes(args.workers) if args.engine == "parallel" else watched(matmul_peak, args.threads)

    t0 = time.perf_counter()
    peaks = [] if args.no_peak else [peak()]
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
                (s, words), use = watched(time_engine, eng, ck, tasks)
                rows.append({"seconds": round(s, 3), "words": words, "words_per_s": round(words / s, 1),
                             "gflops": round(words / s * flops / 1e9, 1), "cpu": use})
    out = {"engine": args.engine, "threads": args.threads, "k": len(tasks), "setup_s": round(setup_s, 1),
           "train_flops_per_word": flops, "rounds": rows}
    if peaks:
        peaks.append(peak())
        ref = sum(f for f, _ in peaks) / 2
        for r in rows:
            r["share_of_peak"] = round(r["words_per_s"] * flops / ref, 3)
        par = args.engine == "parallel"
        out["peak_matmul_gflops"] = {"reference": "one_thread_processes" if par else f"threads_{args.threads}",
                                     "processes": args.workers if par else 1,
                                     "measured": [round(f / 1e9, 1) for f, _ in peaks], "cpu": [u for _, u in peaks]}
    uses = [r["cpu"] for r in rows] + [u for _, u in peaks]
    busy = sum(bool(u["contended"]) for u in uses)
    out["contention"] = {"threshold_other_cpu_share": CONTENDED, "contended": busy, "out_of": len(uses),
                         "note": "not measurable: machine busy" if busy else None}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        main()
    except FedkbError as e:
        sys.exit(f"bench_engine: error: {e}")
