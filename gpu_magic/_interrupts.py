"""The runner's side of an interrupt: SIGINT becomes a KeyboardInterrupt in the cell, and only there.

The gateway sends SIGINT to the runner process (never its group: a local kernel's interrupt
reaches the kernel, not the DataLoader workers it started) when the user interrupts a running
cell. Locally IPython raises KeyboardInterrupt inside the cell, so its ``except`` and ``finally``
blocks run and what it had bound stays. Here the same must hold, and the runner itself must
not be hurt by a SIGINT that comes while it loads inputs, packs results, or waits warm:

- before the cell (``job``): held, and raised in the cell as soon as it runs;
- while the cell runs (``cell``): raised where the cell's own code (or code it called) runs;
  held while the runner's own work for the cell is under way (sending a display, draining
  output), or while IPython is between the cell's statements, and tried again a moment later;
- otherwise (``idle``: after the cell, between jobs): ignored. The job is ending anyway.

Used by the runner only (stdlib only: the runner stays lean).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

RETRY_S = 0.01  # a held interrupt is tried again this often while the cell runs


class Interrupts:
    """SIGINT for one runner process; its handler is :meth:`handler` from install() on."""

    def __init__(self) -> None:
        self.phase = "idle"  # "job": a job started, its cell not yet; "cell": the cell runs
        self.pending = False  # one arrived and has not reached the cell yet
        self.raised = False  # a KeyboardInterrupt of ours went into this job's cell
        self.held = 0  # the runner's own work for the cell (not to be cut) is under way
        self.compiler: Any = None  # IPython's compiler: which files are cells' code
        # told when an interrupt goes into the cell (the runner tells the gateway)
        self.on_raise: Callable[[], None] | None = None
        self._main = threading.main_thread().ident
        self._retrying = False

    def install(self) -> None:
        """Make SIGINT ours (main thread only, as any handler). Before the first job: the
        handler is then the one a cell that replaced it gets back after the cell."""
        self._main = threading.main_thread().ident
        signal.signal(signal.SIGINT, self.handler)

    def job_started(self) -> None:
        """A job starts: from now on an interrupt is this job's (one that came before, for
        the previous job, found the runner idle and was dropped)."""
        self.pending = self.raised = False
        self._main = threading.main_thread().ident  # (a worker forked since install())
        self.phase = "job"

    def job_ended(self) -> None:
        self.phase = "idle"
        self.pending = False

    @contextlib.contextmanager
    def cell(self, compiler: Any) -> Iterator[None]:
        """Around ``shell.run_cell``: interrupts go into the cell's code while it runs."""
        self.compiler = compiler
        self.phase = "cell"
        if self.pending:  # it came while the inputs were loading: raised as the cell starts
            self._retry()
        try:
            yield
        finally:
            self.phase = "idle"  # packing its results: the cell has ended
            self.pending = False

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """The runner's own work called from the cell (a display, draining output): an
        interrupt waits until it is done, so no event is cut in half on the gateway's pipe."""
        if threading.get_ident() != self._main:  # signal handlers run in the main thread only
            yield
            return
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    def handler(self, signum: int, frame: Any) -> None:
        if self.phase == "idle":
            return
        if self.phase == "cell" and not self.held and self._in_cell(frame):
            self._raise()
        self.pending = True
        if self.phase == "cell":
            self._retry()

    def release(self) -> None:
        """The end of a hold, called by the hold's owner: an interrupt that waited for it goes
        into the cell now (a cell printing in a loop is nearly always inside a write, where
        the retries would keep finding it held)."""
        if self.pending and self.phase == "cell" and not self.held and \
                threading.get_ident() == self._main:
            self._raise()

    def _raise(self) -> None:
        self.pending = False
        if not self.raised and self.on_raise is not None:
            with contextlib.suppress(Exception):
                self.on_raise()
        self.raised = True
        raise KeyboardInterrupt

    def _in_cell(self, frame: Any) -> bool:
        """Whether the cell's code is on the stack: its own lines run, or code it called.
        (Not IPython compiling the cell or showing its value: a KeyboardInterrupt there
        would escape the cell and end the runner.)"""
        files = getattr(self.compiler, "_filename_map", None) or {}
        while frame is not None:
            if frame.f_code.co_filename in files:
                return True
            frame = frame.f_back
        return False

    def _retry(self) -> None:
        """Send SIGINT to the main thread again shortly, until it lands in the cell's code
        or the cell ends. A thread, not a timer signal: the cell may use SIGALRM itself."""
        if self._retrying:
            return
        self._retrying = True

        def again() -> None:
            try:
                while self.pending and self.phase == "cell":
                    time.sleep(RETRY_S)
                    # not if the cell made SIGINT its own meanwhile (ignored, or its handler)
                    if (self.pending and self.phase == "cell"
                            and signal.getsignal(signal.SIGINT) == self.handler):
                        signal.pthread_kill(self._main, signal.SIGINT)  # type: ignore[arg-type]
            finally:
                self._retrying = False
            if self.pending and self.phase == "cell":  # one more came as this thread ended
                self._retry()

        threading.Thread(target=again, daemon=True, name="gpu-magic-interrupt").start()
