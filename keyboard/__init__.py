"""The fedkb keyboard: Textual app, typing logic and the `fedkb` command line.

Textual repaints at most `TEXTUAL_FPS` times a second (default 60, read once
when Textual is imported), and a screen repaints on that timer once its message
queue is idle, so for a keyboard the frame period is part of every keystroke's
latency. Measured with bench/bench_tui_latency.py (key -> suggestion strip
repainted, p95): 60 fps 44 ms, 240 fps 22-24 ms, 500 fps 19 ms, 1000 fps 18 ms.
The timer only runs while something is dirty (an idle keyboard used no CPU at
1000 fps), so the keyboard asks for 1000 unless the user set it. This must run
before Textual is imported, hence here.
"""

import os

os.environ.setdefault("TEXTUAL_FPS", "1000")
