"""Which client setting makes a good federated round? Scored on held-out users' HISTORY.

    python bench/bench_client_setting.py [--k 50] [--settings '{}' '{"dropout": true}' ...] [--parts]
    python bench/bench_client_setting.py --rounds 10 [--settings '{}' '{"server_optimizer": "fedadam", "server_lr": 0.01}' ...]

One FedAvg round from the base model, without sampling noise: K training users (a seeded
draw), each fine-tuned with `client_update` under every setting (a JSON object of
`ClientConfig` fields over the default), the word-weighted mean delta applied at server
learning rates 0.5 and 1.  The round's model is scored on the *history* of users held out
of it (40 by default, never trained on), so choosing a client setting here does not tune on
the future text that `fedkb eval --users` and the issue's targets score.  `--parts` also
applies each parameter group of the first setting's mean delta alone and all but it: which
part of the update moves top-1.

With `--rounds R` each setting instead runs R whole rounds of `fedkb simulate` (the parallel
engine, K clients a round: sampling, dropouts, secure aggregation), seed 123, whose held-out
split is the same users; `server_optimizer` and `server_lr` in a setting set the server's step.
The round-R model is scored on the same held-out history (~3 min a setting at R = 10).

Prints one JSON object: the base's and each setting's top-1 / top-3 / KSR (%), loss (nats)
and word count on the validation text (as a simulation's evaluator reports them), and the
mean delta's norm.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SPLIT_SEED = 123  # which users are held out: SimulationConfig(seed=SPLIT_SEED, eval_users=N)'s split
PARTS = {
    "piece": ("piece_emb", "piece_bias"),
    "residual": ("residual",),
    "word_bias": ("word_bias",),
    "lstm": ("lstm.",),
}


def simulate(setting: dict, k: int, rounds: int, held_out: int, held) -> dict:
    """The global parameters after `rounds` simulated rounds with this setting (a temporary run folder)."""
    from federation.config import ClientConfig, ServerConfig, SimulationConfig
    from federation.run import Simulation

    server = {key[len("server_"):]: setting.pop(key) for key in list(setting) if key.startswith("server_")}
    sim = SimulationConfig(rounds=rounds, clients_per_round=k, engine="parallel", seed=SPLIT_SEED, eval_users=held_out,
                           client=replace(ClientConfig(), **setting), server=replace(ServerConfig(), **server))
    with tempfile.TemporaryDirectory() as tmp:
        s = Simulation(Path(tmp) / "run", sim)
        if sorted(s.eval_ids) != sorted(u.id for u in held):
            raise SystemExit("the simulation's held-out users are not the validation users")
        s.evaluator = None  # their future text is the test text: never scored here
        s.run()
        return s.state.params


def main() -> None:
    from federation.client import client_update
    from federation.config import ClientConfig, SimulationConfig
    from federation.rounds import Evaluator
    from federation.run import split_users
    from models import params as P
    from models.checkpoint import default_paths, load_model
    from models.datasets import load_users
    from models.lm import WordLM, WordTable

    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=50, help="clients in the round (default: 50)")
    p.add_argument("--held-out", type=int, default=40, help="users held out for validation (default: 40)")
    p.add_argument("--settings", nargs="+", default=["{}", '{"dropout": true}'],
                   help="ClientConfig overrides as JSON objects (default: the default and dropout on)")
    p.add_argument("--parts", action="store_true", help="also score each parameter group of the first setting's delta")
    p.add_argument("--seed", type=int, default=0, help="one round: the cohort's draw and the clients' generator (default: 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="R > 1: whole simulated rounds per setting (default: 1, the analysis above)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    base_dir, tok_path = default_paths()
    ck, tok = load_model(base_dir, tok_path)
    train, held = split_users(load_users(), SimulationConfig(eval_users=args.held_out, seed=SPLIT_SEED))
    val = [m for u in held for m in u.history]
    evaluator = Evaluator(WordLM(ck.model.cfg), tok, val)  # what scores a simulation's rounds, on this text
    work, table = WordLM(ck.model.cfg), WordTable.build(ck.vocab, tok, ck.model.cfg.base_vocab)  # the clients' workspace
    base = P.clone(ck.model.state_dict())

    def score(params) -> dict:
        return evaluator(params, ck.vocab)

    out = {"k": args.k, "rounds": args.rounds, "validation_users": len(held), "base": score(base), "settings": {}}
    if args.rounds > 1:
        for spec in args.settings:
            t0 = time.perf_counter()
            params = simulate(json.loads(spec), args.k, args.rounds, args.held_out, held)
            out["settings"][spec] = {f"round_{args.rounds}": score(params), "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(out, indent=1))
        return
    cohort = random.Random(args.seed).sample(train, min(args.k, len(train)))
    first = None
    for spec in args.settings:
        t0 = time.perf_counter()
        cfg = replace(ClientConfig(), **json.loads(spec))
        g = torch.Generator().manual_seed(args.seed)
        total, words = P.zeros_like(base), 0
        for u in cohort:
            r = client_update(base, work, ck.vocab, tok, u.history, cfg, g, table=table)
            total, words = P.add(total, r.delta, r.num_words), words + r.num_words
        mean = P.scale(total, 1.0 / words)
        first = first or mean
        out["settings"][spec] = {"delta_norm": round(P.global_norm(mean), 4),
                                 **{f"server_lr_{s}": score(P.add(base, mean, s)) for s in (0.5, 1.0)},
                                 "seconds": round(time.perf_counter() - t0, 1)}
    if args.parts:
        out["parts_of_the_first_setting"] = {}
        for name, prefixes in PARTS.items():
            inside = {k: k.startswith(prefixes) for k in first}
            only = {k: v if inside[k] else torch.zeros_like(v) for k, v in first.items()}
            without = {k: torch.zeros_like(v) if inside[k] else v for k, v in first.items()}
            out["parts_of_the_first_setting"][name] = {"only": score(P.add(base, only)), "without": score(P.add(base, without))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        main()
    except FedkbError as e:
        sys.exit(f"bench_client_setting: error: {e}")
