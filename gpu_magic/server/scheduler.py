"""Which queued job gets which GPUs on which node. Pure: no I/O, no clock, no randomness.

Rules (DESIGN.md): a job's options are tried in the order written and the first that can be
granted now wins; a multi-GPU grant is on one node and of one type; options no node could ever
satisfy are dropped at submit, and a job with none left is refused. Among queued jobs, users take
turns (fair share: the user with the fewest jobs running goes first, then submission order), and
the first job that cannot be granted reserves the GPUs it waits for, so later small jobs cannot
starve a large one by backfilling forever.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .._spec import GpuOption
from .inventory import Gpu

Key = tuple[str, int]  # (node, index)


@dataclass(frozen=True)
class Request:
    """A queued job as the scheduler sees it."""

    job_id: str
    user: str
    options: tuple[GpuOption, ...]
    seq: int  # submission order, lower first
    # Index of each option in the user's original spec (options may have been dropped at submit).
    option_indices: tuple[int, ...] = ()
    # OOM fallback: only GPUs with more memory than this may be granted.
    min_memory_gb: float | None = None

    def index_of(self, pos: int) -> int:
        return self.option_indices[pos] if self.option_indices else pos


@dataclass(frozen=True)
class Grant:
    """A decision: this job runs on these GPUs."""

    job_id: str
    option_index: int  # in the user's original spec
    option: GpuOption
    node: str
    indices: tuple[int, ...]
    gpu_type: str
    memory_gb: int | None
    simulated: bool
    passed_over: tuple[tuple[str, str], ...] = field(default=())


def _matching(option: GpuOption, gpus: Iterable[Gpu], min_memory: float | None) -> list[Gpu]:
    out = []
    for g in gpus:
        if not option.matches(g.type):
            continue
        if min_memory is not None and (g.memory_gb or 0) <= min_memory:
            continue
        out.append(g)
    return out


def feasibility(
    options: Sequence[GpuOption], gpus: Sequence[Gpu], min_memory: float | None = None
) -> tuple[list[int], list[tuple[str, str]]]:
    """Which options any node could ever satisfy: (kept positions, [(option, why dropped)])."""
    kept: list[int] = []
    dropped: list[tuple[str, str]] = []
    for pos, opt in enumerate(options):
        per_node: dict[str, int] = {}
        for g in _matching(opt, gpus, min_memory):
            per_node[g.node] = per_node.get(g.node, 0) + 1
        if per_node and max(per_node.values()) >= opt.count:
            kept.append(pos)
        elif not per_node:
            what = "GPU" if opt.type is None else f"{opt.type} GPU"
            dropped.append((str(opt), f"this pool has no {what}"))
        else:
            node, most = max(per_node.items(), key=lambda kv: (kv[1], kv[0]))
            dropped.append(
                (str(opt), f"no node has {opt.count} of them (the most on one node is {most}, on {node})")
            )
    return kept, dropped


def pool_summary(gpus: Sequence[Gpu]) -> str:
    """``H100 ×2 on sim-a, A100-80GB ×4 on sim-b`` for refusal messages."""
    counts: dict[tuple[str, str], int] = {}
    for g in gpus:
        counts[(g.type, g.node)] = counts.get((g.type, g.node), 0) + 1
    if not counts:
        return "no GPUs"
    return ", ".join(f"{t} ×{n} on {node}" for (t, node), n in sorted(counts.items()))


def _pick(
    option: GpuOption, free: Mapping[Key, Gpu], min_memory: float | None
) -> tuple[str, tuple[int, ...], str] | None:
    """The best node and GPUs for one option among the free ones, or None."""
    by_node_type: dict[tuple[str, str], list[Gpu]] = {}
    for g in _matching(option, free.values(), min_memory):
        by_node_type.setdefault((g.node, g.type), []).append(g)
    best = None
    for (node, gtype), gs in by_node_type.items():
        if len(gs) < option.count:
            continue
        # preferred type first (A100: 40GB; any: least memory), then the tightest fit, so large
        # free blocks stay whole for large requests
        rank = (option.preference(gtype), len(gs), node, gtype)
        if best is None or rank < best[0]:
            chosen = tuple(sorted(g.index for g in gs)[: option.count])
            best = (rank, node, chosen, gtype)
    if best is None:
        return None
    return best[1], best[2], best[3]


def _why_not(option: GpuOption, gpus: Sequence[Gpu], free: Mapping[Key, Gpu], waiting: int) -> str:
    total = len(_matching(option, gpus, None))
    nfree = len(_matching(option, free.values(), None))
    what = "GPUs" if option.type is None else f"{option.type}"
    text = f"{nfree} of {total} {what} free"
    if option.count > 1 and nfree >= option.count:
        text += f", but not {option.count} on one node"
    if waiting:
        text += f", {waiting} job{'s' if waiting != 1 else ''} waiting"
    return text


def fair_order(queue: Sequence[Request], running: Mapping[str, int]) -> list[Request]:
    """Queue order under fair share: users with fewer running jobs first, FIFO within a user."""
    per_user: dict[str, list[Request]] = {}
    for req in sorted(queue, key=lambda r: r.seq):
        per_user.setdefault(req.user, []).append(req)
    heap = [(running.get(u, 0), reqs[0].seq, u) for u, reqs in per_user.items()]
    heapq.heapify(heap)
    cursor = {u: 0 for u in per_user}
    out: list[Request] = []
    while heap:
        load, _, user = heapq.heappop(heap)
        reqs = per_user[user]
        out.append(reqs[cursor[user]])
        cursor[user] += 1
        if cursor[user] < len(reqs):
            heapq.heappush(heap, (load + 1, reqs[cursor[user]].seq, user))
    return out


def schedule(
    gpus: Sequence[Gpu],
    busy: Iterable[Key],
    queue: Sequence[Request],
    running: Mapping[str, int] | None = None,
) -> list[Grant]:
    """The grants to make now. ``busy``: GPUs held by running jobs; ``running``: jobs per user."""
    busy_set = set(busy)
    free: dict[Key, Gpu] = {
        (g.node, g.index): g for g in gpus if (g.node, g.index) not in busy_set and not g.busy_foreign
    }
    ordered = fair_order(queue, running or {})
    grants: list[Grant] = []
    reserved: set[Key] = set()
    for position, req in enumerate(ordered):
        avail = {k: g for k, g in free.items() if k not in reserved}
        passed: list[tuple[str, str]] = []
        for pos, opt in enumerate(req.options):
            pick = _pick(opt, avail, req.min_memory_gb)
            if pick is None:
                passed.append((str(opt), _why_not(opt, gpus, avail, position)))
                continue
            node, indices, gtype = pick
            for i in indices:
                del free[(node, i)]
            g0 = next(g for g in gpus if g.node == node and g.index == indices[0])
            grants.append(
                Grant(req.job_id, req.index_of(pos), opt, node, indices, gtype, g0.memory_gb,
                      g0.simulated, tuple(passed))
            )
            break
        else:
            if not reserved:
                reserved = _reservation(req, gpus, free)
    return grants


def _reservation(req: Request, gpus: Sequence[Gpu], free: Mapping[Key, Gpu]) -> set[Key]:
    """The free GPUs the first blocked job waits for: on the node of its first option that has
    the most GPUs of the type, the free ones of that type (nobody else may take them)."""
    for opt in req.options:
        per: dict[tuple[str, str], int] = {}
        for g in _matching(opt, gpus, req.min_memory_gb):
            per[(g.node, g.type)] = per.get((g.node, g.type), 0) + 1
        fits = [(n, nt) for nt, n in per.items() if n >= opt.count]
        if not fits:
            continue
        _, (node, gtype) = max(fits, key=lambda f: (f[0], f[1]))
        return {k for k, g in free.items() if g.node == node and g.type == gtype}
    return set()
