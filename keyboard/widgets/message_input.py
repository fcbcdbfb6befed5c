"""The message input: an Input whose pastes become one line, cut to the room left instead of being refused."""

from __future__ import annotations

import re

from textual import events
from textual.widgets import Input

# a terminal escape sequence (colours, cursor moves: ESC [ ... letter, or ESC and one character): dropped
_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # any other control character (tab, NUL, a lone ESC): a space


def paste_line(text: str) -> str:
    """A paste as one line of a message: lines joined by a space (blank ones dropped, each stripped where
    there are several), a line ending dropped, escape sequences dropped, other control characters spaces."""
    lines = [line for line in _ESCAPE.sub("", text).splitlines() if line.strip()]
    line = " ".join(part.strip() for part in lines) if len(lines) > 1 else "".join(lines)
    return _CONTROL.sub(" ", line)


class MessageInput(Input):
    """Input with `max_length`: a paste longer than the room left is truncated (and says so).

    A message is one line, so a multi-line paste has its lines joined by spaces (Input's own
    handler keeps only the first line, silently), and control characters never reach it (`paste_line`).

    `on_change(value, cursor)` is called from the input's own message handler, so a keystroke
    reaches the typing logic without `Input.Changed` bubbling through the containers to
    the screen (each hop is another turn of a message queue: ~8 ms p50 per keystroke here).
    It is called too when the cursor moves without a change of text (arrows, home, a click),
    as the suggestions are for the word at the cursor.
    """

    def __init__(self, *args, on_change=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_change = on_change
        self._reported: str | None = None  # the value last handed to on_change (or written by set_text)
        self._written: str | None = None  # the value set_text wrote

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.on_change is not None and event.input is self:
            event.stop()
            value = self.value
            if event.value is not value and value is self._written:
                return  # a change from before the text the typing logic wrote (an accept), which saw it
            # the cursor where this value had it: changes still queued behind this one (fast typing) moved
            # it since, but left the text after it as it was, so its distance from the end holds
            cursor = max(0, len(event.value) - (len(value) - self.cursor_position))
            self._reported = event.value
            self.on_change(event.value, cursor)

    def watch_selection(self, selection) -> None:  # after Input's own _watch_selection
        """The cursor moved, the text as last reported: the suggestions follow it.  (A move that
        comes with a change of text is reported with that change, by on_input_changed.)"""
        if self.on_change is not None and self.value is self._reported and selection.start == selection.end:
            self.on_change(self.value, selection.end)

    def set_text(self, value: str, cursor: int) -> None:
        """Show the text and cursor the typing logic made (an accept): not handed back to on_change.
        Bypasses max_length: the typing logic keeps to it (TypingSession.max_chars)."""
        self._reported = None
        with self.prevent(Input.Changed):
            self.value = value
        self.cursor_position = cursor
        self._reported = self._written = self.value

    def _on_paste(self, event: events.Paste) -> None:
        event.stop()
        event.prevent_default()  # else Input._on_paste runs after this one and inserts the paste again
        line = paste_line(event.text)
        start, end = sorted(self.selection)
        room = (self.max_length or len(line)) - (len(self.value) - (end - start))
        if len(line) > room:
            line = line[: max(room, 0)]
            self.notify(f"message limited to {self.max_length:,} characters: the paste was cut", severity="warning")
        if not line:
            return
        if start == end:
            self.insert_text_at_cursor(line)
        else:
            self.replace(line, start, end)
