"""Command-palette provider: the keyboard's controls, context-aware (forget one of the words shown now)."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider


class KeyboardCommands(Provider):
    def _commands(self) -> list[tuple[str, object, str]]:
        app = self.app
        s = app.session
        cmds = [
            ("Learn now", app.action_learn, "Fine-tune a personal model on this device's typed history"),
            (f"Incognito: turn {'off' if s.incognito else 'on'}", app.action_incognito,
             "Nothing typed is stored and nothing is learned while on"),
            ("Clear all learned data", app.action_clear, f"Delete the history, personal words and personal model of '{s.user_id}'"),
            ("Profiles", app.action_profiles, "Choose 'me' or a simulated user"),
        ]
        for word in app.current_suggestions():
            cmds.append((f"Forget '{word}'", partial(app.action_forget, word), "Never suggest this word again on this device"))
        for name, (label, help_) in app.extra_screens().items():
            cmds.append((label, partial(app.push_extra, name), help_))
        return cmds

    async def discover(self) -> Hits:
        for name, cb, help_ in self._commands():
            yield DiscoveryHit(name, cb, help=help_)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, cb, help_ in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), cb, help=help_)
