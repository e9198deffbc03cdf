"""The public face of gpu_magic is pinned: a change to it must be deliberate."""

from __future__ import annotations

import subprocess
import sys

import gpu_magic

PUBLIC = [
    "AuthError", "CaptureError", "EnvironmentMismatch", "GatewayError", "GpuJob", "GpuMagicError",
    "GpuOption", "GpuSpec", "JobCancelled", "JobFailed", "JobTimeout", "NoFeasibleOption",
    "RemoteError", "RunnerLost", "SchedulingError", "SerializationError", "SpecError",
    "WaitExpired", "__version__", "attach", "gpu", "load_ipython_extension", "run",
    "unload_ipython_extension",
]


def test_all_is_pinned_and_sorted() -> None:
    assert gpu_magic.__all__ == PUBLIC
    assert sorted(gpu_magic.__all__) == gpu_magic.__all__
    for name in PUBLIC:
        assert getattr(gpu_magic, name) is not None


def test_one_error_tree() -> None:
    errors = [n for n in PUBLIC if n.endswith(("Error", "Mismatch", "Failed", "Timeout", "Lost",
                                               "Expired")) or n == "NoFeasibleOption"]
    assert len(errors) == 14
    for name in errors:
        assert issubclass(getattr(gpu_magic, name), gpu_magic.GpuMagicError), name
    # a cancellation must get past `except Exception:` in user code
    assert issubclass(gpu_magic.JobCancelled, BaseException)
    assert not issubclass(gpu_magic.JobCancelled, Exception)


def test_runner_stays_lean() -> None:
    """The runner imports neither the server, the HTTP client, nor any widget library."""
    code = (
        "import sys, gpu_magic.runner; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('ipywidgets', 'httpx', 'fastapi', 'uvicorn', 'torch') or m.startswith('gpu_magic.server')]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
