"""Where one local training step's time goes (prints one JSON object).

    python bench/bench_train_step.py [--steps 60] [--reps 3] [--model DIR] [--dropout]

A federated client's step (8 columns x 20 words, the shipped model, one thread, no dropout as
ClientConfig trains; `--dropout`: with the model's) is timed part by part over --steps steps
(the first 5 are warm-up), median ms per part: the word-table composition forwards and
backwards, the LSTM forwards (with the embedding lookup, and dropout if any) and backwards,
the tied output layer with its cross-entropy forwards and backwards, gradient clipping with
the SGD step (models.fused.clip_and_step, as fit's autograd step runs it).
Backward parts are split with gradient hooks on the LSTM's input and output.  `direct` is the
step fit takes where it applies, the same computation without autograd (models/sgd_step.py),
timed whole on the same batches, and its parts (`direct_compose`, ... `direct_clip_and_step`:
the same seven, marked by SGDStep's `on_part`) on every other step, so that the marks' own
cost stays out of `direct`.  The same is then run in two processes at once (what the
parallel engine's two workers do), alternating with the single runs --reps times; medians are
printed.
The one-thread float32 matmul peak (best of a measurement before and after) is the reference;
for two processes at once, both one process of two threads (`share_of_peak`, as before) and
two one-thread processes at once (`share_of_matching_peak`, what the two steps are: a busy
neighbour slows the two-thread product far more).  Each run and peak records the CPU time other
processes used on this process's cores (bench_federation.cpu_use); `contention` counts the
runs above bench_federation.CONTENDED, whose figures are then not to be trusted.

The ceiling: the same step's matrix products alone (every product of the forward and backward
passes at its shape and in its order, nothing else) are timed the same way, alone and in pairs.
Their FLOPs are exactly the step's analytic count (bench_federation.train_flops_per_token), so
the step's share of the peak against the products' share splits the gap to the peak into what
the products cannot do at these shapes and what the step's other work (softmax, LSTM gates,
composition, optimizer) costs.

    python bench/bench_train_step.py --batch 32    # a bigger local batch
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PARTS = ("compose", "lstm_fwd", "output_fwd", "output_bwd", "lstm_bwd", "compose_bwd", "clip_and_step", "total", "direct", "products")


def time_products(B: int, T: int, d: int, H: int, V: int, steps: int) -> float:
    """Median ms of one step's matrix products alone: models/fused.py's forward and backward
    products at their shapes (B x T words, LSTM of H units with a d-dim projection, V words)."""
    N, r = B * T, torch.randn
    x, h, w_ih, w_hh, w_hr, emb = r(N, d), r(N, d), r(4 * H, d), r(4 * H, d), r(d, H), r(V, d)
    bias, gates, h_t, hf_t = r(V), r(N, 4 * H), r(B, d), r(B, H)
    grad, d_gates, hfs = r(N, V), r(N, 4 * H), r(N, H)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        torch.mm(x, w_ih.t())  # forward: the input part of the gates, all steps at once
        for t in range(T):  # the recurrence
            gates[t * B : (t + 1) * B].addmm_(h_t, w_hh.t())
            torch.mm(hf_t, w_hr.t())
        torch.addmm(bias, h, emb.t())  # logits
        torch.mm(grad, emb), torch.mm(grad.t(), h)  # backward: output layer
        for t in range(T):
            torch.mm(h_t, w_hr), torch.mm(d_gates[t * B : (t + 1) * B], w_hh)
        torch.mm(d_gates, w_ih), torch.mm(d_gates.t(), x), torch.mm(d_gates.t(), h), torch.mm(h.t(), hfs)
        if step >= 5:
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def time_parts(model_dir: Path | None, steps: int, batch: int | None = None, dropout: bool = False) -> dict[str, float]:
    from federation.config import ClientConfig
    from models.checkpoint import load_model
    from models.datasets import load_users
    from federation.memory import keep_buffers_in_heap
    from models import native
    from models.fused import clip_and_step, shared_lookup, tied_softmax_cross_entropy
    from models.lm import WordTable
    from models.train import batchify, encode, make_optimizer
    from bench_federation import train_flops_per_token

    torch.set_num_threads(1)
    native.load()  # as the engines do (FEDKB_NATIVE=0: the PyTorch versions)
    keep_buffers_in_heap()  # as the engines do (federation/memory.py)
    ck, tok = load_model(model_dir)
    cfg = ClientConfig(batch_size=batch) if batch else ClientConfig()
    stream = encode([t for u in load_users()[:40] for t in u.history], ck.vocab)
    table = WordTable.build(ck.vocab, tok, ck.model.cfg.base_vocab)
    model = copy.deepcopy(ck.model)
    model.train()
    data = batchify(stream, cfg.batch_size)
    opt = make_optimizer(model, cfg.train_config())
    params = [p for p in model.parameters() if p.requires_grad]
    # a client's step draws dropout masks only where its config trains with dropout (models/train.py's fit)
    gen = torch.Generator().manual_seed(0) if dropout or cfg.dropout else None
    times: dict[str, list[float]] = {k: [] for k in PARTS}
    state = None
    n_chunks = (data.size(1) - 1) // cfg.bptt
    for step in range(steps):
        i = (step % n_chunks) * cfg.bptt
        x, y = data[:, i : i + cfg.bptt], data[:, i + 1 : i + 1 + cfg.bptt]
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        emb, bias = model.compose(table)
        emb.register_hook(lambda g: marks.__setitem__("lstm_bwd_end", time.perf_counter()))
        t1 = time.perf_counter()
        out_table, inputs = shared_lookup(emb, x)  # what WordLM.loss does
        h, state = model.run_lstm(inputs, state, gen)  # dropout only with a generator
        h.register_hook(lambda g: marks.__setitem__("output_bwd_end", time.perf_counter()))
        t2 = time.perf_counter()
        loss = tied_softmax_cross_entropy(h.reshape(-1, h.size(-1)), out_table, bias, y.reshape(-1))
        t3 = time.perf_counter()
        state = (state[0].detach(), state[1].detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        clip_and_step(opt, params, cfg.clip_grad)
        loss.item()
        t6 = time.perf_counter()
        if step < 5:
            continue
        for k, v in (("compose", t1 - t0), ("lstm_fwd", t2 - t1), ("output_fwd", t3 - t2),
                     ("output_bwd", marks["output_bwd_end"] - t3), ("lstm_bwd", marks["lstm_bwd_end"] - marks["output_bwd_end"]),
                     ("compose_bwd", t4 - marks["lstm_bwd_end"]), ("clip_and_step", t6 - t4), ("total", t6 - t0)):
            times[k].append(v)
    from models import sgd_step

    if sgd_step.applies(model, opt, 0):  # the step fit takes: the same, without autograd (models/sgd_step.py)
        last = [0.0]
        direct_parts: dict[str, list[float]] = {k: [] for k in sgd_step.SGDStep.PARTS}

        def on_part(name: str) -> None:  # each part's end: its time since the previous part's
            t = time.perf_counter()
            direct_parts[name].append(t - last[0])
            last[0] = t

        direct, state = sgd_step.SGDStep(model, table), None
        for step in range(2 * steps):  # timed whole, then (every other step) part by part
            i = (step % n_chunks) * cfg.bptt
            direct.on_part = on_part if step % 2 else None
            last[0] = t0 = time.perf_counter()
            state = direct(data[:, i : i + cfg.bptt], data[:, i + 1 : i + 1 + cfg.bptt], state, gen, cfg.lr, cfg.clip_grad)[1]
            if step >= 10 and not step % 2:
                times["direct"].append(time.perf_counter() - t0)
        times.update({f"direct_{k}": v[5:] for k, v in direct_parts.items()})
    out = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items() if v}
    mc = model.cfg
    out["products"] = time_products(cfg.batch_size, cfg.bptt, mc.embed_dim, mc.hidden, len(ck.vocab), steps)
    out["flops_per_step"] = cfg.batch_size * cfg.bptt * train_flops_per_token(mc, len(ck.vocab))
    out["batch"], out["native"], out["dropout"] = cfg.batch_size, native.loaded() is not None, gen is not None
    return out


def _run_child(cmd: list[str]) -> dict:
    """One child's JSON; its own one-line error (a bad --model) if it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit((r.stderr.strip().splitlines() or [f"a step process failed ({r.returncode})"])[-1])
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="steps timed per run, the first 5 warm-up (default: 60)")
    ap.add_argument("--reps", type=int, default=3, help="alternating runs alone and in pairs; medians (default: 3)")
    ap.add_argument("--batch", type=int, default=None, help="local batch (default: ClientConfig's, 8)")
    ap.add_argument("--dropout", action="store_true", help="the step with the model's dropout (clients train without)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the shipped base)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 6 or args.reps < 1:
        ap.error("--steps must be >= 6 and --reps >= 1")
    if args.child:
        print(json.dumps(time_parts(args.model, args.steps, args.batch, args.dropout)))
        return
    from bench_federation import CONTENDED, matmul_peak, matmul_peak_processes, watched  # as the engines' bench

    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)] + (["--dropout"] if args.dropout else [])
    cmd += (["--model", str(args.model)] if args.model else []) + (["--batch", str(args.batch)] if args.batch else [])

    def pair() -> list[dict]:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            sys.exit("a step process failed (its error is above)")
        return [json.loads(o) for o in outs]

    alone, together, cpu = [], [], {"alone": [], "two_processes": [], "peaks": []}
    peaks: dict[str, list[float]] = {"threads_1": [], "threads_2": [], "two_processes": []}

    def measure_peaks() -> None:
        for n in (1, 2):
            flops, use = watched(matmul_peak, n)
            peaks[f"threads_{n}"].append(flops)
            cpu["peaks"].append(use | {"peak": f"threads_{n}"})
        flops, use = matmul_peak_processes(2)
        peaks["two_processes"].append(flops)
        cpu["peaks"].append(use | {"peak": "two_processes"})

    measure_peaks()
    for _ in range(args.reps):  # alternated: a neighbour on a shared VM can slow either for a minute
        run, use = watched(_run_child, cmd)
        alone.append(run)
        cpu["alone"].append(use)
        runs, use = watched(pair)
        together += runs
        cpu["two_processes"].append(use)
    measure_peaks()
    peak = {n: max(v) for n, v in peaks.items()}

    def median(runs: list[dict]) -> dict:
        direct_parts = tuple(k for k in runs[0] if k.startswith("direct_"))  # SGDStep.PARTS, prefixed
        return {k: round(statistics.median(r[k] for r in runs), 2) for k in PARTS + direct_parts if k in runs[0]}

    flops = alone[0]["flops_per_step"]
    ms_alone, ms_pair = median(alone), median(together)

    def share(ms: float, processes: int, ref: str = "") -> float:  # FLOP/s of `processes` steps at once, against a peak
        return round(processes * flops / (ms / 1e3) / peak[ref or f"threads_{processes}"], 3)

    uses = [u for v in cpu.values() for u in v]
    busy = sum(bool(u["contended"]) for u in uses)
    print(json.dumps({
        "reps": args.reps, "batch": alone[0]["batch"], "dropout": alone[0]["dropout"], "native_kernels": alone[0]["native"],
        "flops_per_step": flops, "ms_per_step_alone": ms_alone, "ms_per_step_two_processes": ms_pair,
        "totals_alone": [r["total"] for r in alone], "totals_two_processes": [r["total"] for r in together],
        # step = everything; products = the same step's matrix products only (the ceiling)
        "share_of_peak": {"step_alone": share(ms_alone["total"], 1), "products_alone": share(ms_alone["products"], 1),
                          "step_two_processes": share(ms_pair["total"], 2),
                          "products_two_processes": share(ms_pair["products"], 2),
                          **({"direct_step_alone": share(ms_alone["direct"], 1), "direct_step_two_processes": share(ms_pair["direct"], 2)}
                             if "direct" in ms_alone else {})},
        # two processes at once against two one-thread processes' products at once
        "share_of_matching_peak": {"step_two_processes": share(ms_pair["total"], 2, "two_processes"),
                                   "products_two_processes": share(ms_pair["products"], 2, "two_processes"),
                                   **({"direct_step_two_processes": share(ms_pair["direct"], 2, "two_processes")}
                                      if "direct" in ms_pair else {})},
        "peak_matmul_flops": peak, "peak_matmul_flops_measured": peaks,
        "cpu": cpu,
        "contention": {"threshold_other_cpu_share": CONTENDED, "contended": busy, "out_of": len(uses),
                       "measured": all(u["other_cpu_share"] is not None for u in uses),
                       "note": "not measurable: machine busy" if busy else None}}, indent=1))


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        main()
    except FedkbError as e:
        sys.exit(f"bench_train_step: error: {e}")
