"""Federated discovery of new words: TrieHH.

Zhu, Kairouz, McMahan, Sun, Li 2020, "Federated Heavy Hitters Discovery with
Differential Privacy" (AISTATS; arXiv:1902.08534), Algorithm 1.

The server keeps a trie of prefixes that many users share.  In each federated
round every sampled device picks ONE word from its local out-of-vocabulary
counts (words it typed that the global vocabulary lacks), and votes for the
one-character extension of that word's prefix at the trie's current depth:

    depth 0:  trie {""}            a device with "yeet$" votes "y"
    depth 1:  trie {"y", "b"}      it votes "ye"         ...
    depth 4:  trie {"yeet"}        it votes "yeet$"      ($ ends a word)

An extension survives only with >= theta votes; an extension ending in the
terminator is a whole word, added to the global vocabulary (>= theta distinct
users voted for it in that round: a device casts at most one vote per round).
When no prefix survives, or the depth reaches the maximum word length, the trie
run ("epoch") is over and a new one starts from the empty prefix; words already
added are no longer out-of-vocabulary anywhere, so the next run finds others.

Privacy (no noise is added): the sampling and the threshold alone make each
trie run (epsilon, delta)-DP, see `triehh_privacy`.

Everything here is a pure function of explicit state (`TrieState`, frozen) and
a `random.Random` passed in; `make_discovery_step` is the glue for the rounds
(federation.rounds calls it after the server step).

One utility choice beyond the paper: a device picks its word only among its
out-of-vocabulary words whose prefix is still in the trie (its most-typed one, ties
broken by the seeded generator), instead of one word fixed in advance.  Each device still casts
at most one vote per trie level, which is all the privacy analysis uses.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from federation import runfolder, vocab_history
from models.errors import FedkbError
from models.text import is_word, words
from models.vocab import Vocabulary

TERMINATOR = "$"  # ends a word in the trie (never part of a word: see models.text.is_word)


@dataclass(frozen=True)
class DiscoveryConfig:
    theta: int = 10  # votes a prefix needs to survive, and distinct users a word needs to be added
    max_word_len: int = 12  # longer words are never discovered; trie depth L = max_word_len + 1
    population: int = 0  # users who could be sampled (for the sampling rate); 0 = unknown

    def __post_init__(self):
        if self.theta < 1:
            raise ValueError(f"--theta (the TrieHH threshold) must be >= 1, not {self.theta} (theta <= 3: no privacy guarantee)")
        if self.max_word_len < 1 or self.population < 0:
            raise ValueError("DiscoveryConfig: max_word_len must be >= 1 and population >= 0")


@dataclass(frozen=True)
class TrieState:
    """The server's trie: the surviving prefixes, all of length `depth`."""

    prefixes: frozenset[str] = frozenset({""})
    depth: int = 0
    epoch: int = 0  # completed trie runs before this one
    epoch_rounds: tuple[float, ...] = field(default=())  # sampling rate of each round of this run

    def to_json(self) -> dict:
        return {"prefixes": sorted(self.prefixes), "depth": self.depth, "epoch": self.epoch,
                "epoch_rounds": list(self.epoch_rounds)}

    @classmethod
    def from_json(cls, obj: Mapping) -> "TrieState":
        return cls(frozenset(obj["prefixes"]), int(obj["depth"]), int(obj["epoch"]),
                   tuple(float(g) for g in obj.get("epoch_rounds", ())))


# -- privacy ----------------------------------------------------------------------------------
def triehh_privacy(theta: int, sampling_rate: float, depth: int) -> tuple[float, float]:
    """(epsilon, delta) of one TrieHH run: Zhu et al. 2020, Theorem 1 (with Corollary 1).

    With threshold theta > 3, per-round sampling rate gamma <= 1 / (theta + 1) and a
    trie of depth L (rounds of voting; max word length + 1 for the terminator), TrieHH is
    (epsilon, delta)-differentially private with

        epsilon = L * ln(1 + gamma*theta / (1 - gamma*theta))     (= -L ln(1 - gamma*theta))
        delta   = (theta - 2) / ((theta - 3) * theta!)

    (the same relation the authors' released code uses to pick the batch size:
    gamma = (e^{eps/L} - 1) / (theta e^{eps/L}); their defaults delta = 2.3e-12 -> theta = 15).
    Outside the theorem's conditions no guarantee is claimed: epsilon = inf.
    """
    if theta <= 3:
        return math.inf, 1.0
    delta = (theta - 2) / ((theta - 3) * math.factorial(theta))
    if sampling_rate <= 0:
        return 0.0, delta
    if sampling_rate > 1.0 / (theta + 1):
        return math.inf, delta
    return -depth * math.log1p(-sampling_rate * theta), delta


def epoch_privacy(theta: int, rates: Sequence[float]) -> tuple[float, float]:
    """(epsilon, delta) of one trie run whose levels had sampling rates `rates`.

    Theorem 1's epsilon is L levels x ln(1/(1 - gamma theta)); with a rate that varies
    by round each level contributes its own term (basic composition over levels).
    """
    eps = 0.0
    delta = triehh_privacy(theta, 0.0, 0)[1]
    for g in rates:
        eps += triehh_privacy(theta, g, 1)[0]
    return eps, delta


# -- one device -------------------------------------------------------------------------------
def local_oov_counts(history: Iterable[str], vocab: Vocabulary | frozenset[str] | set[str]) -> Counter:
    """How often each word of `history` that `vocab` lacks was typed (computed on the device)."""
    c: Counter = Counter()
    for text in history:
        c.update(w for w in words(text) if w not in vocab and is_word(w))
    return c


def device_vote(oov_counts: Mapping[str, int], vocab, trie: TrieState, cfg: DiscoveryConfig,
                rng: random.Random) -> str | None:
    """This device's one vote: a prefix of length depth + 1 (ending in '$' for a whole word), or None.

    Only words still outside the CURRENT global vocabulary count (words added since are known now).
    """
    eligible = [(w, n) for w, n in sorted(oov_counts.items())
                if n > 0 and w not in vocab and is_word(w) and len(w) <= cfg.max_word_len
                and (w + TERMINATOR)[: trie.depth] in trie.prefixes]
    if not eligible:
        return None
    top = max(n for _, n in eligible)
    word = rng.choice([w for w, n in eligible if n == top])
    return (word + TERMINATOR)[: trie.depth + 1]


# -- the server -------------------------------------------------------------------------------
def advance(trie: TrieState, votes: Counter, cfg: DiscoveryConfig, sampling_rate: float) -> tuple[TrieState, dict[str, int]]:
    """Threshold the round's votes: (next trie, {new word: votes}) — words only with >= theta votes."""
    passed = {p: n for p, n in votes.items() if n >= cfg.theta}
    found = {p[:-1]: n for p, n in passed.items() if p.endswith(TERMINATOR)}
    survivors = frozenset(p for p in passed if not p.endswith(TERMINATOR))
    rates = trie.epoch_rounds + (sampling_rate,)
    if not survivors or trie.depth + 1 > cfg.max_word_len:
        return TrieState(frozenset({""}), 0, trie.epoch + 1, ()), found
    return TrieState(survivors, trie.depth + 1, trie.epoch, rates), found


def discovery_round(trie: TrieState, vocab: Vocabulary, device_counts: Sequence[Mapping[str, int]],
                    cfg: DiscoveryConfig, rng: random.Random) -> tuple[TrieState, Vocabulary, dict]:
    """One round of TrieHH over the devices reporting this round.

    Returns (next trie, new vocabulary (the same object if nothing was found), info).
    info: added [{"word", "votes"}], voters, sampling_rate, epsilon/delta of the current
    trie run so far (Theorem 1), trie depth and epoch.
    """
    votes: Counter = Counter()
    voters = 0
    for counts in device_counts:
        v = device_vote(counts, vocab, trie, cfg, rng)
        if v is not None:
            votes[v] += 1
            voters += 1
    gamma = len(device_counts) / cfg.population if cfg.population else 0.0
    eps_run, delta = epoch_privacy(cfg.theta, trie.epoch_rounds + (gamma,))
    new_trie, found = advance(trie, votes, cfg, gamma)
    ranked = sorted(found, key=lambda w: (-found[w], w))
    new_vocab = vocab.add(ranked)
    eps_thm = triehh_privacy(cfg.theta, gamma, cfg.max_word_len + 1)[0]
    info = {
        "added": [{"word": w, "votes": found[w]} for w in ranked if w not in vocab],
        "devices": len(device_counts),
        "voters": voters,
        "theta": cfg.theta,
        "sampling_rate": round(gamma, 6),
        "depth": trie.depth,
        "epoch": trie.epoch,
        # Theorem 1 for this trie run so far; None = no guarantee (gamma > 1/(theta+1)) or unknown population
        "dp": bool(cfg.population) and math.isfinite(eps_run),
        "epsilon_run": _finite(eps_run) if cfg.population else None,
        "delta_run": delta,
        "epsilon_full_run": _finite(eps_thm) if cfg.population else None,  # a whole run of depth max_word_len + 1
        "trie": new_trie.to_json(),
    }
    return new_trie, new_vocab, info


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


# -- glue for federation.rounds ---------------------------------------------------------------
def device_counts_for(device, vocab) -> Counter:
    """A reporting device's OOV counts relative to the CURRENT vocabulary.

    `device` is a federation.device.Device (its stored counts; a simulated device laid out
    with `write_simulated` has none, so they are computed from its history), a UserData
    (from its history), or a mapping of counts already.  Words the user blocked are left out.
    """
    blocked: set[str] = set()
    if isinstance(device, Mapping):
        counts = Counter(device)
    else:
        counts = device.oov_counts() if hasattr(device, "oov_counts") else Counter()
        if not counts:
            history = device.history() if callable(getattr(device, "history", None)) else device.history
            counts = local_oov_counts(history, vocab)
        if hasattr(device, "blocked_words"):
            blocked = device.blocked_words()  # "forget this word": never leaves the device, not even as a vote
    return Counter({w: n for w, n in counts.items() if w not in vocab and w not in blocked})


def _rng_from(generator) -> random.Random:
    if isinstance(generator, random.Random):
        return generator
    import torch

    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))


class DiscoveryStep:
    """`discover(state, reporting_devices, round, generator) -> (new_vocab, info)`.

    Holds the trie between rounds.  With `run_dir`, each round is appended to
    `run_dir/vocab.jsonl` (federation.vocab_history), and the trie is restored from it:
    calling round r drops any history of rounds >= r first (left by a run killed after
    writing history but before its checkpoint), so a resumed run rewrites them identically.
    Where the history has no record of round r - 1 (lost or torn), the trie starts over: said on
    stderr, kept in `notes`, and the round's record is marked "trie_restarted".
    """

    def __init__(self, cfg: DiscoveryConfig, run_dir: Path | None = None, heldout: Iterable[str] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.heldout = vocab_history.word_counts(heldout)
        self.trie = TrieState()
        self.asked_theta: int | None = cfg.theta  # the threshold asked for (None: no --theta given)
        self.asked_discover = True  # discovery asked for (False: a resumed run's own, with no --discover given)
        self.notes: list[str] = []  # what repairing vocab.jsonl lost (vocab_history.resume), also said on stderr

    def bind(self, simulation) -> "DiscoveryStep":
        """Take the population and held-out text from a federation.run.Simulation (which calls this).

        The sampling rate counts real people: a resampled population (more simulated users than
        real ones) holds copies of the same person, and federation.rounds lets each person vote at
        most once a round, so the rate is over the real users that can be sampled.  (On a resumed
        run federation.run has set the threshold: the one its config.json, or for a run from before
        config.json recorded it its history, names.)
        """
        population = simulation.population
        self.cfg = replace(self.cfg, population=min(population.size, len(population.real_ids)))
        evaluator = getattr(simulation, "evaluator", None)
        self.heldout = vocab_history.word_counts(evaluator.messages if evaluator is not None else ())
        return self

    def __call__(self, state, reporting_devices, round: int, generator) -> tuple[Vocabulary, dict]:
        vocab = state if isinstance(state, Vocabulary) else state.vocab
        said: list[str] = []
        if self.run_dir is not None:
            self.trie = vocab_history.resume(self.run_dir, round, vocab, self.heldout, self.cfg, said)
        for note in said:  # once, on the round that repaired the history (the run's notes are out already)
            print(f"fedkb: {note}", file=sys.stderr, flush=True)
        self.notes += said
        counts = [device_counts_for(d, vocab) for d in reporting_devices]
        self.trie, new_vocab, info = discovery_round(self.trie, vocab, counts, self.cfg, _rng_from(generator))
        if any(vocab_history.TRIE_LOST in n for n in said):
            info["trie_restarted"] = True  # the record says so too: this round's trie run is not the uninterrupted run's
        info["vocab_version"] = new_vocab.version
        info["vocab_size"] = len(new_vocab)
        info["oov_rate"] = vocab_history.oov_rate(self.heldout, new_vocab)
        if self.run_dir is not None:
            vocab_history.append(self.run_dir, round, info)
        return new_vocab, {k: v for k, v in info.items() if k != "trie"}


def make_discovery_step(cfg: DiscoveryConfig, run_dir: Path | None = None,
                        heldout: Iterable[str] = ()) -> DiscoveryStep:
    """The optional `discover` step of `run_round` (see DiscoveryStep)."""
    return DiscoveryStep(cfg, run_dir, heldout)


def _config_records_theta(run_dir: Path) -> bool | None:
    """Whether the run's config.json records the discovery threshold (runfolder.DISCOVERY_KEY);
    None where there is no config.json to read (a new run)."""
    try:
        stored = json.loads((Path(run_dir) / runfolder.CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return isinstance(stored, dict) and runfolder.DISCOVERY_KEY in stored


def discovery_for_run(run_dir: Path, theta: int | None, resume: bool = False,
                      discover: bool | None = None) -> DiscoveryStep | None:
    """The discovery step of a run folder, or None (no discovery).

    `discover`: discovery asked for (`--discover`; None: where `theta` is given, as in the
    keyboard's spec).  `theta`: the threshold asked for (`--theta`; None: none given), so a new
    run discovers with `theta` or DiscoveryConfig().theta.  A resumed run discovers as its
    config.json recorded (the Simulation takes that threshold, names a `--discover` or a
    `--theta` given that it did not take, and binds the step to itself); it has a step where
    discovery was asked for, where it has a history, and where a `--theta` is given and its
    config.json records discovery.  FedkbError for a threshold out of range."""
    if discover is None:
        discover = theta is not None
    run_dir = Path(run_dir)
    if not discover and not (resume and (vocab_history.path_of(run_dir).exists()
                                         or (theta is not None and _config_records_theta(run_dir)))):
        return None
    try:
        step = make_discovery_step(DiscoveryConfig() if theta is None else DiscoveryConfig(theta=theta), run_dir)
    except ValueError as e:
        raise FedkbError(str(e)) from None
    step.asked_theta = theta  # None: no --theta to report as not taken
    step.asked_discover = discover
    return step
