"""One training step, this checkout against another, alternating (prints one JSON object).

    git worktree add /tmp/old 7a755ff                 # any checkout of fedkb
    python bench/bench_step_ab.py /tmp/old [--steps 150] [--together] [--batch B]

On a shared VM the machine's speed drifts by up to 2x within minutes, so two versions timed
in separate runs compare the hours they ran in more than the code.  Here one process per
checkout (each importing its own code, loading its own kernels) holds a model and a stream of
real users' words, and the driver asks them for one step each in turn, alternating which goes
first: every pair of steps ran within ~0.1 s of each other.  The paired median of the ratios
is the figure to read.  With --together each checkout runs two processes stepping at once (what
the parallel engine's two workers do), and a step's time is the slower of the two.

A step is what `models.train.fit` does for a federated client, on the first --users users'
history, 8 x 20 words (ClientConfig's batch and bptt), one torch thread, with dropout only
where this checkout's ClientConfig trains with it (`--dropout`: both sides with the model's
dropout): the checkout's step without autograd (models/sgd_step.py) where it has one, else
compose the table, forward, backward, clip + SGD (the checkout's `clip_and_step` where it has one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import copy, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(1)
from models import native
native.load()
try:  # the engines' malloc settings, in a checkout that has them
    from federation.memory import keep_buffers_in_heap
    keep_buffers_in_heap()
except ImportError:
    pass
from federation.config import ClientConfig
from models.checkpoint import load_model
from models.datasets import load_users
from models.lm import WordTable
from models.train import batchify, encode, make_optimizer
try:
    from models.fused import clip_and_step
except ImportError:  # a checkout from before it
    def clip_and_step(opt, params, max_norm):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
batch, users, dropout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
ck, tok = load_model(None)
cfg = ClientConfig(batch_size=batch) if batch else ClientConfig()
tc = cfg.train_config()
data = batchify(encode([t for u in load_users()[:users] for t in u.history], ck.vocab), cfg.batch_size)
table = WordTable.build(ck.vocab, tok, ck.model.cfg.base_vocab)
model = copy.deepcopy(ck.model)
model.train()
opt = make_optimizer(model, tc)
gen = torch.Generator().manual_seed(0) if dropout else None  # fit draws dropout masks only with it
params = [p for p in model.parameters() if p.requires_grad]
chunks, state, step = (data.size(1) - 1) // cfg.bptt, None, 0
try:  # the step without autograd, in a checkout that has it and where fit would take it
    from models import sgd_step
    direct = sgd_step.SGDStep(model, table) if sgd_step.applies(model, opt, 0) else None
except ImportError:
    direct = None
print("ready", native.loaded() is not None, flush=True)
for _ in sys.stdin:
    i = (step % chunks) * cfg.bptt
    step += 1
    x, y = data[:, i : i + cfg.bptt], data[:, i + 1 : i + 1 + cfg.bptt]
    t = time.perf_counter()
    if direct is not None:
        state = direct(x, y, state, gen, tc.lr, tc.clip_grad)[1]
        print(time.perf_counter() - t, flush=True)
        continue
    emb, bias = model.compose(table)
    loss, state = model.loss(x, y, emb, bias, state, gen)
    state = (state[0].detach(), state[1].detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(opt, params, tc.clip_grad)
    loss.item()
    print(time.perf_counter() - t, flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("other", type=Path, help="another fedkb checkout (e.g. a git worktree of an older commit)")
    ap.add_argument("--steps", type=int, default=150, help="steps per checkout, alternating (default: 150)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--together", action="store_true", help="two processes per checkout stepping at once")
    ap.add_argument("--batch", type=int, default=0, help="local batch (default: ClientConfig's, 8)")
    ap.add_argument("--users", type=int, default=40, help="users whose history makes the stream (default: 40)")
    ap.add_argument("--dropout", action="store_true", help="steps with the model's dropout (clients train without)")
    args = ap.parse_args()
    if args.steps < 2 or args.warmup < 0 or args.users < 1:
        ap.error("--steps must be >= 2, --warmup >= 0 and --users >= 1")
    if not (args.other / "models" / "lm.py").exists():
        sys.exit(f"{args.other} is not a fedkb checkout (no models/lm.py)")
    sys.path.insert(0, str(REPO))
    from federation.config import ClientConfig

    dropout = args.dropout or ClientConfig().dropout  # the same step on both sides: this checkout's client's
    width = 2 if args.together else 1
    cmd = [sys.executable, "-c", CHILD, str(args.batch), str(args.users), "1" if dropout else "0"]
    sides = {name: [subprocess.Popen(cmd, cwd=d, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(width)]
             for name, d in (("this", REPO), ("other", args.other.resolve()))}
    native = {}
    for name, procs in sides.items():
        for p in procs:
            line = p.stdout.readline().split()
            if not line or line[0] != "ready":
                sys.exit(f"the {name} checkout's step process failed to start")
            native[name] = line[1] == "True"
    times: dict[str, list[float]] = {"this": [], "other": []}
    for i in range(args.warmup + args.steps):
        for name in (("this", "other") if i % 2 == 0 else ("other", "this")):
            for p in sides[name]:
                p.stdin.write("step\n")
                p.stdin.flush()
            t = max(float(p.stdout.readline()) for p in sides[name])
            if i >= args.warmup:
                times[name].append(t)
    for procs in sides.values():
        for p in procs:
            p.stdin.close()
            p.wait()
    ratios = [a / b for a, b in zip(times["this"], times["other"])]
    print(json.dumps({
        "other": str(args.other), "steps": args.steps, "together": args.together, "dropout": dropout, "native_kernels": native,
        "ms_this": round(statistics.median(times["this"]) * 1e3, 2), "ms_other": round(statistics.median(times["other"]) * 1e3, 2),
        "this_over_other_paired_median": round(statistics.median(ratios), 3),
        "this_over_other_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)]}, indent=1))


if __name__ == "__main__":
    main()
