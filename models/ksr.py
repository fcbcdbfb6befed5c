"""Keystroke savings rate, as Presage's `presage_simulator` defines it (torch-free).

    KSR = (1 - (keys typed + keys to select) / keys without prediction) x 100

Used by the offline evaluation (models/evaluate.py) and the keyboard's live
counter (keyboard/typing.py), which must not import torch.
"""

from __future__ import annotations


def keystroke_savings(keys_typed: int, keys_selected: int, keys_without: int) -> float:
    """KSR in %; 0.0 when nothing was typed (no keys, nothing saved)."""
    if keys_without <= 0:
        return 0.0
    return 100.0 * (1 - (keys_typed + keys_selected) / keys_without)
