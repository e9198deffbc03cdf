"""The plain Python API the magic calls: ``run(source, spec, namespace)`` and ``@gpu``.

One call: analyse the cell, pickle its inputs together, upload only the blobs the gateway lacks,
submit, follow the job's events (output printed live as it arrives), then bind the results into
the namespace all at once, or raise the cell's own exception.
"""

from __future__ import annotations

import atexit
import base64
import collections
import collections.abc
import contextlib
import functools
import importlib
import inspect
import itertools
import os
import platform
import re
import secrets
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _injob, _payload
from ._capture import analyze_cell
from ._client import INLINE_MAX, GatewayClient, refused, silence_clause, unreached_clause
from ._connection import connect, invalidate_local
from ._errors import (
    AuthError,
    CellSyntaxError,
    EnvironmentMismatch,
    GatewayError,
    GpuMagicError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    NoFeasibleOption,
    RunnerLost,
    SerializationError,
    SpecError,
    WaitExpired,
    one_line,
    short,
)
from ._jobs import EventFeed
from ._remote import code_locator, local_hint, rebuild, render_traceback, where
from ._spec import GpuSpec, env_problem, parse_spec
from ._version import WIRE_FORMAT, __version__
from ._view import (
    FINAL_STATES,
    UNREACHABLE,
    JobState,
    NullView,
    TextView,
    cancelled_text,
    human_size,
    then,
)

# In-place states are applied with those that may fail first (an object's __setstate__, which
# can be undone) and arrays last (they cannot fail once checked, and are not undone).
_IN_PLACE_ORDER = {"state": 0, "items": 1, "dict": 1, "ndarray": 2, "tensor": 2}
_NOTHING = object()  # an in-place result whose object is not here
# A cell that has not taken an interrupt this long after it was asked (stuck in C code that
# never checks for signals, or ignoring SIGINT) is cancelled instead.
INTERRUPT_GRACE_S = 5.0
# How long an interrupt or a cancel waits for the gateway's answer (it answers in milliseconds):
# a stopped gateway kept Ctrl-C waiting for the whole read timeout, a minute.
CONTROL_ANSWER_S = 5.0

# Names IPython puts in every namespace; never shipped.
# IPython's names for earlier cells' values (_, __, _7) and inputs (_i, _ii, _i7): hidden from
# %who, but a cell that reads one wants it
HISTORY_NAME = re.compile(r"_{1,3}|_\d+|_i{1,3}|_i\d+")
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_ih", "_oh", "_dh",
                            "__builtins__", "__builtin__", "__name__", "__doc__", "__spec__",
                            "__loader__", "__package__"})


# The cell the decorator makes of a call: its frame is ours, left out of remote tracebacks.
_DECORATED_CALL = "__gpu_fn__("

_READS_BY_NAME = re.compile(r"\b(eval|exec|globals|vars|locals|dir)\b")


@dataclass
class Options:
    """How to run one cell; mirrors the flags of ``%%gpu``."""

    timeout: float | None = None
    wait: float | None = None
    retries: int = 0
    oom_fallback: bool = False
    return_names: list[str] | None = None
    no_return: bool = False
    env: dict[str, str] = field(default_factory=dict)
    quiet: bool = False
    dry_run: bool = False
    background: bool = False
    line_offset: int = 0
    label: str = "Cell"
    meta: dict[str, str] = field(default_factory=dict)
    # a background %%gpu cell shows its value as a cell's Out when it ends; run() and the
    # decorator return it from wait() instead
    show_value: bool = False


# The HTTP API's bounds on --timeout and --wait (30 days) and --retries: checked here too, so
# that a bad value is refused before anything is packed or sent, in words of the flag.
MAX_SECONDS = 30 * 24 * 3600
MAX_RETRIES = 10


def _options(given: Mapping[str, Any], who: str = "gpu_magic.run()") -> Options:
    """``run()``'s keyword options, a misspelled one named with the closest."""
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(Options)]
    for key in given:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]}=?" if near else f"; options: {', '.join(known)}"
            raise TypeError(f"{who} has no option {key}={given[key]!r}{hint}")
    return Options(**given)


def option_problem(timeout: Any, wait: Any, retries: Any,
                   spell: Callable[[str], str] = lambda name: f"{name}=") -> str | None:
    """What is wrong with these option values, or None; ``spell`` writes an option's name
    as the caller knows it (``timeout=`` in Python, ``--timeout `` in the magic)."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def shown(value: Any) -> str:  # as typed: argparse made "-5" into -5.0, 3000000 into 3e+06
        if not number(value):
            return repr(value)
        if float(value).is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6g}"

    for name, value, example in (("timeout", timeout, 600), ("wait", wait, 60),
                                 ("retries", retries, 2)):
        if value is None and name != "retries" or number(value):
            continue
        try:  # (a number given as text, as read from a form or a config file: the number)
            meant = shown(float(value)) if isinstance(value, str) else None
        except ValueError:
            meant = None
        return (f"{spell(name)}{value!r} is a {type(value).__name__}, not a number; write "
                f"{spell(name)}{meant or example}"
                + ("" if meant else f" ({'a whole number' if name == 'retries' else 'seconds'})"))
    if timeout is not None and not (number(timeout) and 0 < timeout <= MAX_SECONDS):
        return (f"{spell('timeout')}{shown(timeout)}: the cell's time limit must be more than 0 and "
                f"at most {MAX_SECONDS} seconds (30 days); leave it out for the default, "
                "3600 s")
    if wait is not None and not (number(wait) and 0 <= wait <= MAX_SECONDS):
        return (f"{spell('wait')}{shown(wait)}: the time to wait in the queue must be 0 or more and "
                f"at most {MAX_SECONDS} seconds (0: only a GPU free right now); leave it out "
                "to wait until a GPU frees")
    if not (isinstance(retries, int) and not isinstance(retries, bool)
            and 0 <= retries <= MAX_RETRIES):
        return (f"{spell('retries')}{shown(retries)}: the re-runs after a runner died must be a "
                f"whole number from 0 to {MAX_RETRIES}; leave it out for no re-runs")
    return None


def kernel_cell_meta() -> dict[str, str]:
    """The notebook and cell running now, as the kernel knows them (empty elsewhere)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return {}
    parent = getattr(getattr(get_ipython(), "kernel", None), "get_parent", None)
    try:
        header = parent("shell") if parent else None
    except TypeError:
        header = parent() if parent else None
    md = (header or {}).get("metadata", {}) if isinstance(header, dict) else {}
    meta = {}
    if isinstance(md, dict) and md.get("cellId"):
        meta["cell_id"] = str(md["cellId"])
    path = os.environ.get("JPY_SESSION_NAME")
    if path and meta:  # (a kernel's, running a cell: not a script that inherited the variable)
        meta["notebook"] = path
    return meta


def _parse(spec: Any, client_factory: Callable[[], GatewayClient]) -> GpuSpec:
    try:
        return parse_spec(spec)
    except SpecError as first:
        if first.suggestion is None and "is not a GPU type" not in str(first):
            raise
        # a pool may add its own type names: ask it before refusing
        try:
            pool = client_factory().pool()
            # (and those whose nodes left: a cell may wait for one to join)
            types = [t["type"] for t in pool["types"]] + list(pool.get("types_gone") or [])
        except GatewayError:
            raise first from None
        try:
            return parse_spec(spec, extra_types=types)
        except SpecError as second:  # it lists this pool's own types too
            raise second from None


def select_inputs(
    names: Collection[str], namespace: Mapping[str, Any], hidden: Collection[str] = ()
) -> dict[str, Any]:
    """The values of the names the cell reads that exist in the namespace."""
    values = {
        n: namespace[n]
        for n in sorted(names)
        if n in namespace and n not in _IPYTHON_NAMES and n not in hidden
    }
    # the notebook's input history, when the cell reads it: what a local cell would see (its
    # last entry is this cell)
    for n in ("In", "_ih"):
        if n in names and isinstance(namespace.get(n), list):
            values[n] = list(namespace[n])
    return values


def _check_environment(health: Mapping[str, Any]) -> None:
    if health.get("client_python"):
        return  # the runner uses this kernel's own interpreter
    if not health.get("python"):
        return  # not said (to a caller whose token it refused): the submit says why
    ours = platform.python_version_tuple()[:2]
    theirs = str(health["python"]).split(".")[:2]
    if list(ours) != theirs:
        raise EnvironmentMismatch(
            f"the GPU runner has Python {'.'.join(theirs)} but this kernel has "
            f"{'.'.join(ours)}; cloudpickle needs the same minor version on both sides. Use a "
            f"kernel with Python {'.'.join(theirs)}, or ask the gateway's admin for one with yours."
        )
    wire = health.get("wire_format")
    if wire != WIRE_FORMAT:
        version = health.get("version") or "?"
        what = f"wire format {wire}" if wire else "from before wire formats"
        raise EnvironmentMismatch(
            f"the gateway runs cells with gpu_magic {version} ({what}), and this kernel has "
            f"gpu_magic {__version__} (wire format {WIRE_FORMAT}): they cannot read each other's "
            f"inputs and results. Install gpu-magic=={version} here and restart the kernel, or "
            "ask whoever runs the gateway to run this kernel's version."
        )
    from importlib import metadata

    differ = []
    for name, version in (health.get("packages") or {}).items():
        if name == "gpu-magic":
            continue
        try:
            mine = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if mine != version:
            differ.append(f"{name} {mine} here, {version} there")
    if differ:
        print("[gpu_magic] package versions differ from the runner's: " + "; ".join(differ),
              file=sys.stderr)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C for a moment (binding results, sending a cancel): a second Ctrl-C must not
    leave a half-bound namespace or an uncancelled job."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda s, f: pending.append(s))
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _rehome(value: Any, staging: dict[str, Any], namespace: dict[str, Any],
            fixed: dict[int, Any] | None = None) -> Any:
    """Point notebook functions that came back at the real namespace, as local ones are."""
    import types

    def fix_function(f: types.FunctionType) -> types.FunctionType:
        if f.__globals__ is not staging:
            return f
        new = types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__, f.__closure__)
        new.__kwdefaults__ = f.__kwdefaults__
        new.__dict__.update(f.__dict__)
        new.__qualname__ = f.__qualname__
        new.__module__ = f.__module__
        new.__doc__ = f.__doc__
        new.__annotations__ = f.__annotations__
        return new

    def fix_class(cls: type) -> None:
        for attr, v in list(vars(cls).items()):
            target = v.__func__ if isinstance(v, (staticmethod, classmethod)) else v
            if isinstance(target, types.FunctionType) and target.__globals__ is staging:
                fixed = fix_function(target)
                try:
                    setattr(cls, attr, type(v)(fixed) if target is not v else fixed)
                except (AttributeError, TypeError):
                    pass

    # one memo for all of a result's names: a function under two names stays one function
    fixed = {} if fixed is None else fixed

    def stale(v: Any) -> bool:
        return isinstance(v, types.FunctionType) and v.__globals__ is staging

    def fixed_function(f: types.FunctionType) -> types.FunctionType:
        if id(f) not in fixed:
            fixed[id(f)] = fix_function(f)
        return fixed[id(f)]

    # notebook classes anywhere inside the value (an instance in a list, an attribute...) came
    # back as our own class with its methods rebuilt on the staging globals, and notebook
    # functions kept in a dict, a list or an attribute (a model's hooks, callbacks) on them:
    # repair them all
    seen: set[int] = set()
    classes: set[int] = set()
    stack = [value]
    budget = 100_000
    while stack and budget:
        obj = stack.pop()
        budget -= 1
        if id(obj) in seen or isinstance(obj, types.ModuleType):
            continue  # a module came back by reference: it is the local one, nothing to repair
        seen.add(id(obj))
        cls = obj if isinstance(obj, type) else type(obj)
        if getattr(cls, "__module__", None) == "__main__" and id(cls) not in classes:
            classes.add(id(cls))
            fix_class(cls)
        if isinstance(obj, (dict, list)):
            values = obj.values() if isinstance(obj, dict) else obj
            if types.FunctionType not in set(map(type, values)):  # most: no loop in Python
                stack.extend(values)
                continue
            for k, v in list(obj.items() if isinstance(obj, dict) else enumerate(obj)):
                if stale(v):
                    with contextlib.suppress(Exception):  # a container that refuses: as was
                        obj[k] = fixed_function(v)
                else:
                    stack.append(v)
        elif isinstance(obj, (tuple, set, frozenset)):
            stack.extend(obj)
        elif not isinstance(obj, type):
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                stack.append(attrs)
    if stale(value):
        return fixed_function(value)
    return value


class _StandIns(collections.abc.Mapping):  # type: ignore[type-arg]
    """Every name, each a placeholder: inputs for a first reading of an attached job's results
    (see _Job._fresh_inputs)."""

    def __contains__(self, name: object) -> bool:
        return True

    def __getitem__(self, name: str) -> Any:
        return _StandIn()

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class _StandIn:
    pass


class _Job:
    """Follows one submitted job to its end and turns its outcome into a value or an error.

    A foreground job binds its results as they arrive (the cell is still running, so nothing
    else can touch the namespace); a background job only fetches them, and its ``GpuJob``
    binds them at a safe point.
    """

    def __init__(self, client: GatewayClient, record: dict[str, Any], state: JobState,
                 view: Any, source: str, opts: Options, namespace: dict[str, Any],
                 sent: dict[str, Any], refs: dict[str, Any] | None = None,
                 attached: bool = False) -> None:
        self.client, self.record, self.state, self.view = client, record, state, view
        self.id = record["id"]
        self.source, self.opts, self.namespace, self.sent = source, opts, namespace, sent
        # what the results may name as already here: the namespace as it was when the cell
        # was sent (inputs, and the globals its notebook functions took along)
        self.refs = sent if refs is None else refs
        # followed again from elsewhere (%gpu attach): the objects here are not the ones the
        # job was sent, so nothing is changed in place; its results are new objects
        self.attached = attached
        # another user's job, followed by an admin: its output is shown, its results (theirs,
        # to unpickle in their own kernels only) are neither fetched nor loaded here
        self.owner: str | None = None
        self.background = opts.background
        self.error: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None
        self.in_place: dict[str, tuple[Any, ...]] = {}  # inputs changed in place: new states
        self.left: dict[str, tuple[Any, ...]] = {}  # the same, of names the cell rebound
        # attached: a new object for each of them, which the results' references reach
        self.fresh: dict[str, Any] = {}
        self.modules: dict[str, tuple[Any, ...]] = {}  # local modules the cell changed
        self.modules_applied: list[types.ModuleType] = []  # those changed here too, once bound
        # the classes sent by value, with their attributes as sent (see _payload.loads)
        self.sent_classes: dict[int, tuple[type, dict[str, Any]]] = {}
        # what was inside the inputs, by place in their pickle: a result names our own
        self.sent_objects: _payload.SentObjects | None = None
        # those of them the cell changed, with their new state (applied when bound)
        self.inside: list[tuple[Any, tuple[Any, ...]]] = []
        # a background job's lists, sets and dicts as sent, to merge its changes into what
        # they hold when it ends (another job's or a cell's changes meanwhile kept)
        self.bases: dict[int, tuple[Any, tuple[str, Any]]] = {}  # by id: (object, base)
        self.merged: list[str] = []  # those that had changed here meanwhile, merged
        self.replaced: list[str] = []  # those that could not be merged: the job's state won
        self.conflicts: list[str] = []  # entries both changed: the job's value won
        self.printed: list[str] = []  # a background job's stdout and stderr so far
        self.last_seq = 0  # the last event taken: following again resumes after it
        self.bound: dict[str, Any] = {}
        self.fetch_interrupted = False  # a Ctrl-C stopped fetching the results of an ended cell
        self.result_bound = False
        self.value: Any = None
        self.has_value = False
        self._blobs: tuple[bytearray, list[bytearray]] | None = None
        self._cancel_wanted = False
        self._cancel_sent = False
        self._interrupt_at: float | None = None  # when we asked the gateway to interrupt it
        self.cancel_reason: str | None = None  # why an interrupt became a cancel
        self.outputs: list[str] = []  # the names the cell may bind or delete
        self.feed: EventFeed | None = None  # the stream its submit opened, if any
        self.following: EventFeed | None = None  # the stream follow() reads now, if any
        # its events are folded into its state already (attached after its end): the replay
        # brings output and results, and must not take the state back through queued, running
        self.folded = False

    # --- following ---

    def follow(self, pump: Any = None, interrupts: bool = False) -> None:
        """Take the job's events until it ends, ticking the view and pumping its comms.

        ``interrupts``: a Ctrl-C while the cell runs interrupts the cell, as a local one (see
        :meth:`_interrupt`); otherwise, or a second one, it is raised (the caller cancels)."""
        feed, self.feed = self.feed or EventFeed(self.client, self.id, after=self.last_seq), None
        self.following = feed
        pumping = pump is not None and pump.active
        # a Ctrl-C comes out of feed.get(), never out of an event half handled, nor out of
        # pumping the widget comms (a queued cell's request read and not passed on would be
        # lost) or close() (it waits a moment for the reader)
        with feed.held_interrupts():
            try:
                done = False
                while not done:
                    done = self._step(feed, pump if pumping else None, interrupts)
            finally:
                self.following = None
                feed.close()

    def _step(self, feed: EventFeed, pump: Any, interrupts: bool) -> bool:
        """Take one event, or tick the view if none came; True once the job has ended."""
        try:
            if self._cancel_wanted and not self._cancel_sent:
                with feed.raising():  # (a gateway that does not answer: Ctrl-C stops it)
                    self.send_cancel()
            if self._interrupt_at is not None:
                self._interrupt_overdue()
            ev = feed.get(timeout=0.05 if pump is not None else 0.25)
            self._note_away(feed)
            if ev is not None and ev.get("type") != "job":
                self._on_event(ev, feed)
                if ev.get("type") == "done":
                    return True
            self.view.tick()
            if pump is not None:
                pump.pump()  # (whole: a Ctrl-C is held, see follow())
        except KeyboardInterrupt:
            if self.result is not None and not self.result_bound and not self.background:
                # the cell had ended: the interrupt stopped fetching or binding its
                # results (bind() is all or nothing), which is said, not dropped
                self.fetch_interrupted = True
                raise
            with feed.raising():  # (a second Ctrl-C stops a call to a gateway that hangs)
                if not (interrupts and self._interrupt()):
                    raise
        return False

    def _note_away(self, feed: EventFeed) -> None:
        """Say in the view while the gateway does not answer and the stream is being resumed."""
        trouble = feed.trouble
        away = silence_clause(trouble) if trouble is not None else None
        if away != self.state.away:
            self.state.away = away
            self.view.refresh()

    def _interrupt(self) -> bool:
        """The first Ctrl-C while the cell runs: the gateway raises KeyboardInterrupt in the
        cell, whose except and finally blocks run and whose names come back, as a local
        cell's would; we go on following. False: the job is to be cancelled instead (not
        running yet, a second Ctrl-C, or a gateway that cannot; ``cancel_reason`` says why)."""
        # (no grant heard of yet is no proof that nothing runs: the job may have started
        # while its events were on their way; a queued one is refused, and then cancelled)
        if (self.background or self._interrupt_at is not None or self._cancel_wanted
                or self.state.final):
            return False
        self._interrupt_at = time.monotonic()
        fresh = _control_client(self.client)
        try:
            fresh.interrupt(self.id)
        except GatewayError as exc:
            if exc.status is None:  # it did not get there: neither would a cancel
                raise self._not_reached("interrupt", exc) from None
            code = exc.detail.get("error") if isinstance(exc.detail, dict) else None
            if code == "job_ended":
                return True  # it ends by itself: its end is on its way
            if code == "cannot_interrupt":
                backend = (self.client._health or {}).get("backend") or "its"
                self.cancel_reason = (f"this gateway's {backend} backend cannot interrupt a "
                                      "running cell, so the interrupt cancelled it instead")
            elif code != "job_queued":  # (queued again, for a retry: cancelled as when queued)
                self.cancel_reason = (f"the gateway could not interrupt it ({exc}), so the "
                                      "interrupt cancelled it instead")
            return False
        finally:
            fresh.close()
        self._interrupt_at = time.monotonic()  # its grace counts from the gateway's yes
        self.state.interrupt = "an interrupt"
        self.view.refresh()
        return True

    def _not_reached(self, what: str, exc: GatewayError) -> GatewayError:
        """The error for an interrupt or cancel the gateway did not take: the job's end is
        unknown (it may run on, or have ended meanwhile), and said so, not "cancelled"."""
        why = unreached_clause(exc, CONTROL_ANSWER_S)
        where = f"the gpu_magic gateway at {self.client.url}"
        head = (f"{where} did not answer the {what} ({why}; it may still act on it later)"
                if why.startswith("no answer") else f"the {what} did not reach {where} ({why})")
        return GatewayError(
            f"{head}. GPU job {self.id}'s end is unknown here: it may run on, or have ended; "
            f"nothing was bound here. `%gpu attach {self.id}` shows how it ends once the "
            f"gateway answers (and binds what it returns), `%gpu cancel {self.id}` stops it")

    def _interrupt_overdue(self) -> None:
        """A cell that did not take the interrupt in time is cancelled (by the caller, as a
        second Ctrl-C would be): its results are lost, as they would be if nothing stopped it."""
        if self._interrupt_at is not None and self.state.started_at is None:
            # its runner is still starting (it gets the interrupt once its cell runs): the
            # grace counts from then, not from a cold start's seconds (a review)
            self._interrupt_at = time.monotonic()
            return
        if (self.state.interrupted or self.state.final or self._interrupt_at is None
                or time.monotonic() - self._interrupt_at < INTERRUPT_GRACE_S):
            return
        self.cancel_reason = (
            f"the cell did not stop within {INTERRUPT_GRACE_S:g} s of the interrupt (it may be "
            "in a long call into C code that never checks for interrupts, or it ignores "
            "SIGINT)")
        raise KeyboardInterrupt

    def request_cancel(self, who: str) -> None:
        """Ask for a cancel (the Cancel button, job.cancel()); the follower sends it."""
        if self.state.final or self._cancel_wanted:
            return
        self.state.cancel = who
        self.state.cancel_error = None
        self._cancel_wanted = True

    def send_cancel(self) -> bool:
        """Send the cancel now; False (and the reason in the view) if it could not be sent."""
        if self._cancel_sent:
            return True
        fresh = _control_client(self.client)
        try:
            # where, for the job's record (the sidebar showed a Cancel button's cancel bare)
            fresh.cancel(self.id, via=_CANCEL_VIA.get(self.state.cancel or ""))
            self._cancel_sent = True
        except GatewayError as exc:
            self._cancel_wanted = False
            self.state.cancel = None
            self.state.cancel_error = f"the cancel did not get through: {exc}"
            cancel_failed = getattr(self.view, "cancel_failed", None)
            if cancel_failed is not None:
                cancel_failed()
            return False
        finally:
            fresh.close()
        self.view.refresh()
        return True

    def _on_event(self, ev: dict[str, Any], feed: EventFeed) -> None:
        self.last_seq = int(ev.get("seq") or self.last_seq)
        kind = ev.get("type")
        if self.owner is not None and kind in ("display", "update_display"):
            ev = _inert(ev, self.owner)
        if kind in ("stdout", "stderr", "display", "update_display", "clear_output"):
            if self.background:
                self._background_output(ev)
            else:
                self._foreground_output(ev)
        elif kind == "result" and self.owner is not None:
            pass
        elif kind == "result":
            self.result = ev
            # a Ctrl-C stops a large download at once (as it did a wait for the next event)
            with feed.raising():
                self._fetch_result(ev)
                if not self.background:
                    names, deleted, self.has_value, self.value = self.load_result()
                    self.bind(names, deleted)
        elif kind == "error":
            self.error = ev
        if kind == "done" and ev.get("state") != "succeeded":
            self.sent_objects = None  # (no answer will name them: the inputs' pickler goes)
        if not self.folded:
            self.state.apply(ev)
        if kind in ("queued", "granted", "started", "done", "result", "stderr", "interrupted"):
            self.view.refresh()

    def _foreground_output(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        self.view.before_output()
        if kind == "stdout":
            sys.stdout.write(ev.get("text", ""))
            sys.stdout.flush()
        elif kind == "stderr":
            sys.stderr.write(ev.get("text", ""))
            sys.stderr.flush()
        elif kind in ("display", "update_display"):
            from IPython import get_ipython
            from IPython.display import publish_display_data

            if get_ipython() is None:  # plain Python: the text form is all we can show
                print(ev.get("data", {}).get("text/plain", ""))
                return
            transient = {"display_id": ev["display_id"]} if ev.get("display_id") else None
            publish_display_data(ev.get("data", {}), ev.get("metadata") or {},
                                 transient=transient, update=kind == "update_display")
        elif kind == "clear_output":
            from IPython import get_ipython
            from IPython.display import clear_output

            if get_ipython() is None:
                return
            clear_output(wait=bool(ev.get("wait")))
            self.view.after_clear(wait=bool(ev.get("wait")))

    def _background_output(self, ev: dict[str, Any]) -> None:
        if ev.get("type") in ("stdout", "stderr"):
            self.printed.append(str(ev.get("text", "")))
        if getattr(self.view, "has_output_area", False):
            self.view.append_output(ev)  # kept in the widget of the cell that started the job
        elif ev.get("type") in ("stdout", "stderr") and not self.opts.quiet:
            # plain Python (no cells to keep apart): where a thread's print would go
            stream = sys.stdout if ev["type"] == "stdout" else sys.stderr
            stream.write(ev.get("text", ""))
            stream.flush()

    # --- results ---

    def _fetch_result(self, ev: dict[str, Any]) -> None:
        try:
            blob = self._blob(ev, ev["blob"])
            buffers = [self._blob(ev, d) for d in ev.get("buffers", [])]
        except GatewayError as exc:
            # a result comes only from a cell that ended well: say that, and where its
            # results still are, not only what broke on the way here (the gateway stopped)
            self.result = None  # nothing to bind
            self.state.state = "succeeded"
            again = f"%gpu attach {self.id} fetches them (gpu_magic.attach({self.id!r}) in Python)"
            if isinstance(exc, AuthError):  # (a token revoked mid-job: attach fails as well)
                again = (f"the gateway keeps them, and {again} once your token is valid "
                         "again")
            self.state.notices.append(f"its results could not be fetched: {again}")
            raise GatewayError(f"GPU job {self.id} succeeded, but its results could not be "
                               f"fetched: {str(exc).rstrip('.')}. Nothing was bound; {again}.",
                               status=exc.status) from None
        self.state.received_bytes = len(blob) + sum(len(b) for b in buffers)
        self._blobs = (blob, buffers)

    def _blob(self, ev: dict[str, Any], digest: str) -> bytearray:
        """A result blob: from inside the event when small (writable, like a download)."""
        inline = (ev.get("inline") or {}).get(digest)
        if inline is not None:
            return bytearray(base64.b64decode(inline))
        size = (ev.get("sizes") or {}).get(digest)
        return self.client.download(digest, size if isinstance(size, int) else None)

    def load_result(self) -> tuple[dict[str, Any], list[str], bool, Any]:
        """The returned names, the deleted names, and the value, rebuilt here (not bound)."""
        ev = self.result or {}
        assert self._blobs is not None, "no result fetched"
        blob, buffers = self._blobs
        staging: dict[str, Any] = {"__name__": "__main__"}
        try:
            # a name the runner sent back by reference that is not among what we kept: the
            # notebook's (a global the walk here did not find, that cloudpickle did)
            changed: list[tuple[Any, tuple[Any, ...]]] = []
            inputs = collections.ChainMap(self.refs, self.namespace)
            if self.attached:
                self.fresh = self._fresh_inputs(blob, buffers)
                inputs = collections.ChainMap(self.fresh, self.refs, self.namespace)
            payload = _payload.loads(blob, buffers, namespace=staging, inputs=inputs,
                                     classes=self.sent_classes, objects=self.sent_objects,
                                     changed=changed)
        except _payload.MissingInput as exc:
            raise SerializationError(
                f"the results of GPU job {self.id} hold {exc.name!r}, an input the cell left "
                f"unchanged, which comes back as this notebook's own {exc.name!r}, and there "
                f"is no {exc.name!r} here; nothing was bound. Attach the job from the notebook "
                f"that ran it, or set {exc.name} here as it was there and attach again."
            ) from None
        except Exception as exc:
            where = _payload.failing_code(exc.__traceback__)
            raise SerializationError(
                f"the results of GPU job {self.id} could not be rebuilt here "
                f"({type(exc).__name__}: {exc}{f', in {where}' if where else ''}); nothing "
                "was bound and the namespace is unchanged. Return fewer names (--return NAMES) "
                "or make the failing object loadable without a GPU."
            ) from exc
        memo: dict[int, Any] = {}
        names = {n: _rehome(v, staging, self.namespace, memo)
                 for n, v in payload["names"].items()}
        # inputs changed in place: their new state, applied to our own object when bound
        self.in_place = {n: tuple(_rehome(x, staging, self.namespace, memo) for x in st)
                         for n, st in (payload.get("in_place") or {}).items()}
        names.update({n: self.fresh.get(n, self.refs.get(n, _NOTHING)) for n in self.in_place})
        # inputs changed in place before the cell rebound or deleted their names: the new
        # state of the object that was sent (ours), whatever the name holds now
        self.left = {n: tuple(_rehome(x, staging, self.namespace, memo) for x in st)
                     for n, st in (payload.get("left") or {}).items()}
        self.sent_objects = None  # (named: what the inputs' pickler held goes)
        # and what was inside them (models[0], params["W"]): the same, by object
        self.inside = [(obj, tuple(_rehome(x, staging, self.namespace, memo) for x in st))
                       for obj, st in changed]
        # what the cell changed in local modules, for this kernel's own (by module name)
        self.modules = {m: tuple(_rehome(x, staging, self.namespace, memo) for x in st)
                        for m, st in (payload.get("modules") or {}).items()}
        has_value = "value" in payload
        value = _rehome(payload["value"], staging, self.namespace, memo) if has_value else None
        _figures_shown([value, *names.values()])
        return names, list(ev.get("deleted", [])), has_value, value

    def _fresh_inputs(self, blob: bytearray, buffers: list[bytearray]) -> dict[str, Any]:
        """For a job attached in another kernel: a new object for each input the cell changed
        in place, so that the results' references to it (``pair = (model, cfg)``) reach the
        same new object the name is bound to, and not this kernel's own of that name. The
        results are read once to learn those inputs' states (any input stands in meanwhile);
        their final state is applied when bound."""
        try:
            first = _payload.loads(blob, buffers, namespace={"__name__": "__main__"},
                                   inputs=_StandIns(), classes=self.sent_classes)
            return {n: _payload.fresh_from_state(st)
                    for n, st in (first.get("in_place") or {}).items()}
        except Exception:
            return {}  # (the real load below says what is wrong)

    def _apply_in_place(self, names: dict[str, Any]) -> dict[str, Any]:
        """Bring the inputs the cell changed in place to their new state, here, in the very
        objects the notebook holds (all of them, or none: an error undoes the rest). One that
        cannot take it (an array whose shape changed here meanwhile) is bound as a new
        object, as any other result."""
        names = dict(names)
        todo, fresh = [], []
        for n, st in self.in_place.items():
            if n not in names:
                continue  # not bound (a background job's name reassigned since)
            if (self.attached and n not in self.fresh) or names[n] is _NOTHING \
                    or not _payload.fits(names[n], st):
                fresh.append((n, st))  # not the object that was sent: a new one
                continue
            todo.append((n, names[n], self._merged(lambda n=n: n, names[n], st)))
        for n, st in self.left.items():
            obj = self.refs.get(n, _NOTHING)
            if obj is not _NOTHING and not self.attached and _payload.fits(obj, st):
                todo.append((n, obj, self._merged(lambda n=n: n, obj, st)))
        # and what was inside them (models[0], params["W"]), checked as it was rebuilt
        for obj, st in self.inside:
            label = f"an object inside the inputs ({type(obj).__name__})"
            todo.append((label, obj,
                         self._merged(lambda obj=obj: self._inside_name(obj), obj, st)))
        # (what cannot be undone, an array's bytes, last)
        todo.sort(key=lambda t: _IN_PLACE_ORDER.get(t[2][0], 0))
        undo: list[Callable[[], None]] = []
        n = ""
        try:
            for n, st in fresh:
                names[n] = _payload.fresh_from_state(st)
            for label, obj, st in todo:
                n = label  # (for the error below)
                undo.append(_payload.apply_in_place(obj, st))
            applied: list[types.ModuleType] = []
            for n, st in self.modules.items():
                module = sys.modules.get(n)
                if module is None:
                    # one the cell imported from its file, which this kernel had not: imported
                    # here too, as the cell's import would have, and then given the change
                    try:
                        module = importlib.import_module(n)
                    except Exception:
                        continue
                undo.append(_payload.apply_in_place(module, st))
                applied.append(module)
        except Exception as exc:
            for step in reversed(undo):
                step()
            raise SerializationError(
                f"the results of GPU job {self.id} could not be applied here: {n} changed in "
                f"place on the GPU, and its new state failed to load here "
                f"({type(exc).__name__}: {exc}); nothing was bound and the namespace is "
                "unchanged. Make its __setstate__ work without a GPU, or leave it out of what "
                "comes back (--return NAMES)."
            ) from exc
        self.modules_applied = applied
        return names

    def _merged(self, name: Callable[[], str], obj: Any, st: tuple[Any, ...]) -> tuple[Any, ...]:
        """A background job's new state of a list, set or dict, merged with what changed
        here since it was sent (see _payload.merged_state), and noted for the user.
        ``name``: how the note names it (asked only for a merge: a look through the inputs)."""
        kept = self.bases.get(id(obj))
        if kept is None or kept[0] is not obj:
            return st
        try:
            got = _payload.merged_state(kept[1], obj, st)
        except Exception:  # (keys whose == raises): the job's state, as without a merge
            got = None
        if got is None:
            self.replaced.append(name())
            return st
        if got[1]:
            self.merged.append(name())
        if got[2]:
            label = name()
            self.conflicts += [f"{label}[{k}]" for k in got[2]]
        return got[0]

    def _inside_name(self, obj: Any) -> str:
        """How to name an object inside the inputs in a note: ``nested['exp']``, or its type."""
        for n, v in self.refs.items():
            if isinstance(v, dict):
                for k, x in itertools.islice(v.items(), 1000):
                    if x is obj:
                        return f"{n}[{_payload.short_repr(k)}]"
            elif isinstance(v, list):
                for i, x in enumerate(itertools.islice(v, 1000)):
                    if x is obj:
                        return f"{n}[{i}]"
        return f"a {type(obj).__name__} inside the inputs"

    def bind(self, names: dict[str, Any], deleted: list[str]) -> None:
        """Bind the names and delete the deleted, all at once."""
        ev = self.result or {}
        # IPython's own names (In, Out...) are the kernel's, whatever a cell did with them
        owned = sorted(n for n in names if n in _IPYTHON_NAMES)
        names = {n: v for n, v in names.items() if n not in _IPYTHON_NAMES}
        with _sigint_deferred():  # all at once or not at all
            names = self._apply_in_place(names)
            # a name the cell made and deleted itself (`except E as exc` ends in one) was
            # never here: nothing of the notebook's is deleted, and nothing said
            deleted = [n for n in deleted if n in self.namespace and n not in names]
            self.namespace.update(names)
            for n in deleted:
                self.namespace.pop(n, None)
        self.bound = names
        self.result_bound = True
        self.bases = {}  # (merged: what it was sent need not stay alive with the handle)
        for n in owned:  # (it was dropped in silence: a newcomer's `In = ...` vanished)
            print(f"[gpu_magic] {n} was not brought back: the kernel keeps that name for "
                  "IPython's own use; give the value another name", file=sys.stderr)
        if self.merged:
            both = (f", but for {', '.join(self.conflicts[:8])}, which both changed: the job's "
                    "value there" if self.conflicts else "")
            print(f"[gpu_magic] background job {self.id}: {', '.join(self.merged)} changed here "
                  "since the job was sent (a cell, or another job); its changes were merged "
                  f"in, yours kept{both}", file=sys.stderr)
        if self.replaced:
            print(f"[gpu_magic] background job {self.id}: {', '.join(self.replaced)} changed "
                  "here since the job was sent, and the two changes cannot both be kept (a "
                  "list changed other than by appending, an array's values): the job's state "
                  "replaced yours", file=sys.stderr)
        # a module the cell imported is bound as locally, but said apart: "bound time, y"
        # read as if the cell had made a variable named time. An input module the cell
        # changed (`cfg.lr = 0.1`) was not imported: it is said as any changed input is.
        # (attached elsewhere, which names were inputs is not known: modules said as before)
        imported = [n for n, v in names.items() if isinstance(v, types.ModuleType)
                    and (self.attached or n in self.outputs or n not in self.refs)]
        # and the notebook's own modules the cell changed, which come back apart from names:
        # by the name that holds it here (`import helpers as h`: h), else as a module
        changed = []
        for module in self.modules_applied:
            held = [n for n, v in self.namespace.items()
                    if v is module and not HISTORY_NAME.fullmatch(n) and n not in _IPYTHON_NAMES]
            name = module.__name__
            changed.append(name if name in held else held[0] if held else f"module {name}")
        self.state.bound = [n for n in names if n not in imported] + [
            n for n in changed if n not in names]
        self.state.imported = imported
        self.state.deleted = deleted
        if ev.get("skipped") or ev.get("cuda_moved"):
            self.view.before_output()
        for name, why in (ev.get("skipped") or {}).items():
            if name.startswith("__gpu_") or name == "<cell value>" and not self.opts.show_value:
                continue  # the decorator's names for a call's arguments; a value outcome()
                # raises about
            # (a local run would have rebound it: say what the name is here now)
            here = ("" if name == "<cell value>" else
                    f"; here {name} still holds its value from before the cell"
                    if name in self.namespace else f"; here {name} is not defined")
            print(f"[gpu_magic] {name} was not brought back: {why}{here}", file=sys.stderr)
        if ev.get("cuda_moved"):
            n = ev["cuda_moved"]
            print(f"[gpu_magic] {n} CUDA tensor{'s' if n != 1 else ''} came back on the CPU, "
                  "as results always do; move them with .to('cuda') inside a %%gpu cell",
                  file=sys.stderr)

    def outcome(self, value: Callable[[], Any] | None = None) -> Any:
        """The cell's value if it succeeded, else the matching error, raised."""
        state = self.state.state
        grant = self.state.grant
        msg = self.state.message or ""
        if state == "succeeded":
            why = ((self.result or {}).get("skipped") or {}).get("<cell value>")
            if why and not self.opts.show_value:
                # run() and a decorated function return it: None in its place read as a
                # result (a %%gpu cell only shows it, and says so)
                fn = self.namespace.get("__gpu_fn__")
                decorated = self.source.startswith(_DECORATED_CALL) and fn is not None
                what = (f"{getattr(fn, '__qualname__', 'the function')}()'s return value"
                        if decorated else "the value of the cell's last expression")
                bound = ("" if not self.bound else " (what it changed in its arguments is "
                         "changed here too)" if decorated else " (the names it bound are "
                         "bound here)")
                raise short(SerializationError(
                    f"GPU job {self.id} succeeded{bound}, but {what} cannot come back: {why}. Return "
                    "what can be pickled (plain data, arrays, tensors) and keep the rest "
                    "where it runs"))
            if value is not None:
                return value()
            return self.value if self.has_value else None
        if state == "failed" and self.error is not None:
            # (the line `%debug` shows after a cell's error, from the innermost frame here)
            raise self._remote_exception()  # %debug: the cell's own frames stayed on its GPU
        if state == "cancelled" and self.error is not None and self.error.get("by"):
            # an admin interrupted it: where the cell stopped, and who stopped it; its user
            # did not ask, so nothing was bound (the gateway sent no result)
            shown = list(getattr(self._remote_exception(), "_render_traceback_", list)())
            exc = JobCancelled(f"GPU job {self.id} was interrupted by {self.error['by']}: the "
                               "cell stopped on KeyboardInterrupt there; nothing was bound",
                               job_id=self.id)
            exc._render_traceback_ = lambda: [*shown, "", f"JobCancelled: {exc}"]  # type: ignore[attr-defined]
            raise exc
        if state == "cancelled" and self.error is not None and self.error.get("interrupted"):
            # ended by the interrupt its user asked for: where the cell stopped, as a local
            # interrupted cell shows it, and what it had bound was bound (_on_event)
            shown = list(getattr(self._remote_exception(), "_render_traceback_", list)())
            exc = JobCancelled(f"GPU job {self.id} was cancelled by an interrupt: the cell "
                               "stopped on KeyboardInterrupt there, and what it had bound is "
                               "kept", job_id=self.id)
            exc._render_traceback_ = lambda: [*shown, "", f"JobCancelled: {exc}"]  # type: ignore[attr-defined]
            raise exc
        if state == "cancelled":
            who = f" by {self.state.cancel}" if self.state.cancel else ""
            text = cancelled_text(f"GPU job {self.id}", who, msg)
            raise short(JobCancelled(then(text, "nothing was bound"), job_id=self.id))
        if state == "timed_out":
            raise JobTimeout(f"GPU job {self.id} on {where(grant)} timed out: {msg}",
                             job_id=self.id, state=state)
        if state == "expired":
            raise WaitExpired(f"GPU job {self.id}: {msg}")
        if state == "lost":
            on = f" on {where(grant)}" if grant else ""
            raise RunnerLost(f"GPU job {self.id}{on} was lost: {msg}",
                             job_id=self.id, state=state)
        raise JobFailed(f"GPU job {self.id} {state}: {msg}{self._unloaded_input(msg)}",
                        job_id=self.id, state=state)

    def _unloaded_input(self, msg: str) -> str:
        """Which inputs hold an object of the class whose code failed to load them on the GPU
        machine (the runner knows the class, not the name: all inputs are one pickle)."""
        m = re.search(re.escape(_payload.INPUTS_NOT_REBUILT) + r", in ([\w.<>]+)\.\w+;", msg)
        if m is None:
            return ""
        found = [n for n, v in self.sent.items() if not n.startswith("_")
                 and type(v).__qualname__ == m.group(1)]
        if not found:
            return ""
        return (f". The input{'s' if len(found) > 1 else ''} {', '.join(found)} "
                f"{'are' if len(found) > 1 else 'is'} {'' if len(found) > 1 else 'a '}"
                f"{m.group(1)}")

    def _remote_exception(self) -> BaseException:
        ev = self.error or {}
        exc: Any = None
        lost: str | None = None  # why the cell's own exception type could not come back
        if ev.get("exception") and self.owner is None:
            try:
                exc = _payload.loads(self._blob(ev, ev["exception"]), namespace={})
            except Exception as why:
                exc = None
                lost = _not_rebuilt(ev, why)
        lines = render_traceback(ev, self.source, line_offset=self.opts.line_offset,
                                 label=self.opts.label, grant=self.state.grant, job_id=self.id,
                                 cell_name=_cell_name,
                                 # the notebook's functions too: a sent function calls
                                 # others that travelled as its globals
                                 locate=code_locator(list(self.sent.values()),
                                                     list(self.namespace.values())),
                                 hide_cell=self.source.startswith(_DECORATED_CALL),
                                 **_tb_style())
        if exc is None and ev.get("interrupted"):
            exc = KeyboardInterrupt()  # (its pickle did not come: the type is known anyway)
        if ev.get("unsent") and exc is None:
            lost = _as_remote_error(
                ev, f"could not be sent back from the GPU machine ({ev['unsent']})",
                "To get the type itself, keep what cannot be pickled or is large (a lock, an "
                "open file, big arrays) off the exception, or give its class a __reduce__")
        hint = "; ".join(h for h in (local_hint(ev), self._unsent_name_hint(ev), lost)
                         if h) or None
        rebuilt = rebuild(ev, exc, lines, hint=hint)
        if isinstance(rebuilt, KeyboardInterrupt):
            rebuilt._gpu_magic_remote = True  # type: ignore[attr-defined]  # the cell's: see run()
        return rebuilt

    def _unsent_name_hint(self, ev: dict[str, Any]) -> str | None:
        """A NameError for a name the notebook has but the cell was not sent: it named it only
        inside a string (eval("x"), globals()["x"]), which reading the code cannot see."""
        m = re.fullmatch(r"name '([A-Za-z_]\w*)' is not defined",
                         str(ev.get("evalue", "")).split(". Did you mean")[0])
        if ev.get("ename") != "NameError" or not m:
            return None
        name = m[1]
        if name not in self.namespace or name in self.sent or name in _IPYTHON_NAMES:
            return None
        frames = ev.get("traceback") or []
        last = frames[-1] if frames and isinstance(frames[-1], dict) else {}
        if not (last.get("cell") or str(last.get("filename", "")).startswith("<")):
            return None  # raised in a library's file: not a name of the notebook's
        return (f"{name} is defined in your notebook, but the cell names it only where reading "
                f"its code cannot see (inside a string: eval, exec, globals()[...]), so it was "
                f"not sent: name it once in the cell's code ({name} on a line of its own)")


def _tb_style() -> dict[str, Any]:
    """The notebook's ``%xmode`` and ``%colors`` (Context and plain where there is no IPython
    shell): a remote traceback is shown, and coloured, as a local one would be."""
    try:
        from IPython import get_ipython
    except ImportError:
        return {"mode": "Context", "theme": None}
    shell = get_ipython()
    mode = getattr(getattr(shell, "InteractiveTB", None), "mode", "Context")
    colors = getattr(shell, "colors", None)
    return {"mode": str(mode), "theme": colors if isinstance(colors, str) else None}


def _not_rebuilt(ev: dict[str, Any], why: Exception) -> str:
    """Why the cell's exception, which came, could not be rebuilt here, and what would do."""
    fix = None
    if isinstance(why, (ImportError, AttributeError)):
        fix = ("Its class is only where the cell ran: define it in a local cell, or install its "
               "module here too")
    elif isinstance(why, TypeError):
        fix = ("An exception class whose __init__ takes other arguments than it passes to "
               "Exception.__init__ needs a __reduce__ to travel")
    return _as_remote_error(ev, f"could not be rebuilt here ({type(why).__name__}: {why})", fix)


def _as_remote_error(ev: dict[str, Any], what: str, fix: str | None) -> str:
    """The hint of a cell's exception raised as RemoteError: what kept its own type, and
    what would bring it."""
    said = (f"{ev.get('ename') or 'the exception'} {what}, so it is raised here as "
            "RemoteError (`except RemoteError` takes it; its .ename names the type)")
    return f"{said}. {fix}" if fix else said


_GPU_CELL_FILE = re.compile(r"<(.+) on the GPU, job [0-9a-z]+\.\d+>")


def _figures_shown(values: Iterable[Any]) -> None:
    """A matplotlib figure that came back shows as an image here, as a local one does: the
    kernel's inline backend registers its image formatter only once pyplot first loads the
    backend (a local plot), so a notebook that had only imported pyplot showed the figure
    as ``<Figure size 640x480 with 1 Axes>``."""
    plt = sys.modules.get("matplotlib.pyplot")
    figure = sys.modules.get("matplotlib.figure")
    if plt is None or figure is None or not any(isinstance(v, figure.Figure) for v in values):
        return
    with contextlib.suppress(Exception):  # (a display nicety: never the cell's failure)
        from IPython import get_ipython

        png = get_ipython().display_formatter.formatters["image/png"]
        try:
            png.lookup_by_type(figure.Figure)
            return  # registered already (switching the backend closes open figures)
        except KeyError:
            plt.switch_backend(plt.get_backend())


def _cell_name(filename: str) -> str | None:
    """``Cell In[3]`` for a file that is a notebook cell of this kernel; ``Cell In[3] on the
    GPU`` for the code a %%gpu cell made (the runner compiled it under that name)."""
    made = _GPU_CELL_FILE.fullmatch(filename)
    if made:
        return f"{made.group(1)} on the GPU"
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    mapping = getattr(getattr(ip, "compile", None), "_filename_map", None) or {}
    n = mapping.get(filename)
    return f"Cell In[{n}]" if n is not None else None


# Foreground jobs this process follows now: a kernel shut down or restarted under its cell
# cancels them as it exits (atexit runs then, even with the cell busy; a SIGTERM, see
# _cancel_on_sigterm), instead of leaving them to the gateway's orphan timeout, a minute of
# GPUs held for no one.
_FOLLOWED: dict[str, GatewayClient] = {}
_FOLLOWED_LOCK = threading.RLock()  # (re-entered by a SIGTERM handler, see _cancel_on_sigterm)


def _followed(job_id: str, client: GatewayClient | None) -> None:
    with _FOLLOWED_LOCK:
        if client is None:
            _FOLLOWED.pop(job_id, None)
        else:
            _FOLLOWED[job_id] = client


@atexit.register
def _cancel_followed() -> None:
    with _FOLLOWED_LOCK:
        jobs = list(_FOLLOWED.items())
        _FOLLOWED.clear()
    for job_id, client in jobs:
        _cancel_fresh(client, job_id, timeout=2.0)


@contextlib.contextmanager
def _cancel_on_sigterm(job_id: str, box: dict[str, Any]) -> Iterator[None]:
    """While the main thread submits and follows job ``job_id`` (``box["client"]`` its
    gateway, once known): a SIGTERM cancels it and the followed jobs, then does what it would
    have done. jupyter_client sends one to a kernel that has not exited 2.5 s after being
    asked to (a restart under a busy cell), and the default action skips atexit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is None or old is signal.SIG_IGN:  # (a handler not set from Python: left as is)
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        if "client" in box:  # (still submitting: not yet among the followed)
            _followed(job_id, box["client"])
        _cancel_followed()
        signal.signal(signal.SIGTERM, old)
        if callable(old):
            old(signum, frame)
        else:
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is on_term:
            signal.signal(signal.SIGTERM, old)


# This process (a kernel) to the gateway: warm runners are kept per kernel, as local state is
_SESSION = secrets.token_hex(8)

# who asked for a cancel (JobState.cancel), as the gateway's ``via`` names it
_CANCEL_VIA = {"the Cancel button": "button", "job.cancel()": "code"}

# What another user's display may show here: text and raster images. HTML, JavaScript, SVG and
# Markdown run or can run script in this notebook's page, with its user's rights (a red team:
# a student's display, attached by the instructor, wrote files as the instructor).
_INERT_TYPES = ("text/plain", "image/png", "image/jpeg", "image/gif")
_NAMES_ONLY = re.compile(r"<[\w.]+( object)?( at 0x[0-9a-fA-F]+)?>")  # (a default repr)


def _inert(ev: dict[str, Any], owner: str) -> dict[str, Any]:
    # (a cell may write event lines of its own: what is not a bundle shows as nothing)
    data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    kept = {k: v for k, v in data.items() if k in _INERT_TYPES}
    if not isinstance(kept.get("text/plain", ""), str):
        kept["text/plain"] = str(kept["text/plain"])
    left = sorted(k for k in data if k not in _INERT_TYPES)
    # a text form that only names the object ('<IPython.core.display.HTML object>') tells
    # the admin nothing: Markdown and LaTeX are shown as their source, as text; else a note
    text = kept.get("text/plain")
    if left and (text is None or _NAMES_ONLY.fullmatch(text)):
        source = next((data[k] for k in ("text/markdown", "text/latex")
                       if isinstance(data.get(k), str) and data[k].strip()), None)
        kept["text/plain"] = source or (
            f"[gpu_magic] {owner}'s {', '.join(left)} output is not shown: it could run "
            "script in your notebook")
    metadata = ev.get("metadata") if isinstance(ev.get("metadata"), dict) else {}
    return dict(ev, data=kept, metadata={k: v for k, v in metadata.items() if k in _INERT_TYPES})


def _control_client(client: GatewayClient, connect_timeout: float = 3.0) -> GatewayClient:
    """A fresh client for an interrupt or a cancel (the pooled connection may be mid-request
    after Ctrl-C), with short timeouts: the gateway answers these at once, or is not there."""
    return GatewayClient(client.url, client.token, connect_timeout=connect_timeout,
                         read_timeout=max(connect_timeout, CONTROL_ANSWER_S))


def _cancel_fresh(client: GatewayClient, job_id: str,
                  timeout: float) -> dict[str, Any] | Exception:
    """Cancel from a control client (the process may be on its way out): the job's record as
    the gateway answered (a job that had ended is not cancelled), or what went wrong; never
    raises."""
    fresh = _control_client(client, timeout)
    try:
        return fresh.cancel(job_id)
    except Exception as exc:
        return exc
    finally:
        fresh.close()


def _cancel_quietly(client: GatewayClient, job_id: str) -> dict[str, Any] | Exception:
    answer = _cancel_fresh(client, job_id, timeout=3.0)
    client.reset()
    return answer


def _not_taken(stage: str | None) -> BaseException:
    """The error of an interrupt that came before the gateway took the job."""
    doing = {"submitting": "submitting it", "sending": "sending its inputs"}.get(
        stage or "", "preparing it")
    return short(JobCancelled(
        f"the cell was interrupted while {doing}, before the gateway took it: no GPU job was "
        "made, nothing ran and nothing was bound; run the cell again"))


def _not_found(answer: Any) -> bool:
    return isinstance(answer, GatewayError) and answer.status == 404


def _withdraws(client: GatewayClient) -> bool:
    # (from what the client knows already: a gateway that stalls must not be asked again)
    return isinstance(client._health, dict) and client._health.get("withdraws") is True


def _cancel_until_found(client: GatewayClient, job_id: str, answer: Any,
                        within: float = 1.0) -> Any:
    """Cancel ``job_id`` again while the gateway says it has no such job, for ``within``
    seconds: the answer of the last try."""
    end = time.monotonic() + within
    while _not_found(answer) and time.monotonic() < end:
        time.sleep(0.1)
        answer = _cancel_quietly(client, job_id)
    return answer


def submit(
    source: str,
    spec: Any = None,
    namespace: dict[str, Any] | None = None,
    opts: Options | None = None,
    *,
    hidden: Collection[str] = (),
    client: GatewayClient | None = None,
    job_id: str | None = None,
    box: dict[str, Any] | None = None,
) -> _Job | dict[str, Any]:
    """Analyse, pack, upload and submit; returns the followable job (or the dry-run report).

    ``box["client"]`` is set as soon as the gateway is known, so that a caller interrupted in
    the middle can still cancel job ``job_id``.
    """
    opts = opts or Options()
    problem = option_problem(opts.timeout, opts.wait, opts.retries) or env_problem(opts.env)
    if problem:
        raise ValueError(problem)
    namespace = namespace if namespace is not None else {}
    get_client = (lambda: client) if client is not None else connect
    gspec = _parse(spec, get_client)  # type: ignore[arg-type]
    try:
        analysis = analyze_cell(source, opts.line_offset)
    except CellSyntaxError as exc:
        exc.filename = opts.label  # ("Cell In[3], line 2", as a local cell's error says)
        raise
    values = select_inputs(analysis.inputs, namespace, hidden)
    # a stand-in only where nothing can read the value: not a global of a notebook function
    # the cell calls, nor under eval/exec/globals() (which the analysis cannot follow)
    code_names: set[str] = set()
    fglobals = _payload.function_globals(values.values(), namespace, code_names)
    held = set() if _READS_BY_NAME.search(source) else set(analysis.held) - set(fglobals)
    sent = {n: _payload.NotSent(n) if n in held else v for n, v in values.items()}
    local_dir = Path.cwd()
    # the notebook's own modules the cell (or a function it calls) imports: as they are here
    for name, module in _payload.local_imports(analysis.imports | code_names, local_dir).items():
        sent[_payload.IMPORTED_KEY + name] = module
    if opts.dry_run:
        _drop_unsendable_modules(sent, namespace, local_dir)
        # before packing: the report lists every input that cannot be sent, not the first
        return _dry_run(sent, gspec, get_client, local_dir, namespace)
    # (its buffers are named once the gateway says which digests it takes)
    try:
        packed = _payload.pack_inputs(sent, namespace, local_dir, keep_objects=True,
                                      hash_buffers=False)
    except SerializationError:
        if not _drop_unsendable_modules(sent, namespace, local_dir):
            raise
        packed = _payload.pack_inputs(sent, namespace, local_dir, keep_objects=True,
                                      hash_buffers=False)
    cl = get_client()
    if box is not None:
        box["client"] = cl
    try:
        health = cl.health()
    except GatewayError:
        invalidate_local()
        cl = connect() if client is None else cl
        health = cl.health(refresh=True)
    if health.get("authorized") is False:  # said now, not as the runner's Python being ""
        raise refused(cl.url, cl)
    try:
        _check_environment(health)
    except EnvironmentMismatch:  # (the answer is kept: the gateway may have been upgraded since)
        health = cl.health(refresh=True)
        _check_environment(health)
    _payload.name_buffers(packed, _payload.PIECES_SCHEME in health.get("digests", ()))
    blobs = packed.blobs()
    state = JobState(str(gspec), background=opts.background)
    state.simulated = bool(health.get("simulated"))
    notice = _SendingNotice() if not opts.quiet else None
    # a notice left saying "sending" or "submitting" would read as if it still were
    with notice.until_submitted() if notice is not None else contextlib.nullcontext():
        if box is not None:  # (an interrupt from here on says which of the two it stopped)
            box["stage"] = "sending"
        try:
            inline = _send_inputs(cl, blobs, state, packed.pickle_digest, notice)
        except GatewayError as exc:
            # a gateway that took names by pieces when asked, and no more (one put back to a
            # version from before them): asked again, the inputs are named as it says
            if exc.status != 422 or not any(d.startswith(_payload.PIECES_PREFIX) for d in blobs):
                raise
            if _payload.PIECES_SCHEME in cl.health(refresh=True).get("digests", ()):
                raise
            _payload.name_buffers(packed, False)
            blobs = packed.blobs()
            inline = _send_inputs(cl, blobs, state, packed.pickle_digest, notice)
        if not sent:  # the pickle of no inputs: "sent 5 B" read as something sent
            state.sent_bytes = 0
        if box is not None:
            box["client"] = cl
        job_id = job_id or secrets.token_hex(8)
        body = {
            "id": job_id,
            "blobs": inline,
            "source": source,
            "spec": gspec.to_json(),
            "inputs": packed.manifest,
            "input_names": list(values),
            "outputs": list(analysis.outputs),
            "deleted": sorted(analysis.deleted),
            "has_value": analysis.has_value,
            "return_names": opts.return_names,
            "no_return": opts.no_return,
            "timeout": opts.timeout,
            "wait": opts.wait,
            "retries": opts.retries,
            "oom_fallback": opts.oom_fallback,
            "env": opts.env,
            "python": sys.executable,
            "python_version": platform.python_version(),
            "cwd": os.getcwd(),
            "sys_path": list(sys.path),  # (folders a notebook added: `sys.path.append("../src")`)
            "background": opts.background,
            # (gpu_magic.run and @gpu in a notebook: its sidebar row says where, as a
            # %%gpu cell's does, not "no notebook")
            # (and the submitting process, in meta: a gateway from before it refuses a field
            # it does not know, and the cell with it)
            "meta": {**(opts.meta or kernel_cell_meta()), "session": _SESSION},
            "cell_label": opts.label,
            "line_offset": opts.line_offset,
        }
        # one exchange: the job goes in and its event stream comes back as the answer
        if box is not None:
            box["stage"] = "submitting"
        feed = EventFeed(cl, job_id, submit=body)
        try:
            try:
                record = feed.record()
            except GatewayError as exc:
                detail = exc.detail if isinstance(exc.detail, dict) else {}
                if exc.status != 409 or detail.get("error") != "missing_blobs":
                    raise
                # the gateway dropped blobs we thought it held: send what it lacks, submit again
                feed.close()
                cl.known.difference_update(blobs)
                body["blobs"] = {}
                state.sent_bytes += _upload(cl, blobs, state, packed.pickle_digest, notice)
                feed = EventFeed(cl, job_id, submit=body)
                record = feed.record()
        except BaseException:
            feed.close()
            raise
    cl.known.update(blobs)
    state.job_id = record["id"]
    job = _Job(cl, record, state, NullView(state), source, opts, namespace, values,
               refs={**fglobals, **values})
    if opts.background:  # (what it was sent of lists and dicts: see _payload.merged_state)
        job.bases = _payload.shallow_bases(job.refs.values())
    job.feed = feed
    job.sent_classes = packed.classes
    job.sent_objects = packed.objects
    job.outputs = [*analysis.outputs, *sorted(analysis.deleted)]
    job.view = _make_view(job)
    if notice is not None:
        job.view.first = notice.handle  # the status takes the notice's place
    return job


def _make_view(job: _Job) -> Any:
    """The live widget in a Jupyter kernel, the text status elsewhere in IPython, or nothing."""
    from IPython import get_ipython

    from ._widget import WidgetView, widgets_available

    quiet, background = job.opts.quiet, job.opts.background
    if get_ipython() is None or (quiet and not background):
        return NullView(job.state)
    if widgets_available():
        # --quiet --background: no status, only the output area that keeps the cell's output
        return WidgetView(job.state, on_cancel=job.request_cancel, status=not quiet)
    return NullView(job.state) if quiet else TextView(job.state)


def _send_inputs(client: GatewayClient, blobs: dict[str, memoryview],
                 state: JobState, pickle_digest: str,
                 notice: _SendingNotice | None = None) -> dict[str, str]:
    """Small inputs travel inside the submit (base64); larger ones are uploaded first, those
    the gateway holds already are not. Returns the inline blobs."""
    fresh = {d: b for d, b in blobs.items() if d not in client.known}
    size = sum(b.nbytes for b in fresh.values())
    if size > INLINE_MAX:
        state.sent_bytes = _upload(client, blobs, state, pickle_digest, notice)
        return {}
    state.reused = _buffers_reused(blobs, fresh, pickle_digest)
    state.sent_bytes = size
    return {d: base64.b64encode(_payload.byte_view(b)).decode() for d, b in fresh.items()}


def _buffers_reused(blobs: Iterable[str], sent: Collection[str], pickle_digest: str) -> int:
    # the data buffers (arrays, tensors) the gateway had: the pickle of the names is no "input
    # buffer" (a cell with no inputs read "1 input buffer reused" when run again)
    return sum(1 for d in blobs if d not in sent and d != pickle_digest)


def _upload(client: GatewayClient, blobs: dict[str, memoryview], state: JobState,
            pickle_digest: str, notice: _SendingNotice | None = None) -> int:
    missing = set(client.missing(list(blobs)))
    state.reused = _buffers_reused(blobs, missing, pickle_digest)
    size = sum(blobs[d].nbytes for d in missing)
    if notice is not None:
        notice.sending(size)
    sent = 0
    for d in missing:
        try:
            client.upload(d, blobs[d])
        except GatewayError as exc:
            if exc.status != 413:
                raise
            raise GatewayError(
                f"{str(exc).rstrip('.')}: an input of the cell is too large for this gateway. "
                "Make or load such data inside the cell instead of sending it, or ask the "
                "gateway's admin for a larger --max-blob-bytes.", status=413,
                detail=exc.detail) from None
        sent += blobs[d].nbytes
    if notice is not None:
        notice.sent(size)
    return sent


class _SendingNotice:
    """While large inputs go up (seconds over a network), the cell says so: before, it showed
    nothing at all until the job was submitted. The job's status takes this display's place."""

    MIN_BYTES = 16 << 20

    def __init__(self) -> None:
        self.handle: Any = None
        self._since = 0.0

    def sending(self, size: int) -> None:
        from IPython import get_ipython

        if size < self.MIN_BYTES or get_ipython() is None:
            return
        from IPython.display import display

        self._since = time.monotonic()
        data = self._bundle(f"[gpu] sending {human_size(size)} of inputs…")
        if self.handle is not None:  # sent again (the gateway had dropped some): same line
            self.handle.update(data, raw=True)
        else:
            self.handle = display(data, raw=True, display_id=True)

    def sent(self, size: int) -> None:
        if self.handle is not None:
            took = time.monotonic() - self._since
            self.handle.update(self._bundle(f"[gpu] sent {human_size(size)} of inputs in "
                                            f"{took:.1f} s; submitting…"), raw=True)

    @contextlib.contextmanager
    def until_submitted(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if self.handle is not None:
                self.handle.update(self._bundle("[gpu] stopped while sending or submitting: "
                                                "see below"), raw=True)
                self.handle = None
            raise

    @staticmethod
    def _bundle(text: str) -> dict[str, str]:
        import html

        return {"text/plain": text, "text/html": f"<code>{html.escape(text)}</code>"}


def run(
    source: str,
    spec: Any = None,
    namespace: dict[str, Any] | None = None,
    *,
    hidden: Collection[str] = (),
    client: GatewayClient | None = None,
    **options: Any,
) -> Any:
    """Run ``source`` on a GPU of the pool, reading and binding names in ``namespace``.

    ``spec`` is a GPU spec such as ``"H100:2, A100-80GB, any"``; ``options`` are those of
    :class:`Options` (``timeout``, ``wait``, ``retries``, ``return_names``, ``quiet``, ...).
    Returns the value of the cell's last expression (None if it has none). With
    ``background=True`` it returns at once with a :class:`GpuJob` handle instead.
    """
    if namespace is None:
        frame = inspect.currentframe()
        namespace = frame.f_back.f_globals if frame and frame.f_back else {}
    if not isinstance(namespace, collections.abc.MutableMapping):
        raise TypeError(f"namespace must be a dict (the names the cell reads and binds), not "
                        f"{type(namespace).__name__}: pass vars(obj) or a dict of your names")
    if not isinstance(source, str):
        how = (": decode it first (source.decode())" if isinstance(source, (bytes, bytearray))
               else "")
        raise TypeError(f"source must be a str (the cell's code), not "
                        f"{type(source).__name__}{how}")
    opts = _options(options)
    if _injob.current_job():
        # inside a GPU job already (a cell that runs on one): right here, as a decorated
        # function called there runs, never through a gateway of the GPU machine
        return _injob.run_here(source, spec, namespace, opts)
    job_id = secrets.token_hex(8)
    box: dict[str, Any] = {}
    job = None
    try:
        with contextlib.nullcontext() if opts.background else _cancel_on_sigterm(job_id, box):
            job = submit(source, spec, namespace, opts, hidden=hidden, client=client,
                         job_id=job_id, box=box)
            if isinstance(job, dict):
                return job
            if opts.background:
                from ._jobs import GpuJob

                return GpuJob(job, job.outputs)._start()
            _followed(job.id, job.client)
            return _follow_here(job, interrupts=True)
    except KeyboardInterrupt as exc:
        if getattr(exc, "_gpu_magic_remote", False):
            raise  # the cell's own, from the GPU (it ended on an interrupt): it has ended
        # The interrupt may land anywhere, even inside the submit before its answer arrived:
        # cancel by the id we chose, from a fresh connection, holding a second Ctrl-C.
        if isinstance(job, _Job) and job.fetch_interrupted:
            raise short(JobCancelled(
                f"GPU job {job_id} had finished, but the interrupt stopped fetching its "
                f"results here: nothing was bound. `%gpu attach {job_id}` (or "
                f"gpu_magic.attach('{job_id}')) fetches them", job_id=job_id)) from None
        if job is None and box.get("stage") != "submitting":
            raise _not_taken(box.get("stage")) from None  # nothing to cancel: none was sent
        answer: Any = None
        if "client" in box:
            with _sigint_deferred():
                answer = _cancel_quietly(box["client"], job_id)
            if job is None and _not_found(answer) and not _withdraws(box["client"]):
                # the submit may still be on its way to the gateway: a job it takes after this
                # cancel would run with nobody following it, so ask again for a moment (a
                # gateway that says it withdraws the id refuses such a submit itself)
                with _sigint_deferred():
                    answer = _cancel_until_found(box["client"], job_id, answer)
        if isinstance(job, _Job) and isinstance(answer, GatewayError) and answer.status is None:
            # the cancel did not get there: "cancelled" would be a guess, and often wrong
            error = job._not_reached("cancel", answer)
            job.state.state, job.state.message = UNREACHABLE, str(error)
            raise error from None
        if job is None and isinstance(answer, GatewayError) and answer.status is None:
            # interrupted while submitting: the gateway may still take the job it was sent
            raise GatewayError(
                f"interrupted while submitting GPU job {job_id}, and the cancel did not reach "
                f"the gpu_magic gateway at {box['client'].url} "
                f"({unreached_clause(answer, CONTROL_ANSWER_S)}): it may still take the job "
                f"and run it; nothing was bound here. `%gpu jobs` lists it once the gateway "
                f"answers, `%gpu cancel {job_id}` stops it") from None
        if job is None and _not_found(answer):
            raise _not_taken("submitting") from None
        if isinstance(job, _Job) and isinstance(answer, dict) and answer.get("state") in (
                set(FINAL_STATES) - {"cancelled"}):
            ended = answer["state"].replace("_", " ")
            job.state.state, job.state.message = UNREACHABLE, (
                f"it had ended ({ended}) before the cancel got there")
            raise short(JobCancelled(
                f"GPU job {job_id} had ended ({ended}) before the interrupt's cancel got there; "
                f"nothing was bound here. `%gpu attach {job_id}` shows how it ended (and binds "
                "its results)", job_id=job_id)) from None
        # (the cancel's answer knows whether it had started: events may not have told yet)
        granted = (isinstance(job, _Job) and job.state.grant is not None
                   or isinstance(answer, dict) and answer.get("started") is not None)
        if isinstance(job, _Job):
            job.state.cancelled_here()
            job.state.cancel = job.state.cancel or "an interrupt"
        # said before the gateway has stopped it: never that its GPUs are free already (a cell
        # that does not take the stop holds them for the gateway's grace, 3 s, on Ray too)
        how = ("the gateway is stopping it (its GPUs are free once it has ended: %gpu jobs "
               "says when); its output so far was shown" if granted
               else "before it was granted a GPU: nothing ran")
        reason = job.cancel_reason if isinstance(job, _Job) else None
        if reason:  # an interrupt that could not be one
            text = (f"GPU job {job_id} was cancelled: {reason}; nothing was bound, and {how}")
        elif granted:
            text = f"GPU job {job_id} was cancelled by an interrupt; {how}"
        else:
            text = f"GPU job {job_id} was cancelled by an interrupt {how}"
        raise short(JobCancelled(text, job_id=job_id)) from None
    except GatewayError as exc:
        if isinstance(job, _Job) and not job.state.final:
            # the widget must not go on saying "running": what is known is that we lost it
            job.state.state, job.state.message = UNREACHABLE, str(exc)
        raise
    finally:
        if isinstance(job, _Job) and not opts.background:
            cut = sys.exc_info()[1]
            try:
                if cut is not None and not isinstance(cut, GatewayError) and \
                        job.state.state not in (*FINAL_STATES, UNREACHABLE, "done"):
                    # following it broke off from here (a kernel restarting closes its
                    # streams under the cell: OSError), and no one else follows a foreground
                    # job: ended now, not by the gateway's orphan timeout a minute later (a
                    # trial's queued job kept its place in the queue that long)
                    with _sigint_deferred():
                        _cancel_fresh(job.client, job.id, timeout=2.0)
            finally:
                _followed(job.id, None)
                if sys.exc_info()[1] is not None or job.value is not None:
                    job.view.before_value()  # (its Out, or its error, is shown next)
                job.view.finish()


def _follow_here(job: _Job, interrupts: bool = False) -> Any:
    """Follow a job in this thread, its widget live and its Cancel button working
    (``interrupts``: and a Ctrl-C interrupting its cell, see ``_Job.follow``)."""
    from ._widget import CommPump

    job.view.show()
    with CommPump() as pump:
        job.follow(pump, interrupts)
    return job.outcome()


def attach(job_id: str, namespace: dict[str, Any] | None = None, *, quiet: bool = False,
           client: GatewayClient | None = None) -> Any:
    """Follow a job again (a background job, or one whose kernel went away): its output is
    replayed, its results are bound into ``namespace``, its value returned."""
    if namespace is None:
        frame = inspect.currentframe()
        namespace = frame.f_back.f_globals if frame and frame.f_back else {}
    try:
        return _attach(job_id, namespace, quiet, client)
    except GpuMagicError as exc:  # (called from a cell: its line, not our stack)
        one_line(exc)
        raise


def _attach(job_id: str, namespace: dict[str, Any], quiet: bool,
            client: GatewayClient | None) -> Any:
    cl = client or connect(looking=True)  # a gateway of another configuration has its jobs
    record = cl.job(job_id)
    state = JobState(record.get("spec", "any"), job_id)
    state.started_wall = record.get("started")  # (replayed, "started" arrives only now)
    state.created_wall = record.get("created")
    # (show_value: a value that cannot come back is said in a note, as its cell said it; a
    # job's cell or call is not known here)
    opts = Options(quiet=quiet, label=f"job {job_id}",
                   line_offset=int(record.get("line_offset") or 0), show_value=True)
    # inputs the cell left unchanged come back as references: resolve them to today's objects
    job = _Job(cl, record, state, NullView(state), record.get("source", ""), opts, namespace,
               namespace, attached=True)
    owner = record.get("user")
    if owner and owner != cl._request("GET", "/v1/limits").json().get("user"):
        job.owner = owner
        print(f"[gpu_magic] job {job_id} is {owner}'s: its output is shown here, but its "
              f"results go back only to {owner}'s own kernels, so nothing will be bound",
              file=sys.stderr)
    if record.get("state") in FINAL_STATES:
        # shown as it ended from its first display on, not "running" while its output replays:
        # its stored events are read once for the state (a job's output is at most 64 MiB)
        for ev in cl.events(job_id):
            state.apply(ev)
        job.folded = True
    job.view = _make_view(job)
    try:
        value = _follow_here(job)
    finally:
        job.view.finish()
    return None if job.owner is not None else value


def _drop_unsendable_modules(sent: dict[str, Any], namespace: Mapping[str, Any],
                             local_dir: Path) -> list[str]:
    """Leave out the modules of the notebook's that the cell imports but that cannot travel
    whole (one holding a lock, a connection, an open file): the cell imports those from their
    files where it runs, as it did before they travelled, and a note says so."""
    dropped = []
    for key in [k for k in sent if k.startswith(_payload.IMPORTED_KEY)]:
        try:
            _payload.dumps(sent[key], namespace=namespace, local_dir=local_dir)
        except Exception as exc:
            del sent[key]
            name = key[len(_payload.IMPORTED_KEY):]
            dropped.append(name)
            print(f"[gpu_magic] your module {name} cannot travel as this notebook holds it "
                  f"({type(exc).__name__}: {str(exc)[:200]}): the cell's `import {name}` reads "
                  "its file where the cell runs, without what was set on it here",
                  file=sys.stderr)
    return dropped


def _dry_run(values: dict[str, Any], spec: GpuSpec, get_client: Callable[[], GatewayClient],
             local_dir: Path, namespace: Mapping[str, Any]) -> DryRunReport:
    """The pre-flight report: every input, its type, size and how it travels, and for each
    one that cannot be sent the attribute path to the object at fault. Sends nothing."""
    rows: list[dict[str, Any]] = []
    sendable: dict[str, Any] = {}
    singles: dict[str, _payload.Packed] = {}
    for name, value in values.items():
        row: dict[str, Any] = {"name": name, "type": type(value).__qualname__}
        if isinstance(value, _payload.NotSent):  # its stand-in, not an input to show as sent
            row.update(type=type(namespace.get(name)).__qualname__, bytes=0,
                       travels="not sent: the cell binds it before it reads it")
            sendable[name] = value
            rows.append(row)
            continue
        try:
            singles[name], _ = _payload.dumps(value, namespace=namespace, local_dir=local_dir,
                                              hash_buffers=False)  # (named below)
        except Exception:
            unlisted: dict[str, int] = {}
            with _payload.by_value_here(local_dir):  # (as the send pickles them)
                found = _payload.find_all_unpicklable(value, name, unlisted=unlisted)
            said = [f"{path}: {what}; {fix}"
                    for path, what, fix in ((p, *_payload.describe(c)) for p, c in found)]
            row.update(bytes=None, travels="cannot be sent", path=found[0][0],
                       paths=[p for p, _ in found], problem=said[0], problems=said,
                       unlisted=unlisted)
        else:
            sendable[name] = value
            row.update(travels=_payload.travel_mode(value, local_dir))  # (bytes: below)
        rows.append(row)
    together: str | None = None
    packed: _payload.Packed | None = None
    try:
        packed = _payload.pack_inputs(sendable, namespace, local_dir, hash_buffers=False)
    except SerializationError as exc:  # each one alone pickles, together they do not
        together = str(exc)
    cached: set[str] = set()
    refusal = None
    pieces, failed = False, None
    try:
        cl = get_client()
        # named as the submit would name them, for the gateway's answer to hold for them
        pieces = _payload.PIECES_SCHEME in cl.health().get("digests", ())
    except GatewayError as exc:
        failed = exc  # (said below; not asked again: connecting may take a while to fail)
    for p in (*singles.values(), *([packed] if packed is not None else [])):
        _payload.name_buffers(p, pieces)
    for row in rows:
        if row["name"] in singles:
            row["bytes"] = singles[row["name"]].nbytes
    blobs = packed.blobs() if packed is not None else {}
    # (the pickle of no inputs is a few bytes: "5 B in all" read as something to send)
    total = packed.nbytes if packed is not None and sendable else 0
    try:
        if failed is not None:
            raise failed
        cached = set(blobs) - set(cl.missing(list(blobs)))  # asks, uploads nothing
        reachable = True
    except AuthError as exc:  # reached, but the cell would not run either: say why
        reachable, refusal = True, str(exc)
    except GatewayError:
        reachable = False
    for row in rows:
        digests = singles[row["name"]].buffer_digests if row["name"] in singles else []
        if digests and all(d in cached for d in digests):
            row["travels"] += ", already cached on the gateway"
    return DryRunReport({"spec": str(spec), "inputs": rows, "total_bytes": total,
                         "gateway_reachable": reachable, "together": together,
                         "refused": refusal})


class DryRunReport(dict):  # type: ignore[type-arg]
    """The dry-run report; a dict that shows itself as a table, with what cannot be sent
    listed below it (``row["paths"]`` and ``row["problems"]`` for each such input, the first
    of each also as ``row["path"]`` and ``row["problem"]``; ``row["unlisted"]``: for each
    path where the search stopped, how many more of its parts cannot be sent)."""

    def _rows(self) -> list[tuple[str, str, str, str]]:
        return [(r["name"], r["type"], "-" if r["bytes"] is None else _human(r["bytes"]),
                 r["travels"]) for r in self["inputs"]]

    @property
    def problems(self) -> list[str]:
        """One line per object that keeps an input from being sent (empty when the cell
        could run)."""
        found = [p for r in self["inputs"] for p in r.get("problems", ())]
        return found + ([self["together"]] if self.get("together") else [])

    def __repr__(self) -> str:
        n = len(self["inputs"])
        bad = sum(1 for r in self["inputs"] if r.get("problem"))
        size = f", {_human(self['total_bytes'])} in all" if bad < n or not n else ""
        head = f"dry run for {self['spec']}: {n} input(s){size}"
        if not self["gateway_reachable"]:
            head += " (gateway not reachable: cache unknown)"
        elif self.get("refused"):
            head += f" (cache unknown: {self['refused']})"
        if bad:
            head += f"; {bad} of them cannot be sent, so the cell would not run"
        rows = self._rows()
        if not rows:
            return head + "\n(no inputs: the cell uses no names from this namespace)"
        widths = [max(len(x[i]) for x in rows + [("name", "type", "size", "travels")]) for i in range(4)]
        lines = [head, "  ".join(h.ljust(w) for h, w in zip(("name", "type", "size", "travels"),
                                                            widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.problems:
            lines += ["cannot be sent:", *(f"  {p}" for p in self.problems)]
            # the search stops after a few faults per input: say how much it left unsearched
            lines += [f"  … and {n} more part(s) of {path} that cannot be sent (not searched: "
                      f"fix those above and run --dry-run again to see them)"
                      for r in self["inputs"] for path, n in r.get("unlisted", {}).items()]
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def gpu(spec: Any = None, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: each call of the function runs on a GPU of the pool and returns its result.

    ``@gpu("H100, any")`` above a function defined in a notebook; arguments and the result travel
    like a cell's inputs and value.
    """
    if callable(spec) and not isinstance(spec, (str, list, tuple)):
        return gpu()(spec)  # used bare: @gpu
    try:  # a spec no pool can read is refused where it is written, not at each call
        parse_spec(spec)
    except SpecError as exc:
        if exc.suggestion is None and "is not a GPU type" not in str(exc):
            raise exc.with_traceback(None) from None
        # (an unknown type may be the pool's own: its gateway says so at the first call)
    # and options no call could take (a misspelled name, timeout=-5): refused here too
    try:
        opts = _options(options, "@gpu_magic.gpu")
    except TypeError as exc:
        raise exc.with_traceback(None) from None
    problem = option_problem(opts.timeout, opts.wait, opts.retries) or env_problem(opts.env)
    if problem:
        raise ValueError(f"@gpu_magic.gpu: {problem}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        kind = ("a generator function" if inspect.isgeneratorfunction(fn) else
                "an async generator function" if inspect.isasyncgenfunction(fn) else
                "a coroutine function (async def)" if inspect.iscoroutinefunction(fn) else None)
        if kind is not None:
            # its call would make a generator or coroutine, which cannot travel back; shown
            # in one line, as the decorator's other refusals (not our frame's source)
            raise short(TypeError(
                f"@gpu_magic.gpu cannot run {getattr(fn, '__qualname__', fn)!r}: it is {kind}, "
                "and a GPU job gives back one value; return a list (or await inside a plain "
                "function) instead"))

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _injob.current_job():
                # called inside a GPU job (recursion, one decorated function calling another):
                # it runs right there, on the job's GPUs. A job each would hold a GPU while
                # waiting for the next, and a call deeper than the free GPUs waits for good.
                return fn(*args, **kwargs)
            # each argument under a name of its own: one the function changes in place is
            # changed in the caller's object too, as a local call leaves it
            ns: dict[str, Any] = {"__gpu_fn__": fn}
            given = []
            for i, value in enumerate(args):
                ns[f"__gpu_arg{i}__"] = value
                given.append(f"__gpu_arg{i}__")
            named = []
            for i, (key, value) in enumerate(kwargs.items()):
                ns[f"__gpu_kwarg{i}__"] = value
                named.append(f"{str(key)!r}: __gpu_kwarg{i}__")  # a str subclass's repr is code
            source = f"{_DECORATED_CALL}{', '.join([*given, '**{' + ', '.join(named) + '}'])})"
            try:
                return run(source, spec, ns, **{"quiet": True, **options})
            except (SpecError, NoFeasibleOption) as exc:
                # about the decorator's spec: raised from the call, not from our insides
                raise exc.with_traceback(None) from None
            except SerializationError as exc:
                if exc.name not in ns:
                    raise
                # the names above are ours: say which of the user's arguments it was
                raise _unsendable_argument(fn, args, kwargs, exc) from None

        call.remote_spec = spec  # type: ignore[attr-defined]
        return call

    return wrap


def _arguments(fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """A call's arguments under the names its function gives them (``values``, ``more[1]``
    for the second of ``*more``, the key for one of ``**options``)."""
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or a call that does not fit it
        yield from ((f"#{i + 1}", a) for i, a in enumerate(args))
        yield from kwargs.items()
        return
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            yield from ((f"{name}[{i}]", v) for i, v in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            yield from value.items()
        else:
            yield name, value


def _unsendable_argument(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                         exc: SerializationError) -> SerializationError:
    """The error for a decorated function's call whose function or an argument cannot be
    sent, naming it as the user knows it."""
    title = f"{getattr(fn, '__name__', None) or type(fn).__name__}()"
    if exc.name == "__gpu_fn__":
        label, candidates = f"function {title}", [(getattr(fn, "__name__", "fn"), fn)]
    else:
        label, candidates = "", list(_arguments(fn, args, kwargs))
    for name, value in candidates:
        try:
            _payload.dumps(value)
            continue
        except Exception:
            pass
        path, culprit = _payload.find_unpicklable(value, name)
        what, fix = _payload.describe(culprit)
        fix = fix.replace("inside the cell", "inside the function")  # there is no cell here
        subject = label or f"argument '{name}' of {title}"
        if path == name:
            message = f"{subject} ({what}) cannot be sent to the GPU: {fix}"
        else:
            message = (f"{subject} ({_payload.describe(value)[0]}) cannot be sent to the GPU: "
                       f"{path}: {what}; {fix}")
        return SerializationError(message, name=name, path=path)
    return exc
