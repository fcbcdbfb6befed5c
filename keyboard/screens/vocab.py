"""The vocabulary timeline screen: which words federated discovery added, round by round.

A DataTable of the rounds that added words (votes per word, vocabulary version
and size, held-out OOV rate, TrieHH epsilon), a search box ("when was WORD
added?": typing filters the table, Enter answers), and Sparklines of the
vocabulary size and the OOV rate per round.  Reads `RUN/vocab.jsonl`
(federation.vocab_history); `ctrl+r` reloads it while a simulation is running.
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Sparkline, Static

from federation import vocab_history as vh
from models.errors import FedkbError

# where `fedkb simulate` puts runs by default (runs/ of the working directory or of the repository)
RUNS_DIRS = [Path("runs"), Path(__file__).resolve().parents[2] / "runs"]


def latest_run(roots=None) -> Path | None:
    """The run folder whose vocab.jsonl changed last, under any of `roots` (default RUNS_DIRS)."""
    found = [p for root in (roots if roots is not None else RUNS_DIRS) if Path(root).is_dir()
             for p in Path(root).glob(f"*/{vh.FILE}")]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def _fmt_eps(rec: dict) -> str:
    if "epsilon_run" not in rec:
        return "-"
    return "none" if rec["epsilon_run"] is None else f"{rec['epsilon_run']:.2f}"


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
                self.rows = vh.timeline(self.run_dir)
            except FedkbError as e:
                self.rows = []
                summary.update(str(e))
        if self.rows:
            first, last = self.rows[0], self.rows[-1]
            n_added = sum(len(r.get("added", [])) for r in self.rows)
            summary.update(f"{self.run_dir}: {n_added} words added in {last['round']} rounds; "
                           f"vocabulary {first['vocab_size']} -> {last['vocab_size']} words "
                           f"(version {last['vocab_version']}); OOV {first.get('oov_rate') or 0:.2f}% -> "
                           f"{last.get('oov_rate') or 0:.2f}%")
        sizes = [float(r["vocab_size"]) for r in self.rows]
        oovs = [float(r["oov_rate"]) for r in self.rows if r.get("oov_rate") is not None]
        self.query_one("#size-spark", Sparkline).data = sizes
        self.query_one("#oov-spark", Sparkline).data = oovs
        if sizes:
            self.query_one("#size-label", Static).update(f"vocabulary size per round ({int(sizes[0])} -> {int(sizes[-1])})")
        if oovs:
            self.query_one("#oov-label", Static).update(f"held-out OOV rate per round ({oovs[0]:.2f}% -> {oovs[-1]:.2f}%)")
        self._fill(self.query_one(Input).value)

    def _fill(self, query: str) -> None:
        table = self.query_one(DataTable)
        table.clear()
        query = query.strip().lower()
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
                          ", ".join(f"{a['word']} ({a['votes']})" for a in added), key=str(r["round"]))

    # -- search -------------------------------------------------------------------------
    @on(Input.Changed, "#vocab-search")
    def _filter(self, event: Input.Changed) -> None:
        self._fill(event.value)

    @on(Input.Submitted, "#vocab-search")
    def _answer(self, event: Input.Submitted) -> None:
        word = event.value.strip().lower()
        answer = self.query_one("#vocab-answer", Static)
        if not word or not self.rows:
            answer.update("")
            return
        rec = next((r for r in self.rows if any(a["word"] == word for a in r.get("added", []))), None)
        if rec is None:
            answer.update(f"'{word}' was never added (rounds 0-{self.rows[-1]['round']})")
            return
        votes = next(a["votes"] for a in rec["added"] if a["word"] == word)
        answer.update(f"'{word}' was added in round {rec['round']} (vocabulary version {rec['vocab_version']}, "
                      f"{votes} users voted)")
        table = self.query_one(DataTable)
        table.move_cursor(row=table.get_row_index(str(rec["round"])))
