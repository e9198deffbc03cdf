"""One gateway per state directory.

Two gateways on one state directory would hand out the same GPUs twice and each would take the
other's running jobs for lost. A gateway holds ``<state-dir>/gateway.lock`` (``flock``) for its
whole life: the kernel lets go of it when the process ends, however it ends (``kill -9``
too). The file says who holds it (pid, URL, and what the runtime file says), so that a second
start can name the first, and a kernel whose runtime file went missing can find it again.
Light on imports: the notebook's side reads it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

LOCK_NAME = "gateway.lock"


class StateDirBusy(Exception):
    """Another gateway holds the state directory; ``holder`` is what it says of itself."""

    def __init__(self, state_dir: Path, holder: dict[str, Any]) -> None:
        pid, url = holder.get("pid"), holder.get("url")
        who = f"pid {pid}, {url}" if url else (f"pid {pid}, still starting" if pid else
                                               "still starting")
        if "embedded" not in holder:  # still starting: it has not said which it is
            stop = f"kill {pid}" if pid else "wait until it has started, then stop it"
        elif holder["embedded"]:
            stop = f"gpu-magic stop, or kill {pid}" if pid else "gpu-magic stop"
        else:  # served by hand: `gpu-magic stop` stops only the embedded one
            stop = f"Ctrl-C where it runs, or kill {pid}" if pid else "Ctrl-C where it runs"
        super().__init__(
            f"another gpu_magic gateway ({who}) uses the state directory {state_dir}: two would "
            f"hand out the same GPUs twice and take each other's jobs for lost. Use that one, "
            f"stop it first ({stop}), or give this one a --state-dir of its own.")
        self.state_dir, self.holder = state_dir, holder


def hold(state_dir: Path) -> int:
    """Take the state directory for this process (its descriptor, kept open for the
    gateway's life and never inherited by its children), or raise StateDirBusy."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirBusy(state_dir, holder(state_dir) or {}) from None
    describe(fd, {"pid": os.getpid()})
    return fd


def describe(fd: int, info: dict[str, Any]) -> None:
    """Say who holds the lock (the file is 0600 in a 0700 folder: it may carry the token)."""
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def holder(state_dir: Path) -> dict[str, Any] | None:
    """What the gateway holding ``state_dir`` says of itself ({} while it is still writing
    that), or None when no gateway holds it."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(os.pread(fd, 1 << 16, 0))
                if isinstance(info, dict):
                    return info
            return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
