"""The table each bench prints: every row as it is measured (on stderr: a run stopped part way
still shows what it got), then all of them under a line naming the machine."""

from __future__ import annotations

import os
import platform
import sys
import time

import gpu_magic

ROWS: list[tuple[str, str, str, str]] = []


def add(r: tuple[str, str, str, str]) -> None:
    ROWS.append(r)
    print(" | ".join(r), file=sys.stderr, flush=True)


def show(*facts: str) -> None:
    print(" · ".join([f"gpu_magic {gpu_magic.__version__}", *facts, platform.platform(),
                      f"{os.cpu_count()} cores", f"Python {platform.python_version()}",
                      time.strftime("%Y-%m-%d %H:%M")]))
    widths = [max(len(r[i]) for r in ROWS) for i in range(4)]
    for r in [("path", "ours", "anchor (same run)", "ratio"), *ROWS]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
