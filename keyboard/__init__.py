"""The fedkb keyboard: Textual app, typing logic and the `fedkb` command line.

Textual repaints at most `TEXTUAL_FPS` times a second (default 60, read once
when Textual is imported).  For a keyboard the repaint period is part of every
keystroke's latency: at 60 fps the suggestion strip appeared p50 39 ms / p95 44 ms
after a key, at 240 fps p50 19 / p95 22 ms (bench/bench_tui_latency.py), so the
keyboard asks for 240 unless the user set it.  This must run before Textual is
imported, hence here.
"""

import os

os.environ.setdefault("TEXTUAL_FPS", "240")
