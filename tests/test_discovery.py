"""TrieHH discovery (federation/discovery.py): thresholds, recall, determinism, privacy formula."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.discovery import (
    TERMINATOR,
    DiscoveryConfig,
    TrieState,
    advance,
    device_counts_for,
    device_vote,
    discovery_round,
    local_oov_counts,
    make_discovery_step,
    triehh_privacy,
)
from models.text import SPECIALS
from models.vocab import Vocabulary

BASE = Vocabulary(SPECIALS + ("the", "a", "hello"), 0, 5)
ALPHABET = ["zap", "zip", "zipper", "yak", "yam", "bo", "bob", "quux", "x"]


def run(population: list[Counter], cfg: DiscoveryConfig, rounds: int, per_round: int, seed: int):
    rng = random.Random(seed)
    trie, vocab, infos = TrieState(), BASE, []
    for _ in range(rounds):
        sample = rng.sample(population, min(per_round, len(population)))
        counts = [Counter({w: n for w, n in c.items() if w not in vocab}) for c in sample]
        trie, vocab, info = discovery_round(trie, vocab, counts, cfg, rng)
        infos.append(info)
    return vocab, infos


populations = st.lists(
    st.dictionaries(st.sampled_from(ALPHABET), st.integers(1, 5), max_size=4).map(Counter),
    min_size=1, max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(populations, st.integers(2, 6), st.integers(1, 30), st.integers(0, 10_000))
def test_a_word_typed_by_fewer_than_theta_users_is_never_added(population, theta, per_round, seed):
    cfg = DiscoveryConfig(theta=theta, max_word_len=8, population=len(population))
    vocab, infos = run(population, cfg, rounds=25, per_round=per_round, seed=seed)
    users_typing = Counter(w for c in population for w in c)
    added = [a for info in infos for a in info["added"]]
    for a in added:
        assert a["votes"] >= theta  # this round's distinct voters
        assert users_typing[a["word"]] >= theta
    assert set(vocab.words) - set(BASE.words) == {a["word"] for a in added}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ALPHABET), st.integers(2, 8), st.integers(0, 12), st.integers(0, 10_000))
def test_a_word_typed_most_by_many_users_is_found_within_its_length_plus_one_rounds(word, theta, extra, seed):
    # every user typed `word` more than anything else; a few also typed other words
    rng = random.Random(seed)
    population = []
    for _ in range(theta + extra):
        c = Counter({w: rng.randint(1, 3) for w in rng.sample(ALPHABET, 2) if w != word})
        c[word] = 10
        population.append(c)
    cfg = DiscoveryConfig(theta=theta, max_word_len=8, population=len(population))
    vocab, infos = run(population, cfg, rounds=len(word) + 1, per_round=len(population), seed=seed)
    assert word in vocab
    assert [a["word"] for a in infos[len(word)]["added"]] == [word]
    assert infos[len(word)]["added"][0]["votes"] == len(population)


def test_a_popular_word_is_found_among_noise_within_bounded_rounds():
    rng = random.Random(1)
    population = [Counter({f"noise{rng.randint(0, 999)}": 2, "yeet": 3}) for _ in range(40)]
    population += [Counter({"lol": 1}) for _ in range(5)]  # 5 users < theta
    cfg = DiscoveryConfig(theta=8, max_word_len=10, population=len(population))
    vocab, infos = run(population, cfg, rounds=20, per_round=20, seed=3)
    assert "yeet" in vocab and "lol" not in vocab
    first = next(i for i, info in enumerate(infos) if info["added"])
    assert first <= 2 * len("yeet$")


def test_same_seed_same_discovery_and_different_seed_may_differ():
    rng = random.Random(0)
    population = [Counter({rng.choice(ALPHABET): rng.randint(1, 4) for _ in range(3)}) for _ in range(60)]
    cfg = DiscoveryConfig(theta=4, max_word_len=8, population=60)
    a = run(population, cfg, rounds=30, per_round=25, seed=5)
    b = run(population, cfg, rounds=30, per_round=25, seed=5)
    assert a[0] == b[0] and a[1] == b[1]
    assert a[0].words != BASE.words  # it did discover something


def test_device_votes_one_extension_of_a_surviving_prefix():
    cfg = DiscoveryConfig(theta=2, max_word_len=8)
    trie = TrieState(frozenset({"zi", "ya"}), 2, 0)
    rng = random.Random(0)
    assert device_vote(Counter({"zipper": 1}), BASE, trie, cfg, rng) == "zip"
    assert device_vote(Counter({"quux": 9}), BASE, trie, cfg, rng) is None  # prefix not in the trie
    assert device_vote(Counter({"bo": 1}), BASE, TrieState(frozenset({"bo"}), 2, 0), cfg, rng) == "bo" + TERMINATOR
    assert device_vote(Counter({"hello": 5}), BASE, TrieState(), cfg, rng) is None  # known now: not OOV
    assert device_vote(Counter({"zipperzipper": 5}), BASE, TrieState(), cfg, rng) is None  # too long


def test_advance_thresholds_votes_and_restarts_when_nothing_survives():
    cfg = DiscoveryConfig(theta=3, max_word_len=8)
    trie = TrieState(frozenset({"ya"}), 2, 0)
    nxt, found = advance(trie, Counter({"yak": 3, "yam": 2, "ya$": 4}), cfg, 0.1)
    assert nxt.prefixes == {"yak"} and nxt.depth == 3 and found == {"ya": 4}
    nxt, found = advance(trie, Counter({"yak$": 2}), cfg, 0.1)
    assert nxt == TrieState(frozenset({""}), 0, 1, ()) and found == {}
    assert TrieState.from_json(trie.to_json()) == trie


def test_triehh_privacy_matches_the_papers_corollary():
    # the authors' released code picks gamma = (e^{eps/L} - 1) / (theta e^{eps/L}) for a target eps
    eps, L, theta = 4.0, 10, 15
    gamma = (math.exp(eps / L) - 1) / (theta * math.exp(eps / L))
    e, d = triehh_privacy(theta, gamma, L)
    assert e == pytest.approx(4.0)
    assert d == pytest.approx(13 / (12 * math.factorial(15)))
    assert triehh_privacy(10, 0.05, 13)[0] == pytest.approx(-13 * math.log(0.5))
    assert triehh_privacy(10, 0.2, 13)[0] == math.inf  # gamma > 1/(theta+1): no guarantee claimed
    assert triehh_privacy(3, 0.01, 13) == (math.inf, 1.0)


def test_oov_counts_are_relative_to_the_current_vocabulary(fixture_users):
    user = fixture_users[0]
    counts = local_oov_counts(user.history, BASE)
    assert counts and all(w not in BASE for w in counts)
    grown = BASE.add([next(iter(counts))])
    assert next(iter(counts)) not in device_counts_for(user, grown)
    assert device_counts_for(user, BASE) == counts


def test_discovery_step_runs_on_devices(tmp_path, fixture_users):
    import torch

    from federation.device import Device

    devices = []
    for u in fixture_users:
        d = Device(tmp_path / "devices", u.id)
        d.write_simulated(u.history, u.future)
        devices.append(d)
    step = make_discovery_step(DiscoveryConfig(theta=2, population=len(devices)))
    gen = torch.Generator().manual_seed(0)
    vocab = BASE
    for r in range(1, 15):
        vocab, info = step(vocab, devices, r, gen)
        assert info["vocab_version"] == vocab.version
    assert len(vocab) > len(BASE)


def test_a_word_the_user_blocked_never_leaves_the_device_as_a_vote(tmp_path):
    from federation.device import Device

    d = Device(tmp_path, "u1")
    d.write_simulated(["yeet yeet sus"], [])
    d.block_word("yeet")
    assert device_counts_for(d, BASE) == Counter({"sus": 1})


def test_a_resampled_population_votes_once_per_real_person(tmp_path, tiny, fixture_users):
    """With more simulated users than real ones, the copies of one person share one device folder:
    they used to vote once each, so one person alone could pass theta (and the DP rate was per copy)."""
    import gzip
    import json

    from federation import vocab_history as vh
    from federation.config import ClientConfig, SimulationConfig
    from federation.run import Simulation

    users = tmp_path / "users.jsonl.gz"
    with gzip.open(users, "wt", encoding="utf-8") as f:
        for i, u in enumerate(fixture_users[:4]):  # 1 held out, 3 real users train
            extra = ["zorblax zorblax"] * 5 if i == 0 else []
            f.write(json.dumps({"id": u.id, "history": list(u.history) + extra, "future": list(u.future)}) + "\n")
    sim = SimulationConfig(users=60, rounds=1, clients_per_round=20, eval_users=1, eval_every=1000, seed=3,
                           client=ClientConfig(max_words=20))
    s = Simulation(tmp_path / "run", sim, tiny[0], tiny[1], users, tmp_path / "dev",
                   discover=make_discovery_step(DiscoveryConfig(theta=2), tmp_path / "run"))
    assert s.population.size == 60 and len(s.population.real_ids) == 3
    assert "u0000" in s.population.real_ids  # the one who types "zorblax" trains
    s.run()
    rec = vh.read(tmp_path / "run")[-1]
    assert rec["round"] == 1 and rec["devices"] <= 3 and rec["voters"] <= 3
    assert rec["sampling_rate"] == pytest.approx(rec["devices"] / 3, abs=1e-6)  # over real people
    assert "z" not in rec["trie"]["prefixes"]  # one person's vote is below theta
