"""The live federation screen: rounds of federated learning running in a worker thread.

    FederationScreen(model_dir=None, tokenizer_path=None, users_file=None, run_dir=None,
                     rounds=10, clients_per_round=10, sim=None, on_new_global=None, resume=False)

A progress bar over the rounds, the global model's top-1 accuracy per round (a
Sparkline), and a log of each round's metrics.  After every round the new global
checkpoint is announced two ways: the screen posts `FederationScreen.NewGlobal(checkpoint_dir,
round, metrics)` (it bubbles to the app) and calls `on_new_global(checkpoint_dir)` on the
UI thread, so the typing screen can switch to the new global model.  The simulated users'
device folders live beside the run folder (RUN-devices/), never the app's own devices.
Escape stops after the current round and goes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, RichLog, Sparkline, Static
from textual.worker import get_current_worker

from models import native

RUNS_DIR = Path(__file__).resolve().parents[2] / "runs"


class FederationScreen(Screen):
    DEFAULT_CSS = """
    FederationScreen #fed-status { padding: 0 1; height: 2; }
    FederationScreen ProgressBar { padding: 0 1; }
    FederationScreen #fed-plot-label { padding: 0 1; color: $text-muted; }
    FederationScreen Sparkline { height: 4; padding: 0 1; }
    FederationScreen RichLog { height: 1fr; border: round $primary; }
    """
    BINDINGS = [Binding("escape", "leave", "Back", id="fed-back", tooltip="stop after this round and go back")]

    class NewGlobal(Message):
        """A round finished: `checkpoint_dir` holds the new global model (models.checkpoint format)."""

        def __init__(self, checkpoint_dir: Path, round: int, metrics: dict):
            super().__init__()
            self.checkpoint_dir, self.round, self.metrics = checkpoint_dir, round, metrics

    class Finished(Message):
        def __init__(self, rounds: int, error: str | None = None):
            super().__init__()
            self.rounds, self.error = rounds, error

    def __init__(self, model_dir: Path | None = None, tokenizer_path: Path | None = None, users_file: Path | None = None,
                 run_dir: Path | None = None, rounds: int = 10, clients_per_round: int = 10, sim=None,
                 on_new_global: Callable[[Path], None] | None = None, resume: bool = False, **kwargs):
        super().__init__(**kwargs)
        from federation.config import SimulationConfig

        self.model_dir, self.tokenizer_path, self.users_file = model_dir, tokenizer_path, users_file
        self.run_dir = Path(run_dir) if run_dir else RUNS_DIR / time.strftime("live-%Y%m%d-%H%M%S")
        base = sim or SimulationConfig(eval_users=10)
        self.sim = replace(base, rounds=rounds, clients_per_round=clients_per_round) if sim is None else base
        self.on_new_global = on_new_global
        self.resume = resume
        self.top1: list[float] = []
        self.rounds_done = 0
        self._stop = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"federated learning: {self.sim.rounds} rounds x {self.sim.clients_per_round} clients, "
                     f"run folder {self.run_dir}", id="fed-status")
        yield ProgressBar(total=self.sim.rounds, show_eta=True, id="fed-progress")
        yield Static("global top-1 on held-out users, per round", id="fed-plot-label")
        yield Sparkline([], id="fed-top1")
        yield RichLog(id="fed-log", wrap=True, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(RichLog).write("loading the model and the simulated users ...")
        self.run_rounds()

    @work(thread=True, exclusive=True, group="federation")
    def run_rounds(self) -> None:
        from federation.run import Simulation, checkpoint_dir

        worker = get_current_worker()
        try:
            s = Simulation(self.run_dir, self.sim, self.model_dir, self.tokenizer_path, self.users_file, resume=self.resume)
        except Exception as e:  # shown in the log, the app keeps running
            self.app.call_from_thread(self._finished, 0, f"{type(e).__name__}: {e}")
            return
        for note in s.notes:  # settings the users cannot satisfy, what resuming had to skip or repair
            self.app.call_from_thread(self._log, note)
        self.app.call_from_thread(self._log, f"population {s.population.size} users, {len(s.eval_ids)} held out for evaluation")
        if native.will_compile():
            self.app.call_from_thread(self._log, "compiling the native training kernels (once per machine, ~1 min) ...")
        try:
            while not s.done and not worker.is_cancelled and not self._stop:
                m = s.step()
                self.app.call_from_thread(self._on_round, m, checkpoint_dir(s.run_dir, m["round"]))
        except Exception as e:
            self.app.call_from_thread(self._finished, s.round, f"{type(e).__name__}: {e}")
            return
        finally:
            s.close()
        self.app.call_from_thread(self._finished, s.round, None)

    # -- UI thread ---------------------------------------------------------------------
    def _log(self, text: str) -> None:
        self.query_one(RichLog).write(text)

    def _on_round(self, m: dict, ckpt: Path) -> None:
        from keyboard.commands.simulate import _line

        self.rounds_done = m["round"]
        self.query_one(ProgressBar).update(progress=m["round"])
        if m.get("top1") is not None:
            self.top1.append(m["top1"])
            self.query_one(Sparkline).data = list(self.top1)
        self._log(_line(m))
        self.post_message(self.NewGlobal(ckpt, m["round"], m))
        if self.on_new_global is not None:
            self.on_new_global(ckpt)

    def _finished(self, rounds: int, error: str | None) -> None:
        self._log(f"stopped: {error}" if error else f"finished {rounds} rounds; the latest global model is in use")
        self.post_message(self.Finished(rounds, error))

    def action_leave(self) -> None:
        self._stop = True
        self.app.pop_screen()
