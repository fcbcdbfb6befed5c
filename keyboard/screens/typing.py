"""The typing screen: an input line, the suggestion strip, live stats, on-device learning."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, ProgressBar, Static
from textual.worker import get_current_worker

from federation.device import MAX_MESSAGE_CHARS
from federation.memory import release_free_memory
from keyboard.learner import LearnerProcess
from keyboard.typing import MessageFull, TypingSession
from keyboard.widgets.message_input import MessageInput
from keyboard.widgets.stats import StatsBar
from keyboard.widgets.suggestions import SLOT_RANK, SuggestionStrip
from models.errors import FedkbError


def _summary(s: dict) -> str:
    return f"top-1 {s['top1']:.1f}%  top-3 {s['top3']:.1f}%  KSR {s['ksr']:.1f}%"


class TypingScreen(Screen):
    """Type; accept suggestions; Enter sends the message to this device's history."""

    VERTICAL_BREAKPOINTS = [(0, "-short"), (18, "-tall")]  # -short: a compact layout (app.tcss)
    _learner: LearnerProcess | None = None  # the running "Learn now", if any
    private = False  # incognito was on at some moment of the message being typed: nothing of it is kept
    _added: list[str]  # the personal words this message added (taken back if it turns private)

    BINDINGS = [
        # the footer shows what fits at 80 columns (f5-f8 included): the accept keys are in the input's
        # placeholder, f4 in the palette ("Forget 'WORD'"), and all of them in its keys panel
        Binding("tab", "accept(0)", "Accept", key_display="tab/f2", show=False, priority=True, id="accept-best",
                tooltip="Insert the best (centre) suggestion and a space"),
        Binding("f1", f"accept({SLOT_RANK[0]})", "Left", show=False, id="accept-left",
                tooltip="Insert the left suggestion and a space"),
        Binding("f2", f"accept({SLOT_RANK[1]})", "Centre", show=False, id="accept-centre",
                tooltip="Insert the centre (best) suggestion and a space"),
        Binding("f3", f"accept({SLOT_RANK[2]})", "Right", show=False, id="accept-right",
                tooltip="Insert the right suggestion and a space"),
        Binding("f4", "forget", "Forget", show=False, id="forget",
                tooltip="Never suggest the best (centre) suggestion again on this device"),
        Binding("ctrl+l", "learn", "Learn", priority=True, id="learn",
                tooltip="Fine-tune a personal model on this device's typed history"),
        Binding("ctrl+o", "incognito", "Incognito", priority=True, id="incognito",
                tooltip="Toggle incognito: nothing typed is stored (nor a message it was on for at any moment), "
                        "nothing is learned"),
        Binding("f5", "app.profiles", "Profiles", id="profiles",
                tooltip="Choose 'me' or a simulated user of the federated population"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="typing"):
            yield Static("", id="profile")
            # a message is at most MAX_MESSAGE_CHARS (the device stores no more): a 1 MB paste is cut there,
            # so the Input itself (which re-measures its whole value per key) stays fast
            yield MessageInput(placeholder="Type here: Tab accepts the centre suggestion, Enter sends", id="text",
                        max_length=MAX_MESSAGE_CHARS, on_change=self.typed)
            yield SuggestionStrip(id="suggestions")
            yield StatsBar(id="stats")
            with Vertical(id="learn-panel"):
                yield ProgressBar(id="learn-progress", show_eta=False)
                yield Static("", id="learn-result")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.typing = TypingSession(self.app.session.predictor, max_chars=MAX_MESSAGE_CHARS)
        self.query_one("#learn-progress").display = False
        self.query_one(Input).cursor_blink = self.app.cursor_blink
        self.query_one(Input).focus()
        self._added = []
        self._note_incognito("")
        self.refresh_all()

    # -- display -----------------------------------------------------------------------
    def refresh_all(self) -> None:
        """The profile changed or the model changed: resync and redraw everything."""
        s = self.app.session
        self.typing.predictor = s.predictor
        self.typing.resync()
        self.query_one(SuggestionStrip).show(self.typing.suggestions)
        self.sub_title = s.user_id
        who = "simulated user" if s.simulated else "you"
        info = s.delta_info()
        try:
            counts = f"history {len(s.device.history())} messages  ·  personal words {len(s.device.personal_words())}"
        except (OSError, FedkbError) as e:  # a history or words file that cannot be read (any more): said, not a crash
            counts = "history and personal words cannot be read"
            self.app.notify(str(e), severity="error", timeout=8, markup=False)
        line = f"Profile [b]$user[/b] ($who)  ·  $counts"
        if info.get("after"):
            line += f"  ·  last learn: {_summary(info['before'])} → {_summary(info['after'])}"
            line += " on $eval_on" if "eval_on" in info else ""
        # the values are text, never markup: delta.json's eval_on was markup (a crash at "[/b]", a click action)
        self.query_one("#profile", Static).update(Content.from_markup(
            line, user=s.user_id, who=who, counts=counts, eval_on=info.get("eval_on", "")))
        self.show_stats()
        if s.delta_error:
            self.app.notify(s.delta_error, severity="warning", timeout=8, markup=False)

    def show_stats(self) -> None:
        s = self.app.session
        self.query_one(StatsBar).show(self.typing.shown_stats(), s.label, s.user_id, s.incognito)

    # -- typing ------------------------------------------------------------------------
    def _device_write(self, write, what: str):
        """`write()` to the device folder; a full disk or a folder that cannot be written is a
        notification, not a crash of the app (it was a traceback, and the message was gone)."""
        try:
            return write()
        except (OSError, FedkbError) as e:
            self.notify(f"{what} not saved on this device: {e}", severity="error", timeout=8, markup=False)
            return None

    def _note_incognito(self, text: str) -> None:
        """A message is private if incognito was on at any moment while it was typed, even if it is off
        by Enter: it is not stored, and none of its words become personal words (those it added before
        incognito came on are taken back).  An empty box starts a new message."""
        s = self.app.session
        if not text:
            self._added = []
        private = s.incognito or (self.private and bool(text))
        if private and self._added:
            try:
                s.take_back_personal_words(self._added)
            except (OSError, FedkbError) as e:
                self.notify(f"the personal words this message added could not be taken back: {e}", severity="error",
                            timeout=8, markup=False)
            self._added = []
            self.typing.resync()
            self.query_one(SuggestionStrip).show(self.typing.suggestions)
        self.private = private
        self.set_class(private, "incognito")

    def typed(self, value: str, cursor: int | None = None) -> None:
        """Every change of the text or move of the cursor (MessageInput calls this directly: see its docstring)."""
        self._note_incognito(value)
        if value is self.typing.text and cursor == self.typing.cursor:
            return  # nothing new (the cursor reported after an accept)
        update = self.typing.update(value, cursor)
        if update.edited:  # punctuation took the place of the space an accept added
            self.query_one(MessageInput).set_text(update.text, update.cursor)
        if update.new_words and not self.private:
            added = self._device_write(lambda: self.app.session.add_personal_words(update.new_words),
                                       "new personal words")
            if added:
                self._added = self._added + added
                self.typing.resync()
        self.query_one(SuggestionStrip).show(self.typing.suggestions)
        self.show_stats()

    @on(Input.Submitted, "#text")
    def send(self, event: Input.Submitted) -> None:
        text = self.typing.text
        if text.strip():
            if self.private:
                self.notify("incognito: message not stored", timeout=2)
            elif self._device_write(lambda: self.app.session.finish_message(text), "the message") is None:
                return  # kept in the box, to send again
        self.typing.finish()
        inp = self.query_one(Input)
        inp.value = ""
        self._note_incognito("")
        self.query_one(SuggestionStrip).show(self.typing.suggestions)
        self.show_stats()

    def action_accept(self, rank: int) -> None:
        inp = self.query_one(MessageInput)
        if inp.value != self.typing.text or inp.cursor_position != self.typing.cursor:
            self.typed(inp.value, inp.cursor_position)  # a change still queued: accept at the text as it is
        try:
            update = self.typing.accept(rank)
        except MessageFull as e:  # the input's max_length, which a value set in code would bypass
            self.notify(str(e), severity="warning", markup=False)
            return
        if update is None:
            return
        inp.set_text(update.text, update.cursor)
        self.query_one(SuggestionStrip).show(self.typing.suggestions)
        self.show_stats()

    @on(SuggestionStrip.Picked)
    def picked(self, event: SuggestionStrip.Picked) -> None:
        self.action_accept(event.rank)

    # -- controls ----------------------------------------------------------------------
    def action_forget(self, word: str | None = None) -> None:
        word = word or (self.typing.suggestions[0] if self.typing.suggestions else None)
        if not word:
            self.notify("no suggestion to forget", severity="warning")
            return
        # blocked for the rest of this session in any case: in incognito, and where the write fails
        stored = self._device_write(lambda: self.app.session.forget(word), f"forgetting {word!r}")
        self.typing.refresh()
        self.query_one(SuggestionStrip).show(self.typing.suggestions)
        if stored:
            later = "; the personal model unlearns it at the next Learn now" if self.app.session.has_delta else ""
            self.notify(f"'{word}' will not be suggested again on this device{later}", timeout=3, markup=False)
        elif stored is not None:
            self.notify(f"incognito: '{word}' will not be suggested again in this session", timeout=3, markup=False)

    def action_incognito(self) -> None:
        self.app.action_incognito()

    def incognito_changed(self) -> None:
        """Incognito was turned on or off (`app.action_incognito`)."""
        self._note_incognito(self.query_one(MessageInput).value)
        self.show_stats()

    def action_learn(self) -> None:
        s = self.app.session
        if s.incognito:
            self.notify("incognito: nothing is learned", severity="warning")
            return
        try:
            history = s.device.history()
        except (OSError, FedkbError) as e:  # a history file that cannot be read
            self.notify(f"nothing is learned: {e}", severity="error", markup=False)
            return
        if not history:
            self.notify("nothing to learn from yet: type and send (Enter) a few messages first", severity="warning")
            return
        self.stop_learning()
        bar = self.query_one("#learn-progress", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self.query_one("#learn-result", Static).update("Learning on this device…")
        self._learner = LearnerProcess(s)
        self.learn(self._learner)

    @property
    def learning(self) -> bool:
        """A "Learn now" is under way."""
        return self._learner is not None

    def stop_learning(self) -> LearnerProcess | None:
        """End a running "Learn now" (another profile, clearing the device, incognito), and say so on the
        panel; returns its process (None: none ran), whose exit a caller that removes the device folder
        waits for (`stop(wait=S)`, from a worker thread: it can take seconds)."""
        learner, self._learner = self._learner, None
        self.workers.cancel_group(self, "learn")  # first: its worker then says nothing ("Learning failed: ... stopped")
        if learner is not None:
            learner.stop()
            self.query_one("#learn-progress").display = False
            self.query_one("#learn-result", Static).update("Learning stopped.")
        return learner

    def on_unmount(self) -> None:
        if self._learner is not None:  # the app quits (its widgets may be gone: nothing to say)
            self._learner.stop()

    @work(thread=True, exclusive=True, group="learn")
    def learn(self, learner: LearnerProcess) -> None:
        """Fine-tune in a process of its own (keyboard/learner.py); this worker thread only waits for it and
        relays its progress. The live model changes only in `_learned`, on the UI thread."""
        worker = get_current_worker()
        bar = self.query_one("#learn-progress", ProgressBar)

        def on_step(step: int, total: int, loss: float) -> None:
            if not worker.is_cancelled:
                self.app.call_from_thread(bar.update, total=total, progress=step)

        try:
            result = learner.run(on_step=on_step)
        except (FedkbError, OSError) as e:  # OSError: the process could not be started
            if not worker.is_cancelled:
                self.app.call_from_thread(self._learn_failed, str(e))
            return
        # the new personal model made ready here (the delta read, the word table composed), so that
        # only the swap to it is on the UI thread; a delta that cannot be used is said in delta_error
        try:
            ready = self.app.session.ready()
        except FedkbError as e:  # the device's words file is damaged: the delta stays on disk, unused
            ready = e
        if not worker.is_cancelled:
            self.app.call_from_thread(self._learned, learner, result, ready)
        del ready
        release_free_memory()  # the arrays swapped out were built in this thread's malloc arena: hand them back

    def _learn_failed(self, why: str) -> None:
        self.query_one("#learn-progress").display = False
        self.query_one("#learn-result", Static).update(Content.from_markup("[b]Learning failed:[/b] $why", why=why))

    def _learned(self, learner: LearnerProcess, result, ready) -> None:
        s = self.app.session
        if learner is not self._learner or s.user_id != learner.user_id:
            return  # stopped, or another profile by now: the delta stays on its own device
        self._learner = None
        try:
            if isinstance(ready, FedkbError):
                raise ready
            s.install(ready)  # the delta the process wrote, on top of the global model in use now
        except (FedkbError, OSError) as e:  # OSError: the simulated user's folder cannot be laid out again
            self._learn_failed(str(e))
            return
        if s.delta_error:
            self._learn_failed(s.delta_error)
            return
        self.query_one("#learn-progress").display = False
        self.query_one("#learn-result", Static).update(Content.from_markup(
            f"Learned from {result.messages} messages in {result.seconds:.1f}s. On $eval_on: "
            f"before {_summary(result.before)}  →  after [b]{_summary(result.after)}[/b]", eval_on=result.eval_on))
        self.refresh_all()
        self.app.post_message(self.app.Learned(result))
