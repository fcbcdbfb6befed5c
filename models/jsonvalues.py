"""Type checks for values read back from JSON files fedkb wrote (run and device folders).

`isinstance(True, int)` holds in Python, but no round, count or score fedkb writes is ever a
boolean: a `true` where a number belongs means the file was edited or damaged.
"""

from __future__ import annotations


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float (JSON does not tell them apart), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
