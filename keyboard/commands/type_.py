"""`fedkb` / `fedkb type`: open the keyboard app on the shipped model (or --model)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "open the keyboard (the default when no command is given)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, metavar="DIR", help="checkpoint directory (default: the shipped data/base)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="sentencepiece model (default: data/tokenizer.model)")
    parser.add_argument("--devices", type=Path, default=None, metavar="DIR",
                        help="device folders (default: $FEDKB_HOME/devices, else ~/.local/share/fedkb/devices)")
    parser.add_argument("--user", default="me", metavar="ID", help="profile: 'me' (default) or a simulated user id, e.g. u0003")
    parser.add_argument("--users-file", type=Path, default=None, metavar="FILE", help="simulated users (default: data/users.jsonl.gz, the chat senders; data/shakespeare.jsonl.gz: Shakespeare's roles)")
    parser.add_argument("--incognito", action="store_true", help="start in incognito: nothing stored, nothing learned")


def run(args: argparse.Namespace) -> int:
    # One thread for what computes here: NumPy's BLAS while typing, torch once learning imports it.
    # One word at a time gains nothing from threads, and the UI keeps the other core.  Read by both
    # libraries when they load, so set before either does (a value the user set is kept).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from keyboard.app import FedkbApp

    app = FedkbApp(args.model, args.tokenizer, args.devices, args.user, args.incognito, args.users_file)
    app.run()
    return int(app.return_code or 0)
