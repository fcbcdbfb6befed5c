"""The profiles screen: choose "me" or a simulated user; see how the model does on their future text."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import get_current_worker

from keyboard.session import ME
from models.errors import FedkbError


def _row(summary: dict | None) -> str:
    if not summary:
        return "—"
    return f"top-1 {summary['top1']:5.1f}%   top-3 {summary['top3']:5.1f}%   KSR {summary['ksr']:5.1f}%   OOV {summary['oov_rate']:4.1f}%"


class ProfilesScreen(Screen[str]):
    """A table of profiles; Enter opens one (dismisses with its id)."""

    BINDINGS = [
        Binding("escape", "back", "Back", id="profiles-back", tooltip="Back to typing, profile unchanged"),
        Binding("enter", "choose", "Open", id="profiles-open", tooltip="Type as the highlighted profile"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="profiles"):
            yield DataTable(id="profile-table", cursor_type="row", zebra_stripes=True)
            with Vertical(id="profile-panel"):
                yield Static("", id="profile-title")
                yield Static("", id="profile-eval")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "profiles"
        table = self.query_one(DataTable)
        table.add_columns("profile", "history", "future")
        s = self.app.session
        history = "·"
        if s.user_id == ME:
            try:
                history = str(len(s.device.history()))
            except (OSError, FedkbError) as e:  # a history file that cannot be read (any more)
                history = "?"
                self.notify(str(e), severity="error", markup=False)
        table.add_row(ME, history, "—", key=ME)
        try:
            users = s.users()
        except FedkbError as e:
            users = {}
            self.notify(str(e), severity="error", markup=False)
        if ME in users:  # "me" is the person at this terminal: a simulated user of that id cannot be opened
            users = {uid: u for uid, u in users.items() if uid != ME}
            self.notify(f"the users file's user {ME!r} is not listed: {ME!r} is the person at this terminal",
                        severity="warning", markup=False)
        for uid, u in users.items():  # ids from a file: text, never markup
            table.add_row(Text(uid), str(len(u.history)), str(len(u.future)), key=uid)
        if s.user_id in users or s.user_id == ME:
            table.move_cursor(row=table.get_row_index(s.user_id))
        table.focus()

    @on(DataTable.RowHighlighted)
    def highlighted(self, event: DataTable.RowHighlighted) -> None:
        uid = event.row_key.value
        title = self.query_one("#profile-title", Static)
        panel = self.query_one("#profile-eval", Static)
        if uid == ME:
            title.update("[b]me[/b]: the person at this terminal")
            panel.update("Your own typing. 'Learn now' on the typing screen measures on your typed history.")
            return
        title.update(Content.from_markup("[b]$uid[/b]: a simulated user of the federated population", uid=uid))
        panel.update("Measuring the current model on this user's held-out future text…")
        self.evaluate(uid)

    @work(thread=True, exclusive=True, group="profile-eval")
    def evaluate(self, uid: str) -> None:
        worker = get_current_worker()
        try:
            out = self.app.session.evaluate_user(uid)
        except (FedkbError, OSError) as e:  # OSError: a device folder that cannot be read or laid out
            text = Content.from_markup("[b]cannot evaluate:[/b] $e", e=str(e))  # a path in it is text, not markup
        else:
            label = self.app.session.label.replace(" + personal delta", "")
            text = Content.from_markup(
                f"Held-out future text: {out['messages']} messages ({out['global']['words']} words); "
                f"history {out['history']} messages.\n\n"
                f"[b]$label[/b]\n  {_row(out['global'])}\n"
                f"[b]$label + this device's personal delta[/b]\n  {_row(out['personal'])}", label=label)
        if not worker.is_cancelled:
            self.app.call_from_thread(self._show_eval, uid, text)

    def _show_eval(self, uid: str, text: Content) -> None:
        table = self.query_one(DataTable)
        if table.row_count and table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == uid:
            self.query_one("#profile-eval", Static).update(text)

    def action_choose(self) -> None:
        table = self.query_one(DataTable)
        if table.row_count:
            self.dismiss(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    @on(DataTable.RowSelected)
    def selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(event.row_key.value)

    def action_back(self) -> None:
        self.dismiss(None)
