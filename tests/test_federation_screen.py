"""The live federation screen, driven through Textual's pilot on the tiny model."""

import asyncio
import functools

from textual.app import App

from keyboard.screens.federation import FederationScreen
from tests.conftest import FIXTURES


def sync(fn):
    """Run an async test with asyncio (no pytest-asyncio here); fixtures pass through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


@sync
async def test_federation_screen_runs_rounds_and_announces_globals(tiny, tmp_path):
    from federation.config import SimulationConfig

    seen, messages = [], []
    sim = SimulationConfig(rounds=2, clients_per_round=3, eval_users=3)
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run", sim=sim,
                              on_new_global=seen.append)

    class Host(App):
        def on_mount(self):
            self.push_screen(screen)

        def on_federation_screen_new_global(self, msg):
            messages.append((msg.round, msg.checkpoint_dir))

        def on_federation_screen_finished(self, msg):
            messages.append(("finished", msg.rounds, msg.error))

    app = Host()
    async with app.run_test() as pilot:
        for _ in range(600):
            if any(m[0] == "finished" for m in messages):
                break
            await asyncio.sleep(0.1)
        await pilot.pause()
        assert ("finished", 2, None) in messages
        assert [m[0] for m in messages if m[0] != "finished"] == [1, 2]
        assert seen == [tmp_path / "run" / "checkpoints" / "round-0001", tmp_path / "run" / "checkpoints" / "round-0002"]
        assert all((d / "model.safetensors").exists() for d in seen[-1:])
        assert len(screen.top1) == 2 and screen.query_one("#fed-top1").data == screen.top1


@sync
async def test_federation_screen_says_what_resuming_skipped(tiny, tmp_path):
    """A damaged last checkpoint: the screen resumes from the one before and says so in its log."""
    from textual.widgets import RichLog

    from federation.config import SimulationConfig
    from federation.run import Simulation

    sim = SimulationConfig(rounds=2, clients_per_round=3, eval_users=3)
    Simulation(tmp_path / "run", sim, tiny[0], tiny[1], FIXTURES / "users.jsonl.gz").run()
    weights = tmp_path / "run" / "checkpoints" / "round-0002" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x01
    weights.write_bytes(bytes(blob))
    finished = []
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run",
                              sim=SimulationConfig(rounds=3, clients_per_round=3, eval_users=3), resume=True)

    class Host(App):
        def on_mount(self):
            self.push_screen(screen)

        def on_federation_screen_finished(self, msg):
            finished.append((msg.rounds, msg.error))

    async with Host().run_test() as pilot:
        for _ in range(600):
            if finished:
                break
            await asyncio.sleep(0.1)
        await pilot.pause()
        assert finished == [(3, None)]
        log = "\n".join(line.text for line in screen.query_one(RichLog).lines)
        assert "skipped the checkpoint of round 2" in log and "damaged" in log
        assert "resuming from round 1; round 2 runs again" in log
