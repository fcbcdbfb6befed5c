"""`fedkb vocab RUN`: how the global vocabulary grew in a simulation run.

Reads `RUN/vocab.jsonl` (written by `fedkb simulate --discover`): prints the
timeline (rounds that added words, with the votes each word got, the vocabulary
version and size, the held-out OOV rate, the TrieHH privacy parameters), or with
`--word WORD` answers "when was WORD added?" (exit status 1 if it never was; a word of the
base vocabulary answers round 0).  Only committed rounds are shown.
`--json` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "how the global vocabulary grew in a run; when was WORD added"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="run folder of `fedkb simulate --discover`")
    parser.add_argument("--word", metavar="WORD", help="when was WORD added to the vocabulary?")
    parser.add_argument("--all", action="store_true", help="list every round, not only those that added words")
    parser.add_argument("--json", action="store_true", help="print JSON")


def public(rec: dict) -> dict:
    """A history record without the trie's internal state."""
    return {k: v for k, v in rec.items() if k != "trie"}


def eps_text(rec: dict) -> str:
    """Epsilon of the record's trie run so far: "-" before any round, "none" = no guarantee."""
    if "epsilon_run" not in rec:
        return "-"
    return "none" if rec["epsilon_run"] is None else f"{rec['epsilon_run']:.2f}"


def answer(run_dir: Path, word: str) -> dict:
    """When `word` (normalized as the devices count words) entered the vocabulary: the round that
    added it, or round 0 for a word of the base vocabulary; "added": False if it never did."""
    from federation import vocab_history as vh
    from federation.runfolder import checkpoint_dir
    from models.errors import FedkbError

    if not vh.normalize_word(word).strip():
        raise FedkbError("--word needs a word (it is empty)")
    rows = vh.timeline(run_dir)
    rec = vh.when_added(run_dir, word, rows)
    word = vh.normalize_word(word)
    if rec is None:
        base = vh.base_vocabulary(run_dir)  # the round-0 checkpoint's
        if base is None:  # "never added" would be a guess: the word may be a base word
            raise FedkbError(f"{checkpoint_dir(run_dir, 0) / 'model.json'} is missing or unreadable: the base vocabulary "
                             f"is unknown, so whether {word!r} was in it is too")
        if vh.in_base_vocabulary(word, base):
            return {"word": word, "added": False, "base_vocabulary": True, "round": 0, "vocab_version": base.version}
        return {"word": word, "added": False, "last_round": rows[-1]["round"]}
    votes = next(a["votes"] for a in rec["added"] if a["word"] == word)
    out = {"word": word, "added": True, "round": rec["round"], "vocab_version": rec["vocab_version"],
           "votes": votes, "theta": rec.get("theta")}
    if rec.get("rebuilt"):
        out["rebuilt"] = True  # vocab.jsonl was lost: added by this round, its round and votes unknown
    return out


def answer_text(ans: dict) -> str:
    """`answer` in words (plain text: no markup)."""
    w = ans["word"]
    if ans.get("base_vocabulary"):
        return f"{w} is in the base vocabulary since round 0"
    if not ans["added"]:
        return f"{w} was never added (rounds 0-{ans['last_round']})"
    if ans.get("rebuilt"):
        return (f"{w} was added by round {ans['round']} (vocabulary version {ans['vocab_version']}; "
                f"vocab.jsonl was lost before, the round and votes are unknown)")
    return (f"{w} was added in round {ans['round']} (vocabulary version {ans['vocab_version']}, "
            f"{ans['votes']} users voted, theta {ans['theta']})")


def added_text(rec: dict) -> str:
    """A record's added words with their votes ("?" where a rebuilt record lost them)."""
    return ", ".join(f"{a['word']} ({'?' if a['votes'] is None else a['votes']})" for a in rec.get("added", []))


def summary(rows: list[dict]) -> dict:
    added = [a for r in rows for a in r.get("added", [])]
    last = rows[-1]
    runs = [r for r in rows if "epsilon_run" in r]
    dp = bool(runs) and all(r.get("dp") for r in runs)
    return {
        "rounds": last["round"],
        "words_added": len(added),
        "vocab_size": [rows[0]["vocab_size"], last["vocab_size"]],
        "vocab_version": [rows[0]["vocab_version"], last["vocab_version"]],
        "oov_rate": [rows[0].get("oov_rate"), last.get("oov_rate")],
        "theta": next((r["theta"] for r in rows if "theta" in r), None),
        "dp_guarantee": dp,  # Theorem 1's conditions held in every round (theta > 3, gamma <= 1/(theta+1))
        "max_epsilon_per_trie_run": max((r["epsilon_run"] for r in runs), default=None) if dp else None,
        "delta_per_trie_run": next((r["delta_run"] for r in runs), None),
        "trie_runs": (last.get("trie") or {}).get("epoch", 0),
    }


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from federation import vocab_history as vh

    rows = vh.timeline(args.run)
    console = Console()
    if args.word is not None:
        ans = answer(args.run, args.word)
        if args.json:
            print(json.dumps(ans, allow_nan=False))
        else:
            text = answer_text(ans)  # plain Text, not markup: the word is the user's ("[/]" is a word asked about)
            console.print(Text.assemble((ans["word"], "bold"), text[len(ans["word"]):]), highlight=False)
        return 0 if ans["added"] or ans.get("base_vocabulary") else 1
    if args.json:
        print(json.dumps({"summary": summary(rows), "timeline": [public(r) for r in rows]}, allow_nan=False))
        return 0
    table = Table(title=escape(f"vocabulary of {args.run}"), title_justify="left")
    for col, just in (("round", "right"), ("version", "right"), ("size", "right"), ("OOV %", "right"),
                      ("epsilon", "right"), ("words added (votes)", "left")):
        table.add_column(col, justify=just)
    shown = [r for i, r in enumerate(rows) if args.all or r.get("added") or i in (0, len(rows) - 1)]
    for r in shown:
        oov = r.get("oov_rate")
        table.add_row(str(r["round"]), str(r["vocab_version"]), str(r["vocab_size"]),
                      "-" if oov is None else f"{oov:.2f}", eps_text(r), Text(added_text(r)))
    console.print(table)
    s = summary(rows)
    console.print(f"{s['words_added']} words added in {s['rounds']} rounds; vocabulary {s['vocab_size'][0]} -> "
                  f"{s['vocab_size'][1]} words; TrieHH theta {s['theta']}, {s['trie_runs']} trie runs completed",
                  highlight=False)
    if s["dp_guarantee"]:
        console.print(f"privacy (Zhu et al. 2020, Theorem 1): each trie run is ({s['max_epsilon_per_trie_run']:.2f}, "
                      f"{s['delta_per_trie_run']:.2g})-DP at most; runs compose", highlight=False)
    elif s["theta"] is not None:
        console.print("privacy: no DP guarantee claimed (sampling rate above 1/(theta+1), or theta <= 3)", highlight=False)
    return 0
