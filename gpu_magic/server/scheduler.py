"""Which queued job gets which GPUs on which node. Pure: no I/O, no clock, no randomness.

Rules (DESIGN.md): a job's options are tried in the order written and the first that can be
granted now wins; a multi-GPU grant is on one node and of one type; options no node could ever
satisfy are dropped at submit, and a job with none left is refused. Among queued jobs, users take
turns (fair share: the user with the fewest jobs running goes first; among users with as many,
the one served least recently, so they are served round-robin, then submission order), and the
first job that cannot be granted reserves the GPUs it waits for, so later small jobs cannot
starve a large one by backfilling forever.
"""

from __future__ import annotations

import dataclasses
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


class _Matcher:
    """``option.matches(type)`` remembered per (option, type): the same few types are asked
    about for every GPU of every queued job."""

    def __init__(self) -> None:
        self._memo: dict[tuple[GpuOption, str], bool] = {}

    def __call__(self, option: GpuOption, gtype: str) -> bool:
        key = (option, gtype)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = option.matches(gtype)
        return hit


def _matching(option: GpuOption, gpus: Iterable[Gpu], min_memory: float | None,
              match: _Matcher | None = None) -> list[Gpu]:
    match = match or _Matcher()
    out = []
    for g in gpus:
        if not match(option, g.type):
            continue
        if min_memory is not None and (g.memory_gb or 0) <= min_memory:
            continue
        out.append(g)
    return out


def feasibility(
    options: Sequence[GpuOption], gpus: Sequence[Gpu], min_memory: float | None = None
) -> tuple[list[int], list[tuple[str, str]]]:
    """Which options any node could ever satisfy: (kept positions, [(option, why dropped)]).

    A grant is of one type on one node, so GPUs are counted per (node, type)."""
    kept: list[int] = []
    dropped: list[tuple[str, str]] = []
    for pos, opt in enumerate(options):
        per: dict[tuple[str, str], int] = {}
        for g in _matching(opt, gpus, min_memory):
            per[(g.node, g.type)] = per.get((g.node, g.type), 0) + 1
        if per and max(per.values()) >= opt.count:
            kept.append(pos)
        elif not per:
            what = "GPU" if opt.type is None else f"{opt.type} GPU"
            if min_memory is not None:
                what += f" with more than {min_memory:g} GB"
            dropped.append((str(opt), f"this pool has no {what}"))
        else:
            (node, _t), most = max(per.items(), key=lambda kv: (kv[1], kv[0]))
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


class _Free:
    """The free GPUs, grouped by (node, type), shrinking as grants are made."""

    def __init__(self, gpus: Sequence[Gpu], busy: set[Key]) -> None:
        self.groups: dict[tuple[str, str], dict[int, Gpu]] = {}
        for g in gpus:
            if (g.node, g.index) not in busy and not g.busy_foreign:
                self.groups.setdefault((g.node, g.type), {})[g.index] = g

    def take(self, node: str, gtype: str, indices: Iterable[int]) -> None:
        group = self.groups[(node, gtype)]
        for i in indices:
            del group[i]

    def keys(self) -> set[Key]:
        return {(n, i) for (n, _t), group in self.groups.items() for i in group}


def _pick(option: GpuOption, free: _Free, reserved: set[Key], min_memory: float | None,
          match: _Matcher) -> tuple[str, tuple[int, ...], str, Gpu] | None:
    """The best node and GPUs for one option among the free, unreserved ones, or None."""
    best = None
    for (node, gtype), group in free.groups.items():
        if len(group) < option.count or not match(option, gtype):
            continue
        gs = [g for i, g in group.items() if (node, i) not in reserved and
              (min_memory is None or (g.memory_gb or 0) > min_memory)]
        if len(gs) < option.count:
            continue
        # preferred type first (A100: 40GB; any: least memory), then the tightest fit, so large
        # free blocks stay whole for large requests
        rank = (option.preference(gtype), len(gs), node, gtype)
        if best is None or rank < best[0]:
            chosen = sorted(gs, key=lambda g: g.index)[: option.count]
            best = (rank, node, tuple(g.index for g in chosen), gtype, chosen[0])
    if best is None:
        return None
    return best[1], best[2], best[3], best[4]


def _why_not(option: GpuOption, gpus: Sequence[Gpu], free: _Free, reserved: set[Key],
             waiting: int, match: _Matcher, min_memory: float | None = None) -> str:
    if min_memory is not None and not any(
            match(option, g.type) and (g.memory_gb or 0) > min_memory for g in gpus):
        # a retry after running out of memory (--oom-fallback): free or not, too small
        return f"has no more than the {min_memory:g} GB the cell ran out of"
    total = sum(1 for g in gpus if match(option, g.type))
    mine = [(n, i) for (n, t), group in free.groups.items() if match(option, t) for i in group]
    nheld = sum(1 for k in mine if k in reserved)
    nfree = len(mine) - nheld
    what = "GPUs" if option.type is None else f"{option.type}"
    # (a type whose nodes all left: none of it is in the pool now); GPUs held for a waiting
    # job are counted free and said held, as the pool shows them: "0 of 2 free" beside the
    # pool's "1 free (1 held)" read as two answers to one question
    text = f"{len(mine)} of {total} {what} free" if total else f"no {what} in the pool now"
    if nheld:
        text += f" ({nheld} held for a waiting job)"
    if option.count > 1 and nfree >= option.count:
        text += f", but not {option.count} on one node"
    if waiting:
        text += f", {waiting} job{'s' if waiting != 1 else ''} waiting"
    return text


def fair_order(queue: Sequence[Request], running: Mapping[str, int],
               served: Mapping[str, int] | None = None) -> list[Request]:
    """Queue order under fair share: users with fewer running jobs first; among users with as
    many, the one waiting longest (since their last grant, or since their first waiting job
    was submitted if that was later) first, then submission order; FIFO within a user.

    ``served``: per user, the ``seq`` of the latest submission when they were last granted a
    job (a user not in it was never served). Without it, a user who floods the queue wins
    every tie by submission order: when each job takes a whole GPU type, every user's running
    count is 0 whenever the pool frees. Counting a wait from its job's submission too keeps a
    job waiting for a large grant from being passed by later users for ever (the first
    blocked job reserves what it waits for). A job placed here counts as running and as
    served after everything else."""
    served = served or {}
    per_user: dict[str, list[Request]] = {}
    for req in sorted(queue, key=lambda r: r.seq):
        per_user.setdefault(req.user, []).append(req)

    def since(user: str, first: int) -> int:  # (2s: submission s; 2s + 1: just after it)
        return max(2 * served[user] + 1, 2 * first) if user in served else 2 * first

    heap = [(running.get(u, 0), since(u, reqs[0].seq), reqs[0].seq, u)
            for u, reqs in per_user.items()]
    heapq.heapify(heap)
    latest = 2 * max([*served.values(), *(r.seq for r in queue)], default=0) + 1
    cursor = {u: 0 for u in per_user}
    out: list[Request] = []
    while heap:
        load, _, _, user = heapq.heappop(heap)
        reqs = per_user[user]
        out.append(reqs[cursor[user]])
        cursor[user] += 1
        latest += 1
        if cursor[user] < len(reqs):
            heapq.heappush(heap, (load + 1, latest, reqs[cursor[user]].seq, user))
    return out


def schedule(
    gpus: Sequence[Gpu],
    busy: Iterable[Key],
    queue: Sequence[Request],
    running: Mapping[str, int] | None = None,
    served: Mapping[str, int] | None = None,
    room: Mapping[str, int] | None = None,
) -> list[Grant]:
    """The grants to make now. ``busy``: GPUs held by running jobs; ``running``: jobs per user;
    ``served``: per user, the number of their last grant (see ``fair_order``); ``room``: per
    user with a limit, how many more GPUs they may hold (the grants of this pass count: two
    of their jobs waiting for GPUs freed at once must not take them past it)."""
    return _plan(gpus, busy, queue, running, served, room)[0]


def holding(
    queue: Sequence[Request],
    gpus: Sequence[Gpu],
    busy: Iterable[Key],
    running: Mapping[str, int] | None = None,
    served: Mapping[str, int] | None = None,
    room: Mapping[str, int] | None = None,
) -> tuple[dict[str, str], set[Key]]:
    """For each queued job that free GPUs would take now were they not held for the first
    waiting job ahead of it (so that a large request is not starved), what holds them:
    ``1 H100 free, held for a job ahead that waits for H100:2`` (without it, such a job reads
    as if no GPU were free); and those held GPUs (free, but no other job may take them: the
    pool says so)."""
    _, held_back, reserved = _plan(gpus, busy, queue, running, served, room)
    return held_back, reserved


def _plan(gpus: Sequence[Gpu], busy: Iterable[Key], queue: Sequence[Request],
          running: Mapping[str, int] | None, served: Mapping[str, int] | None,
          room: Mapping[str, int] | None = None,
          ) -> tuple[list[Grant], dict[str, str], set[Key]]:
    """The grants to make now, the jobs that GPUs held for the first blocked job keep
    waiting (see ``holding``), and those GPUs."""
    gpus = list(gpus)
    left = dict(room or {})
    free = _Free(gpus, set(busy))
    match = _Matcher()
    ordered = fair_order(queue, running or {}, served)
    grants: list[Grant] = []
    held_back: dict[str, str] = {}
    reserved: set[Key] | None = None  # None until the first blocked job has reserved (maybe nothing)
    waits_for: GpuOption | None = None  # what the first blocked job reserved for
    for position, req in enumerate(ordered):
        held = reserved or set()
        mine = left.get(req.user)
        if mine is not None and all(opt.count > mine for opt in req.options):
            continue  # its user's limit is used up by this pass's grants: it waits, holding none
        for pos, opt in enumerate(req.options):
            if mine is not None and opt.count > mine:
                continue
            pick = _pick(opt, free, held, req.min_memory_gb, match)
            if pick is None:
                continue
            node, indices, gtype, g0 = pick
            # why the earlier options were passed over, told as they were at this moment
            passed = tuple(
                (str(o), "more GPUs than your limit leaves you now"
                 if mine is not None and o.count > mine else
                 _why_not(o, gpus, free, held, position, match, req.min_memory_gb))
                for o in req.options[:pos]
            )
            free.take(node, gtype, indices)
            if mine is not None:
                left[req.user] = mine - opt.count
            grants.append(
                Grant(req.job_id, req.index_of(pos), opt, node, indices, gtype, g0.memory_gb,
                      g0.simulated, passed)
            )
            break
        else:
            if reserved is None:
                # (only for what its user's limit lets it take: GPUs held for an option it may
                # not have now would keep everyone else off them for nothing)
                fitting = req if mine is None else dataclasses.replace(
                    req, options=tuple(o for o in req.options if o.count <= mine))
                reserved, waits_for = _reservation(fitting, gpus, free, match)
            elif reserved and waits_for is not None:
                note = _held_note(req, free, reserved, waits_for, match)
                if note is not None:
                    held_back[req.job_id] = note
    return grants, held_back, reserved or set()


def _held_note(req: Request, free: _Free, reserved: set[Key], waits_for: GpuOption,
               match: _Matcher) -> str | None:
    """``1 H100 free, held for a job ahead that waits for H100:2`` when the first of the job's
    options that the free GPUs fit fits only with the reserved ones; None otherwise."""
    for opt in req.options:
        if _pick(opt, free, set(), req.min_memory_gb, match) is None:
            continue
        types = sorted({t for (n, t), group in free.groups.items() if match(opt, t)
                        for i, g in group.items() if (n, i) in reserved
                        and (req.min_memory_gb is None or (g.memory_gb or 0) > req.min_memory_gb)})
        count = sum(1 for (n, t), group in free.groups.items() if t in types
                    for i in group if (n, i) in reserved)
        return (f"{count} {'/'.join(types)} free, held for a job ahead that waits for "
                f"{waits_for}")
    return None


def held_outside(queue: Sequence[Request], gpus: Sequence[Gpu], busy: Iterable[Key],
                 running: Mapping[str, int] | None = None,
                 served: Mapping[str, int] | None = None,
                 room: Mapping[str, int] | None = None) -> dict[str, list[Gpu]]:
    """For each queued job that GPUs held outside gpu_magic alone keep waiting, those GPUs:
    the ones of the grant it would get now, the queue ahead of it served first, were they
    free. A job that our own jobs or the queue ahead keep waiting is not named."""
    if not any(g.busy_foreign and not g.virtual for g in gpus):
        return {}
    cleared = [dataclasses.replace(g, busy_foreign=False) if g.busy_foreign and not g.virtual
               else g for g in gpus]
    by_key = {(g.node, g.index): g for g in gpus}
    out: dict[str, list[Gpu]] = {}
    for grant in schedule(cleared, busy, queue, running, served, room):
        held = [by_key[(grant.node, i)] for i in grant.indices
                if by_key[(grant.node, i)].busy_foreign]
        if held:
            out[grant.job_id] = held
    return out


def _reservation(req: Request, gpus: Sequence[Gpu], free: _Free, match: _Matcher,
                 ) -> tuple[set[Key], GpuOption | None]:
    """The free GPUs the first blocked job waits for: on the node of its first option that has
    the most GPUs of the type, the free ones of that type (nobody else may take them); and that
    option."""
    for opt in req.options:
        per: dict[tuple[str, str], int] = {}
        for g in _matching(opt, gpus, req.min_memory_gb, match):
            per[(g.node, g.type)] = per.get((g.node, g.type), 0) + 1
        fits = [(n, nt) for nt, n in per.items() if n >= opt.count]
        if not fits:
            continue
        _, (node, gtype) = max(fits, key=lambda f: (f[0], f[1]))
        return {(node, i) for i in free.groups.get((node, gtype), {})}, opt
    return set(), None
