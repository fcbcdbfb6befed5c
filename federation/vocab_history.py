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
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from federation import runfolder
from models import atomic
from models.errors import FedkbError
from models.jsonvalues import is_int, is_number
from models.text import is_word, normalize_text, words

FILE = "vocab.jsonl"
TRIE_LOST = "word discovery's trie is lost"  # in resume's note where the trie restarts


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
    """What is wrong with a record, if anything: every field a reader or a resumed run uses, with its type."""
    if not (is_int(rec.get("vocab_version")) and is_int(rec.get("vocab_size"))
            and rec["vocab_version"] >= 0 and rec["vocab_size"] >= 0):
        return "vocab_version and vocab_size must be whole numbers"
    rebuilt = rec.get("rebuilt", False)
    if not isinstance(rebuilt, bool):
        return "rebuilt must be true or false"
    added = rec.get("added", [])
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and isinstance(a.get("word"), str)
            and (is_int(a.get("votes")) or (rebuilt and a.get("votes") is None)) for a in added):
        return "added must be a list of {word, votes}"
    for k in ("oov_rate", "sampling_rate", "epsilon_run", "delta_run", "epsilon_full_run"):
        if rec.get(k) is not None and not (is_number(rec[k]) and (isinstance(rec[k], int) or math.isfinite(rec[k]))):
            return f"{k} must be a finite number"
    for k in ("devices", "voters", "depth", "epoch"):
        if k in rec and not (is_int(rec[k]) and rec[k] >= 0):
            return f"{k} must be a whole number"
    if "theta" in rec and _theta_problem(rec):
        return _theta_problem(rec)
    if "dp" in rec:
        if not isinstance(rec["dp"], bool):
            return "dp must be true or false"
        if rec["dp"] and not (is_number(rec.get("epsilon_run")) and is_number(rec.get("delta_run"))):
            return "dp is true but epsilon_run or delta_run is not a number"
    if "trie" in rec:
        return _trie_problem(rec["trie"])
    return None


def _theta_problem(rec: dict) -> str | None:
    return None if is_int(rec["theta"]) and rec["theta"] >= 1 else "theta must be a whole number >= 1"


def recorded_theta(run_dir: Path) -> int | None:
    """The threshold the first record naming one names (a run from before config.json recorded it),
    or None; FedkbError naming the round where it is malformed."""
    for rec in read(run_dir):
        if "theta" in rec:
            if _theta_problem(rec):
                raise FedkbError(f"{path_of(run_dir)}: the record of round {rec['round']} is malformed "
                                 f"({_theta_problem(rec)})")
            return rec["theta"]
    return None


def _trie_problem(trie) -> str | None:
    """What is wrong with a stored trie (discovery.TrieState.to_json), if anything."""
    if not isinstance(trie, dict):
        return "trie must be an object"
    prefixes = trie.get("prefixes")
    if not isinstance(prefixes, list) or not prefixes or not all(isinstance(p, str) for p in prefixes):
        return "trie.prefixes must be a list of strings"
    for k in ("depth", "epoch"):
        if not (is_int(trie.get(k)) and trie[k] >= 0):
            return f"trie.{k} must be a whole number"
    if any(len(p) != trie["depth"] for p in prefixes):
        return "trie.prefixes must all be trie.depth characters long"
    rates = trie.get("epoch_rounds", [])
    if not isinstance(rates, list) or not all(is_number(g) and g >= 0 for g in rates):
        return "trie.epoch_rounds must be a list of sampling rates"
    return None


def check(run_dir: Path, rec: dict) -> dict:
    """`rec`, or FedkbError naming its round if it is malformed (edited by hand or damaged)."""
    why = _problem(rec)
    if why:
        raise FedkbError(f"{path_of(run_dir)}: the record of round {rec['round']} is malformed ({why})")
    return rec


def _write_all(run_dir: Path, records: list[dict]) -> None:
    atomic.write_text(path_of(run_dir), atomic.jsonl_text(records))


def append(run_dir: Path, round: int, info: Mapping) -> dict:
    """Append round `round`'s record (from discovery's info dict); returns it."""
    rec = {"round": int(round), **{k: v for k, v in info.items() if k != "round"}}
    atomic.append_line(path_of(run_dir), json.dumps(rec, ensure_ascii=False))
    return rec


def start(run_dir: Path, vocab, heldout: Mapping[str, int], round: int = 1) -> None:
    """Write the round-0 record (the base vocabulary) if the file has none.

    `vocab` is the vocabulary round `round` starts from.  Past round 1 (a resumed run whose
    vocab.jsonl was lost) that is not the base vocabulary: round 0 is then read from the run's
    round-0 checkpoint (left out if it cannot be), and a record of round `round - 1`, marked
    "rebuilt", lists the words the vocabulary gained since (the rounds and votes are lost).
    """
    if read(run_dir):
        return
    if round <= 1:
        _write_all(run_dir, [{"round": 0, "vocab_version": vocab.version, "vocab_size": len(vocab),
                              "added": [], "oov_rate": oov_rate(heldout, vocab)}])
        return
    base = base_vocabulary(run_dir)
    if base is not None and tuple(vocab.words[: len(base)]) != base.words:
        base = None  # not the vocabulary this one grew from
    recs = []
    if base is not None:
        recs.append({"round": 0, "vocab_version": base.version, "vocab_size": len(base), "added": [],
                     "oov_rate": oov_rate(heldout, base)})
    if base is None or base.version != vocab.version:
        gained = vocab.words[len(base):] if base is not None else ()
        recs.append({"round": round - 1, "vocab_version": vocab.version, "vocab_size": len(vocab),
                     "added": [{"word": w, "votes": None} for w in gained],
                     "oov_rate": oov_rate(heldout, vocab), "rebuilt": True})
    _write_all(run_dir, recs)


def base_vocabulary(run_dir: Path):
    """The vocabulary of the run's round-0 checkpoint (models.vocab.Vocabulary), or None if it
    cannot be read.  Read without torch: the keyboard's process asks too."""
    from models.vocab import Vocabulary

    try:
        obj = json.loads((runfolder.checkpoint_dir(run_dir, 0) / "model.json").read_text(encoding="utf-8"))
        return Vocabulary.from_json(obj["vocab"])  # its words all checked (FedkbError otherwise)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, FedkbError):
        return None


def truncate(run_dir: Path, last_round: int) -> str | None:
    """Keep only records of rounds <= last_round (the checkpoint a run resumes from).

    The file is rewritten whenever it holds anything but whole records: a line cut short by a crash
    (no newline at the end), or any line that does not parse, so no fragment is left for the next
    record to follow on the same line or after.  The lines that are not records are first appended,
    byte for byte, to vocab.jsonl.damaged; returns a note saying so (None where there were none)."""
    path = path_of(run_dir)
    recs = read(run_dir)
    keep = [r for r in recs if r["round"] <= last_round]
    raw = path.read_bytes() if path.is_file() else b""
    torn = bool(raw) and not raw.endswith(b"\n")
    if not (len(keep) != len(recs) or torn or raw.count(b"\n") != len(recs)):  # each record is exactly one line
        return None
    bad = [line if line.endswith((b"\n", b"\r")) else line + b"\n"
           for line in raw.splitlines(keepends=True) if not _is_record_line(line)]
    damaged = path.with_name(FILE + ".damaged")
    if bad:  # before the rewrite: a kill in between keeps them twice, never loses them
        atomic.write_bytes(damaged, (damaged.read_bytes() if damaged.is_file() else b"") + b"".join(bad))
    _write_all(run_dir, keep)
    return f"{len(bad)} unreadable line{'s' if len(bad) > 1 else ''} of {FILE} kept in {damaged.name}" if bad else None


def _is_record_line(line: bytes) -> bool:
    """Whether `read` takes the line as a record (a blank line counts as one: it holds nothing to keep)."""
    text = line.decode("utf-8", errors="replace")
    if not text.strip():
        return True
    try:
        rec = json.loads(text)
    except ValueError:
        return False
    return isinstance(rec, dict) and is_int(rec.get("round"))


def resume(run_dir: Path, round: int, vocab, heldout: Mapping[str, int], cfg, notes: list[str] | None = None):
    """Before round `round`: base record written, later rounds dropped; the trie to continue from.

    The trie is the one the record of round `round - 1` stores.  Where there is no such record (vocab.jsonl
    lost, rebuilt by `start`, or its last lines torn), it is lost: a new trie run starts, and a note
    (appended to `notes`, with truncate's) says the words found from here differ from an uninterrupted run's.
    """
    from federation.discovery import TrieState

    start(run_dir, vocab, heldout, round)
    said = truncate(run_dir, round - 1)
    last = check(run_dir, read(run_dir)[-1])
    if last["vocab_version"] != vocab.version:
        raise FedkbError(f"{path_of(run_dir)} ends at vocabulary version {last['vocab_version']} but the "
                         f"checkpoint has version {vocab.version}; the run folder is inconsistent")
    if notes is not None and said:
        notes.append(said)
    if last["round"] == round - 1 and ("trie" in last or last["round"] == 0):
        return TrieState.from_json(last["trie"]) if "trie" in last else TrieState()
    if notes is not None:
        notes.append(f"{path_of(run_dir)} lost the record of round {round - 1} (the file lost, or its end torn): {TRIE_LOST} "
                     f"and starts over at round {round}, so the words found from here differ from an "
                     f"uninterrupted run's")
    return TrieState(epoch=TrieState.from_json(last["trie"]).epoch + 1 if "trie" in last else 0)


# -- queries ------------------------------------------------------------------------------------
def committed_round(run_dir: Path) -> int | None:
    """The run's last committed round (latest.json; with it unreadable, the last metrics line), or
    None where the folder has neither (a history written outside a simulation run)."""
    rnd = runfolder.latest_round(run_dir)
    if rnd is None:
        rnd = max((m["round"] for m in runfolder.read_metrics(run_dir)), default=None)
    return rnd


def timeline(run_dir: Path) -> list[dict]:
    """One row per committed round: round, version, size, added words, OOV rate, epsilon of the trie run.

    A round's record is written before the round is committed; a run stopped (ctrl-c, kill) in
    between leaves it until the round runs again, so records past the committed round are left out.
    FedkbError where a record is malformed or the rounds do not increase.
    """
    if not Path(run_dir).is_dir():
        raise FedkbError(f"{run_dir} is not a run folder")
    recs = read(run_dir)
    last = committed_round(run_dir)
    if last is not None:
        recs = [r for r in recs if r["round"] <= last]
    if not recs:
        raise FedkbError(f"{path_of(run_dir)} is missing or empty: was the run made with --discover?")
    for i, rec in enumerate(recs):  # a file edited by hand or damaged is an error, not a traceback
        check(run_dir, rec)
        prev = recs[i - 1]["round"] if i else -1
        if rec["round"] <= prev:  # a repeated round (a merged file) or one out of order
            why = f"round {prev} appears twice" if rec["round"] == prev else f"round {rec['round']} comes after {prev}"
            raise FedkbError(f"{path_of(run_dir)}: {why}; the rounds must increase")
    return recs


def normalize_word(word: str) -> str:
    """A word asked about, as the devices count words (models.text.words): NFKC, straight
    apostrophes, lower case."""
    return normalize_text(word).lower()


def when_added(run_dir: Path, word: str, rows: list[dict] | None = None) -> dict | None:
    """The record of the round that added `word` (normalized: `normalize_word`), or None if it never
    was; `rows`: the run's `timeline`, where the caller has read it already."""
    word = normalize_word(word)
    for rec in timeline(run_dir) if rows is None else rows:
        for a in rec.get("added", []):
            if a["word"] == word:
                return rec
    return None


def in_base_vocabulary(word: str, base) -> bool:
    """Whether `word` (normalized) was in the run's vocabulary from round 0: in `base`, its round-0
    checkpoint's vocabulary (`base_vocabulary`; None where that cannot be read)."""
    from models.text import SPECIALS

    word = normalize_word(word)
    return base is not None and word in base and word not in SPECIALS
