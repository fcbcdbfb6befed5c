"""How to fine-tune a personal model: learning rates and epochs compared on held-out HISTORY.

    python bench/bench_personalization.py RUN [--users 100] [--grid 0.3:1,0.1:1,0.3:2,0.1:3,0.1:3:on] [--include-clients]

For each of the run's held-out evaluation users (none of them trained the global model), the
history is split in time: the first 80 % is fine-tuned on, from the run's final global
model, with each (lr, epochs[, dropout on/off]) of the grid, the rest of the step as
`personalization_config` makes it from the run's client setting; the last 20 % scores it
against the global model (top-1 and loss).  The future text that `fedkb report` scores is
never read, so choosing the personalization setting here does not tune on the test text.  Prints one
JSON object: per setting, the share of users whose top-1 got better / worse, the median
relative top-1 change (over users whose global top-1 is above 0, as `fedkb report` takes it),
mean top-1, and the share with lower loss and the median change.

--include-clients adds the population's other users after them (as `fedkb report`'s study
does): more users, but the federation's clients trained the global model on their whole
history, the 20 % scored here included, which favours the global model over any personal one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def parse_setting(spec: str, client):
    """`lr:epochs[:on|off]` -> the client setting with that learning rate, epochs and dropout."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("on", "off")):
        raise SystemExit(f"bad --grid setting {spec!r}: expected LR:EPOCHS or LR:EPOCHS:on|off")
    c = dataclasses.replace(client, lr=float(parts[0]), epochs=float(parts[1]))
    return dataclasses.replace(c, dropout=parts[2] == "on") if len(parts) == 3 else c


def main() -> None:
    from federation.client import local_finetune
    from federation.config import personalization_config
    from federation.device import Device
    from federation.report import relative_changes, score_text, study_user_ids
    from federation.run import checkpoint_dir, latest_round, read_config
    from models.checkpoint import load_checkpoint
    from models.lm import WordLM
    from models.tokenizer import Tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--grid", default="0.3:1,0.1:1,0.3:2,0.1:3", metavar="LR:EPOCHS[:on|off],...",
                   help="settings; a third field turns dropout on or off (default: 0.3:1,0.1:1,0.3:2,0.1:3)")
    p.add_argument("--min-words", type=int, default=20, help="validation words a user needs (default: 20)")
    p.add_argument("--include-clients", action="store_true",
                   help="also the federation's clients, whose whole history trained the global model")
    args = p.parse_args()

    cfg, sim = read_config(args.run)
    client = personalization_config(sim.client)
    tok = Tokenizer(Path(cfg["tokenizer"]))
    glob = load_checkpoint(checkpoint_dir(args.run, latest_round(args.run)), tok)
    root = Path(cfg["devices"])
    grid = {s: parse_setting(s, client) for s in args.grid.split(",")}

    rows = []
    users = study_user_ids(cfg) if args.include_clients else list(cfg.get("eval_users", []))
    for uid in users:
        if len(rows) >= args.users:
            break
        hist = Device(root, uid).history()
        cut = int(len(hist) * 0.8)
        train, val = hist[:cut], hist[cut:]
        if not train or sum(len(m.split()) for m in val) < args.min_words:
            continue
        row = {"global": score_text(glob.model, glob.vocab, tok, val)}
        for name, c in grid.items():
            personal = WordLM(glob.model.cfg)
            g = torch.Generator().manual_seed(len(rows))
            personal.load_state_dict(local_finetune(glob.model, glob.vocab, tok, train, c, g))
            row[name] = score_text(personal, glob.vocab, tok, val)
        rows.append(row)

    if not rows:
        raise SystemExit(f"no user with {args.min_words} validation words (the run holds out {len(cfg.get('eval_users', []))} users; "
                         "--include-clients adds the others)")
    out = {"run": str(args.run), "users": len(rows), "clients_included": args.include_clients, "global_mean_top1": round(statistics.mean(r["global"]["top1"] for r in rows), 3),
           "settings": {}}
    for name in grid:
        d1 = [r[name]["top1"] - r["global"]["top1"] for r in rows]
        dl = [r[name]["loss"] - r["global"]["loss"] for r in rows]
        rel = relative_changes([r["global"]["top1"] for r in rows], [r[name]["top1"] for r in rows])
        out["settings"][name] = {
            "share_better_top1": round(sum(d > 0 for d in d1) / len(rows), 3),
            "share_worse_top1": round(sum(d < 0 for d in d1) / len(rows), 3),
            "median_relative_top1_change": round(statistics.median(rel), 4) if rel else None,
            "mean_top1": round(statistics.mean(r[name]["top1"] for r in rows), 3),
            "share_lower_loss": round(sum(d < 0 for d in dl) / len(rows), 3),
            "median_loss_change": round(statistics.median(dl), 4),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        main()
    except FedkbError as e:
        sys.exit(f"bench_personalization: error: {e}")
