"""Remote errors that look local: the cell's exception, rebuilt, with a traceback in its own
line numbers and a line saying where it ran."""

from __future__ import annotations

import linecache
import os
import re
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._errors import RemoteError

_RULE = "-" * 75
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def where(grant: dict[str, Any] | None) -> str:
    """``H100 ×2 on node-3 (simulated)`` for messages."""
    if not grant:
        return "the GPU pool"
    text = f"{grant.get('gpu_type')} ×{grant.get('count')} on {grant.get('node')}"
    if grant.get("simulated"):
        text += " (simulated)"
    return text


CONTEXT = 2  # lines shown before and after the one that raised, as IPython shows them


class _Paint:
    """Traceback text in the notebook's colours (IPython 9's theme, ``%colors``), or plain
    where there is none (no IPython, ``nocolor``, an older IPython): a remote traceback in
    black and white read as something else than the local ones around it (a trial)."""

    def __init__(self, theme: str | None = None) -> None:
        self.theme: Any = None
        if not theme or theme == "nocolor":
            return
        try:
            from IPython.utils.PyColorize import Parser, theme_table
            from pygments.token import Token

            self.theme, self.token = theme_table[theme], Token
            self.parser = Parser(theme_name=theme)
        except Exception:  # (an IPython of another shape, a theme it does not know: plain)
            self.theme = None

    def __call__(self, *parts: tuple[str, str]) -> str:
        """``("ExcName", "ValueError"), ("", ": bad")``: each text in its token's colour
        (the names IPython's own tracebacks use), "" for plain."""
        if self.theme is None:
            return "".join(text for _, text in parts)
        try:
            return str(self.theme.format([(getattr(self.token, kind) if kind else self.token,
                                           text) for kind, text in parts]))
        except Exception:  # (a theme of another shape: plain beats no traceback)
            return "".join(text for _, text in parts)

    def code(self, text: str) -> str:
        """A line of source, highlighted as IPython highlights it."""
        if self.theme is None or not text.strip():
            return text
        try:
            out = self.parser.format2(text, "str")[0]
        except Exception:
            return text
        return out.rstrip("\n") if isinstance(out, str) else text


def render_traceback(
    event: dict[str, Any],
    source: str,
    *,
    line_offset: int = 0,
    label: str = "Cell",
    grant: dict[str, Any] | None = None,
    job_id: str | None = None,
    cell_name: Callable[[str], str | None] | None = None,
    locate: Callable[[str, int, str | None, int | None], str | None] | None = None,
    hide_cell: bool = False,
    mode: str = "Context",
    theme: str | None = None,
) -> list[str]:
    """The lines IPython shows for the remote exception, after those it was chained to.
    ``hide_cell``: the cell is ours, not the user's (a decorated function's call), and its
    frames are left out. ``mode``: the notebook's ``%xmode`` (Minimal: the exception's own
    line; Plain: only the line of each frame that raised; others as Context). ``theme``:
    the notebook's colours (``%colors``), none for plain text."""
    paint = _Paint(theme)
    if mode == "Minimal":
        return [_message(event, paint)]
    context = 0 if mode == "Plain" else CONTEXT
    lines: list[str] = []
    for link in event.get("chain") or []:
        if not isinstance(link, dict):
            continue
        lines += _block(link, source, line_offset, label, cell_name, locate, hide_cell,
                        context, paint)
        lines += ["", "The above exception was the direct cause of the following exception:"
                  if link.get("cause") else
                  "During handling of the above exception, another exception occurred:", ""]
    where_line = f"raised remotely on {where(grant)}" + (f", job {job_id}" if job_id else "")
    block = _block(event, source, line_offset, label, cell_name, locate, hide_cell, context,
                   paint)
    return [*lines, *block[:2], where_line, *block[2:]]


def _message(event: dict[str, Any], paint: _Paint) -> str:
    """``ValueError: bad value``, the last line of a traceback."""
    ename, evalue = str(event.get("ename", "Exception")), str(event.get("evalue", ""))
    return paint(("ExcName", ename), ("", f": {evalue}")) if evalue else paint(("ExcName", ename))


def _head(kind: str, name: str, lineno: int, fr: dict[str, Any], paint: _Paint,
          module_too: bool = False) -> str:
    """``Cell In[3], line 2, in f(x)`` (kind "Cell", name "In[3]") or ``File /x/y.py:9, in
    g()`` (kind "File"), in IPython's colours (``module_too``: ``in <module>`` said too, as
    for a module's file)."""
    if kind == "File":
        parts = [("NormalEm", "File "), ("FilenameEm", f"{name}:{lineno}")]
    else:
        parts = [("NormalEm", kind), ("NormalEm", " " if name else ""), ("FilenameEm", name),
                 ("FilenameEm", f", line {lineno}")]
    if module_too or fr.get("name") != "<module>":
        parts += [("", ", in "), ("VName", str(fr.get("name"))),
                  ("ValEm", str(fr.get("args") or ""))]
    return paint(*parts)


def _label_parts(label: str) -> tuple[str, str]:
    """``Cell In[3]`` as ("Cell", "In[3]"), coloured apart as IPython colours them."""
    kind, _, name = label.partition(" ")
    return kind, name


def _block(event: dict[str, Any], source: str, line_offset: int, label: str,
           cell_name: Callable[[str], str | None] | None,
           locate: Callable[[str, int, str | None, int | None], str | None] | None,
           hide_cell: bool = False, context: int = CONTEXT,
           paint: _Paint | None = None) -> list[str]:
    """One exception's traceback lines, its own message last; ``context`` lines around each
    one that raised."""
    paint = paint or _Paint()
    ename = str(event.get("ename", "Exception"))
    lines = [paint(("Topline", _RULE)),
             # (right-aligned under the rule, as IPython's header is)
             paint(("ExcName", ename),
                   ("", "Traceback (most recent call last)".rjust(len(_RULE) - len(ename))))]
    src_lines = source.splitlines()
    for fr in event.get("traceback", []):
        lineno = int(fr.get("lineno") or 0)
        if fr.get("cell") and hide_cell:
            continue
        if fr.get("cell"):
            lines.append(_head(*_label_parts(label), lineno + line_offset, fr, paint))

            def cell_line(n: int) -> str:
                return src_lines[n - 1] if 0 < n <= len(src_lines) else ""

            lines += _context(cell_line, lineno, line_offset, fr.get("line", ""),
                              fr.get("name") == "<module>", context, paint)
        else:
            filename = fr.get("filename", "?")
            if filename == "<dynamic-code>" and locate is not None:
                # cloudpickle drops the file name of notebook functions; find it here
                filename = locate(fr.get("name", ""), lineno, fr.get("qualname"),
                                  fr.get("first")) or filename
            local_name = cell_name(filename) if cell_name else None
            kind, name = _label_parts(local_name) if local_name else ("File", filename)
            lines.append(_head(kind, name, lineno, fr, paint, module_too=True))
            lines += _context(lambda n, f=filename: linecache.getline(f, n), lineno, 0,
                              fr.get("line", ""), fr.get("name") == "<module>", context, paint)
        lines.append("")
    lines.append(_message(event, paint))
    notes = event.get("notes")
    if isinstance(notes, list):
        lines += [str(n) for n in notes]
    return lines


def _context(line: Callable[[int], str], lineno: int, offset: int, fallback: str,
             module: bool, context: int = CONTEXT, paint: _Paint | None = None) -> list[str]:
    """The line that raised, marked, with up to ``context`` lines around it (in a function,
    not past its body), indented as written, numbered as the notebook numbers them."""
    paint = paint or _Paint()
    here = line(lineno).rstrip()
    if not here.strip():
        return ([paint(("LinenoEm", _arrow(lineno + offset))) + " " +
                 paint.code(fallback.strip())] if fallback.strip() else [])

    def indent(text: str) -> int:
        return len(text) - len(text.lstrip())

    # In a function, not past its body: above, up to its def line (shown, nothing before
    # it); below, no line less indented than those shown (an `if x:` above a line that raised
    # in its block counts: the body goes on at its indent)
    header = ("def ", "async def ", "class ")
    numbers = [lineno]
    floor = indent(here)
    n = lineno - 1
    while lineno - n <= context and n > 0:
        text = line(n).rstrip()
        numbers.append(n)
        if text and not module and text.lstrip().startswith(header) and indent(text) < floor:
            break
        if text:
            floor = min(floor, indent(text))
        n -= 1
    n = lineno + 1
    while n - lineno <= context:
        text = line(n).rstrip()
        if text and not module and indent(text) < floor:
            break
        if not text and not line(n + 1).strip():
            break  # the end of the cell or file
        numbers.append(n)
        n += 1
    numbers.sort()
    texts = {n: line(n).rstrip() for n in numbers}
    while not texts[numbers[-1]].strip():
        numbers.pop()
    while not texts[numbers[0]].strip():
        numbers.pop(0)
    # as written, as IPython shows it: a line's indent says which block it is in
    return [paint(("LinenoEm", _arrow(n + offset) if n == lineno else f"{n + offset:>7}"))
            + " " + paint.code(texts[n]) for n in numbers]


def _arrow(n: int) -> str:
    """``----> 9``, ``---> 14``: IPython's columns, the number right-aligned in seven."""
    return f"{'-' * (5 - len(str(n)))}> {n}"


def _local_module(name: str) -> str | None:
    """Where this kernel would import the top-level module ``name`` from, without importing
    it; None if it cannot."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return spec.origin if spec.origin not in (None, "built-in", "frozen") else name


def local_hint(event: dict[str, Any]) -> str | None:
    """What to do when the cell missed something that is here, in the notebook's folder (the
    working folder of this kernel): a module of its own, or a data file by a relative path.
    The GPU machine runs the cell in a folder of its own (a shared gateway, a Ray node)."""
    ename, evalue = event.get("ename"), str(event.get("evalue", ""))
    if ename == "ModuleNotFoundError":
        m = re.fullmatch(r"No module named '([A-Za-z_]\w*)'", evalue)
        if m and (os.path.isfile(f"{m[1]}.py") or os.path.isfile(os.path.join(m[1], "__init__.py"))):
            return (f"{m[1]!r} is a module in your notebook's folder, which the GPU machine does "
                    f"not have: import it in a local cell first (`import {m[1]}`); it then "
                    "travels with the %%gpu cells that use or import it")
        found = _local_module(m[1]) if m else None
        if found:
            return (f"{m[1]!r} is importable here ({found}) but not where the cell ran: install "
                    "it in the Python the GPU machine runs cells with")
    if ename == "RuntimeError" and "resize storage that is not resizable" in evalue:
        return ("a tensor of 64 KiB or more that travelled to the cell lies on the very memory "
                "its bytes arrived in, which torch cannot resize in place (resize_, an out= "
                "tensor of another size): resize a copy of it (x = x.clone()) instead")
    if ename == "ValueError" and "cannot resize this array: it does not own its data" in evalue:
        return ("if that array travelled to the cell (an input of 64 KiB or more), it lies on "
                "the very memory its bytes arrived in, which numpy cannot resize in place: "
                "resize a copy of it (x = x.copy()), or make a new one (x = np.resize(x, shape))")
    if ename == "KeyError" and (key := _env_key(event)) is not None:
        return (f"{key} is set in this kernel's environment, but environment variables do not "
                f"travel with the cell: pass it with --env {key} (this kernel's value) or "
                f"--env {key}=VALUE")
    if ename == "FileNotFoundError":
        m = re.search(r"No such file or directory: '(.+)'$", evalue)
        if m and not os.path.isabs(m[1]) and os.path.exists(m[1]):
            return (f"{m[1]!r} is in your notebook's folder, but the cell ran in a folder of its "
                    "own on the GPU machine: load the data in a local cell and use it in the "
                    "%%gpu cell (it travels with the cell), or put the file where the GPU "
                    "machine can read it and use that path")
        if m and not os.path.isabs(m[1]) and event.get("folder_removed"):
            # (the cell that wrote it was told its folder goes with its job; this one was not)
            return (f"each cell of this shared gateway runs in a new folder of its own, removed "
                    f"when its job ends: if an earlier %%gpu cell wrote {m[1]!r}, it went with "
                    "that job. Bring what a cell makes back as a variable (data = "
                    "open(path, 'rb').read()), or write it where the GPU machine keeps files")
    return None


def _env_key(event: dict[str, Any]) -> str | None:
    """The variable a KeyError of ``os.environ[...]`` in the cell names, if it is set here."""
    m = re.fullmatch(r"'([^'\\]+)'", str(event.get("evalue", "")))
    frames = event.get("traceback") or []
    if not m or m[1] not in os.environ or not isinstance(frames, list):
        return None
    lines = [str(f.get("line") or "") for f in frames if isinstance(f, dict)]
    return m[1] if any("environ" in line for line in lines) else None


def rebuild(event: dict[str, Any], exc: Any, tb_lines: list[str],
            hint: str | None = None) -> BaseException:
    """The exception to raise here: the same type where it unpickled, else RemoteError.
    ``hint``: what to do about it, said after the traceback."""
    shown = [*tb_lines, f"[gpu_magic] {hint}"] if hint else list(tb_lines)
    # without the notebook's colours: notes and a RemoteError's text reach plain Python,
    # logging and log files (and the rule is found by its text)
    plain = [_ANSI.sub("", line) for line in shown]
    own = max((i for i, line in enumerate(plain) if line == _RULE), default=0)
    # a KeyboardInterrupt too (the cell's, interrupted): raised here as one, it reads as a
    # local interrupt and no `except Exception:` takes it, and so any BaseException of the
    # cell's (asyncio.CancelledError, a class of the notebook's); SystemExit, from exit(),
    # never is: it ends the cell, not the program that ran it
    if isinstance(exc, BaseException) and not isinstance(exc, SystemExit):
        try:
            # IPython asks the exception itself how to render it; an instance attribute is
            # enough and leaves the type (and the user's except clauses) unchanged
            exc._render_traceback_ = lambda: list(shown)  # type: ignore[attr-defined]
            # (IPython shows a SyntaxError or exception group without asking: our handler
            # then does, for those it finds marked)
            exc.gpu_magic_remote = True  # type: ignore[attr-defined]
            exc.__traceback__ = None
            if hasattr(exc, "add_note"):  # plain Python prints notes: where it was raised
                # (its own frames only: Python prints the chain itself, and its last line)
                frames = "\n".join(plain[own + 2:len(tb_lines) - 1]).rstrip()
                if frames:  # (none in %xmode Minimal)
                    exc.add_note(frames)
                if hint:
                    exc.add_note(f"[gpu_magic] {hint}")
            return _chained(exc, event)
        except (AttributeError, TypeError):
            pass
    return _chained(RemoteError(event.get("ename", "Exception"), event.get("evalue", ""),
                                "\n".join(plain), shown=shown if shown != plain else None),
                    event)


def _chained(exc: BaseException, event: dict[str, Any]) -> BaseException:
    """``exc`` with the exceptions it was raised from (or while handling) as ``__cause__`` /
    ``__context__``, as it had where it ran: RemoteErrors naming their type and message."""
    later = exc
    for link in reversed([x for x in event.get("chain") or [] if isinstance(x, dict)]):
        earlier = RemoteError(str(link.get("ename", "Exception")), str(link.get("evalue", "")))
        if link.get("cause"):
            later.__cause__ = earlier
        else:
            later.__context__ = earlier
        later = earlier
    return exc


def _own_module(module: types.ModuleType) -> bool:
    """Whether ``module`` is the user's own beside the notebook: one that travels by value
    (the payload's rule, asked of this kernel's folder)."""
    from ._payload import is_local

    file = getattr(module, "__file__", None)
    return isinstance(file, str) and file.endswith(".py") and \
        is_local(Path.cwd(), module.__name__, file)


def code_locator(sent: Iterable[Any], others: Iterable[Any] = ()
                 ) -> Callable[[str, int, str | None, int | None], str | None]:
    """Find the local file of a notebook function from a frame of its remote run: its
    qualified name and first line (both survive pickling), else its name and a line inside it.
    ``sent``: the values the job was sent; ``others``: more of the notebook (the functions
    they call travel as their globals), matched on qualified name and first line only, as
    two cells may well both define a ``forward``."""
    exact: dict[tuple[str, int], str] = {}
    by_line: dict[str, list[tuple[int, int, str]]] = {}

    def add(code: types.CodeType, sent: bool) -> None:
        exact.setdefault((getattr(code, "co_qualname", code.co_name), code.co_firstlineno),
                         code.co_filename)  # the sent values are visited first: theirs win
        if sent:
            lines = [ln for _, _, ln in code.co_lines() if ln is not None] or [code.co_firstlineno]
            by_line.setdefault(code.co_name, []).append(
                (code.co_firstlineno, max(lines), code.co_filename))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                add(const, sent)

    seen: set[str] = set()

    def visit(obj: Any, sent: bool) -> None:
        if isinstance(obj, types.FunctionType):
            add(obj.__code__, sent)
        elif isinstance(obj, type):
            for v in vars(obj).values():
                f = getattr(v, "__func__", v)
                if isinstance(f, types.FunctionType):
                    add(f.__code__, sent)
        elif isinstance(obj, types.ModuleType) and _own_module(obj) and obj.__name__ not in seen:
            # the user's module beside the notebook travels by value: its frames came back
            # from "<dynamic-code>" too (what it defines, and its submodules)
            seen.add(obj.__name__)
            for v in list(vars(obj).values()):
                try:  # (a lazy proxy's attributes may raise anything: the user's error first)
                    own = getattr(v, "__module__", None) == obj.__name__ or isinstance(
                        v, types.ModuleType) and v.__name__.startswith(obj.__name__ + ".")
                except Exception:
                    continue
                if own:
                    visit(v, sent)

    for v in sent:
        visit(v, True)
    for v in others:
        visit(v, False)

    def locate(name: str, lineno: int, qualname: str | None = None,
               first: int | None = None) -> str | None:
        if qualname is not None and first is not None and (qualname, first) in exact:
            return exact[(qualname, first)]
        for start, last, filename in by_line.get(name, []):
            if start <= lineno <= last:
                return filename
        return None

    return locate
