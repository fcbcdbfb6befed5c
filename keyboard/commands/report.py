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


def _scores(s: dict) -> str:
    """The global model's scores at the first and the last evaluated round (held-out users)."""
    st, en = s["start"], s["end"]
    if st.get("top1") is None:
        return "no round was evaluated (--eval-users 0)"
    at = f" (round {en['round']}, the last evaluated)" if en.get("round") != s["rounds"] else ""
    return (f"global top-1 {st['top1']}% -> {en['top1']}%, top-3 {st.get('top3')}% -> {en.get('top3')}%, "
            f"KSR {st.get('ksr')}% -> {en.get('ksr')}%{at}")


def _epsilon(s: dict) -> str:
    if s["epsilon"] is not None:
        return f"epsilon {s['epsilon']:.3g}"
    if not s.get("dp"):
        return "epsilon n/a (no DP noise)"
    if s.get("lost_rounds"):
        return f"epsilon unknown (the metrics of round {s['rounds']} are lost)"
    return "epsilon n/a (no round yet)"


def _aborted(s: dict) -> str:
    """The rounds secure aggregation aborted, whose updates never reached the model (none: "")."""
    n = s.get("secagg_aborted_rounds", 0)
    if not n:
        return ""
    what = "noise only" if s.get("dp") else "model unchanged"
    return f", {n} round{'s' if n > 1 else ''} aborted by secure aggregation ({what})"


def run(args: argparse.Namespace) -> int:
    import torch

    from federation.report import write_report
    from models.errors import FedkbError

    if args.users < 0 or args.threads < 1:
        raise FedkbError(f"--users must be >= 0 (0 skips the study) and --threads >= 1 (got {args.users}, {args.threads})")
    torch.set_num_threads(args.threads)
    rep = write_report(args.run, args.out, users=args.users, personalization=args.users > 0)
    s = rep["summary"]
    print(f"{s['rounds']} round{'' if s['rounds'] == 1 else 's'}: {_scores(s)}")
    print(f"aggregated {s['aggregated']} updates, {s['rejected']} rejected, {s['clipped']} clipped, {s['dropouts']} dropouts"
          f"{_aborted(s)}; {_epsilon(s)}")
    p = rep.get("personalization")
    if p:
        m, pv = p["mean"], p["personalized_vs_global"]
        print(f"personalization ({p['users']} users, {p['held_out_users']} of them held out of the federation): mean top-1 base {m['base']['top1']}% / global {m['global']['top1']}% / "
              f"personalized {m['personalized']['top1']}%; median relative top-1 gain {_pct(pv['median_relative_top1_gain'])}; "
              f"{100 * pv['share_better_top1']:.0f}% better, {100 * pv['share_worse_top1']:.0f}% worse (top-1), "
              f"{100 * pv['share_better_loss']:.0f}% lower loss, {100 * pv['share_worse_loss']:.0f}% higher (median perplexity change "
              f"{100 * pv['median_relative_perplexity_change']:+.1f}%); KSR {100 * pv['share_better_ksr']:.0f}% better, "
              f"{100 * pv['share_worse_ksr']:.0f}% worse, median relative gain {_pct(pv['median_relative_ksr_gain'])}")
        for name, label in (("held_out", "held-out users"), ("clients", "the federation's clients")):
            if name in p["by_group"]:
                g = p["by_group"][name]
                print(f"  {label} ({g['users']}): top-1 {100 * g['share_better_top1']:.0f}% better, "
                      f"{100 * g['share_worse_top1']:.0f}% worse, median relative gain {_pct(g['median_relative_top1_gain'])}; "
                      f"loss {100 * g['share_better_loss']:.0f}% lower; KSR {100 * g['share_better_ksr']:.0f}% better")
    for f in rep["files"]:
        print(f"wrote {f}")
    print(f"wrote {Path(args.out or args.run / 'report') / 'report.json'}")
    return 0
