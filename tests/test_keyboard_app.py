"""The keyboard app through Textual's pilot: typing, accepting, learning, incognito, forget, profiles."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import numpy as np
import pytest
from textual.widgets import Input

from keyboard.app import FedkbApp
from keyboard.screens.profiles import ProfilesScreen
from keyboard.session import DELTA_FILE, KeyboardSession, LearnConfig
from keyboard.widgets.suggestions import SuggestionStrip
from federation.config import ClientConfig
from models.errors import FedkbError
from tests.conftest import FIXTURES



def sync(fn):
    """Run an async test with asyncio (no pytest-asyncio here); fixtures pass through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


USERS = FIXTURES / "users.jsonl.gz"
FAST = LearnConfig(client=ClientConfig(epochs=1.0, batch_size=2, bptt=8), eval_messages=5)
SLOW = LearnConfig(client=ClientConfig(epochs=50.0, batch_size=2, bptt=8), eval_messages=5)  # still learning when stopped


def make_app(tiny, tmp_path, users_file=USERS, learn_cfg=FAST, **kw) -> FedkbApp:
    model, tok = tiny
    return FedkbApp(model, tok, devices_root=tmp_path / "devices", users_file=users_file, learn_cfg=learn_cfg,
                    cursor_blink=False, **kw)


def strip(app) -> list[str]:
    return app.screen.query_one(SuggestionStrip).words


def text(app) -> str:
    return app.screen.query_one(Input).value


async def learning_fails(app, pilot, why: str = "") -> None:
    """ctrl+l, and the learning fails: the app runs on with the global model and says `why`."""
    await pilot.press("ctrl+l")
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.is_running and app.session.label == "base"
    said = str(app.screen.query_one("#learn-result").render())
    assert "Learning failed" in said and why in said


async def type_(pilot, s: str) -> None:
    await pilot.press(*["space" if c == " " else c for c in s])
    await pilot.pause()


async def until(pilot, cond, seconds: float = 120.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("timed out")


def panel(app) -> tuple[bool, str]:
    """The typing screen's learning panel: (progress bar shown, its line)."""
    t = app.typing_screen
    return t.query_one("#learn-progress").display, str(t.query_one("#learn-result").render())


@sync
async def test_typing_shows_suggestions_and_tab_accepts(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        assert len(strip(app)) == 3 and all(w[0].isupper() for w in strip(app))  # sentence start
        await type_(pilot, "and th")
        sugg = strip(app)
        assert sugg and all(w.lower().startswith("th") for w in sugg)
        await pilot.press("tab")
        await pilot.pause()
        assert text(app) == f"and {sugg[0]} "
        assert app.screen.typing.stats.accepted == 1


@sync
async def test_the_strip_and_accept_follow_the_cursor(tiny, tmp_path):
    """The strip was for the end of the text wherever the cursor was, and Tab rewrote the text's last
    word and moved the cursor to the end (the word typed mid-text stayed half-typed)."""
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        inp = app.screen.query_one(Input)
        await type_(pilot, "and the king wh")
        assert all(w.lower().startswith("wh") for w in strip(app))
        await pilot.press("home", *["right"] * 4)  # the cursor moved, the text as it was: the strip follows
        await pilot.pause()
        assert strip(app) == app.screen.typing.suggestions and app.screen.typing.cursor == 4
        assert app.screen.typing.update("and ").suggestions == strip(app)  # what the text before it gives
        app.screen.typing.update(text(app), 4)
        await type_(pilot, "th")
        assert text(app) == "and ththe king wh" and inp.cursor_position == 6
        sugg = strip(app)
        assert sugg and all(w.lower().startswith("th") for w in sugg)
        await pilot.press("tab")
        await pilot.pause()
        # the whole word the cursor is in ("th|the") is replaced, as a phone keyboard does
        assert text(app) == f"and {sugg[0]} king wh" and inp.cursor_position == len(f"and {sugg[0]} ")
        await pilot.press("end")
        await pilot.pause()
        assert all(w.lower().startswith("wh") for w in strip(app))


@sync
async def test_punctuation_after_an_accept_takes_its_space(tiny, tmp_path):
    """"tomorrow ." : the space an accept added stayed before the punctuation typed next, and taking it back
    first (a backspace) counted the word twice."""
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        inp = app.screen.query_one(Input)
        await type_(pilot, "and th")
        best = strip(app)[0]
        await pilot.press("tab", "full_stop")
        await pilot.pause()
        assert text(app) == f"and {best}." and inp.cursor_position == len(text(app))
        await type_(pilot, " so")
        assert text(app) == f"and {best}. so"
        s = app.screen.typing.stats
        assert (s.words, s.accepted) == (2, 1)


@sync
async def test_accept_never_passes_the_message_limit(tiny, tmp_path):
    """Tab set the input's value in code, past its max_length: a 10,002-character message, cut mid-word
    when stored."""
    from textual import events

    from federation.device import MAX_MESSAGE_CHARS

    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        inp = app.screen.query_one(Input)
        notices = []
        app.screen.notify = lambda message, **kw: notices.append(message)
        before = ("ok " * MAX_MESSAGE_CHARS)[: MAX_MESSAGE_CHARS - 4].rstrip() + " th"  # 2 or 3 characters left
        inp.post_message(events.Paste(before))
        await pilot.pause()
        assert text(app) == before and strip(app)
        fits = {w: len(before) - 2 + len(w) + 1 <= MAX_MESSAGE_CHARS for w in strip(app)}
        assert not all(fits.values())
        for key, rank in (("f1", 1), ("f3", 2), ("tab", 0)):
            if rank >= len(app.screen.typing.suggestions):
                continue
            word = app.screen.typing.suggestions[rank]
            await pilot.press(key)
            await pilot.pause()
            if fits[word]:
                assert text(app) == before[:-2] + word + " "
                break
            assert text(app) == before and notices[-1].startswith(f"message limited to {MAX_MESSAGE_CHARS:,}")
        assert notices and len(text(app)) <= MAX_MESSAGE_CHARS


@sync
async def test_function_keys_accept_left_and_right(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "and ")
        second = strip(app)[1]
        await pilot.press("f1")  # left slot shows the second-best
        await pilot.pause()
        assert text(app) == f"and {second} "


@sync
async def test_enter_stores_message_unless_incognito(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "and the king")
        await pilot.press("enter")
        await pilot.pause()
        assert text(app) == ""
        assert app.session.device.history() == ["and the king"]
        await pilot.press("ctrl+o")  # incognito on
        await type_(pilot, "secret words zorblaxian here")
        await pilot.press("enter")
        await pilot.pause()
        assert app.session.device.history() == ["and the king"]
        assert "zorblaxian" not in app.session.device.personal_words()


@sync
async def test_a_message_that_cannot_be_stored_stays_in_the_box(tiny, tmp_path):
    """A full disk or an unwritable device folder: the app says so and keeps the text to send
    again (the app crashed with a traceback, and the message was gone)."""
    app = make_app(tiny, tmp_path)
    said = []
    app.notify = lambda message, **kw: said.append((message, kw.get("severity")))
    async with app.run_test() as pilot:
        history = app.session.device.history_file
        history.parent.mkdir(parents=True, exist_ok=True)
        history.mkdir()  # appending to it now fails, as on a full disk
        await type_(pilot, "and the king")
        await pilot.press("enter")
        await pilot.pause()
        assert text(app) == "and the king" and app.is_running
        assert any(m.startswith("the message not saved on this device") and sev == "error" for m, sev in said)
        history.rmdir()
        await pilot.press("enter")  # sent again, now stored
        await pilot.pause()
        assert text(app) == "" and app.session.device.history() == ["and the king"]


@sync
async def test_incognito_stores_nothing_on_disk(tiny, tmp_path):
    app = make_app(tiny, tmp_path, incognito=True)
    async with app.run_test() as pilot:
        await type_(pilot, "my friend zorblaxian said hi ")
        await pilot.press("enter")
        await pilot.press("ctrl+l")  # learn: refused
        await pilot.pause()
        assert "zorblaxian" not in app.session.predictor
    assert not any(p.is_file() for p in (tmp_path / "devices").rglob("*"))


@sync
async def test_new_word_becomes_personal_and_is_suggested(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "my friend zorblaxian ")
        assert app.session.device.personal_words() == ["zorblaxian"]
        await type_(pilot, "and zorb")
        assert strip(app)[0] == "zorblaxian"


@sync
async def test_forget_blocks_the_best_suggestion(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "and ")
        best = strip(app)[0]
        await pilot.press("f4")
        await pilot.pause()
        assert best not in strip(app)
        assert best.lower() in app.session.device.blocked_words()
    # a new app on the same device still never suggests it
    app2 = make_app(tiny, tmp_path)
    async with app2.run_test() as pilot:
        await type_(pilot, "and ")
        assert best not in strip(app2)


@sync
async def test_learn_now_changes_the_personal_model(tiny, tmp_path):
    app = make_app(tiny, tmp_path, user_id="u0001")
    async with app.run_test() as pilot:
        before = {k: v.copy() for k, v in app.session.weights.items()}
        assert app.session.label == "base"
        await pilot.press("ctrl+l")
        await app.workers.wait_for_complete()
        await pilot.pause()
        after = app.session.weights
        assert any(not np.array_equal(before[k], after[k]) for k in before)
        assert app.session.predictor.w["residual"] is after["residual"]  # suggestions come from the personal model
        assert app.session.label == "base + personal delta"
        assert (app.session.device.delta_dir / DELTA_FILE).is_file()
        assert "before" in str(app.screen.query_one("#learn-result").render())
        said = []
        app.notify = lambda message, **kw: said.append(message)
        await type_(pilot, "and ")
        first = strip(app)[0]
        await pilot.press("f4")  # forgotten: the personal model still holds it until it learns again
        await pilot.pause()
        assert said[-1].startswith(f"'{first}' will not be suggested again on this device; the personal model unlearns")
    # reopened: the delta is loaded from the device folder
    app2 = make_app(tiny, tmp_path, user_id="u0001")
    assert app2.session.label == "base + personal delta"
    assert all(np.allclose(app2.session.weights[k], after[k], atol=1e-6) for k in after)
    # one bit of the saved delta flipped: typing goes on with the global model, and the app says why
    f = app2.session.device.delta_dir / DELTA_FILE
    blob = bytearray(f.read_bytes())
    blob[-2] ^= 0x01
    f.write_bytes(bytes(blob))
    app3 = make_app(tiny, tmp_path, user_id="u0001")
    assert app3.session.label == "base" and "damaged" in app3.session.delta_error
    said = []
    app3.notify = lambda message, **kw: said.append((message, kw.get("severity")))
    async with app3.run_test() as pilot:
        await pilot.pause()
    assert any(m.startswith("personal model not used") and sev == "warning" for m, sev in said)


@sync
async def test_a_personal_model_that_cannot_be_written_is_a_failed_learning(tiny, tmp_path):
    app = make_app(tiny, tmp_path, user_id="u0001")
    async with app.run_test() as pilot:
        app.session.device.delta_dir.write_text("a file where the personal model's folder goes")  # as a full disk would
        await learning_fails(app, pilot)  # the app crashed before


@sync
async def test_a_learned_delta_that_cannot_be_read_is_a_failed_learning(tiny, tmp_path, monkeypatch):
    """The worker reads the delta the process wrote (only the swap is on the UI thread); a delta it cannot
    read (damaged between the two) leaves the global model in use and says why."""
    app = make_app(tiny, tmp_path, user_id="u0001")

    def damaged(user_id):
        raise FedkbError("the personal model is damaged (checksum)")

    monkeypatch.setattr(app.session, "read_delta", damaged)
    async with app.run_test() as pilot:
        await learning_fails(app, pilot, "damaged")


@sync
async def test_another_profile_or_clearing_stops_a_learning(tiny, tmp_path):
    """A learning under way ends when the profile changes or the device is cleared: no delta appears
    afterwards on either device, and the new profile types with the global model."""

    async def ended(pilot, learner):
        while any(w.is_running for w in app.workers):
            await pilot.pause(0.05)
        assert learner._proc is None or learner._proc.wait(60) is not None  # never started, or ended

    app = make_app(tiny, tmp_path, user_id="u0001")
    async with app.run_test() as pilot:
        await pilot.press("ctrl+l")
        first = app.screen._learner
        app.open_profile("u0002")
        await ended(pilot, first)
        assert app.screen._learner is None
        assert app.session.user_id == "u0002" and app.session.label == "base"
        await pilot.press("ctrl+l")
        second = app.screen._learner
        await pilot.press("f8", "y")
        await ended(pilot, second)
        assert app.session.label == "base"
    assert not any((tmp_path / "devices" / u / "personal" / DELTA_FILE).exists() for u in ("u0001", "u0002"))


@sync
async def test_clear_removes_learned_data(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "hello zorblaxian ")
        await pilot.press("enter")
        await pilot.press("f8")
        await pilot.press("y")
        await pilot.pause()
        assert app.session.device.history() == [] and app.session.device.personal_words() == []
        assert "zorblaxian" not in app.session.predictor


@sync
async def test_profiles_screen_switches_user(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        assert isinstance(app.screen, ProfilesScreen)
        await pilot.press("down", "down")  # me -> u0000 -> u0001
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "top-3" in str(app.screen.query_one("#profile-eval").render())
        await pilot.press("enter")
        await pilot.pause()
        assert app.session.user_id == "u0001"
        assert app.session.device.future()  # the simulated device was laid out


def test_a_shakespeare_role_is_a_profile(tiny, tmp_path):
    """`fedkb --users-file data/shakespeare.jsonl.gz --user hamlet.HAMLET`: the role's first 80 % of
    lines become the device's history, the rest its held-out future."""
    from models.datasets import load_shakespeare

    roles = FIXTURES / "shakespeare.jsonl.gz"
    role = load_shakespeare(roles)[0]
    app = make_app(tiny, tmp_path, user_id=role.id, users_file=roles)
    assert tuple(app.session.device.history()) == role.history
    assert tuple(app.session.device.future()) == role.future


@sync
async def test_palette_provider_lists_controls(tiny, tmp_path):
    from keyboard.palette import KeyboardCommands

    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "and ")
        names = [n for n, _, _ in KeyboardCommands(app.screen)._commands()]
        assert {"Learn now", "Clear all learned data", "Incognito: turn on"} <= set(names)
        assert f"Forget '{strip(app)[0]}'" in names


def test_unknown_user_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(FedkbError, match="unknown user 'nobody'"):
        make_app(tiny, tmp_path, user_id="nobody")


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '{"blocked": 5}', '{"personal": "abc"}', '{"oov_counts": {"x": "many"}}'])
def test_a_damaged_words_file_is_a_clear_error_and_is_kept(tiny, tmp_path, body):
    words = tmp_path / "devices" / "me" / "words.json"
    words.parent.mkdir(parents=True)
    words.write_text(body)
    with pytest.raises(FedkbError, match="words.json is corrupt"):  # `blocked: 5` was a TypeError traceback
        make_app(tiny, tmp_path)
    assert words.read_text() == body  # the forgotten words in it are not dropped behind the user's back


@pytest.mark.parametrize("body", ["[1]", '{"after": {"top1": "x"}}', '{"before": {"top1": 1, "top3": 2, "ksr": 3}, "after": 7}'])
@sync
async def test_a_damaged_learning_record_is_not_shown(tiny, tmp_path, body):
    from textual.widgets import Static

    meta = tmp_path / "devices" / "me" / "personal" / "delta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(body)  # a TypeError / KeyError in the profile line before
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await pilot.pause()
        line = str(app.screen.query_one("#profile", Static).render())
        assert "Profile" in line and "last learn" not in line


def test_missing_model_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(FedkbError, match="no model"):
        FedkbApp(tmp_path / "nope", tiny[1], devices_root=tmp_path)


def test_corrupt_model_is_a_clear_error(tmp_path, tiny):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny[0], bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FedkbError, match="not a valid safetensors"):
        FedkbApp(bad, tiny[1], devices_root=tmp_path)


@sync
async def test_megabyte_paste_is_cut_to_one_message(tiny, tmp_path):
    from textual import events

    from federation.device import MAX_MESSAGE_CHARS

    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        app.screen.query_one(Input).post_message(events.Paste("the king and the queen " * 50_000))
        await pilot.pause()
        assert len(text(app)) == MAX_MESSAGE_CHARS
        await type_(pilot, " and")
        assert len(strip(app)) <= 3
        await pilot.press("enter")
        await pilot.pause()
        assert len(app.session.device.history()[0]) <= MAX_MESSAGE_CHARS


@sync
async def test_new_global_model_from_federation_is_used_for_typing(tiny, tmp_path):
    import torch

    from models.checkpoint import load_model, save_checkpoint

    ckpt, tok = load_model(*tiny)
    with torch.no_grad():
        ckpt.model.word_bias[ckpt.vocab.index["zebra"] if "zebra" in ckpt.vocab else 10] += 50.0
    new = ckpt.vocab.add(["quokkaword"])
    save_checkpoint(tmp_path / "round3", ckpt.model, new, tok, meta={"kind": "global", "round": 3})
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        before = list(strip(app))
        app.use_global(tmp_path / "round3")  # read in a worker thread, swapped in on the UI thread
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.session.label == "global round 3"
        assert "quokkaword" in app.session.predictor.vocab  # the new vocabulary version came with it
        boosted = ckpt.vocab.words[ckpt.vocab.index.get("zebra", 10)]
        assert strip(app)[0].lower() == boosted and strip(app) != before


def _another_global(tiny, path: Path) -> Path:
    """A 'round 3' global model: other weights, and one word more in its vocabulary."""
    import torch

    from models.checkpoint import load_model, save_checkpoint

    ckpt, tok = load_model(*tiny)
    with torch.no_grad():
        for p in ckpt.model.parameters():
            p.mul_(0.9)
    save_checkpoint(path, ckpt.model, ckpt.vocab.add(["quokkaword"]), tok, meta={"kind": "global", "round": 3})
    return path


def _write_delta(session: KeyboardSession, size: float) -> None:
    """A personal delta of `size` in every weight, as a learning writes it."""
    session._save_delta({k: g + np.float32(size) for k, g in session.global_weights.items()}, {"messages": 1})


def _session(tiny, tmp_path, user_id="u0001") -> KeyboardSession:
    return KeyboardSession(tiny[0], tiny[1], tmp_path / "devices", user_id, users_file=USERS, learn_cfg=FAST)


def test_a_model_made_ready_in_a_worker_types_as_one_made_on_the_ui_thread(tiny, tmp_path):
    """`ready` (a worker thread: the new global model read, the device's delta on top, the word table
    composed) and then `install` (the UI thread) type exactly as building it all on the UI thread
    does, also where a personal word was typed in between."""
    round3 = _another_global(tiny, tmp_path / "round3")
    s = _session(tiny, tmp_path)
    _write_delta(s, 0.01)
    s.open("u0001")
    s.predictor.set_context("how are you doing ")
    ready = s.ready(round3)
    assert s.label == "base + personal delta"  # nothing changed yet
    s.add_personal_words(["zorblax"])
    s.install(ready)
    fresh = KeyboardSession(round3, tiny[1], tmp_path / "devices", "u0001", users_file=USERS, learn_cfg=FAST)
    fresh.predictor.set_context("how are you doing ")
    assert s.label == fresh.label == "global round 3 + personal delta"
    assert s.predictor.vocab.words == fresh.predictor.vocab.words and "quokkaword" in s.predictor.vocab
    assert all(np.array_equal(s.weights[k], fresh.weights[k]) for k in fresh.weights)
    assert np.array_equal(s.predictor.emb, fresh.predictor.emb) and np.array_equal(s.predictor.bias, fresh.predictor.bias)
    assert np.array_equal(s.predictor.scores(), fresh.predictor.scores())


def test_a_ready_model_the_device_changed_under_is_never_typed_with(tiny, tmp_path):
    """Between `ready` (a worker) and `install` (the UI thread) the device may change: a learning writes
    a new delta, the device is cleared, another profile opens, another global model comes. The install
    then types with what is on the device now, never with the stale personal model."""
    round3 = _another_global(tiny, tmp_path / "round3")
    s = _session(tiny, tmp_path)
    _write_delta(s, 0.01)
    s.open("u0001")

    def delta_in_use() -> float | None:
        return float(np.median(s.weights["residual"] - s.global_weights["residual"])) if s.has_delta else None

    ready = s.ready(round3)
    _write_delta(s, 0.02)  # a learning finished meanwhile
    s.install(ready)
    assert s.label.startswith("global round 3") and delta_in_use() == pytest.approx(0.02)
    ready = s.ready()
    s.clear()
    s.install(ready)
    assert delta_in_use() is None
    _write_delta(s, 0.03)
    ready = s.ready()  # the delta just written, on the global model in use
    s.use_global(tiny[0])  # another global model came first
    s.install(ready)
    assert s.label == "base + personal delta" and delta_in_use() == pytest.approx(0.03)
    assert all(np.array_equal(s.global_weights[k], g) for k, g in _session(tiny, tmp_path, "me").global_weights.items())
    ready = s.ready(round3)
    s.open("me")  # another profile
    s.install(ready)
    assert s.user_id == "me" and s.label == "global round 3" and delta_in_use() is None


@sync
async def test_a_damaged_words_file_keeps_the_model_in_use(tiny, tmp_path, monkeypatch):
    """A new global model or a learned delta that arrives while the device's words file is damaged is
    not half-installed: typing goes on with the model in use, and the app says why."""
    round3 = _another_global(tiny, tmp_path / "round3")
    s = _session(tiny, tmp_path)
    s.add_personal_words(["zorblax"])
    ready = s.ready(round3)
    s.device.words_file.write_text("{not json")
    with pytest.raises(FedkbError, match="corrupt"):
        s.install(ready)
    assert s.label == "base" and s.vocab is s.predictor.base_vocab and "zorblax" in s.predictor.vocab
    app = make_app(tiny, tmp_path / "app", user_id="u0001")
    async with app.run_test() as pilot:
        app.session.device.words_file.write_text("{not json")
        app.use_global(round3)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.is_running and app.session.label == "base"
        app.session.device.words_file.unlink()  # repaired, for the learning's process

        def damaged():  # and damaged again once it has learned, as the app reads it
            raise FedkbError(f"{app.session.device.words_file} is corrupt; fix or delete it")

        monkeypatch.setattr(app.session.device, "personal_words", damaged)
        await learning_fails(app, pilot, "corrupt")


@sync
async def test_federated_rounds_go_on_in_the_background_while_typing(tiny, tmp_path, monkeypatch):
    """f6 starts the live rounds (in a process of their own); escape goes back to typing while they go on,
    and each new global model is typed with; f6 shows the same screen again, `s` stops the rounds, and
    after that f6 starts a new run, whose process quitting the app ends."""
    import keyboard.screens.federation as federation_screen

    monkeypatch.setattr(federation_screen, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(federation_screen, "ROUNDS", 1000)  # still running when `s` comes
    app = make_app(tiny, tmp_path)

    async def until(cond, seconds=120.0):
        for _ in range(int(seconds / 0.05)):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    async with app.run_test() as pilot:
        await pilot.press("f6")
        fed = app.screen
        assert isinstance(fed, federation_screen.FederationScreen) and not fed.running  # its settings first
        await pilot.press("backspace", "backspace", "backspace", "backspace", "9", "9", "9", "escape")
        assert app.screen is app.typing_screen and fed._job is None
        await pilot.press("f6")  # the same form, as it was left
        assert app.screen is fed and fed.query_one("#fed-rounds").value == "999"
        await pilot.press("enter")
        await until(lambda: fed.rounds_done >= 1)
        await pilot.press("escape")
        assert app.screen is app.typing_screen and fed.running  # back to typing; the rounds go on
        await pilot.press("h", "o", "w", "space")
        await pilot.pause()
        assert text(app) == "how " and len(strip(app)) == 3
        seen = fed.rounds_done

        def typing_round() -> int:  # the round of the global model typed with (0: the base)
            label = app.session.label.split()
            return int(label[2]) if label[:2] == ["global", "round"] else 0

        await until(lambda: typing_round() > seen)  # a round that finished after we went back to typing
        await pilot.pause()
        assert seen < typing_round() <= fed.rounds_done
        await pilot.press("f6")
        assert app.screen is fed  # the same screen, its log and plot kept
        assert fed.running
        await pilot.press("s")
        await until(lambda: not fed.running)
        assert fed._job._proc.poll() is not None and fed.rounds_done < 999 and fed.sim.rounds == 999
        await pilot.press("f6")  # the rounds have ended: a new run
        new = app.screen
        assert isinstance(new, federation_screen.FederationScreen) and new is not fed and new.run_dir != fed.run_dir
        await pilot.press("enter")
        await until(lambda: new._job._proc is not None)
    assert new._job.stopped and new._job._proc.wait(30) is not None  # the app's quitting ended its rounds


@sync
async def test_extra_screens_are_never_stacked_twice(tiny, tmp_path, monkeypatch):
    """f6 over f7 over a waiting federation screen goes back down to it (it pushed a second copy of
    it, and escape then led to the vocabulary screen); f7 pressed again does not stack another."""
    import keyboard.screens.federation as federation_screen

    monkeypatch.setattr(federation_screen, "RUNS_DIR", tmp_path / "runs")
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await pilot.press("f6")
        fed = app.screen
        await pilot.press("f7", "f7", "f7")
        await pilot.pause()
        names = [type(x).__name__ for x in app.screen_stack]
        assert names.count("VocabScreen") == 1, names
        await pilot.press("f6")
        await pilot.pause()
        assert app.screen is fed and app.screen_stack.count(fed) == 1
        await pilot.press("escape")
        assert app.screen is app.typing_screen


@sync
async def test_the_form_shows_what_was_typed_not_markup(tiny, tmp_path, monkeypatch):
    """An error that quotes a field holding Textual markup ("[/]") crashed the app (MarkupError)."""
    import keyboard.screens.federation as federation_screen

    monkeypatch.setattr(federation_screen, "RUNS_DIR", tmp_path / "runs")
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await pilot.press("f6")
        fed = app.screen
        fed.query_one("#fed-dp").value = "[/]"
        await pilot.press("enter")
        await pilot.pause()
        shown = str(fed.query_one("#fed-setup-error").render())
        assert "cannot start" in shown and "[/]" in shown and fed._job is None and app.is_running


def test_malformed_round_messages_never_reach_the_screen():
    """The rounds process's messages are checked before the UI thread draws them: a bad line is
    ignored like a line that is not JSON (a KeyError, TypeError or ValueError closed the app)."""
    from keyboard.federator import _round_ok

    good = {"round": 3, "loss": 4.1, "top1": 20.5, "top3": None, "ksr": 53.0, "epsilon": None, "aggregated": 20,
            "selected": 26, "rejected": 0, "discovery": {"added": [{"word": "yeet", "votes": 3}]}, "timings": {"round_s": 4.2}}
    assert _round_ok(good) and _round_ok({"round": 1})
    for bad in ({**good, "round": {"top1": 0.5}}, {**good, "round": "x"}, {**good, "round": 0}, {**good, "top1": "50%"},
                {**good, "aggregated": 2.5}, {**good, "discovery": {"added": [{"word": 5}]}}, {**good, "discovery": []},
                {**good, "timings": {}}, {**good, "timings": {"round_s": "fast"}}, {**good, "timings": None},
                {**good, "loss": 10**400}, {**good, "timings": {"round_s": -10**400}}, [good], None):
        assert not _round_ok(bad), bad


def test_the_keyboards_process_never_imports_torch(tiny, tmp_path):
    """Typing runs on NumPy, "Learn now" and the live rounds in processes of their own (keyboard/learner.py,
    keyboard/federator.py): the app starts, learns a personal delta and suggests from it (global + delta)
    in a process that never imports torch, with the suggestions this process gets from the same device;
    then it runs a federated round in the background and types with the new global model, and shows
    the profile's scores (global and personal), still without torch."""
    import subprocess
    import sys

    code = f"""
import asyncio, sys
from pathlib import Path
from federation.config import ClientConfig
import keyboard.screens.federation as federation_screen
from keyboard.app import FedkbApp
from keyboard.session import LearnConfig
from keyboard.widgets.suggestions import SuggestionStrip
federation_screen.RUNS_DIR = Path({str(tmp_path / "runs")!r})
federation_screen.ROUNDS = 1
app = FedkbApp(Path({str(tiny[0])!r}), Path({str(tiny[1])!r}), devices_root=Path({str(tmp_path / "devices")!r}),
               users_file=Path({str(USERS)!r}), user_id="u0001", cursor_blink=False,
               learn_cfg=LearnConfig(client=ClientConfig(epochs=1.0, batch_size=2, bptt=8), eval_messages=5))
async def main():
    async with app.run_test() as pilot:
        await pilot.press("ctrl+l")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("h", "o", "w", "space")
        await pilot.pause()
        print(app.session.label, "|", app.session.predictor.suggest_for("how are"), "|", "torch" in sys.modules)
        await pilot.press("f6", "enter")
        fed = app.screen
        while fed.running or not app.session.label.startswith("global"):
            await asyncio.sleep(0.05)
        await pilot.press("escape")
        await pilot.press("a", "r", "e", "space")
        await pilot.pause()
        print(app.session.label, "|", fed.rounds_done, "|", app.screen.query_one(SuggestionStrip).words, "|",
              "torch" in sys.modules)
        await pilot.press("f5")
        panel = app.screen.query_one("#profile-eval")
        while "top-1" not in str(panel.render()):
            await asyncio.sleep(0.05)
        print(str(panel.render()).count("top-1"), "|", "torch" in sys.modules)
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    learned, federated, profiles = out.stdout.strip().splitlines()[-3:]
    label, words, torch_loaded = learned.split(" | ")
    assert label == "base + personal delta" and torch_loaded == "False"
    label, rounds, strip_words, torch_loaded = federated.split(" | ")
    assert (label, rounds, torch_loaded) == ("global round 1 + personal delta", "1", "False") and strip_words != "[]"
    assert profiles == "2 | False"  # a profile's scores, global and personal, measured without torch too
    app = make_app(tiny, tmp_path, user_id="u0001")  # the delta that process learned, read here
    assert app.session.label == "base + personal delta"
    assert words == str(app.session.predictor.suggest_for("how are")) != "[]"


@sync
async def test_a_paste_is_inserted_once_and_its_lines_become_one_message(tiny, tmp_path):
    from textual import events

    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "see you at")
        app.screen.query_one(Input).post_message(events.Paste(" the station"))
        await pilot.pause()
        assert text(app) == "see you at the station"
        await pilot.press("enter")
        app.screen.query_one(Input).post_message(events.Paste("Dear Ann,\n  the meeting moved.\n\nBring the slides.\n"))
        await pilot.pause()
        assert text(app) == "Dear Ann, the meeting moved. Bring the slides."
        await pilot.press("enter")
        await pilot.pause()
        assert app.session.device.history() == ["see you at the station", "Dear Ann, the meeting moved. Bring the slides."]


@sync
async def test_a_clear_that_fails_is_said_and_types_with_what_is_left(tiny, tmp_path, monkeypatch):
    """f8 on a device folder that cannot be removed (read-only, a full disk) was a traceback that ended
    the app, part-way through; now it is an error notification, and the session types with what is left
    on the device (here: the personal model is gone, the words and the history are not)."""
    from federation.device import Device

    app = make_app(tiny, tmp_path)
    said = []
    app.notify = lambda message, **kw: said.append((message, kw.get("severity")))
    async with app.run_test() as pilot:
        s = app.session
        await type_(pilot, "hello zorblaxian ")
        await pilot.press("enter")
        _write_delta(s, 0.01)
        s.open("me")
        assert s.label == "base + personal delta"

        def fails_part_way(device):
            import shutil
            shutil.rmtree(device.delta_dir)
            raise OSError(30, "Read-only file system", "history.jsonl")

        monkeypatch.setattr(Device, "clear", fails_part_way)
        await pilot.press("f8", "y")
        await pilot.pause()
        assert app.is_running
        assert any(m.startswith("clearing 'me' failed") and "Read-only" in m and sev == "error" for m, sev in said)
        assert s.label == "base" and s.delta_error is None  # the deleted personal model is not typed with
        assert "zorblaxian" in s.predictor.vocab and s.device.history() == ["hello zorblaxian"]


def test_clearing_forgets_why_the_deleted_personal_model_was_not_used(tiny, tmp_path):
    s = _session(tiny, tmp_path)
    s.device.delta_dir.mkdir(parents=True)
    (s.device.delta_dir / DELTA_FILE).write_bytes(b"damaged")
    s.open("u0001")
    assert "personal model not used" in s.delta_error
    s.clear()
    assert s.delta_error is None  # the app warned again after every refresh about the file it had deleted


def test_a_failed_profile_switch_leaves_the_session_on_the_profile_it_was_on(tiny, tmp_path):
    """`open` reads everything before it changes anything: a target whose words file is damaged, whose
    history cannot be read or whose folder cannot be laid out leaves the session as it was. It was half
    switched: messages typed next went into the other profile's history, and f8 on "me" wrote a
    simulated user's data into me's folder."""
    s = _session(tiny, tmp_path, "u0001")
    s.forget("the")
    s.finish_message("a note of u0001")
    _write_delta(s, 0.01)
    s.open("u0001")
    before = (s.user, s.device, s.predictor.vocab, s.weights)
    root = tmp_path / "devices"
    (root / "u0002").mkdir()
    (root / "u0002" / "words.json").write_text("{not json")
    (root / "u0000").write_text("a file where the device folder goes")
    (root / "u0003" / "history.jsonl").mkdir(parents=True)  # cannot be read (a FedkbError from device.py)
    for uid, error in (("u0002", FedkbError), ("u0000", OSError), ("u0003", FedkbError)):
        with pytest.raises(error):
            s.open(uid)
        assert s.user_id == "u0001" and (s.user, s.device, s.predictor.vocab, s.weights) == before
        assert s.user.id == "u0001" and "the" in s.predictor.blocked and s.label == "base + personal delta"
    s.finish_message("typed after the failed switches")
    assert s.device.history()[-2:] == ["a note of u0001", "typed after the failed switches"]
    me = _session(tiny, tmp_path, "me")
    with pytest.raises(OSError):
        me.open("u0000")
    me.clear()
    assert me.user is None and me.device.history() == []  # no simulated user's data laid out in me's folder


def test_a_history_that_cannot_be_read_is_a_one_line_error(tiny, tmp_path):
    history = tmp_path / "devices" / "me" / "history.jsonl"
    history.mkdir(parents=True)
    with pytest.raises(FedkbError, match="history.jsonl"):  # the app started, then died with a traceback
        make_app(tiny, tmp_path)


@sync
async def test_a_history_that_can_no_longer_be_read_is_said(tiny, tmp_path):
    """history.jsonl damaged while the keyboard runs: the profile line, Learn now and the profiles
    screen say so; the app runs on."""
    app = make_app(tiny, tmp_path)
    said = []
    app.notify = lambda message, **kw: said.append((message, kw.get("severity")))
    async with app.run_test(size=(120, 30)) as pilot:
        await type_(pilot, "hello there")
        await pilot.press("enter")
        await pilot.pause()
        history = app.session.device.history_file
        history.unlink()
        history.mkdir()
        app.screen.refresh_all()
        await pilot.press("ctrl+l")
        await pilot.press("f5")
        await pilot.pause()
        assert app.is_running and isinstance(app.screen, ProfilesScreen)
        errors = [m for m, sev in said if sev == "error" and "history.jsonl" in m]
        assert len(errors) == 3 and errors[1].startswith("nothing is learned")


@pytest.mark.parametrize("eval_on", ["[/b]", "[@click=app.quit]quit[/]", 7])
@sync
async def test_a_learning_record_s_text_is_never_markup(tiny, tmp_path, eval_on):
    """delta.json's `eval_on` went into the profile line as markup: "[/b]" ended the app as it opened,
    a click action made part of the line run it. Only what a learning writes there is shown."""
    import json

    from textual.widgets import Static

    ok = {"top1": 1, "top3": 2, "ksr": 3}
    meta = tmp_path / "devices" / "me" / "personal" / "delta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"before": ok, "after": ok, "eval_on": eval_on}))
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await pilot.pause()
        content = app.screen.query_one("#profile", Static).visual
        assert app.is_running and content.plain.endswith("→ top-1 1.0%  top-3 2.0%  KSR 3.0%")
        assert not any("click" in str(span.style) for span in content.spans)
    meta.write_text(json.dumps({"before": ok, "after": ok, "eval_on": "typed history"}))
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await pilot.pause()
        assert str(app.screen.query_one("#profile", Static).render()).endswith("KSR 3.0% on typed history")


@sync
async def test_an_error_naming_a_path_is_text_not_markup(tiny, tmp_path):
    """A path in an error (here a devices folder named like markup) is shown as it is; a closing tag in
    it ended the app."""
    app = make_app(tiny, tmp_path / "[/b]", user_id="u0001")  # a folder "[" holding a folder "b]"
    said = []
    app.notify = lambda message, **kw: said.append((message, kw.get("markup", True)))
    async with app.run_test() as pilot:
        app.session.device.delta_dir.write_text("a file where the personal model's folder goes")
        await learning_fails(app, pilot, "[/b]")
        history = app.session.device.history_file
        history.unlink()
        history.mkdir()  # appending to it fails
        await type_(pilot, "and the king")
        await pilot.press("enter")
        await pilot.pause()
        assert app.is_running and any(m.startswith("the message not saved") and not markup for m, markup in said)


@sync
async def test_a_word_forgotten_for_this_session_stays_forgotten_through_new_models(tiny, tmp_path, monkeypatch):
    """In incognito (nothing stored), or where the words file cannot be written, a forgotten word is
    blocked for the rest of the session: it came back with the next model (a federated round's, a
    learning's). The notice says how long it holds; after a failed write there is no "will not be
    suggested again on this device"."""
    round3 = _another_global(tiny, tmp_path / "round3")
    app = make_app(tiny, tmp_path, incognito=True)
    said = []
    app.notify = lambda message, **kw: said.append(message)

    async def swap_model(pilot, model):
        app.use_global(model)
        await app.workers.wait_for_complete()
        await pilot.pause()

    async with app.run_test() as pilot:
        s = app.session
        await type_(pilot, "and ")
        first = strip(app)[0]
        await pilot.press("f4")
        await pilot.pause()
        assert said[-1] == f"incognito: '{first}' will not be suggested again in this session"
        await swap_model(pilot, round3)
        assert first.lower() in s.predictor.blocked and first not in strip(app)
        assert first.lower() not in s.device.blocked_words()  # nothing stored

        await pilot.press("ctrl+o")  # incognito off: the words file cannot be written now
        monkeypatch.setattr(s.device, "block_word", lambda word: (_ for _ in ()).throw(OSError(28, "No space left")))
        second = strip(app)[0]
        said.clear()
        await pilot.press("f4")
        await pilot.pause()
        assert len(said) == 1 and said[0].startswith(f"forgetting {second.lower()!r} not saved on this device")
        await swap_model(pilot, tiny[0])
        assert {first.lower(), second.lower()} <= s.predictor.blocked
        s.open("u0001")  # another profile has its own forgotten words
        assert first.lower() not in s.predictor.blocked
        s.open("me")
        assert {first.lower(), second.lower()} <= s.predictor.blocked
        s.clear()  # the forgotten words go with everything else
        assert not s.predictor.blocked


@sync
async def test_clearing_waits_for_a_learning_to_end(tiny, tmp_path, monkeypatch):
    """f8 clears only once a learning under way has ended (it could write into the cleared folder): its
    process is gone when the folder is removed, and it is waited for in a worker thread (the keyboard
    froze for the seconds it took); the panel says the learning stopped. Where it does not end, nothing
    is cleared."""
    import threading

    from federation.device import Device
    from keyboard.learner import LearnerProcess

    app = make_app(tiny, tmp_path, user_id="u0001", learn_cfg=SLOW)
    said = []
    app.notify = lambda message, **kw: said.append((message, kw.get("severity")))
    seen, waited_on_ui_thread = [], []
    clear, stop = Device.clear, LearnerProcess.stop
    monkeypatch.setattr(Device, "clear", lambda device: (seen.append(learner._proc.returncode), clear(device)))

    def stop_and_see(self, wait=None):
        if wait is not None:
            waited_on_ui_thread.append(threading.current_thread() is threading.main_thread())
        return stop(self, wait)

    monkeypatch.setattr(LearnerProcess, "stop", stop_and_see)
    async with app.run_test() as pilot:
        await pilot.press("ctrl+l")
        learner = app.screen._learner
        await until(pilot, lambda: learner._proc is not None)
        await pilot.press("f8", "y")
        await until(pilot, lambda: seen)
        assert seen[0] is not None and waited_on_ui_thread == [False]  # exited before the folder was removed
        await until(pilot, lambda: not any(w.is_running for w in app.workers))
        assert panel(app) == (False, "Learning stopped.")  # not "Learning failed: learning stopped"
        await pilot.press("ctrl+l")
        learner = app.screen._learner
        await until(pilot, lambda: learner._proc is not None)
        monkeypatch.setattr(learner, "stop", lambda wait=None: False)  # a process that does not end
        history = app.session.device.history()
        await pilot.press("f8", "y")
        await until(pilot, lambda: said[-1][0].startswith("nothing cleared"))
        assert len(seen) == 1 and app.session.device.history() == history
        assert said[-1] == ("nothing cleared on 'u0001': a learning under way did not end", "error")
        stop(learner, 5.0)


@sync
async def test_f8_clears_only_the_device_its_question_names(tiny, tmp_path):
    """f8 asks about one device; the command palette changed the profile under the question, and `y`
    then deleted that other profile's history. The palette now waits for the answer, and a profile that
    changed anyway is not cleared."""
    from keyboard.screens.confirm import ConfirmScreen

    app = make_app(tiny, tmp_path)
    said = []
    app.notify = lambda message, **kw: said.append((message, kw.get("severity")))
    async with app.run_test() as pilot:
        await type_(pilot, "my own message")
        await pilot.press("enter")
        app.open_profile("u0002")
        await pilot.press("f8")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and "'u0002'" in app.screen.question
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)  # no palette
        app.open_profile("me")
        await pilot.press("y")
        await pilot.pause()
        assert app.session.user_id == "me" and app.session.device.history() == ["my own message"]
        assert said[-1] == ("nothing cleared on 'u0002': the profile is 'me' now", "warning")


@sync
async def test_enter_in_f8s_question_keeps_the_data(tiny, tmp_path):
    """The question opened with "Yes" focused, so enter, the key that sends a message, deleted everything."""
    from keyboard.screens.confirm import ConfirmScreen

    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "my own message")
        await pilot.press("enter")
        await pilot.press("f8")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen) and app.session.device.history() == ["my own message"]


@sync
async def test_a_failed_profile_switch_leaves_the_learning_under_way(tiny, tmp_path):
    """A profile that cannot be opened ended the current profile's learning, and its panel said
    "Learning on this device…" for good; a switch that works ends it, and the new profile's panel is empty."""
    app = make_app(tiny, tmp_path, user_id="u0001", learn_cfg=SLOW)
    (tmp_path / "devices" / "u0002").mkdir(parents=True)
    (tmp_path / "devices" / "u0002" / "words.json").write_text("{not json")
    async with app.run_test() as pilot:
        await pilot.press("ctrl+l")
        learner = app.screen._learner
        app.open_profile("u0002")
        await pilot.pause()
        assert app.session.user_id == "u0001" and app.screen._learner is learner and not learner.stopped
        assert panel(app) == (True, "Learning on this device…")
        app.open_profile("u0003")
        await pilot.pause()
        assert learner.stopped and app.screen._learner is None and panel(app) == (False, "")


@sync
async def test_incognito_ends_a_learning_under_way(tiny, tmp_path):
    """ctrl+o: nothing learned from then on, so a learning under way ends (its model was typed with
    while incognito was on)."""
    app = make_app(tiny, tmp_path, user_id="u0001", learn_cfg=SLOW)
    said = []
    app.notify = lambda message, **kw: said.append(message)
    async with app.run_test() as pilot:
        await pilot.press("ctrl+l")
        learner = app.screen._learner
        await until(pilot, lambda: learner._proc is not None)
        await pilot.press("ctrl+o")
        assert learner.stopped and app.screen._learner is None and panel(app) == (False, "Learning stopped.")
        assert said[-1] == "incognito on: nothing stored, nothing learned; the learning under way was ended"
        assert learner._proc.wait(60) is not None
        await pilot.pause()
        assert app.session.label == "base" and not (app.session.device.delta_dir / DELTA_FILE).exists()


@sync
async def test_a_device_folder_that_cannot_be_laid_out_again_keeps_the_model_in_use(tiny, tmp_path, monkeypatch):
    """`install` lays out a simulated user's folder again where its history is gone; on a full disk that
    OSError ended the app (its callers took only FedkbError). A new global model and a learned delta are
    then refused, and typing goes on as it was."""
    import dataclasses
    import errno
    import os

    from federation.device import Device
    from keyboard.learner import LearnerProcess

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    app = make_app(tiny, tmp_path, user_id="u0001")
    async with app.run_test() as pilot:
        s = app.session
        stale = dataclasses.replace(s.ready(tiny[0]), stamp=("another delta",))  # read again at install
        s.device.history_file.unlink()
        monkeypatch.setattr(Device, "write_simulated", full_disk)
        answers = []
        app._swap_global(tiny[0], stale, answers.append)
        assert len(answers) == 1 and "No space" in answers[0]
        t = app.typing_screen
        t._learner = learner = LearnerProcess(s)
        t._learned(learner, None, stale)
        await pilot.pause()
        assert app.is_running and s.label == "base" and panel(app) == (False, f"Learning failed: {answers[0]}")


# -- audit 30.3 ---------------------------------------------------------------------------------
@sync
async def test_a_pasted_line_loses_its_line_ending_and_control_characters(tiny, tmp_path):
    """"hello world\\n" pasted kept its line ending in the one-line input (what was typed next landed on
    the box's border), and escape sequences or NUL and tab reached the message ("31mred" a personal word)."""
    from textual import events

    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        inp = app.screen.query_one(Input)
        for paste in ("hello world\n", "hello world\r\n", "hello world\r"):
            inp.post_message(events.Paste(paste))
            await pilot.pause()
            assert text(app) == "hello world"
            inp.value = ""
            await pilot.pause()
        inp.post_message(events.Paste("x\x1b[31mred\x1b[0m\tand\x00so\x1b[2J"))
        await pilot.pause()
        assert text(app) == "xred and so"


def _users_with(tmp_path, ids) -> Path:
    import gzip
    import json

    path = tmp_path / "users.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for uid in ids:
            f.write(json.dumps({"id": uid, "history": ["hello there friend"], "future": ["how are you doing"]}) + "\n")
    return path


@sync
async def test_profiles_show_ids_as_text_and_skip_a_user_called_me(tiny, tmp_path):
    """A users file with a user "me" crashed f5 (DuplicateKey), an id with "[/b]" too (MarkupError),
    and "[b]bold" was listed as "bold"."""
    from rich.text import Text
    from textual.widgets import DataTable

    app = make_app(tiny, tmp_path, users_file=_users_with(tmp_path, ["ok_user", "me", "x[/b]y", "[b]bold"]))
    said = []
    app.notify = lambda message, **kw: said.append(message)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        assert isinstance(app.screen, ProfilesScreen) and app.is_running
        table = app.screen.query_one(DataTable)
        assert [table.get_row_at(n)[0] for n in range(table.row_count)] == ["me", Text("ok_user"), Text("x[/b]y"),
                                                                            Text("[b]bold")]
        assert any("user 'me' is not listed" in m for m in said)
        await pilot.press("down", "down", "down")
        await app.workers.wait_for_complete()
        await pilot.pause()
        title = str(app.screen.query_one("#profile-title").render())
        assert title == "[b]bold: a simulated user of the federated population"


@sync
async def test_a_message_typed_partly_in_incognito_is_not_kept(tiny, tmp_path):
    """Incognito checked when a word or the message was finished: a message typed in incognito, which
    was turned off before Enter, was stored, its words counted, and the word being typed became a
    personal word; turned on mid-message, the words finished before stayed personal words."""
    app = make_app(tiny, tmp_path)
    said = []
    app.notify = lambda message, **kw: said.append(message)
    async with app.run_test() as pilot:
        d = app.session.device
        await type_(pilot, "my zorblaxian ")
        assert d.personal_words() == ["zorblaxian"]
        await pilot.press("ctrl+o")  # on, mid-message: all of this message is private, its new word taken back
        await pilot.pause()
        assert d.personal_words() == [] and "zorblaxian" not in app.session.predictor
        await type_(pilot, "pin is quuxbaz and wibblefr")
        await pilot.press("ctrl+o")  # off before Enter: the message is still private
        await pilot.pause()
        assert said[-1] == "incognito off from the next message: this one is not stored"
        assert app.typing_screen.has_class("incognito")
        await type_(pilot, "otz ")
        await pilot.press("enter")
        await pilot.pause()
        assert said[-1] == "incognito: message not stored"
        assert d.history() == [] and d.personal_words() == [] and not d.oov_counts()
        assert not app.typing_screen.has_class("incognito")
        await type_(pilot, "and the flibbertigibbet ")  # the next message is kept
        await pilot.press("enter")
        await pilot.pause()
        assert d.history() == ["and the flibbertigibbet"] and d.personal_words() == ["flibbertigibbet"]
        await pilot.press("ctrl+o", "ctrl+o")  # on and off with an empty box: the next message is kept too
        await type_(pilot, "and the king")
        await pilot.press("enter")
        await pilot.pause()
        assert d.history() == ["and the flibbertigibbet", "and the king"]


@sync
async def test_a_timeline_with_a_repeated_round_is_said_on_the_vocabulary_screen(tiny, tmp_path, monkeypatch):
    """Two records of one round (a merged vocab.jsonl) crashed the keyboard on f7 (DuplicateKey)."""
    import json

    import keyboard.screens.vocab as vocab_screen

    run = tmp_path / "runs" / "merged"
    run.mkdir(parents=True)
    rec = {"round": 1, "vocab_version": 1, "vocab_size": 5, "added": [{"word": "yeet", "votes": 12}]}
    (run / "vocab.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"round": 0, "vocab_version": 0, "vocab_size": 4, "added": []}, rec, rec]))
    monkeypatch.setattr(vocab_screen, "RUNS_DIRS", [tmp_path / "runs"])
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await pilot.press("f7")
        await pilot.pause()
        assert isinstance(app.screen, vocab_screen.VocabScreen) and app.is_running
        assert "round 1 appears twice" in str(app.screen.query_one("#vocab-summary").render())


@sync
async def test_a_long_timeline_is_filtered_once_typing_pauses(tiny, tmp_path, monkeypatch):
    """Each key in the search box cleared and re-added the whole table: ~1.7 s a key with 3,000 rounds."""
    import json

    from textual.widgets import DataTable

    import keyboard.screens.vocab as vocab_screen

    run = tmp_path / "runs" / "long"
    run.mkdir(parents=True)
    recs = [{"round": r, "vocab_version": r, "vocab_size": 4 + r, "added": [{"word": f"w{r}", "votes": 12}] * (r > 0)}
            for r in range(150)]  # more than FILTER_AT_ONCE_ROWS
    (run / "vocab.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setattr(vocab_screen, "RUNS_DIRS", [tmp_path / "runs"])
    monkeypatch.setattr(vocab_screen, "FILTER_DELAY_S", 2.0, raising=False)
    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await pilot.press("f7")
        await pilot.pause()
        screen, fills = app.screen, []
        table = screen.query_one(DataTable)
        assert table.row_count == len(recs)
        fill = screen._fill
        screen._fill = lambda query: (fills.append(query), fill(query))
        screen.query_one(Input).focus()
        await pilot.press(*"w12")
        assert fills == [] and table.row_count == len(recs)  # typing: the table as it was
        await until(pilot, lambda: fills)
        assert fills == ["w12"] and table.row_count == 1 + 10  # w12, w120 ... w129
        await pilot.press("3", "enter")  # Enter filters at once, then moves to the answer's row
        await pilot.pause()
        assert fills == ["w12", "w123"] and table.row_count == 1
        await pilot.pause(2.2)
        assert fills == ["w12", "w123"]


@sync
async def test_the_footer_shows_f5_to_f8_at_80_columns(tiny, tmp_path):
    """At 80 columns the footer ended at "^o Incognito": f5-f8 were off screen (f8 before f6 and f7)."""
    from textual.widgets._footer import FooterKey

    app = make_app(tiny, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        keys = {k.key: k.region for k in app.screen.query(FooterKey)}
        assert [k for k in keys if k.startswith("f")] == ["f5", "f6", "f7", "f8"]
        assert all(r.right <= keys["ctrl+p"].x for k, r in keys.items() if k != "ctrl+p")  # none under the palette key
        assert {"tab", "f1", "f2", "f3", "f4"} <= set(app.screen.active_bindings)  # still keys (and in the keys panel)


@sync
async def test_a_short_terminal_still_shows_the_strip(tiny, tmp_path):
    """Below ~12 rows the strip was off screen, with no way to scroll to it."""
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=(40, 10)) as pilot:
        await type_(pilot, "and th")
        typing, strip_ = app.screen.query_one("#typing"), app.screen.query_one(SuggestionStrip)
        assert typing.region.contains_region(strip_.region)  # no profile line, no margins: it fits
        await pilot.resize_terminal(20, 5)
        await pilot.pause()
        assert typing.allow_vertical_scroll  # too small for it all: it scrolls to the strip
        typing.scroll_to_widget(strip_, animate=False)
        await pilot.pause()
        assert typing.region.contains_region(strip_.region)


@sync
async def test_an_extra_screen_that_cannot_be_imported_is_said(tiny, tmp_path, monkeypatch):
    """f6 or f7 vanished without a word when its screen failed to import (a missing dependency, a bug)."""
    import keyboard.app as app_mod
    from keyboard.palette import KeyboardCommands

    monkeypatch.setitem(app_mod.EXTRA_SCREENS, "vocab", ("keyboard.screens.no_such_screen",
                                                         *app_mod.EXTRA_SCREENS["vocab"][1:]))
    app = make_app(tiny, tmp_path)
    said = []
    app.notify = lambda message, **kw: said.append(message)
    async with app.run_test() as pilot:
        await pilot.pause()
        assert any(m.startswith("the vocab screen (f7) cannot be opened: ModuleNotFoundError") for m in said)
        await pilot.press("f7")
        await pilot.pause()
        assert app.screen is app.typing_screen
        names = [n for n, _, _ in KeyboardCommands(app.screen)._commands()]
        assert "Vocabulary timeline" not in names and "Federation: live rounds" in names


@sync
async def test_the_stats_bar_counts_the_words_after_the_cursor(tiny, tmp_path):
    """Home made the stats bar drop to 0 words and 0 keys saved, End brought them back."""
    from keyboard.widgets.stats import StatsBar

    app = make_app(tiny, tmp_path)
    async with app.run_test() as pilot:
        await type_(pilot, "and th")
        await pilot.press("tab")
        await type_(pilot, "king ")
        bar = lambda: str(app.screen.query_one(StatsBar).render())  # noqa: E731
        shown = bar()
        assert "words 3" in shown and "keys saved 0" not in shown
        await pilot.press("home")
        await pilot.pause()
        assert bar() == shown
