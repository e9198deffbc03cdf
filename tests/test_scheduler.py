"""The pure scheduler: allocation decisions case by case, then properties over random pools.

The scheduler reads no clock, so the simulations here count steps instead of seconds: each step
calls ``schedule()``, marks the granted GPUs busy, finishes the jobs whose (drawn) run length is
up, and submits the step's new jobs the way the gateway does (infeasible options dropped at
submit, the original option indices kept).

The property tests judge every decision with an oracle written here from DESIGN.md's rules, not
from the scheduler's helpers: options per (node, type) group, the A100 family preferring 40 GB,
``any`` preferring the least memory, the tightest node first, users with fewer running jobs first,
and the first job that cannot be granted reserving the free GPUs it waits for.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from gpu_magic._spec import CATALOGUE, GpuOption, parse_spec
from gpu_magic.server.inventory import Gpu, parse_simulated
from gpu_magic.server.scheduler import (
    Grant,
    Request,
    fair_order,
    feasibility,
    held_outside,
    holding,
    pool_summary,
    schedule,
)

Key = tuple[str, int]
Group = tuple[str, str]  # (node, type): a multi-GPU grant is on one node and of one type

# The oracle's own copy of the rules it checks (DESIGN.md), kept apart from the scheduler's code.
MEMORY = {"T4": 16, "L4": 24, "A10": 24, "L40S": 48, "A100-40GB": 40, "A100-80GB": 80,
          "RTX-PRO-6000": 96, "H100": 80, "H200": 141, "B200": 180}
FAMILY = {"A100": ("A100-40GB", "A100-80GB")}  # earlier members preferred


def make_pool(text: str, foreign: Iterable[Key] = ()) -> list[Gpu]:
    """A simulated pool (``TYPE:COUNT@node,...``), with some GPUs busy with foreign processes."""
    taken = set(foreign)
    return [dataclasses.replace(g, busy_foreign=(g.node, g.index) in taken)
            for g in parse_simulated(text)]


def submit(job_id: str, user: str, spec: str, seq: int, gpus: Sequence[Gpu],
           min_memory: float | None = None) -> Request:
    """A queued job as the gateway makes one: infeasible options dropped, original indices kept."""
    options = parse_spec(spec).options
    kept, dropped = feasibility(options, gpus)
    assert kept, f"test set-up: {spec!r} is refused on this pool: {dropped}"
    return Request(job_id, user, tuple(options[i] for i in kept), seq, tuple(kept), min_memory)


# --- the oracle ------------------------------------------------------------------------------


def type_fits(option: GpuOption, gpu_type: str) -> bool:
    return option.type is None or gpu_type == option.type or gpu_type in FAMILY.get(option.type, ())


def rank(option: GpuOption, gpu_type: str) -> int:
    """Lower is preferred: ``any`` by memory, a family by member order, an exact type is 0."""
    if option.type is None:
        return MEMORY.get(gpu_type, 10**6)
    members = FAMILY.get(option.type, ())
    return members.index(gpu_type) if gpu_type in members else 0


def groups(option: GpuOption, gpus: Iterable[Gpu], min_memory: float | None) -> dict[Group, list[Gpu]]:
    """The GPUs that fit ``option`` by type and memory, per (node, type)."""
    out: dict[Group, list[Gpu]] = {}
    for g in gpus:
        if type_fits(option, g.type) and (min_memory is None or (g.memory_gb or 0) > min_memory):
            out.setdefault((g.node, g.type), []).append(g)
    return out


def fitting(option: GpuOption, gpus: Iterable[Gpu], min_memory: float | None) -> dict[Group, int]:
    """The (node, type) groups among ``gpus`` that hold ``option.count`` GPUs, with their size."""
    return {grp: len(gs) for grp, gs in groups(option, gpus, min_memory).items()
            if len(gs) >= option.count}


def oracle_fair_order(queue: Sequence[Request], running: Mapping[str, int],
                      served: Mapping[str, int] | None = None) -> list[Request]:
    """Fewest running jobs first (each job placed counts as running), ties to the user waiting
    longest: since their last grant (just after the submission ``served`` names), or since
    their first waiting job's submission if later (each job placed counts as served now);
    then by submission order."""
    pending: dict[str, list[Request]] = {}
    for req in sorted(queue, key=lambda r: r.seq):
        pending.setdefault(req.user, []).append(req)
    load = {u: running.get(u, 0) for u in pending}
    served = served or {}
    # a wait since submission s is (s, 0); since a grant just after submission s, (s, 1)
    last = {u: max((served[u], 1), (pending[u][0].seq, 0)) if u in served
            else (pending[u][0].seq, 0) for u in pending}
    now = max([*served.values(), *(r.seq for r in queue)], default=0)
    out = []
    while pending:
        user = min(pending, key=lambda u: (load[u], last[u], pending[u][0].seq))
        out.append(pending[user].pop(0))
        load[user] += 1
        now += 1
        last[user] = (now, 2)
        if not pending[user]:
            del pending[user]
    return out


def reservation_candidates(req: Request, gpus: Sequence[Gpu]) -> list[Group | None]:
    """Where the first blocked job may reserve: for its first option that some (node, type)
    group could ever hold, the largest such groups (a tie may go either way)."""
    for opt in req.options:
        sizes = fitting(opt, gpus, req.min_memory_gb)
        if sizes:
            most = max(sizes.values())
            return [grp for grp, n in sorted(sizes.items()) if n == most]
    return [None]


def option_position(req: Request, grant: Grant) -> int:
    indices = req.option_indices or tuple(range(len(req.options)))
    assert grant.option_index in indices, f"{grant} names an option {req} does not list"
    return indices.index(grant.option_index)


def check_decisions(gpus: Sequence[Gpu], busy: Iterable[Key], queue: Sequence[Request],
                    running: Mapping[str, int], grants: Sequence[Grant],
                    served: Mapping[str, int] | None = None) -> None:
    """Assert that ``grants`` is what the rules allow for this pool, queue and load."""
    busy = set(busy)
    by_key = {(g.node, g.index): g for g in gpus}
    jobs = {r.job_id: r for r in queue}
    keys = [(gr.node, i) for gr in grants for i in gr.indices]
    assert len(keys) == len(set(keys)), f"a GPU granted twice at once: {grants}"
    assert len(busy) + len(keys) <= len(gpus), "more GPUs granted than the pool has"
    for k in keys:
        assert k in by_key, f"granted {k}, which is not in the pool"
        assert k not in busy, f"granted {k}, which a running job holds"
        assert not by_key[k].busy_foreign, f"granted {k}, which a foreign process holds"
    assert len({gr.job_id for gr in grants}) == len(grants), f"a job granted twice: {grants}"
    for gr in grants:
        assert gr.job_id in jobs, f"granted {gr.job_id}, which is not queued"
        req = jobs[gr.job_id]
        pos = option_position(req, gr)
        opt = req.options[pos]
        assert gr.option == opt
        assert len(gr.indices) == opt.count, f"{gr}: {len(gr.indices)} GPUs for {opt}"
        held = [by_key[(gr.node, i)] for i in gr.indices]
        assert {g.type for g in held} == {gr.gpu_type}, f"{gr}: GPUs of several types"
        assert type_fits(opt, gr.gpu_type), f"{gr}: {gr.gpu_type} does not fit {opt}"
        if req.min_memory_gb is not None:
            assert (held[0].memory_gb or 0) > req.min_memory_gb, f"{gr}: not more memory"
        assert gr.memory_gb == held[0].memory_gb and gr.simulated == held[0].simulated
        assert [o for o, _ in gr.passed_over] == [str(o) for o in req.options[:pos]]

    order = oracle_fair_order(queue, running, served)
    grant_of = {gr.job_id: gr for gr in grants}
    assert [gr.job_id for gr in grants] == [r.job_id for r in order if r.job_id in grant_of], \
        "grants not made in fair-share order"
    free = {k for k, g in by_key.items() if k not in busy and not g.busy_foreign}
    blocked = [i for i, r in enumerate(order) if r.job_id not in grant_of]
    candidates = reservation_candidates(order[blocked[0]], gpus) if blocked else [None]
    failures = []
    for cand in candidates:
        problems = _replay(order, grant_of, free, by_key, blocked[0] if blocked else -1, cand)
        if not problems:
            return
        failures.append(f"reserving {cand}: " + "; ".join(problems))
    raise AssertionError("decisions break the rules:\n  " + "\n  ".join(failures))


def _replay(order: Sequence[Request], grant_of: Mapping[str, Grant], free: set[Key],
            by_key: Mapping[Key, Gpu], first_blocked: int, reserve: Group | None) -> list[str]:
    """Walk the queue in fair order as the rules say; what went against them."""
    avail = set(free)
    reserved: set[Key] = set()
    problems = []
    for i, req in enumerate(order):
        eff = [by_key[k] for k in sorted(avail - reserved)]
        gr = grant_of.get(req.job_id)
        if gr is None:
            for opt in req.options:
                if fitting(opt, eff, req.min_memory_gb):
                    problems.append(f"{req.job_id} waits while {opt} is free for it")
            if i == first_blocked and reserve is not None:
                reserved = {k for k in avail if (by_key[k].node, by_key[k].type) == reserve}
            continue
        pos = option_position(req, gr)
        taken = {(gr.node, j) for j in gr.indices}
        if not taken <= avail - reserved:
            problems.append(f"{req.job_id} got GPUs that were taken or reserved: {sorted(taken)}")
        for earlier in req.options[:pos]:
            if fitting(earlier, eff, req.min_memory_gb):
                problems.append(f"{req.job_id} got {req.options[pos]} while earlier {earlier} fit")
        opt = req.options[pos]
        fits = fitting(opt, eff, req.min_memory_gb)
        if fits:
            best = min(rank(opt, t) for _, t in fits)
            if rank(opt, gr.gpu_type) != best:
                problems.append(f"{req.job_id} got {gr.gpu_type}, a less preferred type for {opt}")
            tightest = min(n for (_, t), n in fits.items() if rank(opt, t) == best)
            if fits.get((gr.node, gr.gpu_type)) != tightest:
                problems.append(f"{req.job_id} got node {gr.node}, not the tightest fit")
        avail -= taken
    return problems


# --- allocation decisions, case by case -------------------------------------------------------

Expected = tuple[str, int, str, tuple[int, ...], str]  # job, option index, node, indices, type


@dataclass(frozen=True)
class Case:
    pool: str
    queue: tuple[tuple[Any, ...], ...]  # (user, spec) or (user, spec, min_memory_gb); ids j0, j1…
    expected: tuple[Expected, ...]
    busy: frozenset[Key] = frozenset()
    foreign: frozenset[Key] = frozenset()
    running: Mapping[str, int] = field(default_factory=dict)
    served: Mapping[str, int] = field(default_factory=dict)
    passed: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


def busy_on(*names: str) -> frozenset[Key]:
    """``busy_on("a0", "b3")``: GPU 0 of node a and GPU 3 of node b."""
    return frozenset((n[0], int(n[1:])) for n in names)


P = "H100:2@a,A100-80GB:4@b"

CASES = [
    pytest.param(Case(P, (("u", "H100"),), (("j0", 0, "a", (0,), "H100"),)),
                 id="first-option-free"),
    pytest.param(Case(P, (("u", "H100:2, A100-80GB:2"),), (("j0", 0, "a", (0, 1), "H100"),)),
                 id="first-of-two-free-wins"),
    pytest.param(Case(P, (("u", "H100:2, A100-80GB:2"),), (("j0", 1, "b", (0, 1), "A100-80GB"),),
                      busy=busy_on("a0", "a1"),
                      passed={"j0": (("H100:2", "0 of 2 H100 free"),)}),
                 id="fallback-when-first-busy"),
    pytest.param(Case(P, (("u", "H100:2, A100-80GB"),), (("j0", 1, "b", (0,), "A100-80GB"),),
                      busy=busy_on("a0"), passed={"j0": (("H100:2", "1 of 2 H100 free"),)}),
                 id="fallback-when-first-half-free"),
    pytest.param(Case(P, (("u", "H100, A100-80GB:2, A100-80GB"),),
                      (("j0", 2, "b", (3,), "A100-80GB"),), busy=busy_on("a0", "a1", "b0", "b1", "b2"),
                      passed={"j0": (("H100", "0 of 2 H100 free"),
                                     ("A100-80GB:2", "1 of 4 A100-80GB free"))}),
                 id="fallback-to-third"),
    pytest.param(Case(P, (("u", "H100"),), (), busy=busy_on("a0", "a1")), id="nothing-free-waits"),
    pytest.param(Case(P, (("u", "T4, H100"),), (("j0", 1, "a", (0,), "H100"),)),
                 id="dropped-option-keeps-original-index"),
    pytest.param(Case("H100:1@a,A100-80GB:1@b", (("u1", "H100"), ("u2", "H100, A100-80GB")),
                      (("j1", 1, "b", (0,), "A100-80GB"),), busy=busy_on("a0"),
                      running={"u3": 1},
                      passed={"j1": (("H100", "0 of 1 H100 free, 1 job waiting"),)}),
                 id="reason-counts-jobs-waiting-ahead"),
    pytest.param(Case("H100:2@a,H100:2@b,A100-80GB:1@c", (("u", "H100:2, A100-80GB"),),
                      (("j0", 1, "c", (0,), "A100-80GB"),), busy=busy_on("a0", "b0"),
                      passed={"j0": (("H100:2", "2 of 4 H100 free, but not 2 on one node"),)}),
                 id="two-free-on-two-nodes-is-not-two"),
    pytest.param(Case("H100:2@a,H100:2@b", (("u", "H100:2"),), (), busy=busy_on("a0", "b0")),
                 id="split-pair-waits"),
    pytest.param(Case("H100:2@a,H100:2@b", (("u", "H100:2"),), (("j0", 0, "b", (0, 1), "H100"),),
                      busy=busy_on("a0")),
                 id="pair-on-the-whole-node"),
    pytest.param(Case("A100-80GB:1@a,A100-40GB:1@b", (("u", "A100"),),
                      (("j0", 0, "b", (0,), "A100-40GB"),)),
                 id="a100-prefers-40gb"),
    pytest.param(Case("A100-40GB:4@a,A100-80GB:1@b", (("u", "A100"),),
                      (("j0", 0, "a", (0,), "A100-40GB"),)),
                 id="a100-40gb-preferred-over-tighter-80gb"),
    pytest.param(Case("A100-80GB:1@a,A100-40GB:1@b", (("u", "A100"),),
                      (("j0", 0, "a", (0,), "A100-80GB"),), busy=busy_on("b0")),
                 id="a100-takes-80gb-when-40gb-busy"),
    pytest.param(Case("A100-40GB:1@a,A100-80GB:1@a,A100-80GB:2@b", (("u", "A100:2"),),
                      (("j0", 0, "b", (0, 1), "A100-80GB"),)),
                 id="a100-pair-is-one-size"),
    pytest.param(Case("H100:1@a,T4:1@b,L4:1@c", (("u", "any"),), (("j0", 0, "b", (0,), "T4"),)),
                 id="any-takes-least-memory"),
    pytest.param(Case("H100:1@a,T4:1@b,L4:1@c", (("u", "any"),), (("j0", 0, "c", (0,), "L4"),),
                      busy=busy_on("b0")),
                 id="any-takes-next-least-memory"),
    pytest.param(Case("T4:1@a,L4:2@b,H100:2@c", (("u", "any:2"),), (("j0", 0, "b", (0, 1), "L4"),)),
                 id="any-pair-least-memory-that-fits"),
    pytest.param(Case("H100:4@a,H100:2@b", (("u", "H100"),), (("j0", 0, "b", (0,), "H100"),)),
                 id="best-fit-smaller-node"),
    pytest.param(Case("H100:4@a,H100:2@b", (("u", "H100"),), (("j0", 0, "a", (3,), "H100"),),
                      busy=busy_on("a0", "a1", "a2")),
                 id="best-fit-fewest-free"),
    pytest.param(Case("H100:4@a,H100:3@b", (("u", "H100:2"),), (("j0", 0, "b", (0, 1), "H100"),)),
                 id="best-fit-keeps-big-block-whole"),
    pytest.param(Case("H100:2@a", (("u", "H100"),), (("j0", 0, "a", (1,), "H100"),),
                      foreign=busy_on("a0")),
                 id="foreign-busy-skipped"),
    pytest.param(Case("H100:1@a", (("u", "H100"),), (), foreign=busy_on("a0")),
                 id="foreign-busy-never-granted"),
    pytest.param(Case("H100:2@a", (*(("A", "H100"),) * 20, ("B", "H100")),
                      (("j20", 0, "a", (1,), "H100"),), busy=busy_on("a0"), running={"A": 1}),
                 id="fair-share-one-job-beats-twenty"),
    pytest.param(Case("H100:2@a", (("A", "H100"), ("A", "H100"), ("B", "H100")),
                      (("j0", 0, "a", (0,), "H100"), ("j2", 0, "a", (1,), "H100"))),
                 id="fair-share-users-take-turns"),
    pytest.param(Case("H100:1@a", (("B", "H100"), ("A", "H100")), (("j0", 0, "a", (0,), "H100"),)),
                 id="fair-share-tie-by-submission"),
    # A user whose jobs each take the whole pool (H100:2 here) has 0 running whenever it frees:
    # the tie goes to whom was served longest ago, not to the flooder's earlier submissions.
    pytest.param(Case("H100:2@a", (("C", "H100:2"), ("C", "H100:2"), ("B", "H100:2")),
                      (("j2", 0, "a", (0, 1), "H100"),), served={"A": 1, "C": 2}),
                 id="fair-share-tie-to-least-recently-served"),
    pytest.param(Case("H100:1@a", (("C", "H100"), ("B", "H100")), (("j1", 0, "a", (0,), "H100"),),
                      served={"B": 3, "C": 5}),
                 id="fair-share-tie-to-served-longer-ago"),
    pytest.param(Case("H100:2@a", (("B", "H100"), ("A", "H100")), (("j1", 0, "a", (1,), "H100"),),
                      busy=busy_on("a0"), running={"B": 1}),
                 id="fair-share-fewer-running-first"),
    pytest.param(Case("H100:2@a", (("u1", "H100:2"), ("u2", "H100")), (), busy=busy_on("a0"),
                      running={"u3": 1}),
                 id="head-reserves-freed-gpu"),
    pytest.param(Case("H100:2@a", (("u2", "H100"),), (("j0", 0, "a", (1,), "H100"),),
                      busy=busy_on("a0"), running={"u3": 1}),
                 id="no-head-no-reservation"),
    pytest.param(Case("H100:2@a", (("u1", "H100:2"), ("u2", "H100")), (("j1", 0, "a", (1,), "H100"),),
                      busy=busy_on("a0"), running={"u1": 1}),
                 id="fair-share-decides-who-is-head"),
    pytest.param(Case("H100:2@a,A100-80GB:2@b", (("u1", "H100:2"), ("u2", "H100"), ("u3", "A100-80GB")),
                      (("j2", 0, "b", (0,), "A100-80GB"),), busy=busy_on("a0"), running={"u4": 1}),
                 id="reservation-leaves-other-types"),
    pytest.param(Case("H100:2@a,A100-80GB:2@b",
                      (("u1", "H100:2"), ("u2", "A100-80GB:2"), ("u3", "A100-80GB")),
                      (("j2", 0, "b", (1,), "A100-80GB"),), busy=busy_on("a0", "b0"),
                      running={"u4": 2}),
                 id="only-first-blocked-reserves"),
    pytest.param(Case("H100:1@a,A100-80GB:2@b",
                      (("u1", "H100"), ("u2", "A100-80GB:2"), ("u3", "A100-80GB")),
                      (("j2", 0, "b", (1,), "A100-80GB"),), busy=busy_on("a0", "b0"),
                      running={"u4": 2}),
                 id="head-with-nothing-free-to-reserve-reserves-nothing"),
    pytest.param(Case("H100:4@a,H100:2@b", (("u1", "H100:4"), ("u2", "H100"), ("u3", "H100")),
                      (("j1", 0, "b", (1,), "H100"),), busy=busy_on("a0", "a1", "a2", "b0"),
                      running={"u4": 2}),
                 id="reservation-on-node-with-most"),
    pytest.param(Case("T4:1@a,A100-40GB:1@b,A100-80GB:1@c", (("u", "any", 40),),
                      (("j0", 0, "c", (0,), "A100-80GB"),)),
                 id="oom-fallback-any-more-memory"),
    pytest.param(Case("A100-40GB:1@a,A100-80GB:1@b", (("u", "A100", 40),),
                      (("j0", 0, "b", (0,), "A100-80GB"),)),
                 id="oom-fallback-a100-to-80gb"),
    pytest.param(Case("T4:2@a,L4:1@b", (("u", "T4, L4", 16),), (("j0", 1, "b", (0,), "L4"),)),
                 id="oom-fallback-next-option"),
    pytest.param(Case("T4:2@a,L4:1@b", (("u", "T4, L4", 16),), (), busy=busy_on("b0")),
                 id="oom-fallback-never-smaller"),
]


@pytest.mark.parametrize("case", CASES)
def test_allocation_decision(case: Case) -> None:
    gpus = make_pool(case.pool, case.foreign)
    queue = [submit(f"j{i}", job[0], job[1], i, gpus, *job[2:]) for i, job in enumerate(case.queue)]
    grants = schedule(gpus, sorted(case.busy), queue, dict(case.running), dict(case.served))
    assert [(g.job_id, g.option_index, g.node, g.indices, g.gpu_type) for g in grants] == \
        list(case.expected)
    for g in grants:
        if g.job_id in case.passed:
            assert g.passed_over == case.passed[g.job_id]
    check_decisions(gpus, case.busy, queue, case.running, grants, case.served)


def test_passed_over_reason_shape() -> None:
    """Each reason reads 'F of T TYPE free', then why a free count was not enough, then the queue."""
    gpus = make_pool("H100:2@a,H100:2@b,L4:4@c")
    queue = [submit("j0", "u1", "H100:2", 0, gpus), submit("j1", "u2", "H100:2, any:4, L4", 1, gpus)]
    (grant,) = schedule(gpus, [("a", 0), ("b", 0), ("c", 0)], queue, {"u3": 2})
    assert (grant.job_id, grant.option_index, grant.node, grant.indices) == ("j1", 2, "c", (1,))
    shape = re.compile(r"\d+ of \d+ (\S+) free( \(\d+ held for a waiting job\))?"
                       r"(, but not \d+ on one node)?(, \d+ jobs? waiting)?")
    for option, reason in grant.passed_over:
        assert shape.fullmatch(reason), (option, reason)
    # j0 waits for a pair and holds the free H100 of node b, so j1 may have one H100 and three
    # L4; the held one is counted free and said held, as the pool shows it
    assert grant.passed_over == (
        ("H100:2", "2 of 4 H100 free (1 held for a waiting job), 1 job waiting"),
        ("any:4", "5 of 8 GPUs free (1 held for a waiting job), but not 4 on one node, "
                  "1 job waiting"),
    )


def test_a_retry_after_running_out_of_memory_says_why_smaller_gpus_were_passed_over() -> None:
    # --oom-fallback: the T4s are all free, but the cell ran out of their 16 GB
    gpus = make_pool("T4:8@a,H100:2@b")
    (grant,) = schedule(gpus, [], [submit("j0", "u", "T4, H100", 0, gpus, min_memory=16)])
    assert (grant.option, grant.passed_over) == (
        GpuOption("H100"), (("T4", "has no more than the 16 GB the cell ran out of"),))


def test_a_user_s_gpu_limit_counts_the_grants_of_the_same_pass() -> None:
    # a load trial: alice's T4:2 ended, and bob's two waiting T4 jobs both got one while his
    # H100 ran: 3 GPUs against his limit of 2
    gpus = make_pool("T4:2@a,H100:2@b")
    queue = [submit("j1", "bob", "T4", 1, gpus), submit("j2", "bob", "T4", 2, gpus),
             submit("j3", "eve", "T4", 3, gpus)]
    grants = schedule(gpus, [("b", 0)], queue, {"bob": 1}, room={"bob": 1})
    assert sorted(g.job_id for g in grants) == ["j1", "j3"]
    # an option past the room left is passed over, and said so; without a limit it is taken
    gpus = make_pool("T4:3@a")
    queue = [submit("j1", "bob", "T4", 1, gpus), submit("j2", "bob", "T4:2, T4", 2, gpus)]
    grants = schedule(gpus, [], queue, {}, room={"bob": 2})
    assert [(g.job_id, str(g.option)) for g in grants] == [("j1", "T4"), ("j2", "T4")]
    assert grants[1].passed_over == (("T4:2", "more GPUs than your limit leaves you now"),)
    assert [str(g.option) for g in schedule(gpus, [], queue, {})] == ["T4", "T4:2"]
    # a job blocked holds no GPUs for an option its limit rules out now (a review: alice's
    # H100:2 kept both free H100s from her own H100 job, and from everyone behind her)
    gpus = make_pool("T4:1@a,H100:2@b")
    queue = [submit("a1", "alice", "T4", 1, gpus), submit("a2", "alice", "H100:2, T4", 2, gpus),
             submit("a3", "alice", "H100", 3, gpus)]
    assert [g.job_id for g in schedule(gpus, [], queue, {}, room={"alice": 2})] == ["a1", "a3"]


def test_a_busy_note_is_given_only_when_no_option_has_enough_free() -> None:
    # a review: "H100:2, H100" with one H100 free read "H100: 1 of 2 free" as its reason
    from gpu_magic.server.gateway import Job, _busy_note, _type_use

    gpus = make_pool("H100:2@a")
    other = Job("0123456789abcdef", "v", {}, [GpuOption("H100")], [0], [], 1)
    use = _type_use(gpus, {("a", 0): other})  # (one held by another user's job)
    assert _busy_note(parse_spec("H100:2, H100").options, use, "u") is None
    assert _busy_note(parse_spec("H100:2").options, use, "u") == "H100: 1 of 2 free"


def test_a_job_s_reasons_read_by_someone_else_are_about_its_user() -> None:
    # an admin following a student's job read "your limit" and "your other jobs" as their own
    from gpu_magic.server.gateway import _reasons_of

    rec = {"state": "queued", "held": "your other jobs hold 1 of the 1 GPU(s) your limit lets "
                                      "you use at once",
           "waiting_for": "T4: 0 of 1 free, held by your job 0123",
           "dropped": [{"option": "H100:2", "reason": "asks for more than your limit of 1 "
                                                     "GPU(s) at once"}]}
    theirs = _reasons_of("bob", rec)
    assert theirs == {
        "state": "queued",
        "held": "bob's other jobs hold 1 of the 1 GPU(s) bob's limit lets bob use at once",
        "waiting_for": "T4: 0 of 1 free, held by bob's job 0123",
        "dropped": [{"option": "H100:2",
                     "reason": "asks for more than bob's limit of 1 GPU(s) at once"}]}
    assert rec["dropped"][0]["reason"].startswith("asks for more than your")  # (a copy)
    # why a grant passed its first options over, in its event and in the record's grant
    passed = [{"option": "T4:2", "reason": "more GPUs than your limit leaves you now"}]
    theirs = [{"option": "T4:2", "reason": "more GPUs than bob's limit leaves bob now"}]
    assert _reasons_of("bob", {"type": "granted", "passed_over": passed})["passed_over"] == theirs
    assert _reasons_of("bob", {"grant": {"passed_over": passed}})["grant"]["passed_over"] == theirs


def test_grant_describes_its_gpus() -> None:
    gpus = make_pool("A100-80GB:2@b")
    (grant,) = schedule(gpus, [], [submit("j0", "u", "A100", 0, gpus)])
    assert (grant.memory_gb, grant.simulated, grant.option) == (80, True, GpuOption("A100"))
    assert grant.passed_over == ()


# --- feasibility at submit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "spec", "min_memory", "kept", "dropped"),
    [
        (P, "H100:2, A100-80GB:4", None, [0, 1], []),
        (P, "T4, H100", None, [1], [("T4", "this pool has no T4 GPU")]),
        (P, "H100:4, A100-80GB", None, [1],
         [("H100:4", "no node has 4 of them (the most on one node is 2, on a)")]),
        (P, "A100-80GB:8, H100:3", None, [],
         [("A100-80GB:8", "no node has 8 of them (the most on one node is 4, on b)"),
          ("H100:3", "no node has 3 of them (the most on one node is 2, on a)")]),
        (P, "A100:4", None, [0], []),  # the family matches the 80 GB members
        (P, "any:4, any:5", None, [0], [("any:5", "no node has 5 of them (the most on one node is 4, on b)")]),
        ("T4:2@a,L4:1@b,A100-40GB:1@c", "T4, L4, A100", 24, [2], None),
        ("T4:2@a,L4:1@b,A100-40GB:1@c", "T4, any", 16, [1], None),
        ("T4:2@a,L4:1@b", "A100-80GB, L4", 24, [], None),
        # A grant is of one type: GPUs of two types on one node are not a pair.
        ("T4:1@a,L4:1@a", "any:2", None, [],
         [("any:2", "no node has 2 of them (the most on one node is 1, on a)")]),
        ("A100-40GB:1@a,A100-80GB:1@a", "A100:2, A100", None, [1],
         [("A100:2", "no node has 2 of them (the most on one node is 1, on a)")]),
    ],
    ids=["all-kept", "absent-type", "too-many-for-a-node", "none-kept", "family", "any-count",
         "min-memory", "min-memory-any", "min-memory-none", "any-pair-mixed-types",
         "a100-pair-mixed-sizes"],
)
def test_feasibility(pool: str, spec: str, min_memory: float | None, kept: list[int],
                     dropped: list[tuple[str, str]] | None) -> None:
    options = parse_spec(spec).options
    got_kept, got_dropped = feasibility(options, make_pool(pool), min_memory)
    assert got_kept == kept
    assert [o for o, _ in got_dropped] == [str(o) for i, o in enumerate(options) if i not in kept]
    if dropped is not None:
        assert got_dropped == dropped


def test_feasibility_on_an_empty_pool() -> None:
    assert feasibility([GpuOption(None)], []) == ([], [("any", "this pool has no GPU")])


def test_feasibility_counts_busy_gpus() -> None:
    """Busy GPUs free up later, so they count: feasibility is about the pool, not the moment."""
    gpus = make_pool("H100:2@a", foreign=[("a", 0), ("a", 1)])
    assert feasibility([GpuOption("H100", 2)], gpus) == ([0], [])


def test_pool_summary() -> None:
    assert pool_summary(make_pool(P)) == "A100-80GB ×4 on b, H100 ×2 on a"
    assert pool_summary([]) == "no GPUs"


def test_fair_order_interleaves_users() -> None:
    queue = [Request(f"j{i}", u, (GpuOption("H100"),), i) for i, u in enumerate("AAAB")]
    # A placed first; then both have one running, and B, served before this call, goes next
    assert [r.job_id for r in fair_order(queue, {"A": 0, "B": 1})] == ["j0", "j3", "j1", "j2"]
    assert [r.job_id for r in fair_order(queue, {})] == ["j0", "j3", "j1", "j2"]
    # A served after every submission: B, waiting since its own, goes first
    assert [r.job_id for r in fair_order(queue, {}, {"A": 3})] == ["j3", "j0", "j1", "j2"]
    # A served before B's job came: A's earlier job has waited longer
    assert [r.job_id for r in fair_order(queue, {}, {"A": 1})] == ["j0", "j3", "j1", "j2"]
    assert [r.job_id for r in fair_order(queue, {"A": 1}, {"A": 7, "B": 2})] == \
        ["j3", "j0", "j1", "j2"]


# --- purity -------------------------------------------------------------------------------------


def test_schedule_leaves_its_inputs_alone() -> None:
    gpus = make_pool("H100:2@a,A100-80GB:4@b,T4:2@c", foreign=[("c", 1)])
    queue = [submit(f"j{i}", u, s, i, gpus) for i, (u, s) in enumerate(
        [("A", "H100:2, A100-80GB:2"), ("B", "any"), ("A", "A100-80GB:4"), ("C", "T4:2, any")])]
    busy = [("a", 0), ("b", 3)]
    running = {"A": 1, "B": 0}
    before = copy.deepcopy((gpus, busy, queue, running))
    first = schedule(gpus, busy, queue, running)
    assert (gpus, busy, queue, running) == before
    assert schedule(gpus, busy, queue, running) == first  # no state carried between calls
    assert schedule(tuple(gpus), iter(busy), tuple(queue), running) == first  # any iterables


# --- properties over random pools and job streams ----------------------------------------------

MAX_RUN = 4  # steps a job runs at most
USERS = ("ann", "bob", "cyd", "dee")


@dataclass(frozen=True)
class Job:
    user: str
    options: tuple[GpuOption, ...]
    run_steps: int
    min_memory: float | None


@dataclass(frozen=True)
class Scenario:
    gpus: tuple[Gpu, ...]
    arrivals: tuple[tuple[Job, ...], ...]  # the jobs submitted at each step


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    types = draw(st.lists(st.sampled_from(sorted(CATALOGUE)), min_size=1, max_size=4, unique=True))
    gpus: list[Gpu] = []
    for n in range(draw(st.integers(1, 6))):
        node_types = draw(st.lists(st.sampled_from(types), min_size=1, max_size=len(types),
                                   unique=True))
        for t in node_types:
            for _ in range(draw(st.integers(1, 8))):
                gpus.append(Gpu(f"n{n}", sum(g.node == f"n{n}" for g in gpus), t, MEMORY[t],
                                simulated=True))
    foreign = draw(st.sets(st.integers(0, len(gpus) - 1), max_size=2))
    gpus = [dataclasses.replace(g, busy_foreign=i in foreign) for i, g in enumerate(gpus)]
    # mostly the pool's own types, sometimes a family, `any`, or a type the pool lacks
    option_type = st.one_of(st.sampled_from(types), st.sampled_from(["A100", None]),
                            st.sampled_from(sorted(CATALOGUE)))
    option = st.builds(GpuOption, option_type, st.integers(1, 4))
    min_memory = st.one_of(st.none(), st.none(), st.none(), st.sampled_from([16, 24, 40, 80]))
    job = st.builds(Job, st.sampled_from(USERS),
                    st.lists(option, min_size=1, max_size=3, unique=True).map(tuple),
                    st.integers(1, MAX_RUN), min_memory)
    arrivals = draw(st.lists(st.lists(job, max_size=5).map(tuple), min_size=1, max_size=10))
    return Scenario(tuple(gpus), tuple(arrivals))


def describe(scenario: Scenario) -> str:
    """A failing scenario in a line per step, for the report hypothesis prints."""
    foreign = [f"{g.node}/{g.index}" for g in scenario.gpus if g.busy_foreign]
    lines = [f"pool: {pool_summary(scenario.gpus)}; foreign-busy: {foreign}"]
    for step, jobs in enumerate(scenario.arrivals):
        lines.append(f"step {step}: " + "; ".join(
            f"{j.user} {', '.join(map(str, j.options))} (runs {j.run_steps}"
            + (f", more than {j.min_memory} GB" if j.min_memory is not None else "") + ")"
            for j in jobs))
    return "\n".join(lines)


@dataclass
class Sim:
    """The gateway's bookkeeping around the pure scheduler, one step at a time."""

    gpus: list[Gpu]
    queue: list[Request] = field(default_factory=list)
    running: dict[str, tuple[str, tuple[Key, ...], int]] = field(default_factory=dict)
    run_steps: dict[str, int] = field(default_factory=dict)
    granted_at: dict[str, int] = field(default_factory=dict)
    submitted_at: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)  # as the gateway keeps it
    seq: int = 0
    grants_made: int = 0

    def submit(self, job: Job, step: int) -> bool:
        kept, _ = feasibility(job.options, self.gpus)
        should = [i for i, o in enumerate(job.options) if fitting(o, self.gpus, None)]
        assert kept == should, (
            f"feasibility kept {kept} of {[str(o) for o in job.options]}, but only {should} "
            f"could ever be granted on {pool_summary(self.gpus)}")
        if job.min_memory is not None:  # an OOM retry: the gateway checks a bigger GPU exists
            kept_big, _ = feasibility([job.options[i] for i in kept], self.gpus, job.min_memory)
            assert bool(kept_big) == any(fitting(job.options[i], self.gpus, job.min_memory)
                                         for i in kept)
            if not kept_big:
                return False
        if not kept:
            return False
        self.seq += 1
        job_id = f"j{self.seq}"
        self.queue.append(Request(job_id, job.user, tuple(job.options[i] for i in kept), self.seq,
                                  tuple(kept), job.min_memory))
        self.run_steps[job_id] = job.run_steps
        self.submitted_at[job_id] = step
        return True

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for user, _, _ in self.running.values():
            out[user] = out.get(user, 0) + 1
        return out

    def schedule(self, step: int) -> list[Grant]:
        busy = [k for _, keys, _ in self.running.values() for k in keys]
        counts = self.counts()
        # the items are frozen dataclasses, so copying the containers is enough to see a change
        before = (list(self.gpus), list(busy), list(self.queue), dict(counts), dict(self.served))
        grants = schedule(self.gpus, busy, self.queue, counts, self.served)
        assert [self.gpus, busy, self.queue, counts, self.served] == list(before), \
            "schedule() changed its inputs"
        check_decisions(self.gpus, busy, self.queue, counts, grants, self.served)
        users = {r.job_id: r.user for r in self.queue}
        for g in grants:
            self.grants_made += 1
            self.served[users[g.job_id]] = self.seq  # (the latest submission, as the gateway)
            keys = tuple((g.node, i) for i in g.indices)
            self.running[g.job_id] = (users[g.job_id], keys, step + self.run_steps[g.job_id])
            self.granted_at[g.job_id] = step
        done = {g.job_id for g in grants}
        self.queue = [r for r in self.queue if r.job_id not in done]
        held = [k for _, keys, _ in self.running.values() for k in keys]
        assert len(held) == len(set(held)) <= len(self.gpus), "a GPU held by two jobs"
        return grants

    def finish(self, step: int) -> None:
        self.running = {j: r for j, r in self.running.items() if r[2] > step}


# No explain phase: on a failure it reruns the whole simulation many times over, and the note()
# with the scenario already says what happened.
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    phases=[p for p in Phase if p is not Phase.explain])


@PROPERTY
@given(scenarios())
def test_random_streams_keep_the_rules_and_everyone_runs(scenario: Scenario) -> None:
    """Every decision keeps the rules (checked by ``check_decisions``), and after arrivals stop
    every queued job runs within a bound: a job runs at most MAX_RUN steps, so within MAX_RUN + 1
    steps either someone is granted or the pool has drained and the head of the queue fits."""
    note(describe(scenario))
    sim = Sim(list(scenario.gpus))
    step = 0
    for step, jobs in enumerate(scenario.arrivals):
        sim.schedule(step)
        sim.finish(step)
        for job in jobs:
            sim.submit(job, step)
    # Arrivals stop; foreign processes end too (liveness needs held GPUs to come back).
    sim.gpus = [dataclasses.replace(g, busy_foreign=False) for g in sim.gpus]
    deadline = step + (len(sim.queue) + 1) * (MAX_RUN + 1)
    while sim.queue and step < deadline:
        step += 1
        sim.schedule(step)
        sim.finish(step)
    assert not sim.queue, (
        f"still queued at step {step} on {pool_summary(sim.gpus)}: "
        + ", ".join(f"{r.user}:{[str(o) for o in r.options]}" for r in sim.queue))


@st.composite
def shared_pools(draw: st.DrawFn) -> tuple[list[Gpu], int, list[int]]:
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    gpus = [Gpu(f"n{n}", i, "H100", 80, simulated=True)
            for n, size in enumerate(sizes) for i in range(size)]
    return gpus, draw(st.integers(2, 4)), draw(st.lists(st.integers(1, 5), min_size=1, max_size=30))


@settings(PROPERTY, max_examples=100)
@given(shared_pools())
def test_fair_share_within_one_job(setup: tuple[list[Gpu], int, list[int]]) -> None:
    """Bound: with N identical GPUs (on any nodes), U users who each always have at least N
    one-GPU jobs queued, and jobs of any run length, the users' running counts differ by at most
    1 after every schedule() call.

    Why the design guarantees it: fair_order places the next job of the user with the fewest
    running-or-placed jobs, so each call water-fills the freed GPUs from the bottom. Suppose before
    a step every count is m or m+1 and the pool is full. Jobs finishing only lower counts, and the
    freed GPUs number exactly what they lowered the total by, so water-filling brings every user
    back to m or m+1 (no user can end above where it started). The first fill starts from all
    zeros. One GPU more or less cannot be avoided, so 1 is the tightest bound."""
    gpus, n_users, run_lengths = setup
    users = USERS[:n_users]
    sim = Sim(gpus)
    made = 0
    for step in range(25):
        sim.finish(step)
        for user in users:
            while sum(r.user == user for r in sim.queue) < len(gpus):
                sim.submit(Job(user, (GpuOption("H100"),), run_lengths[made % len(run_lengths)],
                               None), step)
                made += 1
        sim.schedule(step)
        counts = [sim.counts().get(u, 0) for u in users]
        assert sum(counts) == len(gpus), "a GPU idle while jobs wait"
        assert max(counts) - min(counts) <= 1, f"step {step}: running counts {counts}"


@PROPERTY
@given(
    other_h100=st.integers(0, 3),
    other_job_steps=st.one_of(st.none(), st.integers(1, MAX_RUN)),
    stream=st.lists(st.lists(st.tuples(st.sampled_from(USERS[1:]), st.integers(1, MAX_RUN)),
                             min_size=1, max_size=3), min_size=3 * MAX_RUN, max_size=3 * MAX_RUN),
)
def test_waiting_h100x4_is_not_starved(other_h100: int, other_job_steps: int | None,
                                       stream: list[list[tuple[str, int]]]) -> None:
    """A waiting H100:4 on a node of 4 H100 runs within 2 * MAX_RUN + 1 steps while H100:1 jobs
    from other users arrive every step: its owner's other job (if any) ends within MAX_RUN
    steps, after which the H100:4 heads the queue and reserves the node, and the H100:1 jobs on
    that node end within MAX_RUN steps more."""
    pool = "H100:4@big,T4:1@t4" + (f",H100:{other_h100}@small" if other_h100 else "")
    sim = Sim(make_pool(pool))
    for i in range(4 + other_h100):  # every H100 starts busy with other users' one-GPU jobs
        sim.submit(Job(USERS[1 + i % 3], (GpuOption("H100"),), 1 + i % MAX_RUN, None), 0)
    if other_job_steps is not None:
        sim.submit(Job("ann", (GpuOption("T4"),), other_job_steps, None), 0)
    sim.schedule(0)
    assert not sim.queue
    sim.submit(Job("ann", (GpuOption("H100", 4),), MAX_RUN, None), 0)
    big = sim.queue[-1].job_id
    for step, arrivals in enumerate(stream, start=1):
        sim.finish(step)
        for user, run in arrivals:
            sim.submit(Job(user, (GpuOption("H100"),), run, None), step)
        sim.schedule(step)
        if big in sim.granted_at:
            break
    assert big in sim.granted_at, "the H100:4 never ran"
    assert sim.granted_at[big] <= 2 * MAX_RUN + 1


def test_a_job_no_node_can_run_now_says_what_it_waits_for() -> None:
    # a Ray node type that left the pool, or one an autoscaler is adding: "queued" alone
    # reads as "the GPUs are busy"
    from gpu_magic._spec import GpuSpec
    from gpu_magic.server.gateway import _absent
    from gpu_magic.server.inventory import Gpu

    pool = [Gpu("a", 0, "A100-80GB", 80), Gpu("v", 0, "H100", 80, busy_foreign=True, virtual=True)]
    opts = list(GpuSpec.parse("L4:2, H100").options)
    assert _absent(opts[:1], pool, None) == ("no node for L4:2 is in the pool now: it starts "
                                             "when one joins")
    assert _absent(opts, pool, None) == ("no node for L4:2, H100 is in the pool yet: the "
                                         "autoscaler was asked for one")
    assert _absent(list(GpuSpec.parse("A100-80GB").options), pool, None) is None


@pytest.mark.parametrize(("specs", "foreign", "busy", "expected"), [
    pytest.param(["H100"], ("a0", "a1"), (), {"j0": ["a0"]}, id="both-held-outside"),
    pytest.param(["H100"], ("a0",), ("a1",), {"j0": ["a0"]}, id="one-ours-one-outside"),
    pytest.param(["H100"], (), ("a0", "a1"), {}, id="ours-alone"),
    pytest.param(["H100:2"], ("a1",), (), {"j0": ["a1"]}, id="a-pair-one-of-which-is-outside"),
    pytest.param(["H100:2, A100-80GB"], ("a1", "b0", "b1", "b2", "b3"), (), {"j0": ["a1"]},
                 id="the-first-option-it-would-take"),
    pytest.param(["H100", "H100"], ("a0",), ("a1",), {"j0": ["a0"]},
                 id="the-queue-ahead-goes-first"),
    pytest.param(["H100", "H100"], ("a0", "a1"), (), {"j0": ["a0"], "j1": ["a1"]},
                 id="two-waiting-on-two"),
])
def test_held_outside_names_the_gpus_that_alone_keep_a_job_waiting(
        specs: list[str], foreign: tuple[str, ...], busy: tuple[str, ...],
        expected: dict[str, list[str]]) -> None:
    gpus = make_pool(P, foreign=busy_on(*foreign))
    queue = [submit(f"j{i}", f"u{i}", spec, i, gpus) for i, spec in enumerate(specs)]
    assert schedule(gpus, busy_on(*busy), queue) == []  # they wait
    got = held_outside(queue, gpus, busy_on(*busy))
    assert {j: [f"{g.node}{g.index}" for g in held] for j, held in got.items()} == expected


@pytest.mark.parametrize(("pool", "specs", "busy", "expected"), [
    pytest.param("H100:2@a", ["H100:2", "H100"], ("a0",),
                 {"j1": "1 H100 free, held for a job ahead that waits for H100:2"},
                 id="a-free-h100-held-for-a-pair"),
    pytest.param("H100:2@a", ["H100:2", "any"], ("a0",),
                 {"j1": "1 H100 free, held for a job ahead that waits for H100:2"},
                 id="any-would-take-it"),
    pytest.param("H100:4@a", ["H100:4", "H100", "H100:2"], ("a0", "a1"),
                 {"j1": "2 H100 free, held for a job ahead that waits for H100:4",
                  "j2": "2 H100 free, held for a job ahead that waits for H100:4"},
                 id="each-job-behind-is-named"),
    pytest.param("H100:2@a,A100-80GB:2@b", ["H100:2", "H100", "A100-80GB"], ("a0",),
                 {"j1": "1 H100 free, held for a job ahead that waits for H100:2"},
                 id="a-job-granted-another-type-is-not-named"),
    pytest.param("H100:2@a", ["H100:2", "H100"], ("a0", "a1"), {}, id="nothing-free-nothing-held"),
    pytest.param("H100:2@a", ["H100"], ("a0",), {}, id="no-job-ahead"),
    pytest.param("H100:2@a,H100:4@b", ["H100:4", "H100:2"], ("b0", "b1", "b2", "a0"), {},
                 id="a-pair-the-free-gpus-could-not-hold-anyway"),
])
def test_holding_names_the_free_gpus_a_job_ahead_keeps(
        pool: str, specs: list[str], busy: tuple[str, ...], expected: dict[str, str]) -> None:
    gpus = make_pool(pool)
    queue = [submit(f"j{i}", f"u{i}", spec, i, gpus) for i, spec in enumerate(specs)]
    running = {"someone": len(busy)}
    grants = schedule(gpus, busy_on(*busy), queue, running)
    # asked as the gateway asks: after the grants were made
    now_busy = busy_on(*busy) | {(g.node, i) for g in grants for i in g.indices}
    waiting = [r for r in queue if r.job_id not in {g.job_id for g in grants}]
    notes, held = holding(waiting, gpus, now_busy, running)
    assert notes == expected
    # and which GPUs are so held: the free ones of the type the first waiting job waits for
    # (only when someone is kept from them does it matter; when none is, it may be none)
    if expected:
        count = int(next(iter(expected.values())).split()[0])
        assert len(held) == count and not held & now_busy
