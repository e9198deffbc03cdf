"""The one error tree of gpu_magic.

Every message says what happened, the offending value, and how to fix it.

    GpuMagicError
    ├── SpecError                 bad GPU spec (also a ValueError)
    ├── CaptureError              the cell cannot be analysed (star import, syntax)
    │   └── CellSyntaxError       the cell does not parse (also a SyntaxError)
    │       └── CellIndentationError     (also an IndentationError)
    │           └── CellTabError         (also a TabError)
    ├── SerializationError        an input or result cannot be pickled
    │   └── EnvironmentMismatch   the runner's Python differs from ours
    ├── SchedulingError           the pool can never or did not in time grant the job
    │   ├── NoFeasibleOption      refused at submit: no option fits this pool
    │   └── WaitExpired           --wait ran out while queued
    ├── JobFailed                 the job ended without a result
    │   ├── JobTimeout            --timeout ran out while running
    │   └── RunnerLost            the runner died (killed, crashed, node lost)
    ├── RemoteError               the cell raised and its exception could not be rebuilt here
    └── GatewayError              the gateway cannot be reached or answered an error
        └── AuthError             missing or wrong token

    JobCancelled (BaseException)  the job was cancelled; ``except Exception`` must not swallow it
"""

from __future__ import annotations

from typing import Any


class GpuMagicError(Exception):
    """Base of every error gpu_magic raises on purpose."""


class SpecError(GpuMagicError, ValueError):
    """A GPU spec that cannot be parsed or names an unknown type or a bad count."""

    def __init__(self, message: str, *, spec: str = "", suggestion: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec
        self.suggestion = suggestion


class CaptureError(GpuMagicError):
    """The cell cannot be analysed for the names it uses."""


class CellSyntaxError(CaptureError, SyntaxError):
    """The cell does not parse: a CaptureError that is a SyntaxError too (``except
    SyntaxError`` takes it, with ``lineno``, ``offset`` and ``text`` in the notebook's lines)."""

    def __init__(self, message: str, *, msg: str, lineno: int, offset: int | None,
                 text: str) -> None:
        super().__init__(message)
        self.msg, self.lineno, self.offset, self.text = msg, lineno, offset, text
        self.filename = "Cell"

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle's default calls cls(*args), which misses the keyword-only arguments: an
        # error raised on a GPU machine could not be rebuilt here
        return (_rebuild_cell_syntax_error,
                (type(self), self.args[0], self.msg, self.lineno, self.offset, self.text))

    def _render_traceback_(self) -> list[str]:
        lines = [f"  {self.filename}, line {self.lineno}", f"    {self.text.strip()}"]
        if self.offset:  # the caret under the column the parser stopped at
            indent = len(self.text) - len(self.text.lstrip())
            lines.append("    " + " " * max(0, self.offset - 1 - indent) + "^")
        kind = next(t.__name__ for t in type(self).__mro__ if t.__module__ == "builtins")
        return [*lines, f"{kind}: {self.msg}", "fix that line and run the cell again"]


class CellIndentationError(CellSyntaxError, IndentationError):
    """The cell's indentation is wrong: ``except IndentationError`` takes it, as it would the
    error of a local run."""


class CellTabError(CellIndentationError, TabError):
    """The cell mixes tabs and spaces in its indentation (``except TabError`` takes it)."""


def _rebuild_cell_syntax_error(cls: type[CellSyntaxError], message: str, msg: str,
                               lineno: int, offset: int | None, text: str) -> CellSyntaxError:
    """Unpickles a CellSyntaxError (see its ``__reduce__``)."""
    return cls(message, msg=msg, lineno=lineno, offset=offset, text=text)


class SerializationError(GpuMagicError):
    """An input (or result) cannot be pickled; ``name`` and ``path`` say which object."""

    def __init__(self, message: str, *, name: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.path = path


class EnvironmentMismatch(SerializationError):
    """The runner's Python minor version differs from the client's (cloudpickle needs the same)."""


class SchedulingError(GpuMagicError):
    """The pool cannot grant the job."""


class NoFeasibleOption(SchedulingError):
    """No option of the spec could ever be granted on this pool."""


class WaitExpired(SchedulingError):
    """The job stayed queued longer than ``--wait`` allowed."""


class JobFailed(GpuMagicError):
    """The job ended without a result (other than the cell raising)."""

    def __init__(self, message: str, *, job_id: str | None = None, state: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class JobTimeout(JobFailed):
    """The job ran longer than ``--timeout``."""


class RunnerLost(JobFailed):
    """The runner process died (killed, crashed, node lost) before the cell finished."""


class RemoteError(GpuMagicError):
    """An exception raised by the cell remotely whose type cannot be rebuilt here."""

    def __init__(self, ename: str, evalue: str, traceback_text: str = "",
                 shown: list[str] | None = None) -> None:
        super().__init__(f"{ename}: {evalue}" if evalue else ename)  # (`raise SystemExit`)
        self.ename = ename
        self.evalue = evalue
        self.traceback_text = traceback_text  # plain text, for logs and plain Python
        self.shown = shown  # the lines a notebook shows, in its colours, where they differ

    def __reduce__(self) -> tuple[Any, ...]:
        # (raised in a nested cell inside a job, it travels back to the notebook)
        return type(self), (self.ename, self.evalue, self.traceback_text), self.__dict__

    def _render_traceback_(self) -> list[str]:
        return list(self.shown or ()) or self.traceback_text.splitlines() or [str(self)]


class GatewayError(GpuMagicError):
    """The gateway could not be reached or answered with an error."""

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        # what the connection raised, when the gateway was not reached (status None)
        self.transport: BaseException | None = None


class AuthError(GatewayError):
    """The gateway refused our token."""


class JobCancelled(BaseException):
    """The job was cancelled (Ctrl-C while it waits for a GPU; while its cell runs, once the
    cell has had its KeyboardInterrupt there, or at once for a second one; the Cancel
    button, ``%gpu cancel``, ``job.cancel()``).

    A ``BaseException`` like ``KeyboardInterrupt``, so that a user's ``except Exception:`` around
    a ``gpu_magic.run`` call does not swallow a cancellation.
    """

    def __init__(self, message: str = "the GPU job was cancelled", *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


def short(exc: BaseException) -> BaseException:
    """``exc`` as IPython shows it: its one line, ``Type: message``, not the stack it was
    raised in (a cancellation, or our own error, is no bug of the cell's)."""
    text = f"{type(exc).__name__}: {exc}"
    exc._render_traceback_ = lambda: [text]  # type: ignore[attr-defined]
    return exc


def one_line(exc: BaseException) -> BaseException:
    """Our own error shown by :func:`short` (it says what happened and how to fix it; our
    internal stack would only bury that). A cell's own error, which comes as a RemoteError,
    keeps its traceback, as does one that says how to show itself already."""
    if isinstance(exc, GpuMagicError) and not isinstance(exc, RemoteError) \
            and not hasattr(exc, "_render_traceback_"):
        short(exc)
    return exc
