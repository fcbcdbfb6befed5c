"""The live stats bar: words typed, keystrokes saved (KSR), the model in use, incognito."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from keyboard.typing import LiveStats


class StatsBar(Static):
    def show(self, stats: LiveStats, model: str, user: str, incognito: bool) -> None:
        t = Text()
        t.append(f"{user}", style="bold")
        t.append("  ·  words ")
        t.append(str(stats.words), style="bold")
        t.append("  ·  keys saved ")
        t.append(f"{stats.keys_saved}", style="bold")
        t.append(f" (KSR {stats.ksr:.1f}%)")
        t.append("  ·  model ")
        t.append(model, style="bold")
        if incognito:
            t.append("  ·  ")
            t.append(" incognito ", style="reverse")
        self.update(t, layout=False)  # one fixed-height line (app.tcss): no re-layout per keystroke
