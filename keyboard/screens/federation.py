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
and `f6` shows it again); `s` stops them (the round under way is dropped, the rounds
committed before it are still shown; the run folder can be resumed).  After every round
the new global checkpoint is announced two ways: the screen posts
`FederationScreen.NewGlobal(checkpoint_dir, round, metrics)` (it bubbles to the app) and
calls `on_new_global(checkpoint_dir, done)` on the UI thread, so the typing screen
switches to the new global model; the keyboard calls `done(None)` on the UI thread once it
types with it, or `done(why)` where it cannot (not when a newer round's model came first),
and the run's last log line says which round's model the keyboard types with.  The
simulated users' device folders live beside the run folder (RUN-devices/), never the
app's own devices.
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
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (Button, Checkbox, Footer, Header, Input, Label, ProgressBar, RichLog, Select, Sparkline,
                             Static)

from keyboard.federator import FederatorProcess, spec
from models.datasets import checkout
from models.errors import FedkbError

RUNS_DIR = (checkout() or Path()) / "runs"  # the checkout's runs/, or ./runs for a non-editable install
ROUNDS, CLIENTS_PER_ROUND = 10, 10  # a live run's size when the caller gives none
# `fedkb simulate` has no rounds limit; a live run is watched while one types, and a round of it takes
# seconds (~6 s at 10 clients), so 10,000 rounds is most of a day: a larger number is a slip of the finger
MAX_ROUNDS = 10_000
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
    if args.rounds > MAX_ROUNDS:
        raise FedkbError(f"--rounds must be at most {MAX_ROUNDS:,} here (longer runs: `fedkb simulate`)")
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
                 on_new_global: Callable[[Path, Callable[[str | None], None]], None] | None = None,
                 resume: bool = False, theta: int | None = None,
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
        self.model_round: int | None = None  # the round of this run whose global model the keyboard types with
        self._offered: tuple[int, Path] | None = None  # the newest round's global model, and its checkpoint
        self._offer_error: str | None = None  # why the keyboard cannot type with it
        self._waiting = False  # the keyboard has not yet said whether it types with it
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
            self._call(self._finished, job.round, str(e))  # the rounds the folder holds, as far as known
        except Exception as e:  # a bug (a message the screen could not draw): the run ends, the keyboard goes on
            job.stop()
            self._call(self._finished, job.round, f"unexpected error: {e!r}")
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
        rnd = m["round"]
        self._offered, self._offer_error, self._waiting = (rnd, ckpt), None, self.on_new_global is not None
        if self.on_new_global is not None:
            self.on_new_global(ckpt, lambda error: self._model_answer(rnd, error))

    def _model_answer(self, rnd: int, error: str | None) -> None:
        """The keyboard types with round `rnd`'s global model now (`error` None), or cannot (why)."""
        if error is None:
            self.model_round = rnd  # the swaps are made in turn: the last one made is typed with
        if self._offered is None or rnd != self._offered[0]:
            return  # an older round's: the newest one's answer is what the run ends with
        self._offer_error, self._waiting = error, False
        if self.ended:  # the run's last line said the model was being made ready
            try:
                self._log(self._model_note())
            except NoMatches:  # the screen has been taken down meanwhile: no one reads its log
                pass

    def _model_note(self) -> str:
        """Which global model the keyboard types with, as far as it has said."""
        if self._offered is None:
            return "no new global model came" + (": the keyboard types with the model it had" if self.on_new_global else "")
        rnd, ckpt = self._offered
        if self.on_new_global is None:
            return f"round {rnd}'s global model is in {ckpt}"
        if self._waiting:
            return f"round {rnd}'s global model is being made ready for typing"
        if self._offer_error is None:
            return f"the keyboard types with round {rnd}'s global model"
        had = f"round {self.model_round}'s global model" if self.model_round is not None else "the model it had"
        return f"round {rnd}'s global model cannot be used ({self._offer_error}); the keyboard types with {had}"

    def _finished(self, rounds: int, error: str | None) -> None:
        self.ended = True
        self._log(f"stopped: {error}; {self._model_note()}" if error else f"finished {rounds} rounds; {self._model_note()}")
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
