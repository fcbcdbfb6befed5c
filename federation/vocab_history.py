"""How the global vocabulary grew: one JSON line per round in `<run>/vocab.jsonl`.

    {"round": 0, "vocab_version": 0, "vocab_size": 10000, "added": [], "oov_rate": 3.1, ...}
    {"round": 7, "vocab_version": 1, "vocab_size": 10002,
     "added": [{"word": "yeet", "votes": 12}, ...], "oov_rate": 2.9, "voters": 48,
     "sampling_rate": 0.07, "epsilon_run": 1.9, "delta_run": 3e-07, "trie": {...}, ...}

Round 0 is the base vocabulary.  "votes" is the number of sampled users who voted for
the word in the round it was added (a subsampled count, the only count the server has);
"oov_rate" is the percentage of held-out words (held-out users' future text) outside the
vocabulary after the round.  Append-only; on resume the file is cut back to the
checkpoint's round (`truncate`), so a killed-and-resumed run leaves the same file as an
uninterrupted one.  No user text is stored: only words that >= theta users typed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from models import atomic
from models.errors import FedkbError
from models.jsonvalues import is_int, is_number
from models.text import is_word, words

FILE = "vocab.jsonl"


def path_of(run_dir: Path) -> Path:
    return Path(run_dir) / FILE


# -- held-out OOV rate --------------------------------------------------------------------------
def word_counts(texts: Iterable[str]) -> Counter:
    c: Counter = Counter()
    for t in texts:
        c.update(w for w in words(t) if is_word(w))
    return c


def oov_rate(counts: Mapping[str, int], vocab) -> float | None:
    """Percentage of the held-out word tokens `counts` that `vocab` lacks (None without held-out text)."""
    total = sum(counts.values())
    if not total:
        return None
    return round(100.0 * sum(n for w, n in counts.items() if w not in vocab) / total, 4)


# -- the file -----------------------------------------------------------------------------------
def read(run_dir: Path) -> list[dict]:
    """All records in round order (a torn last line after a crash is skipped)."""
    return [rec for rec in atomic.read_jsonl(path_of(run_dir)) if isinstance(rec, dict) and is_int(rec.get("round"))]


def _problem(rec: dict) -> str | None:
    """What is wrong with a record, if anything: the fields readers use, with their types."""
    if not (is_int(rec.get("vocab_version")) and is_int(rec.get("vocab_size"))):
        return "vocab_version and vocab_size must be integers"
    added = rec.get("added", [])
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and isinstance(a.get("word"), str) and is_int(a.get("votes")) for a in added):
        return "added must be a list of {word, votes}"
    for k in ("oov_rate", "epsilon_run", "delta_run"):
        if rec.get(k) is not None and not is_number(rec[k]):
            return f"{k} must be a number"
    if "theta" in rec and not is_int(rec["theta"]):
        return "theta must be an integer"
    return None


def _write_all(run_dir: Path, records: list[dict]) -> None:
    atomic.write_text(path_of(run_dir), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append(run_dir: Path, round: int, info: Mapping) -> dict:
    """Append round `round`'s record (from discovery's info dict); returns it."""
    rec = {"round": int(round), **{k: v for k, v in info.items() if k != "round"}}
    atomic.append_line(path_of(run_dir), json.dumps(rec, ensure_ascii=False))
    return rec


def start(run_dir: Path, vocab, heldout: Mapping[str, int]) -> None:
    """Write the round-0 record (the base vocabulary) if the file has none."""
    if not read(run_dir):
        _write_all(run_dir, [{"round": 0, "vocab_version": vocab.version, "vocab_size": len(vocab),
                              "added": [], "oov_rate": oov_rate(heldout, vocab)}])


def truncate(run_dir: Path, last_round: int) -> None:
    """Keep only records of rounds <= last_round (the checkpoint a run resumes from)."""
    recs = read(run_dir)
    keep = [r for r in recs if r["round"] <= last_round]
    raw = path_of(run_dir).read_text(encoding="utf-8") if path_of(run_dir).exists() else ""
    if len(keep) != len(recs) or raw.count("\n") != len(recs):
        _write_all(run_dir, keep)


def resume(run_dir: Path, round: int, vocab, heldout: Mapping[str, int], cfg):
    """Before round `round`: base record written, later rounds dropped; the trie to continue from."""
    from federation.discovery import TrieState

    start(run_dir, vocab, heldout)
    truncate(run_dir, round - 1)
    last = read(run_dir)[-1]
    if last.get("vocab_version", vocab.version) != vocab.version:
        raise FedkbError(f"{path_of(run_dir)} ends at vocabulary version {last['vocab_version']} but the "
                         f"checkpoint has version {vocab.version}; the run folder is inconsistent")
    return TrieState.from_json(last["trie"]) if "trie" in last else TrieState()


# -- queries ------------------------------------------------------------------------------------
def timeline(run_dir: Path) -> list[dict]:
    """One row per round: round, version, size, added words, OOV rate, epsilon of the trie run."""
    if not Path(run_dir).is_dir():
        raise FedkbError(f"{run_dir} is not a run folder")
    recs = read(run_dir)
    if not recs:
        raise FedkbError(f"{path_of(run_dir)} is missing or empty: was the run made with --discover?")
    for rec in recs:  # the fields the queries read: a file edited by hand or damaged is an error, not a traceback
        why = _problem(rec)
        if why:
            raise FedkbError(f"{path_of(run_dir)}: the record of round {rec['round']} is malformed ({why})")
    return recs


def when_added(run_dir: Path, word: str) -> dict | None:
    """The record of the round that added `word` (lower-cased), or None if it never was."""
    word = word.lower().strip()
    for rec in timeline(run_dir):
        for a in rec.get("added", []):
            if a["word"] == word:
                return rec
    return None
