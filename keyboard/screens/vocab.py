"""The vocabulary timeline screen: which words federated discovery added, round by round.

A DataTable of the rounds that added words (votes per word, vocabulary version
and size, held-out OOV rate, TrieHH epsilon), a search box ("when was WORD
added?": typing filters the table, Enter answers), and Sparklines of the
vocabulary size and the OOV rate per round.  Reads `RUN/vocab.jsonl`
(federation.vocab_history); `ctrl+r` reloads it while a simulation is running.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input, Sparkline, Static
from textual.widgets.data_table import RowDoesNotExist

from federation import vocab_history as vh
from keyboard.commands.vocab import added_text, answer_text
from keyboard.commands.vocab import answer as vocab_answer
from models.errors import FedkbError

# where `fedkb simulate` puts runs by default (runs/ of the working directory or of the repository)
RUNS_DIRS = [Path("runs"), Path(__file__).resolve().parents[2] / "runs"]
# a fill measures every row it adds (~1 ms each): a long timeline is filtered once typing in the search box
# pauses this long, not per key (a short one at once)
FILTER_DELAY_S = 0.2
FILTER_AT_ONCE_ROWS = 100


def latest_run(roots=None) -> Path | None:
    """The run folder whose vocab.jsonl changed last, under any of `roots` (default RUNS_DIRS)."""
    found = [p for root in (roots if roots is not None else RUNS_DIRS) if Path(root).is_dir()
             for p in Path(root).glob(f"*/{vh.FILE}")]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def _fmt_eps(rec: dict) -> str:
    if "epsilon_run" not in rec:
        return "-"
    return "none" if rec["epsilon_run"] is None else f"{rec['epsilon_run']:.2f}"


def _fmt_oov(rec: dict) -> str:
    """The held-out OOV rate, "-" where none was measured (a run without held-out users)."""
    return "-" if rec.get("oov_rate") is None else f"{rec['oov_rate']:.2f}%"


class VocabScreen(Screen):
    """Timeline of the global vocabulary of one simulation run."""

    DEFAULT_CSS = """
    VocabScreen #vocab-plots { height: 6; }
    VocabScreen .plot { width: 1fr; padding: 0 1; }
    VocabScreen Sparkline { height: 3; }
    VocabScreen #vocab-summary, VocabScreen #vocab-answer { padding: 0 1; }
    VocabScreen DataTable { height: 1fr; }
    """

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="vocab-back", tooltip="Back to the previous screen"),
        Binding("ctrl+r", "reload", "Reload", id="vocab-reload", tooltip="Re-read the run's vocab.jsonl"),
    ]

    def __init__(self, run_dir: Path | None = None, **kwargs):
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir) if run_dir is not None else latest_run()
        self.rows: list[dict] = []
        self._pending: Timer | None = None  # the filter waiting for a pause in the typing

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="vocab-summary")
        with Horizontal(id="vocab-plots"):
            with Vertical(classes="plot"):
                yield Static("vocabulary size per round", id="size-label")
                yield Sparkline([], id="size-spark")
            with Vertical(classes="plot"):
                yield Static("held-out OOV rate per round", id="oov-label")
                yield Sparkline([], id="oov-spark")
        yield Input(placeholder="When was WORD added? Type to filter, Enter to answer", id="vocab-search")
        yield Static("", id="vocab-answer")
        yield DataTable(id="vocab-table", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("round", "version", "size", "OOV %", "epsilon", "words added (votes)")
        self.action_reload()

    # -- data ---------------------------------------------------------------------------
    def action_reload(self) -> None:
        summary = self.query_one("#vocab-summary", Static)
        if self.run_dir is None:
            self.rows = []
            summary.update("No run with a vocabulary history yet: run `fedkb simulate --discover`.")
        else:
            try:
                self.rows = vh.timeline(self.run_dir)  # committed rounds only
            except FedkbError as e:
                self.rows = []
                summary.update(Content(str(e)))  # names a path: plain text, not markup
        if self.rows:
            first, last = self.rows[0], self.rows[-1]
            n_added = sum(len(r.get("added", [])) for r in self.rows)
            summary.update(Content(f"{self.run_dir}: {n_added} words added in {last['round']} rounds; "
                                   f"vocabulary {first['vocab_size']} -> {last['vocab_size']} words "
                                   f"(version {last['vocab_version']}); OOV {_fmt_oov(first)} -> {_fmt_oov(last)}"))
        sizes = [float(r["vocab_size"]) for r in self.rows]
        oovs = [float(r["oov_rate"]) for r in self.rows if r.get("oov_rate") is not None]
        self.query_one("#size-spark", Sparkline).data = sizes
        self.query_one("#oov-spark", Sparkline).data = oovs
        if sizes:
            self.query_one("#size-label", Static).update(f"vocabulary size per round ({int(sizes[0])} -> {int(sizes[-1])})")
        if oovs:
            self.query_one("#oov-label", Static).update(f"held-out OOV rate per round ({oovs[0]:.2f}% -> {oovs[-1]:.2f}%)")
        self._cancel_filter()
        self._fill(self.query_one(Input).value)

    def _fill(self, query: str) -> None:
        table = self.query_one(DataTable)
        table.clear()
        query = vh.normalize_word(query)
        for r in self.rows:
            added = r.get("added", [])
            if query:
                if not any(query in a["word"] for a in added):
                    continue
            elif not added and r is not self.rows[0]:
                continue
            oov = r.get("oov_rate")
            table.add_row(str(r["round"]), str(r["vocab_version"]), str(r["vocab_size"]),
                          "-" if oov is None else f"{oov:.2f}", _fmt_eps(r),
                          Text(added_text(r)), key=str(r["round"]))  # words from a file: not markup

    # -- search -------------------------------------------------------------------------
    @on(Input.Changed, "#vocab-search")
    def _filter(self, event: Input.Changed) -> None:
        self._cancel_filter()
        if len(self.rows) <= FILTER_AT_ONCE_ROWS:
            self._fill(event.value)
        else:  # thousands of rounds: seconds per fill
            self._pending = self.set_timer(FILTER_DELAY_S, self._filtered)

    def _filtered(self) -> None:
        self._pending = None
        self._fill(self.query_one(Input).value)

    def _cancel_filter(self) -> bool:
        """Stop the filter waiting, if any; True if there was one."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.stop()
        return pending is not None

    @on(Input.Submitted, "#vocab-search")
    def _answer(self, event: Input.Submitted) -> None:
        if self._cancel_filter():  # a filter still waiting: the table as typed, before its cursor is moved
            self._fill(event.value)
        answer = self.query_one("#vocab-answer", Static)
        if not vh.normalize_word(event.value) or not self.rows or self.run_dir is None:
            answer.update("")
            return
        try:
            ans = vocab_answer(self.run_dir, event.value)
        except FedkbError as e:  # the file changed since the table was read
            answer.update(Content(str(e)))
            return
        answer.update(Content(answer_text(ans)))  # the word is the user's: plain text, never markup
        if ans["added"] or ans.get("base_vocabulary"):
            table = self.query_one(DataTable)
            with contextlib.suppress(RowDoesNotExist):  # a round the table does not show
                table.move_cursor(row=table.get_row_index(str(ans["round"])))
