"""Scheduler: how long one schedule() call takes on a busy pool of 200 GPUs.

Run: ``python bench/bench_scheduler.py [--jobs N] [--seed S] [--max-queue Q] [--profile]``.

A simulated pool of 25 nodes with 8 GPUs each (7 of H100, 6 each of A100-80GB, L4 and T4) gets
10,000 jobs from 20 users: 1-3 options each (one of those types, the A100 family or ``any``),
counts 1, 2, 4 or 8, run lengths of 10-90 steps, arriving over time at about 95% of what the
pool can hold. As in the gateway, schedule() is called after every submit and after every job
end, with the whole queue. Time is a step counter; only schedule() itself is timed
(time.perf_counter_ns). Reported: decisions per second (grants / total time in schedule()), and
p50/p99 of the time one call takes. Not a test: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_magic._spec import GpuOption  # noqa: E402
from gpu_magic.server.inventory import Gpu, parse_simulated  # noqa: E402
from gpu_magic.server.scheduler import Request, feasibility, schedule  # noqa: E402

NODES = {"H100": 7, "A100-80GB": 6, "L4": 6, "T4": 6}  # nodes per type, 8 GPUs each
PER_NODE = 8
USERS = [f"user{i:02d}" for i in range(20)]
COUNTS, COUNT_WEIGHTS = (1, 2, 4, 8), (60, 20, 12, 8)
OPTION_TYPES = [*NODES, "A100", None]
RUN_STEPS = (10, 90)
LOAD = 0.95  # GPU demand as a share of the pool


def make_pool() -> list[Gpu]:
    parts = []
    n = 0
    for gtype, nodes in NODES.items():
        for _ in range(nodes):
            parts.append(f"{gtype}:{PER_NODE}@node{n:02d}")
            n += 1
    return parse_simulated(",".join(parts))


def make_jobs(n: int, rng: random.Random) -> list[tuple[int, str, tuple[GpuOption, ...], int]]:
    """(arrival step, user, options, run steps) for n jobs, arrivals spread to hit LOAD."""
    specs = []
    for _ in range(n):
        options: list[GpuOption] = []
        while len(options) < rng.randint(1, 3):
            opt = GpuOption(rng.choice(OPTION_TYPES), rng.choices(COUNTS, COUNT_WEIGHTS)[0])
            if opt not in options:
                options.append(opt)
        specs.append((rng.choice(USERS), tuple(options), rng.randint(*RUN_STEPS)))
    mean_gpus = statistics.fmean(o[0].count for _, o, _ in specs)  # the first option, mostly
    mean_run = statistics.fmean(r for _, _, r in specs)
    per_step = LOAD * PER_NODE * sum(NODES.values()) / (mean_gpus * mean_run)
    jobs = []
    t = 0.0
    for user, options, run in specs:
        t += rng.expovariate(per_step)
        jobs.append((int(t), user, options, run))
    return jobs


def simulate(n_jobs: int, seed: int, max_queue: int | None) -> dict[str, object]:
    rng = random.Random(seed)
    gpus = make_pool()
    jobs = make_jobs(n_jobs, rng)
    queue: list[Request] = []
    running: dict[str, tuple[str, list[tuple[str, int]], int]] = {}
    run_steps: dict[str, int] = {}
    per_user: dict[str, int] = {}
    call_ns: list[int] = []
    depths: list[int] = []
    grants_made = refused = 0
    seq = 0

    def call(step: int) -> None:
        nonlocal grants_made
        if not queue:
            return
        busy = [k for _, keys, _ in running.values() for k in keys]
        considered = queue if max_queue is None else sorted(queue, key=lambda r: r.seq)[:max_queue]
        t0 = time.perf_counter_ns()
        grants = schedule(gpus, busy, considered, per_user)
        call_ns.append(time.perf_counter_ns() - t0)
        depths.append(len(considered))
        granted = {g.job_id for g in grants}
        for g in grants:
            user = next(r.user for r in considered if r.job_id == g.job_id)
            running[g.job_id] = (user, [(g.node, i) for i in g.indices], step + run_steps[g.job_id])
            per_user[user] = per_user.get(user, 0) + 1
        grants_made += len(grants)
        queue[:] = [r for r in queue if r.job_id not in granted]

    i = 0
    step = 0
    while i < len(jobs) or queue or running:
        for job_id in [j for j, (_, _, end) in running.items() if end <= step]:
            user = running.pop(job_id)[0]
            per_user[user] -= 1
            call(step)  # the gateway schedules after every job end
        while i < len(jobs) and jobs[i][0] <= step:
            _, user, options, run = jobs[i]
            i += 1
            kept, _ = feasibility(options, gpus)
            if not kept:
                refused += 1
                continue
            seq += 1
            job_id = f"j{seq}"
            queue.append(Request(job_id, user, tuple(options[k] for k in kept), seq, tuple(kept)))
            run_steps[job_id] = run
            call(step)  # ... and after every submit
        step += 1
    return {"calls": call_ns, "depths": depths, "grants": grants_made, "refused": refused,
            "steps": step, "jobs": n_jobs}


def depth_scaling(seed: int, depths: tuple[int, ...] = (10, 100, 1000), repeats: int = 5
                  ) -> list[tuple[int, float, int]]:
    """One call's time against queue depth: (depth, median µs, grants), on a pool 85% busy."""
    rng = random.Random(seed)
    gpus = make_pool()
    busy = [(g.node, g.index) for g in rng.sample(gpus, int(0.85 * len(gpus)))]
    jobs = make_jobs(max(depths), rng)
    out = []
    for depth in depths:
        queue = []
        for seq, (_, user, options, _) in enumerate(jobs[:depth]):
            kept, _ = feasibility(options, gpus)
            queue.append(Request(f"j{seq}", user, tuple(options[k] for k in kept), seq, tuple(kept)))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            grants = schedule(gpus, busy, queue, {})
            times.append(time.perf_counter_ns() - t0)
        out.append((depth, statistics.median(times) / 1e3, len(grants)))
    return out


def percentile(values: list[int], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-queue", type=int, default=None,
                    help="pass only the oldest Q queued jobs to each call (default: all)")
    ap.add_argument("--profile", action="store_true", help="print where schedule() spends time")
    args = ap.parse_args()

    wall = time.perf_counter()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
    r = simulate(args.jobs, args.seed, args.max_queue)
    if args.profile:
        prof.disable()
    wall = time.perf_counter() - wall
    calls: list[int] = r["calls"]  # type: ignore[assignment]
    depths: list[int] = r["depths"]  # type: ignore[assignment]
    total_s = sum(calls) / 1e9
    gpus = PER_NODE * sum(NODES.values())

    print(f"scheduler benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()} ({platform.python_implementation()})")
    print(f"pool: {gpus} GPUs on {sum(NODES.values())} nodes "
          f"({', '.join(f'{t} {n}x{PER_NODE}' for t, n in NODES.items())}); "
          f"{r['jobs']} jobs from {len(USERS)} users, seed {args.seed}, {r['steps']} steps")
    if args.max_queue is not None:
        print(f"NOTE: each call saw only the oldest {args.max_queue} queued jobs (--max-queue)")
    rows = [
        ("schedule() calls", f"{len(calls):,}"),
        ("grants", f"{r['grants']:,}  (refused at submit: {r['refused']})"),
        ("time in schedule()", f"{total_s:.2f} s"),
        ("decisions per second", f"{r['grants'] / total_s:,.0f} grants/s"),
        ("call time p50", f"{percentile(calls, 50) / 1e3:,.0f} µs"),
        ("call time p99", f"{percentile(calls, 99) / 1e3:,.0f} µs"),
        ("call time max", f"{max(calls) / 1e3:,.0f} µs"),
        ("queue depth p50 / p99 / max",
         f"{percentile(depths, 50)} / {percentile(depths, 99)} / {max(depths)} jobs"),
        ("wall time (whole simulation)", f"{wall:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("one call against queue depth (pool 85% busy, whole queue passed in):")
    for depth, us, n in depth_scaling(args.seed):
        print(f"  {depth:>5} queued  {us:>10,.0f} µs per call  ({n} grants)")
    if args.profile:
        print()
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
