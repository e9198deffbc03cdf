"""%%gpu on a real NVIDIA GPU: torch cells, CUDA results, against the same work done in-process.

Run: ``python bench/bench_gpu.py`` on a machine with an NVIDIA GPU and torch (CUDA). It starts a
gateway over the machine's real pool (NVML) and measures: a trivial warm cell; a cell that
imports torch and first touches CUDA, on a new runner and then again on the same warm one; a
1 GiB tensor made on the GPU by a cell and received in the notebook (on the CPU); a 1 GiB CPU
tensor sent in, doubled on the GPU and received back. The anchors are the same torch work done
in this process, measured in the same run. Where NVML finds no GPU it runs on a simulated pool
with torch on the CPU and says so (a check of the script, not a GPU figure). Speed is measured
here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _table import add, show  # noqa: E402
from conftest import start_gateway  # noqa: E402

import gpu_magic  # noqa: E402
from gpu_magic.server.inventory import read_nvml  # noqa: E402


def timed(f: Callable[[], Any]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def median_of(f: Callable[[], Any], n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        f()
    return statistics.median(timed(f) for _ in range(n))


def row(what: str, ours: float, anchor_name: str, anchor: float, unit: str = "s") -> None:
    fmt = (lambda v: f"{v * 1e3:.2f} ms") if unit == "ms" else (lambda v: f"{v:.3f} s")
    add((what, fmt(ours), f"{anchor_name}: {fmt(anchor)}", f"{ours / anchor:.3g}x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="tensor size (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row (default: 3)")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("bench_gpu.py: skipped, torch is not installed (pip install torch)")
        return

    gpus = read_nvml()
    real = bool(gpus) and torch.cuda.is_available()
    dev = "cuda" if real else "cpu"
    n = int(args.gib * 2**30) // 4  # float32 elements
    tmp = Path(tempfile.mkdtemp())
    gw = start_gateway(tmp, simulate=None if real else "H100:1")
    try:
        with gw.client() as c:
            def cell(code: str, ns: dict[str, Any] | None = None) -> dict[str, Any]:
                ns = ns if ns is not None else {"__name__": "__main__"}
                gpu_magic.run(code, "any", ns, client=c, quiet=True)
                return ns

            # the first cell starts a runner (without torch); then torch's first import and
            # CUDA's first use on it, then the same cell again on that warm runner
            cell("x = 1 + 1")
            touch = (f"import torch\nx = torch.ones(1, device='{dev}')\n"
                     "name = torch.cuda.get_device_name(0) if x.is_cuda else 'cpu'")
            first = timed(lambda: cell(touch))
            second = median_of(lambda: cell(touch), args.rounds, warmup=0)
            row("cell importing torch + first CUDA use, second run", second, "its first run",
                first)
            trivial = median_of(lambda: cell("x = 1 + 1"), 50, warmup=5)
            with httpx.Client() as raw:
                request = median_of(lambda: raw.get(gw.url + "/v1/health"), 50, warmup=5)
            row("trivial cell, warm runner", trivial, "one HTTP request", request,
                "ms")

            # a result made on the GPU, and an input sent, doubled on the GPU and received
            # back: each cell's time to the names bound here (the same work in this process
            # is timed after the gateway stops: a CUDA context here would hold the GPU, and
            # the gateway waits for a GPU in use outside it)
            make = f"r = torch.ones({n}, device='{dev}')"
            made = median_of(lambda: cell("import torch\n" + make), args.rounds)
            data = torch.rand(n)
            ns = {"__name__": "__main__", "data": data}
            doubled = median_of(lambda: cell(f"back = data.to('{dev}') * 2", ns), args.rounds)
            assert bool((ns["back"] == data * 2).all()) and ns["back"].device.type == "cpu"
            name = cell(touch)["name"]
    finally:
        gw.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    local = median_of(lambda: torch.ones(n, device=dev).cpu(), args.rounds)
    row(f"{args.gib:g} GiB tensor made on the GPU, received here", made,
        "the same made and copied to host in-process", local)
    local = median_of(lambda: (data.to(dev) * 2).cpu(), args.rounds)
    row(f"{args.gib:g} GiB tensor in, doubled on the GPU, back", doubled,
        "the same in-process", local)

    show(f"{name} (real pool)" if real else "no GPU: simulated pool, torch on the CPU",
         f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
