"""Run every benchmark in this folder, one after another (``make bench``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    failed = 0
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n=== {script.name} ===", flush=True)
        args = ["10", "10"] if script.name == "bench_load.py" and "--full" not in sys.argv else []
        failed |= subprocess.run([sys.executable, str(script), *args]).returncode
    raise SystemExit(failed)
