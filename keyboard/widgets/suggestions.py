"""The suggestion strip: three words, the best in the centre (as Gboard shows them)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.events import Click
from textual.message import Message
from textual.widgets import Static

# slot on screen (left, centre, right) -> rank of the suggestion shown there (0 = best)
SLOT_RANK = (1, 0, 2)


class Suggestion(Static):
    """One clickable suggestion slot."""

    can_focus = False

    def __init__(self, slot: int):
        super().__init__("", id=f"suggestion-{slot}", classes="suggestion")
        self.slot = slot
        self.word = ""

    def on_click(self, event: Click) -> None:
        event.stop()
        if self.word:
            self.post_message(SuggestionStrip.Picked(SLOT_RANK[self.slot]))


class SuggestionStrip(Horizontal):
    """Shows up to 3 suggestions, best first in, best-in-the-centre on screen."""

    class Picked(Message):
        """A suggestion was clicked: `rank` 0 is the best."""

        def __init__(self, rank: int):
            super().__init__()
            self.rank = rank

    def compose(self) -> ComposeResult:
        for slot in range(3):
            yield Suggestion(slot)

    def show(self, words: list[str]) -> None:
        """`words` best first."""
        for slot, widget in enumerate(self.query(Suggestion)):
            rank = SLOT_RANK[slot]
            word = words[rank] if rank < len(words) else ""
            if word != widget.word:
                widget.word = word
                widget.update(word, layout=False)  # fixed size (app.tcss): no re-layout per keystroke
            widget.set_class(rank == 0, "best")

    @property
    def words(self) -> list[str]:
        """Best first, as last shown."""
        slots = {s.slot: s.word for s in self.query(Suggestion)}
        return [w for w in (slots[SLOT_RANK.index(r)] for r in range(3)) if w]
