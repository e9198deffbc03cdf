"""Code running inside a GPU job: a ``%%gpu`` cell, ``gpu_magic.run`` or a decorated function
called by a cell that already runs on a GPU (the runner, or a process its cell started).

There it runs right where it is, on the job's own GPUs, as a decorated function called inside
a job always has: a job of its own would hold the outer job's GPUs while waiting for more
(forever, when the pool has no more), and the only gateway in reach is a "local" one on the
GPU machine, which may be another notebook's or the very gateway running this job. So no
local gateway is ever found, started, restarted or stopped from inside a job.
"""

from __future__ import annotations

import ast
import inspect
import json
import linecache
import os
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._errors import GatewayError, GpuMagicError
from ._spec import env_problem, parse_spec

if TYPE_CHECKING:
    from ._api import Options


def current_job() -> str | None:
    """The id of the GPU job this process runs in (set by the gateway for the runner and
    inherited by what its cell starts), or None outside any job."""
    return os.environ.get("GPU_MAGIC_JOB_ID") or None


def _grant() -> dict[str, Any]:
    try:
        grant = json.loads(os.environ.get("GPU_MAGIC_GRANT") or "{}")
    except ValueError:
        return {}
    return grant if isinstance(grant, dict) else {}


def _granted(grant: dict[str, Any]) -> str:
    """``T4 ×1, simulated`` for the job's grant, or "its GPUs" when it says nothing."""
    if not grant.get("type"):
        return "its GPUs"
    sim = ", simulated" if grant.get("simulated") else ""
    return f"{grant['type']} ×{grant.get('count', 1)}{sim}"


def refuse_local_gateway(what: str) -> GatewayError:
    """The error for ``what`` (``%gpu pool``) needing the local gateway inside a job."""
    return GatewayError(
        f"{what}: this runs inside GPU job {current_job()} (on {_granted(_grant())}), on the "
        "GPU machine, where gpu_magic never looks for, starts or stops a local gateway (one "
        "there may be another notebook's, or the one running this job). Run it from the "
        "notebook instead; inside the job, %%gpu cells and gpu_magic.run run right there on "
        "the job's GPUs")


def run_here(source: str, spec: Any, namespace: MutableMapping[str, Any], opts: Options) -> Any:
    """Run a ``%%gpu`` cell or ``gpu_magic.run`` source in place, inside the job this process
    runs in, as a plain local cell: its names are bound in ``namespace`` and the value of its
    last expression returned. Queue options (``--timeout``, ``--wait``, ``--retries``,
    ``--oom-fallback``) have nothing to do here: the outer job's own bound its time."""
    from ._api import _IPYTHON_NAMES, option_problem
    from ._capture import analyze_cell

    job = current_job()
    problem = option_problem(opts.timeout, opts.wait, opts.retries) or env_problem(opts.env)
    if problem:
        raise ValueError(problem)
    grant = _grant()
    if opts.background or opts.dry_run:
        flag, nothing = (("--background", "run in the background") if opts.background
                         else ("--dry-run", "send"))
        raise GpuMagicError(
            f"{flag}: this code already runs inside GPU job {job} (on {_granted(grant)}), "
            "where a %%gpu cell (or gpu_magic.run) runs right here rather than as a job of "
            f"its own, so there is nothing to {nothing}; leave out {flag}, or run the cell "
            "from the notebook")
    gspec = parse_spec(spec, extra_types=[grant["type"]] if grant.get("type") else ())
    if grant.get("type") and not any(
            o.matches(str(grant["type"])) and o.count <= int(grant.get("count", 1))
            for o in gspec):
        print(f"gpu_magic: this cell runs inside GPU job {job}, so it runs right here on its "
              f"{_granted(grant)}, not on {gspec} as its spec asks", file=sys.stderr)
    unused = [flag for flag, given in (("--timeout", opts.timeout is not None),
                                       ("--wait", opts.wait is not None),
                                       ("--retries", bool(opts.retries)),
                                       ("--oom-fallback", opts.oom_fallback)) if given]
    if unused:  # said, as a spec it does not meet is: its user expects them to act
        print(f"gpu_magic: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no "
              f"effect here: this cell runs inside GPU job {job}, within that job's own "
              "limits", file=sys.stderr)
    analysis = analyze_cell(source, opts.line_offset)
    direct = type(namespace) is dict and opts.return_names is None and not opts.no_return
    # exec needs a real dict; with --return or --no-return the cell binds into a copy, and
    # only the names asked for are bound back
    scope: dict[str, Any] = namespace if direct else dict(namespace)  # type: ignore[assignment]
    with _env(opts.env):
        value = _execute(analysis.source, analysis.has_value, scope, job)
    if not direct:
        _bind_back(namespace, scope, opts, _IPYTHON_NAMES)
    return value


@contextmanager
def _env(env: dict[str, str]) -> Iterator[None]:
    """``--env`` for the cell's run, and the environment as it was afterwards."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _execute(code: str, has_value: bool, scope: dict[str, Any], job: str | None) -> Any:
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    filename = f"<%%gpu cell inside job {job}>"
    # tracebacks show the cell's lines, as the outer cell's own are shown
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    had_builtins = "__builtins__" in scope  # exec adds it: not a name of the user's
    if last is not None:  # the value, kept under a name of ours: one code object, one loop
        tree.body.append(ast.copy_location(ast.Assign(
            targets=[ast.Name(_VALUE, ast.Store())], value=last.value), last))
        ast.fix_missing_locations(tree)
    try:
        _run(compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), scope)
        value = scope.pop(_VALUE, None)
    finally:
        scope.pop(_VALUE, None)
        if not had_builtins:
            scope.pop("__builtins__", None)
    return value if has_value else None  # a trailing `;` shows nothing, as in IPython


_VALUE = "_gpu_magic_cell_value"


def _run(code: Any, scope: dict[str, Any]) -> Any:
    """Run ``code``; one with top-level ``await`` (IPython runs such cells) on an event loop
    of its own, or, where one already runs in this thread, says how to go on."""
    if not code.co_flags & inspect.CO_COROUTINE:
        return eval(code, scope)
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(eval(code, scope))
    raise RuntimeError("this %%gpu cell uses top-level await inside a GPU job whose own cell "
                       "is already awaiting: make it an async function and await it there")


def _bind_back(namespace: MutableMapping[str, Any], scope: dict[str, Any], opts: Options,
               own: frozenset[str]) -> None:
    """Bind into ``namespace`` what the cell left in ``scope`` that the options bring back."""
    if opts.no_return:
        return
    if opts.return_names is not None:
        for name in opts.return_names:
            if name in scope:
                namespace[name] = scope[name]
            else:  # a typo in --return must not cost the cell's work in silence
                print(f"gpu_magic: --return {name}: the cell left no name {name!r}",
                      file=sys.stderr)
        return
    for name, value in scope.items():  # a mapping that is not a dict: every change
        if name not in own and (name not in namespace or namespace[name] is not value):
            namespace[name] = value
    for name in [n for n in namespace if n not in scope and n not in own]:
        del namespace[name]
