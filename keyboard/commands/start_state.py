"""`fedkb start-state [--model DIR]`: set the state a model starts every message from.

Averages the model's LSTM state at message starts over the first words of the
pretraining split's chat text (models/start_state.py) and rewrites the checkpoint
in place (weights and JSON replaced together, models/atomic.write_files).  `fedkb pretrain` does this itself;
this command brings a model trained before it did up to date (the shipped base v2
was one).  Only the start state changes: every trained weight stays bit for bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "set the state a model starts every message from (pretrain does it; for older models)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.start_state import START_WORDS

    parser.add_argument("--model", type=Path, default=None, metavar="DIR", help="checkpoint directory to update (default: the shipped data/base)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="sentencepiece model (default: data/tokenizer.model)")
    parser.add_argument("--words", type=int, default=START_WORDS,
                        help=f"words of pretraining chat to average over (default: {START_WORDS})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from keyboard.commands.pretrain import pretraining_lines
    from models.checkpoint import default_paths, load_model, save_checkpoint
    from models.errors import FedkbError
    from models.lm import WordTable
    from models.start_state import set_mean_start_state

    if args.words < 1:
        raise FedkbError(f"--words must be >= 1, not {args.words}")
    model_dir = args.model or default_paths()[0]
    ck, tokenizer = load_model(model_dir, args.tokenizer)
    table = WordTable.build(ck.vocab, tokenizer, ck.model.cfg.base_vocab)
    info = set_mean_start_state(ck.model, table, ck.vocab, pretraining_lines(0), args.words)
    if info["message_starts"] == 0:
        raise FedkbError(f"no message starts in the first {args.words} words of chat: use more --words")
    save_checkpoint(model_dir, ck.model, ck.vocab, tokenizer, meta={**ck.meta, "start_state": info})
    out = {"model": str(model_dir), **info, "h_norm": round(float(ck.model.start_h.norm()), 4),
           "c_norm": round(float(ck.model.start_c.norm()), 4)}
    print(json.dumps(out) if args.json else
          f"{model_dir}: start state averaged over {info['message_starts']} message starts in {info['words']} words of chat "
          f"(|h| {out['h_norm']}, |c| {out['c_norm']})")
    return 0
