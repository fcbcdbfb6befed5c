"""Benchmark of the federated simulation (prints one JSON object).

    python bench/bench_federation.py [--k 100] [--model DIR] [--tokenizer F] [--users-file F] [--workers 2] [--client-batch B]

* engines: one round's client updates (K clients) with the sequential engine (the
  naive loop, torch using every core) and the parallel engine (W workers x 1 thread),
  alternated --engine-reps times, medians compared:
  clients/s, tokens/s, their ratio; achieved FLOP/s (analytic count of the LSTM LM's
  training FLOPs) against the float32 matmul peak on all cores measured in this same run:
  share_of_peak is the median over the alternations of each run's FLOP/s against the peak
  measured right before and right after it (their mean: the machine's speed drifts by up to 2x
  within minutes on a shared VM); share_of_best_peak, the stricter figure, compares the median
  run with the best peak measured at any point of the bench.
  share_of_matching_peak is the same against a reference that runs as the engine does: for the
  parallel engine, W concurrent one-thread processes (one process of two OpenMP threads loses
  far more than two processes when a neighbour takes a core, which would inflate the share).
* contention: around every timed run and peak, the CPU time other processes used on this
  process's cores (/proc; `other_cpu_share`, of wall x cores) and the load average.  A run
  above CONTENDED is flagged, and `meets` (issue #4's ratio >= 1.3 and share >= 60 %) is null
  ("not measurable: machine busy") when a run it rests on was: a busy neighbour slows the
  sequential engine's OpenMP threads and the two-thread peak far more than the parallel
  engine, so it inflates both figures.
* memory: peak RSS of a process that builds a population of 1,000 vs 10,000 (resampled)
  users and runs rounds over it (median of --memory-reps runs each).
* scaling: seconds per round's client updates (sequential) at several K, several random
  cohorts each, with a least-squares line and its R^2, and seconds per 1,000 words.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def matmul_peak(threads: int, n: int = 1024, reps: int = 20) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def matmul_peak_processes(processes: int) -> tuple[float, dict]:
    """The summed matmul_peak(1) of `processes` one-thread processes running at once (what the
    parallel engine's workers are), and cpu_use() over it: each process starts measuring when
    all have started (their imports stay out of both)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench_federation import matmul_peak; "
            "print('ready', flush=True); sys.stdin.readline(); print(matmul_peak(1))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parent)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        p.stdout.readline()
    before = cpu_sample()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    flops = sum(float(p.communicate()[0]) for p in procs)
    return flops, cpu_use(before, cpu_sample())


CONTENDED = 0.1  # a run is contended when other processes used more than this share of its cores


def cpu_sample() -> tuple[float, int, int] | None:
    """(time, busy CPU ticks of the cores this process may use, CPU ticks of this process and its
    descendants, reaped children included) from /proc; None where there is none."""
    try:
        cores = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            f = line.split()
            if f and f[0] in cores:  # user nice system idle iowait irq softirq steal (guest is in user)
                v = [int(x) for x in f[1:9]]
                busy += sum(v) - v[3] - v[4]
        parent, ticks = {}, {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # gone meanwhile
                parent[int(d.name)] = int(f[1])
                ticks[int(d.name)] = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    except (OSError, AttributeError, ValueError, IndexError):
        return None
    children: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    own, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        own += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return time.perf_counter(), busy, own


def cpu_use(before, after) -> dict:
    """What this process's cores did between two cpu_sample()s: `own_cpus`, this process tree's CPU
    time over the wall time; `other_cpu_share`, other processes' CPU time over wall x cores;
    `contended`: that share above CONTENDED; `loadavg`, os.getloadavg() at the end."""
    out = {"own_cpus": None, "other_cpu_share": None, "contended": None, "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if before is None or after is None or after[0] <= before[0]:
        return out
    wall = (after[0] - before[0]) * os.sysconf("SC_CLK_TCK")
    own = after[2] - before[2]
    share = max(0, after[1] - before[1] - own) / (wall * len(os.sched_getaffinity(0)))
    return out | {"own_cpus": round(own / wall, 2), "other_cpu_share": round(share, 3), "contended": share > CONTENDED}


def watched(fn, *args):
    """fn(*args), and cpu_use() over the call."""
    before = cpu_sample()
    result = fn(*args)
    return result, cpu_use(before, cpu_sample())


def train_flops_per_token(cfg, vocab_size: int) -> float:
    """Forward FLOPs of one word (LSTM gates + projection + tied softmax), x3 for forward+backward."""
    d, h = cfg.embed_dim, cfg.hidden
    fwd = 2 * 4 * h * (d + d) + 2 * h * d + 2 * vocab_size * d
    return 3.0 * fwd


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """The options `setup` reads: the model, its tokenizer, the users and the local batch."""
    from models.checkpoint import default_paths

    base, tokp = default_paths()
    p.add_argument("--model", type=Path, default=base)
    p.add_argument("--tokenizer", type=Path, default=tokp)
    p.add_argument("--users-file", type=Path, default=None)
    p.add_argument("--client-batch", type=int, default=None, help="local batch (default: ClientConfig's, 8)")


def setup(args, root: Path, size: int = 0):
    from federation.config import ClientConfig
    from federation.sampling import build_population
    from models.checkpoint import load_model
    from models.datasets import load_users

    ck, tok = load_model(args.model, args.tokenizer)
    users = load_users(args.users_file)
    pop = build_population(root, users, size or len(users))
    client = ClientConfig(batch_size=args.client_batch) if args.client_batch else ClientConfig()
    return ck, tok, pop, client


def tasks_for(pop, k: int, seed: int = 0):
    from federation.engine_sequential import ClientTask

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(pop.size, generator=g)[:k].tolist()
    return [ClientTask(i, u, pop.real_id(u), 1000 + i) for i, u in enumerate(idx)]


def time_engine(engine, ck, tasks) -> tuple[float, int]:
    """Seconds for one round's client updates, and the words trained on."""
    words = [0]

    def consume(task, res):
        words[0] += res.num_words

    t = time.perf_counter()
    engine.run(ck.model.state_dict(), ck.vocab, tasks, consume)
    return time.perf_counter() - t, words[0]


def compare_engines(seq_engine, par_engine, ck, tasks, reps: int, cores: int, peak) -> tuple[dict, dict, list[dict]]:
    """The two engines on the same clients, alternated `reps` times (seq, par, seq, par, ...).

    Neighbours on a shared VM slow either engine by up to ~40 % for a minute at a time, so each
    engine's median over alternating runs is compared, not one run against one.  `peak()` (the
    matmul peaks, a dict) is measured before each (seq, par) pair and after the last one: the
    returned list brackets every pair, so pair i ran between peaks i and i + 1.  Each run
    records cpu_use() (`cpu_runs`).
    """
    runs: dict[str, list[float]] = {"sequential": [], "parallel": []}
    uses: dict[str, list[dict]] = {"sequential": [], "parallel": []}
    for name, eng, threads in (("sequential", seq_engine, cores), ("parallel", par_engine, 1)):
        torch.set_num_threads(threads)
        eng.run(ck.model.state_dict(), ck.vocab, tasks[:2], lambda t, r: None)  # warm-up (tables, caches, workers)
    words, peaks = 0, []
    for _ in range(reps):
        peaks.append(peak())
        for name, eng, threads in (("sequential", seq_engine, cores), ("parallel", par_engine, 1)):
            torch.set_num_threads(threads)  # sequential: torch on every core; parallel: 1 thread per process
            (s, words), use = watched(time_engine, eng, ck, tasks)
            runs[name].append(s)
            uses[name].append(use)
    peaks.append(peak())
    out = []
    for name in ("sequential", "parallel"):
        s = statistics.median(runs[name])
        out.append({"seconds": round(s, 3), "seconds_runs": [round(x, 3) for x in runs[name]],
                    "clients_per_s": round(len(tasks) / s, 3), "tokens_per_s": round(words / s, 1), "tokens": words,
                    "cpu_runs": uses[name]})
    return out[0], out[1], peaks


def time_vs_k(ck, pop, client, tok, ks: list[int], reps: int) -> dict:
    """Seconds per round's client updates (sequential engine) at each K, `reps` random cohorts each.

    Users' histories differ ~25x in length, so one cohort per K is mostly noise; the mean
    over cohorts, a least-squares line seconds = a + b K with its R^2, and seconds per
    1,000 training words (which should not depend on K) show whether time is linear in K.
    """
    from federation.engine_sequential import SequentialEngine

    rows, xs, ys = [], [], []
    with SequentialEngine(ck.model.cfg, tok.path, pop.root, client) as eng:
        eng.run(ck.model.state_dict(), ck.vocab, tasks_for(pop, 2, seed=99), lambda t, r: None)  # warm-up
        for k in ks:
            secs, words = [], []
            for rep in range(reps):
                n = [0]
                t = time.perf_counter()
                eng.run(ck.model.state_dict(), ck.vocab, tasks_for(pop, k, seed=1000 * k + rep),
                        lambda task, res: n.__setitem__(0, n[0] + res.num_words))
                secs.append(time.perf_counter() - t)
                words.append(n[0])
                xs.append(k)
                ys.append(secs[-1])
            rows.append({"k": k, "seconds_mean": round(sum(secs) / reps, 3), "seconds": [round(x, 3) for x in secs],
                         "seconds_per_client": round(sum(secs) / reps / k, 4),
                         "seconds_per_1000_words": round(1000 * sum(secs) / sum(words), 4)})
    fit = {"intercept_s": None, "seconds_per_client": None, "r2": None}  # a line needs two K values
    if len(set(xs)) > 1:
        b, a = statistics.linear_regression(xs, ys)
        r2 = statistics.correlation(xs, ys) ** 2 if len(set(ys)) > 1 else None  # R^2 of a fitted line = r^2
        fit = {"intercept_s": round(a, 3), "seconds_per_client": round(b, 4), "r2": round(r2, 4) if r2 is not None else None}
    return {"reps": reps, "rows": rows, "linear_fit": fit}


def memory_child(args) -> None:
    """Build a population of args.memory_child users and run 2 rounds of --memory-k clients; print peak RSS."""
    from federation.config import SimulationConfig
    from federation.engine_sequential import SequentialEngine
    from federation.rounds import run_round
    from federation.server import init_state

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        ck, tok, pop, client = setup(args, Path(d), args.memory_child)
        sim = SimulationConfig(clients_per_round=args.memory_k, users=pop.size)
        state = init_state(ck.model.state_dict(), ck.vocab, sim.server)
        g = torch.Generator().manual_seed(0)
        with SequentialEngine(ck.model.cfg, tok.path, pop.root, client) as eng:
            for _ in range(2):
                state, _ = run_round(state, pop, sim, eng, g)
    print(json.dumps({"population": pop.size, "max_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS.  Linux's ru_maxrss carries over what the process that spawned it held
    (exec keeps the old memory map's high-water mark), so a child of a large bench process reports
    the parent's RSS; /proc/self/status's VmHWM is this memory map's own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    p = argparse.ArgumentParser()
    add_setup_args(p)
    p.add_argument("--k", type=int, default=100, help="clients in the engine comparison (default: 100)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine-reps", type=int, default=3, help="alternating runs of each engine; medians compared (default: 3)")
    p.add_argument("--scaling-k", default="5,10,20", help="K values for time per round (default: 5,10,20)")
    p.add_argument("--scaling-reps", type=int, default=3, help="random cohorts per K (default: 3)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-k", type=int, default=5, help="clients per round in the memory runs (default: 5)")
    p.add_argument("--memory-reps", type=int, default=3, help="peak-RSS runs per population size (default: 3)")
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)
    if min(args.k, args.workers, args.engine_reps, args.scaling_reps, args.memory_reps, args.memory_k) < 1:
        p.error("--k, --workers, --engine-reps, --scaling-reps, --memory-reps and --memory-k must be >= 1")

    from federation.engine_parallel import ParallelEngine
    from federation.engine_sequential import SequentialEngine

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # taskset's cores
    out: dict = {"cores": cores, "k": args.k, "workers": args.workers, "model": str(args.model)}
    with tempfile.TemporaryDirectory() as d:
        ck, tok, pop, client = setup(args, Path(d))
        tasks = tasks_for(pop, args.k)
        out["client_batch"] = client.batch_size
        flops_tok = train_flops_per_token(ck.model.cfg, len(ck.vocab))
        peaks = {"threads_all": [matmul_peak(cores)], "threads_1": [matmul_peak(1)]}

        def bracket_peaks() -> dict:  # the engines' references, each with the CPU use around it
            (flops_all, use_all), (flops_procs, use_procs) = watched(matmul_peak, cores), matmul_peak_processes(args.workers)
            return {"threads_all": flops_all, "threads_all_cpu": use_all, "processes": flops_procs, "processes_cpu": use_procs}

        with SequentialEngine(ck.model.cfg, tok.path, pop.root, client) as seq_eng, \
                ParallelEngine(ck.model.cfg, tok.path, pop.root, client, args.workers) as par_eng:
            seq, par, bracket = compare_engines(seq_eng, par_eng, ck, tasks, args.engine_reps, cores, bracket_peaks)
        from models import native

        out["native_kernels"] = native.loaded() is not None  # models/native.py (FEDKB_NATIVE=0: off)
        # the peak again after the engines: on a shared VM one measurement can be 2x off, so the
        # machine's best float32 matmul rate is the best of all measured
        peak_all, peak_procs = [b["threads_all"] for b in bracket], [b["processes"] for b in bracket]
        peaks["threads_all"] += peak_all
        peaks["threads_1"].append(matmul_peak(1))
        out["peak_matmul_flops"] = peaks_best = {k: max(v) for k, v in peaks.items()}
        out["peak_matmul_flops_measured"] = peaks
        # the parallel engine's matching reference: its W workers' one-thread products, at once
        out["peak_matmul_flops_processes"] = {"processes": args.workers, "measured": peak_procs, "best": max(peak_procs)}
        out["peak_matmul_cpu"] = {"threads_all": [b["threads_all_cpu"] for b in bracket],
                                  "processes": [b["processes_cpu"] for b in bracket]}
        best = max(out["peak_matmul_flops"].values())

        def bracketed(r: dict, ref: list[float]) -> list[float]:  # run i against the mean of the peaks around its pair
            return [r["tokens"] / s * flops_tok / ((ref[i] + ref[i + 1]) / 2) for i, s in enumerate(r["seconds_runs"])]

        for r in (seq, par):
            r["flops"] = r["tokens_per_s"] * flops_tok
            shares = bracketed(r, peak_all)
            r["share_of_peak_runs"] = [round(x, 3) for x in shares]
            r["share_of_peak"] = round(statistics.median(shares), 3)
            r["share_of_best_peak"] = round(r["flops"] / best, 3)
        shares = bracketed(par, peak_procs)
        par["share_of_matching_peak_runs"] = [round(x, 3) for x in shares]
        par["share_of_matching_peak"] = round(statistics.median(shares), 3)
        out["sequential"], out["parallel"] = seq, par
        out["parallel_over_sequential"] = round(par["clients_per_s"] / seq["clients_per_s"], 3)
        out["train_flops_per_token"] = flops_tok
        # issue #4's targets, each judged only where none of the runs and peaks it rests on was contended
        rests_on = {"parallel_over_sequential": seq["cpu_runs"] + par["cpu_runs"],
                    "share_of_peak": par["cpu_runs"] + out["peak_matmul_cpu"]["threads_all"],
                    "share_of_matching_peak": par["cpu_runs"] + out["peak_matmul_cpu"]["processes"]}
        values = {"parallel_over_sequential": (out["parallel_over_sequential"], 1.3),
                  "share_of_peak": (par["share_of_peak"], 0.6), "share_of_matching_peak": (par["share_of_matching_peak"], 0.6)}
        busy = {k: sum(bool(u["contended"]) for u in v) for k, v in rests_on.items()}
        out["targets"] = {k: t for k, (_, t) in values.items()}
        out["meets"] = {k: None if busy[k] else v >= t for k, (v, t) in values.items()}
        out["contention"] = {
            "threshold_other_cpu_share": CONTENDED,
            "contended": busy, "out_of": {k: len(v) for k, v in rests_on.items()},  # runs and peaks each target rests on
            "measured": all(u["other_cpu_share"] is not None for v in rests_on.values() for u in v),
            "peak_threads_all_over_threads_1": round(peaks_best["threads_all"] / peaks_best["threads_1"], 3),
            "note": "not measurable: machine busy" if any(busy.values()) else None}

        torch.set_num_threads(cores)
        out["time_per_round_vs_k"] = time_vs_k(ck, pop, client, tok, [int(x) for x in args.scaling_k.split(",")], args.scaling_reps)

    if not args.skip_memory:
        mem: dict[int, list[float]] = {1000: [], 10000: []}
        for _ in range(args.memory_reps):  # peak RSS varies +-30 MB run to run (allocation timing): medians
            for n in mem:
                cmd = [sys.executable, __file__, "--memory-child", str(n), "--memory-k", str(args.memory_k), "--model", str(args.model),
                       "--tokenizer", str(args.tokenizer)]
                if args.users_file:
                    cmd += ["--users-file", str(args.users_file)]
                if args.client_batch:
                    cmd += ["--client-batch", str(args.client_batch)]  # the batch out["client_batch"] reports
                r = subprocess.run(cmd, capture_output=True, text=True, check=True)
                mem[n].append(round(json.loads(r.stdout.strip().splitlines()[-1])["max_rss_mb"], 1))
        med = {n: statistics.median(v) for n, v in mem.items()}
        out["memory_mb"] = {"clients_per_round": args.memory_k, "population_1000": mem[1000], "population_10000": mem[10000],
                            "median_1000": med[1000], "median_10000": med[10000],
                            "ratio_10000_over_1000": round(med[10000] / med[1000], 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        main()
    except FedkbError as e:
        sys.exit(f"bench_federation: error: {e}")
