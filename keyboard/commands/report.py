"""`fedkb report RUN`: PNG plots of a simulation run and the personalization study."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "plots and a summary of a simulation run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="a `fedkb simulate` run folder")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs and report.json (default: RUN/report)")
    parser.add_argument("--users", type=int, default=50, help="users in the personalization study; 0 = skip it (default: 50)")
    parser.add_argument("--threads", type=int, default=1)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def run(args: argparse.Namespace) -> int:
    import torch

    from federation.report import write_report
    from models.errors import FedkbError

    if args.users < 0 or args.threads < 1:
        raise FedkbError(f"--users must be >= 0 (0 skips the study) and --threads >= 1 (got {args.users}, {args.threads})")
    torch.set_num_threads(args.threads)
    rep = write_report(args.run, args.out, users=args.users, personalization=args.users > 0)
    s = rep["summary"]
    st, en = s["start"], s["end"]
    print(f"{s['rounds']} rounds: global top-1 {st.get('top1')}% -> {en.get('top1')}%, top-3 {st.get('top3')}% -> {en.get('top3')}%, "
          f"KSR {st.get('ksr')}% -> {en.get('ksr')}%")
    print(f"aggregated {s['aggregated']} updates, {s['rejected']} rejected, {s['clipped']} clipped, {s['dropouts']} dropouts; "
          f"epsilon {s['epsilon'] if s['epsilon'] is not None else 'n/a (no DP noise)'}")
    p = rep.get("personalization")
    if p:
        m, pv = p["mean"], p["personalized_vs_global"]
        print(f"personalization ({p['users']} users): mean top-1 base {m['base']['top1']}% / global {m['global']['top1']}% / "
              f"personalized {m['personalized']['top1']}%; median relative top-1 gain {_pct(pv['median_relative_top1_gain'])}; "
              f"{100 * pv['share_better_top1']:.0f}% better, {100 * pv['share_worse_top1']:.0f}% worse (top-1), "
              f"{100 * pv['share_better_loss']:.0f}% lower loss (median perplexity change "
              f"{100 * pv['median_relative_perplexity_change']:+.1f}%); KSR {100 * pv['share_better_ksr']:.0f}% better, "
              f"{100 * pv['share_worse_ksr']:.0f}% worse, median relative gain {_pct(pv['median_relative_ksr_gain'])}")
    for f in rep["files"]:
        print(f"wrote {f}")
    return 0
