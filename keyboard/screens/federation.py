"""The live federation screen: rounds of federated learning in a process of their own.

    FederationScreen(model_dir=None, tokenizer_path=None, users_file=None, run_dir=None,
                     rounds=None, clients_per_round=None, sim=None, on_new_global=None, resume=False,
                     theta=None)

Without `sim` (as the app opens it, f6) the screen first asks for the run's settings, with
`fedkb simulate`'s flags as their labels and defaults (rounds, clients per round, server
optimizer, DP noise and clip, engine, word discovery and its threshold); `enter` or "Start
rounds" starts it, and a setting that cannot be used is said under the form.  Then: a
progress bar over the rounds, the global model's top-1 accuracy per round (a Sparkline),
and a log of each round's metrics and the words it added.  The rounds run in
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

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.content import Content
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (Button, Checkbox, Footer, Header, Input, Label, ProgressBar, RichLog, Select, Sparkline,
                             Static)

from keyboard.federator import FederatorProcess, spec
from models.errors import FedkbError

RUNS_DIR = Path(__file__).resolve().parents[2] / "runs"
ROUNDS, CLIENTS_PER_ROUND = 10, 10  # a live run's size when the caller gives none
LOG_LINES = 5000  # the log keeps its newest lines: a run of thousands of rounds does not grow the app without bound
EVAL_USERS = 10  # held-out users who score each round (fewer than `fedkb simulate`'s 20: a round sooner)
SERVER_OPTIMIZERS = (("FedAvg", "fedavg"), ("FedAvgM (momentum 0.9)", "fedavgm"), ("FedAdam (lr 0.01)", "fedadam"))
ENGINES = (("sequential (one core)", "sequential"), ("parallel (two workers, both cores)", "parallel"))


def live_config(rounds: str, clients_per_round: str, server_opt: str = "fedavg", noise: str = "0", clip: str = "",
                engine: str = "sequential", discover: bool = False, theta: str = "10"):
    """The run's (SimulationConfig, TrieHH threshold or None: no discovery) from the setup form's text,
    as `fedkb simulate` builds them from the same flags (keyboard/commands/simulate.py), with
    EVAL_USERS; FedkbError says which setting is wrong."""
    from federation.discovery import DiscoveryConfig
    from keyboard.commands.simulate import add_arguments, build_config

    def number(text: str, flag: str, kind=float):
        try:
            value = kind(text.strip())
        except ValueError:
            raise FedkbError(f"{flag}: {text.strip()!r} is not a {'whole number' if kind is int else 'number'}") from None
        if not math.isfinite(value):
            raise FedkbError(f"{flag}: {text.strip()!r} is not a finite number")
        return value

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args([])  # the command's defaults, then the form's settings
    args.rounds, args.clients_per_round = number(rounds, "--rounds", int), number(clients_per_round, "--clients-per-round", int)
    if args.rounds < 1:
        raise FedkbError("--rounds must be >= 1")
    args.server_opt, args.engine, args.eval_users = server_opt, engine, EVAL_USERS
    args.dp = number(noise, "--dp") if noise.strip() else 0.0
    args.clip = number(clip, "--clip") if clip.strip() else None
    sim = build_config(args)
    if not discover:
        return sim, None
    try:
        return sim, DiscoveryConfig(theta=number(theta, "--theta", int)).theta
    except ValueError as e:
        raise FedkbError(str(e)) from None


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
    FederationScreen #fed-setup { padding: 0 1; height: 1fr; }
    FederationScreen .fed-field { height: 3; }
    FederationScreen .fed-field Label { width: 2fr; max-width: 48; padding: 1 1 0 0; }
    FederationScreen .fed-field Input, FederationScreen .fed-field Select, FederationScreen .fed-field Checkbox {
        width: 3fr; max-width: 56;
    }
    FederationScreen #fed-setup-error { color: $error; padding: 1 0 0 0; }
    """
    BINDINGS = [
        Binding("escape", "leave", "Back", id="fed-back", tooltip="back to typing; the rounds go on in the background"),
        Binding("s", "stop", "Stop rounds", id="fed-stop", tooltip="stop the rounds now (the run can be resumed)"),
    ]
    BACKGROUND = True  # the app keeps this screen until its rounds have `ended`, shows it again on f6, calls `stop_work` as it quits

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
                 on_new_global: Callable[[Path], None] | None = None, resume: bool = False, theta: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir) if run_dir else _new_run_dir()
        self._job_where = (model_dir, tokenizer_path, users_file, resume)
        self._form_size = (ROUNDS if rounds is None else rounds, CLIENTS_PER_ROUND if clients_per_round is None else clients_per_round)
        self.sim = sim  # None: asked for first
        self.theta: int | None = theta  # discover new words with this threshold (None: no discovery)
        self.on_new_global = on_new_global
        self.top1: list[float] = []
        self.rounds_done = 0
        self.ended = False  # the rounds have ended (finished, stopped or failed): f6 then starts a new run
        self._job: FederatorProcess | None = None

    @property
    def running(self) -> bool:
        """The rounds' process is at work: started, not yet ended."""
        return self._job is not None and not self.ended

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="fed-setup"):  # scrolls on a small terminal
            yield Static(f"A new run of federated learning over the simulated users, from the model in use, "
                         f"into {self.run_dir} (the settings are `fedkb simulate`'s):")
            for label, widget in (
                ("rounds (--rounds)", Input(str(self._form_size[0]), type="integer", id="fed-rounds")),
                ("clients per round (--clients-per-round)", Input(str(self._form_size[1]), type="integer", id="fed-clients")),
                ("server optimizer (--server-opt)", Select(SERVER_OPTIMIZERS, value="fedavg", allow_blank=False, id="fed-server-opt")),
                ("DP noise multiplier (--dp)", Input("0", id="fed-dp")),
                ("clip per update (--clip)", Input("", placeholder="none", id="fed-clip")),
                ("engine (--engine)", Select(ENGINES, value="sequential", allow_blank=False, id="fed-engine")),
                ("discover new words (--discover)", Checkbox("with TrieHH, each round", id="fed-discover")),
                ("TrieHH threshold: votes a word needs (--theta)", Input("10", type="integer", id="fed-theta")),
            ):
                with Horizontal(classes="fed-field"):
                    yield Label(label)
                    yield widget
            yield Static("", id="fed-setup-error")
            yield Button("Start rounds", id="fed-start", variant="primary")
        with Vertical(id="fed-run"):
            yield Static("", id="fed-status")
            yield ProgressBar(show_eta=True, id="fed-progress")
            yield Static("global top-1 on held-out users, per round", id="fed-plot-label")
            yield Sparkline([], id="fed-top1")
            yield RichLog(id="fed-log", wrap=True, markup=False, max_lines=LOG_LINES)
        yield Footer()

    def on_mount(self) -> None:
        if self.sim is not None:  # settings given: no form
            self._start()
        else:
            self.query_one("#fed-run").display = False
            for field in self.query("#fed-setup Input").results(Input):
                field.cursor_blink = getattr(self.app, "cursor_blink", True)  # off in tests and snapshots
            self.query_one("#fed-rounds", Input).focus()

    @on(Button.Pressed, "#fed-start")
    @on(Input.Submitted, "#fed-setup Input")
    def action_start(self) -> None:
        """Start the run with the form's settings (enter, or the button)."""
        if self._job is not None:
            return
        try:
            v = lambda id_: self.query_one(f"#{id_}").value
            self.sim, self.theta = live_config(v("fed-rounds"), v("fed-clients"), v("fed-server-opt"), v("fed-dp"),
                                               v("fed-clip"), v("fed-engine"), v("fed-discover"), v("fed-theta"))
        except FedkbError as e:
            self.query_one("#fed-setup-error", Static).update(Content(f"cannot start: {e}"))  # as typed: "[/]" is no markup
            return
        self._start()

    def _settings(self) -> str:
        sim = self.sim
        dp = f", DP noise {sim.privacy.noise_multiplier:g}" if sim.privacy.noise_multiplier else ""
        clip = f", clip {sim.privacy.clip:g}" if sim.privacy.clip is not None else ""
        words = f", new words at {self.theta} votes" if self.theta is not None else ""
        return (f"{sim.rounds} rounds x {sim.clients_per_round} clients, {sim.server.optimizer}{dp}{clip}, "
                f"{sim.engine} engine{words}")

    def _start(self) -> None:
        model_dir, tokenizer_path, users_file, resume = self._job_where
        self._job = FederatorProcess(spec(self.run_dir, self.sim, model_dir, tokenizer_path, users_file, resume, self.theta))
        self.query_one("#fed-setup").remove()  # its keys are the screen's again (s: stop)
        self.query_one("#fed-run").display = True
        self.query_one("#fed-status", Static).update(f"federated learning: {self._settings()}, run folder {self.run_dir}")
        self.query_one(ProgressBar).update(total=self.sim.rounds)
        self.query_one(RichLog).write("loading the model and the simulated users ...")
        self.run_rounds()

    @work(thread=True, exclusive=True, group="federation")
    def run_rounds(self) -> None:
        """Follow the rounds' process; every change to the screen happens on the UI thread."""
        job = self._job
        try:
            rounds = job.run(on_note=lambda note: self._call(self._log, note),
                             on_round=lambda m, ckpt: self._call(self._on_round, m, ckpt))
        except (FedkbError, OSError) as e:  # OSError: the process could not be started
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
        self.ended = True
        self._log(f"stopped: {error}" if error else f"finished {rounds} rounds; the latest global model is in use")
        self.query_one("#fed-status", Static).update(f"{'stopped' if error else 'finished'} after {rounds} rounds "
                                                     f"({self._settings()}), run folder {self.run_dir}")
        self.post_message(self.Finished(rounds, error))

    def stop_work(self) -> None:
        """End the rounds' process now (the app quits, or the user pressed `s`)."""
        if self._job is not None:
            self._job.stop()

    def on_unmount(self) -> None:
        self.stop_work()

    def action_stop(self) -> None:
        if self.running:
            self._log("stopping: the round under way is dropped")
            self.stop_work()

    def action_leave(self) -> None:
        self.app.pop_screen()
