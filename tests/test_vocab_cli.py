"""`fedkb vocab RUN` and the VocabScreen (through the pilot)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import torch

from federation.discovery import DiscoveryConfig, make_discovery_step
from keyboard.cli import main
from models.text import SPECIALS
from models.vocab import Vocabulary


@pytest.fixture()
def run_dir(tmp_path):
    pop = [Counter({"yeet": 5, "sus": 2}) for _ in range(9)] + [Counter({"yeet": 3}) for _ in range(3)]
    pop += [Counter({"rizz": 9}) for _ in range(3)]
    step = make_discovery_step(DiscoveryConfig(theta=4, population=200), tmp_path, ["yeet the sus a", "rizz the"])
    vocab, gen = Vocabulary(SPECIALS + ("the", "a"), 0, 4), torch.Generator().manual_seed(0)
    for r in range(1, 15):
        vocab, _ = step(vocab, pop, r, gen)
    _with_base_checkpoint(tmp_path)  # a run's round 0: "never added" needs the base vocabulary to answer
    return tmp_path


def test_vocab_prints_the_timeline(run_dir, capsys):
    assert main(["vocab", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "yeet (12)" in out and "sus (9)" in out and "rizz" not in out
    assert "2 words added in 14 rounds" in out


def test_vocab_json_and_when_added(run_dir, capsys):
    assert main(["vocab", str(run_dir), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["summary"]["words_added"] == 2 and obj["summary"]["vocab_size"] == [4, 6]
    assert len(obj["timeline"]) == 15 and all("trie" not in r for r in obj["timeline"])
    assert main(["vocab", str(run_dir), "--word", "YEET", "--json"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans == {"word": "yeet", "added": True, "round": 5, "vocab_version": 1, "votes": 12, "theta": 4}
    assert main(["vocab", str(run_dir), "--word", "rizz"]) == 1
    assert "never added" in capsys.readouterr().out


def test_vocab_on_a_folder_without_history_is_one_clear_error(tmp_path, capsys):
    assert main(["vocab", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--discover" in err and "Traceback" not in err


def _on_vocab_screen(run_dir, check) -> None:
    """Run `await check(pilot, screen)` on the vocabulary screen (f7) of `run_dir`, in an app of its own."""
    from textual.app import App

    from keyboard.screens.vocab import VocabScreen

    class Host(App):
        def on_mount(self) -> None:
            self.push_screen(VocabScreen(run_dir))

    async def go():
        async with Host().run_test() as pilot:
            await pilot.pause()
            await check(pilot, pilot.app.screen)

    asyncio.run(go())


def test_vocab_screen_shows_timeline_search_and_plots(run_dir):
    _on_vocab_screen(run_dir, _screen_checks)


async def _screen_checks(pilot, screen):
    from textual.widgets import DataTable, Input, Sparkline, Static

    table = screen.query_one(DataTable)
    assert table.row_count == 3  # round 0 + the two rounds that added words
    assert list(screen.query_one("#size-spark", Sparkline).data) == [4.0] * 5 + [5.0] * 4 + [6.0] * 6
    assert screen.query_one("#oov-spark", Sparkline).data[-1] == pytest.approx(100 / 6, abs=1e-3)
    search = screen.query_one(Input)
    search.focus()
    await pilot.press("s", "u")
    assert table.row_count == 1
    await pilot.press("s", "enter")
    await pilot.pause()
    assert str(screen.query_one("#vocab-answer", Static).render()).startswith("sus was added in round 9")
    # empty the search first (ctrl+a is not select-all in Textual 8: it went to the start, and
    # "rizzsus" was asked about, which was never added either)
    search.value = ""
    await pilot.press(*"rizz")
    assert search.value == "rizz"
    await pilot.press("enter")
    await pilot.pause()
    assert str(screen.query_one("#vocab-answer", Static).render()) == "rizz was never added (rounds 0-14)"
    assert table.row_count == 0


def test_bench_vocab_discovery_runs_on_the_fixtures(tiny, monkeypatch, capsys):
    import runpy

    from tests.conftest import FIXTURES, REPO

    monkeypatch.setattr("sys.argv", ["bench", "--model", str(tiny[0]), "--tokenizer", str(tiny[1]),
                                     "--users-file", str(FIXTURES / "users.jsonl.gz"), "--theta", "4",
                                     "--held-out", "5", "--min-rank", "50", "--rounds", "12", "--cohorts", "dp,all",
                                     "--eval-rounds", "0,12", "--eval-messages", "30"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "bench" / "bench_vocab_discovery.py"), run_name="__main__")
    assert exit_.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["held_out_words"] == 5 and set(out["settings"]) == {"dp", "all"}
    full = out["settings"]["all"]
    assert full["precision"] in (None, 1.0)  # every word added was typed by >= theta users
    assert full["typing_on_affected_users_future"][0]["round"] == 0
    assert out["settings"]["dp"]["privacy"]["theorem_applies"] is True


def test_f7_in_the_keyboard_opens_the_latest_runs_timeline(tiny, tmp_path, run_dir, monkeypatch):
    from textual.widgets import DataTable

    from keyboard.app import FedkbApp
    from keyboard.screens import vocab as screen_mod
    from tests.conftest import FIXTURES

    import shutil

    (tmp_path / "runs" / "r1").mkdir(parents=True)
    shutil.copy(run_dir / "vocab.jsonl", tmp_path / "runs" / "r1" / "vocab.jsonl")
    monkeypatch.setattr(screen_mod, "RUNS_DIRS", [tmp_path / "runs"])

    async def go():
        app = FedkbApp(*tiny, devices_root=tmp_path / "devices", users_file=FIXTURES / "users.jsonl.gz",
                       cursor_blink=False)
        async with app.run_test() as pilot:
            await pilot.press("f7")
            await pilot.pause()
            assert isinstance(app.screen, screen_mod.VocabScreen)
            assert app.screen.run_dir == tmp_path / "runs" / "r1" and app.screen.query_one(DataTable).row_count == 3
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, screen_mod.VocabScreen)

    asyncio.run(go())


# -- audit 2 ------------------------------------------------------------------------------------
def test_vocab_word_is_plain_text_not_markup(run_dir, capsys):
    assert main(["vocab", str(run_dir), "--word", "[/]"]) == 1  # a MarkupError traceback before
    out = capsys.readouterr().out
    assert "[/] was never added" in out
    assert main(["vocab", str(run_dir), "--word", "[link=x]"]) == 1
    assert "[link=x] was never added" in capsys.readouterr().out  # the word was swallowed as a tag


def _with_base_checkpoint(run_dir):
    from federation.runfolder import checkpoint_dir

    checkpoint_dir(run_dir, 0).mkdir(parents=True, exist_ok=True)
    base = Vocabulary(SPECIALS + ("the", "a"), 0, 4)
    (checkpoint_dir(run_dir, 0) / "model.json").write_text(json.dumps({"vocab": base.to_json()}))


def test_vocab_word_is_normalized_and_base_words_answer_round_0(tmp_path, capsys):
    pop = [Counter({"q'z": 5}) for _ in range(5)]
    step = make_discovery_step(DiscoveryConfig(theta=4, population=50), tmp_path)
    vocab, gen = Vocabulary(SPECIALS + ("the", "a"), 0, 4), torch.Generator().manual_seed(0)
    for r in range(1, 5):
        vocab, _ = step(vocab, pop, r, gen)
    assert "q'z" in vocab
    _with_base_checkpoint(tmp_path)
    for asked in ("q\u2019z", "Q'Z", "\uff51'\uff5a"):  # curly apostrophe, upper case, full-width (NFKC)
        assert main(["vocab", str(tmp_path), "--word", asked, "--json"]) == 0, asked
        assert json.loads(capsys.readouterr().out)["round"] == 4
    assert main(["vocab", str(tmp_path), "--word", "The"]) == 0
    assert "the is in the base vocabulary since round 0" in capsys.readouterr().out
    assert main(["vocab", str(tmp_path), "--word", "the", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"word": "the", "added": False, "base_vocabulary": True,
                                                   "round": 0, "vocab_version": 0}
    assert main(["vocab", str(tmp_path), "--word", "<s>"]) == 1  # a special token is no word


def test_vocab_screen_answers_plain_text_normalized_and_base_words(run_dir):
    from textual.widgets import Input, Static

    _with_base_checkpoint(run_dir)

    async def check(pilot, screen):
        answer = screen.query_one("#vocab-answer", Static)
        screen.query_one(Input).focus()
        await pilot.press(*"[/]", "enter")  # a MarkupError crashed the whole app before
        await pilot.pause()
        assert "[/] was never added" in str(answer.render())
        screen.query_one(Input).value = ""
        await pilot.press(*"\uff59\uff45\uff45\uff54", "enter")  # full-width "yeet"
        await pilot.pause()
        assert "yeet was added in round 5" in str(answer.render())
        screen.query_one(Input).value = ""
        await pilot.press(*"the", "enter")
        await pilot.pause()
        assert "in the base vocabulary since round 0" in str(answer.render())

    _on_vocab_screen(run_dir, check)


def test_vocab_screen_shows_no_oov_rate_that_was_not_measured(tmp_path):
    """Without held-out users the OOV rate is null: the summary said "OOV 0.00% -> 0.00%"."""
    from textual.widgets import Static

    step = make_discovery_step(DiscoveryConfig(theta=4, population=50), tmp_path)  # no held-out text
    vocab, gen = Vocabulary(SPECIALS + ("the", "a"), 0, 4), torch.Generator().manual_seed(0)
    for r in range(1, 3):
        vocab, _ = step(vocab, [Counter({"yeet": 1})] * 5, r, gen)

    async def check(pilot, screen):
        summary = str(screen.query_one("#vocab-summary", Static).render())
        assert "OOV - -> -" in summary and "0.00%" not in summary

    _on_vocab_screen(tmp_path, check)


def test_vocab_screen_shows_only_committed_rounds(run_dir):
    from textual.widgets import DataTable, Input, Static

    (run_dir / "latest.json").write_text(json.dumps({"round": 7}))  # rounds 8-14 never committed

    async def check(pilot, screen):
        assert screen.query_one(DataTable).row_count == 2  # round 0 and round 5 (yeet); sus came in round 9
        screen.query_one(Input).focus()
        await pilot.press(*"sus", "enter")
        await pilot.pause()
        assert "sus was never added (rounds 0-7)" in str(screen.query_one("#vocab-answer", Static).render())

    _on_vocab_screen(run_dir, check)


# -- audit 4 ------------------------------------------------------------------------------------
def test_vocab_without_a_readable_base_vocabulary_does_not_guess(run_dir, capsys):
    """With the round-0 checkpoint unreadable, a word never added may still be a base word: an error
    naming the checkpoint, not "the was never added" (exit 1)."""
    from federation.runfolder import checkpoint_dir

    f = checkpoint_dir(run_dir, 0) / "model.json"
    for damage in (lambda: f.write_text('{"vocab": '), f.unlink):
        damage()
        assert main(["vocab", str(run_dir), "--word", "the"]) == 2
        err = capsys.readouterr().err
        assert f"{f} is missing or unreadable: the base vocabulary is unknown" in err and "Traceback" not in err
    assert main(["vocab", str(run_dir), "--word", "yeet"]) == 0  # an added word is still answered
    assert "yeet was added in round 5" in capsys.readouterr().out


@pytest.mark.parametrize("word", ["", "   "])
def test_vocab_refuses_an_empty_word(word, run_dir, capsys):
    assert main(["vocab", str(run_dir), "--word", word]) == 2  # " was never added" before
    assert capsys.readouterr().err == "fedkb vocab: error: --word needs a word (it is empty)\n"


def test_vocab_json_is_strict_a_nan_in_the_history_is_named(run_dir, capsys):
    """A NaN figure in vocab.jsonl passed the record checks, and --json printed it (not JSON)."""
    lines = (run_dir / "vocab.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    lines[1] = json.dumps({**rec, "oov_rate": float("nan")})
    (run_dir / "vocab.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["vocab", str(run_dir), "--json"]) == 2
    assert "the record of round 1 is malformed (oov_rate must be a finite number)" in capsys.readouterr().err
