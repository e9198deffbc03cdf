"""Load: many concurrent clients submitting many jobs to a simulated pool of 8 GPUs.

Run: ``python bench/bench_load.py [CLIENTS] [JOBS_PER_CLIENT]`` (default 50 × 20). Checks that
every job completes, none is lost or duplicated, no GPU is double-granted and every output line
arrives; reports throughput and p50/p95 latency. Not a test: figures are printed, never asserted.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_magic  # noqa: E402
from gpu_magic._client import GatewayClient  # noqa: E402

LINES = 5
CELL = """
import json, os, time
g = json.loads(os.environ["GPU_MAGIC_GRANT"])
locks = [os.path.join(LOCKDIR, f"{g['node']}-{i}") for i in g["indices"]]
fds = [os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY) for p in locks]
for i in range(LINES):
    print(f"{TAG} line {i}")
time.sleep(0.01)
for fd, p in zip(fds, locks):
    os.close(fd); os.unlink(p)
done = TAG
"""


_local = threading.local()


class _PerThread(io.TextIOBase):
    """sys.stdout that keeps each client thread's printed output apart."""

    def __init__(self, fallback: Any) -> None:
        self._fallback = fallback

    def write(self, text: str) -> int:
        return getattr(_local, "out", self._fallback).write(text)

    def flush(self) -> None:
        pass


def run_load(url: str, token: str, clients: int, jobs: int, lockdir: str) -> dict[str, Any]:
    """Every client runs ``jobs`` cells one after another; returns what happened."""
    latencies: list[float] = []
    problems: list[str] = []
    seen_tags: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with GatewayClient(url, token) as c:
            for j in range(jobs):
                tag = f"c{k}j{j}"
                ns: dict[str, Any] = {"__name__": "__main__", "LOCKDIR": lockdir, "TAG": tag,
                                      "LINES": LINES}
                t0 = time.perf_counter()
                try:
                    out = io.StringIO()
                    _local.out = out
                    gpu_magic.run(CELL, "any", ns, client=c, quiet=True)
                    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith(tag + " ")]
                    if lines != [f"{tag} line {i}" for i in range(LINES)]:
                        with lock:
                            problems.append(f"{tag}: output {lines!r}")
                    if ns.get("done") != tag:
                        with lock:
                            problems.append(f"{tag}: result {ns.get('done')!r}")
                except BaseException as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        problems.append(f"{tag}: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    seen_tags.append(tag)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    real, sys.stdout = sys.stdout, _PerThread(sys.stdout)  # type: ignore[assignment]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.stdout = real
    wall = time.perf_counter() - t0
    return {
        "jobs": clients * jobs,
        "completed": len(seen_tags),
        "duplicates": len(seen_tags) - len(set(seen_tags)),
        "problems": problems,
        "wall_s": wall,
        "throughput": len(seen_tags) / wall if wall else 0.0,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else None,
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clients", type=int, nargs="?", default=50, help="concurrent clients (50)")
    ap.add_argument("jobs", type=int, nargs="?", default=20, help="jobs each submits (20)")
    args = ap.parse_args()
    clients, jobs = args.clients, args.jobs
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import start_gateway

    tmp = Path(tempfile.mkdtemp())
    gw = start_gateway(tmp, simulate="H100:4,A100-80GB:4")
    lockdir = tmp / "locks"
    lockdir.mkdir()
    try:
        r = run_load(gw.url, gw.token, clients, jobs, str(lockdir))
    finally:
        gw.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load: {clients} clients x {jobs} jobs on a simulated pool of 8 GPUs")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}"
          f", {time.strftime('%Y-%m-%d')}")
    print(json.dumps({k: v for k, v in r.items() if k != "problems"}, indent=1))
    for p in r["problems"][:20]:
        print("problem:", p)


if __name__ == "__main__":
    main()
