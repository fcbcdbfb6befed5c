"""`fedkb predict "TEXT"`: the 3 suggestions the keyboard would show after TEXT.

A partial last word ("how are y") gets completions; text ending in a space or
punctuation gets next-word predictions.  Suggestions are cased as the keyboard
inserts them (sentence start, "I").  Imports only the model side (no Textual,
no federation), so a whole process answers in about the time torch takes to import.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "print the 3 suggestions for the text typed so far"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help='the text typed so far, e.g. "how are y" (completions) or "how are " (next word)')
    parser.add_argument("--model", type=Path, default=None, metavar="DIR", help="checkpoint directory (default: the shipped data/base)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="sentencepiece model (default: data/tokenizer.model)")
    parser.add_argument("-k", type=int, default=3, help="number of suggestions (default: 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of one suggestion per line")


def run(args: argparse.Namespace) -> int:
    import torch

    from keyboard.typing import TypingSession
    from models.checkpoint import load_model
    from models.errors import FedkbError
    from models.predictor import Predictor

    if args.k < 1:
        raise FedkbError("-k must be at least 1")
    torch.set_num_threads(1)  # one sequence, one step at a time: threads only add overhead
    ckpt, tokenizer = load_model(args.model, args.tokenizer)
    session = TypingSession(Predictor(ckpt.model, ckpt.vocab, tokenizer, k=args.k), k=args.k)
    update = session.update(args.text)
    if args.json:
        print(json.dumps({"text": args.text, "partial": update.partial, "suggestions": update.suggestions,
                          "model": ckpt.meta.get("kind", "?"), "round": ckpt.meta.get("round"),
                          "vocab_version": ckpt.vocab.version}, ensure_ascii=False))
    else:
        for word in update.suggestions:
            print(word)
    return 0
