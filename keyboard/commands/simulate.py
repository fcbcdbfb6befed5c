"""`fedkb simulate`: rounds of federated learning over the simulated users, into a run folder."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from models.errors import FedkbError
from models.jsonvalues import is_number

HELP = "run rounds of federated learning over the simulated users"


# the flags that set a SimulationConfig field (flattened as SimulationConfig.to_json nests it): each
# defaults to None (a store_true flag to False), so --resume can tell a flag typed, or set in
# --config, from one left out, and names only those it does not take (federation/run.py)
SETTINGS = {
    "users": "users", "rounds": "rounds", "clients_per_round": "clients_per_round", "engine": "engine",
    "workers": "workers", "dp": "privacy.noise_multiplier", "clip": "privacy.clip", "secret_noise": "privacy.secret_noise",
    "delta": "privacy.delta", "server_opt": "server.optimizer", "server_lr": "server.lr", "client_lr": "client.lr",
    "client_epochs": "client.epochs", "client_batch": "client.batch_size", "client_dropout": "client.dropout",
    "no_secagg": "aggregation.secure_aggregation", "eval_users": "eval_users", "eval_every": "eval_every", "seed": "seed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=None, help="population size; 0 = all training users; more = resampled (default: 0)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds to run (default: 10; with --resume: the run's stored total, or the new total given)")
    parser.add_argument("--clients-per-round", "-k", type=int, default=None, help="K reports aggregated per round (default: 20)")
    parser.add_argument("--engine", choices=("sequential", "parallel"), default=None, help="(default: sequential)")
    parser.add_argument("--workers", type=int, default=None, help="parallel engine processes (default: 2)")
    parser.add_argument("--dp", type=float, default=None, metavar="NOISE_MULTIPLIER", help="Gaussian noise multiplier z (needs --clip) (default: 0)")
    parser.add_argument("--clip", type=float, default=None, help="L2 clip per client update (default: none)")
    parser.add_argument("--secret-noise", action="store_true",
                        help="draw the DP noise from OS entropy, saved nowhere, so the seed and checkpoints cannot replay it; "
                             "a resumed run is then not bit for bit an uninterrupted one (default: the run's seeded "
                             "generator: reproducible, and whoever holds the seed can remove the noise)")
    parser.add_argument("--delta", type=float, default=None, help="report epsilon at this delta (default: 1e-5)")
    parser.add_argument("--server-opt", choices=("fedavg", "fedavgm", "fedadam"), default=None, help="(default: fedavg)")
    parser.add_argument("--server-lr", type=float, default=None, help="server learning rate (default: 1.0; fedadam 0.01)")
    parser.add_argument("--client-lr", type=float, default=None, help="client SGD learning rate (default: ClientConfig.lr)")
    parser.add_argument("--client-epochs", type=float, default=None, help="local epochs (default: 1)")
    parser.add_argument("--client-batch", type=int, default=None, help="local batch: parallel columns of the word stream (default: ClientConfig.batch_size)")
    parser.add_argument("--client-dropout", action="store_true",
                        help="train clients with the model's dropout (default: off, which does better; see README)")
    parser.add_argument("--no-secagg", action="store_true", help="sum in plain float64 instead of simulated secure aggregation")
    parser.add_argument("--eval-users", type=int, default=None, help="held-out users whose future text scores each round (default: 20)")
    parser.add_argument("--eval-every", type=int, default=None, help="(default: 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/sim"), metavar="RUN_DIR", help="run folder (default: runs/sim)")
    parser.add_argument("--devices", type=Path, default=None, metavar="DIR", help="device folders (default: RUN_DIR-devices)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--seed", type=int, default=None, help="(default: 0)")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR", help="starting model (default: data/base)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer (default: data/tokenizer.model)")
    parser.add_argument("--users-file", type=Path, default=None, help="the population (default: data/users.jsonl.gz, the chat senders; data/shakespeare.jsonl.gz: Shakespeare's roles)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, one line per round")
    parser.add_argument("--discover", action="store_true",
                        help="discover new words with TrieHH each round; history in RUN_DIR/vocab.jsonl (see `fedkb vocab`)")
    # default None, not 10: a --theta typed on --resume is named when the run has another (federation.run);
    # --discover without it discovers with DiscoveryConfig().theta
    parser.add_argument("--theta", type=int, default=None,
                        help="TrieHH threshold: votes a word needs in a round (a new run: with --discover) (default: 10)")


def given_settings(args: argparse.Namespace) -> set[str]:
    """The SimulationConfig fields (flattened: "privacy.noise_multiplier") whose flags were given."""
    return {key for dest, key in SETTINGS.items() if getattr(args, dest, None) is not None and getattr(args, dest) is not False}


def build_config(args: argparse.Namespace, stored=None):
    """The SimulationConfig the flags ask for, over the defaults; `stored` (a resumed run's
    SimulationConfig): over the run's settings, so flags are checked together with what the run has
    (`--resume --secret-noise` on a DP run), and where that fails, over the defaults (a `--dp 0` on a
    DP run whose noise is secret is then one the resume does not take, federation/run.py)."""
    from dataclasses import replace

    from federation.config import SimulationConfig

    def pick(value, default):
        return default if value is None else value

    overrides = {"lr": args.client_lr, "epochs": args.client_epochs, "batch_size": args.client_batch,
                 "dropout": True if args.client_dropout else None}
    if args.delta is not None and not pick(args.dp, 0) > 0 and not args.resume:  # on resume: the stored noise
        raise FedkbError("--delta needs Gaussian noise (--dp): epsilon is reported only for a noised run")

    def over(d: SimulationConfig) -> SimulationConfig:
        server_opt = pick(args.server_opt, d.server.optimizer)
        lr = d.server.lr if server_opt == d.server.optimizer else (0.01 if server_opt == "fedadam" else 1.0)
        return replace(
            d, users=pick(args.users, d.users), rounds=pick(args.rounds, d.rounds),
            clients_per_round=pick(args.clients_per_round, d.clients_per_round), engine=pick(args.engine, d.engine),
            workers=pick(args.workers, d.workers), eval_users=pick(args.eval_users, d.eval_users),
            eval_every=pick(args.eval_every, d.eval_every), seed=pick(args.seed, d.seed),
            client=replace(d.client, **{k: v for k, v in overrides.items() if v is not None}),
            server=replace(d.server, optimizer=server_opt, lr=pick(args.server_lr, lr)),
            privacy=replace(d.privacy, clip=pick(args.clip, d.privacy.clip),
                            noise_multiplier=pick(args.dp, d.privacy.noise_multiplier),
                            delta=pick(args.delta, d.privacy.delta), secret_noise=args.secret_noise or d.privacy.secret_noise),
            aggregation=replace(d.aggregation, secure_aggregation=not args.no_secagg and d.aggregation.secure_aggregation),
        )

    try:
        return over(stored if stored is not None else SimulationConfig())
    except ValueError as e:
        if stored is not None:
            with contextlib.suppress(ValueError):
                return over(SimulationConfig())
        raise FedkbError(str(e)) from None


def _line(m: dict) -> str:
    parts = [f"round {m['round']}"]
    for key, fmt in (("loss", "loss {:.3f}"), ("top1", "top1 {:.2f}%"), ("top3", "top3 {:.2f}%"), ("ksr", "KSR {:.2f}%"),
                     ("epsilon", "eps {:.2f}")):
        if m.get(key) is not None:
            parts.append(fmt.format(m[key]))
    parts.append(f"{m.get('aggregated', 0)}/{m.get('selected', 0)} aggregated")
    if m.get("secagg_aborted"):
        parts.append(f"secure aggregation aborted ({m['secagg_aborted']})")
    if m.get("rejected"):
        parts.append(f"{m['rejected']} rejected")
    added = [a["word"] for a in (m.get("discovery") or {}).get("added", [])]
    if added:
        more = f" and {len(added) - 5} more" if len(added) > 5 else ""
        parts.append(f"+{len(added)} word{'s' if len(added) > 1 else ''} ({', '.join(added[:5])}{more})")
    if "timings" in m:
        parts.append(f"{m['timings']['round_s']:.1f}s")
    return ", ".join(parts)


def _rounds(n: int) -> str:
    return f"{n} round{'' if n == 1 else 's'}"


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from federation.discovery import discovery_for_run
    from federation.run import CONFIG, Simulation, latest_round, read_config, read_metrics
    from keyboard.jobs import exit_on_sigterm
    from models.datasets import data_dir

    exit_on_sigterm()  # `kill`, or a closed terminal: the round under way is dropped cleanly, as on ctrl-c
    if args.threads < 1:
        raise FedkbError(f"--threads must be >= 1 (got {args.threads})")
    if args.theta is not None and not args.discover and not args.resume:
        raise FedkbError("--theta needs --discover (it is the threshold of word discovery on a new run)")
    if args.users_file is not None and args.users_file.is_dir():
        raise FedkbError(f"{args.users_file} is a folder, not a users file: choose another --users-file")
    torch.set_num_threads(args.threads)
    # on resume, the flags over the run's stored settings (a config.json that is missing or damaged: the
    # run's error, from read_config here or Simulation below)
    stored = read_config(args.out)[1] if args.resume and (args.out / CONFIG).is_file() else None
    sim = build_config(args, stored)
    if not args.resume and None in (args.model, args.tokenizer, args.users_file):
        data_dir()  # the defaults lie there: a non-editable install has none (without $FEDKB_DATA)
    discover = discovery_for_run(args.out, args.theta, args.resume, discover=bool(getattr(args, "discover", False)))
    s = Simulation(args.out, sim, args.model, args.tokenizer, args.users_file, args.devices, resume=args.resume,
                   discover=discover, asked=given_settings(args))
    console = Console(stderr=True)
    for note in s.notes:  # settings the users cannot satisfy, what resuming had to skip or repair (federation/run.py)
        console.print(f"[yellow]{note}[/yellow]", highlight=False)
    start = s.round
    if args.resume and s.done:
        console.print(f"{args.out} already has {_rounds(start)}; pass --rounds M (more than {start}) to continue it",
                      highlight=False)
    elif args.resume:
        console.print(f"resuming {args.out} after round {start} of {s.sim.rounds}", highlight=False)
    try:
        if args.quiet or s.done:  # no bar where no round will run ("2/1" under "already has 2 rounds")
            s.run(on_round=lambda m: print(_line(m), flush=True))
        else:
            with Progress(TextColumn("federated rounds"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
                task = progress.add_task("rounds", total=s.sim.rounds, completed=start, info="")

                def on_round(m: dict) -> None:
                    progress.update(task, completed=m["round"], info=_line(m))
                    progress.console.print(_line(m))

                s.run(on_round=on_round)
    except KeyboardInterrupt:
        done = latest_round(args.out)  # what a ctrl-c kept, and how to go on (the CLI then says "interrupted")
        if done:
            console.print(f"{args.out} has {_rounds(done)} committed; `fedkb simulate --out {args.out} --resume` continues it",
                          highlight=False)
        raise
    ms = read_metrics(args.out)
    # the committed round's line (latest.json's), never an older one's figures as the last
    last = next((m for m in ms if m["round"] == s.round), None)
    if last is None:
        print(f"done: {_rounds(s.round)}; round {s.round}'s metrics line is lost, so its figures are unknown; "
              f"run folder {args.out}")
        return 0
    first = ms[0]
    keys = ("top1", "ksr")
    if all(is_number(m.get(k)) for m in (first, last) for k in keys):
        span = f"from round {first['round']} to {last['round']}" if first["round"] else f"after {_rounds(last['round'])}"
        print(f"global top-1 {first['top1']:.2f}% -> {last['top1']:.2f}%, KSR {first['ksr']:.2f}% -> {last['ksr']:.2f}% "
              f"{span}; run folder {args.out}")  # a lost round 0 line: not "after N rounds" from the round-0 model
    else:
        print(f"done: {_rounds(s.round)}; run folder {args.out}")
    return 0
