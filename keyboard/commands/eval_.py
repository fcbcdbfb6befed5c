"""`fedkb eval`: simulate typing held-out text with the keyboard's suggestions.

`--text FILE` types FILE (one message per line); `--users` types the held-out
future text of the federated users.  Prints top-1 / top-3 next-word accuracy
and the keystroke savings rate (KSR, as Presage defines it) from
`models.evaluate.simulate_typing` — the same code path the keyboard uses.
With `-k N` the typist sees N suggestions, and the second accuracy is top-N
(`topN` in the JSON; with -k 1 there is only top-1).  A message counts its first 200 words
(`MAX_MESSAGE_WORDS`; a sentence break is one of them).
Text with no words at all (empty, only punctuation or emoji) is a user error; so is a FILE
that is not a regular file (/dev/zero, a pipe), as it is read twice, a line at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

HELP = "simulate typing held-out text: top-1/top-3 (top-k) accuracy and keystroke savings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text to type, one message per line")
    src.add_argument("--users", action="store_true", help="type the held-out future text of the federated users")
    parser.add_argument("--users-file", type=Path, default=None, metavar="FILE",
                        help="users file (default: data/users.jsonl.gz, the chat senders; data/shakespeare.jsonl.gz: Shakespeare's roles)")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N users / messages (0 = all)")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR", help="checkpoint directory (default: the shipped data/base)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="sentencepiece model (default: data/tokenizer.model)")
    parser.add_argument("-k", type=int, default=3, help="number of suggestions (default: 3); the accuracy is then top-k")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


MAX_LINE_BYTES = 16 << 20  # a longer line is no message: refused, so memory stays bounded


def read_messages(path: Path) -> Iterator[str]:
    """Non-blank lines of a UTF-8 text file, read lazily; FedkbError when unreadable."""
    from models.errors import FedkbError

    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FedkbError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise FedkbError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise FedkbError(f"cannot read {path}: {e.strerror}") from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise FedkbError(f"{path} is not a regular file (a device or a pipe); save the text to a file first")
        offset = 0
        for n in itertools.count(1):
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as e:
                raise FedkbError(f"cannot read {path}: {e.strerror}") from None
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise FedkbError(f"{path}: line {n} is longer than {MAX_LINE_BYTES >> 20} MiB; one message a line")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FedkbError(f"{path} is not UTF-8 text (byte {offset + e.start})") from None
            offset += len(raw)
            line = text.rstrip("\r\n")  # not splitlines(): U+2028, form feeds, ... inside a line split one message into several
            if line.strip():
                yield line


def run(args: argparse.Namespace) -> int:
    import torch

    from models.checkpoint import load_model
    from models.errors import FedkbError
    from models.evaluate import simulate_typing
    from models.predictor import Predictor
    from models.text import words

    if args.k < 1:
        raise FedkbError("-k must be at least 1")
    if args.limit < 0:
        raise FedkbError("--limit must be >= 0")
    if args.users_file and not args.users:
        raise FedkbError("--users-file goes with --users")
    if args.users:
        from models.datasets import load_users

        users = load_users(args.users_file)
        if args.limit:
            users = users[: args.limit]
        future = [m for u in users for m in u.future]
        messages = lambda: future
        source = {"source": "users", "users": len(users)}
    else:
        messages = lambda: itertools.islice(read_messages(args.text), args.limit or None)  # read lazily, twice
        source = {"source": str(args.text)}
    has_words = False
    for m in messages():  # the whole text: a line that is not UTF-8 is an error before the model loads
        has_words = has_words or bool(words(m))
    if not has_words:
        where = "the users' future text" if args.users else str(args.text)
        raise FedkbError(f"{where} has no words to type (empty, or only punctuation/symbols)")

    torch.set_num_threads(1)  # one message at a time: threads mostly add overhead on small batches
    ckpt, tokenizer = load_model(args.model, args.tokenizer)
    pred = Predictor(ckpt.model, ckpt.vocab, tokenizer, k=args.k)
    result = {**simulate_typing(pred, messages(), k=args.k), "k": args.k, **source,
              "model": ckpt.meta.get("kind", "?"), "round": ckpt.meta.get("round"), "vocab_version": ckpt.vocab.version}
    result = _named_top_k(result, args.k)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        _print_table(result)
    return 0


def _named_top_k(result: dict, k: int) -> dict:
    """simulate_typing's "top3" is "among the k suggestions": named top{k} for another k (none for k = 1,
    where it is top1)."""
    if k == 3:
        return result
    return {(f"top{k}" if key == "top3" else key): v for key, v in result.items() if not (k == 1 and key == "top3")}


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"simulated typing, {r['k']} suggestions ({r['source']})"))
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("messages", f"{r['messages']:,}")
    t.add_row("words", f"{r['words']:,}")
    t.add_row("top-1 accuracy", f"{r['top1']:.2f} %")
    if r["k"] > 1:
        t.add_row(f"top-{r['k']} accuracy", f"{r['top' + str(r['k'])]:.2f} %")
    t.add_row("keystroke savings (KSR)", f"{r['ksr']:.2f} %")
    t.add_row("out-of-vocabulary words", f"{r['oov_rate']:.2f} %")
    t.add_row("keys typed", f"{r['keys_typed']:,}")
    t.add_row("keys to select", f"{r['keys_selected']:,}")
    t.add_row("keys without prediction", f"{r['keys_without']:,}")
    Console().print(t)
