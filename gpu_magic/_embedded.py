"""The embedded default: find or start this user's one local gateway on this host.

The gateway is a detached process (it outlives the kernel that started it and exits after an
idle period), on loopback with a token, described by a 0600 runtime file in Jupyter's runtime
directory. Starting is guarded by a file lock, so two kernels never start two gateways, and a
running gateway whose version or configuration differs is never silently reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ._errors import GatewayError, SpecError
from ._version import __version__

START_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 3600.0


def runtime_path() -> Path:
    from jupyter_core.paths import jupyter_runtime_dir

    d = Path(jupyter_runtime_dir())
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d / f"gpu-magic-gateway-{socket.gethostname()}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "url" in info else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: an exited one waiting to be reaped (a zombie) does not."""
    if pid <= 0:
        return False
    try:
        # a gateway this process started and that has exited is a zombie until reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # another process's zombie (its parent has not reaped it) still answers kill(pid, 0):
    # ask Linux for its state instead (elsewhere there is no /proc; kill's answer stands)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _healthy(info: dict[str, Any]) -> bool:
    if info.get("host") != socket.gethostname() or not _pid_alive(int(info.get("pid", 0))):
        return False
    try:
        return httpx.get(info["url"] + "/v1/health", timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def _jobs_on(info: dict[str, Any]) -> tuple[int, int]:
    """How many jobs run and wait on the gateway (0, 0 where it does not answer)."""
    try:
        pool = httpx.get(info["url"] + "/v1/pool", timeout=3.0,
                         headers={"Authorization": f"Bearer {info.get('token', '')}"}).json()
    except (httpx.HTTPError, ValueError):
        return 0, 0
    return int(pool.get("running") or 0), int(pool.get("queue_length") or 0)


def _idle(info: dict[str, Any]) -> bool:
    return _jobs_on(info) == (0, 0)


def _stop(info: dict[str, Any], path: Path, wait: float = 10.0) -> None:
    pid = int(info.get("pid", 0))
    if pid and _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        path.unlink()


def wanted_config(simulate: str | None) -> dict[str, Any]:
    from .server.inventory import canonical_pool

    return {"backend": "local", "simulate": canonical_pool(simulate)}


def difference(info: dict[str, Any], simulate: str | None) -> str | None:
    """What of a running gateway's (``info``) differs from what a kernel with ``simulate``
    wants, as ``version 0.9`` or ``configuration {...}``; None when nothing does."""
    if info.get("version") != __version__:
        return f"version {info.get('version')}"
    if info.get("config") != wanted_config(simulate):
        return f"configuration {info.get('config')}"
    return None


def _not_in_a_job(what: str) -> None:
    from ._injob import current_job, refuse_local_gateway

    if current_job():
        raise refuse_local_gateway(what)


def running_local_gateway() -> dict[str, Any] | None:
    """The runtime info of this user's local gateway if one is running, whatever its
    configuration (for commands that only look at it); None if none is."""
    _not_in_a_job("looking for the local gateway")
    info = _read(runtime_path())
    return info if info is not None and _healthy(info) else None


def local_gateway_gone(url: str) -> bool:
    """Whether the local gateway that served at ``url`` no longer runs: its runtime file gone
    (stopped) or its process dead. Told by the process, not by an answer: a busy gateway that
    is slow to answer still runs (its jobs too)."""
    info = _read(runtime_path())
    if info is None:
        return True
    if str(info.get("url", "")).rstrip("/") != url.rstrip("/"):
        return False  # another one runs now: the client follows its jobs there
    return not _pid_alive(int(info.get("pid", 0)))


def ensure_local_gateway(simulate: str | None = None, *, state_dir: Path | None = None) -> dict[str, Any]:
    """The runtime info (url, token, ...) of this user's local gateway, starting it if needed."""
    _not_in_a_job("starting the local gateway")
    path = runtime_path()
    want = wanted_config(simulate)
    with _locked(path):
        info = _read(path)
        if info is not None and _healthy(info):
            what = difference(info, simulate)
            if what is None:
                return info
            # refused before the running gateway (another notebook's) is stopped for it
            _check_pool(simulate, "the local gateway running now is left as it is")
            if not _idle(info):
                raise GatewayError(
                    f"the local gpu_magic gateway (pid {info.get('pid')}) runs with {what}, but "
                    f"this kernel wants version {__version__} with {want}, and it still has jobs. "
                    "Let them finish and run `gpu-magic stop` (or %gpu stop), or set "
                    "GPU_MAGIC_SIMULATE to match."
                )
            print(f"gpu_magic: restarting the local gateway ({what} differs from {want})",
                  file=sys.stderr)
            _stop(info, path)
        elif info is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        # refused here, naming the variable (the gateway's own refusal names --simulate)
        _check_pool(simulate, "no local gateway was started")
        return _start(path, simulate, state_dir)


def _check_pool(simulate: str | None, then: str) -> None:
    """SpecError, saying ``then``, where GPU_MAGIC_SIMULATE cannot be read as a pool."""
    if not simulate:
        return
    from .server.inventory import parse_simulated

    try:
        parse_simulated(simulate)
    except SpecError as exc:
        raise SpecError(f"GPU_MAGIC_SIMULATE={simulate!r}: {exc}; {then}",
                        spec=simulate) from None


def _start(path: Path, simulate: str | None, state_dir: Path | None) -> dict[str, Any]:
    from .server.serve import default_state_dir

    state = state_dir or default_state_dir()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    running = _holding(path, state, simulate)
    if running is not None:
        return running
    cmd = [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--runtime-file", str(path),
           "--idle-timeout", str(IDLE_TIMEOUT_S), "--state-dir", str(state)]
    if simulate:
        cmd += ["--simulate", simulate]
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_MAGIC_TOKEN", "GPU_MAGIC_URL")}
    _say_pool_notes(simulate)
    # (0600 as the rest of the state folder: it names the jobs and errors of its user)
    with os.fdopen(os.open(state / "gateway.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                   "ab") as log:
        # the log is appended to across starts: a failure quotes this start's part only
        log.write(f"--- gpu_magic {__version__} gateway starting "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = _read(path)
        if info is not None and info.get("pid") == proc.pid:
            _reap_when_done(proc)
            return info
        if proc.poll() is not None:
            with open(state / "gateway.log", "rb") as f:
                f.seek(start)
                tail = f.read().decode(errors="replace")[-1500:]
            raise GatewayError(
                f"the local gpu_magic gateway failed to start (exit code {proc.returncode}). "
                f"It said ({state / 'gateway.log'}):\n{tail}"
            )
        time.sleep(0.02)
    proc.terminate()
    _reap_when_done(proc)
    raise GatewayError(
        f"the local gpu_magic gateway did not start within {START_TIMEOUT_S:g} s; see "
        f"{state / 'gateway.log'}"
    )


def _say_pool_notes(simulate: str | None) -> None:
    """Warn in the kernel about GPU_MAGIC_SIMULATE's unknown type names (H1000: did you mean
    H100?) as the gateway starts: its own log is where nobody looks."""
    if not simulate:
        return
    from ._spec import pool_type_note
    from .server.inventory import parse_simulated

    try:
        names = sorted({g.type for g in parse_simulated(simulate)})
    except SpecError:
        return  # the gateway refuses it, and that refusal is quoted
    for note in filter(None, map(pool_type_note, names)):
        print(f"gpu_magic: GPU_MAGIC_SIMULATE={simulate!r}: {note}", file=sys.stderr)


def _holding(path: Path, state: Path, simulate: str | None) -> dict[str, Any] | None:
    """The gateway that already runs on ``state`` though the runtime file does not name it
    (a tmp cleaner removed the file, a logout emptied /run/user): use it, and name it in the
    runtime file again; a second gateway would be refused the state directory. None when no
    gateway holds it."""
    from .server.lock import StateDirBusy, holder

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        info = holder(state)
        if info is None:
            return None
        if info.get("url") and info.get("host") == socket.gethostname() and _healthy(info):
            break
        if time.monotonic() > deadline:  # (it says nothing, or does not answer)
            raise GatewayError(str(StateDirBusy(state, info)))
        time.sleep(0.05)  # still starting
    want = wanted_config(simulate)
    if info.get("version") != __version__ or info.get("config") != want or not info.get("token"):
        what = (f"version {info.get('version')}" if info.get("version") != __version__
                else f"configuration {info.get('config')}" if info.get("config") != want
                else "tokens of its own (started by hand with --tokens-file)")
        raise GatewayError(
            f"{StateDirBusy(state, info)} It runs with {what}, but this kernel wants version "
            f"{__version__} with {want}. Stop it once its jobs are done, or connect to it "
            f"(%gpu connect {info.get('url')}).")
    fd = os.open(path.with_name(f".{path.name}.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(path.with_name(f".{path.name}.tmp"), path)
    return info


def _reap_when_done(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the gateway in the background, so that when it exits (stopped, idle) it is
    gone at once: unreaped, it would stay a zombie of this process (a kernel, `gpu-magic
    demo`) that every other process takes for a running gateway."""
    threading.Thread(target=proc.wait, name=f"gpu-magic-reap-{proc.pid}", daemon=True).start()


def stop_local_gateway() -> str:
    """Stop this user's local gateway, if one runs; say what happened."""
    from .server.lock import holder
    from .server.serve import default_state_dir

    _not_in_a_job("stopping the local gateway")
    path = runtime_path()
    with _locked(path):
        info = _read(path)
        if info is None or not _pid_alive(int(info.get("pid", 0))):
            with contextlib.suppress(OSError):
                path.unlink()
            # one whose runtime file went missing (a tmp cleaner) still holds its state folder
            info = holder(default_state_dir())
            if not (info and info.get("url") and info.get("host") == socket.gethostname()
                    and _pid_alive(int(info.get("pid", 0)))):
                return "no local gpu_magic gateway is running"
        running, queued = _jobs_on(info)
        _stop(info, path)
        ended = ""
        if running or queued:  # (said: a background job of a cell above ends with it)
            ended = (f"; its {running} running and {queued} queued job(s) ended with it, as "
                     "lost (their output so far is kept: %gpu jobs lists them once a gateway "
                     "runs again)")
        return f"stopped the local gpu_magic gateway (pid {info['pid']}, {info['url']}){ended}"
