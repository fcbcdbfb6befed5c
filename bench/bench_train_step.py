"""Where one local training step's time goes (prints one JSON object).

    python bench/bench_train_step.py [--steps 60] [--reps 3] [--model DIR]

A federated client's step (8 columns x 20 words, the shipped model, one thread) is timed part
by part over --steps steps (the first 5 are warm-up), median ms per part: the word-table
composition forwards and backwards, the LSTM forwards (with the embedding lookup and
dropout) and backwards, the tied output layer with its cross-entropy forwards and backwards,
gradient clipping, the SGD step.  Backward parts are split with gradient hooks on the
LSTM's input and output.  The same is then run in two processes at once (what the parallel
engine's two workers do), alternating with the single runs --reps times; medians are printed.
The one-thread float32 matmul peak (best of a measurement before and after) is the reference.
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

PARTS = ("compose", "lstm_fwd", "output_fwd", "output_bwd", "lstm_bwd", "compose_bwd", "clip", "optimizer", "total")


def time_parts(model_dir: Path | None, steps: int) -> dict[str, float]:
    from federation.config import ClientConfig
    from models.checkpoint import load_model
    from models.datasets import load_users
    from models.fused import tied_softmax_cross_entropy
    from models.lm import WordTable
    from models.train import batchify, encode, make_optimizer

    torch.set_num_threads(1)
    ck, tok = load_model(model_dir)
    cfg = ClientConfig()
    stream = encode([t for u in load_users()[:40] for t in u.history], ck.vocab)
    table = WordTable.build(ck.vocab, tok, ck.model.cfg.base_vocab)
    model = copy.deepcopy(ck.model)
    model.train()
    data = batchify(stream, cfg.batch_size)
    opt = make_optimizer(model, cfg.train_config())
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
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
        h, state = model.hidden(x, emb, state, gen)
        h.register_hook(lambda g: marks.__setitem__("output_bwd_end", time.perf_counter()))
        t2 = time.perf_counter()
        loss = tied_softmax_cross_entropy(h.reshape(-1, h.size(-1)), emb, bias, y.reshape(-1))
        t3 = time.perf_counter()
        state = (state[0].detach(), state[1].detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        t5 = time.perf_counter()
        opt.step()
        loss.item()
        t6 = time.perf_counter()
        if step < 5:
            continue
        for k, v in (("compose", t1 - t0), ("lstm_fwd", t2 - t1), ("output_fwd", t3 - t2),
                     ("output_bwd", marks["output_bwd_end"] - t3), ("lstm_bwd", marks["lstm_bwd_end"] - marks["output_bwd_end"]),
                     ("compose_bwd", t4 - marks["lstm_bwd_end"]), ("clip", t5 - t4), ("optimizer", t6 - t5), ("total", t6 - t0)):
            times[k].append(v)
    return {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3, help="alternating runs alone and in pairs; medians (default: 3)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the shipped base)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(time_parts(args.model, args.steps)))
        return
    from bench_federation import matmul_peak  # the same peak measurement as the engines' bench

    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)] + (["--model", str(args.model)] if args.model else [])
    alone, together = [], []
    peak = matmul_peak(1)
    for _ in range(args.reps):  # alternated: a neighbour on a shared VM can slow either for a minute
        alone.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
        pair = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        together += [json.loads(p.communicate()[0]) for p in pair]
    peak = max(peak, matmul_peak(1))

    def median(runs: list[dict]) -> dict:
        return {k: round(statistics.median(r[k] for r in runs), 2) for k in PARTS}

    print(json.dumps({"reps": args.reps, "ms_per_step_alone": median(alone), "ms_per_step_two_processes": median(together),
                      "totals_alone": [r["total"] for r in alone], "totals_two_processes": [r["total"] for r in together],
                      "peak_matmul_flops_1_thread": peak}, indent=1))


if __name__ == "__main__":
    main()
