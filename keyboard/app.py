"""The fedkb keyboard: a Textual app around `KeyboardSession` (state) and `TypingSession` (typing logic).

Screens: typing (default), profiles, and, when their modules are present, the
live federation and vocabulary-timeline screens.  Every control is a Binding
(with an id and a tooltip; the Footer shows those that fit at 80 columns, the
palette's keys panel all of them) and a command-palette entry.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.worker import get_current_worker

from federation.memory import release_free_memory
from keyboard.palette import KeyboardCommands
from keyboard.screens.confirm import ConfirmScreen
from keyboard.screens.profiles import ProfilesScreen
from keyboard.screens.typing import TypingScreen
from keyboard.session import ME, KeyboardSession, LearnConfig
from models.errors import FedkbError

LEARNER_EXIT_S = 5.0  # clearing the device waits (in a worker) this long for a learning's process to exit, then kills it
# the keyboard's own actions, which wait while a question (ConfirmScreen) is up: the palette could change
# the profile that f8's question names
NOT_UNDER_A_QUESTION = {"command_palette", "clear", "profiles", "push_extra", "learn", "incognito", "forget"}

# optional screens written elsewhere: name -> (module, class, palette label, help, key, footer label)
EXTRA_SCREENS = {
    "federation": ("keyboard.screens.federation", "FederationScreen", "Federation: live rounds",
                   "Watch rounds of federated learning over the simulated users", "f6", "Federation"),
    "vocab": ("keyboard.screens.vocab", "VocabScreen", "Vocabulary timeline",
              "How the global vocabulary grew, round by round", "f7", "Vocab"),
}


def _available_extras() -> tuple[dict[str, type], dict[str, str]]:
    """The extra screens' classes, and why each of the others cannot be opened (it failed to import)."""
    found, missing = {}, {}
    for name, (module, cls, *_rest) in EXTRA_SCREENS.items():
        try:
            found[name] = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:  # a missing dependency, or a bug in the module
            missing[name] = f"{type(e).__name__}: {e}"
    return found, missing


class FedkbApp(App):
    TITLE = "fedkb"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {KeyboardCommands}
    BINDINGS = [  # after the typing screen's f5, in the order of their keys (the extras only where available)
        *(Binding(key, f"push_extra('{name}')", footer, id=name, tooltip=help_)
          for name, (_, _, _, help_, key, footer) in EXTRA_SCREENS.items()),
        Binding("f8", "clear", "Clear", id="clear", tooltip="Delete everything typed and learned on this device"),
    ]

    class Learned(Message):
        """Posted after 'Learn now' finished and the personal model is in use."""

        def __init__(self, result):
            super().__init__()
            self.result = result

    def __init__(
        self,
        model_dir: Path | None = None,
        tokenizer_path: Path | None = None,
        devices_root: Path | None = None,
        user_id: str = ME,
        incognito: bool = False,
        users_file: Path | None = None,
        learn_cfg: LearnConfig = LearnConfig(),
        cursor_blink: bool = True,
        extra_screens: bool = True,
    ):
        # the model is loaded here, before the terminal is taken over: a bad path is one clear FedkbError
        self.session = KeyboardSession(model_dir, tokenizer_path, devices_root, user_id, incognito, users_file, learn_cfg)
        self.cursor_blink = cursor_blink
        self._extras, self._missing = _available_extras() if extra_screens else ({}, {})
        self._background: dict[str, object] = {}  # name -> an extra screen still at work off the stack
        super().__init__()

    def on_mount(self) -> None:
        for name, why in self._missing.items():  # its key is not shown: said, not silent
            self.log.error(f"the {name} screen cannot be opened: {why}")
            self.notify(f"the {name} screen ({EXTRA_SCREENS[name][4]}) cannot be opened: {why}", severity="warning",
                        timeout=8, markup=False)

    def get_default_screen(self) -> TypingScreen:
        return TypingScreen()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "push_extra" and parameters and parameters[0] not in self._extras:
            return False  # a screen turned off or that failed to import: its key is not shown
        return not (action in NOT_UNDER_A_QUESTION and isinstance(self.screen, ConfirmScreen))

    def on_unmount(self) -> None:
        for screen in self._background.values():  # off the stack, so Textual does not unmount them
            screen.stop_work()

    # -- helpers -----------------------------------------------------------------------
    @property
    def typing_screen(self) -> TypingScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, TypingScreen):
                return screen
        return None

    def current_suggestions(self) -> list[str]:
        t = self.typing_screen
        return list(t.typing.suggestions) if t is not None and hasattr(t, "typing") else []

    def extra_screens(self) -> dict[str, tuple[str, str]]:
        return {name: EXTRA_SCREENS[name][2:4] for name in self._extras}

    def push_extra(self, name: str) -> None:
        self.action_push_extra(name)

    def use_global(self, checkpoint_dir: Path, done: Callable[[str | None], None] | None = None) -> None:
        """A new global model arrived (a federated round finished): type with it from now on.
        It is read and made ready (the device's delta on top, the word table composed) in a worker
        thread; only the swap (`_swap_global`) is on the UI thread.  `done` is then called there with
        None (typing with it) or why it cannot be used (typing goes on as it was); not when a newer
        model came meanwhile."""
        self._ready_global(Path(checkpoint_dir), done)

    @work(thread=True, exclusive=True, group="new-global")
    def _ready_global(self, checkpoint_dir: Path, done: Callable[[str | None], None] | None = None) -> None:
        worker = get_current_worker()
        try:
            ready = self.session.ready(checkpoint_dir)
        except FedkbError as e:  # the readers turn an unreadable file into one too
            ready = e
        if not worker.is_cancelled:  # else a newer round's model has come meanwhile: that one is used
            self.call_from_thread(self._swap_global, checkpoint_dir, ready, done)
        del ready
        release_free_memory()  # the arrays swapped out were built in this thread's malloc arena: hand them back

    def _swap_global(self, checkpoint_dir: Path, ready, done: Callable[[str | None], None] | None = None) -> None:
        try:
            if isinstance(ready, FedkbError):
                raise ready
            self.session.install(ready)
        except (FedkbError, OSError) as e:  # the model, or the device's files, cannot be used: typing goes on as it was
            self.notify(f"cannot use {checkpoint_dir}: {e}", severity="error", markup=False)
            if done is not None:
                done(str(e))
            return
        t = self.typing_screen
        if t is not None:
            t.refresh_all()
        self.notify(f"typing with {self.session.label}")
        if done is not None:
            done(None)

    def action_push_extra(self, name: str) -> None:
        cls = self._extras.get(name)
        if cls is None:
            why = f": {self._missing[name]}" if name in self._missing else ""
            self.notify(f"the {name} screen is not available{why}", severity="warning", markup=False)
            return
        kept = self._background.get(name)  # a screen whose work goes on when it is left (the live rounds)
        if kept is not None:
            if not kept.ended:  # at work, or still asking for its settings
                if kept in self.screen_stack:  # under other screens (f7 over f6): back down to it, never a second copy
                    self._pop_to(kept)
                else:
                    self.push_screen(kept)
                return
            if kept in self.screen_stack:  # its work has ended: this key starts anew
                self.switch_to_typing()
            del self._background[name]
            self.uninstall_screen(kept)
        open_ = next((x for x in reversed(self.screen_stack) if type(x) is cls), None)
        if open_ is not None:  # already open under others: back down to it
            self._pop_to(open_)
            return
        offer = {"session": self.session, "model_dir": self.session.model_dir,
                 "tokenizer_path": self.session.tokenizer.path, "devices_root": self.session.devices_root,
                 "users_file": self.session.users_file, "on_new_global": self.use_global}
        try:
            params = inspect.signature(cls).parameters
            kwargs = {k: v for k, v in offer.items() if k in params}
            screen = cls(**kwargs)
            if getattr(screen, "BACKGROUND", False):
                self.install_screen(screen, f"background-{name}")  # kept when popped: its work goes on
                self._background[name] = screen
            self.push_screen(screen)
        except (FedkbError, TypeError, ValueError) as e:
            self.notify(f"cannot open the {name} screen: {e}", severity="error", markup=False)

    def _pop_to(self, screen) -> None:
        """Pop the screens above `screen` (on the stack), so that it shows again."""
        while self.screen is not screen:
            self.pop_screen()

    # -- controls (bindings and palette) -----------------------------------------------
    def action_learn(self) -> None:
        t = self.typing_screen
        if t is not None:
            if self.screen is not t:
                self.switch_to_typing()
            t.action_learn()

    def action_incognito(self) -> None:
        s = self.session
        s.incognito = not s.incognito
        t = self.typing_screen
        # nothing learned while on: a learning under way ends too (its model would be typed with from then on)
        ended = s.incognito and t is not None and t.stop_learning() is not None
        if t is not None:
            t.incognito_changed()
        on = "incognito on: nothing stored, nothing learned" + ("; the learning under way was ended" if ended else "")
        private = t is not None and t.private  # the message in the box was typed with it on
        off = "incognito off" + (" from the next message: this one is not stored" if private else "")
        self.notify(on if s.incognito else off, timeout=2)

    def action_forget(self, word: str | None = None) -> None:
        t = self.typing_screen
        if t is not None:
            t.action_forget(word)

    def action_clear(self) -> None:
        if any(w.group == "clear" and w.is_running for w in self.workers):
            self.notify("already clearing: waiting for the learning under way to end", severity="warning")
            return
        uid = self.session.user_id  # the device the question names: that one is cleared, or none

        def done(yes: bool | None) -> None:
            if not yes:
                return
            t = self.typing_screen
            learner = t.stop_learning() if t is not None and self.session.user_id == uid else None
            if learner is None:
                self._clear(uid)
            else:  # it could still write a delta into the folder: first its process is gone (waited for in a worker)
                self.notify(f"ending the learning under way on '{uid}' first…", timeout=2, markup=False)
                self._clear_after(learner, uid)

        self.push_screen(ConfirmScreen(f"Delete everything typed and learned on device '{uid}'?"
                                       " (history, personal words, forgotten words, personal model)"), done)

    @work(thread=True, exclusive=True, group="clear")
    def _clear_after(self, learner, uid: str) -> None:
        """Clear device `uid` (on the UI thread) once the process of a learning just ended has exited."""
        ended = learner.stop(wait=LEARNER_EXIT_S)
        try:
            self.call_from_thread(self._clear, uid, ended)
        except RuntimeError:  # the app has closed meanwhile
            pass

    def _clear(self, uid: str, ended: bool = True) -> None:
        """Delete everything on device `uid`, if it is still the profile in use and no learning can write
        into it (`ended`: the last one's process has exited)."""
        t = self.typing_screen
        if self.session.user_id != uid:
            self.notify(f"nothing cleared on '{uid}': the profile is '{self.session.user_id}' now", severity="warning",
                        markup=False)
            return
        if not ended or (t is not None and t.learning):
            why = "a learning under way did not end" if not ended else "a learning was started meanwhile"
            self.notify(f"nothing cleared on '{uid}': {why}", severity="error", markup=False)
            return
        try:
            self.session.clear()
        except (OSError, FedkbError) as e:  # a folder that cannot be removed or written: typing goes on
            self.notify(f"clearing '{uid}' failed: {e}", severity="error", timeout=8, markup=False)
        else:
            self.notify(f"cleared everything learned on '{uid}'", timeout=3, markup=False)
        if t is not None:
            t.refresh_all()

    def action_profiles(self) -> None:
        if isinstance(self.screen, ProfilesScreen):
            return

        def chosen(uid: str | None) -> None:
            if uid and uid != self.session.user_id:
                self.open_profile(uid)

        self.push_screen(ProfilesScreen(), chosen)

    def open_profile(self, uid: str) -> None:
        t = self.typing_screen
        try:
            self.session.open(uid)
        except (FedkbError, OSError) as e:  # OSError: the device folder cannot be laid out (a full disk)
            self.notify(str(e), severity="error", markup=False)
            return  # on the profile it was on, its learning going on
        if t is not None:
            t.stop_learning()  # the other profile's
            t.typing.clear()
            t.query_one("#text").value = ""
            t.query_one("#learn-result").update("")
            t.query_one("#learn-progress").display = False
            t.refresh_all()
        self.notify(f"typing as '{uid}'", timeout=2)

    def switch_to_typing(self) -> None:
        while len(self.screen_stack) > 1 and not isinstance(self.screen, TypingScreen):
            self.pop_screen()
