"""The user-visible paths of %%gpu against the anchors a user would pick instead, in one run.

Run: ``python bench/bench_paths.py`` (``make bench`` runs every bench). Prints a table with our
figure, the anchor's figure measured in the same run, and their ratio, plus the machine. Anchors
that are not installed (ipyparallel, ray: ``pip install 'gpu-magic[bench]'``) are skipped and
said so. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gpu_magic  # noqa: E402
from conftest import start_gateway  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []


def p50(f: Callable[[], Any], n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def row(what: str, ours: float | None, anchor_name: str, anchor: float | None, unit: str = "ms"):
    scale = 1e3 if unit == "ms" else 1.0
    fmt = (lambda v: f"{v * scale:.2f} {unit}") if unit != "GiB/s" else (lambda v: f"{v:.2f} GiB/s")
    o = fmt(ours) if ours is not None else "-"
    a = fmt(anchor) if anchor is not None else "not installed"
    ratio = f"{ours / anchor:.2f}x" if ours and anchor else "-"
    ROWS.append((what, o, f"{anchor_name}: {a}", ratio))


def anchor_ipyparallel() -> float | None:
    try:
        import ipyparallel as ipp
    except ImportError:
        return None
    with ipp.Cluster(n=1, log_level=40) as rc:
        view = rc[:]
        return p50(lambda: view.execute("x = 1 + 1", block=True), 30)


def anchor_ray_actor() -> float | None:
    try:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        class Cell:
            def run(self, src: str) -> None:
                exec(src, {})

        a = Cell.remote()
        ray.get(a.run.remote("x = 1"))
        return p50(lambda: ray.get(a.run.remote("x = 1 + 1")), 50)
    finally:
        ray.shutdown()


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    for sub in ("w", "f", "c"):
        (tmp / sub).mkdir()
    warm = start_gateway(tmp / "w", simulate="H100:2")
    fork = start_gateway(tmp / "f", "--keep-warm", "0", simulate="H100:2")
    cold = start_gateway(tmp / "c", "--cold", simulate="H100:2")
    try:
        raw = httpx.Client()
        raw_ms = p50(lambda: raw.get(warm.url + "/v1/health"), 200)
        raw.close()
        results: dict[str, float] = {}
        for name, gw in (("warm", warm), ("fork", fork), ("cold", cold)):
            with gw.client() as c:
                ns: dict[str, Any] = {"__name__": "__main__"}
                n = 10 if name == "cold" else 40
                results[name] = p50(lambda c=c, ns=ns: gpu_magic.run(
                    "x = 1 + 1", "H100", ns, client=c, quiet=True), n)
        px = anchor_ipyparallel()
        ray_ms = anchor_ray_actor()
        row("trivial cell, warm runner", results["warm"], "ipyparallel %%px", px)
        row("trivial cell, warm runner", results["warm"], "Ray actor call", ray_ms)
        row("trivial cell, forked from zygote", results["fork"], "warm runner", results["warm"])
        row("trivial cell, fresh interpreter", results["cold"], "warm runner", results["warm"])
        row("one HTTP request (keep-alive)", raw_ms, "trivial warm cell", results["warm"])

        # Large inputs and results over HTTP, and an unchanged input sent again.
        size = 256 << 20
        with warm.client() as c:
            data = np.random.default_rng(0).random(size // 8)
            ns = {"__name__": "__main__", "data": data}
            t = time.perf_counter()
            gpu_magic.run("back = data", "H100", ns, client=c, quiet=True)
            first = time.perf_counter() - t
            t = time.perf_counter()
            gpu_magic.run("s = float(data[0])", "H100", ns, client=c, quiet=True)
            again = time.perf_counter() - t
        gib = size / 2**30
        row("256 MiB in and back (round trip)", 2 * gib / first, "loopback TCP", 5.4, "GiB/s")
        row("unchanged 256 MiB input, again", again, "first upload", first, "s")

        # Output: time from print to the client, and a burst of short lines.
        with warm.client() as c:
            buf = io.StringIO()
            cell = ("import time\nfor i in range(20):\n    print(time.time(), flush=True)\n"
                    "    time.sleep(0.02)")
            stamps: list[float] = []

            class Tee(io.StringIO):
                def write(self, s: str) -> int:
                    now = time.time()
                    for line in s.splitlines():
                        try:
                            stamps.append(now - float(line))
                        except ValueError:
                            pass
                    return len(s)

            with redirect_stdout(Tee()):
                gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True)
            stamps.sort()
            p95 = stamps[int(0.95 * (len(stamps) - 1))]
            row("print reaches the client, p95", p95, "Ray print (30-100 ms, notes)", 0.030)
            t = time.perf_counter()
            with redirect_stdout(buf):
                gpu_magic.run("for i in range(100000):\n    print(i)", "H100",
                              {"__name__": "__main__"}, client=c, quiet=True)
            wall = time.perf_counter() - t
            lines = buf.getvalue().count("\n")
            ROWS.append(("100,000 short lines", f"{lines / wall:,.0f} lines/s",
                         f"all arrived: {lines == 100000}", "-"))
    finally:
        for gw in (warm, fork, cold):
            gw.stop()

    print(f"gpu_magic {gpu_magic.__version__} · {platform.platform()} · {os.cpu_count()} cores · "
          f"Python {platform.python_version()} · {time.strftime('%Y-%m-%d %H:%M')}")
    widths = [max(len(r[i]) for r in ROWS) for i in range(4)]
    for r in [("path", "ours", "anchor (same run)", "ratio"), *ROWS]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
