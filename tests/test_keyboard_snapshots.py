"""Snapshots of the keyboard's screens (cursor blink off; tiny fixture model, so the words are stable).

Update after an intended UI change: pytest tests/test_keyboard_snapshots.py --snapshot-update
"""

from __future__ import annotations

from pathlib import Path

from federation.config import ClientConfig
from keyboard.app import FedkbApp
from keyboard.session import LearnConfig
from tests.conftest import FIXTURES

SIZE = (100, 24)


def make_app(tiny, tmp_path, **kw) -> FedkbApp:
    model, tok = tiny
    return FedkbApp(model, tok, devices_root=tmp_path / "devices", users_file=FIXTURES / "users.jsonl.gz",
                    learn_cfg=LearnConfig(client=ClientConfig(epochs=1.0, batch_size=2, bptt=8), eval_messages=5),
                    cursor_blink=False, **{"extra_screens": False, **kw})


class TestTypingScreen:
    def test_empty(self, snap_compare, tiny, tmp_path):
        assert snap_compare(make_app(tiny, tmp_path), terminal_size=SIZE)

    def test_partial_word(self, snap_compare, tiny, tmp_path):
        assert snap_compare(make_app(tiny, tmp_path), press=[*"and th"], terminal_size=SIZE)

    def test_incognito(self, snap_compare, tiny, tmp_path):
        assert snap_compare(make_app(tiny, tmp_path, incognito=True), press=[*"and", "space"], terminal_size=SIZE)

    def test_80_columns(self, snap_compare, tiny, tmp_path):
        """f5-f8 in the footer of an 80 x 24 terminal."""
        assert snap_compare(make_app(tiny, tmp_path, extra_screens=True), press=[*"and th"], terminal_size=(80, 24))

    def test_short_terminal(self, snap_compare, tiny, tmp_path):
        """40 x 10: no profile line and no margins, so the strip and the stats still show."""
        assert snap_compare(make_app(tiny, tmp_path), press=[*"and th"], terminal_size=(40, 10))


class TestProfilesScreen:
    def test_profiles(self, snap_compare, tiny, tmp_path):
        async def open_profiles(pilot):
            await pilot.press("f5")
            await pilot.pause()
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()

        assert snap_compare(make_app(tiny, tmp_path), run_before=open_profiles, terminal_size=(110, 24))


class TestFederationScreen:
    def test_form(self, snap_compare, tiny, tmp_path, monkeypatch):
        """f6: the live run's settings, before it starts (80 x 24: the form scrolls)."""
        import keyboard.screens.federation as federation_screen

        monkeypatch.setattr(federation_screen, "_new_run_dir", lambda: Path("runs/live-20261127-120000"))
        assert snap_compare(make_app(tiny, tmp_path, extra_screens=True), press=["f6"], terminal_size=(80, 24))
