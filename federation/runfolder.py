"""A run folder's layout and its committed state, read without torch (federation/run.py writes it).

The keyboard's process follows a live run from these (keyboard/federator.py) and never imports
torch; federation/run.py and federation/report.py use the same names and readers.
"""

from __future__ import annotations

import json
from pathlib import Path

from models import atomic
from models.jsonvalues import is_int

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LATEST = "latest.json"
DISCOVERY_KEY = "discovery_theta"  # config.json: the TrieHH threshold the run discovers words with, or null


def checkpoint_dir(run_dir: Path, rnd: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{rnd:04d}"


def numbered_metrics(run_dir: Path) -> list[tuple[int, dict]]:
    """(line number, line) of each metrics line of a run, read as `atomic.read_jsonl` reads: a torn
    last line, a blank one, or a line without an integer round is skipped."""
    return [(n, obj) for n, obj in atomic.read_jsonl_numbered(Path(run_dir) / METRICS)
            if isinstance(obj, dict) and is_int(obj.get("round"))]


def read_metrics(run_dir: Path) -> list[dict]:
    """The metrics lines of a run (a torn last line, or a line without an integer round, is skipped)."""
    return [m for _, m in numbered_metrics(run_dir)]


def latest_round(run_dir: Path) -> int | None:
    """The last committed round, from latest.json; None if it is missing, unreadable or names no
    possible round (not a whole number >= 0)."""
    try:
        r = json.loads((Path(run_dir) / LATEST).read_text())["round"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return r if is_int(r) and r >= 0 else None
