"""`fedkb predict "TEXT"`: the 3 suggestions the keyboard would show after TEXT.

A partial last word ("how are y") gets completions; text ending in a space or
punctuation gets next-word predictions.  Suggestions are cased as the keyboard
inserts them (sentence start, "I").  Imports only the model side (no Textual,
no federation, no torch): inference runs on NumPy (models/numpy_predictor.py),
so a whole process answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "print the 3 suggestions for the text typed so far"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help='the text typed so far, e.g. "how are y" (completions) or "how are " (next word)')
    parser.add_argument("--model", type=Path, default=None, metavar="DIR", help="checkpoint directory (default: the shipped data/base)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="sentencepiece model (default: data/tokenizer.model)")
    parser.add_argument("-k", type=int, default=3, help="number of suggestions (default: 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of one suggestion per line")


def run(args: argparse.Namespace) -> int:
    from keyboard.typing import TypingSession
    from models.modelfile import default_paths
    from models.errors import FedkbError
    from models.numpy_predictor import NumpyPredictor
    from models.tokenizer import Tokenizer

    if args.k < 1:
        raise FedkbError("-k must be at least 1")
    if args.model is None or args.tokenizer is None:
        base, tok = default_paths()
        args.model, args.tokenizer = args.model or base, args.tokenizer or tok
    tokenizer = Tokenizer(args.tokenizer)
    pred = NumpyPredictor.load(args.model, tokenizer, k=args.k)
    session = TypingSession(pred, k=args.k)
    update = session.update(args.text)
    if args.json:
        print(json.dumps({"text": args.text, "partial": update.partial, "suggestions": update.suggestions,
                          "model": pred.meta.get("kind", "?"), "round": pred.meta.get("round"),
                          "vocab_version": pred.vocab.version}, ensure_ascii=False))
    else:
        for word in update.suggestions:
            print(word)
        if not update.suggestions:  # stdout stays empty for scripts; a person sees why
            why = f": no word in the vocabulary starts with {update.partial!r}" if update.partial else ""
            print(f"no suggestions{why}", file=sys.stderr)
    return 0
