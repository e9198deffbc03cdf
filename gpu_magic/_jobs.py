"""Following a job without blocking on the network, and the handle of a background job.

``EventFeed`` reads a job's event stream on a thread of its own and hands the events over a
queue, so the thread that follows the job (the kernel's main thread for a foreground cell) stays
free to tick the widget's clock and to handle a click on Cancel.

``GpuJob`` is what ``%%gpu --background`` returns. A thread follows the job and keeps its widget
live; the cell's output goes into the widget's output area, which is widget state, so it stays in
the cell that started the job whatever cell runs later (a message sent with the old cell's parent
header would be dropped by JupyterLab once that cell has finished). The returned names are bound
only at a safe point: before the next cell runs (a ``pre_run_cell`` hook) or in ``job.wait()``,
always on the main thread, never from the follower thread while another cell runs. A name
reassigned since the job was submitted is left alone, with a warning.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._client import LOCAL, GatewayClient, _clause, _local_gone, unreachable
from ._errors import GatewayError, GpuMagicError, one_line, short
from ._view import UNREACHABLE

if TYPE_CHECKING:
    from ._api import _Job

_END = object()
_MISSING = object()
_WAKE = object()  # a Ctrl-C held by ``held_interrupts``: it wakes a get() that waits


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class EventFeed:
    """A job's events, read on a thread of their own and taken from a queue.

    Given the job's ``submit`` body, the thread also submits it (one exchange: the answer is
    the event stream) and ``record()`` gives the gateway's answer, or raises its refusal.
    """

    def __init__(self, client: GatewayClient, job_id: str,
                 submit: dict[str, Any] | None = None, after: int = 0) -> None:
        self._owner = client
        self._client = client.borrow()
        # (its get waits in C: a Ctrl-C in a Condition's wait, between two of its lines, came
        # out as "RuntimeError: release unlocked lock" in place of the KeyboardInterrupt)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._job_id = job_id
        self._submit = submit
        self._after = after  # the last event already taken, when following again
        self._clean = False
        self._done = threading.Event()
        self._closing = threading.Lock()  # the reader's hand-back and close() do not cross
        # Ctrl-C's held and not raised yet (a deque: its append and popleft are atomic, and the
        # signal handler appends between any two lines of the follower)
        self._ctrl_c: collections.deque[int] = collections.deque()
        _THREADS.run(self._read)

    def _read(self) -> None:
        try:
            if self._submit is not None:
                events = self._client.submit_follow(self._submit)
            else:
                events = self._client.events(self._job_id, self._after)
            for ev in events:
                if self._stop.is_set():
                    return
                self._queue.put(ev)
                if ev.get("type") == "done":
                    self._clean = True
        except BaseException as exc:  # handed to the follower, which raises it
            if not self._stop.is_set():
                self._queue.put(_Failure(exc))
        finally:
            self._queue.put(_END)
            with self._closing:
                if self._clean:
                    self._owner.give_back(self._client)  # its connection serves the next job
                else:
                    self._client.close()
            self._done.set()

    @property
    def trouble(self) -> BaseException | None:
        """Why the stream is being resumed now (None while it flows)."""
        return self._client.trouble

    def away(self) -> GatewayError | None:
        """What the client says of the gateway while the stream cannot be resumed (it goes on
        trying); None while it flows."""
        client = self._client
        exc = client.trouble
        if exc is None:
            return None
        gone = _local_gone(client, self._job_id, exc)
        if gone is not None:
            return gone
        if client.url_from == LOCAL:
            return GatewayError(f"the local gpu_magic gateway at {client.url} stopped answering "
                                f"({_clause(exc)}). GPU job {self._job_id}'s end is unknown until "
                                "it runs again (the next %%gpu cell starts it): then wait() "
                                f"again, or `%gpu attach {self._job_id}`")
        return GatewayError(f"{unreachable(client.url, exc, client.url_from)}. GPU job "
                            f"{self._job_id}'s end is unknown until the gateway answers again: "
                            f"then wait() again, or `%gpu attach {self._job_id}`")

    def record(self) -> dict[str, Any]:
        """The submitted job's record, once the gateway has taken it (or its refusal)."""
        while True:
            ev = self.get(timeout=1.0)
            if ev is None:
                continue
            if ev.get("type") != "job":
                raise GatewayError(f"the gateway answered job {self._job_id}'s submit with "
                                   f"{ev.get('type')!r} before the job itself")
            return ev["job"]  # type: ignore[no-any-return]

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self._ctrl_c:  # a held Ctrl-C goes before the events queued ahead of it
                self._ctrl_c.popleft()
                raise KeyboardInterrupt
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if item is not _WAKE:  # (a wake only wakes: its Ctrl-C is in _ctrl_c, or taken)
                break
        if isinstance(item, _Failure):
            raise item.exc
        if item is _END:
            raise GatewayError(f"the event stream of job {self._job_id} ended without its end; "
                               f"the job may still be running: %gpu attach {self._job_id}")
        return item  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def held_interrupts(self) -> Iterator[None]:
        """While following (on the main thread): a Ctrl-C comes out of the next ``get()`` as its
        KeyboardInterrupt, not out of whatever line the follower ran when it came (an output
        event half written, or taken from the queue and not written yet, would be lost).

        The follower leaves the block at the job's end: a Ctrl-C it had not taken by then came
        too late to stop anything, as one after a local cell's last line, and is dropped. Only
        where Ctrl-C raises KeyboardInterrupt (Python's own handler): another handler is
        someone's choice and left alone. ``raising()`` is for waits that must stop at once.
        """
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return
        try:
            signal.signal(signal.SIGINT, self._hold)
        except ValueError:  # (not the main thread: no signal is handled there)
            yield
            return
        try:
            yield
        finally:
            if signal.getsignal(signal.SIGINT) == self._hold:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _hold(self, signum: int, frame: Any) -> None:
        self._ctrl_c.append(signum)
        self._queue.put(_WAKE)  # (SimpleQueue.put is safe to call from a signal handler)

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Within ``held_interrupts()``: a Ctrl-C raises where it lands again, for a wait that
        must stop at once (a large result's download, a call to a gateway that does not answer).
        """
        if signal.getsignal(signal.SIGINT) != self._hold:
            yield
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._hold)

    def close(self) -> None:
        """Stop reading. After the job's end the reader is already done; else (an interrupt)
        it stops at the next event or heartbeat, its connection closed under it."""
        self._stop.set()
        if not self._done.wait(0.5):
            with self._closing:
                self._clean = False  # closed under the reader: never handed back as a spare
            try:
                self._client.close()
            except Exception:
                pass


class _Threads:
    """Daemon threads kept for the next job's event feed: starting a thread costs a round
    trip through the scheduler, about as much as the gateway's whole answer to a small job."""

    def __init__(self, idle_s: float = 60.0) -> None:
        self._idle: list[queue.SimpleQueue[Any]] = []
        self._lock = threading.Lock()
        self._idle_s = idle_s

    def run(self, fn: Any) -> None:
        with self._lock:
            q = self._idle.pop() if self._idle else None
        if q is None:
            q = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(q,), daemon=True,
                             name="gpu_magic events").start()
        q.put(fn)

    def _loop(self, q: queue.SimpleQueue[Any]) -> None:
        while True:
            try:
                fn = q.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if q in self._idle:  # nobody handed us work meanwhile: end
                        self._idle.remove(q)
                        return
                continue  # work is on its way
            fn()
            with self._lock:
                self._idle.append(q)


_THREADS = _Threads()
# a forked child (multiprocessing) inherits the idle queues but not their threads
os.register_at_fork(after_in_child=_THREADS._idle.clear)


# --- background jobs ---

_PENDING: list[GpuJob] = []  # finished or running background jobs whose names are not bound yet
_PENDING_LOCK = threading.Lock()
_HOOKED: set[int] = set()
# what background jobs bound in the notebook's namespace (by id: namespace, {name: (value,
# the binding job's order)}), while it still holds it: a name another job bound since a job
# was submitted was not reassigned by the user. Only namespaces that last (the notebook's, a
# script's __main__): a throwaway dict given to run() would be kept alive here, with its
# results.
_JOB_BOUND: dict[int, tuple[Any, dict[str, tuple[Any, int]]]] = {}
_ORDER = itertools.count()  # background jobs in the order they were submitted


_OUTPUT_NAMES = frozenset({"_", "__", "___"})  # IPython's last outputs
# how long after its follower gave up on the gateway job.state and done() try it again
LOOK_AGAIN_S = 5.0


def _lasting(ns: Any) -> bool:
    main = sys.modules.get("__main__")
    if main is not None and ns is getattr(main, "__dict__", None):
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and ns is ip.user_ns


def _forget_rebound() -> None:
    """Drop what the user has since rebound or deleted: the registry keeps nothing alive that
    the notebook let go of, for longer than a cell."""
    with _PENDING_LOCK:
        for key, (ns, bound) in list(_JOB_BOUND.items()):
            for n, (value, _order) in list(bound.items()):
                if ns.get(n, _MISSING) is not value:
                    del bound[n]
            if not bound:
                del _JOB_BOUND[key]


def _bound_by_a_job(ns: Any, name: str, now: Any) -> int | None:
    """The order of the background job that bound ``now`` to ``name``, if one did."""
    entry = _JOB_BOUND.get(id(ns))
    if entry is None or entry[0] is not ns:
        return None
    value, order = entry[1].get(name, (_MISSING, None))
    return order if value is now else None


def _hook(shell: Any) -> None:
    """Bind finished jobs' names before each cell runs (once per shell)."""
    if shell is None or id(shell) in _HOOKED:
        return
    shell.events.register("pre_run_cell", _bind_finished)
    _HOOKED.add(id(shell))


def _bind_finished(*_info: Any) -> None:
    if _JOB_BOUND:
        _forget_rebound()
    with _PENDING_LOCK:
        ready = [j for j in _PENDING if j._finished.is_set()]
    for job in ready:
        job._bind_here(between_cells=True)


def _cell_key() -> Any:
    """Which cell is running now: its request's msg_id in a kernel, else the execution count."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    if ip is None:
        return None
    kernel = getattr(ip, "kernel", None)
    if kernel is not None:
        try:
            return (kernel.get_parent() or {}).get("header", {}).get("msg_id")
        except Exception:
            return None
    return getattr(ip, "execution_count", None)


class GpuJob:
    """A GPU job running in the background: ``%%gpu --background`` or ``run(..., background=True)``.

    ``job.wait()`` waits for it, binds its names and returns the cell's value (or raises the
    cell's error); ``job.cancel()`` cancels it. ``job.state``, ``job.grant`` and ``job.result``
    (the returned names) tell where it stands. Shown, it is the job's live widget.
    """

    def __init__(self, job: _Job, outputs: list[str]) -> None:
        self._job = job
        self._order = next(_ORDER)
        self.id: str = job.id
        self._finished = threading.Event()
        self._failure: BaseException | None = None
        self._bound = False
        self._loaded: tuple[dict[str, Any], list[str], bool, Any] | None = None
        self._shown_in: Any = _MISSING
        # the job's state and message when the follower lost the gateway (its end unknown):
        # put back when wait() follows it again
        self._known: tuple[str, str | None] | None = None
        self._lost_at = 0.0  # when the follower last gave up on the gateway
        self._again = threading.Lock()  # (state, done() and wait() may all follow again)
        # what each name that may come back held at submit: a name holding something else at
        # binding time was reassigned here meanwhile, and is not overwritten
        ns = job.namespace
        self._before = {n: ns.get(n, _MISSING) for n in {*outputs, *job.sent}}
        # and every other name: a notebook function's global the job changes comes back too
        self._before.update((n, v) for n, v in job.refs.items() if n not in self._before)
        self._thread = threading.Thread(target=self._follow, name=f"gpu_magic job {self.id}",
                                        daemon=True)

    def _start(self) -> GpuJob:
        from IPython import get_ipython

        ip = get_ipython()
        _hook(ip)
        with _PENDING_LOCK:
            _PENDING.append(self)
        if ip is not None:
            self._show()
        self._thread.start()
        return self

    # --- the follower thread ---

    def _follow(self) -> None:
        job = self._job
        try:
            job.follow()
        except BaseException as exc:  # reported by wait(), shown in the widget
            self._failure = exc
            if self._stream_lost():
                # the widget and job.state must not go on saying "running": its end is unknown
                self._lost_at = time.monotonic()
                self._known = (job.state.state, job.state.message)
                job.state.state, job.state.message = UNREACHABLE, str(exc)
            else:
                job.state.message = job.state.message or f"{type(exc).__name__}: {exc}"
        finally:
            if job.state.state == "succeeded" and job.result is not None:
                # (the deleted first: a render between the two would call them all binds)
                names, deleted = job.result.get("names", []), job.result.get("deleted", [])
                job.state.pending_deleted = sorted(set(deleted) - set(names))
                job.state.pending_imported = sorted(set(job.result.get("modules") or [])
                                                    & set(names))
                job.state.pending = sorted(set(names) | set(deleted))
            elif job.error is not None:
                try:
                    self._failure = job._remote_exception()
                    if job.error.get("by") and job.state.state == "cancelled":
                        # an admin interrupted it: a KeyboardInterrupt from wait() would read
                        # as the user's own; the JobCancelled says who (its traceback the same)
                        try:
                            job.outcome()
                        except BaseException as cancelled:
                            self._failure = cancelled
                    lines = getattr(self._failure, "_render_traceback_", None)
                    text = "\n".join(lines()) if lines else str(self._failure)
                    job.view.append_output({"type": "traceback", "text": text + "\n"})
                except Exception as exc:
                    self._failure = exc
            # the view says how it ended before wait() returns, so what wait() shows is final
            try:
                job.view.finish()
            finally:
                self._finished.set()

    def _follow_again(self, after: float = 0.0) -> None:
        """If the follower gave up (the gateway away longer than it tried) at least ``after``
        seconds ago: follow again from the last event taken (a job that ran on meanwhile, or
        ended, is told as it is now)."""
        with self._again:
            if not (self._finished.is_set() and self._stream_lost()
                    and time.monotonic() - self._lost_at >= after):
                return
            self._failure = None
            if self._known is not None:
                self._job.state.state, self._job.state.message = self._known
                self._known = None
            self._finished.clear()
            self._thread = threading.Thread(target=self._follow, daemon=True,
                                            name=f"gpu_magic job {self.id}")
            self._thread.start()

    # --- the handle ---

    @property
    def state(self) -> str:
        """submitting, queued, granted, running, succeeded, failed, cancelled, timed_out, ...,
        or unreachable while the gateway cannot be reached (the job's end is unknown)."""
        # a loop that polls the state learns when the gateway is back, not only wait()
        self._follow_again(after=LOOK_AGAIN_S)
        if self._away() is not None:
            return UNREACHABLE
        return self._job.state.state

    def _away(self) -> GatewayError | None:
        """What the client says of the gateway while the follower cannot reach it."""
        feed = self._job.following
        return None if feed is None or self._job.state.final else feed.away()

    @property
    def grant(self) -> dict[str, Any] | None:
        """What was granted: ``gpu_type``, ``count``, ``node``, ``option_index``, ``memory_gb``..."""
        g = self._job.state.grant
        return {k: v for k, v in g.items() if k not in ("type", "seq")} if g else None

    @property
    def result(self) -> dict[str, Any] | None:
        """The names the cell returned (None until it has succeeded)."""
        if not self._finished.is_set() or self._job.result is None:
            return None
        return dict(self._load()[0])

    @property
    def output(self) -> str:
        """What the cell has printed so far (stdout and stderr, in order), also while it
        runs: ``while "epoch 1" not in job.output: ...``."""
        return "".join(self._job.printed)

    @property
    def value(self) -> Any:
        """The value of the cell's last expression (None until it has succeeded)."""
        if not self._finished.is_set() or self._job.result is None:
            return None
        return self._load()[3]

    def done(self) -> bool:
        """Whether the job has ended, one way or another."""
        self._follow_again(after=LOOK_AGAIN_S)
        return self._finished.is_set() and not self._stream_lost()

    def _stream_lost(self) -> bool:
        """Whether following stopped because the gateway was away longer than the client
        tries again, the job's end unknown: wait() follows it again."""
        job = self._job
        return (isinstance(self._failure, GatewayError) and not job.state.final
                and job.result is None and job.error is None)

    def cancel(self) -> bool:
        """Cancel the job (queued or running) and release its GPUs; False if it had ended."""
        if self._finished.is_set():
            return False
        self._job.request_cancel("job.cancel()")
        return self._job.send_cancel()

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the job to end, bind its names here and return the cell's value.

        Raises the cell's own exception if it raised, ``JobCancelled`` if it was cancelled,
        ``TimeoutError`` if it is still going after ``timeout`` seconds (it keeps going), and
        ``GatewayError`` if the gateway could not be reached meanwhile (its end is unknown).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # No comm pump here (unlike a foreground cell): with one, a kernel whose wait() ended
        # in JobCancelled left the test process's event loop unset (seen with nbclient, not
        # understood yet). A Cancel click during wait() is handled when the cell ends.
        try:
            self._follow_again()
            # (polled with sleep(), which waits in C: a Ctrl-C inside the Condition of an
            # Event's wait came out as "RuntimeError: release unlocked lock", or left it locked)
            while not self._finished.is_set():
                time.sleep(0.01)
                if deadline is not None and time.monotonic() >= deadline:
                    away = self._away()
                    if away is not None:  # (the runner may have died with it: end unknown)
                        raise away
                    raise TimeoutError(
                        f"GPU job {self.id} is still {self.state} after {timeout:g} s; it keeps "
                        "going: wait again, or job.cancel()")
        except KeyboardInterrupt:
            # only the waiting stops: said in one line, not a traceback through threading
            raise short(KeyboardInterrupt(f"stopped waiting for GPU job {self.id}; it keeps "
                                          "running: job.wait() again, or job.cancel()")) from None
        if threading.current_thread() is threading.main_thread():
            self._bind_here()
        if self._failure is not None:
            # from here, not from the follower thread's frames inside gpu_magic
            raise one_line(self._failure.with_traceback(None))
        try:
            return self._job.outcome(value=lambda: self._load()[3])
        except GpuMagicError as exc:  # (JobTimeout, RunnerLost...: its line, not our stack)
            raise one_line(exc.with_traceback(None)) from None

    # --- results ---

    def _load(self) -> tuple[dict[str, Any], list[str], bool, Any]:
        if self._loaded is None:
            self._loaded = self._job.load_result()
        return self._loaded

    def _bind_here(self, between_cells: bool = False) -> None:
        """Bind the returned names (main thread, between cells or in wait)."""
        with _PENDING_LOCK:
            if self._bound or self._stream_lost():
                return  # (its end is not known yet: a later wait() may still bind it)
            self._bound = True
            if self in _PENDING:
                _PENDING.remove(self)
        job = self._job
        if job.state.state != "succeeded" or job.result is None:
            job.view.reopen()
            if between_cells and job.state.state in ("failed", "timed_out", "lost"):
                # its widget may be far up the notebook: said where the user looks now, once
                why = f"{type(self._failure).__name__}: {self._failure}" if self._failure else (
                    job.state.message or job.state.state)
                why = why.splitlines()[0] if why.strip() else job.state.state
                print(f"[gpu_magic] background job {self.id} "
                      f"{job.state.state.replace('_', ' ')}: {why[:300]} (its widget shows "
                      "more; job.wait() raises it)", file=sys.stderr)
            return
        try:
            names, deleted, has_value, value = self._load()
        except BaseException as exc:
            self._failure = exc
            job.state.pending = job.state.pending_deleted = job.state.pending_imported = []
            job.state.message = str(exc)
            job.view.reopen()
            print(f"[gpu_magic] {exc}", file=sys.stderr)
            return
        ns = job.namespace
        _forget_rebound()

        later: list[str] = []  # bound by a job submitted after this one: its value stands

        def reassigned(n: str) -> bool:
            now = ns.get(n, _MISSING)
            if now is self._before.get(n, _MISSING) or (n in names and now is names[n]) or (
                    n in deleted and now is _MISSING):  # (the same object: a module)
                return False
            by = _bound_by_a_job(ns, n, now)
            if by is None:
                return True
            if by > self._order:  # as cells run in order would leave it
                later.append(n)
            return False

        # IPython's own: `_` is this job's handle once its cell has shown it (`job = _`), and a
        # loop variable the job named `_` must not take its place, nor warn that it was kept
        names = {n: v for n, v in names.items() if n not in _OUTPUT_NAMES}
        deleted = [n for n in deleted if n not in _OUTPUT_NAMES]
        moved = [n for n in [*names, *deleted] if reassigned(n)]
        take = {n: v for n, v in names.items() if n not in moved and n not in later}
        gone = [n for n in deleted if n not in moved and n not in later]
        job.bind(take, gone)
        if _lasting(ns):
            with _PENDING_LOCK:
                entry = _JOB_BOUND.setdefault(id(ns), (ns, {}))
                entry[1].update((n, (ns[n], self._order)) for n in take if n in ns)
        state = job.state
        state.pending, state.pending_deleted, state.pending_imported = [], [], []
        state.kept_local = sorted(moved)
        if moved:
            print(f"[gpu_magic] background job {self.id} finished; kept your "
                  f"{', '.join(sorted(moved))}: reassigned here since the job was submitted. "
                  "The job's values are in the .result of its GpuJob.", file=sys.stderr)
        if has_value and value is not None and job.opts.show_value:
            job.view.append_output({"type": "display", **_formatted(value)})
        job.view.reopen()

    # --- showing ---

    def _show(self) -> None:
        self._shown_in = _cell_key()
        self._job.view.show()

    def _ipython_display_(self) -> None:
        # the cell that submitted the job shows it already; another cell gets another view
        if self._shown_in is not _MISSING and self._shown_in == _cell_key():
            return
        if getattr(self._job.view, "display_again", None) is not None:
            self._shown_in = _cell_key()
            self._job.view.display_again()
        else:
            from IPython.display import display

            display(self._repr_mimebundle_(), raw=True)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from ._view import bundle

        return bundle(self._job.state, time.monotonic())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def __repr__(self) -> str:
        from ._view import render_text

        return render_text(self._job.state, time.monotonic())


def _formatted(value: Any) -> dict[str, Any]:
    """The cell's value as a display (what a local cell's Out[] would show)."""
    from IPython import get_ipython

    ip = get_ipython()
    if ip is None:
        return {"data": {"text/plain": repr(value)}, "metadata": {}}
    data, md = ip.display_formatter.format(value)
    return {"data": data, "metadata": md}
