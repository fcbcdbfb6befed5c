"""Experiment: does federated discovery (TrieHH) find the words a population types?

1. Base vocabulary WITHOUT a set H of real words of the population: `--held-out` words of
   the shipped model's vocabulary (frequency rank >= `--min-rank`, so no function words)
   that >= theta of the federated users typed in their on-device history.  They are
   replaced by never-suggested placeholders (so every other word keeps its residual row);
   when discovered, a word comes back at the end of the vocabulary with a purely
   subword-composed embedding, as any new word does.  With `--held-out 0` nothing is removed
   and the words scored are those the population types but the base never had (on the
   Shakespeare roles: `thee`, `hath`, ...).
2. Discovery rounds over the federated users' OOV counts (no model training: discovery only
   needs the devices' counts), for several cohort sizes per round (`--cohorts`):
     dp:   K = floor(N / (theta + 1)) users, the largest sampling rate for which Zhu et al.
           2020, Theorem 1 gives a guarantee (epsilon, delta reported);
     k100: K = 100 users (as `fedkb simulate -k 100`): more utility, no DP claim;
     all:  every user every round: the most the protocol can find, no DP claim.
3. Precision / recall of the words added against T = the words typed by >= theta users that
   the base vocabulary lacks (H plus words the base never had), and recall of H by how many
   users typed the word.
4. OOV rate and KSR (models.evaluate.simulate_typing with the model's Predictor) on the
   future text of the users who typed a word of H, and on the future messages that contain a
   word of H, with the vocabulary of several rounds, and with the full original vocabulary
   (residual rows included) as the reference.

    python bench/bench_vocab_discovery.py [--model data/base] [--rounds 100] > vocab_discovery.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from federation.discovery import (  # noqa: E402
    DiscoveryConfig, TrieState, discovery_round, epoch_privacy, local_oov_counts, triehh_privacy)
from models.text import SPECIALS, words  # noqa: E402
from models.vocab import Vocabulary  # noqa: E402

PLACEHOLDER = "<held-out-{}>"


def hide(vocab: Vocabulary, hidden: set[str]) -> Vocabulary:
    """`vocab` with the words of `hidden` replaced by placeholders at the same indices."""
    out = [PLACEHOLDER.format(i) if w in hidden else w for i, w in enumerate(vocab.words)]
    return Vocabulary(tuple(out), vocab.version, vocab.base_size)


def _share(part: set, whole: set) -> float | None:
    return round(len(part) / len(whole), 4) if whole else None


def run_discovery(users_counts: list[Counter], base: Vocabulary, cfg: DiscoveryConfig, k: int, rounds: int,
                  seed: int) -> list[tuple[Vocabulary, dict]]:
    """[(vocabulary after round r, info)] for r = 1..rounds; K users sampled uniformly per round."""
    rng = random.Random(seed)
    trie, vocab, out = TrieState(), base, []
    for _ in range(rounds):
        sample = rng.sample(range(len(users_counts)), k)
        counts = [Counter({w: n for w, n in users_counts[i].items() if w not in vocab}) for i in sample]
        trie, vocab, info = discovery_round(trie, vocab, counts, cfg, rng)
        out.append((vocab, info))
    return out


_TYPED: dict[tuple, dict] = {}


def typing(model, vocab: Vocabulary, tokenizer, messages: list[str], blocked: set[str]) -> dict:
    """OOV rate, KSR, top-1/3 typing `messages` with `vocab` (memoised on all three: settings share vocabularies)."""
    from models.evaluate import simulate_typing
    from models.predictor import Predictor

    key = (vocab.words, tuple(sorted(blocked)), tuple(messages))
    if key in _TYPED:
        return _TYPED[key]
    s = simulate_typing(Predictor(model, vocab, tokenizer, blocked=blocked), messages)
    _TYPED[key] = {"oov_rate": s["oov_rate"], "ksr": s["ksr"], "top1": s["top1"], "top3": s["top3"], "words": s["words"]}
    return _TYPED[key]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: data/base)")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--users-file", type=Path, default=None)
    ap.add_argument("--theta", type=int, default=10)
    ap.add_argument("--held-out", type=int, default=60,
                    help="words removed from the base vocabulary; 0 = none: discover the words the population "
                         "really lacks (e.g. --users-file data/shakespeare.jsonl.gz)")
    ap.add_argument("--min-rank", type=int, default=300, help="only words ranked below this in the vocabulary")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--cohorts", default="dp,100,all",
                    help="users per round, one setting each: dp = floor(N/(theta+1)), a number, or all (default: dp,100,all)")
    ap.add_argument("--eval-rounds", default="0,10,25,50,100")
    ap.add_argument("--eval-messages", type=int, default=1500, help="future messages typed for OOV/KSR")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    from models.checkpoint import load_model
    from models.datasets import load_users

    ck, tok = load_model(args.model, args.tokenizer)
    users = load_users(args.users_file)
    n = len(users)
    theta = args.theta
    typed_by = Counter()
    for u in users:
        typed_by.update({w for t in u.history for w in words(t)})
    full = ck.vocab
    rank = full.index
    candidates = sorted(w for w in full.words[len(SPECIALS):] if rank[w] >= args.min_rank and typed_by[w] >= theta)
    hidden = set(random.Random(args.seed).sample(candidates, min(args.held_out, len(candidates))))
    base = hide(full, hidden)
    placeholders = {w for w in base.words if w.startswith("<held-out-")}
    truth = {w for w, c in typed_by.items() if c >= theta and w not in base}
    target = hidden or truth  # the words whose return is scored: the removed ones, else all the base lacks
    counts = [local_oov_counts(u.history, base) for u in users]
    t_setup = time.perf_counter() - t0

    settings = {}
    for c in args.cohorts.split(","):
        k = n // (theta + 1) if c == "dp" else n if c == "all" else min(int(c), n)
        settings[c if c in ("dp", "all") else f"k{k}"] = k
    eval_rounds = sorted({int(r) for r in args.eval_rounds.split(",") if int(r) <= args.rounds})
    affected = [u for u in users if any(w in target for t in u.history for w in words(t))]
    msgs = [m for u in affected for m in u.future]
    msgs = random.Random(args.seed).sample(msgs, min(args.eval_messages, len(msgs)))
    # the future messages (of any user) that contain a held-out word: where discovery can help at all
    with_hidden = [m for u in users for m in u.future if any(w in target for w in words(m))]
    with_hidden = random.Random(args.seed).sample(with_hidden, min(args.eval_messages // 2, len(with_hidden)))
    model = ck.model.eval()

    out = {
        "model": str(args.model or "data/base"), "users": n, "theta": theta, "rounds": args.rounds,
        "base_vocab": len(full), "held_out_words": len(hidden), "truth_words": len(truth),
        "truth_definition": f"typed by >= {theta} of {n} users in their history and missing from the base vocabulary",
        "held_out_sample": sorted(hidden)[:25],
        "affected_users": len(affected), "eval_messages": len(msgs),
        "messages_with_held_out_word": len(with_hidden),
        "reference_full_vocab": typing(model, full, tok, msgs, set()),
        "reference_full_vocab_messages_with_held_out_word": typing(model, full, tok, with_hidden, set()),
        "settings": {},
    }
    for name, k in settings.items():
        cfg = DiscoveryConfig(theta=theta, population=n)
        t1 = time.perf_counter()
        hist = run_discovery(counts, base, cfg, k, args.rounds, args.seed)
        t_disc = time.perf_counter() - t1
        gamma = k / n
        found_at: dict[str, int] = {}
        for r, (_, info) in enumerate(hist, 1):
            for a in info["added"]:
                found_at.setdefault(a["word"], r)
        curve = []
        for r in sorted({10, 25, 50, args.rounds} | set(eval_rounds)):
            if r == 0 or r > args.rounds:
                continue
            got = {w for w, fr in found_at.items() if fr <= r}
            curve.append({"round": r, "added": len(got),
                          "precision": round(len(got & truth) / len(got), 4) if got else None,
                          "recall": _share(got & truth, truth),
                          "recall_held_out": _share(got & hidden, hidden)})
        got = set(found_at)
        buckets = {}
        for lo, hi in ((theta, 49), (50, 99), (100, n)):
            hs = {w for w in target if lo <= typed_by[w] <= hi}
            if hs:
                buckets[f"{lo}-{hi} users"] = {"words": len(hs), "recall": _share(got & hs, hs)}
        runs = [info for _, info in hist if info["epsilon_run"] is not None]
        eps_run_max = max((i["epsilon_run"] for i in runs), default=None)
        completed = hist[-1][1]["trie"]["epoch"] if hist else 0
        eps_thm, delta = triehh_privacy(theta, gamma, cfg.max_word_len + 1)
        evals = []
        for r in eval_rounds:
            v = base if r == 0 else hist[r - 1][0]
            evals.append({"round": r, "vocab_size": len(v) - len(placeholders), **typing(model, v, tok, msgs, placeholders),
                          "messages_with_held_out_word": typing(model, v, tok, with_hidden, placeholders)})
        out["settings"][name] = {
            "clients_per_round": k, "sampling_rate": round(gamma, 4),
            "privacy": {
                "theorem_applies": eps_run_max is not None and len(runs) == len(hist),
                "epsilon_per_trie_run_bound": round(eps_thm, 4) if eps_thm != float("inf") else None,
                "epsilon_max_trie_run_measured": round(eps_run_max, 4) if eps_run_max is not None else None,
                "delta_per_trie_run": delta,
                "trie_runs_completed": completed,
                "epsilon_total_basic_composition": (round(epoch_privacy(theta, [gamma] * args.rounds)[0], 3)
                                                    if eps_run_max is not None else None),
            },
            "precision": round(len(got & truth) / len(got), 4) if got else None,
            "recall": _share(got & truth, truth),
            "recall_held_out": _share(got & hidden, hidden),
            "recall_held_out_by_users" if hidden else "recall_by_users": buckets,
            "found_not_held_out": sorted(got - hidden)[:20],
            "curve": curve,
            "typing_on_affected_users_future": evals,
            "discovery_seconds": round(t_disc, 2),
        }
    out["seconds"] = {"setup": round(t_setup, 2), "total": round(time.perf_counter() - t0, 2)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    from models.errors import FedkbError

    try:
        sys.exit(main())
    except FedkbError as e:
        sys.exit(f"bench_vocab_discovery: error: {e}")
