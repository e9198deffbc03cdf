"""gpu_magic: run a Jupyter cell on a remote GPU with ``%%gpu``.

``%load_ext gpu_magic`` registers the magics; ``gpu_magic.run`` and ``@gpu_magic.gpu`` are the
plain Python API underneath. Heavier parts load on first use, so the runner (which imports this
package) stays lean.
"""

from __future__ import annotations

from typing import Any

from ._errors import (
    AuthError,
    CaptureError,
    EnvironmentMismatch,
    GatewayError,
    GpuMagicError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    NoFeasibleOption,
    RemoteError,
    RunnerLost,
    SchedulingError,
    SerializationError,
    SpecError,
    WaitExpired,
)
from ._spec import GpuOption, GpuSpec
from ._version import __version__

__all__ = [
    "AuthError",
    "CaptureError",
    "EnvironmentMismatch",
    "GatewayError",
    "GpuJob",
    "GpuMagicError",
    "GpuOption",
    "GpuSpec",
    "JobCancelled",
    "JobFailed",
    "JobTimeout",
    "NoFeasibleOption",
    "RemoteError",
    "RunnerLost",
    "SchedulingError",
    "SerializationError",
    "SpecError",
    "WaitExpired",
    "__version__",
    "attach",
    "gpu",
    "load_ipython_extension",
    "run",
    "unload_ipython_extension",
]

_LAZY = {"run": "_api", "gpu": "_api", "attach": "_api", "GpuJob": "_jobs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gpu_magic' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext gpu_magic``: register ``%%gpu`` and ``%gpu``."""
    from ._magic import GPUMagic, show_cell_syntax_errors

    ipython.register_magics(GPUMagic)
    show_cell_syntax_errors(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Put IPython's display of uncaught exceptions back as it was before loading."""
    from ._magic import show_cell_syntax_errors

    show_cell_syntax_errors(ipython, on=False)
