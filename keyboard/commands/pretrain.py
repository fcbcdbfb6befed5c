"""`fedkb pretrain`: train the base model on the central pretraining split (resumable)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.jsonvalues import is_int

HELP = "train the base model centrally on the pretraining split"
NEW_MODEL_DROPOUT = 0.2  # the shipped base's (LMConfig's default 0.1 overfits in long exact-softmax runs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.datasets import DATA_DIR, cache_dir

    parser.add_argument("--out", type=Path, default=DATA_DIR / "base", metavar="DIR", help="checkpoint directory to write (default: data/base)")
    parser.add_argument("--work", type=Path, default=cache_dir("pretrain"), metavar="DIR",
                        help="resumable training state (default: the checkout's .cache/pretrain, else "
                             "~/.cache/fedkb/pretrain); rerun the same command to resume")
    parser.add_argument("--epochs", type=float, default=36.0,
                        help="passes over the pretraining text (default: 36, the shipped base's; ~4 h on 2 cores, 2.3 min on an H200)")
    parser.add_argument("--sotu-words", type=int, default=400_000,
                        help="words of State-of-the-Union text to mix in, most recent first (default: 400000; chat is always all)")
    parser.add_argument("--vocab-size", type=int, default=10_000, help="base vocabulary size (default: 10000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sampled-softmax", type=int, default=0,
                        help="negatives per step, 0 = the exact softmax (default: 0; the first base used 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: all cores; 1 is faster when other jobs share the cores)")
    parser.add_argument("--init", type=Path, default=None, metavar="DIR",
                        help="continue training this checkpoint (its vocabulary and size) instead of starting from scratch")
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout on embeddings and LSTM outputs (default: 0.2 for a new model, the --init model's own when continuing)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default; seeded runs are bit-for-bit reproducible) or cuda (a GPU, cuDNN's LSTM)")
    parser.add_argument("--limit-lines", type=int, default=0, help="use only the first N lines (smoke tests)")


def pretraining_lines(sotu_words: int, data_dir: Path | None = None) -> list[str]:
    """All chat lines of the pretraining split + the most recent `sotu_words` words of speeches."""
    from models import datasets
    from models.errors import FedkbError

    data_dir = data_dir or datasets.data_dir()
    lines = datasets.load_pretrain_lines(data_dir / "pretrain.txt.gz")
    try:
        n_chat = json.loads((data_dir / "manifest.json").read_text())["counts"]["pretrain_chitchat_lines"]
        if not (is_int(n_chat) and 0 <= n_chat <= len(lines)):
            raise ValueError(f"pretrain_chitchat_lines is {n_chat!r}")
    except (OSError, KeyError, ValueError, TypeError):  # TypeError: valid JSON of another shape ([], "counts": null)
        raise FedkbError(f"{data_dir / 'manifest.json'} is missing or corrupt; run `fedkb prepare`") from None
    chat, sotu = lines[:n_chat], lines[n_chat:]
    picked, count = [], 0
    for line in reversed(sotu):  # speeches are in date order: take the newest
        if count >= sotu_words:
            break
        picked.append(line)
        count += len(line.split())
    return chat + picked[::-1]


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from models.checkpoint import default_paths
    from models.datasets import data_dir
    from models.lm import LMConfig
    from models.pretrain import PretrainConfig, pretrain
    from models.tokenizer import Tokenizer

    import torch

    from models.errors import FedkbError

    if args.init is not None and args.init.resolve() == args.out.resolve():
        raise FedkbError(f"--init and --out are the same directory ({args.out}); write the continued model elsewhere")
    for flag, value in (("--threads", args.threads), ("--limit-lines", args.limit_lines), ("--sotu-words", args.sotu_words)):
        if value < 0:
            raise FedkbError(f"{flag} must be >= 0, not {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FedkbError("--device cuda: this torch sees no CUDA GPU (train with --device cpu)")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise FedkbError(f"--dropout must be in [0, 1), not {args.dropout}")
    base = PretrainConfig()
    try:
        cfg = PretrainConfig(
            model=LMConfig(base_vocab=args.vocab_size, dropout=NEW_MODEL_DROPOUT),
            train=replace(base.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, sampled_softmax=args.sampled_softmax),
            seed=args.seed,
            dropout=args.dropout,
        )
    except ValueError as e:
        raise FedkbError(f"{e} (--vocab-size, --epochs, --lr, --batch-size, --sampled-softmax, --seed)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir()  # a non-editable install has no data/ (without $FEDKB_DATA): one line that says what to do
    _, tok_path = default_paths()
    tokenizer = Tokenizer(tok_path)
    lines = pretraining_lines(args.sotu_words)
    if args.limit_lines:
        lines = lines[: args.limit_lines]
    console = Console(stderr=True)
    with Progress(TextColumn("pretraining"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("train", total=None, loss=float("nan"))

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=loss)

        def on_note(note: str) -> None:
            progress.console.print(f"[yellow]{escape(note)}[/yellow]", highlight=False, soft_wrap=True)

        pretrain(lines, tokenizer, args.out, args.work, cfg, on_step=on_step, init=args.init, device=args.device,
                 start_lines=pretraining_lines(0), on_note=on_note)
    print(f"wrote {args.out}")
    return 0
