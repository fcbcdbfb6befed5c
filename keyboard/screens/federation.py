"""The live federation screen: rounds of federated learning in a process of their own.

    FederationScreen(model_dir=None, tokenizer_path=None, users_file=None, run_dir=None,
                     rounds=None, clients_per_round=None, sim=None, on_new_global=None, resume=False)

A progress bar over the rounds, the global model's top-1 accuracy per round (a
Sparkline), and a log of each round's metrics.  The rounds run in
`python -m keyboard.federator` (keyboard/federator.py), which a worker thread follows, so
the keyboard's process never imports torch and typing goes on while they run: `escape`
goes back to typing and the rounds go on in the background (the app keeps this screen,
and `f6` shows it again); `s` stops them (the round under way is dropped; the run folder
can be resumed).  After every round the new global checkpoint is announced two ways: the
screen posts `FederationScreen.NewGlobal(checkpoint_dir, round, metrics)` (it bubbles to
the app) and calls `on_new_global(checkpoint_dir)` on the UI thread, so the typing
screen switches to the new global model.  The simulated users' device folders live
beside the run folder (RUN-devices/), never the app's own devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, RichLog, Sparkline, Static

from keyboard.federator import FederatorProcess, spec
from models.errors import FedkbError

RUNS_DIR = Path(__file__).resolve().parents[2] / "runs"
ROUNDS, CLIENTS_PER_ROUND = 10, 10  # a live run's size when the caller gives none


def _new_run_dir() -> Path:
    """RUNS_DIR/live-DATE-TIME, not yet there (two runs started in one second get -2, -3, ...)."""
    stem = RUNS_DIR / time.strftime("live-%Y%m%d-%H%M%S")
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


class FederationScreen(Screen):
    DEFAULT_CSS = """
    FederationScreen #fed-status { padding: 0 1; height: 2; }
    FederationScreen ProgressBar { padding: 0 1; }
    FederationScreen #fed-plot-label { padding: 0 1; color: $text-muted; }
    FederationScreen Sparkline { height: 4; padding: 0 1; }
    FederationScreen RichLog { height: 1fr; border: round $primary; }
    """
    BINDINGS = [
        Binding("escape", "leave", "Back", id="fed-back", tooltip="back to typing; the rounds go on in the background"),
        Binding("s", "stop", "Stop rounds", id="fed-stop", tooltip="stop the rounds now (the run can be resumed)"),
    ]
    BACKGROUND = True  # the app keeps this screen while `running`, shows it again on f6, calls `stop_work` as it quits

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
                 run_dir: Path | None = None, rounds: int | None = None, clients_per_round: int | None = None, sim=None,
                 on_new_global: Callable[[Path], None] | None = None, resume: bool = False, **kwargs):
        super().__init__(**kwargs)
        from federation.config import SimulationConfig

        self.run_dir = Path(run_dir) if run_dir else _new_run_dir()
        self.sim = sim or SimulationConfig(eval_users=10, rounds=ROUNDS if rounds is None else rounds,
                                           clients_per_round=CLIENTS_PER_ROUND if clients_per_round is None else clients_per_round)
        self.on_new_global = on_new_global
        self.top1: list[float] = []
        self.rounds_done = 0
        self.running = True  # until the rounds' process has ended
        self._job = FederatorProcess(spec(self.run_dir, self.sim, model_dir, tokenizer_path, users_file, resume))

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
        """Follow the rounds' process; every change to the screen happens on the UI thread."""
        job = self._job
        try:
            rounds = job.run(on_note=lambda note: self._call(self._log, note),
                             on_round=lambda m, ckpt: self._call(self._on_round, m, ckpt))
        except FedkbError as e:
            self._call(self._finished, self.rounds_done, str(e))
        else:
            self._call(self._finished, rounds, None)

    def _call(self, fn, *args) -> None:
        try:
            self.app.call_from_thread(fn, *args)
        except RuntimeError:  # the app has closed (it quit while the rounds ran): nothing left to show
            pass

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
        self.running = False
        self._log(f"stopped: {error}" if error else f"finished {rounds} rounds; the latest global model is in use")
        self.query_one("#fed-status", Static).update(f"{'stopped' if error else 'finished'} after {rounds} rounds, "
                                                     f"run folder {self.run_dir}")
        self.post_message(self.Finished(rounds, error))

    def stop_work(self) -> None:
        """End the rounds' process now (the app quits, or the user pressed `s`)."""
        self._job.stop()

    def on_unmount(self) -> None:
        self.stop_work()

    def action_stop(self) -> None:
        if self.running:
            self._log("stopping: the round under way is dropped")
            self.stop_work()

    def action_leave(self) -> None:
        self.app.pop_screen()
