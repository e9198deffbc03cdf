"""The gateway's core: jobs from submit to done, around the pure scheduler and a backend.

Everything here runs on the asyncio loop of the HTTP server; backends report runner events from
their own threads through ``loop.call_soon_threadsafe``. Every job's events are numbered from 1,
kept in memory while it is live and written to SQLite in batches, so a finished job replays in full
and a client can resume its stream after a dropped connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import SpecError
from .._payload import SCHEMES, is_digest
from .._reserve import usable_cores
from .._spec import KNOWN_TYPES, GpuOption, GpuSpec, env_problem, pool_type_note
from .._version import WIRE_FORMAT, __version__
from .auth import User
from .backends.local import Handle, RunSpec
from .inventory import Gpu
from .limits import Limits, human, save_overrides, seconds
from .reserve import crowded
from .scheduler import (
    Grant,
    Request,
    fair_order,
    feasibility,
    held_outside,
    holding,
    pool_summary,
    schedule,
)
from .store import BlobError, BlobStore, Store

FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out", "lost", "expired")
DEFAULT_TIMEOUT_S = 3600.0
STREAM_EVENT_TYPES = ("stdout", "stderr", "display", "update_display", "clear_output")
# A foreground job nobody has followed for this long lost its client (kernel died, culled).
ORPHAN_TIMEOUT_S = 60.0
INLINE_EVENT_MAX = 1 << 20  # base64 text of the blobs inside one result or error event
EVALUE_KEPT = 100_000  # characters of an interrupted cell's error message (the runner's cut)
OUTCOME_EVENT_MAX = 4 << 20  # the rest of it (names, notes, a traceback's frames)
OUTSIDE_POLL_S = 2.0  # how often a GPU held outside gpu_magic is looked at while jobs wait
ENDING_GRACE_S = 15.0  # a runner that said its cell ended has this long to end, timeout or not
WITHDRAWN_S = 600.0  # how long a cancel that found no job refuses a submit of that id
WITHDRAWN_MAX = 10_000
_CHOSEN_ID = re.compile(r"[0-9a-f]{12,32}")  # an id a client may choose (api.JobSubmit)
OUTPUT_MAX = 64 << 20  # characters of output kept for one job
INBOX_STALE_S = 600.0  # an inbox file not written for this long was left by a client that died
EVENT_COST = 64  # what one output event counts against it besides its text
_OUTPUT_FIELDS = {
    "stdout": ("type", "text"), "stderr": ("type", "text"),
    "display": ("type", "data", "metadata", "display_id"),
    "update_display": ("type", "data", "metadata", "display_id"),
    "clear_output": ("type", "wait"),
}
EVENTS_KEPT_S = 60.0  # a finished job's events stay in memory this long, then only in the store
# While jobs run, the gateway touches <state-dir>/alive this often: a restart ends the jobs the
# last one was running when it was last seen, so their "ran" leaves out the time it was down.
ALIVE_NAME = "alive"
ALIVE_EVERY_S = 2.0
# Finished jobs, their events and results, and unused blobs are removed after this long.
RETENTION_S = 7 * 24 * 3600.0
START_WAIT_S = 300.0  # how long a runner that reports its start may take to have its job


class ApiError(Exception):
    """An error answered to the client as ``{"error": code, "message": ...}``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


@dataclass
class Job:
    id: str
    user: str
    request: dict[str, Any]
    options: list[GpuOption]
    option_indices: list[int]
    dropped: list[dict[str, str]]
    seq: int
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    ran_until: float | None = None  # lost to a crash: when its gateway was last seen running it
    attempt: int = 1
    grant: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] | None = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    handle: Handle | None = None
    followers: int = 0
    unfollowed_since: float = field(default_factory=time.monotonic)
    outcome: dict[str, Any] | None = None  # the runner's result or error event
    stop_reason: str | None = None  # "cancelled" or "timed_out" when we stopped the runner
    min_memory_gb: float | None = None
    gpu_cap: int | None = None  # the user's limit on GPUs held at once, when submitted
    held: str | None = None  # why it waits though GPUs may be free: the user's own limit
    # what it waits for that no job here holds: a node to join the pool, or GPUs held
    # outside gpu_magic (then ``outside`` is set); or free GPUs held for the first waiting
    # job ahead of it, so that a large request is not starved (then ``behind`` is set)
    waiting_for: str | None = None
    outside: bool = False
    behind: bool = False
    # or, when nothing else keeps it: how many of its types are free, and which of its holders
    # are its user's own jobs (then ``busy`` is set)
    busy: bool = False
    position: int | None = None  # its place in the queue its last "queued" event said
    message: str | None = None
    cancelled_by: str | None = None  # an admin who cancelled it: "carol (admin)"
    notices: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    took: int = 0  # the attempt whose runner said it has the job (its --timeout counts from then)
    start_waited: int = 0  # the attempt whose timeout came before its runner had the job
    adopting: asyncio.Future[dict[str, Any]] | None = None  # result files being stored
    # the checks of its inputs that had not ended when it was submitted (see checks.py), by
    # digest, and the wait for them once its cell ended
    input_checks: dict[str, list[Future[str | None]]] = field(default_factory=dict)
    holding: asyncio.Future[Any] | None = None
    output_bytes: int = 0  # of output events kept, all attempts
    ending: bool = False  # past its timeout, given a moment to end after saying it did
    # this attempt's cell was sent an interrupt (its user's, POST .../interrupt), and whether
    # the cell got it as a KeyboardInterrupt (the "interrupted" event was sent)
    interrupted: bool = False
    interrupt_taken: bool = False
    interrupted_by: str | None = None  # an admin who interrupted someone else's cell

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def stoppable(self) -> bool:
        """Whether a cancel or a timeout may still stop its runner: one runs, nobody has
        stopped it yet, and the cell has not ended (its results are not being stored)."""
        return self.handle is not None and self.stop_reason is None and self.adopting is None

    def record(self) -> dict[str, Any]:
        req = self.request
        return {
            "id": self.id,
            "user": self.user,
            "state": self.state,
            # a job reloaded after a restart keeps only the text of its spec
            "spec": _spec_text(req),
            "options": [str(o) for o in self.options],
            "dropped": self.dropped,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            **({"ran_until": self.ran_until} if self.ran_until else {}),
            "attempt": self.attempt,
            "grant": self.grant,
            "attempts": self.attempts,
            "message": self.message,
            "notices": self.notices,
            "background": bool(req.get("background")),
            "meta": req.get("meta") or {},
            "source": req.get("source", "")[:2000],
            # lines of its cell before the source (the %%gpu line): attach numbers as the cell
            **({"line_offset": req["line_offset"]} if req.get("line_offset") else {}),
            "seq": self.seq,
        }


# where a user may cancel their own job from, as the cell then says it ("cancelled by ...")
CANCEL_VIA = {"sidebar": "the sidebar", "magic": "%gpu cancel", "button": "the Cancel button",
              "code": "job.cancel()"}


def _spec_text(req: dict[str, Any]) -> str:
    """The request's spec as text, parsed once (a record is made several times per job; a
    job reloaded after a restart, or finished, keeps only the text)."""
    if "spec_text" not in req:
        req["spec_text"] = str(GpuSpec.from_json(req["spec"]))
    return req["spec_text"]


def _kept_request(rec: dict[str, Any]) -> dict[str, Any]:
    """What a job that is over keeps of its request: what its record shows."""
    return {"spec_text": rec.get("spec", "any"), "source": rec.get("source", ""),
            "meta": rec.get("meta", {}), "background": rec.get("background", False),
            **({"line_offset": rec["line_offset"]} if rec.get("line_offset") else {})}


def _without_inline(ev: dict[str, Any]) -> dict[str, Any]:
    # the blobs are in the store now; the event log keeps only their digests
    return {k: v for k, v in ev.items() if k != "inline"}


def _grant_json(g: Grant, gpus: list[Gpu], attempt: int) -> dict[str, Any]:
    chosen = [x for x in gpus if x.node == g.node and x.index in g.indices]
    return {
        "gpu_type": g.gpu_type,
        "count": len(g.indices),
        "node": g.node,
        "indices": list(g.indices),
        "uuids": [x.uuid for x in chosen],
        "option_index": g.option_index,
        "option": str(g.option),
        "passed_over": [{"option": o, "reason": r} for o, r in g.passed_over],
        "memory_gb": g.memory_gb,
        "simulated": g.simulated,
        "attempt": attempt,
    }


def _outside_note(gpus: list[Gpu], backend: Any) -> str | None:
    """``GPU 0 (H200) on box is in use by ...``: what a job waits for when only GPUs held
    outside gpu_magic keep it waiting. Where the backend cannot tell which GPUs they are
    (Ray counts them), how many."""
    if not gpus:
        return None
    one = len(gpus) == 1
    if getattr(backend, "outside_by_count", False):
        which = f"{len(gpus)} {gpus[0].type}" + ("" if one else "s")
    else:
        which = (f"GPU {gpus[0].index} ({gpus[0].type})" if one else
                 "GPUs " + ", ".join(str(g.index) for g in gpus) + f" ({gpus[0].type})")
    outside = getattr(backend, "outside", None) or "in use outside gpu_magic"
    return (f"{which} on {gpus[0].node} {'is' if one else 'are'} {outside}; the cell starts "
            f"when {'it is' if one else 'they are'} free")


@dataclass
class _TypeUse:
    """One GPU type of the pool in a scheduling pass: how many, and the jobs holding them."""

    total: int = 0
    held: list[Job] = field(default_factory=list)
    outside: bool = False  # some are in use by processes gpu_magic did not start


def _limit_why(held: int, cap: int) -> str:
    """Why a job waits while its user's GPU limit is used up ("queued" alone reads as "no
    GPU is free")."""
    return f"your other jobs hold {held} of the {cap} GPU(s) your limit lets you use at once"


def _third_person(text: str, user: str) -> str:
    """A reason written to a job's user, as someone else reads it (an admin)."""
    for mine, theirs in (("your other jobs", f"{user}'s other jobs"),
                         ("your jobs", f"{user}'s jobs"), ("your job", f"{user}'s job"),
                         ("your limit", f"{user}'s limit"), ("take you past", f"take {user} past"),
                         ("lets you use", f"lets {user} use"),
                         ("leaves you now", f"leaves {user} now")):
        text = text.replace(mine, theirs)
    return text


# gpu_magic's own files in an attempt's folder, read by the time the attempt has ended
_ATTEMPT_OWN = ("manifest.json", "runner.log")


def _remove(attempt: Path, whole: bool, final: bool) -> None:
    """An ended attempt's folder: all of it (``whole``: a sandboxed cell's, its working
    folder and TMPDIR, whose files the cell was told go with it), else its results' folder
    and gpu_magic's own files, and the folder itself if that leaves it empty (a cell that
    worked there may have left files of its own). Then the job's folder, if the job has ended
    and it is empty (a retry makes its next attempt's folder there). A soak trial found two
    empty folders per job, kept for the retention period."""
    if whole:
        shutil.rmtree(attempt, ignore_errors=True)
    else:
        shutil.rmtree(attempt / "out", ignore_errors=True)
        for name in _ATTEMPT_OWN:
            with contextlib.suppress(OSError):
                (attempt / name).unlink()
        with contextlib.suppress(OSError):
            attempt.rmdir()
    if final:
        with contextlib.suppress(OSError):
            attempt.parent.rmdir()


def _reasons_of(user: str, rec: dict[str, Any]) -> dict[str, Any]:
    """A job's record or event with its reasons (why it waits, what was dropped) about
    ``user``, for someone else to read."""
    out = dict(rec)
    for key in ("waiting_why", "waiting_for", "held"):
        if out.get(key):
            out[key] = _third_person(out[key], user)
    for key in ("dropped", "passed_over"):  # (a granted event's, and a record's grant's)
        if out.get(key):
            out[key] = [dict(d, reason=_third_person(d["reason"], user)) for d in out[key]]
    if isinstance(out.get("grant"), dict) and out["grant"].get("passed_over"):
        out["grant"] = _reasons_of(user, out["grant"])
    return out


def _type_use(gpus: list[Gpu], holders: dict[tuple[str, int], Job]) -> dict[str, _TypeUse]:
    """Each type's use, once per pass (not once per waiting job: a long queue asks often)."""
    use: dict[str, _TypeUse] = {}
    for g in gpus:
        if g.virtual:
            continue
        u = use.setdefault(g.type, _TypeUse())
        u.total += 1
        job = holders.get((g.node, g.index))
        if job is not None:
            u.held.append(job)
        elif g.busy_foreign:
            u.outside = True
    return use


def _busy_note(options: Sequence[GpuOption], use: dict[str, _TypeUse], user: str) -> str | None:
    """``T4: 0 of 1 free, held by your job 774f252ebdcf6275 (other.ipynb)``: for a job that
    waits only while other jobs here hold what its options ask for (no option has enough
    GPUs free; None otherwise). "queued" alone had a student look for the reason; the most
    common one is their own background job, named here. Other users' jobs are counted, never
    named. ``use``: :func:`_type_use` of this pass."""
    said: dict[str, str] = {}
    for option in options:
        for t, u in use.items():
            if not option.matches(t):
                continue
            free = u.total - len(u.held)
            if u.outside or free >= option.count:
                # (what is in use outside gpu_magic is said apart, _outside_note; with enough
                # free it waits for something else, or is granted in a moment)
                return None
            if t in said:
                continue
            mine = list({j.id: j for j in u.held if j.user == user}.values())
            text = f"{t}: {free} of {u.total} free"
            if mine:
                names = ", ".join(
                    j.id + (f" ({str(nb).rsplit('/', 1)[-1]})"
                            if (nb := (j.request.get("meta") or {}).get("notebook")) else "")
                    for j in mine)
                text += f", held by your job{'s' if len(mine) > 1 else ''} {names}"
                others = len({j.id for j in u.held if j.user != user})
                if others:  # (counted, never named)
                    text += f" and {others} other job{'s' if others != 1 else ''}"
            said[t] = text
    return "; ".join(said.values()) or None


def _absent(options: list[GpuOption], gpus: list[Gpu], min_memory: float | None) -> str | None:
    """What a waiting job waits to join the pool when no node there now could ever run it:
    a node of a type that left (Ray), or one an autoscaler is adding; None when some node
    could run it once its GPUs are free."""
    real = [g for g in gpus if not g.virtual]
    if feasibility(options, real, min_memory)[0]:
        return None
    wanted = ", ".join(dict.fromkeys(str(o) for o in options))
    if feasibility(options, gpus, min_memory)[0]:
        # (said inside the status's own parentheses: "queued for L4 (position 1; …)")
        return f"no node for {wanted} is in the pool yet: the autoscaler was asked for one"
    return f"no node for {wanted} is in the pool now: it starts when one joins"


def _outcome_digests(ev: dict[str, Any]) -> list[str]:
    """The blobs a runner's result or error event names, checked: they become file names in
    the job's folder and the user's store, and the runner runs the user's code."""
    if ev["type"] == "result":
        buffers = ev.get("buffers", [])
        if not isinstance(buffers, list):
            raise ValueError("its buffers are not a list")
        digests = [ev.get("blob"), *buffers]
        error = ev.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise ValueError("its error is not an object")
            if error.get("exception"):
                digests.append(error["exception"])
    else:
        digests = [ev["exception"]] if ev.get("exception") else []
    for d in digests:
        if not (isinstance(d, str) and is_digest(d)):
            raise ValueError(f"{str(d)[:80]!r} is not a blob digest")
    rest = len(json.dumps({k: v for k, v in ev.items() if k != "inline"}, default=str))
    if rest > OUTCOME_EVENT_MAX:
        raise ValueError(f"it is {human(rest)} without its blobs; at most "
                         f"{human(OUTCOME_EVENT_MAX)} is kept")
    inline = ev.get("inline") or {}
    if not isinstance(inline, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in inline.items()):
        raise ValueError("its inline blobs are not digests and text")
    if sum(len(v) for v in inline.values()) > INLINE_EVENT_MAX:
        raise ValueError(f"its inline blobs are larger than {human(INLINE_EVENT_MAX)}")
    return digests


def _interrupt_error(ev: dict[str, Any]) -> dict[str, Any] | None:
    """The error inside a result event of a cell its interrupt ended, as an error event (its
    fields checked: the runner runs the user's code); None when there is none."""
    error = ev.get("error")
    if not isinstance(error, dict):
        return None
    frames = error.get("traceback")
    out: dict[str, Any] = {"type": "error", "ename": str(error.get("ename", ""))[:200],
                           "evalue": str(error.get("evalue", ""))[:EVALUE_KEPT],
                           "traceback": frames if isinstance(frames, list) else [],
                           "interrupted": True}
    if error.get("exception"):
        out["exception"] = error["exception"]  # (checked with the result's own blobs)
    return out


def _not_stored(exc: BaseException, state_dir: Path) -> dict[str, Any]:
    """The outcome of a cell that finished but whose results the gateway could not keep."""
    disk = isinstance(exc, OSError) or getattr(exc, "status", None) == 507
    todo = (f"Free space on the disk of the gateway's state directory ({state_dir}), then run "
            "the cell again." if disk else "Run the cell again.")
    return {"type": "runner_error", "ename": type(exc).__name__, "cell_finished": True,
            "evalue": f"the cell finished, but its results could not be stored on the gateway: "
                      f"{str(exc).rstrip('.')}. Nothing was bound. {todo}"}


class Gateway:
    def __init__(self, backend: Any, state_dir: Path, *, max_timeout: float | None = None,
                 orphan_timeout: float = ORPHAN_TIMEOUT_S, limits: Limits | None = None,
                 retention: float = RETENTION_S, blob_reserve: int = 0,
                 user_limits: dict[str, dict[str, int]] | None = None) -> None:
        self.backend = backend
        self.state_dir = state_dir
        # the embedded local one a kernel started (its advice may name the kernel's settings)
        self.embedded = False
        # the listener large blobs may go through instead of the main port (server/bulk.py;
        # health tells each caller with a token its offer); None where serve opened none
        self.bulk: Any = None
        self.store = Store(state_dir)
        self.blobs = BlobStore(state_dir / "blobs", blob_reserve,
                               busy=lambda: crowded(len(self.running), usable_cores()))
        self.blobs.needed = self._needed_blobs
        self.jobs_dir = state_dir / "jobs"
        self.jobs_dir.mkdir(exist_ok=True, mode=0o700)
        self.max_timeout = max_timeout
        self.orphan_timeout = orphan_timeout
        self.limits = limits or Limits()
        # set by an admin at run time, kept in the state directory (see limits.py)
        self.user_limits: dict[str, dict[str, int]] = dict(user_limits or {})
        self.retention = retention
        self._last_gc = 0.0
        self._last_beat = 0.0
        # free GPUs held for the first waiting job that cannot start yet (see scheduler.py)
        self._reserved: set[tuple[str, int]] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._pool_watch: asyncio.TimerHandle | None = None
        self.jobs: dict[str, Job] = {}
        self.types_seen: dict[str, None] = {}  # the pool's types since the start, in order
        self.queue: list[str] = []
        self.running: dict[str, Job] = {}
        self._seq = 0
        # per user, the seq of the latest submission when they were last granted a job: the
        # scheduler serves users with as many jobs running by how long they have waited
        self._served: dict[str, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.last_activity = time.monotonic()
        self.closing = False  # shutting down: no job is started any more
        self.streams_ending = False  # shutting down: event streams end where they are
        self.state_lock: int | None = None  # held on the state directory (see lock.py)
        # jobs found unfinished at start: their clients may have seen more than their logs hold
        self.cut_short: set[str] = set()
        # users a reload of the tokens file removed: their running jobs are not retried
        self.revoked: set[str] = set()
        # (user, job id) of cancels that found no job, and when: a submit interrupted on its
        # way is cancelled by the id its client chose, and may come in after the cancel
        self._withdrawn: dict[tuple[str, str], float] = {}
        # users told (once) that a cell taking the default --timeout runs under the cap
        self._told_cap: set[str] = set()

    # --- life cycle ---

    def _alive_path(self) -> Path:
        return Path(self.state_dir) / ALIVE_NAME

    def _beat(self) -> None:
        """Say the gateway still runs jobs (the file's time): a restart reads when it stopped."""
        path = self._alive_path()
        try:
            now = time.time()  # this host's clock, as the jobs' times (an NFS server's may differ)
            os.utime(path, (now, now))
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                path.touch(mode=0o600)
        except OSError:
            pass

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        try:  # when the last gateway was last seen running jobs: they ended then, not now
            last_seen: float | None = self._alive_path().stat().st_mtime + ALIVE_EVERY_S
        except OSError:
            last_seen = None
        for rec in sorted(self.store.load_jobs(), key=lambda r: r.get("seq", 0)):
            request = _kept_request(rec)
            job = Job(
                id=rec["id"], user=rec["user"], request=request, options=[], option_indices=[],
                dropped=rec.get("dropped", []), seq=rec.get("seq", 0), state=rec["state"],
                created=rec.get("created", 0), started=rec.get("started"),
                finished=rec.get("finished"), ran_until=rec.get("ran_until"),
                attempt=rec.get("attempt", 1),
                grant=rec.get("grant"), attempts=rec.get("attempts", []), events=None,
                message=rec.get("message"), notices=rec.get("notices", []),
            )
            self._seq = max(self._seq, job.seq)
            self.jobs[job.id] = job
            if not job.final:
                job.events = self.store.load_events(job.id)
                was = job.state
                job.state = "lost"
                job.finished = time.time()
                # (a job queued again to be retried has run: its first attempt's time counts)
                if job.started and last_seen is not None:
                    # its "ran" must not count the time the gateway was down (its record
                    # ends now: retention counts from when the user can first see it)
                    job.ran_until = min(job.finished, max(job.started, last_seen))
                # (a queued job's request is not kept whole: its inputs' manifest and --env
                # live only as long as the gateway that took them)
                self._lose(job, was, "the gateway restarted")
                self.cut_short.add(job.id)

        # what the last gateway and its runners were writing when it stopped: no one's now
        threading.Thread(target=self._sweep, args=(sorted(self.jobs), os.getpid()), daemon=True,
                         name="gpu-magic-sweep").start()
        self._housekeeper = loop.create_task(self._housekeeping())

    def _sweep(self, job_ids: list[str], pid: int) -> None:
        """Remove the temporary files of a gateway that was killed: blobs it was receiving or
        storing (``.DIGEST.PID...`` in a user's folder: not this process's own, which may be
        written now) and what the runners of jobs that ended meanwhile were writing (their
        ``out`` folders: a result is moved out of there before its job ends)."""
        for user_dir in self.blobs.root.iterdir():
            with contextlib.suppress(OSError):
                for f in os.scandir(user_dir):
                    parts = f.name.split(".")
                    if f.name.startswith(".") and len(parts) > 2 and parts[2] != str(pid) \
                            and parts[2] != "unchecked":  # (see checks.py: not half written)
                        with contextlib.suppress(OSError):
                            os.unlink(f.path)
        for job_id in job_ids:
            for attempt in (self.jobs_dir / job_id).glob("attempt-*"):
                shutil.rmtree(attempt / "out", ignore_errors=True)
        self.blobs.sweep_inbox(time.time() - INBOX_STALE_S)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.orphan_timeout / 4))
            now = time.monotonic()
            if self.running and now - self._last_beat >= ALIVE_EVERY_S:
                self._last_beat = now
                self._beat()
            if now - self._last_gc > min(600.0, max(1.0, self.retention / 4)):
                self._last_gc = now
                self.collect_garbage()
            for job in list(self.jobs.values()):
                if (job.final and job.events is not None and job.followers == 0
                        and job.finished and time.time() - job.finished > EVENTS_KEPT_S):
                    job.events = None  # in the store: read again by whoever follows it later
                if (not job.final and not job.request.get("background") and job.followers == 0
                        and now - job.unfollowed_since > self.orphan_timeout):
                    self._orphaned(job)

    def _orphaned(self, job: Job) -> None:
        why = (f"cancelled: no client followed this foreground job for "
               f"{self.orphan_timeout:g} s (its kernel died, was restarted or lost the "
               "connection). Use %%gpu --background for jobs that should outlive the notebook.")
        job.message = why
        if job.state == "queued":
            self._dequeue(job)
            self._finish(job, "cancelled")
        elif job.stoppable:
            job.stop_reason = "cancelled"
            job.notices.append(why)
            self.backend.cancel(job.handle)

    def collect_garbage(self) -> int:
        """Remove what is older than the retention period and no live job needs; return how
        many jobs went."""
        cutoff = time.time() - self.retention
        needed = self._needed_blobs()
        gone = [j for j in self.jobs.values() if j.final and (j.finished or 0) < cutoff]
        for job in gone:
            del self.jobs[job.id]
            self.store.delete_job(job.id)
            shutil.rmtree(self.jobs_dir / job.id, ignore_errors=True)
        self.blobs.collect(cutoff, needed)
        self.blobs.sweep_inbox(time.time() - INBOX_STALE_S)
        self.blobs.make_room(0)
        return len(gone)

    def _needed_blobs(self) -> dict[str, set[str]]:
        """The input blobs of the jobs not yet ended, by user: never removed."""
        needed: dict[str, set[str]] = {}
        for job in list(self.jobs.values()):
            if not job.final:
                inputs = job.request.get("inputs") or {}
                needed.setdefault(job.user, set()).update(
                    [inputs.get("pickle", ""), *inputs.get("buffers", [])])
        return needed

    def set_user_limits(self, user: User, overrides: dict[str, int]) -> None:
        """An admin's limits for one user, in force at once: a job held by the old ones is
        looked at again now (raised, it starts; lowered, it says so while it waits), and each
        of the user's queued jobs loses the options the new limit rules out, as at submit: one
        left with none fails now rather than wait for what it can never be granted."""
        try:  # kept first: a limit a restart would lose is not taken
            save_overrides(self.state_dir, {**self.user_limits, user.name: overrides})
        except OSError as exc:
            raise ApiError(507, "state_unwritable",
                           f"the gateway cannot write its state directory {self.state_dir} "
                           f"({exc.strerror or exc}), so {user.name}'s limits are unchanged. "
                           "Free space on that disk (whoever runs the gateway), then set them "
                           "again.") from None
        self.user_limits[user.name] = overrides
        limits = self.limits_for(user)
        for job in [self.jobs[i] for i in self.queue if self.jobs[i].user == user.name]:
            if job.id in self.queue:  # (one failing starts the next: not this user's, over it)
                self._limit_changed(job, user, limits)
        self._schedule()

    def tokens_reloaded(self, users: dict[str, User], removed: set[str]) -> tuple[int, int]:
        """The tokens file was read again: the ``removed`` users' jobs are revoked (see
        ``_revoke``), and each queued job of the others is worked out again under their limits
        now, as after an admin's PUT (it kept the limit it was submitted under, and a raised
        one left its larger options waiting for nothing). Returns ``_revoke``'s counts."""
        counts = self._revoke(removed, set(users))
        for job in [self.jobs[i] for i in self.queue]:
            user = users.get(job.user)
            if user is not None and job.id in self.queue:
                self._limit_changed(job, user, self.limits_for(user))
        self._schedule()
        return counts

    def _limit_changed(self, job: Job, user: User, limits: Limits) -> None:
        """A queued job's options under its user's new limits (see set_user_limits): worked
        out again from its spec as written, so a raised limit gives back what a lower one
        dropped."""
        gpus = self.gpus()
        try:
            spec = GpuSpec.parse(str(GpuSpec.from_json(job.request["spec"])),
                                 extra_types=sorted({g.type for g in gpus}))
        except SpecError:  # (a type of its own that left a changing pool: it waits as it was)
            return
        kept, dropped = feasibility(list(spec.options), gpus)
        if not kept:  # (the pool's doing, not the limit's: the queue says what it waits for)
            return
        try:
            kept, over = self._within_gpu_limit(user, spec, kept, limits)
        except ApiError as exc:
            self._dequeue(job)
            job.message = (f"{exc.message} Your limit was changed while this job waited in "
                           "the queue; nothing ran.")
            self._finish(job, "failed")
            return
        job.gpu_cap = limits.max_gpus
        now = [{"option": o, "reason": r} for o, r in dropped + over]
        if kept != job.option_indices or now != job.dropped:
            job.options = [spec.options[i] for i in kept]
            job.option_indices, job.dropped = kept, now
            self._emit_queued(job)

    def limits_for(self, user: User) -> Limits:
        return self.limits.for_user({**user.limits, **self.user_limits.get(user.name, {})})

    def follow(self, job: Job, delta: int) -> None:
        """A client started (+1) or stopped (-1) following the job's events."""
        job.followers = max(0, job.followers + delta)
        if job.followers == 0:
            job.unfollowed_since = time.monotonic()

    async def streams_told(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until no client follows a job any more: each
        stream ends after its job's ``done``, once that is sent."""
        assert self.loop is not None
        deadline = self.loop.time() + timeout
        while any(j.followers for j in self.jobs.values()) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)

    def end_streams(self) -> None:
        """End every event stream at the event it has reached (the gateway is stopping)."""
        self.streams_ending = True
        for job in self.jobs.values():
            waiters, job.waiters = job.waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def drain(self, timeout: float = 10.0) -> None:
        """Stop starting jobs, and let results being stored finish (their jobs then end as
        they ran, instead of as lost)."""
        self.closing = True
        pending = [f for j in self.running.values() for f in (j.adopting, j.holding)
                   if f is not None and not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
            await asyncio.sleep(0)  # the jobs' own callbacks (their ends) run first

    def _lose(self, job: Job, was: str, cause: str) -> None:
        """End a job its gateway cannot see through (it stops, or stopped) as lost."""
        if was != "queued" and not any(a.get("attempt") == job.attempt for a in job.attempts):
            # the attempt it lost is one it made (its record listed none after a restart)
            job.attempts.append({"attempt": job.attempt, "grant": job.grant, "rc": None,
                                 "outcome": "lost"})
        job.message = (
            f"{cause} while this job waited in the queue; nothing ran. Run the cell again."
            if was == "queued" and not job.started else
            f"{cause} while this job waited to be retried (attempt {job.attempt}); its "
            "output so far is kept. Run the cell again." if was == "queued" else
            f"{cause} while this job was {was}; its output so far is kept. Run the cell again.")
        self._emit(job, {"type": "done", "state": "lost", "message": job.message,
                         "timings": self._timings(job)})
        self.store.save_job(self._record(job))

    def lose_unfinished(self, why: str) -> tuple[int, int]:
        """Stopping: the jobs that have not ended end now, as lost, saying why (the next
        gateway on this state directory said only that it had restarted). How many of them
        were running and queued."""
        running = queued = 0
        for job in list(self.jobs.values()):
            if job.final:
                continue
            was = job.state
            running, queued = running + (was != "queued"), queued + (was == "queued")
            job.state, job.finished = "lost", time.time()
            self._dequeue(job)
            self._lose(job, was, f"the gateway was stopped ({why})")
        return running, queued

    def close(self) -> None:
        self.closing = True
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        self.backend.shutdown()
        self.store.close()
        self.blobs.close()

    def _sandboxed(self) -> bool:
        """Whether runners run in the sandbox of a shared gateway (each user's cell apart)."""
        return self.backend.name == "local" and getattr(self.backend, "isolation", "none") != "none"

    def runners_see_reserve(self) -> bool:
        """Whether runners may write results over the blob reserve's files: only runners on
        this host outside a sandbox (a sandboxed one could keep a reserve file open and read
        what another user writes into it later)."""
        return (self.blobs.reserve.cap > 0 and self.backend.name == "local"
                and not self._sandboxed())

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    # --- queries ---

    def gpus(self) -> list[Gpu]:
        gpus = self.backend.inventory()
        for g in gpus:
            self.types_seen.setdefault(g.type)
        return gpus

    def types_gone(self, gpus: list[Gpu]) -> list[str]:
        """Types this pool had since the gateway started and has no node for now (a Ray
        node of its own type that left): still GPU types, a cell may wait for them."""
        now = {g.type for g in gpus}
        return [t for t in self.types_seen if t not in now]

    def pool(self) -> dict[str, Any]:
        gpus = self.gpus()
        held = {(j.grant["node"], i): j for j in self.running.values() if j.grant
                for i in j.grant["indices"]}
        types: dict[str, dict[str, Any]] = {}
        nodes: dict[str, dict[str, Any]] = {}
        for g in gpus:
            busy = (g.node, g.index) in held or g.busy_foreign
            # free, but no job but the first waiting one may take it ("1 H100 free" while a
            # cell for one H100 queued read as a bug)
            kept = not busy and (g.node, g.index) in self._reserved
            t = types.setdefault(g.type, {"type": g.type, "free": 0, "total": 0, "held": 0,
                                          "memory_gb": g.memory_gb, "simulated": g.simulated})
            t["total"] += 1
            t["free"] += 0 if busy else 1
            t["held"] += 1 if kept else 0
            n = nodes.setdefault(g.node, {"name": g.node, "gpus": []})
            entry = g.to_json()
            entry["busy"] = busy
            entry["held"] = kept
            entry["foreign"] = g.busy_foreign
            n["gpus"].append(entry)
        return {
            "simulated": bool(getattr(self.backend, "simulated", False)),
            "backend": self.backend.name,
            "types": sorted(types.values(), key=lambda t: (t["memory_gb"] or 0, t["type"])),
            "types_gone": self.types_gone(gpus),
            "nodes": list(nodes.values()),
            "queue_length": len(self.queue),
            "running": len(self.running),
            "notes": self.pool_notes(gpus),
        }

    def pool_notes(self, gpus: list[Gpu] | None = None) -> list[str]:
        """What may be wrong with the pool as configured: simulated types, or the types a Ray
        type map gives, that are not in the catalogue (``H1000``: did you mean H100?)."""
        names = sorted({g.type for g in (self.gpus() if gpus is None else gpus) if g.simulated})
        backend_notes = getattr(self.backend, "pool_notes", None)
        return ([n for n in map(pool_type_note, names) if n]
                + (backend_notes() if backend_notes is not None else []))

    def job_for(self, user: User, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        # someone else's job is answered exactly like a job that does not exist
        if job is None or (job.user != user.name and not user.admin):
            raise ApiError(404, "no_such_job", f"there is no job {job_id!r} of yours on this gateway")
        return job

    def jobs_of(self, user: User, everyone: bool = False, limit: int | None = None,
                ) -> tuple[list[dict[str, Any]], int]:
        """The user's jobs (an admin's ``everyone``: every user's) and how many there are:
        with ``limit``, those not ended and the ``limit`` that ended last. (A soak trial's
        week of cells was 5,000 records, 3.9 MB at each of the sidebar's polls.)"""
        positions = self._positions()  # (once for all the records)
        theirs = [j for j in self.jobs.values()
                  if j.user == user.name or (everyone and user.admin)]
        chosen = theirs
        if limit is not None and len(theirs) > limit:
            # (by their end: a three-day job that ended after sixty short cells is the one
            # its user looks for)
            ended = sorted((j for j in theirs if j.final),
                           key=lambda j: j.finished or j.created)
            kept = {j.id for j in ended[-limit:]} if limit else set()
            chosen = [j for j in theirs if not j.final or j.id in kept]
        return [self.view(j, user, positions) for j in chosen], len(theirs)

    def view(self, job: Job, viewer: User, positions: dict[str, int] | None = None
             ) -> dict[str, Any]:
        """The job's record as the API shows it to ``viewer``: without its place in the
        gateway's submission order (its gaps would count everyone else's jobs), and, to an
        admin looking at someone else's job, its reasons in the third person ("your limit"
        was read as the admin's own)."""
        rec = self._record(job, positions)
        rec.pop("seq", None)
        return rec if job.user == viewer.name else _reasons_of(job.user, rec)

    def event_for(self, ev: dict[str, Any], job: Job, viewer: User) -> dict[str, Any]:
        """A job's event as ``viewer`` reads it: to an admin following someone else's job,
        its reasons in the third person, as ``view`` does for its record."""
        return ev if job.user == viewer.name else _reasons_of(job.user, ev)

    def _positions(self) -> dict[str, int]:
        """Each queued job's place in the queue, from 1, in the order the scheduler grants in
        (fair share), not the order of submission: a user with fewer jobs running goes ahead
        of another's earlier ones."""
        running: dict[str, int] = {}
        for j in self.running.values():
            running[j.user] = running.get(j.user, 0) + 1
        reqs = [Request(j.id, j.user, (), j.seq) for j in (self.jobs[i] for i in self.queue)]
        return {r.job_id: n for n, r in enumerate(fair_order(reqs, running, self._served), 1)}

    def _record(self, job: Job, positions: dict[str, int] | None = None) -> dict[str, Any]:
        rec = job.record()
        if job.state == "queued" and job.id in self.queue:
            rec["queue_position"] = (self._positions() if positions is None else positions)[job.id]
            if job.held or job.waiting_for:  # what keeps it waiting, if not the jobs ahead
                rec["waiting_why"] = job.held or job.waiting_for
        return rec

    # --- submit and cancel ---

    def check_wire(self, body: dict[str, Any]) -> None:
        """Refuse a kernel whose gpu_magic writes other pickles than this gateway's runners
        read (see WIRE_FORMAT). A runner in the kernel's own Python has the kernel's. (The
        route calls it before it keeps the job's inline blobs, then ``submit``.)"""
        if getattr(self.backend, "client_python", False):
            return
        meta = body.get("meta") or {}
        wire = meta.get("wire")
        if wire == str(WIRE_FORMAT):
            return
        theirs = (f"{str(meta.get('gpu_magic'))[:40]}, wire format {str(wire)[:40]}" if wire
                  else "0.1.0 or older, from before wire formats")
        raise ApiError(409, "wire_format",
                       f"this kernel's gpu_magic ({theirs}) and the one this gateway runs cells "
                       f"with (gpu_magic {__version__}, wire format {WIRE_FORMAT}) cannot read "
                       "each other's inputs and results: nothing was sent to a GPU. Install "
                       f"gpu-magic=={__version__} where the kernel runs and restart the kernel, "
                       "or ask whoever runs the gateway to run the kernel's version.")

    def submit(self, user: User, body: dict[str, Any]) -> Job:
        if self.store.error is not None:
            # what the job printed and how it ended could not be kept
            raise ApiError(507, "state_unwritable",
                           f"the gateway cannot write its state directory {self.state_dir} "
                           f"({self.store.error}), so it takes no new job for now: nothing "
                           "was sent to a GPU. Free space on that disk (whoever runs the "
                           "gateway), then run the cell again.")
        gpus = self.gpus()
        pool_types = sorted({g.type for g in gpus}) + self.types_gone(gpus)
        try:
            spec = GpuSpec.from_json(body["spec"])
            spec = GpuSpec.parse(str(spec), extra_types=pool_types)
        except SpecError as exc:
            raise ApiError(422, "bad_spec", str(exc)) from None
        problem = env_problem(body.get("env") or {})
        if problem:
            raise ApiError(422, "bad_env", problem)
        limits = self.limits_for(user)
        if len(body["source"]) > limits.max_source_chars:
            raise ApiError(413, "too_large",
                           f"the cell has {len(body['source'])} characters; this gateway takes "
                           f"at most {limits.max_source_chars}. Move data out of the source into "
                           "variables (they travel as blobs).")
        # the live jobs only: every job kept for retention would make each submit slower
        active = (sum(1 for i in self.queue if self.jobs[i].user == user.name)
                  + sum(1 for j in self.running.values() if j.user == user.name))
        if limits.max_jobs == 0:  # nothing to wait for: waiting or cancelling cannot help
            raise ApiError(429, "too_many_jobs",
                           f"your limit on this gateway is 0 jobs "
                           f"({self._limit_origin(user, 'max_jobs')}), so no job of yours can "
                           "run here. Ask whoever runs the gateway (your instructor) to raise it.")
        if limits.max_jobs is not None and active >= limits.max_jobs:
            # the GPU limit named too, when it refuses the spec whatever runs: fixing the
            # first refusal only to meet the second read as being refused twice for one cell
            also = self._gpu_limit_refusal(user, spec, range(len(spec.options)), limits)
            raise ApiError(429, "too_many_jobs",
                           f"you have {active} job{'s' if active != 1 else ''} queued or "
                           "running; your limit is "
                           f"{limits.max_jobs} at once ({self._limit_origin(user, 'max_jobs')}). "
                           "Wait for one to finish or cancel one (%gpu jobs, %gpu cancel ID)."
                           + (f" Also, {also}" if also else ""))
        digests = [body["inputs"]["pickle"], *body["inputs"]["buffers"]]
        # before asking what is there: a check that fails later removes its blob first
        paths = {self.blobs.path(user.name, d): d for d in digests}
        input_checks = {paths[p]: fs for p, fs in self.blobs.checks.pending(list(paths)).items()}
        missing = self.blobs.missing(user.name, digests)
        if missing:
            raise ApiError(409, "missing_blobs",
                           f"the gateway does not hold {len(missing)} input blob(s); upload them "
                           "and submit again", missing=missing)
        total = self.blobs.total_size(user.name, digests)
        if total > limits.max_job_bytes:
            raise ApiError(413, "too_large",
                           f"the job's inputs are {human(total)}; this gateway takes at most "
                           f"{human(limits.max_job_bytes)} per job. Send less, or load the data "
                           "inside the cell from storage the GPU machine can reach.")
        self.blobs.touch(user.name, digests)  # (used now: never what makes room below)
        if self.loop is not None:  # a same-host client's inputs came without an upload
            self.loop.run_in_executor(None, self.blobs.make_room, 0)
        kept, dropped = feasibility(list(spec.options), gpus)
        if not kept and body.get("wait") is not None and self._pool_changes():
            # asked to wait, on a pool whose nodes come and go: a node of a GPU type there is
            # may join within --wait (the queue says what it waits for, the wait's end that
            # none came); a type nobody knows (a typo) is refused all the same
            # (every option was dropped, in order; one no node has enough of stays dropped)
            there, gone = {g.type for g in gpus}, set(self.types_gone(gpus))
            joinable = [i for i, o in enumerate(spec.options)
                        if (o.type is None and not gpus)
                        or ((o.type in KNOWN_TYPES or o.type in gone) and o.type not in there)]
            if joinable:
                kept = joinable
                dropped = [d for i, d in enumerate(dropped) if i not in joinable]
        if not kept:
            raise ApiError(422, "no_feasible_option", self._refusal(spec, dropped, gpus))
        kept, over = self._within_gpu_limit(user, spec, kept, limits)
        dropped += over
        asked = body.get("timeout")
        timeout = asked or DEFAULT_TIMEOUT_S
        notices = []
        if self.max_timeout and timeout > self.max_timeout:
            # said whether the cell asked for more or took the default: either way it will be
            # stopped sooner than its user expects; for the default, once per user (two trials:
            # on every cell of a class it read as a warning about each)
            instead = (f"its --timeout of {seconds(timeout)} s" if asked else
                       f"the default of {seconds(timeout)} s")
            if asked or user.name not in self._told_cap:
                if not asked:
                    self._told_cap.add(user.name)
                notices.append(f"this gateway caps --timeout at {seconds(self.max_timeout)} s; "
                               f"the job runs with that instead of {instead}")
            timeout = self.max_timeout
        # (what the cell asked for, None for the default: its timeout message says which);
        # the submitting process came in meta, which the job's record shows: kept apart
        meta = dict(body.get("meta") or {})
        session = meta.pop("session", None)
        meta.pop("wire", None)  # (checked above; not the cell's news)
        meta.pop("gpu_magic", None)
        # the digests its client knows: its runner names large results by pieces only for
        # one that does (an older client would not know a result it sends back by that name)
        known = meta.pop("digests", None)  # ("xxh3-128,xxh3-128-16m": meta holds strings)
        digests = [d for d in str(known or "").split(",") if d in SCHEMES]
        body = dict(body, timeout=timeout, timeout_asked=asked, meta=meta, session=session,
                    digests=digests)
        job_id = body.get("id") or secrets.token_hex(8)
        withdrawn = self._withdrawn.pop((user.name, job_id), None)
        if withdrawn is not None and time.monotonic() - withdrawn <= WITHDRAWN_S:
            raise ApiError(409, "job_cancelled",
                           f"job {job_id} was cancelled before the gateway took it (its cell "
                           "was interrupted while submitting): nothing ran. Run the cell again.")
        if job_id in self.jobs:
            raise ApiError(409, "job_exists", f"a job with id {job_id!r} exists already; "
                           "let the client choose a fresh random id or none")
        self._seq += 1
        job = Job(
            id=job_id,
            user=user.name,
            request=body,
            options=[spec.options[i] for i in kept],
            option_indices=kept,
            dropped=[{"option": o, "reason": r} for o, r in dropped],
            seq=self._seq,
            notices=notices,
            gpu_cap=limits.max_gpus,
            input_checks=input_checks,
        )
        self.jobs[job.id] = job
        self.queue.append(job.id)
        if body.get("background"):  # its client may come back for it after a restart
            self.store.save_job_now(self._record(job))
        else:
            self.store.save_job(self._record(job))
        if body.get("wait") is not None and self.loop is not None:
            self.loop.call_later(float(body["wait"]), self._wait_expired, job.id)
        # said in its first event already (a second one just after read as a change)
        note = _busy_note(job.options, _type_use(gpus, self._holders()), user.name)
        job.waiting_for, job.busy = note, note is not None
        self._emit_queued(job)
        self._schedule()
        return job

    def _within_gpu_limit(self, user: User, spec: GpuSpec, kept: list[int], limits: Limits,
                          ) -> tuple[list[int], list[tuple[str, str]]]:
        """Which of ``kept`` (positions in ``spec``) the user's limit on GPUs held at once lets
        them have, and those it rules out, said why; refused (429) when it rules out all."""
        refusal = self._gpu_limit_refusal(user, spec, kept, limits)
        if refusal:
            raise ApiError(429, "too_many_gpus", refusal)
        if limits.max_gpus is None:
            return kept, []
        over = [i for i in kept if spec.options[i].count > limits.max_gpus]
        # never granted to this user: dropped now, and said, not passed over in silence
        return [i for i in kept if i not in over], [
            (str(spec.options[i]), f"asks for more than your limit of {limits.max_gpus} GPU(s) "
                                   "at once") for i in over]

    def _gpu_limit_refusal(self, user: User, spec: GpuSpec, options: Iterable[int],
                           limits: Limits) -> str | None:
        """Why the user's GPU limit refuses every one of ``options`` (positions in ``spec``),
        or None when it leaves one."""
        if limits.max_gpus == 0:
            return (f"your limit on this gateway is 0 GPUs "
                    f"({self._limit_origin(user, 'max_gpus')}), so no job of yours can run "
                    "here. Ask whoever runs the gateway (your instructor) to raise it.")
        if limits.max_gpus is None or any(spec.options[i].count <= limits.max_gpus
                                          for i in options):
            return None
        return (f"every option of '{spec}' asks for more than your limit of "
                f"{limits.max_gpus} GPU(s) at once "
                f"({self._limit_origin(user, 'max_gpus')}); ask for fewer.")

    def _limit_origin(self, user: User, key: str) -> str:
        """Who set this user's ``max_jobs`` or ``max_gpus``: an admin, the tokens file or the
        gateway's default for everyone (which of them a user asks to change it differs)."""
        if key in self.user_limits.get(user.name, {}):
            return "set for you by an admin"
        if key in user.limits:
            return "set for you in the gateway's tokens file"
        flag = {"max_jobs": "--max-jobs-per-user", "max_gpus": "--max-gpus-per-user"}[key]
        return f"this gateway's limit for every user, {flag}"

    def _timeout_message(self, req: dict[str, Any]) -> str:
        """Why a cell was stopped at its time limit, and a longer limit that can be had."""
        t = float(req.get("timeout") or DEFAULT_TIMEOUT_S)
        asked = req.get("timeout_asked", t)  # (absent: a job from before it was kept)
        limit = (f"its --timeout of {seconds(t)} s" if asked is not None
                 else f"the default time limit of {seconds(t)} s (no --timeout given)")
        cap = self.max_timeout
        if cap and t >= cap:
            # no --timeout can help here: never suggest one the cap would cut again
            if asked is None:
                was = f"; the cell gave no --timeout, whose default is {seconds(DEFAULT_TIMEOUT_S)} s"
            elif asked > cap:
                was = f"; the cell asked for {seconds(asked)} s"
            else:
                was = ""
            return (f"the cell ran longer than {seconds(cap)} s, the most this gateway allows "
                    f"(its --max-timeout{was}), and was stopped; its output so far is kept. A "
                    "larger --timeout cannot help here: split the work into shorter cells, ask "
                    "whoever runs the gateway to raise --max-timeout, or run it on a gateway "
                    "whose cap is higher.")
        more = seconds(min(math.ceil(t * 2), cap) if cap else math.ceil(t * 2))
        allows = f" (this gateway allows up to {seconds(cap)} s)" if cap else ""
        # the whole line to paste: without its spec, %%gpu would ask for another GPU (one
        # that asked for any GPU wrote none: its line is the same without it)
        spec = _spec_text(req)
        line = f"%%gpu --timeout {more}" if spec == "any" else f"%%gpu {spec} --timeout {more}"
        return (f"the cell ran longer than {limit} and was stopped; its output so far is kept. "
                f"Raise the limit: {line} (timeout={more} in Python)"
                f"{allows}.")

    def _refusal(self, spec: GpuSpec, dropped: list[tuple[str, str]], gpus: list[Gpu]) -> str:
        reasons = "; ".join(f"{o}: {r}" for o, r in dropped)
        if not gpus and self.backend.name == "ray":  # nodes come and go: none is there now
            where = getattr(self.backend, "address", "")
            return (
                f"no option of '{spec}' can run now: the Ray cluster of this gateway"
                f"{f' ({where})' if where and where != 'auto' else ''} has no GPU node at the "
                "moment (none has joined, or they all left, or the cluster is down). %gpu pool "
                "shows GPUs as nodes join; run the cell again then (with --wait SECONDS it "
                "waits that long for one), or ask whoever runs the cluster."
            )
        if not gpus and self.embedded:
            return (
                f"no option of '{spec}' can run here: this gateway has no GPUs (NVML found none "
                "and no simulated pool was configured). To try gpu_magic without a GPU, run "
                "%env GPU_MAGIC_SIMULATE=H100:2,A100-80GB:4 in a cell (the next %%gpu cell "
                "starts a simulated pool); to use a GPU server, set GPU_MAGIC_URL and "
                "GPU_MAGIC_TOKEN, or run %gpu connect URL."
            )
        if not gpus:  # a served one: its users cannot change its pool, whoever runs it can
            return (
                f"no option of '{spec}' can run here: this gateway has no GPUs (NVML found none "
                "on its host, and it was not started with a simulated pool). Tell whoever runs "
                "it: a GPU host needs NVIDIA's driver for its GPUs to be found, or, for a pool "
                "without GPUs, `gpu-magic serve --simulate 'H100:2,A100-80GB:4'`. Or use "
                "another gateway: %gpu connect URL."
            )
        types = sorted({g.type for g in gpus})
        # a typo in the simulated pool (H1000) is why H100 can never run: say so here, where
        # the user of an embedded gateway, who never sees its log, notices
        notes = "".join(f" Note: {n}." for n in self.pool_notes(gpus))
        if self.backend.name == "ray":  # nodes join and leave: "ever" would be too strong
            return (
                f"no option of '{spec}' can run on the Ray cluster as it is now ({reasons}). It "
                f"has {pool_summary(gpus)}; ask for one of {', '.join(types)}, or 'any', or "
                "wait for a node of the type you want to join (--wait SECONDS; the gateway's "
                f"--ray-autoscale declares types an autoscaler can add).{notes}"
            )
        return (
            f"no option of '{spec}' can ever run on this pool ({reasons}). The pool has "
            f"{pool_summary(gpus)}; ask for one of {', '.join(types)}, or 'any'.{notes}"
        )

    def _pool_changes(self) -> bool:
        """Whether the pool changes by itself (Ray: nodes join and leave)."""
        return getattr(self.backend, "waiting", None) is not None

    def cancel(self, user: User, job_id: str, via: str | None = None) -> Job:
        """``via``: where its own user cancelled it, when not from the cell (``sidebar``,
        ``%gpu cancel``): the cell's status says so, as it says "by the Cancel button".
        A cancel that finds no job of that id withdraws it for a while: a submit of it that
        was still on its way is refused, not run with nobody following it."""
        if job_id not in self.jobs and _CHOSEN_ID.fullmatch(job_id):
            self._withdraw(user.name, job_id)
        job = self.job_for(user, job_id)
        if job.final:
            return job
        # an admin's cancel says who: its user did not ask for it
        admin = f"{user.name} (admin)" if user.name != job.user else None
        who = admin or CANCEL_VIA.get(via or "")
        # (said in the job's record as its cell says it: the sidebar showed "cancelled" bare)
        by = f" by {who}" if who else ""
        if job.state == "queued":
            job.cancelled_by = who
            self._dequeue(job)
            job.message = (f"cancelled{by} while queued; nothing ran" if not job.started else
                           f"cancelled{by} while queued to be retried (attempt {job.attempt}); "
                           "its output so far is kept")
            self._finish(job, "cancelled")
        elif job.stoppable:  # (the first cancel that stops it says who did)
            job.stop_reason = "cancelled"
            job.cancelled_by = who
            if by:
                job.message = f"cancelled{by} while running; the output so far is kept"
            self.backend.cancel(job.handle)
        return job

    def _withdraw(self, user: str, job_id: str) -> None:
        now = time.monotonic()
        held = self._withdrawn
        for key in [k for k, t in held.items() if now - t > WITHDRAWN_S]:
            del held[key]
        while len(held) >= WITHDRAWN_MAX:  # (a client cancelling made-up ids stays bounded)
            del held[next(iter(held))]
        held[(user, job_id)] = now

    def _revoke(self, names: set[str], present: set[str]) -> tuple[int, int]:
        """Users a reload of the tokens file removed (``names``; ``present``: those it has):
        their queued jobs are cancelled (a revoked student's ten queued cells must not go on
        to take GPUs), their running ones go on to their end, as the docs promise, never to
        be retried. Returns (cancelled, still running)."""
        self.revoked = (self.revoked | names) - present
        live = [j for j in self.jobs.values() if j.user in names and not j.final]
        queued = [j for j in live if j.state == "queued"]
        for job in queued:  # all out of the queue first: finishing one schedules the rest
            self._dequeue(job)
        for job in queued:
            # (its cell, still following, says it as "cancelled by ...")
            job.cancelled_by = "the removal of your token from the gateway's tokens file"
            # (named, not "your": the admin reads this record too)
            job.message = (f"cancelled while queued: {job.user}'s token was removed from the "
                           "gateway's tokens file; " + ("nothing ran" if not job.started else
                                                        "its output so far is kept"))
            self._finish(job, "cancelled")
        return len(queued), len(live) - len(queued)

    def interrupt(self, user: User, job_id: str) -> Job:
        """Interrupt a running cell, as Jupyter's interrupt does a local one: a
        KeyboardInterrupt in the cell (its except and finally blocks run, what it bound
        comes back). Only the cell's own process gets it, not the processes it started."""
        job = self.job_for(user, job_id)
        if job.state == "queued":
            raise ApiError(409, "job_queued",
                           f"job {job_id} is queued: no cell of it runs yet, so there is nothing "
                           f"to interrupt. Cancel it instead (DELETE /v1/jobs/{job_id}, or "
                           f"%gpu cancel {job_id}).")
        if job.final or not job.stoppable or job.outcome is not None:
            now = "has ended" if job.final else "is ending (its cell is over)"
            raise ApiError(409, "job_ended",
                           f"job {job_id} {now}: state {job.state}; there is no running cell "
                           "to interrupt")
        interrupt = getattr(self.backend, "interrupt", None)
        if interrupt is None:
            raise ApiError(409, "cannot_interrupt",
                           f"this gateway's {self.backend.name} backend cannot interrupt a "
                           f"running cell, only cancel it (DELETE /v1/jobs/{job_id}, or "
                           f"%gpu cancel {job_id}); the cell's results are then not kept")
        job.interrupted = True
        if user.name != job.user:
            job.interrupted_by = user.name
        interrupt(job.handle)
        return job

    def _dequeue(self, job: Job) -> None:
        if job.id in self.queue:
            self.queue.remove(job.id)

    def _wait_expired(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state != "queued" or job.attempt > 1:
            return
        self._dequeue(job)
        wait = job.request.get("wait")
        spec = f"'{GpuSpec(tuple(job.options))}'"
        late = f"{spec} did not start within --wait {seconds(wait)} s"
        if job.held:
            job.message = (f"{late}: {job.held}; nothing ran. Let one of them finish "
                           "(job.wait()) or cancel one, then run this again, or wait longer "
                           "(--wait).")
        elif job.waiting_for and job.behind:
            job.message = (f"{late}: {job.waiting_for}, which goes first so that a large "
                           "request is not starved; nothing ran. Wait longer (--wait), or add "
                           "fallback options (%gpu pool shows what is free).")
        elif job.waiting_for and job.outside:
            job.message = (f"{late}: {job.waiting_for.partition(';')[0]}; nothing ran. Wait "
                           "longer (--wait) or add fallback options (%gpu pool shows what is "
                           "free).")
        elif job.waiting_for and not job.busy:
            why = ("no node for it joined the pool (the autoscaler was asked for one)"
                   if "autoscaler" in job.waiting_for else "no node for it is in the pool")
            job.message = (f"{late}: {why}; nothing ran. Wait longer (--wait), or add fallback "
                           "options (%gpu pool shows what is there).")
        else:
            # (not "no GPU became free": one may have, and gone to a job ahead of it)
            pool = " of the simulated pool" if getattr(self.backend, "simulated", False) else ""
            why = f" ({job.waiting_for})" if job.waiting_for else ""
            job.message = (f"{spec} got no GPU{pool} within --wait {seconds(wait)} s{why}; "
                           "nothing ran. Wait longer (--wait), add fallback options, or try "
                           "again later (%gpu pool shows what is free).")
        self._finish(job, "expired")

    # --- scheduling ---

    def _schedule(self) -> None:
        if self.closing:
            return
        if not self.queue:
            self._reserved = set()
            self._watch_pool([])
            return
        gpus = self.gpus()
        busy = [(j.grant["node"], i) for j in self.running.values() if j.grant
                for i in j.grant["indices"]]
        running_per_user: dict[str, int] = {}
        for j in self.running.values():
            running_per_user[j.user] = running_per_user.get(j.user, 0) + 1
        held = self._held_by_user()
        reqs = []
        waits: dict[str, str | None] = {}
        capped: dict[str, str] = {}  # a job's options its user's limit rules out for now
        rooms: dict[str, int] = {}  # GPUs a user with a limit may still take, in this pass
        changing = self._pool_changes()
        for j in (self.jobs[i] for i in self.queue):
            opts, idx = list(j.options), list(j.option_indices)
            cap = self._gpu_cap(j)
            why = None
            if cap is not None:
                # a user at their GPU limit waits; options beyond what is left are skipped now
                room = cap - held.get(j.user, 0)
                rooms[j.user] = min(room, rooms.get(j.user, room))
                keep = [k for k, o in enumerate(opts) if o.count <= room]
                if len(keep) < len(opts):
                    capped[j.id] = (
                        f"{', '.join(str(o) for k, o in enumerate(opts) if k not in keep)} "
                        f"would take you past your limit of {cap} GPU(s) at once while your "
                        f"other jobs hold {held.get(j.user, 0)}")
                opts, idx = [opts[k] for k in keep], [idx[k] for k in keep]
                if not opts:  # say so: "queued" alone reads as "no GPU is free"
                    why = _limit_why(held.get(j.user, 0), cap)
            # (only a pool that changes by itself can lose a type a job was accepted for)
            absent = (None if why is not None or not changing
                      else _absent(opts, gpus, j.min_memory_gb))
            if why is not None:
                if why != j.held or absent != j.waiting_for:
                    j.held, j.waiting_for = why, absent
                    self._emit_queued(j)
                continue
            reqs.append(Request(j.id, j.user, tuple(opts), j.seq, tuple(idx), j.min_memory_gb))
            waits[j.id] = absent
        granted = schedule(gpus, busy, reqs, running_per_user, self._served, rooms)
        for grant in granted:
            self._launch(self.jobs[grant.job_id], grant, gpus)
            busy += [(grant.node, i) for i in grant.indices]
            running_per_user[self.jobs[grant.job_id].user] = \
                running_per_user.get(self.jobs[grant.job_id].user, 0) + 1
        waiting = [r for r in reqs if self.jobs[r.job_id].state == "queued"
                   and r.job_id in self.queue]
        # "queued" alone reads as "someone's job holds it": say when it is not one
        # (each a scheduling pass of its own: none when nothing waits, as after most grants)
        # (the rooms left after this pass's grants)
        for grant in granted:
            who = self.jobs[grant.job_id].user
            if who in rooms:
                rooms[who] -= len(grant.indices)
        outside = held_outside(waiting, gpus, busy, running_per_user,
                               self._served, rooms) if waiting else {}
        # ("1 of 2 H100 free" in the pool while it waits reads as a bug: say for whom)
        ahead, self._reserved = holding(waiting, gpus, busy, running_per_user,
                                        self._served, rooms) if waiting else ({}, set())
        positions: dict[str, int] | None = None
        use = _type_use(gpus, self._holders())  # (with what was granted in this pass)
        held_now = self._held_by_user()
        for req in waiting:
            j = self.jobs[req.job_id]
            cap = self._gpu_cap(j)
            if cap is not None and all(o.count > cap - held_now.get(j.user, 0)
                                       for o in req.options):
                # this pass's grants to its user used up their limit: said as the first
                # loop says it, and not with what holds GPUs it may not have anyway
                why = _limit_why(held_now.get(j.user, 0), cap)
                j.outside = j.behind = j.busy = False
                if why != j.held or j.waiting_for is not None:
                    j.held, j.waiting_for = why, None
                    self._emit_queued(j)
                continue
            note = None if waits[req.job_id] else _outside_note(
                outside.get(req.job_id, []), self.backend)
            behind = None if waits[req.job_id] or note else ahead.get(req.job_id)
            busy_note = (None if waits[req.job_id] or note or behind else
                         _busy_note(req.options, use, j.user))
            if req.job_id in capped and not (waits[req.job_id] or note or behind):
                # (its other options wait for jobs, or for this pass's grants to its user)
                busy_note = "; ".join(n for n in (capped[req.job_id], busy_note) if n)
            waiting_for = waits[req.job_id] or note or behind or busy_note
            j.outside = note is not None
            j.behind = behind is not None
            j.busy = busy_note is not None
            if j.held is not None or waiting_for != j.waiting_for:
                j.held, j.waiting_for = None, waiting_for
                if positions is None:  # (once per pass: the queue does not move in it)
                    positions = self._positions()
                self._emit_queued(j, positions)
        if self.queue:  # the queue moved (a job ahead started or left): each hears its place
            positions = self._positions() if positions is None else positions
            for j in (self.jobs[i] for i in self.queue):
                if j.state == "queued" and positions.get(j.id) != j.position:
                    self._emit_queued(j, positions)
        self._watch_pool(gpus)

    def _held_by_user(self) -> dict[str, int]:
        """GPUs the running jobs hold, by user."""
        held: dict[str, int] = {}
        for j in self.running.values():
            held[j.user] = held.get(j.user, 0) + len((j.grant or {}).get("indices", []))
        return held

    def _gpu_cap(self, job: Job) -> int | None:
        """The job's user's limit on GPUs held at once: an admin's, else the one it was
        submitted under (the tokens file's or the gateway's, worked out again at a reload)."""
        return self.user_limits.get(job.user, {}).get("max_gpus", job.gpu_cap)

    def _holders(self) -> dict[tuple[str, int], Job]:
        """The running job on each GPU held, by (node, index)."""
        return {(j.grant["node"], i): j for j in self.running.values() if j.grant
                for i in j.grant["indices"]}

    def _watch_pool(self, gpus: list[Gpu]) -> None:
        """A pool that changes by itself is looked at again while jobs wait: on Ray nodes join
        and leave and other users take and free GPUs (and the backend hears what waits: an
        autoscaler may add nodes for it); on this host a process gpu_magic did not start may
        hold a GPU, and no event here says when it ends."""
        waiting = getattr(self.backend, "waiting", None)
        if self.loop is None:
            return
        if waiting is not None:
            waiting([self.jobs[i].options for i in self.queue])
        elif not any(self.jobs[i].outside for i in self.queue):
            return  # (nothing waits on a GPU held outside: the jobs' own ends will tell)
        if self.queue and self._pool_watch is None:
            def again() -> None:
                self._pool_watch = None
                self._schedule()

            poll_s = getattr(self.backend, "poll_s", OUTSIDE_POLL_S)
            self._pool_watch = self.loop.call_later(poll_s, again)

    def _launch(self, job: Job, grant: Grant, gpus: list[Gpu]) -> None:
        self._dequeue(job)
        said = job.waiting_for  # (what its last "queued" said: the backend's wait, if refused)
        # what held it in the queue is over: a retry's wait says its own
        job.held, job.waiting_for, job.outside, job.behind = None, None, False, False
        job.busy = False
        job.grant = _grant_json(grant, gpus, job.attempt)
        job.state = "running"
        job.outcome = None
        job.stop_reason = None
        job.ending = False
        job.interrupted = job.interrupt_taken = False
        job.interrupted_by = None
        self.running[job.id] = job
        self._served[job.user] = self._seq
        req = job.request
        grant_env = {
            "GPU_MAGIC_GRANT": json.dumps({
                "type": grant.gpu_type, "count": len(grant.indices), "node": grant.node,
                # "memory" as DESIGN names it (GB); "memory_gb" as the pool's records do
                "simulated": grant.simulated, "memory": grant.memory_gb,
                "memory_gb": grant.memory_gb,
                "indices": list(grant.indices), "option_index": grant.option_index,
                "job_id": job.id, "attempt": job.attempt,
            }),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            # a simulated grant must never touch a real GPU that happens to be on this host
            "CUDA_VISIBLE_DEVICES": "" if grant.simulated else ",".join(
                u or str(i) for u, i in zip(job.grant["uuids"], grant.indices)),
            "GPU_MAGIC_JOB_ID": job.id,
        }
        inputs = req["inputs"]
        manifest = {
            "source": req["source"],
            "inputs": {
                "pickle": str(self.blobs.path(job.user, inputs["pickle"])),
                "buffers": [str(self.blobs.path(job.user, d)) for d in inputs["buffers"]],
            },
            "outputs": req.get("outputs", []),
            "deleted": req.get("deleted", []),
            "has_value": req.get("has_value", False),
            "return_names": req.get("return_names"),
            "no_return": req.get("no_return", False),
            "env": req.get("env") or {},
            "cell_label": req.get("cell_label", "Cell"),
            "line_offset": req.get("line_offset", 0),
            "digests": req.get("digests") or [],  # what its results may be named by
        }
        if getattr(self.backend, "client_python", False) and req.get("sys_path"):
            # the kernel's own Python runs the cell: with the folders its notebook added to
            # sys.path, as its folder (never on a gateway of several users)
            manifest["sys_path"] = req["sys_path"]
        if self.runners_see_reserve():
            manifest["reserve"] = str(self.blobs.reserve.folder)
        if self._sandboxed():  # (its folder goes with the job: files a cell leaves there too)
            manifest["folder_removed"] = True
        chosen = [g for g in gpus if g.node == grant.node and g.index in grant.indices]
        run = RunSpec(job.id, job.attempt, self.jobs_dir / job.id / f"attempt-{job.attempt}",
                      manifest, chosen, grant_env, req.get("python"), req.get("cwd"), job.user,
                      req.get("session"))
        loop = self.loop
        assert loop is not None
        # A backend shared with others (Ray) must hold the GPUs before we announce the grant:
        # someone may have taken them between our look at the pool and now.
        reserve = getattr(self.backend, "reserve", None)
        if reserve is not None and not reserve(run):
            self.running.pop(job.id, None)
            job.state, job.grant = "queued", None
            self.queue.insert(0, job.id)
            # "queued (position 1)" alone, for the second Ray may take, read as "stuck"
            job.waiting_for = (f"waiting for {self.backend.name.capitalize()} to hold "
                               f"{len(grant.indices)} {grant.gpu_type} on {grant.node} for it")
            if job.waiting_for != said:
                self._emit_queued(job)
            # Ray places a group within ~10 ms on free GPUs, 0.5-1 s on GPUs just given back: a
            # short wait in reserve() (it blocks this loop) and a prompt look again
            loop.call_later(0.1, self._schedule)
            return
        # only now: a job whose GPUs Ray would not give it went back to the queue, and a job
        # that never left it has not run (its timings, its "cancelled while queued")
        job.started = job.started or time.time()
        self._emit(job, {"type": "granted", **job.grant})

        def on_event(job_id: str, attempt: int, ev: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._runner_event, job_id, attempt, ev)

        def on_exit(job_id: str, attempt: int, rc: int | None, tail: str) -> None:
            loop.call_soon_threadsafe(self._runner_exit, job_id, attempt, rc, tail)

        try:
            job.handle = self.backend.start(run, on_event, on_exit)
        except OSError as exc:
            self.running.pop(job.id, None)
            job.message = f"the runner could not be started: {exc}"
            self._finish(job, "failed")
            return
        if not getattr(self.backend, "reports_start", False):
            self._emit(job, {"type": "started", "attempt": job.attempt})
        # (else when its runner has it: see "interruptible")
        self._arm_timeout(job)
        self.store.save_job(self._record(job))

    def _arm_timeout(self, job: Job) -> None:
        """The job's --timeout (the gateway's default if none), counted from now."""
        assert self.loop is not None
        timeout = float(job.request.get("timeout") or DEFAULT_TIMEOUT_S)
        job.timer = self.loop.call_later(timeout, self._timed_out, job.id, job.attempt)

    def _timed_out(self, job_id: str, attempt: int) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state != "running" or job.attempt != attempt:
            return
        assert self.loop is not None
        if (job.adopting is not None or job.outcome is not None) and not job.ending:
            # the cell said it ended: its results are stored and its runner ends in a moment,
            # which a timeout must not undo. A runner still there after that moment is
            # stopped all the same (a cell can say so and go on running).
            job.ending = True
            job.timer = self.loop.call_later(ENDING_GRACE_S, self._timed_out, job_id, attempt)
            return
        if job.adopting is not None or (job.holding is not None and not job.holding.done()):
            # results still being stored, or inputs checked: the cell has ended; its runner
            # is stopped right after, if it is still there then
            job.timer = self.loop.call_later(1.0, self._timed_out, job_id, attempt)
            return
        if (getattr(self.backend, "reports_start", False) and job.took != attempt
                and job.start_waited != attempt):
            # its runner does not have the job yet (on Ray: a worker starting on a node that
            # has just joined, the inputs on their way): the --timeout counts from when it
            # has, waited for START_WAIT_S at most
            job.start_waited = attempt
            job.timer = self.loop.call_later(START_WAIT_S, self._timed_out, job_id, attempt)
            return
        if job.stoppable:
            job.stop_reason = "timed_out"
            self.backend.cancel(job.handle)

    # --- runner reports ---

    def _runner_event(self, job_id: str, attempt: int, ev: dict[str, Any]) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt or job.final:
            return
        kind = ev["type"]
        if kind in STREAM_EVENT_TYPES:
            self._output(job, ev)
        elif kind in ("result", "error"):
            if job.outcome is not None or job.adopting is not None:
                return  # one outcome per attempt: a cell that sends more gets its first
            try:
                digests = _outcome_digests(ev)
            except ValueError as exc:
                job.outcome = {"type": "runner_error", "ename": "ValueError",
                               "evalue": f"the runner sent a malformed {kind}: {exc}"}
                return
            inline = ev.get("inline") or {}
            if all(d in inline for d in digests):
                job.outcome = self._outcome(job, attempt, ev, digests)
                return
            # Files to verify and move (large results): in a thread, not on the event loop
            # that serves everyone (hashing 4 GiB takes a quarter of a second). The runner's
            # exit waits for it (see _runner_exit).
            adopting = asyncio.ensure_future(
                asyncio.to_thread(self._outcome, job, attempt, ev, digests))
            job.adopting = adopting

            def adopted(f: asyncio.Future[dict[str, Any]]) -> None:
                if f.cancelled():
                    return  # the gateway is stopping, see _runner_exit
                if job.adopting is f:
                    # cleared here, not read from f.done(): a future is done before its
                    # callbacks run, and the runner's exit may come in between
                    job.adopting = None
                if job.attempt != attempt:
                    return
                exc = f.exception()
                job.outcome = f.result() if exc is None else _not_stored(exc, self.state_dir)

            adopting.add_done_callback(adopted)
        elif kind == "interruptible" and job.took != attempt:
            # the runner has the job now: on Ray, after a worker started and the inputs came,
            # which took seconds on a fresh node, and a --timeout of 2 s said "the cell ran
            # longer" of a cell that never ran (a researcher's trial). It counts from here.
            job.took = attempt
            if job.timer is not None:
                job.timer.cancel()
                self._arm_timeout(job)
            if getattr(self.backend, "reports_start", False) and job.stop_reason is None:
                # and its cell starts now: the widget said "running" all that while
                self._emit(job, {"type": "started", "attempt": attempt})
        elif kind == "interrupted" and job.interrupted and not job.interrupt_taken:
            # the cell got the interrupt (a KeyboardInterrupt where it was): its handlers run
            # now; the client waits for them instead of cancelling a cell that did not stop
            job.interrupt_taken = True
            by = {"by": f"{job.interrupted_by} (admin)"} if job.interrupted_by else {}
            self._emit(job, {"type": "interrupted", "attempt": attempt, **by})
        elif kind == "runner_error" and job.outcome is None and job.adopting is None:
            # kept in the job's record and shown to its user: only what is said, and short
            job.outcome = {"type": "runner_error", "ename": str(ev.get("ename", ""))[:200],
                           "evalue": str(ev.get("evalue", ""))[:4000]}
            if ev.get("cell_finished") is True:  # its results could not be written (disk)
                job.outcome["cell_finished"] = True

    def _output(self, job: Job, ev: dict[str, Any]) -> None:
        """Keep and pass on a cell's output, up to OUTPUT_MAX a job: past it a cell that
        prints without end would fill the gateway's memory and disk for every user."""
        if job.output_bytes > OUTPUT_MAX:
            return
        # only the fields each kind has (what else a cell wrote would go uncounted)
        ev = {k: v for k, v in ev.items() if k in _OUTPUT_FIELDS[ev["type"]]}
        # each event costs a row in the log besides its text: a cell writing a million empty
        # ones must meet the cap too (the runner gathers a burst of prints into one event)
        text = ev.get("text")
        if isinstance(text, str):
            job.output_bytes += EVENT_COST + len(text)
        else:
            job.output_bytes += EVENT_COST + len(json.dumps(ev, default=str))
        if job.output_bytes <= OUTPUT_MAX:
            self._emit(job, ev)
            return
        self._emit(job, {"type": "stderr", "text": (
            f"\n[gpu_magic] this cell's output passed {human(OUTPUT_MAX)}: the rest is neither "
            "kept nor shown (the cell goes on running). Write large output to a file, or "
            "print less.\n")})

    def _outcome(self, job: Job, attempt: int, ev: dict[str, Any],
                 digests: list[str]) -> dict[str, Any]:
        """The job's outcome from a runner's result or error event, its blobs stored, and the
        sizes of those not inside it as stored (a client picks how to download by them)."""
        ev = {k: v for k, v in ev.items() if k != "sizes"}  # (ours to say, not the runner's)
        try:
            if sizes := self._keep_blobs(job, attempt, ev, digests):
                ev["sizes"] = sizes
        except (OSError, ValueError, BlobError) as exc:
            if ev["type"] == "result":
                return _not_stored(exc, self.state_dir)
            # the traceback is enough; the client says why the exception's own type is missing
            ev = {**{k: v for k, v in ev.items() if k != "exception"},
                  "unsent": f"the gateway could not store it: {str(exc)[:300]}"}
        return _without_inline(ev)

    def _keep_blobs(self, job: Job, attempt: int, ev: dict[str, Any],
                    digests: list[str]) -> dict[str, int]:
        """Store a runner's result blobs in the user's store, each verified by its content:
        small ones came inside the event, larger ones as files in the attempt's folder. The
        sizes of those files, as stored."""
        inline = ev.get("inline") or {}
        sizes: dict[str, int] = {}
        out = self.jobs_dir / job.id / f"attempt-{attempt}" / "out"
        for d in dict.fromkeys(digests):  # (two equal buffers are one file)
            if d in inline:
                self.blobs.put_bytes(job.user, d, base64.b64decode(inline[d], validate=True))
                continue
            try:
                sizes[d] = self.blobs.adopt(
                    job.user, out, d.replace(":", "-"), d, self.limits.max_blob_bytes,
                    copy=self._sandboxed(),
                    beside=self.backend.name == "local" and not self._sandboxed())
            except BlobError as exc:
                if exc.status != 404 or not self.blobs.has(job.user, d):
                    fix = ("; bring back less: leave large arrays out of the names the cell "
                           "binds (del them, or --return NAMES), or save them to a file there"
                           if exc.status == 413 else "")
                    raise BlobError(exc.status, f"result blob {d}: {exc.message}{fix}") from None
                with contextlib.suppress(OSError):  # (held already: its size as stored)
                    sizes[d] = self.blobs.path(job.user, d).stat().st_size
        return sizes

    def _runner_exit(self, job_id: str, attempt: int, rc: int | None, tail: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt or job.final:
            return
        if job.adopting is not None:
            if job.adopting.cancelled():
                return  # the gateway is stopping: a restart finds the job as it was
            # its results are still being stored: end the job once they are (or are not);
            # a callback added now runs after the one that sets the outcome
            job.adopting.add_done_callback(
                lambda _: self._runner_exit(job_id, attempt, rc, tail))
            return
        if job.stop_reason is None and job.input_checks:  # (a stopped job delivers nothing)
            checks = [f for fs in job.input_checks.values() for f in fs]
            if not all(f.done() for f in checks):
                # what the cell was given is still being checked: its outcome waits (and
                # so does a gateway that drains, as for results being stored)
                job.holding = asyncio.gather(*map(asyncio.wrap_future, checks))
                job.holding.add_done_callback(
                    lambda _: self._runner_exit(job_id, attempt, rc, tail))
                return
            job.holding = None
            bad = [(d, why) for d, fs in job.input_checks.items() for f in fs
                   if (why := f.result())]
            if bad:
                digest, why = bad[0]
                job.outcome = {
                    "type": "runner_error", "ename": "BlobError", "cell_finished": True,
                    "evalue": f"input blob {digest} was not what its digest names ({why}), "
                              "so the cell ran on other data than was sent. Nothing was bound "
                              "and the blob was removed; run the cell again to send its "
                              "inputs afresh."}
        if self.closing and job.outcome is None and job.stop_reason is None:
            # its runner was stopped with the gateway: the job stays as it was, and a restart
            # says the gateway restarted under it (not that its runner died of our SIGTERM)
            return
        if job.timer is not None:
            job.timer.cancel()
        self.running.pop(job.id, None)
        job.handle = None
        # the cell's folder (its working folder and TMPDIR) in a sandbox, else the folder its
        # results were written in: no one's to read any more (its results are stored), and
        # what is left there is half written (a runner killed or cancelled while writing a
        # result). On the gateway's disk: not left for days (retention).
        # After the attempt's end is settled (a retry, or the job's end): the job's folder
        # goes too once the job has ended, decided here, not raced by the tidying thread.
        try:
            self._attempt_ended(job, attempt, rc, tail)
        finally:
            folder = self.jobs_dir / job.id / f"attempt-{attempt}"
            if folder.parent.exists():  # (a warm runner's small result made no folder at all)
                threading.Thread(target=_remove, args=(folder, self._sandboxed(), job.final),
                                 daemon=True, name=f"gpu-magic-tidy-{job.id}").start()

    def _attempt_ended(self, job: Job, attempt: int, rc: int | None, tail: str) -> None:
        """What an attempt's end makes of its job: its end (succeeded, failed, cancelled,
        timed out, lost) or another attempt."""
        outcome = job.outcome or {}
        job.attempts.append({"attempt": attempt, "grant": job.grant, "rc": rc,
                             "outcome": outcome.get("type", "died")})
        req = job.request
        if job.stop_reason == "cancelled":
            job.message = job.message or "cancelled while running; the output so far is kept"
            self._finish(job, "cancelled")
        elif job.stop_reason == "timed_out":
            job.message = self._timeout_message(req)
            self._finish(job, "timed_out")
        elif outcome.get("type") == "result" and "error" in outcome:
            # the cell ended on an interrupt: a local cell keeps what it had bound then, so
            # its results come first (the client binds them), then the KeyboardInterrupt.
            # Only for an interrupt its user asked for: else all or nothing, as for any error.
            error = _interrupt_error(outcome) or {"type": "error", "ename": "KeyboardInterrupt",
                                                  "evalue": "", "traceback": []}
            if job.interrupted and job.interrupted_by:
                # an admin's: its user did not ask the cell to stop, so their namespace is
                # left as it was (as after an admin's cancel), never half of the cell bound in
                # it; the cell's handlers had their say, and the error shows where it stopped
                by = f"{job.interrupted_by} (admin)"
                self._emit(job, {**error, "by": by})
                job.message = (f"interrupted by {by} while running: the cell stopped on "
                               "KeyboardInterrupt; nothing was bound, the output so far is kept")
                self._finish(job, "cancelled")
            elif job.interrupted:
                self._emit(job, {**{k: v for k, v in outcome.items() if k != "error"},
                                 "interrupted": True})
                self._emit(job, error)
                # the contract: a kernel interrupt cancels the job (and frees its GPUs); the
                # cell only had its say first, as a local cell does
                # (a kernel's restart or shutdown interrupts it first too: what the cell had
                # bound then goes back to a kernel that may be ending, so this says no more)
                job.message = ("interrupted while running (the notebook's stop button, or its "
                               "kernel restarting): the cell stopped on KeyboardInterrupt, and "
                               "what it had bound by then was sent back to the notebook's "
                               "kernel, if it was still running")
                self._finish(job, "cancelled")
            else:
                error.pop("interrupted", None)
                self._emit(job, error)
                self._finish(job, "failed")
        elif outcome.get("type") == "result":
            self._emit(job, outcome)
            self._finish(job, "succeeded")
        elif outcome.get("type") == "error":
            if outcome.get("oom") and req.get("oom_fallback") and self._oom_retry(job):
                return
            self._emit(job, outcome)
            self._finish(job, "failed")
        else:
            why = self._death(rc, outcome, tail)
            # (not a runner that died of its interrupt: a cell that set SIGINT to end the
            # process; its user asked it to stop)
            if (outcome.get("type") != "runner_error" and not job.interrupted
                    and attempt <= int(req.get("retries") or 0)
                    and job.user not in self.revoked):
                job.attempt += 1
                job.state = "queued"
                job.grant = None
                self.queue.append(job.id)
                self._emit(job, {"type": "stderr", "text": f"[gpu_magic] {why}; retrying "
                                 f"(attempt {job.attempt} of {int(req['retries']) + 1})\n"})
                self._emit_queued(job)
                self.store.save_job(self._record(job))
            else:
                job.message = why
                if job.user in self.revoked and attempt <= int(req.get("retries") or 0):
                    job.message += (f"; not retried: {job.user}'s token was removed from the "
                                    "gateway's tokens file")
                self._finish(job, "lost" if outcome.get("type") != "runner_error" else "failed")
        self._schedule()

    def _oom_retry(self, job: Job) -> bool:
        if job.user in self.revoked:  # (their token was taken back: nothing more of theirs)
            return False
        mem = (job.grant or {}).get("memory_gb")
        where = job.grant and job.grant["gpu_type"]
        if not mem:  # (a Ray node of a type this gateway knows no memory size of)
            job.notices.append(
                f"the cell ran out of GPU memory on {where}, whose memory size this pool does "
                "not know, so --oom-fallback cannot tell which option has more; list a larger "
                "type first, or give its memory in --ray-type-map")
            return False
        gpus = self.gpus()
        kept, _ = feasibility(job.options, gpus, min_memory=mem)
        if not kept:
            job.notices.append(
                f"the cell ran out of GPU memory on {where} ({mem:g} GB) and no option in its "
                "list has a GPU with more memory")
            return False
        job.min_memory_gb = mem
        job.attempt += 1
        job.state = "queued"
        self._emit(job, {"type": "stderr", "text":
                         f"[gpu_magic] out of GPU memory on {job.grant and job.grant['gpu_type']} "
                         f"({mem} GB); retrying on a GPU with more memory (--oom-fallback)\n"})
        job.grant = None
        self.queue.append(job.id)
        self._emit_queued(job)
        self.store.save_job(self._record(job))  # (a crash now: it waited to be retried)
        self._schedule()
        return True

    @staticmethod
    def _death(rc: int | None, outcome: dict[str, Any], tail: str) -> str:
        if outcome.get("cell_finished"):
            return str(outcome.get("evalue"))
        if outcome.get("type") == "runner_error":
            return (f"the runner failed before the cell could finish: {outcome.get('ename')}: "
                    f"{outcome.get('evalue')}")
        last = [ln for ln in tail.strip().splitlines() if ln.strip()][-3:]
        ours = [ln.removeprefix("[gpu_magic] ") for ln in last if ln.startswith("[gpu_magic] ")]
        explained = bool(ours) and len(ours) == len(last)  # a backend said why, and only it
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            why = f"the runner process died (killed by signal {name})"
        elif rc is None:
            # a backend's own reason says when ("... before the cell started (nothing ran)"
            # after "before the cell finished" told two stories)
            why = ("the runner was lost" if explained
                   else "the runner was lost before the cell finished")
        else:
            why = f"the runner process exited with code {rc} before the cell finished"
        if explained:  # what a backend said of it: the reason itself
            why += ": " + "; ".join(ours)
        elif last:
            why += "; the last it printed: " + " | ".join(last)
        return why

    # --- events ---

    def _emit_queued(self, job: Job, positions: dict[str, int] | None = None) -> None:
        pos = (self._positions() if positions is None else positions).get(job.id, 0)
        job.position = pos
        # No wait estimate: when a GPU frees depends on how long the running cells take, which
        # nothing here knows (the average of past cells, or a running cell's --timeout, is a
        # number but not an estimate), and a wrong number is worse than none.
        ev: dict[str, Any] = {"type": "queued", "position": pos, "estimate": None,
                              "attempt": job.attempt}
        if getattr(self.backend, "simulated", False):
            ev["simulated"] = True  # said while it waits too, not only once granted
        if job.dropped:
            ev["dropped"] = job.dropped
        if job.notices:
            ev["notices"] = job.notices
        if job.held:
            ev["held"] = job.held
        if job.waiting_for:
            ev["waiting_for"] = job.waiting_for
        self._emit(job, ev)

    def _timings(self, job: Job) -> dict[str, float | None]:
        end = job.ran_until or job.finished or time.time()
        return {
            "queued_s": round((job.started or end) - job.created, 4),
            "ran_s": round(end - job.started, 4) if job.started else None,
            "total_s": round(end - job.created, 4),
        }

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished = time.time()
        self.running.pop(job.id, None)
        done: dict[str, Any] = {"type": "done", "state": state, "timings": self._timings(job)}
        if job.message:
            done["message"] = job.message
        if state == "cancelled" and job.cancelled_by:  # (its user's view says who)
            done["cancelled_by"] = job.cancelled_by
        if job.notices:
            done["notices"] = job.notices
        self._emit(job, done)
        rec = self._record(job)
        # in the store before `done` reaches a client (its stream yields after this returns):
        # a gateway killed a moment later must not forget a job its client saw end
        self.store.save_job_now(rec)
        # what a finished job keeps is what its record shows (as a job reloaded after a
        # restart): its whole request (up to a megabyte of source, the inputs' manifest,
        # --env) stayed in memory for the retention period, for every job a user ran
        job.request = _kept_request(rec)
        self._schedule()

    def _emit(self, job: Job, event: dict[str, Any]) -> None:
        if job.events is None:
            job.events = self.store.load_events(job.id)
        seq = len(job.events) + 1
        event = dict(event, seq=seq)
        job.events.append(event)
        self.store.add_event(job.id, seq, event)
        waiters, job.waiters = job.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def stream(self, job: Job, after: int,
                     heartbeat: float) -> AsyncIterator[list[dict[str, Any]] | None]:
        """The job's events after ``after``, in batches of those already there (one write for
        a burst); None now and then as a heartbeat; ends after done."""
        assert self.loop is not None
        if job.events is None:
            job.events = await asyncio.to_thread(self.store.load_events, job.id)
        pos = max(0, after)
        events = job.events
        if job.id in self.cut_short and events and pos >= len(events):
            # A client asks past the end of a job that a killed gateway left unfinished:
            # events are streamed a moment before they are saved, so the log holds fewer
            # than the client saw, and the restart's `done` was numbered among events the
            # client already had. Told again, numbered past those: it ends as the job did.
            yield [dict(events[-1], seq=pos + 1)]
            return
        while True:
            events = job.events
            if events is None:  # a finished job's events, let go of in memory
                events = job.events = await asyncio.to_thread(self.store.load_events, job.id)
            if pos < len(events):
                batch = events[pos : pos + 1000]
                done = next((i for i, ev in enumerate(batch) if ev.get("type") == "done"), None)
                if done is not None:
                    yield batch[: done + 1]
                    return
                pos += len(batch)
                yield batch
                continue
            if job.final or self.streams_ending:
                return
            fut: asyncio.Future[None] = self.loop.create_future()
            job.waiters.append(fut)
            try:
                await asyncio.wait_for(fut, heartbeat)
            except asyncio.TimeoutError:
                yield None
