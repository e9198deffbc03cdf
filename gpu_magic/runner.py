"""What runs on the GPU machine: one job's cell, with IPython semantics.

A backend starts ``python -m gpu_magic.runner JOB_DIR EVENTS_FD``. The runner reads
``JOB_DIR/manifest.json`` and the input blobs it names, runs the cell in an ``InteractiveShell``
(history off) in the namespace the inputs' pickle rebuilt, writes result blobs into
``JOB_DIR/out/`` and emits events as JSON lines on ``EVENTS_FD``. It speaks only bytes and JSON to
the gateway, and imports neither the server nor any display library.

Output is captured twice over: ``sys.stdout``/``sys.stderr`` for Python writes (ordered with
``display()`` calls), and file descriptors 1 and 2 for C extensions and subprocesses.
"""

from __future__ import annotations

import base64
import builtins
import codecs
import contextlib
import copy
import ctypes
import functools
import gc
import io
import json
import logging
import mmap
import os
import re
import resource
import select
import signal
import sys
import threading
import time
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from . import _capture, _injob, _interrupts, _payload, _reserve

COALESCE_S = 0.002  # let a burst of prints gather before sending them as one event
_real_exit = os._exit  # the runner's own: a cell's (see attach_io) sends its output first
EXIT_SEND_S = 2.0  # how long a cell's os._exit waits for its last output to be sent
_MARKER = b"\x00gpu-magic-drain\x00"


class _Emitter:
    """Writes events, one JSON object per line, to the gateway's pipe (one pipe per job)."""

    def __init__(self, fd: int | None = None) -> None:
        self._f: Any = None
        self._lock = threading.Lock()
        # from the release of a cell's objects to the next job: what finalizers print is no
        # cell's output (a fresh runner ends without running them)
        self.muted = False
        if fd is not None:
            self.retarget(fd)

    def retarget(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # a subprocess of the cell must not hold the pipe open
        with self._lock:
            self._f = os.fdopen(fd, "wb", buffering=0)
            self.muted = False
        _lifeline(fd)

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None

    def emit(self, event: dict[str, Any], always: bool = False, most: int | None = None) -> int:
        """Sends the event; with ``most``, only if its line has at most that many bytes.
        Returns the line's length."""
        line = json.dumps(event, default=_json_default).encode() + b"\n"
        if most is not None and len(line) > most:
            return len(line)
        with self._lock:
            if self._f is not None and (always or not self.muted):
                self._f.write(line)
        return len(line)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    return repr(obj)


TEXT_EVENT_MAX = 1 << 20  # characters of output in one event
# bytes of one display's event: the gateway stops a runner whose event passes 64 MiB, and
# keeps 64 MiB of a job's output in all; one display past this is replaced by a notice
DISPLAY_EVENT_MAX = 32 << 20


class _Coalescer:
    """Gathers stdout/stderr text for a moment so a burst of lines becomes one event."""

    def __init__(self, emitter: _Emitter) -> None:
        self._emitter = emitter
        self._pending: list[list[str]] = []  # [stream, text] runs, consecutive same stream merged
        self._cond = threading.Condition()
        self._emit_lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True, name="gpu-magic-output").start()

    def add(self, stream: str, text: str) -> None:
        if not text:
            return
        with self._cond:
            if self._pending and self._pending[-1][0] == stream:
                self._pending[-1][1] += text
            else:
                self._pending.append([stream, text])
            self._cond.notify()

    def flush(self) -> None:
        # The emit lock keeps two flushes from reordering runs between them.
        with self._emit_lock:
            with self._cond:
                runs, self._pending = self._pending, []
            for stream, text in runs:
                # in pieces: one event stays far below what the gateway takes in one line
                for at in range(0, len(text), TEXT_EVENT_MAX):
                    self._emitter.emit({"type": stream, "text": text[at:at + TEXT_EVENT_MAX]})

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            time.sleep(COALESCE_S)
            self.flush()


class _Stream:
    """sys.stdout / sys.stderr for the cell.

    Text goes into the same pipe as C extensions and subprocesses write to (through fd 1 or 2),
    so a print after a subprocess's output can never overtake it: one pipe, one order. Whole lines
    go at once: print() writes its text and its newline separately, and the two pipes are read
    by two threads, so a line could be split, or cut by the other stream's text. A line still
    open is written before the other stream writes, when flushed, at a display or the cell's
    end, or after PARTIAL_S (a progress dot printed with end='' shows without a newline).
    """

    encoding = "utf-8"
    errors = "replace"
    _lock = threading.RLock()
    _open: list[_Stream] = []  # streams holding the start of a line
    _wake = threading.Condition(_lock)
    _timer: threading.Thread | None = None
    _idle = False  # the timer thread waits to be woken
    _tick = 0
    _last: _Stream | None = None  # the stream that wrote last
    drain: Callable[[int], None] | None = None  # waits until a fd's pipe reader has caught up
    interrupts: Any = None  # the runner's Interrupts: held while text is written

    def __init__(self, name: str, fd: int, pipe: int) -> None:
        self.name = name
        self._fd = fd
        # written through the capture pipe's own descriptor, not fd 1/2: a cell that
        # redirected or closed those still prints, as a kernel's print (sent over ZMQ) does
        self._pipe = pipe
        self._partial = ""
        self._since = 0  # the tick its open line was opened at

    writes = 0  # by either stream: whether anything was printed since a moment
    closed = False  # by the cell, as a file is: opened again for the next cell (_Pristine)

    def write(self, text: str) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        # an interrupt waits until the text is out (one landing between sending a line and
        # noting it sent repeated the line); counted by hand: a context manager per write
        # would cost a tenth of a print's time
        it = _Stream.interrupts
        held = it is not None and threading.get_ident() == it._main
        if held:
            it.held += 1
        try:
            written = self._write(text)
        finally:
            if held:
                it.held -= 1
        if held and it.pending:
            it.release()  # (the text is out and noted: no line twice)
        return written

    def _write(self, text: str) -> int:
        with _Stream._lock:
            _Stream.writes += 1
            if _Stream._last is not self:
                last, _Stream._last = _Stream._last, self
                if last is not None:
                    last._send_partial()  # the other stream's open line first: it came first
                    if _Stream.drain is not None:
                        # its pipe's reader must have passed on what it wrote before this
                        # stream's reader passes on what comes now (two pipes, two threads)
                        _Stream.drain(last._fd)
            whole = self._partial + text if self._partial else text
            cut = whole.rfind("\n") + 1
            if cut:
                self._send(whole[:cut] if cut < len(whole) else whole)
            self._partial = whole[cut:] if cut < len(whole) else ""
            if self._partial:
                if self not in _Stream._open:
                    self._since = _Stream._tick
                    _Stream._open.append(self)
                    if _Stream._timer is None:
                        _Stream._timer = threading.Thread(target=_Stream._send_late,
                                                          daemon=True, name="gpu-magic-partial")
                        _Stream._timer.start()
                    elif _Stream._idle:
                        _Stream._wake.notify()
            elif self in _Stream._open:
                _Stream._open.remove(self)
        return len(text)

    def _send_partial(self) -> None:
        if self._partial:
            text, self._partial = self._partial, ""
            self._send(text)
        if self in _Stream._open:
            _Stream._open.remove(self)

    def _send(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "replace"))
        while data:
            n = os.write(self._pipe, data)
            data = data[n:]

    @classmethod
    def flush_all(cls) -> None:
        with cls._lock:
            for s in list(cls._open):
                s._send_partial()

    @classmethod
    def _send_late(cls) -> None:
        """Sends lines left open for a whole tick. It ticks while lines are being printed
        and sleeps once none was left open for a while: print() opens and closes a line
        each time, and waking a thread for each would halve how fast lines go out."""
        with cls._lock:
            while True:
                cls._idle = True
                while not cls._open:
                    cls._wake.wait()
                cls._idle = False
                quiet = 0
                while quiet < 20:
                    cls._wake.wait(PARTIAL_S)
                    cls._tick += 1
                    quiet = 0 if cls._open else quiet + 1
                    for s in [s for s in cls._open if s._since < cls._tick - 1]:
                        s._send_partial()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        # Into the pipe, whose reader sends it within milliseconds. A full sync here would
        # make libraries that flush on every update (tqdm) pay a round trip each time.
        # (Closed, it does nothing, as a kernel's stream does: code that flushes at its end
        # must not fail for a close the cell made earlier.)
        with _Stream._lock:
            self._send_partial()

    def close(self) -> None:
        """What was written goes out; later writes raise ValueError, as on a closed file."""
        self.flush()
        self.closed = True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False


PARTIAL_S = 0.005  # a line left open waits this long for the rest of it


def _streams_after_fork() -> None:
    # a child forked while the timer thread held the lock (a DataLoader worker, a Pool's)
    # would wait for it for good at its first print: the child starts with its own
    _Stream._lock = threading.RLock()
    _Stream._wake = threading.Condition(_Stream._lock)
    _Stream._timer = None
    _Stream._idle = False
    _Stream._last = None
    for s in _Stream._open:  # the parent sends its open lines: not twice
        s._partial = ""
    _Stream._open = []
    _Stream.drain = None  # (the pipes' readers are threads of the parent)


os.register_at_fork(after_in_child=_streams_after_fork)


class _FdCapture:
    """Redirects a file descriptor into a pipe and turns what arrives into stream events."""

    def __init__(self, fd: int, stream: str, coalescer: _Coalescer) -> None:
        self.fd, self.stream, self._c = fd, stream, coalescer
        r, w = os.pipe()
        os.dup2(w, fd)
        # kept (never inherited by a program a cell runs): the cell may redirect or close fd,
        # and the marks, sys.stdout's text and the fd put back after it all go through this
        self.pipe = w
        self._pipe_id = _file_id(w)
        self._r = r
        self._drained = threading.Event()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        threading.Thread(target=self._loop, daemon=True, name=f"gpu-magic-fd{fd}").start()

    def _loop(self) -> None:
        carry = b""
        while True:
            chunk = os.read(self._r, 65536)
            if not chunk:
                return
            data = carry + chunk
            carry = b""
            while _MARKER in data:
                before, _, data = data.partition(_MARKER)
                self._c.add(self.stream, self._decoder.decode(before))
                self._drained.set()
            # keep a possible partial marker for the next read
            for n in range(len(_MARKER) - 1, 0, -1):
                if data.endswith(_MARKER[:n]):
                    carry, data = data[-n:], data[:-n]
                    break
            self._c.add(self.stream, self._decoder.decode(data))

    def mark(self) -> None:
        """Mark the end of what was written so far; ``wait_drained`` waits until it is sent."""
        self._drained.clear()
        os.write(self.pipe, _MARKER)

    def wait_drained(self, timeout: float = 2.0) -> None:
        self._drained.wait(timeout)

    def restore(self) -> None:
        """Point the fd at the pipe again, after a cell that redirected or closed it: what
        later cells' extensions and subprocesses write there must be seen."""
        try:
            same = _file_id(self.fd) == self._pipe_id
        except OSError:  # closed
            same = False
        if not same:
            os.dup2(self.pipe, self.fd)


def _file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


_DEBUGGER_FILES = frozenset(os.path.join(os.path.dirname(os.__file__), name)
                            for name in ("pdb.py", "bdb.py", "cmd.py"))


def _no_input(*_a: Any, _what: str = "input()", **_k: Any) -> str:
    frame = sys._getframe(1)
    while frame is not None:  # pdb.set_trace() (IPython's debugger too) reads through input()
        if frame.f_code.co_filename in _DEBUGGER_FILES:
            _no_debugger()
        frame = frame.f_back  # type: ignore[assignment]
    raise RuntimeError(
        f"{_what} is not available in a %%gpu cell: the cell runs on a remote machine with no "
        "keyboard. Put the value in a variable before the cell and use that instead."
    )


def _no_getpass(*_a: Any, **_k: Any) -> str:
    return _no_input(_what="getpass()")


class _NotebookOut(dict):  # type: ignore[type-arg]
    """The cell's ``Out``: the notebook's did not travel, and a lookup says what did."""

    def __missing__(self, key: Any) -> Any:
        raise KeyError(f"Out[{key!r}]: the notebook's Out did not travel with the cell; use "
                       f"_{key} instead (the same value, sent when the cell uses it)")


class _NotebookIn(list):  # type: ignore[type-arg]
    """The cell's ``In``: the notebook's input history when the cell reads it (it travels
    then), else empty, and a lookup says why."""

    travelled = False

    def __getitem__(self, index: Any) -> Any:
        try:
            return super().__getitem__(index)
        except IndexError:
            if self.travelled:
                raise
            raise IndexError(f"In[{index!r}]: the notebook's input history did not travel "
                             "with the cell; put the text you need in a variable before the "
                             "cell and use that") from None


def _no_debugger(*_a: Any, **_k: Any) -> None:
    raise RuntimeError(
        "breakpoint() cannot stop a %%gpu cell: a debugger needs a keyboard, and the cell runs "
        "on a remote machine with none. Debug the code in a local cell (on a small input), or "
        "print the values you want to see; %debug after a failed cell shows its traceback."
    )


class _NoStdin:
    """sys.stdin for a cell: reading says why there is no keyboard; the rest of a file's
    face works, since libraries touch it (multiprocessing's children close it first thing:
    without ``close`` every Pool and DataLoader worker died)."""

    encoding = "utf-8"
    closed = False

    def read(self, *_a: Any) -> str:
        return _no_input()

    readline = readlines = read

    def __iter__(self) -> _NoStdin:
        return self

    def __next__(self) -> str:
        return _no_input()

    def close(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 0


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_NOTED: set[str] = set()  # what this cell has been told once already


def _without_widget(data: dict[str, Any]) -> dict[str, Any]:
    """A widget's display without its view: the view would name a model that lives here,
    which the notebook cannot reach (widgets talk to their kernel through comms, and this is
    no kernel). Its text shows instead, and the first time, why."""
    if "widget" not in _NOTED:
        _NOTED.add("widget")
        print("[gpu_magic] interactive widgets cannot be shown from the GPU machine (they "
              "need the notebook's own kernel); showing their text instead. Progress bars: "
              "tqdm.notebook and tqdm.auto draw as text here.", file=sys.stderr)
    return {k: v for k, v in data.items() if k != _WIDGET_VIEW}



class _TextProgress:
    """tqdm.notebook draws its bars with ipywidgets, which cannot reach the notebook from
    here (see _without_widget): imported in a cell, it draws them as text instead, as
    tqdm.auto does outside a kernel. A meta path finder, so nothing is imported until a cell
    asks for it."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "tqdm.notebook":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _TextProgressLoader(spec.loader)
                return spec
        return None


class _TextProgressLoader:
    def __init__(self, real: Any) -> None:
        self.real = real

    def create_module(self, spec: Any) -> Any:
        return self.real.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.real.exec_module(module)
        from tqdm import std

        module.tqdm = module.tqdm_notebook = std.tqdm
        module.trange = module.tnrange = std.trange


def _cell_shell(ns: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> Any:
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    class Publisher(DisplayPublisher):
        def publish(self, data: Any, metadata: Any = None, source: Any = None, *,
                    transient: Any = None, update: bool = False, **_kw: Any) -> None:
            if _WIDGET_VIEW in (data or {}):
                data = _without_widget(data)
            event: dict[str, Any] = {
                "type": "update_display" if update else "display",
                "data": data,
                "metadata": metadata or {},
            }
            if transient and transient.get("display_id"):
                event["display_id"] = transient["display_id"]
            send(event)

        def clear_output(self, wait: bool = False) -> None:
            send({"type": "clear_output", "wait": bool(wait)})

    class ValueHook(DisplayHook):
        """Keeps the last expression's value for the client instead of printing Out[n]."""

        def __call__(self, result: Any = None) -> None:
            if result is not None and self.exec_result is not None:
                self.exec_result.result = result

    if not any(isinstance(f, _TextProgress) for f in sys.meta_path):
        sys.meta_path.insert(0, _TextProgress())
    cfg = Config()
    cfg.HistoryManager.enabled = False
    cfg.InteractiveShell.colors = "nocolor"
    shell = InteractiveShell.instance(config=cfg, user_ns=ns)
    shell.display_pub = Publisher(shell=shell)
    shell.displayhook = ValueHook(shell=shell)
    shell.display_trap.hook = shell.displayhook  # run_cell installs the trap's hook, not ours
    _report_errors_in_cell(shell)

    def ask_exit() -> None:  # exit() / quit(): a kernel would end; here the cell ends
        raise SystemExit("exit() ends this cell on the GPU machine; the notebook's kernel "
                         "keeps running (restart it from the notebook if that was meant)")

    shell.ask_exit = ask_exit

    def enable_gui(gui: str | None = None) -> None:
        # `%matplotlib inline` asks for no event loop (None); a window toolkit cannot open here
        if gui not in (None, "inline"):
            from IPython.core.error import UsageError

            raise UsageError(f"a %%gpu cell runs where there is no screen, so it cannot open "
                             f"{gui} windows: use `%matplotlib inline` (figures come back into "
                             "the notebook)")

    shell.enable_gui = enable_gui

    def set_next_input(text: str, replace: bool = False) -> None:
        # %load and %recall write into the notebook's cells, which a job cannot reach
        print("[gpu_magic] this cell asked to put text into the notebook's next cell (%load, "
              "%recall or set_next_input), which a %%gpu cell cannot do: run that line in a "
              "cell without %%gpu", file=sys.stderr)

    shell.set_next_input = set_next_input
    # IPython's advice on SystemExit ("To exit: use 'exit'...") is for a terminal, not a cell
    warnings.filterwarnings("ignore", message="To exit: use", category=UserWarning)
    _register_gpu_magic(shell)
    return shell


CELL_STDERR: list[Any] = [None]  # sys.stderr as the running cell began


def _report_errors_in_cell(shell: Any) -> None:
    """The cell's own error travels as an event (the client raises it), so the shell must not
    also print it. Every other error IPython reports and goes on from is printed, as a kernel
    shows it: a script's under ``%run``, a ``_repr_html_`` that raised, an event callback's,
    a nested ``run_cell``'s. (Silencing them all made ``%run`` of a failing script succeed.)"""
    from IPython.core.interactiveshell import InteractiveShell

    def code(name: str) -> Any:  # (IPython 8.12 on: the environment a cell runs in may differ)
        return getattr(getattr(InteractiveShell, name, None), "__code__", None)

    cell_machinery = {code(n) for n in ("run_code", "run_ast_nodes", "run_cell_async",
                                        "_run_cell", "showindentationerror")} - {None}
    # (one frame per cell run, also for a cell awaiting run_cell_async itself)
    one_cell = code("run_cell_async") or code("_run_cell")
    show_tb, show_syntax = shell.showtraceback, shell.showsyntaxerror
    passing = threading.local()  # a traceback being shown may hand on to showsyntaxerror

    def the_cells_own() -> bool:
        if getattr(passing, "on", False):
            return False
        caller = sys._getframe(2)  # (above the stand-in below)
        if caller.f_code not in cell_machinery:
            return False
        depth, frame = 0, caller
        while frame is not None:  # a nested run_cell's error is one the cell goes on from
            depth += frame.f_code is one_cell
            frame = frame.f_back  # type: ignore[assignment]
        return depth <= 1

    def showtraceback(*args: Any, **kwargs: Any) -> None:
        if the_cells_own():
            return
        passing.on = True
        try:
            show_tb(*args, **kwargs)
        finally:
            passing.on = False

    def showsyntaxerror(*args: Any, **kwargs: Any) -> None:
        if not the_cells_own():
            show_syntax(*args, **kwargs)

    def print_traceback(_etype: Any, _value: Any, stb: list[str]) -> None:
        # on the cell's own stderr, as a kernel's error output goes past %%capture and
        # redirect_stderr (captured, the error of code run under %%capture was lost)
        print(shell.InteractiveTB.stb2text(stb), file=CELL_STDERR[0] or sys.stderr)

    shell.showtraceback, shell.showsyntaxerror = showtraceback, showsyntaxerror
    shell._showtraceback = print_traceback


def _register_gpu_magic(shell: Any) -> None:
    """``%%gpu`` and ``%gpu`` in a cell, as in the notebook that sent it (where the extension
    is loaded): a nested ``%%gpu`` cell runs right here, in this job. Loaded on first use
    (most cells never use it), and never registered through the extension: the shell puts
    back what a cell registers, and a loaded extension is not loaded twice."""
    made: list[Any] = []  # one instance: each registers itself with the shell's configurables

    def gpu(line: str, cell: str | None = None) -> Any:
        if not made:
            from ._magic import GPUMagic

            made.append(GPUMagic(shell=shell))
        return made[0].gpu(line, cell)

    shell.register_magic_function(gpu, magic_kind="line_cell", magic_name="gpu")


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    return ctypes.CDLL(None)


class _CEnviron:
    """The C library's environment, which ``os.environ`` only mirrors. A cell that changes it
    behind ``os.environ``'s back (``os.putenv``, a C extension's ``setenv``) would leak into
    the child processes and C libraries of later cells on a reused runner. Whether anything
    changed is read from its table of pointers (one copy of a few hundred bytes, under a
    microsecond), so only a cell that touched the environment pays for putting it back."""

    def __init__(self) -> None:
        try:
            self._var: Any = ctypes.c_void_p.in_dll(_libc(), "environ")
        except (OSError, ValueError):  # no such symbol here: nothing to watch
            self._var = None
        self._at, self._table = -1, b""

    def _entries(self) -> list[int]:
        if not self._var.value:  # clearenv() leaves no table at all
            return []
        table = ctypes.cast(self._var.value, ctypes.POINTER(ctypes.c_void_p))
        entries = []
        while table[len(entries)]:
            entries.append(table[len(entries)])
        return entries

    def touched(self) -> bool:
        """Whether the environment changed since :meth:`mark`."""
        if self._var is None:
            return False
        at = self._var.value or 0
        return at != self._at or ctypes.string_at(at, len(self._table)) != self._table

    def mark(self) -> None:
        if self._var is None:
            return
        self._at = self._var.value or 0
        size = (len(self._entries()) + 1) * ctypes.sizeof(ctypes.c_void_p)  # with its NULL
        self._table = ctypes.string_at(self._at, size) if self._at else b""

    def sync(self, env: Any) -> None:
        """Make the C environment hold exactly ``env`` (a str mapping: ``os.environ``)."""
        if self._var is None:
            return
        have: dict[bytes, bytes] = {}
        for entry in self._entries():
            key, eq, value = ctypes.string_at(entry).partition(b"=")
            if eq:
                have[key] = value
        want = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        for key in have.keys() - want.keys():
            os.unsetenv(key)
        for key, value in want.items():
            if have.get(key) != value:
                os.putenv(key, value)


# The signals a cell may plausibly take over (SIGKILL and SIGSTOP cannot be; the rest keep
# Python's own handlers unless a cell is unusual indeed).
_SIGNALS = tuple(getattr(signal, n) for n in (
    "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGTERM",
    "SIGCHLD", "SIGPIPE", "SIGWINCH") if hasattr(signal, n))
_TIMERS = tuple(getattr(signal, n) for n in ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF")
                if hasattr(signal, n))
_HAS_MASK = hasattr(signal, "pthread_sigmask")


_RLIMITS = tuple(getattr(resource, n) for n in (
    "RLIMIT_NOFILE", "RLIMIT_STACK", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CORE", "RLIMIT_CPU",
    "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_MEMLOCK") if hasattr(resource, n))


class _Pristine:
    """Process-wide settings a cell may change that a fresh runner would not carry into the
    next cell: which warnings were shown and how they are shown, the root logger's set-up,
    signal handlers, the signal mask, and timers (an alarm left running would go off in a
    later cell, or kill the runner while it waits); sys.stdout and friends, the interpreter's
    hooks, tracer and recursion limit, builtins, umask and resource limits. Taken before the
    first cell, put back after each (a limit a cell lowered for good cannot be: that runner
    takes no further cell). Warning filters are not: packages add their own when imported,
    and stay imported."""

    def __init__(self) -> None:
        self.streams = (sys.stdout, sys.stderr, sys.stdin)
        self.hooks = (sys.excepthook, sys.displayhook, sys.breakpointhook, sys.unraisablehook)
        self.tracing = (sys.gettrace(), sys.getprofile(), sys.getrecursionlimit())
        self.builtins = dict(vars(builtins))
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        self.rlimits = {r: resource.getrlimit(r) for r in _RLIMITS}
        self.showwarning = warnings.showwarning
        root = logging.getLogger()
        self.handlers, self.level = list(root.handlers), root.level
        self.disable = logging.root.manager.disable
        self.signals = {s: signal.getsignal(s) for s in _SIGNALS}
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, []) if _HAS_MASK else None
        self.threads = set(threading.enumerate())

    def threads_left(self) -> list[threading.Thread]:
        """Threads a cell started that still run and would keep the process alive. Daemon
        threads (a progress bar's monitor) and the workers of thread pools (idle between
        tasks: asyncio.to_thread's, an executor never shut down) are a library's business."""
        return [t for t in threading.enumerate()
                if t not in self.threads and not t.daemon and t.is_alive()
                and getattr(getattr(t, "_target", None), "__module__", "")
                != "concurrent.futures.thread"]

    def restore(self) -> None:
        # a cell that set sys.stdout aside, or replaced print, silenced every later cell
        sys.stdout, sys.stderr, sys.stdin = self.streams
        for stream in self.streams:  # sys.stdout.close() in the cell: open for the next one
            if isinstance(stream, _Stream):
                stream.closed = False
        (sys.excepthook, sys.displayhook, sys.breakpointhook,
         sys.unraisablehook) = self.hooks
        trace, profile, limit = self.tracing
        if sys.gettrace() is not trace:
            sys.settrace(trace)
        if sys.getprofile() is not profile:
            sys.setprofile(profile)
        if sys.getrecursionlimit() != limit:
            sys.setrecursionlimit(limit)
        now = vars(builtins)
        try:  # values that are the same objects compare equal without being asked
            same = now == self.builtins
        except Exception:  # a value a cell put there may compare in any way it likes
            same = False
        if not same:
            for k in [k for k in now if k not in self.builtins]:
                del now[k]
            now.update(self.builtins)
        os.umask(self.umask)
        for r, limits in self.rlimits.items():
            if resource.getrlimit(r) != limits:
                resource.setrlimit(r, limits)  # fails if the cell lowered a hard limit
        for timer in _TIMERS:
            signal.setitimer(timer, 0)
        for s, handler in self.signals.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)
        if self.mask is not None and signal.pthread_sigmask(signal.SIG_BLOCK, []) != self.mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        if warnings.showwarning is not self.showwarning:  # logging.captureWarnings(True)
            logging.captureWarnings(False)
            warnings.showwarning = self.showwarning
        mutated = getattr(warnings, "_filters_mutated", None)
        if mutated is not None:  # every "once here" registry starts over, as in a new process
            mutated()
        root = logging.getLogger()
        if root.handlers != self.handlers:
            for h in [h for h in root.handlers if h not in self.handlers]:
                root.removeHandler(h)
                h.close()
            for h in self.handlers:
                if h not in root.handlers:
                    root.addHandler(h)
        if root.level != self.level:
            root.setLevel(self.level)
        if logging.root.manager.disable != self.disable:
            logging.disable(self.disable)


FDS_USED_MAX = 0.5  # of the fd limit: a runner with more in use after a cell takes no other


def _fds_mostly_used() -> bool:
    """Whether a cell left most of the runner's file descriptors open. Leaked (os.open's
    numbers in a list), they failed the next cell's own reads with "Too many open files".
    Which ones leaked cannot be told from those a library keeps (CUDA's driver), so none is
    closed: the runner takes no further cell, and its end frees them all."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return False
    try:
        used = len(os.listdir("/proc/self/fd"))
    except FileNotFoundError:  # no /proc here: not known
        return False
    except OSError:  # not even one left to look
        return True
    return used > soft * FDS_USED_MAX


def _made_by_cell(obj: Any) -> bool:
    """Whether a hook, printer or magic came from a cell's code (its functions live in
    ``__main__``), not from a package that stays imported and registered it once."""
    fn = getattr(obj, "__func__", obj)
    return getattr(fn, "__module__", None) == "__main__"


_PLAIN_TEXT = ("float_precision", "pprint", "max_width", "max_seq_length", "verbose", "newline")


class _ShellPristine:
    """What a cell may change in the shell itself, put back after it on a reused runner, so a
    cell sees the shell a fresh runner would give it: %config and %precision settings, the
    display formatters' printers, event hooks, magics and aliases a cell defined. Seen
    leaking into later cells, other notebooks' too: a post_run_cell hook that printed,
    %precision 1, a formatter for int, figures as JPEG. What packages registered
    (matplotlib's figure flush, a library's formatter, an extension's hooks) stays, as the
    packages (and loaded extensions) do."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.config = copy.deepcopy(shell.config)
        plain = shell.display_formatter.formatters["text/plain"]
        self.plain = {n: getattr(plain, n) for n in _PLAIN_TEXT}
        self.enabled = {k: f.enabled for k, f in shell.display_formatter.formatters.items()}
        self.formats = set(shell.display_formatter.formatters)
        self.magics = {kind: dict(table) for kind, table in shell.magics_manager.magics.items()}
        self.aliases = {name for name, _ in shell.alias_manager.aliases}
        self.first_printers = {id(t): dict(t) for f in shell.display_formatter.formatters.values()
                               for t in (f.type_printers, f.deferred_printers, f.singleton_printers)}
        self.printers: dict[int, dict[Any, Any]] = dict(self.first_printers)
        self.settings = {n: getattr(shell, n) for n in ("autocall", "ast_node_interactivity",
                                                          "xmode", "automagic") if hasattr(shell, n)}

    def restore(self) -> None:
        shell = self.shell
        if shell.config != self.config:
            shell.config = copy.deepcopy(self.config)
        fmt = shell.display_formatter
        for kind in set(fmt.formatters) - self.formats:
            del fmt.formatters[kind]
        plain = fmt.formatters["text/plain"]
        for n, v in self.plain.items():
            if getattr(plain, n) != v:
                setattr(plain, n, v)  # (float_precision's observer resets float_format)
        for kind, f in fmt.formatters.items():
            if f.enabled != self.enabled.get(kind, True):
                f.enabled = self.enabled.get(kind, True)
            for table in (f.type_printers, f.deferred_printers, f.singleton_printers):
                seen = self.printers.get(id(table))
                if seen is not None and table == seen:  # (by identity: a few µs for all)
                    continue
                _undo_cell_entries(table, self.first_printers.get(id(table), {}))
                self.printers[id(table)] = dict(table)  # what packages added stays
        for cbs in shell.events.callbacks.values():
            cbs[:] = [cb for cb in cbs if not _made_by_cell(cb)]
        for kind, table in shell.magics_manager.magics.items():
            # only what the cell's own code registered: IPython loads its own magics on first
            # use (a lazy stub put back would never load again: every later %time failed)
            if table != self.magics.get(kind, {}):
                _undo_cell_entries(table, self.magics.get(kind, {}))
        aliases = shell.alias_manager.aliases
        if len(aliases) != len(self.aliases):
            for name in [n for n, _ in aliases if n not in self.aliases]:
                with contextlib.suppress(Exception):
                    shell.alias_manager.undefine_alias(name)
        for n, v in self.settings.items():
            if getattr(shell, n) != v:
                setattr(shell, n, v)


def _undo_cell_entries(table: dict[Any, Any], first: dict[Any, Any]) -> None:
    """Take out of a shell table (printers, magics) what the cell's own code put there, and
    put back what it replaced of the table as it first was."""
    for key in [k for k, v in table.items() if _made_by_cell(v)]:
        if key in first:
            table[key] = first[key]
        else:
            del table[key]


def _reset_libraries() -> None:
    """Settings of packages a cell may have imported, back to what a fresh process has: the
    package stays imported on a reused runner, and its settings would carry into the next
    cell (torch.set_grad_enabled(False) at a cell's top made every later cell's training
    compute no gradients)."""
    inline = sys.modules.get("matplotlib_inline.config")
    if inline is not None and inline.InlineBackend.initialized():
        backend = inline.InlineBackend.instance()
        for n, trait in backend.traits(config=True).items():
            default = trait.default()
            if getattr(backend, n) != default:
                setattr(backend, n, default)  # (figure_formats' observer resets the printers)
    mpl = sys.modules.get("matplotlib")
    if mpl is not None and hasattr(mpl, "rc_file_defaults"):
        # compared as plain dicts: reading rcParams item by item costs 1.6 ms (and reading
        # its backend would import pyplot); the backend is left as it is (the runner sets it)
        now, orig = mpl.rcParams, mpl.rcParamsOrig
        with contextlib.suppress(Exception):
            if not dict.__eq__(now, orig) and any(
                    k != "backend" and dict.get(now, k) != dict.get(orig, k)
                    for k in dict.keys(now)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mpl.rc_file_defaults()  # (keeps the backend)
    np = sys.modules.get("numpy")
    if np is not None and hasattr(np, "get_printoptions"):
        with contextlib.suppress(Exception):
            now = np.get_printoptions()  # (its keys differ between numpy versions)
            if any(now[k] != v for k, v in _NUMPY_PRINT.items() if k in now):
                np.set_printoptions(**{k: v for k, v in _NUMPY_PRINT.items() if k in now})
            if np.geterr() != _NUMPY_ERR:
                np.seterr(**_NUMPY_ERR)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "is_grad_enabled"):
        with contextlib.suppress(Exception):
            if not torch.is_grad_enabled():
                torch.set_grad_enabled(True)
            if torch.get_default_dtype() != torch.float32:
                torch.set_default_dtype(torch.float32)
            if torch.get_float32_matmul_precision() != "highest":
                torch.set_float32_matmul_precision("highest")
            if torch.are_deterministic_algorithms_enabled():
                torch.use_deterministic_algorithms(False)
            if torch.is_anomaly_enabled():  # (it slows every later backward a great deal)
                torch.autograd.set_detect_anomaly(False)
            cudnn = torch.backends.cudnn
            if cudnn.benchmark or cudnn.deterministic:
                cudnn.benchmark = cudnn.deterministic = False
            if hasattr(torch, "get_default_device") and torch.get_default_device().type != "cpu":
                torch.set_default_device(None)


# what a fresh process's numpy says (numpy's own defaults, stable since 1.x)
_NUMPY_PRINT = {"edgeitems": 3, "threshold": 1000, "floatmode": "maxprec", "precision": 8,
                "suppress": False, "linewidth": 75, "nanstr": "nan", "infstr": "inf",
                "sign": "-", "formatter": None, "legacy": False, "override_repr": None}
_NUMPY_ERR = {"divide": "warn", "over": "warn", "under": "ignore", "invalid": "warn"}


_GC_COLLECT = gc.collect  # the runner's own: what it froze stays out


def _cell_collect(generation: int = 2) -> int:
    """gc.collect() as a cell calls it: what the runner froze after earlier cells (see
    _Session._release) is collected too, as it would be in a fresh process, where nothing
    is frozen ("clear the cache, gc.collect(), empty_cache()" must free it)."""
    if generation >= 2:
        gc.unfreeze()
    return _GC_COLLECT(generation)


RELEASE_S = 10.0  # finalizers of a cell's objects that take longer cost the runner its reuse
LEFTOVER_GRACE_S = 1.0  # a process the cell left running gets this long after SIGTERM


def _adopt_orphans() -> None:
    """Become the parent of what the cell's processes leave behind (a daemon started with a
    double fork, a child in a session of its own whose parent died), so that it can be ended
    with the cell (Linux; elsewhere nothing happens)."""
    with contextlib.suppress(Exception):
        _libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    # stopped (cancel, timeout): the gateway signals the runner's process group, which a
    # process in a session of its own is not in
    signal.signal(signal.SIGTERM, _stopped)


_WATCHED: Any = None  # the epoll set of the events pipes, watched by one thread per process


def _lifeline(fd: int) -> None:
    """End this runner, and what its cell started, when the gateway that reads ``fd`` dies.

    A restarted gateway takes the job for lost and grants its GPUs again: nothing of the cell
    may run on. The gateway holds the read end of the job's events pipe: when it dies (kill -9,
    a crash) the kernel closes it, which epoll reports on our write end as EPOLLERR. Not
    PR_SET_PDEATHSIG, which fires when the parent *thread* that forked us ends, and a warm
    runner's parent is the zygote. epoll, not poll: a descriptor closed while watched leaves
    the set by itself (a poll would keep the pipe open, and its job from ending, until it
    returned), so a job's end costs nothing here. Between jobs a warm runner waits on its
    control socket, which ends with the gateway too; a spare, on the zygote, which does."""
    global _WATCHED
    if not hasattr(select, "epoll"):
        return  # (not Linux)
    try:
        if _WATCHED is None or _WATCHED[1] != os.getpid():  # (a fork has no watching thread)
            _WATCHED = (select.epoll(), os.getpid())
            threading.Thread(target=_watch, args=(_WATCHED[0],), daemon=True,
                             name="gpu-magic-lifeline").start()
        _WATCHED[0].register(fd, select.EPOLLERR)
    except (OSError, RuntimeError):
        pass  # a runner without its lifeline still runs its cell


def _watch(ep: Any) -> None:
    while True:
        try:
            ready = ep.poll()
        except OSError:
            return
        if any(ev & (select.EPOLLERR | select.EPOLLHUP) for _fd, ev in ready):
            try:  # the gateway is gone: nobody reads this job's events, nor frees its GPUs
                end_leftover_processes()
            finally:
                _real_exit(70)


def _stopped(signum: int, _frame: Any) -> None:
    end_leftover_processes()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # ended by it, as the gateway expects


def _children() -> list[int]:
    """This process's children, running or not yet reaped."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == me:
                found.append(int(name))
    return found


def _interpreters_own() -> set[int]:
    """Children the interpreter keeps for itself across cells (multiprocessing's resource
    tracker and forkserver): they hold nothing of a job's, and ending (or reaping) them makes
    the next cell that uses multiprocessing warn or fail."""
    own = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    pid = getattr(getattr(tracker, "_resource_tracker", None), "_pid", None)
    if pid:
        own.add(pid)
    forkserver = sys.modules.get("multiprocessing.forkserver")
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid:
        own.add(pid)
    return own


def end_leftover_processes() -> int:
    """End the processes a cell started and left running, as its GPUs go back to the pool
    with its end: one still running would hold them (and their memory) while the next job is
    granted them. SIGTERM, then SIGKILL after LEFTOVER_GRACE_S. Returns how many there were.
    Costs nothing when the cell left none (the common case: one system call). Only what is
    ended here is reaped here: a child someone else waits for is theirs to reap."""
    try:  # (WNOWAIT: looks, reaps nothing)
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0  # no child at all
    if not os.path.isdir("/proc"):
        return 0
    spared = _interpreters_own()
    ended: set[int] = set()
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    sig = signal.SIGTERM
    while kids := [k for k in _children() if k not in spared]:
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            ended.add(pid)
        time.sleep(0.01)
        for pid in kids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
    return len(ended)


class _Late(BaseException):
    """Raised into a finalizer that blocks the release of a cell's objects (not an Exception:
    a finalizer that retries on any error must not swallow it)."""


def _flush_c_stdio() -> None:
    try:
        _libc().fflush(None)
    except Exception:
        pass


def _arg_names(code: typing.Any) -> str:
    """``(v, scale)``, ``(*args, **kw)``: a function's parameters, as IPython shows a frame
    of it (``in normalize(v, scale)``); empty for a module's or a class body's code."""
    if code.co_name.startswith("<"):
        return ""
    n = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[:n])
    if code.co_flags & 0x04:  # CO_VARARGS
        names.insert(code.co_argcount, "*" + code.co_varnames[n])
        n += 1
    if code.co_flags & 0x08:  # CO_VARKEYWORDS
        names.append("**" + code.co_varnames[n])
    return f"({', '.join(names)})"


def _frames(exc: BaseException, cell_files: set[str], lead: int = 0) -> list[dict[str, Any]]:
    """The traceback as plain data, from the cell's own frame on (runner/IPython frames dropped).
    ``lead``: blank lines IPython took off the cell's start, added back to its line numbers."""
    frames = traceback.extract_tb(exc.__traceback__)
    codes = [frame.f_code for frame, _ in traceback.walk_tb(exc.__traceback__)]
    start = 0
    for i, fr in enumerate(frames):
        if fr.filename in cell_files:
            start = i
            break
    out = []
    for fr, code in zip(frames[start:], codes[start:]):
        if _in_ipython(fr.filename):
            # its way into a magic (`%%time`, or a `%gpu pool` refused in a job), or the
            # `open` it puts in a cell's namespace: the cell's line and what raised are the
            # news, and IPython 9 leaves its own frames out of a kernel's tracebacks too
            continue
        if isinstance(exc, SystemExit) and not (fr.filename in cell_files
                                                or fr.filename == "<dynamic-code>"):
            continue  # exit() goes through IPython and the runner: not the user's frames
        if code is _interrupts.Interrupts.handler.__code__ or fr.filename in _OWN_FILES:
            continue  # where an interrupt was raised (the handler, a print's write): the
            # line the cell was at is the news
        if fr.filename.startswith(_PACKAGE):
            continue  # a nested %%gpu cell's way through gpu_magic: the cell's lines matter
        out.append({
            "filename": fr.filename,
            "lineno": (fr.lineno or 0) + lead if fr.filename in cell_files else fr.lineno,
            "name": fr.name,
            # which notebook function it is: two cells may each define a `forward`
            "qualname": getattr(code, "co_qualname", code.co_name),
            "first": code.co_firstlineno,
            "args": _arg_names(code),
            "line": _cut(fr.line or "", 1000),
            "cell": fr.filename in cell_files,
        })
    if isinstance(exc, KeyboardInterrupt):
        # an interrupt waits until a print is out, so it is raised inside print's plumbing
        # (IPython's tee of sys.stdout): where the cell was is the last frame that is not
        while out and not out[-1]["cell"] and _in_ipython(out[-1]["filename"]):
            out.pop()
    if len(out) > 2 * FRAMES_KEPT:  # deep recursion: the two ends tell the story
        cut = len(out) - 2 * FRAMES_KEPT
        out[FRAMES_KEPT:-FRAMES_KEPT] = [{
            "filename": "...", "lineno": 0, "name": f"({cut} more frames cut)",
            "qualname": "", "first": 0, "line": "", "cell": False}]
    return out


def _notes(exc: BaseException) -> dict[str, list[str]]:
    """The notes added to ``exc`` (``add_note``, 3.11), which Python prints under its message."""
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, (list, tuple)) or not notes:
        return {}
    return {"notes": [_cut(n if isinstance(n, str) else repr(n), 10_000) for n in notes[:20]]}


def _chain(exc: BaseException, cell_files: set[str], lead: int = 0) -> list[dict[str, Any]]:
    """The exceptions before ``exc`` that Python prints with it (``raise ... from e``, or one
    raised while handling another), oldest first, each with how it leads to the next."""
    links: list[dict[str, Any]] = []
    seen = {id(exc)}
    while len(links) < CHAIN_KEPT:
        cause = exc.__cause__
        context = None if exc.__suppress_context__ else exc.__context__
        earlier = cause if cause is not None else context
        if earlier is None or id(earlier) in seen:
            break
        seen.add(id(earlier))
        links.append({"ename": type(earlier).__name__,
                      "evalue": _cut(str(earlier), 10_000),
                      "traceback": _frames(earlier, cell_files, lead)[-FRAMES_KEPT // 10:],
                      "cause": cause is not None, **_notes(earlier)})
        exc = earlier
    return links[::-1]


_OWN_FILES = frozenset({__file__, _interrupts.__file__})
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _FreshLocalImports:
    """While the cell runs: the user's own modules it imports from their files (ones the
    notebook had not imported, so none arrived), each with what it held right after its
    import, to send back what the cell then set on it (`import cfg; cfg.W = 1`), as a local
    cell leaves the notebook's module."""

    def __init__(self, ns: dict[str, Any], known: Any) -> None:
        self.ns, self.known = ns, known
        self.seen: dict[str, tuple[types.ModuleType, tuple[Any, ...]]] = {}
        self.loaders: list[tuple[types.ModuleType, Any]] = []

    def __enter__(self) -> _FreshLocalImports:
        try:
            self.here: Path | None = Path.cwd().resolve()
        except OSError:
            self.here = None
        sys.meta_path.insert(0, self)  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # type: ignore[arg-type]
        for module, loader in self.loaders:  # (the module's own loader again, as imported)
            module.__loader__ = loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = loader

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        import importlib.machinery

        if self.here is None or name in sys.modules or "." in name:
            return None
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if (spec is None or not spec.origin or spec.loader is None
                    or not hasattr(spec.loader, "exec_module")
                    or not _payload.is_local(self.here, name, spec.origin)):
                return None
        except Exception:
            return None
        spec.loader = _Watched(spec.loader, self, name)
        return spec

    def imported(self, name: str, module: types.ModuleType, loader: Any) -> None:
        self.loaders.append((module, loader))
        with contextlib.suppress(Exception):
            self.seen[name] = (module, _payload.module_snapshot(module, self.ns, self.known))


class _Watched:
    """A module's own loader, telling _FreshLocalImports once the module has run."""

    def __init__(self, loader: Any, fresh: _FreshLocalImports, name: str) -> None:
        self._loader, self._fresh, self._name = loader, fresh, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._fresh.imported(self._name, module, self._loader)


def _in_ipython(filename: str) -> bool:
    ipython = sys.modules.get("IPython")
    folder = os.path.dirname(getattr(ipython, "__file__", "") or "")
    return bool(folder) and filename.startswith(folder + os.sep)


CHAIN_KEPT = 8  # exceptions chained before the one a cell raised
FRAMES_KEPT = 200  # at each end of a traceback
EVALUE_MAX = 100_000  # characters of an exception's message in its event (its pickle has all)
EXCEPTION_MAX = 64 << 20  # bytes of arrays an exception may carry back (more: RemoteError, said)


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else (
        text[:most] + f"… ({len(text) - most} more characters cut)")


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    text = str(exc)
    return name == "OutOfMemoryError" or "CUDA out of memory" in text or (
        "cudaErrorMemoryAllocation" in text
    )


class _InputsNotRebuilt(Exception):
    """The cell's inputs failed to load here: said with the object whose code failed (its
    class and method, from the traceback), since one pickle holds every input."""

    def __init__(self, exc: BaseException) -> None:
        where = _payload.failing_code(exc.__traceback__)
        super().__init__(
            f"{exc} ({_payload.INPUTS_NOT_REBUILT}"
            f"{f', in {where}' if where else ''}; the cell did not run). Make that object "
            "loadable there (the packages it needs installed, a __setstate__ or __reduce__ "
            "that works without the notebook), or keep it out of the cell: %%gpu --dry-run "
            "lists what travels")


INLINE_MAX = 64 << 10  # results this small go back inside their event, not as files


class Outbox(NamedTuple):
    """Where a job's larger result blobs go: files in ``folder``, written over the gateway's
    reserve files (:mod:`gpu_magic._reserve`) when it lends them."""

    folder: Path
    reserve: str | None = None
    # large blobs named by their pieces (the gateway says it checks them): a result the
    # notebook sends back as a later cell's input then keeps its name, and is not uploaded
    pieces: bool = False


def _put_blobs(out: Outbox, packed: _payload.Packed, event: dict[str, Any]) -> None:
    """Hand a payload's blobs to the gateway: small ones inside ``event`` (no file to create,
    which costs more than the whole trivial cell on some disks), larger ones as files in the
    outbox. Buffers not hashed yet (``dumps(hash_buffers=False)``) are hashed here, while
    they are written, and their digests filled in."""
    views = [_payload.byte_view(b) for b in packed.buffers]
    if len(packed.pickle) + sum(v.nbytes for v in views) <= INLINE_MAX:
        if len(packed.buffer_digests) != len(views):
            packed.buffer_digests = [_payload.digest(v) for v in views]
        parts = zip([packed.pickle_digest, *packed.buffer_digests],
                    [_payload.byte_view(packed.pickle), *views])
        event["inline"] = {d: base64.b64encode(v).decode() for d, v in parts}
        return
    _write_blob(out, _payload.byte_view(packed.pickle), packed.pickle_digest)
    known = packed.buffer_digests if len(packed.buffer_digests) == len(views) else [None] * len(views)
    packed.buffer_digests = [_write_blob(out, v, d) for v, d in zip(views, known)]


def _write_blob(out: Outbox, data: memoryview, digest: str | None = None) -> str:
    """Write one blob into the outbox, named by its digest (``digest``, or computed on the
    way when None), and return the digest."""
    out.folder.mkdir(parents=True, exist_ok=True)
    if digest is not None and (out.folder / digest.replace(":", "-")).exists():
        return digest
    tmp = out.folder / "writing.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an attempt that died while writing
    hasher = None if digest is not None else _payload.Checker(
        _payload.PIECES_PREFIX if out.pieces else _payload.DIGEST_PREFIX)
    _reserve.write_file(tmp, data, out.reserve, hasher)
    if hasher is not None:
        digest = hasher.result()
    os.replace(tmp, out.folder / digest.replace(":", "-"))
    return digest


def _read_blob(path: str) -> Any:
    """An input blob as a writable buffer that arrays can be rebuilt on.

    A private copy-on-write mapping of the stored file: nothing is read or copied up front,
    pages the cell reads come from the page cache, and only pages it writes are copied (a
    fresh buffer of the whole blob costs a page fault per page, slower than the disk here).
    """
    size = os.path.getsize(path)
    if size == 0:
        return bytearray()
    with open(path, "rb", buffering=0) as f:
        return mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)


class _Mapped:
    """The input blobs mapped copy-on-write, and which of their pages the cell wrote.

    A page the cell wrote became private memory; one it only read is still the file's. Linux
    tells which in /proc/self/pagemap (bit 61: file page), so whether a large input changed
    costs a look at its page table, not a hash of its bytes. Elsewhere, or for buffers that
    are not in a mapping, ``known`` says None and the bytes are hashed.
    """

    PAGE = mmap.PAGESIZE

    def __init__(self, buffers: list[Any], digests: list[str]) -> None:
        self.regions: list[tuple[int, int, str]] = []
        # numpy only if the inputs brought it in: importing it here would cost a fresh
        # runner ~50 ms on every cell that has nothing to do with arrays
        np = sys.modules.get("numpy")
        if np is None or not buffers:
            return
        for buf, d in zip(buffers, digests):
            if isinstance(buf, mmap.mmap) and len(buf):
                addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
                self.regions.append((addr, len(buf), d))
        self._np = np

    def known(self, raw: memoryview) -> str | None:
        """A name for the content of ``raw`` if it lies in a mapped input not written since."""
        if not self.regions or not raw.contiguous:
            return None
        np = self._np
        addr = np.frombuffer(raw, dtype=np.uint8).ctypes.data if raw.nbytes else 0
        for start, size, d in self.regions:
            if start <= addr and addr + raw.nbytes <= start + size:
                if self._written(addr, raw.nbytes):
                    return None
                return f"{d}@{addr - start}+{raw.nbytes}"
        return None

    def _written(self, addr: int, size: int) -> bool:
        first, last = addr // self.PAGE, (addr + size - 1) // self.PAGE
        try:
            with open("/proc/self/pagemap", "rb", buffering=0) as f:
                f.seek(first * 8)
                data = f.read((last - first + 1) * 8)
        except OSError:
            return True  # cannot tell: hash the bytes
        # Each entry's top byte holds bit 63 (present), 62 (swapped) and 61 (file page): a
        # byte table marks the written ones, and the scan runs in C (1 ms in numpy per 256 MiB)
        top = data[7::8] if sys.byteorder == "little" else data[0::8]
        return len(data) < (last - first + 1) * 8 or bool(
            top.translate(_WRITTEN_TOP_BYTE).strip(b"\0"))


def _written_top_byte() -> bytes:
    # a page of a private file mapping that is not the file's any more was written (a
    # swapped-out one too: file pages are dropped, never swapped)
    present, swapped, file_page = 0x80, 0x40, 0x20
    return bytes(1 if (b & swapped) or ((b & present) and not (b & file_page)) else 0
                 for b in range(256))


_WRITTEN_TOP_BYTE = _written_top_byte()


class _InputRef:
    """Persistent ids for unchanged inputs: the client binds its own object, nothing is sent."""


# The names IPython's shell sets in a cell's namespace (init_user_ns): never the cell's, even
# when a notebook function's globals brought the notebook's own along (a function using In).
# A `!command` sets _exit_code, as it would in the notebook: that one comes back.
_IPYTHON_OWN = frozenset({"__name__", "__builtins__", "__builtin__", "In", "Out", "_ih", "_oh",
                          "_dh", "_i", "_ii", "_iii", "_", "__", "___", "get_ipython", "exit",
                          "quit", "_exit_code"})
_NOT_CREATED = _IPYTHON_OWN - {"_exit_code"}


def _refs_when_alone() -> int:
    """What sys.getrefcount says of a value only a dict holds, read as _release reads it (a
    local name and the call's argument besides; other Pythons count these differently)."""
    ns = {"x": object()}
    value = ns.get("x")
    return sys.getrefcount(value)


_ALONE_REFS = _refs_when_alone()


def _alone_with_finalizer(value: Any, refs: int) -> bool:
    """Whether ``value``, held by nothing but the namespace (``refs``), is a package's object
    (not of a class the cell defined) with a finalizer, or holding one in an attribute (a
    DataLoader with persistent workers holds its iterator)."""
    try:
        if refs > _ALONE_REFS or type(value).__module__ == "__main__":
            return False
        if _package_finalizer(value):
            return True
        held = getattr(value, "__dict__", None)
        return type(held) is dict and any(_package_finalizer(v) for v in held.values())
    except Exception:  # (a metaclass that answers oddly): left to the collection
        return False


def _package_finalizer(value: Any) -> bool:
    t = type(value)
    return t.__module__ != "__main__" and any(
        "__del__" in vars(k) for k in t.__mro__ if k is not object)


def _created(ns: dict[str, Any], shipped: dict[str, Any], names: list[str],
             hidden: dict[str, Any]) -> list[str]:
    """Names the cell made without binding them at its top level, where the source shows
    them: a function's ``global`` statement, ``exec``, ``globals()[...]``. IPython's own names
    (``In``, ``Out``, ``exit``...) and dunders are not the cell's."""
    taken = set(names)
    compiler = "torch._dynamo" in sys.modules
    return [n for n, v in ns.items()
            if n not in shipped and n not in taken and n not in _NOT_CREATED
            and not (n.startswith("__") and n.endswith("__"))
            and not (compiler and _DYNAMO_GLOBAL.match(n))
            and not (n in hidden and hidden[n] is v)]


# What torch.compile puts in the globals of what it compiles (the cell's namespace): its own,
# numbered per process. Sent back, they met the notebook's own numbering ("Name
# '__builtins_dict___0' already exists in scope" at the next local torch.compile).
_DYNAMO_GLOBAL = re.compile(
    r"__(_?)(compiled_fn|resume_at_|builtins_dict__|import_|comprehension_|gen_rand_values"
    r"|warnings_warn_wrapper|context_manager_|unnamed_scope)")


def _pack_results(
    ns: dict[str, Any], names: list[str], value: Any, has_value: bool,
    unchanged_inputs: dict[int, str], out: Outbox, same: list[str],
    module_states: dict[str, tuple[Any, ...]] | None = None,
    inside: _payload.Places | None = None,
    listed: bool = False,
    untold: Collection[str] = (),
    left: dict[str, tuple[Any, ...]] | None = None,
) -> dict[str, Any]:
    states = {n: st for n in same if (st := _payload.in_place_state(ns[n])) is not None}
    values = _payload.arrays_first({n: ns[n] for n in names if n not in states})
    payload: dict[str, Any] = {"names": values}
    if module_states:
        payload["modules"] = module_states
    if left:
        payload["left"] = left
    if states:
        payload["in_place"] = states
        # every reference to such an object, in its own state or elsewhere in the results,
        # is to the client's own object
        unchanged_inputs = {**unchanged_inputs, **{id(ns[n]): n for n in states}}
    value_repr = None
    if has_value:
        try:
            value_repr = repr(value)[:500]
        except Exception as exc:  # a broken __repr__ must not lose the results
            value_repr = f"<unrepresentable {type(value).__name__}: {exc}>"
        payload["value"] = value
    skipped: dict[str, str] = {}
    try:
        packed, cuda_moved = _payload.dumps(payload, namespace=ns, input_refs=unchanged_inputs,
                                            inside_refs=inside, hash_buffers=False,
                                            views_among=values)
    except Exception:
        # only now look name by name for what cannot travel (pickling everything twice on the
        # common path would double the cost of large results), then send the rest
        for n, v in list(values.items()) + [(n, ns[n]) for n in states]:
            if (n in states and _payload.fingerprint(states[n], ns) is None) or (
                    id(v) not in unchanged_inputs and _payload.fingerprint(v, ns) is None):
                if isinstance(v, io.IOBase) and v.closed and n not in untold:
                    # `with open(...) as f:` leaves f bound to a closed file: nothing of it
                    # matters, and a note after every such cell read as a problem
                    values.pop(n, None)
                    continue
                path, culprit = _payload.find_unpicklable(v, n)
                what, _fix = _payload.describe(culprit)
                if path != n:
                    what = f"{path} ({what})"
                # (a class's own __getstate__ that fails on what it left out: say what it
                # raised; "a C object" alone left nothing to go on)
                raised = (_payload.pickle_error(culprit)
                          if _payload._recognised(culprit) is None else None)
                if raised:
                    what += f", whose pickling raised {raised},"
                if n in untold:  # an input that already did not pickle here: left as it was
                    # (no `del` advice: deleting an input deletes the notebook's too)
                    skipped[n] = (f"whether the cell changed it cannot be told here: "
                                  f"{what.rstrip(',')} no longer pickles where the cell ran, "
                                  "so a change the cell made to it stays there")
                    values.pop(n, None)
                    states.pop(n, None)
                    continue
                # the fix for an input ("create it inside the cell") is no help for a result
                # (an input the cell changed: `del` would delete the notebook's too)
                changed = n in same
                fix = (f"leave {n} out of --return" if listed else
                       f"list what to bring back with --return, without {n}," if changed else
                       f"`del {n}` at the end of the cell, or list what to bring back with "
                       "--return,")
                skipped[n] = (f"{what} cannot be sent back, so "
                              + ("what the cell changed in it" if changed else "it")
                              + f" stayed on the GPU machine; {fix} to leave it there without "
                              "this note")
                values.pop(n, None)
                states.pop(n, None)
        if "value" in payload and id(value) not in unchanged_inputs and (
                _payload.fingerprint(value, ns) is None):
            # its text at least, as a local cell would have shown it, and what in it is at
            # fault (`['lock']: a thread lock`)
            path, culprit = _payload.find_unpicklable(value, "value")
            what, _fix = _payload.describe(culprit)
            at = f" ({path[len('value'):]}: {what})" if path != "value" else f" ({what})"
            skipped["<cell value>"] = (f"{type(value).__name__}{at} cannot be pickled; it was "
                                       f"{value_repr}")
            del payload["value"]
        packed, cuda_moved = _payload.dumps(payload, namespace=ns, input_refs=unchanged_inputs,
                                            inside_refs=inside, hash_buffers=False,
                                            views_among=values)
    event: dict[str, Any] = {
        "type": "result",
        "names": [*values, *states],
        # (which of them are modules: a background job's status says "will import" of them
        # before its results are loaded, as "imported" after)
        "modules": [n for n, v in values.items() if isinstance(v, types.ModuleType)],
        "skipped": skipped,
        "value": value_repr if "value" in payload else None,
        "has_value": "value" in payload,
        "cuda_moved": cuda_moved,
    }
    _put_blobs(out, packed, event)
    event["nbytes"] = packed.nbytes
    event["blob"], event["buffers"] = packed.pickle_digest, list(packed.buffer_digests)
    return event


class _Session:
    """One runner process: its output capture and its InteractiveShell, reused by every job it
    runs (keep-warm), with a clean namespace, environment, folder and sys.path for each."""

    def __init__(self) -> None:
        self.emitter = _Emitter()
        self.caps: list[_FdCapture] = []
        self.coalescer: _Coalescer | None = None
        self.shell: Any = None
        self.base_env = dict(os.environ)
        self.sim_tools: str | None = None  # see simulated_tools
        self.c_environ = _CEnviron()
        self.pristine: _Pristine | None = None  # taken before the first cell
        self.shell_pristine: _ShellPristine | None = None
        self.base_path = list(sys.path)
        self.local_mtimes: dict[str, float] = {}
        self.lent: dict[str, Any] = {}  # names of local modules lent to sys.modules: what was there
        self.modules_seen = -1  # len(sys.modules) when the user's modules were last noted
        self.reusable = True  # False: one job, then the process ends (nothing to reload)
        self.releasing = False  # letting go of a cell's objects (_release)
        self.frozen = False  # objects frozen since the last full collection
        self.interrupts = _interrupts.Interrupts()  # SIGINT: the user interrupted the cell
        self.interrupts.on_raise = lambda: self.emitter.emit({"type": "interrupted"})

    def simulated_tools(self) -> str | None:
        """A folder with an ``nvidia-smi`` for simulated grants, made once per process: it
        says the GPU is simulated (an instructor's trial: the students' first command printed
        "nvidia-smi: command not found", and on a laptop with a GPU the real one would list a
        GPU the cell does not have). None if it cannot be made."""
        if self.sim_tools is None:
            import hashlib
            import shlex
            import stat
            import tempfile

            # one folder per account and interpreter, written again by each process that
            # needs it: a runner ends with os._exit, so a folder of its own would be left
            # behind every time; one shared by interpreters would run whichever wrote last,
            # perhaps one since removed
            which = hashlib.sha256(sys.executable.encode()).hexdigest()[:8]
            folder = os.path.join(tempfile.gettempdir(),
                                  f"gpu-magic-simulated-{os.getuid()}-{which}")
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(folder, 0o700)
                st = os.lstat(folder)
                # where others can write, one of them could have made it, to run their own
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or \
                        st.st_mode & 0o077:
                    raise OSError(f"{folder} is not this account's own folder")
                script = os.path.join(folder, "nvidia_smi.py")
                shim = os.path.join(folder, "nvidia-smi")
                for path, text, mode in (
                        (script, _SIMULATED_SMI, 0o600),
                        (shim, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                               f"{shlex.quote(script)} \"$@\"\n", 0o700)):
                    part = f"{path}.{os.getpid()}"
                    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                                 mode)
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                    os.replace(part, path)  # (another runner may be running it right now)
                self.sim_tools = folder
            except OSError:
                self.sim_tools = ""
        return self.sim_tools or None

    def make_shell(self) -> None:
        if self.shell is None:
            self.shell = _cell_shell({"__name__": "__main__"}, self.send)
            gc.collect = _cell_collect  # type: ignore[assignment]
            # before the pristine state is taken: a cell's own showwarning is still undone
            warnings.showwarning = _CellWarnings(warnings.showwarning)

    def attach_io(self) -> None:
        """Capture fds 1 and 2 (threads: done after any fork, once per process)."""
        if self.coalescer is not None:
            return
        self.coalescer = _Coalescer(self.emitter)
        sys.stdout.flush()
        sys.stderr.flush()
        self.caps = [_FdCapture(1, "stdout", self.coalescer),
                     _FdCapture(2, "stderr", self.coalescer)]
        sys.stdout = _Stream("stdout", 1, self.caps[0].pipe)  # type: ignore[assignment]
        sys.stderr = _Stream("stderr", 2, self.caps[1].pipe)  # type: ignore[assignment]
        caps = {cap.fd: cap for cap in self.caps}

        def drain(fd: int) -> None:
            if fd in caps:
                caps[fd].mark()
                caps[fd].wait_drained()

        _Stream.drain = drain
        _Stream.interrupts = self.interrupts
        me = os.getpid()

        def exit_after_output(status: int) -> NoReturn:
            # os._exit for the cell: what it printed just before still reaches the notebook
            # (it was in the pipes, or read and not yet sent, and died with the process). A
            # process the cell forked exits at once: the threads that send are not in it.
            # On a thread of its own, waited for a moment only: called from a signal handler,
            # this thread may hold the very locks sending output takes (mid-display).
            if os.getpid() == me:
                sender = threading.Thread(target=self._sync_quietly, daemon=True,
                                          name="gpu-magic-last-output")
                try:
                    sender.start()
                    sender.join(EXIT_SEND_S)
                except BaseException:  # (a KeyboardInterrupt meanwhile: exit all the same)
                    pass
            _real_exit(status)

        os._exit = exit_after_output
        sys.stdin = _NoStdin()  # type: ignore[assignment]
        builtins.input = _no_input
        sys.breakpointhook = _no_debugger
        import bdb  # (0.2 ms, once per runner)

        # pdb.set_trace() and IPython's: refused as the cell calls it, on the cell's line (by
        # the first read of the keyboard, the tracer has left the cell's frame)
        bdb.Bdb.set_trace = _no_debugger  # type: ignore[method-assign]
        import getpass

        getpass.getpass = _no_getpass  # type: ignore[assignment]

    def _sync_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.sync()

    def warm_up(self) -> None:
        """In a process forked ahead of its job: pay the first cell's costs now (output
        threads, the copy-on-write of what a cell touches) while no job waits. Nothing is
        sent: there is no job to send it to."""
        self.attach_io()
        self.make_shell()
        assert self.shell is not None
        self.shell.run_cell("pass", store_history=False)
        self.sync()
        self.modules_seen = len(sys.modules)  # all the runner's own: no user module among them

    def sync(self) -> None:
        """Everything written so far, sent: before a display, and at the end of the cell."""
        with self.interrupts.hold():  # (an interrupt must not lose output taken out to send)
            _Stream.flush_all()  # a line still open, as the cell left it
            for cap in self.caps:  # both pipes at once: one wait, not one per pipe
                cap.mark()
            for cap in self.caps:
                cap.wait_drained()
            if self.coalescer is not None:
                self.coalescer.flush()

    def send(self, event: dict[str, Any]) -> None:
        """A display of the cell's, after the output printed before it, whole: an interrupt
        waits until it is sent (half a line on the pipe would lose the next event too)."""
        with self.interrupts.hold():
            self.sync()
            size = self.emitter.emit(event, most=DISPLAY_EVENT_MAX)
            if size > DISPLAY_EVENT_MAX:
                self.emitter.emit({"type": "stderr", "text": (
                    f"[gpu_magic] a display of {size / (1 << 20):.1f} MiB was too large to send "
                    f"(at most {DISPLAY_EVENT_MAX >> 20} MiB): it is not shown, and the cell "
                    "runs on. Save large output to a file, or display less of it.\n")})

    def _reset(self, manifest: dict[str, Any], cwd: str | None) -> None:
        # What a reused process resets between cells: environment (os.environ and the C
        # library's own), folder, sys.path, random seeds, and local modules edited since they
        # were imported (after each cell, _tidy puts back how warnings show, logging, signal
        # handlers, mask and timers). Imported packages stay.
        env = {**self.base_env, **(manifest.get("env") or {})}
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        if _simulated_grant(env.get("GPU_MAGIC_GRANT")):
            tools = self.simulated_tools()
            if tools:  # `!nvidia-smi` says what the grant is, not "command not found"
                # (an empty entry after it would put the working folder on PATH)
                env["PATH"] = os.pathsep.join(p for p in (tools, env.get("PATH")) if p)
        touched = self.c_environ.touched()  # by the last cell, behind os.environ's back?
        # only what differs: clearing and refilling os.environ costs a system call per variable
        for k in [k for k in os.environ if k not in env]:
            del os.environ[k]
        for k, v in env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
        if touched:
            self.c_environ.sync(os.environ)
        self.c_environ.mark()
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None and pyplot.get_backend().lower() != env["MPLBACKEND"].lower():
            # a cell's matplotlib.use('Agg') must not stop later cells' figures showing
            with contextlib.suppress(Exception):
                pyplot.switch_backend(env["MPLBACKEND"])
        if cwd:
            os.chdir(cwd)
        # `python -m` puts its starting folder first on sys.path: for a forked or reused runner
        # that must be this cell's folder, so modules beside the notebook import as they would
        sys.path[:] = [os.getcwd(), *self.base_path[1:]]
        if manifest.get("sys_path"):  # the kernel's, where the gateway runs its Python
            # in its order: a Jupyter kernel has its folder ('') after the standard library,
            # and a profile.py beside the notebook must not hide the standard one here either
            here = os.getcwd()
            kernel = [here if p == "" else str(p) for p in manifest["sys_path"]]
            real = os.path.realpath(here)
            if not any(p == here or os.path.realpath(p) == real for p in kernel):
                # (a kernel without its folder on sys.path: modules beside the notebook that
                # travel by value are still found, after everything the kernel finds first)
                kernel.append(here)
            sys.path[:] = list(dict.fromkeys([*kernel, *self.base_path[1:]]))
        _NOTED.clear()
        import random

        random.seed()
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed()
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "seed"):
            torch.seed()  # CUDA's generators too, lazily: this starts no CUDA context
        # The user's own modules (beside the notebook, never installed packages) are
        # imported afresh by each cell, as in a fresh runner: an edit shows, and what their
        # top level sets (a style module's rcParams) is set again after the reset above
        # undid it. A few small files, not all of sys.modules.
        for name in self.local_mtimes:
            sys.modules.pop(name, None)
        if self.local_mtimes:
            self.local_mtimes.clear()
            self.modules_seen = -1  # look again once the cell has imported them anew

    def _tidy(self) -> None:
        """After a cell, on a runner that takes the next one: settings back as they were."""
        if self.pristine is None:
            return
        try:
            self.pristine.restore()
            self.shell_pristine.restore()
            _reset_libraries()
        except Exception:  # what cannot be put back: this runner takes no further cell
            self.reusable = False
        if self.pristine.threads_left():
            # they would print into, and compete with, later cells: a fresh runner would
            # have ended them with the cell, so this one ends (with them) after this job
            self.reusable = False

    def note_local_modules(self) -> None:
        """Remember the user's own modules, to import them again once edited: the modules that
        the client sends by value (``_payload.is_local``), so never installed packages, even in
        a virtual environment inside the notebook's folder, nor gpu_magic itself."""
        if len(sys.modules) == self.modules_seen:
            return  # nothing imported since the last look
        try:
            here = Path.cwd().resolve()
        except OSError:  # the cell removed the folder it was in: look next time
            return
        self.modules_seen = len(sys.modules)
        for name, mod in list(sys.modules.items()):
            file = getattr(mod, "__file__", None)
            if not file or name in self.local_mtimes or not _payload.is_local(here, name, file):
                continue
            try:
                self.local_mtimes[name] = os.path.getmtime(file)
            except OSError:
                pass

    def _release(self) -> None:
        """After a cell, on a runner that takes the next one: let go of everything the cell
        made, as a fresh runner's end would. Its namespace held the cell's arrays and tensors
        (GPU memory too) until the next cell, and for good when a function the cell defined
        tied it into a cycle: a cell run twice needed its memory twice, where a fresh runner
        needs it once.

        What finalizers print goes nowhere (a fresh runner ends without running them). One
        that blocks is interrupted after ``RELEASE_S``, and the runner takes no further cell:
        what it left behind is not known."""
        shell = self.shell
        if shell is None:
            return
        start = time.monotonic()
        self.releasing = True
        previous = signal.signal(signal.SIGALRM, self._late)
        # repeating: each tick frees one stuck finalizer (the exception ends only that one)
        signal.setitimer(signal.ITIMER_REAL, RELEASE_S, 0.5)
        self.emitter.muted = True  # until the next job: the cell's own output is all sent
        try:
            # dropped, not cleared: a finalizer still finds the globals it runs with (the
            # collection below breaks the cycles through the cell's functions)
            ns = shell.user_ns
            shell.init_create_namespaces(None, {"__name__": "__main__"})
            sys.modules["__main__"] = shell.user_module  # the cell's would keep it all alive
            _SHIPPED.clear()
            shell.last_execution_result = None  # the last value, or the error and its frames
            shell.displayhook.exec_result = None
            for name in ("last_type", "last_value", "last_traceback", "last_exc"):
                with contextlib.suppress(AttributeError):
                    delattr(sys, name)
            # But a package's object with a finalizer that only the namespace holds is let go
            # of first, by its reference count, the rest of the namespace still there: in the
            # collection it would be told that what it holds weakly had died before its
            # finalizer ran (a DataLoader's iterator found the queues to its workers closed
            # and waited for them, 5 s each, past RELEASE_S: `it = iter(loader)` cost the
            # runner its reuse). A cell's own classes' finalizers run in the collection, as
            # before, with every global there.
            for _ in range(3):  # again: one let go of may have held another (loader, iterator)
                popped = False
                for name in reversed(list(ns)):
                    value = ns.get(name)  # (a finalizer may have taken others)
                    refs = sys.getrefcount(value)  # (read as _refs_when_alone reads it)
                    alone = _alone_with_finalizer(value, refs)
                    del value
                    if alone:
                        popped = ns.pop(name, None) is not None or popped
                if not popped:
                    break
            del ns
            # typing's caches hold a cell's classes (Optional[Model]), and with them its
            # namespace; pyplot holds figures no backend showed (after matplotlib.use('Agg'))
            for clear in getattr(typing, "_cleanups", ()):
                clear()
            pyplot = sys.modules.get("matplotlib.pyplot")
            if pyplot is not None:
                pyplot.close("all")
            _GC_COLLECT()
            # what is left belongs to imported packages: later collections skip it, so one
            # after each cell costs what the cell made, not all of torch (90 ms here); what of
            # it becomes garbage later is collected while the runner waits (collect_idle)
            gc.freeze()
            self.frozen = True
        except _Late:
            pass
        finally:
            self.releasing = False  # a tick still on its way does nothing
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if time.monotonic() - start >= RELEASE_S:
            self.reusable = False

    def collect_idle(self) -> None:
        """A full collection, frozen objects included, while no cell waits: what a cell's
        packages dropped since (an edited module's old copy, a daemon thread's data) would
        otherwise never be freed."""
        gc.unfreeze()
        _GC_COLLECT()
        gc.freeze()
        self.frozen = False
        self.restore_fds()  # (a finalizer may have closed one)
        self.sync()  # what finalizers printed goes nowhere (muted), not into the next job

    def restore_fds(self) -> None:
        """fds 1 and 2 back to the capture pipes, whatever a cell did to them (dup2, close).
        After its objects are let go of (a file that took a closed fd 1 closes it again), and
        before the next job's descriptors arrive: one would take a free fd 1, and be lost."""
        for cap in self.caps:
            cap.restore()

    def _late(self, *_a: Any) -> None:
        if self.releasing:
            raise _Late

    def run(self, job_dir: Path, events_fd: int, cwd: str | None = None,
            manifest: dict[str, Any] | None = None) -> int:
        self.emitter.retarget(events_fd)
        self.interrupts.job_started()
        # the gateway sends an interrupt only from here on: one sooner would find a fresh
        # runner still starting (Python's own handler) or a warm one idle (ignored)
        self.emitter.emit({"type": "interruptible", "pid": os.getpid()})
        try:
            if manifest is None:  # a warm worker is handed small manifests with the job
                manifest = json.loads((job_dir / "manifest.json").read_text())
            self._reset(manifest, cwd)
            self.attach_io()
            self.make_shell()
            if self.pristine is None:
                self.pristine = _Pristine()
                self.shell_pristine = _ShellPristine(self.shell)
            return self._run(job_dir, manifest)
        except BaseException as exc:  # the runner itself failed: say so instead of dying silently
            cause = exc.__cause__ if isinstance(exc, _InputsNotRebuilt) else exc
            self.emitter.emit({
                "type": "runner_error",
                "ename": type(cause).__name__,
                "evalue": str(exc),
                "traceback": traceback.format_exc(),
            })
            return 3
        finally:
            self.interrupts.job_ended()
            for name, was in self.lent.items():  # local modules that arrived (see _run)
                if was is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = was
            self.lent.clear()
            if self.reusable:  # before "finished": an edit right after the cell must show
                self.note_local_modules()
                self._tidy()
            if self.reusable:  # before "finished" too: the cell's memory is free when it ends
                self._release()
                self.restore_fds()
                # after the cell's objects (files it kept open) are let go of, and with the
                # cell's own fd limit put back by _tidy
                if _fds_mostly_used():
                    self.reusable = False
            end_leftover_processes()  # (after the release: finalizers stop their pools first)
            # whether this process takes another cell: the gateway must not hand one to a
            # runner that is about to end
            self.emitter.emit({"type": "finished", "reusable": self.reusable}, always=True)
            self.emitter.close()
            if self.emitter.muted and self.reusable:
                # what finalizers printed may still be in the pipes: drained now, into no job
                # (the job has ended: this costs its cell nothing), not into the next one
                self.sync()

    def _left_in_folder(self, job_dir: Path, there: set[str]) -> None:
        """Say which files the cell wrote in its working folder on a shared gateway, which is
        removed with the job (an ML trial's checkpoint was gone without a word)."""
        made = sorted(_listing(job_dir) - there - _JOB_FOLDER_OWN)
        if not made:
            return
        named = ", ".join(n + ("/" if os.path.isdir(job_dir / n) else "") for n in made[:3]) + (
            f" and {len(made) - 3} more" if len(made) > 3 else "")
        example = next((n for n in made if os.path.isfile(job_dir / n)), None)
        how = (f"bring a file back as a variable (data = open({example!r}, 'rb').read())"
               if example else "bring what you need back as variables")
        self.pristine.streams[1].write(  # type: ignore[union-attr]
            f"[gpu_magic] the cell wrote {named} in its folder on the GPU machine ({job_dir}), "
            "which is removed when the job ends (each cell of this shared gateway runs in a "
            f"folder of its own): {how}, or write to storage the GPU machine keeps\n")

    def _run(self, job_dir: Path, manifest: dict[str, Any]) -> int:
        emitter, shell = self.emitter, self.shell
        # made when a result is too large to go inline
        out = Outbox(job_dir / "out", manifest.get("reserve"),
                     _payload.PIECES_SCHEME in manifest.get("digests", ()))
        ns: dict[str, Any] = {"__name__": "__main__"}
        inputs = manifest["inputs"]
        buffers = [_read_blob(p) for p in inputs["buffers"]]
        _SHIPPED.clear()
        # code an earlier cell made here arrives numbered as the notebook numbers it: shifted
        # again before the cell, it read as changed by it (a warm runner's inputs came back)
        _payload.CELL_SHIFTS.clear()
        # what arrived inside the inputs (models[0], params["W"]), by id: one a result holds
        # goes back as the notebook's own object, as a local cell would leave it
        inside = _payload.Places()
        with open(inputs["pickle"], "rb") as f:
            try:
                values = _payload.loads(f.read(), buffers, namespace=ns, made=_SHIPPED,
                                        places=inside)
            except Exception as exc:
                raise _InputsNotRebuilt(exc) from exc
        ns.update(values)
        for key in [k for k in values if k.startswith(_payload.IMPORTED_KEY)]:
            del ns[key]  # (a module the cell imports: lent to sys.modules below, not a name)
        # what arrived: the inputs, and the globals the notebook functions among them use
        # (cloudpickle puts those straight into the namespace): a function the cell calls may
        # change or rebind them, and a local run would show that
        shipped = {n: v for n, v in ns.items() if n not in _IPYTHON_OWN}
        mapped = _Mapped(buffers, [os.path.basename(p) for p in inputs["buffers"]])
        del buffers
        # local modules that arrived by value: what each holds, to send back what the cell
        # changes in them. One sent whole is also lent to sys.modules while the cell runs (put
        # back in the finally of the job): the cell's own `import helpers` finds the module
        # its functions use, and its objects travel back by name, as the notebook's own. One
        # only some of whose functions came is not: an import would find it incomplete
        modules = {m.__name__: m for m in _payload.take_arrived()}
        snapshots = {n: _payload.module_snapshot(m, ns, mapped.known) for n, m in modules.items()}
        for name, m in modules.items():
            if m.__dict__.get(_payload.WHOLE_MARK):
                self.lent.setdefault(name, sys.modules.get(name))
                sys.modules[name] = m
        before = {n: _payload.fingerprint(v, ns, mapped.known, own_state=True)
                  for n, v in shipped.items() if not _payload.arrived_by_value(v)}
        inside.take_before(ns, values.values(), mapped.known)
        # a clean namespace for this cell in the (possibly reused) shell
        shell.init_create_namespaces(None, ns)
        # and it is __main__, as in a kernel: pickle finds the cell's functions and classes
        # by name there (multiprocessing pools, DataLoader workers, torch.save of a model)
        sys.modules["__main__"] = _main_module(shell.user_module)
        shell.init_user_ns()
        ns["Out"] = ns["_oh"] = _NotebookOut(ns["Out"])
        history = values.get("In", values.get("_ih"))
        ns["In"] = ns["_ih"] = _NotebookIn(history if isinstance(history, list) else ns["In"])
        ns["In"].travelled = isinstance(history, list)
        for name in ("In", "_ih", "Out", "_oh"):  # %who tells IPython's own by identity
            shell.user_ns_hidden[name] = ns[name]
        # IPython drops a cell's leading blank lines before compiling it: its line numbers
        # count from the first line with text, the notebook's from the first line
        lead = _capture.leading_blank_lines(manifest["source"])
        label = str(manifest.get("cell_label") or "Cell")
        _CellWarnings.where = (label, int(manifest.get("line_offset") or 0) + lead)
        # compiled under a name of its own: its frames are told from those of functions an
        # earlier cell made here (a warm runner has compiled those too), and what it makes
        # travels back saying where it was made, numbered as the notebook numbers the cell
        name = _cell_file(label)
        shell.compile.get_code_name = lambda *_args: name
        shell.compile.gpu_magic_cell = _CellWarnings.file = name
        _payload.CELL_SHIFTS[name] = _CellWarnings.where[1]
        fresh = _FreshLocalImports(ns, mapped.known)
        there = _listing(job_dir) if manifest.get("folder_removed") else None
        CELL_STDERR[0] = sys.stderr
        with self.interrupts.cell(shell.compile), fresh:
            result = shell.run_cell(manifest["source"], store_history=False)
        _flush_c_stdio()  # C stdio buffers of extensions, before the drain
        if there is not None:
            self._left_in_folder(job_dir, there)
        left = self.pristine.threads_left() if self.pristine is not None else []
        if left:  # (a local kernel would show what they print later, in whatever cell runs)
            names = ", ".join(repr(t.name) for t in left[:3]) + (", ..." if len(left) > 3 else "")
            self.pristine.streams[1].write(  # type: ignore[union-attr]
                f"[gpu_magic] the cell left {len(left)} thread{'s' if len(left) > 1 else ''} "
                f"running ({names}): {'they stop' if len(left) > 1 else 'it stops'} when the "
                "job ends, and nothing printed after that is shown; join it at the end of the "
                "cell (t.join()) to wait for it\n")
        self.sync()

        printed = _Stream.writes
        exc = result.error_before_exec or result.error_in_exec
        # ended by the interrupt its user asked for: what the cell had bound and changed comes
        # back with the error, as a local cell interrupted there leaves it (a KeyboardInterrupt
        # the cell raised itself is an error like any other: all or nothing)
        interrupted = isinstance(exc, KeyboardInterrupt) and self.interrupts.raised
        if exc is not None and not interrupted:
            event = _error_event(exc, result, shell, out, lead)
            if there is not None:  # (a file an earlier cell wrote by a relative path is gone)
                event["folder_removed"] = True
            if _Stream.writes != printed:  # a __reduce__ or __repr__ that prints: still the cell's
                self.sync()
            emitter.emit(event)
            return 0

        outputs = manifest.get("outputs", [])
        untold: set[str] = set()  # inputs already unpicklable here: their change cannot be told
        # inputs changed in place before the cell rebound or deleted their names
        # (`history.append(x)` then `history = history[-100:]`): their new state, for the
        # client's own object, which its other references hold (a trial: `runs["main"]` lost
        # the appended value). A result holding such an object gets a copy of it: whether
        # the client's is given the state is decided there, as it binds.
        left: dict[str, tuple[Any, ...]] = {}
        if manifest.get("no_return"):
            names: list[str] = []
        elif manifest.get("return_names") is not None:
            names = [n for n in manifest["return_names"]
                     if n in ns and not isinstance(ns[n], _payload.NotSent)]
        else:
            # (a stand-in still there: the cell never reached the binding of that name)
            names = [n for n in outputs if n in ns and not isinstance(ns[n], _payload.NotSent)]
            for n, fp in before.items():
                if fp is None and n in ns and ns[n] is shipped[n]:
                    untold.add(n)
                if n in ns and n not in names and (
                        ns[n] is not shipped[n]  # rebound by a function (`global`), or exec
                        # (None: it no longer pickles here, so whether the cell changed it
                        # cannot be told: it is tried, and its note says why not, rather
                        # than a change lost in silence)
                        or fp is None
                        or _payload.fingerprint(ns[n], ns, mapped.known, own_state=True) != fp):
                    names.append(n)  # changed in place: the client must see the change
                if fp is not None and (n not in ns or ns[n] is not shipped[n]) and \
                        _payload.fingerprint(shipped[n], ns, mapped.known, own_state=True) != fp \
                        and (state := _payload.in_place_state(shipped[n])) is not None:
                    left[n] = state
            names += _created(ns, shipped, names, shell.user_ns_hidden)
        # a local module that arrived: what the cell changed in it, for the notebook's own
        module_states = {}
        if not manifest.get("no_return") and manifest.get("return_names") is None:
            # (and one the cell imported from its file, the notebook not having it: what the
            # cell set on it after its import, for the notebook's, imported there as here)
            for name, (m, snap) in [*((n, (m, snapshots[n])) for n, m in modules.items()),
                                    *fresh.seen.items()]:
                st = _payload.module_changes(m, snap, ns, mapped.known)
                if st is not None:
                    module_states[name] = st
        deleted = [n for n in manifest.get("deleted", []) if n not in ns]
        if not manifest.get("no_return") and manifest.get("return_names") is None:
            deleted += [n for n in shipped if n not in ns and n not in deleted]
        # what arrived and is still there: the client holds it under that name (an input, or
        # a global of a notebook function as it was when the cell was sent), so a reference
        # to it goes back as that name
        unchanged = {
            id(shipped[n]): n for n in shipped
            if n in ns and ns[n] is shipped[n] and n not in names and not _atom(shipped[n])
        }
        # what comes back still the object that arrived: changed in place, it updates the
        # client's object in place too, so its other references (an alias, a dict holding the
        # model, a view of the array) see the change as they would locally
        same = [n for n in names if n in shipped and ns[n] is shipped[n]]
        value = result.result if manifest.get("has_value") else None
        try:
            event = _pack_results(ns, names, value,
                                  bool(manifest.get("has_value")) and value is not None,
                                  unchanged, out, same, module_states, inside,
                                  manifest.get("return_names") is not None, untold, left)
        except OSError as exc:  # a full disk, a file size limit: the cell itself had finished
            emitter.emit({
                "type": "runner_error", "ename": type(exc).__name__, "cell_finished": True,
                "evalue": (f"the cell finished, but its results could not be written for the "
                           f"gateway ({exc}); nothing was bound. Free space where the gateway "
                           "keeps its state, or bring back less (--return NAMES)"),
                "traceback": ""})
            return 0
        event["deleted"] = deleted
        for n in manifest.get("return_names") or ():
            if n not in ns:  # a typo in --return must not cost the cell's work in silence
                event["skipped"][n] = _not_left(n, ns)
        if interrupted:
            assert exc is not None
            error = _error_event(exc, result, shell, out, lead)
            # one event, so the gateway takes results and error as one outcome
            if error.get("inline"):
                event["inline"] = {**(event.get("inline") or {}), **error.pop("inline")}
            event["error"] = error
        if _Stream.writes != printed:  # a __reduce__ or __repr__ that prints: still the cell's
            self.sync()
        emitter.emit(event)
        return 0


# What gpu_magic itself keeps in a job's folder (the cell's results, its TMPDIR, its manifest).
_JOB_FOLDER_OWN = frozenset({"out", "scratch", "manifest.json"})


def _listing(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


# The notebook's classes and functions the cell's inputs brought by value (a model's class).
_SHIPPED: list[Any] = []


def _main_module(module: Any) -> Any:
    """The cell's ``__main__``, where pickle also finds what came by value without a name in
    the cell: ``torch.save(net)`` of a notebook class ``Net`` the cell never names, as the
    notebook's own ``__main__`` would."""
    base = type(module)
    own = getattr(base, "__getattr__", None)

    def __getattr__(self: Any, name: str) -> Any:
        if own is not None:
            with contextlib.suppress(AttributeError):
                return own(self, name)
        for obj in _SHIPPED:
            if getattr(obj, "__qualname__", None) == name and \
                    getattr(obj, "__module__", None) == "__main__":
                return obj
        raise AttributeError(f"module '__main__' has no attribute {name!r}")

    # (object's setter: IPython's module type would store a `__class__` name in the cell)
    object.__setattr__(module, "__class__", type(base.__name__, (base,), {"__getattr__": __getattr__}))
    return module


# what torch, CuPy, numba and the CUDA runtime say when a process has no GPU to use
_NO_CUDA = re.compile(r"not compiled with CUDA|no NVIDIA driver|No CUDA GPUs are available|"
                      r"no CUDA-capable device|CUDA driver .*(?:not|cannot) (?:be )?found|"
                      r"CUDA is not available|cudaErrorNoDevice", re.IGNORECASE)


def _simulated_grant(grant: str | None) -> bool:
    try:
        return bool(grant) and json.loads(grant).get("simulated") is True  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return False


# What `nvidia-smi` prints in a cell whose grant is simulated (any arguments).
_SIMULATED_SMI = """import json, os
grant = json.loads(os.environ.get("GPU_MAGIC_GRANT") or "{}")
kind, n = grant.get("type", "GPU"), grant.get("count", 1)
print(f"gpu_magic: nvidia-smi is simulated here. This cell was granted {kind} x{n} on "
      f"{grant.get('node', '?')} from a simulated pool (for teaching and tests): no real GPU "
      "runs it, and CUDA is not available to it.")
memory = f", {grant['memory_gb']:g} GB" if grant.get("memory_gb") else ""
for i in range(n):
    print(f"GPU {i}: {kind} (simulated{memory})")
"""


def _note_simulated(exc: BaseException) -> None:
    """A simulated grant has no GPU: an error saying CUDA is missing gets a note saying why
    (torch's "Torch not compiled with CUDA enabled" reads as a broken install)."""
    grant = _injob._grant()
    if not grant.get("simulated") or not _NO_CUDA.search(f"{type(exc).__name__}: {exc}"):
        return
    note = (f"gpu_magic: the {grant.get('type', 'GPU')} this cell was granted is simulated (a "
            "pool for teaching and tests): the cell ran on a CPU, with no CUDA. Choose the "
            "device in the cell (device = 'cuda' if torch.cuda.is_available() else 'cpu'), "
            "or run it on a gateway with real GPUs.")
    if note not in (getattr(exc, "__notes__", None) or []):
        with contextlib.suppress(Exception):
            exc.add_note(note)


def _atom(obj: Any, depth: int = 0) -> bool:
    """A small immutable value, sent back as itself rather than as the name of the input it
    is: every 3 in a result is the input `factor = 3` (Python shares small ints, short strings
    and the empty tuple), and a kernel that attaches the job without a `factor` could not
    rebuild it."""
    t = type(obj)
    if t in (str, bytes):
        return len(obj) <= 4096
    if t in (tuple, frozenset):
        return depth < 2 and len(obj) <= 64 and all(_atom(x, depth + 1) for x in obj)
    return obj is None or t in (int, float, complex, bool)


def _error_event(exc: BaseException, result: Any, shell: Any, out: Outbox,
                 lead: int = 0) -> dict[str, Any]:
    """The cell's exception as an event: its frames from the cell's own on (``lead``: see
    _frames), the exceptions it was raised from, and its pickle (inline when small), or why
    it could not be sent (``unsent``)."""
    _note_simulated(exc)
    current = getattr(shell.compile, "gpu_magic_cell", None)
    cell_files = {current} if current else set(getattr(shell.compile, "_filename_map", {}) or {})
    event: dict[str, Any] = {
        "type": "error",
        "ename": type(exc).__name__,
        "evalue": _cut(str(exc), EVALUE_MAX),
        "traceback": _frames(exc, cell_files, lead),
        "oom": _is_oom(exc),
        "syntax": result.error_before_exec is not None,
        **_notes(exc),
    }
    chain = _chain(exc, cell_files, lead)
    if chain:
        event["chain"] = chain
    try:
        # in one piece, arrays it carries too (up to EXCEPTION_MAX): the client rebuilds it
        # from this blob alone
        packed, _ = _payload.dumps(exc)
        carried = sum(_payload.byte_view(b).nbytes for b in packed.buffers)
        if carried > EXCEPTION_MAX:
            event["unsent"] = (f"it carries {carried >> 20} MiB of arrays; at most "
                               f"{EXCEPTION_MAX >> 20} MiB travel with an exception")
            return event
        if packed.buffers:
            packed, _ = _payload.dumps(exc, inline_limit=sys.maxsize)
        _put_blobs(out, packed, event)
        event["exception"] = packed.pickle_digest
    except Exception as why:  # (a lock on it, a __reduce__ that fails): said, not dropped
        event["unsent"] = _cut(f"{type(why).__name__}: {why}", 500)
    return event


CELL_FILE_MARK = " on the GPU, job "


def _cell_file(label: str) -> str:
    """``<Cell In[5] on the GPU, job 1f2e…>``: the name the running cell is compiled under."""
    grant = _injob._grant()
    job = f"{grant.get('job_id') or os.getpid()}.{grant.get('attempt') or 1}"
    return f"<{label}{CELL_FILE_MARK}{job}>"


class _CellWarnings:
    """warnings.showwarning that names the cell's lines as the notebook does (``Cell In[5]:3``,
    the %%gpu line being line 1), not as the runner's IPython compiled them."""

    where = ("Cell", 0)  # the running job's cell label and line offset
    file = ""  # the name its code is compiled under

    def __init__(self, show: Callable[..., Any]) -> None:
        self.show = show

    def __call__(self, message: Any, category: Any, filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> Any:
        if filename == self.file or filename.startswith("<ipython-input-"):
            import linecache

            if line is None:
                line = linecache.getline(filename, lineno)
            label, offset = self.where
            filename, lineno = label, lineno + offset
        return self.show(message, category, filename, lineno, file, line)


def _not_left(name: str, ns: dict[str, Any]) -> str:
    import difflib

    near = difflib.get_close_matches(name, [n for n in ns if not n.startswith("_")], n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"--return names it, but the cell left no such name{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--zygote":
        _zygote(int(argv[1]))
        return 0
    if len(argv) != 2:
        print("usage: python -m gpu_magic.runner JOB_DIR EVENTS_FD | --zygote SOCKET_FD",
              file=sys.stderr)
        return 2
    session = _Session()
    session.interrupts.install()  # first: Python's own handler would end the runner
    session.reusable = False
    _adopt_orphans()
    return session.run(Path(argv[0]), int(argv[1]))


def _zygote(sock_fd: int) -> None:
    """A warm parent: everything a runner needs is imported once here; each job is a fork.

    Requests arrive as JSON on a Unix socket with the job's descriptors attached (a control
    socket for later jobs of the same worker, the events pipe, the log file); the zygote answers
    with the worker's pid and later with its exit status.
    """
    import socket

    session = _Session()
    session.interrupts.install()  # the workers forked from here have it from their start
    session.make_shell()  # IPython and the shell, built once, shared copy-on-write
    sock = socket.socket(fileno=sock_fd)
    send_lock = threading.Lock()
    children = threading.Semaphore(0)

    def send(msg: dict[str, Any]) -> None:
        with send_lock:
            sock.sendall(json.dumps(msg).encode() + b"\n")

    def reap() -> None:
        while True:
            children.acquire()
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                continue
            send({"exited": pid, "status": os.waitstatus_to_exitcode(status)})

    def prefork(held: list[int] = []) -> tuple[int, socket.socket]:  # noqa: B006 (read only)
        # The next job's process, forked ahead: the fork and the child's first steps happen
        # while no job waits, and a job only has to be handed over. ``held``: descriptors of a
        # job the zygote holds right now, which the child must not keep (an events pipe kept
        # open anywhere means its job never seems to end).
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            sock.close()
            ours.close()
            for fd in held:
                os.close(fd)
            os.setsid()
            _spare(session, theirs)
            _real_exit(0)
        theirs.close()
        children.release()
        return pid, ours

    threading.Thread(target=reap, daemon=True, name="gpu-magic-reaper").start()
    _payload.installed_top_levels()  # read once here, not by each worker
    gc.freeze()  # what the zygote built stays out of the children's collections (fewer copies)
    spare = prefork()
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 8)
        if not msg:
            _real_exit(0)  # the gateway went away
        req = json.loads(msg)
        pid, chan = spare
        try:
            socket.send_fds(chan, [msg], fds)
        except OSError:  # the spare died: fork one for this job now
            pid, chan = prefork(fds)
            socket.send_fds(chan, [msg], fds)
        chan.close()
        for fd in fds:
            os.close(fd)
        send({"started": req["token"], "pid": pid})
        spare = prefork()


def _spare(session: _Session, chan: Any) -> None:
    """A child forked ahead of time: wait for its job (or the zygote's end), then run it."""
    import socket

    try:
        session.warm_up()
    except Exception:
        pass  # the job will meet the same problem and report it
    try:
        msg, fds, _flags, _addr = socket.recv_fds(chan, 65536, 8)
    except OSError:
        return
    chan.close()
    if msg and len(fds) == 3:
        _worker(session, json.loads(msg), fds)


def _worker(session: _Session, req: dict[str, Any], fds: list[int]) -> None:
    """A forked runner: run the job, then wait (keep-warm) for more jobs of the same key."""
    import socket

    ctl_fd, events_fd, log_fd = fds
    _adopt_orphans()
    if session.coalescer is None:  # (a spare captures its output already)
        os.dup2(log_fd, 1)  # anything before output capture starts lands in runner.log
        os.dup2(log_fd, 2)
    os.close(log_fd)
    ctl = socket.socket(fileno=ctl_fd)
    keep_warm = float(req.get("keep_warm", 0))
    # a runner that takes no further cell resets nothing and releases nothing: it ends
    session.reusable = keep_warm > 0
    while True:
        session.base_env = dict(req["env"])
        session.run(Path(req["job_dir"]), events_fd, req.get("cwd"), req.get("manifest"))
        if not session.reusable:
            return
        try:
            msg, more = _next_job(ctl, session, keep_warm)
        except OSError:  # a timeout too: kept warm long enough
            return
        if not msg or not more:
            return
        req, events_fd = json.loads(msg), more[0]


IDLE_COLLECT_S = 0.5  # a runner idle this long collects everything (cells back to back: later)


def _next_job(ctl: Any, session: _Session, keep_warm: float) -> tuple[bytes, list[int]]:
    import socket

    deadline = time.monotonic() + keep_warm
    if session.frozen:
        ctl.settimeout(min(IDLE_COLLECT_S, keep_warm))
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 65536, 4)
            return msg, fds
        except TimeoutError:
            session.collect_idle()
    ctl.settimeout(max(deadline - time.monotonic(), 0.001))
    msg, fds, _flags, _addr = socket.recv_fds(ctl, 65536, 4)
    return msg, fds


if __name__ == "__main__":
    _real_exit(main())
