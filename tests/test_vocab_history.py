"""The vocabulary history (federation/vocab_history.py): append-only JSONL, queries, resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from federation import vocab_history as vh
from federation.discovery import DiscoveryConfig, DiscoveryStep, make_discovery_step
from models.errors import FedkbError
from models.text import SPECIALS
from models.vocab import Vocabulary

BASE = Vocabulary(SPECIALS + ("the", "a"), 0, 4)


def population():
    # 12 users type "yeet" most, 9 type "sus", 3 type "rizz" (never enough for theta = 4)
    pop = [Counter({"yeet": 5, "sus": 2}) for _ in range(9)] + [Counter({"yeet": 3}) for _ in range(3)]
    return pop + [Counter({"rizz": 9}) for _ in range(3)]


HELDOUT = ["yeet the sus a", "rizz the"]


def run_rounds(run_dir, first, last, vocab, gen, pop):
    step = make_discovery_step(DiscoveryConfig(theta=4, population=len(pop)), run_dir, HELDOUT)
    for r in range(first, last + 1):
        vocab, _ = step(vocab, pop, r, gen)
    return vocab


def test_history_survives_a_killed_and_resumed_run_unchanged(tmp_path):
    pop = population()
    # uninterrupted run of 14 rounds
    ref = run_rounds(tmp_path / "ref", 1, 14, BASE, torch.Generator().manual_seed(7), pop)
    # run 6 rounds, "checkpoint" (vocab + generator state), run 3 more rounds, kill
    gen = torch.Generator().manual_seed(7)
    vocab6 = run_rounds(tmp_path / "run", 1, 6, BASE, gen, pop)
    ckpt = (vocab6.to_json(), gen.get_state())
    run_rounds(tmp_path / "run", 7, 9, vocab6, gen, pop)
    with open(vh.path_of(tmp_path / "run"), "a") as f:
        f.write('{"round": 10, "vocab_ver')  # torn line from the kill
    # resume from the checkpoint in a fresh step (new process): rounds 7..14 again
    gen2 = torch.Generator()
    gen2.set_state(ckpt[1])
    resumed = run_rounds(tmp_path / "run", 7, 14, Vocabulary.from_json(ckpt[0]), gen2, pop)
    assert resumed == ref
    assert vh.path_of(tmp_path / "run").read_bytes() == vh.path_of(tmp_path / "ref").read_bytes()
    assert [r["round"] for r in vh.read(tmp_path / "run")] == list(range(15))
    assert "yeet" in ref and "sus" in ref and "rizz" not in ref


def test_timeline_and_when_added(tmp_path):
    pop = population()
    run_rounds(tmp_path, 1, 14, BASE, torch.Generator().manual_seed(7), pop)
    rows = vh.timeline(tmp_path)
    assert rows[0] == {"round": 0, "vocab_version": 0, "vocab_size": 4, "added": [], "oov_rate": 50.0}
    rec = vh.when_added(tmp_path, "YEET")
    assert rec is not None and rec["round"] >= len("yeet$")
    assert [a["word"] for a in rec["added"]] == ["yeet"]
    assert vh.when_added(tmp_path, "rizz") is None
    assert rows[-1]["oov_rate"] == pytest.approx(100 * 1 / 6, abs=1e-3)  # only "rizz" left out
    sizes = [r["vocab_size"] for r in rows]
    assert sizes == sorted(sizes) and sizes[-1] == 6


def test_truncate_keeps_rounds_up_to_the_checkpoint(tmp_path):
    vh.start(tmp_path, BASE, Counter({"the": 1}))
    for r in (1, 2, 3):
        vh.append(tmp_path, r, {"vocab_version": 0, "vocab_size": 4, "added": [], "oov_rate": 0.0})
    vh.truncate(tmp_path, 1)
    assert [r["round"] for r in vh.read(tmp_path)] == [0, 1]


def test_a_history_from_another_vocabulary_is_refused(tmp_path):
    vh.start(tmp_path, BASE, Counter())
    vh.append(tmp_path, 1, {"vocab_version": 3, "vocab_size": 9, "added": []})
    with pytest.raises(FedkbError, match="inconsistent"):
        vh.resume(tmp_path, 2, BASE, Counter(), DiscoveryConfig())


@pytest.mark.parametrize("record, why", [
    ({"added": []}, "vocab_version"),
    ({"vocab_version": 1, "vocab_size": 5, "added": "yeet"}, "added"),
    ({"vocab_version": 1, "vocab_size": 5, "added": [{"word": "yeet"}]}, "added"),
    ({"vocab_version": 1, "vocab_size": 5, "added": [], "oov_rate": "low"}, "oov_rate"),
])
def test_an_edited_or_damaged_record_is_a_clear_error(tmp_path, capsys, record, why):
    from keyboard.cli import main

    vh.start(tmp_path, BASE, Counter())
    vh.append(tmp_path, 1, record)
    with pytest.raises(FedkbError, match=f"round 1 is malformed .*{why}"):
        vh.timeline(tmp_path)
    assert main(["vocab", str(tmp_path)]) == 2  # a traceback in the table before
    assert "malformed" in capsys.readouterr().err


def test_missing_history_is_a_clear_error(tmp_path):
    with pytest.raises(FedkbError, match="--discover"):
        vh.timeline(tmp_path)
    with pytest.raises(FedkbError, match="not a run folder"):
        vh.timeline(tmp_path / "nope")


def _users_file(tmp_path, fixture_users):
    """The fixture users, most of whom also typed a word no vocabulary has."""
    import gzip
    import json

    path = tmp_path / "users.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, u in enumerate(fixture_users):
            extra = ["zorblax is great", "more zorblax please", "zorblax"] if i % 4 else []
            f.write(json.dumps({"id": u.id, "history": list(u.history) + extra, "future": list(u.future)}) + "\n")
    return path


def _simulate(run_dir, tiny, users_file, rounds, resume=False, theta=3):
    from federation.config import ClientConfig, SimulationConfig
    from federation.run import Simulation

    sim = SimulationConfig(rounds=rounds, clients_per_round=10, eval_users=2, eval_every=1000, seed=3,
                           client=ClientConfig(max_words=100))
    step = make_discovery_step(DiscoveryConfig(theta=theta), run_dir)
    s = Simulation(run_dir, sim, tiny[0], tiny[1], users_file, run_dir.parent / f"{run_dir.name}-dev",
                   resume=resume, discover=step)
    s.run()
    return s


@pytest.mark.slow
def test_history_of_a_simulation_survives_kill_and_resume(tmp_path, tiny, fixture_users):
    users = _users_file(tmp_path, fixture_users)
    ref = _simulate(tmp_path / "ref", tiny, users, 8)
    _simulate(tmp_path / "run", tiny, users, 5)
    # killed in round 6 after discovery wrote its line, before the round's checkpoint
    with open(vh.path_of(tmp_path / "run"), "a") as f:
        f.write('{"round": 6, "vocab_version": 99, "added": [{"word": "zzz", "votes": 9}]}\n')
    resumed = _simulate(tmp_path / "run", tiny, users, 8, resume=True, theta=7)  # stored theta (3) wins
    assert vh.path_of(tmp_path / "run").read_bytes() == vh.path_of(tmp_path / "ref").read_bytes()
    assert resumed.state.vocab == ref.state.vocab
    rows = vh.read(tmp_path / "run")
    assert [r["round"] for r in rows] == list(range(9)) and all(r.get("theta", 3) == 3 for r in rows)
    assert rows[-1]["vocab_version"] == ref.state.vocab.version
    assert rows[-1]["vocab_size"] == len(ref.state.vocab) > rows[0]["vocab_size"]  # it found words
    assert vh.when_added(tmp_path / "run", "zorblax")["round"] == len("zorblax$")


def test_a_resumed_run_discovers_as_its_config_json_recorded(tmp_path, tiny, fixture_users):
    """Whether a run discovers words, and with which threshold, is in config.json: a run killed
    before its history file had a line used to resume without discovery, silently."""
    import json

    from federation.config import ClientConfig, SimulationConfig
    from federation.run import Simulation

    users = _users_file(tmp_path, fixture_users)
    sim = SimulationConfig(rounds=0, clients_per_round=4, eval_users=2, eval_every=1000, seed=3, client=ClientConfig(max_words=50))

    def open_run(name, discover, resume):
        s = Simulation(tmp_path / name, sim, tiny[0], tiny[1], users, tmp_path / f"{name}-dev", resume=resume, discover=discover)
        s.close()
        return s

    open_run("disc", make_discovery_step(DiscoveryConfig(theta=3), tmp_path / "disc"), False)
    assert json.loads((tmp_path / "disc" / "config.json").read_text())["discovery_theta"] == 3
    vh.path_of(tmp_path / "disc").unlink(missing_ok=True)  # killed before any history was written
    s = open_run("disc", None, True)  # resumed without --discover
    assert isinstance(s.discover, DiscoveryStep) and s.discover.cfg.theta == 3 and s.discover.cfg.population > 0
    s = open_run("disc", make_discovery_step(DiscoveryConfig(theta=7), tmp_path / "disc"), True)
    assert s.discover.cfg.theta == 3 and any("--theta 7 (the run discovers with 3)" in n for n in s.notes)
    open_run("plain", None, False)
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["discovery_theta"] is None
    s = open_run("plain", make_discovery_step(DiscoveryConfig(theta=3), tmp_path / "plain"), True)  # --discover --theta 3
    assert s.discover is None and any("--discover --theta 3 (the run does not discover words)" in n for n in s.notes)


# -- audit 2 ------------------------------------------------------------------------------------
def _records_bytes(recs):
    import json

    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()


def test_a_torn_last_line_is_removed_before_its_round_is_written_again(tmp_path):
    """A crash halfway through appending round r's line leaves a fragment without a newline; the
    resumed round r must not be written after it (it used to be glued onto it, and lost)."""
    vh.start(tmp_path, BASE, Counter())
    for r in (1, 2):
        vh.append(tmp_path, r, {"vocab_version": 0, "vocab_size": 4, "added": []})
    clean = vh.path_of(tmp_path).read_bytes()
    with open(vh.path_of(tmp_path), "ab") as f:
        f.write(b'{"round": 3, "added": [{"word": "ye')  # torn: no newline
    vh.truncate(tmp_path, 2)
    assert vh.path_of(tmp_path).read_bytes() == clean
    with open(vh.path_of(tmp_path), "ab") as f:
        f.write(b'not json\n')  # a whole line that does not parse
    vh.truncate(tmp_path, 2)
    assert vh.path_of(tmp_path).read_bytes() == clean


def test_a_round_torn_by_a_crash_runs_again_to_the_same_history(tmp_path):
    pop = population()
    ref = tmp_path / "ref"
    run_rounds(ref, 1, 5, BASE, torch.Generator().manual_seed(7), pop)  # "yeet" is added in round 5
    gen = torch.Generator().manual_seed(7)
    vocab4 = run_rounds(tmp_path / "run", 1, 4, BASE, gen, pop)
    state = gen.get_state()
    line5 = vh.path_of(ref).read_bytes().splitlines(keepends=True)[-1]
    assert b'"yeet"' in line5
    with open(vh.path_of(tmp_path / "run"), "ab") as f:
        f.write(line5[: len(line5) // 2])  # killed while appending round 5's line
    gen2 = torch.Generator()
    gen2.set_state(state)
    run_rounds(tmp_path / "run", 5, 5, vocab4, gen2, pop)  # the resumed run: round 5 again
    assert vh.path_of(tmp_path / "run").read_bytes() == vh.path_of(ref).read_bytes()
    assert vh.when_added(tmp_path / "run", "yeet")["round"] == 5


def _commit(run_dir, rnd):
    import json

    from federation.runfolder import checkpoint_dir

    (run_dir / "latest.json").write_text(json.dumps({"round": rnd}))
    checkpoint_dir(run_dir, 0).mkdir(parents=True, exist_ok=True)  # a run's round 0: its base vocabulary
    (checkpoint_dir(run_dir, 0) / "model.json").write_text(json.dumps({"vocab": BASE.to_json()}))


def test_queries_show_only_committed_rounds(tmp_path, capsys):
    """A round's record is written before the round is committed: after ctrl-c or a kill in between,
    `fedkb vocab` must not report a word no committed model has."""
    import json

    from keyboard.cli import main

    run_rounds(tmp_path, 1, 5, BASE, torch.Generator().manual_seed(7), population())  # yeet: round 5
    assert vh.when_added(tmp_path, "yeet")["round"] == 5  # no latest.json: a history outside a run
    _commit(tmp_path, 4)  # round 5 was never committed
    assert [r["round"] for r in vh.timeline(tmp_path)] == [0, 1, 2, 3, 4]
    assert vh.when_added(tmp_path, "yeet") is None
    assert main(["vocab", str(tmp_path), "--word", "yeet"]) == 1
    assert "never added (rounds 0-4)" in capsys.readouterr().out
    # latest.json unreadable: the last metrics line is the last committed round (as resume reads it)
    (tmp_path / "latest.json").write_text("{garbage")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(4)))
    assert vh.timeline(tmp_path)[-1]["round"] == 3
    _commit(tmp_path, 5)
    assert vh.when_added(tmp_path, "yeet")["round"] == 5


def _damaged(tmp_path, edit):
    import json

    run_rounds(tmp_path, 1, 3, BASE, torch.Generator().manual_seed(7), population())
    lines = vh.path_of(tmp_path).read_text().splitlines()
    rec = json.loads(lines[-1])
    edit(rec)
    lines[-1] = json.dumps(rec)
    vh.path_of(tmp_path).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, why", [
    (lambda r: r["trie"].pop("depth"), "trie.depth"),
    (lambda r: r.__setitem__("trie", [1, 2]), "trie must be an object"),
    (lambda r: r["trie"].__setitem__("prefixes", 5), "trie.prefixes"),
    (lambda r: r["trie"].__setitem__("epoch_rounds", ["x"]), "trie.epoch_rounds"),
    (lambda r: r.update(dp=True, epsilon_run=None), "dp is true"),
    (lambda r: r.__setitem__("dp", "yes"), "dp must be"),
    (lambda r: r.__setitem__("theta", "4"), "theta"),
    (lambda r: r.__setitem__("theta", 0), "theta"),
])
def test_a_damaged_record_is_a_clear_error_for_queries_and_resume(tmp_path, capsys, edit, why):
    from keyboard.cli import main

    _damaged(tmp_path, edit)
    with pytest.raises(FedkbError, match=f"round 3 is malformed .*{why}"):
        vh.timeline(tmp_path)
    assert main(["vocab", str(tmp_path)]) == 2 and "round 3 is malformed" in capsys.readouterr().err
    step = make_discovery_step(DiscoveryConfig(theta=4, population=15), tmp_path)
    with pytest.raises(FedkbError, match=f"round 3 is malformed .*{why}"):  # a traceback before
        step(BASE, population(), 4, torch.Generator().manual_seed(0))


def test_a_lost_history_is_rebuilt_from_the_round_0_checkpoint(tmp_path, capsys):
    """vocab.jsonl lost, the run resumed at round 7 with a grown vocabulary: round 0 is the base
    vocabulary (it used to be written with the grown one), and the words gained are listed."""
    import json

    from keyboard.cli import main
    from federation.runfolder import checkpoint_dir

    checkpoint_dir(tmp_path, 0).mkdir(parents=True)
    (checkpoint_dir(tmp_path, 0) / "model.json").write_text(json.dumps({"vocab": BASE.to_json()}))
    grown = BASE.add(["yeet"])
    step = make_discovery_step(DiscoveryConfig(theta=4, population=15), tmp_path, HELDOUT)
    step(grown, population(), 7, torch.Generator().manual_seed(0))  # no "inconsistent" error
    rows = vh.timeline(tmp_path)
    assert rows[0] == {"round": 0, "vocab_version": 0, "vocab_size": 4, "added": [], "oov_rate": 50.0}
    assert rows[1]["round"] == 6 and rows[1]["rebuilt"] and rows[1]["vocab_version"] == 1
    assert vh.when_added(tmp_path, "yeet")["round"] == 6
    assert main(["vocab", str(tmp_path), "--word", "yeet"]) == 0
    assert "added by round 6" in capsys.readouterr().out
    assert main(["vocab", str(tmp_path)]) == 0 and "yeet (?)" in capsys.readouterr().out


def _zero_round_runs(tmp_path, tiny, fixture_users, run):
    """open_run(discover, resume): a Simulation of `run` opened (rounds=0) and closed, on the fixture users."""
    from federation.config import ClientConfig, SimulationConfig
    from federation.run import Simulation

    users = _users_file(tmp_path, fixture_users)
    sim = SimulationConfig(rounds=0, clients_per_round=4, eval_users=2, eval_every=1000, seed=3, client=ClientConfig(max_words=50))

    def open_run(discover, resume):
        s = Simulation(run, sim, tiny[0], tiny[1], users, tmp_path / f"{run.name}-dev", resume=resume, discover=discover)
        s.close()
        return s

    return open_run


def test_a_resume_takes_theta_from_config_json_and_names_only_flags_given(tmp_path, tiny, fixture_users, capsys):
    """The threshold is config.json's, whatever the history says; and the "not taken" note names a
    --theta only where one was given, whatever its value (a resume without it used to report
    `--theta 10`, and `--theta 10` itself, --theta's default then, was never reported)."""
    import json

    from federation.discovery import discovery_for_run
    from keyboard.cli import main

    users = _users_file(tmp_path, fixture_users)
    run = tmp_path / "disc"
    open_run = _zero_round_runs(tmp_path, tiny, fixture_users, run)

    open_run(make_discovery_step(DiscoveryConfig(theta=4), run), False)
    with open(vh.path_of(run), "a") as f:  # a history naming another threshold (edited, or left by a kill)
        f.write(json.dumps({"round": 1, "vocab_version": 0, "vocab_size": 800, "added": [], "theta": 9}) + "\n")
    for theta, discover in ((None, False), (None, True), (4, True), (4, False)):  # --resume [--discover] [--theta 4]
        s = open_run(discovery_for_run(run, theta, resume=True, discover=discover), True)
        assert s.discover.cfg.theta == 4 and not any("--theta" in n for n in s.notes), (theta, s.notes)
    for theta, discover in ((7, True), (10, True), (10, False)):  # 10: DiscoveryConfig().theta, --theta's default
        s = open_run(discovery_for_run(run, theta, resume=True, discover=discover), True)
        assert s.discover.cfg.theta == 4 and any(f"--theta {theta} (the run discovers with 4)" in n for n in s.notes)

    # the command line: only a --theta typed is asked for
    def simulate(*flags):
        code = main(["simulate", "--out", str(run), "--users-file", str(users), "--model", str(tiny[0]),
                     "--tokenizer", str(tiny[1]), "-k", "4", "--eval-users", "2", "--rounds", "0", "--quiet", *flags])
        return code, " ".join(capsys.readouterr().err.split())  # rich wraps long lines

    capsys.readouterr()
    for flags in (["--theta", "10"], ["--discover", "--theta", "10"]):
        code, err = simulate("--resume", *flags)
        assert code == 0 and "not taken: --theta 10 (the run discovers with 4)" in err, (flags, err)
    for flags in ([], ["--discover"], ["--theta", "4"]):
        code, err = simulate("--resume", *flags)
        assert code == 0 and "not taken" not in err, (flags, err)
    assert json.loads((run / "config.json").read_text())["discovery_theta"] == 4
    # a new run with --discover and no --theta discovers with DiscoveryConfig().theta, as --help says
    run = tmp_path / "fresh"
    assert simulate("--discover")[0] == 0
    assert json.loads((run / "config.json").read_text())["discovery_theta"] == DiscoveryConfig().theta == 10
    assert "(default: 10)" in next(a.help for a in _simulate_parser()._actions if a.dest == "theta")
    assert "not taken" not in simulate("--resume", "--discover")[1]
    # --theta without --discover is refused in a new run (it started no discovery, in silence)
    run = tmp_path / "plain"
    code, err = simulate("--theta", "7")
    assert code == 2 and "--theta needs --discover" in err and not run.exists()
    assert simulate()[0] == 0
    assert json.loads((run / "config.json").read_text())["discovery_theta"] is None
    # and on a run that does not discover, --resume names what it was given
    assert simulate("--resume", "--theta", "7")[1].count("not taken: --theta 7 (the run does not discover words)") == 1
    assert "not taken: --discover (the run does not discover words)" in simulate("--resume", "--discover")[1]
    assert "not taken" not in simulate("--resume")[1]


def _simulate_parser():
    import argparse

    from keyboard.commands.simulate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser

def test_a_run_from_before_config_json_recorded_theta_resumes_with_its_historys(tmp_path, tiny, fixture_users):
    """config.json without discovery_theta (an older run): the threshold is the first one the history
    names, and a malformed one is an error naming its round."""
    import json

    import pytest

    from federation.discovery import discovery_for_run
    from models.errors import FedkbError

    run = tmp_path / "old"
    open_run = _zero_round_runs(tmp_path, tiny, fixture_users, run)

    open_run(make_discovery_step(DiscoveryConfig(theta=4), run), False)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["discovery_theta"]
    (run / "config.json").write_text(json.dumps(cfg))
    base = {"round": 0, "vocab_version": 0, "vocab_size": 800, "added": []}
    vh.path_of(run).write_text("".join(json.dumps(r) + "\n" for r in (base, {**base, "round": 1, "theta": 9})))
    assert open_run(discovery_for_run(run, None, resume=True), True).discover.cfg.theta == 9
    vh.path_of(run).write_text("".join(json.dumps(r) + "\n" for r in (base, {**base, "round": 1, "theta": "nine"})))
    with pytest.raises(FedkbError, match="round 1 is malformed .theta must be a whole number >= 1."):
        open_run(discovery_for_run(run, None, resume=True), True)


@pytest.mark.parametrize("rounds, why", [([0, 1, 1], "round 1 appears twice"), ([0, 2, 1], "round 1 comes after 2")])
def test_rounds_that_do_not_increase_are_a_clear_error(tmp_path, capsys, rounds, why):
    """A repeated round (a merged or hand-edited vocab.jsonl) was accepted, and crashed the keyboard's f7 table."""
    from keyboard.cli import main

    vh.start(tmp_path, BASE, Counter())
    for r in rounds[1:]:
        vh.append(tmp_path, r, {"vocab_version": 0, "vocab_size": 4, "added": []})
    with pytest.raises(FedkbError, match=f"vocab.jsonl: {why}; the rounds must increase"):
        vh.timeline(tmp_path)
    assert main(["vocab", str(tmp_path)]) == 2 and why in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["lost", "torn"])
def test_a_resume_without_the_checkpoints_record_says_the_trie_starts_over(tmp_path, capsys, damage):
    """The trie lives only in vocab.jsonl: with the record of the checkpoint's round lost (the file gone,
    or its last line torn), the resumed run discovers other words; it used to do so silently."""
    pop = population()
    gen = torch.Generator().manual_seed(7)
    vocab3 = run_rounds(tmp_path, 1, 3, BASE, gen, pop)  # "yeet" is on its way: the trie is 3 deep
    assert vh.read(tmp_path)[-1]["trie"]["depth"] == 3
    path = vh.path_of(tmp_path)
    if damage == "lost":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-20])  # round 3's record torn
    capsys.readouterr()
    step = make_discovery_step(DiscoveryConfig(theta=4, population=len(pop)), tmp_path, HELDOUT)
    step(vocab3, pop, 4, gen)  # the resumed run's first round
    err = capsys.readouterr().err
    assert "lost the record of round 3" in err and "trie is lost and starts over at round 4" in err
    assert step.notes and "trie is lost" in step.notes[-1]
    rec = vh.read(tmp_path)[-1]
    assert rec["round"] == 4 and rec["trie_restarted"] is True and rec["depth"] == 0
    step(vocab3, pop, 5, gen)  # the history is whole again: nothing more to say
    assert capsys.readouterr().err == "" and "trie_restarted" not in vh.read(tmp_path)[-1]


def test_unreadable_lines_are_kept_in_vocab_jsonl_damaged(tmp_path, capsys):
    """truncate rewrites vocab.jsonl without the lines that do not parse: their bytes used to be lost."""
    vh.start(tmp_path, BASE, Counter())
    for r in (1, 2):
        vh.append(tmp_path, r, {"vocab_version": 0, "vocab_size": 4, "added": []})
    path = vh.path_of(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    garbage = b'{"round": 1, "vocab_\xff\xfe garbage\n'
    path.write_bytes(lines[0] + garbage + b"".join(lines[1:]) + b'[3]\n')
    assert vh.truncate(tmp_path, 2) == "2 unreadable lines of vocab.jsonl kept in vocab.jsonl.damaged"
    damaged = tmp_path / "vocab.jsonl.damaged"
    assert damaged.read_bytes() == garbage + b"[3]\n"
    assert path.read_bytes() == b"".join(lines)
    with open(path, "ab") as f:
        f.write(b"not json\n")
    step = make_discovery_step(DiscoveryConfig(theta=4, population=15), tmp_path)
    step(BASE, population(), 3, torch.Generator().manual_seed(0))  # the resumed run says so
    assert "1 unreadable line of vocab.jsonl kept in vocab.jsonl.damaged" in capsys.readouterr().err
    assert damaged.read_bytes() == garbage + b"[3]\nnot json\n"  # appended
    assert vh.truncate(tmp_path, 3) is None
