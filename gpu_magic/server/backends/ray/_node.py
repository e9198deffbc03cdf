"""What runs on a Ray node: the runner of one job, spawned by a streaming Ray task.

The task writes the job's input blobs (handed over by Ray's object store) into a private scratch
folder, starts ``python -m gpu_magic.runner`` there in a process group of its own, and streams
back what the runner says while it runs. Every item it yields is ``bytes`` in one of three
frames, so the gateway, a Ray driver, only ever receives bytes and JSON:

    b"E" + runner event lines (JSON, one per line)
    b"B" + {"name": file, "last": bool} + b"\\n" + a chunk of a result blob from JOB_DIR/out
    b"X" + {"rc": exit code, "tail": the end of the runner's log}

A result blob is sent before the event that names it, so the gateway holds it when the event comes.
Cancelling the task (Ray raises KeyboardInterrupt in it) stops the runner's whole process group;
so does the death of the task's worker (force-cancelled, out of memory, its node going away).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

# Variables of the node that a cell must never see (the URL: see local.py's list).
SECRET_ENV = ("GPU_MAGIC_TOKEN", "GPU_MAGIC_URL", "RAY_AUTH_TOKEN")
CHUNK = 8 << 20
TAIL_CHARS = 4000

# Two small processes stand between the task and the runner, because when a Ray worker exits Ray
# SIGKILLs the worker's own children, and those alone. The launcher, a child of the worker, starts
# the leader of a new process group and waits for it; it passes a SIGTERM (a cancel) on to the
# whole group and, at the end, kills whatever the cell left running in it. The leader starts the
# runner and asks the kernel for SIGUSR1 when the launcher dies (Linux); then it kills the whole
# group, the cell's own children included, so that nothing keeps using GPUs that Ray already
# counts as free. Should the leader itself be killed first (Ray may SIGKILL orphans it adopts), the
# terminal it controls hangs up and the kernel sends the group SIGHUP. Each exits as the runner did.
_EXIT_AS = """
if rc < 0:
    try:
        signal.signal(-rc, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL has no handler to reset
    os.kill(os.getpid(), -rc)
sys.exit(rc)
"""
_PARENT_DEATH = """
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(PARENT_DEATH_SIGNAL))  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os.kill(os.getpid(), PARENT_DEATH_SIGNAL)
"""
_LEADER = """\
import ctypes, os, signal, subprocess, sys

try:  # the cell's orphans come here, not to init: a session of their own does not hide them
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass

def below():
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] not in (b"Z", b"X"):  # (a zombie holds nothing, and ends nothing)
                kids.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [os.getpid()]
    while todo:
        for pid in kids.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found

def end_all():
    # what the cell left running in sessions of its own (its runner, killed, could not); again
    # while there is any: one may fork as the others die
    for _ in range(20):
        pids = below()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:  # (reaped: a zombie below would be seen again)
            try:
                os.waitpid(pid, os.WNOHANG)
            except OSError:
                pass

def lost(*_):
    end_all()
    os.killpg(0, signal.SIGKILL)

signal.signal(signal.SIGUSR1, lost)
signal.signal(signal.SIGTERM, lambda *_: None)  # the runner answers a cancel
PARENT_DEATH_SIGNAL = signal.SIGUSR1
""" + _PARENT_DEATH + """
try:
    # a terminal of our own, held open here: should this process be SIGKILLed before it can act,
    # the kernel hangs the terminal up and sends SIGHUP to the whole group
    import fcntl, termios
    tty, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    os.close(slave)
except Exception:
    pass
fd = int(sys.argv[3])
proc = subprocess.Popen([sys.executable, "-m", "gpu_magic.runner", sys.argv[2], str(fd)],
                        pass_fds=(fd,))
os.close(fd)
rc = proc.wait()
end_all()
""" + _EXIT_AS
_LAUNCHER = """\
import ctypes, os, signal, subprocess, sys

PARENT_DEATH_SIGNAL = signal.SIGKILL
""" + _PARENT_DEATH + """
fd = int(sys.argv[3])
leader = subprocess.Popen([sys.executable, "-c", sys.argv[4], str(os.getpid()), sys.argv[2], str(fd)],
                          pass_fds=(fd,), start_new_session=True)
os.close(fd)

def forward(signum, _frame):
    try:
        os.killpg(leader.pid, signum)
    except ProcessLookupError:
        pass

signal.signal(signal.SIGTERM, forward)
rc = leader.wait()
try:
    os.killpg(leader.pid, signal.SIGKILL)  # whatever the cell left running
except (ProcessLookupError, PermissionError):
    pass
""" + _EXIT_AS


@ray.remote(num_cpus=0, max_retries=0)
def probe_gpus() -> str:
    """This node's GPUs as NVML reports them (JSON): [{"type", "memory_gb"}, ...]; [] without NVML."""
    from ...inventory import read_nvml

    return json.dumps([{"type": g.type, "memory_gb": g.memory_gb} for g in read_nvml()])


@ray.remote(num_cpus=0, max_retries=0)
def run_cell(meta: str, *blobs: bytes) -> Iterator[bytes]:
    """One attempt of a job on this node; ``blobs`` are its input blobs, in ``meta["names"]`` order."""
    yield from _run(json.loads(meta), blobs)


def _run(meta: dict[str, Any], blobs: tuple[bytes, ...]) -> Iterator[bytes]:
    from ...._version import WIRE_FORMAT, __version__

    # (the wire format too: the node's runner reads what the kernel pickled)
    if meta.get("version") != __version__ or meta.get("wire") != WIRE_FORMAT:
        yield b"E" + json.dumps({
            "type": "runner_error", "ename": "EnvironmentMismatch",
            "evalue": f"this Ray node has gpu_magic {__version__} (wire format {WIRE_FORMAT}) "
                      f"but the gateway has {meta.get('version')} (wire format "
                      f"{meta.get('wire')}); install the same version on every node",
            "traceback": "",
        }).encode()
        yield b"X" + json.dumps({"rc": 3, "tail": ""}).encode()
        return
    base = meta.get("workdir") or None
    if base:
        os.makedirs(base, mode=0o700, exist_ok=True)
    _sweep_left(base)
    workdir = Path(tempfile.mkdtemp(prefix=f"gpu-magic-{meta['job_id']}-{meta['attempt']}-",
                                    dir=base))
    (workdir / "worker.pid").write_text(str(os.getpid()))
    proc: subprocess.Popen[bytes] | None = None
    grace = float(meta.get("grace", 3.0))
    try:
        inputs = workdir / "in"
        inputs.mkdir()
        paths = []
        for name, data in zip(meta["names"], blobs):
            path = inputs / Path(name).name
            path.write_bytes(data)
            paths.append(str(path))
        manifest = dict(meta["manifest"], inputs={"pickle": paths[0], "buffers": paths[1:]})
        (workdir / "manifest.json").write_text(json.dumps(manifest))
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        if "OMP_NUM_THREADS" in env and "OMP_NUM_THREADS" not in _raylet_env():
            # Ray pins it to 1 in a task that asked for no CPU; the cell gets the node's setting
            del env["OMP_NUM_THREADS"]
        env.update(meta["env"])
        # Ray chose the devices: say which in the grant the cell reads
        grant = json.loads(env.get("GPU_MAGIC_GRANT") or "{}")
        grant["devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        env["GPU_MAGIC_GRANT"] = json.dumps(grant)
        r, w = os.pipe()
        with open(workdir / "runner.log", "wb") as log:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCHER, str(os.getpid()), str(workdir), str(w),
                     _LEADER],
                    cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(w,),
                )
            finally:
                os.close(w)
        try:
            yield from _relay(r, workdir / "out")
        finally:
            os.close(r)
        rc = proc.wait()
        yield b"X" + json.dumps({"rc": rc, "tail": _tail(workdir / "runner.log")}).encode()
    finally:
        # normal end, cancel (KeyboardInterrupt) or an error of ours: nothing of the job may stay
        if proc is not None:
            _stop(proc, grace)
        shutil.rmtree(workdir, ignore_errors=True)


def _sweep_left(base: str | None) -> None:
    """Remove the folders (inputs included) of jobs whose worker died with them, a node
    removed or killed mid-job: their clean-up below never ran. Each names its worker's pid;
    one whose pid is alive, or unreadable, is left."""
    for folder in Path(base or tempfile.gettempdir()).glob("gpu-magic-*-*-*"):
        try:
            pid = int((folder / "worker.pid").read_text())
            os.kill(pid, 0)
            if not _zombie(pid):  # (dead, its node's raylet gone before it could reap it)
                continue
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # alive (as another user too), being made, or not one of ours
        shutil.rmtree(folder, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:  # "pid (comm) state ...": comm may hold spaces and parentheses
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _raylet_env() -> dict[str, str]:
    """The environment of the process that started this worker (the node's raylet), where it can
    be read; Ray adds to a worker's environment what it sets per task."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _relay(fd: int, out_dir: Path) -> Iterator[bytes]:
    """The runner's event lines as frames, each result blob sent just before the line naming it."""
    rest = b""
    while True:
        # a timeout, so that a cancel (delivered between bytecodes) is seen while the cell is quiet
        ready, _, _ = select.select([fd], [], [], 0.25)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        *lines, rest = (rest + chunk).split(b"\n")
        batch: list[bytes] = []
        for line in lines:
            if not line.strip():
                continue
            names = _blobs_named(line)
            if names:
                if batch:
                    yield b"E" + b"\n".join(batch)
                    batch = []
                for name in names:
                    yield from _blob_frames(out_dir / name)
            batch.append(line)
        if batch:
            yield b"E" + b"\n".join(batch)


def _blobs_named(line: bytes) -> list[str]:
    if b'"result"' not in line and b'"error"' not in line:
        return []
    try:
        ev = json.loads(line)
    except (ValueError, RecursionError):
        return []
    if not isinstance(ev, dict):
        return []
    if ev.get("type") == "result":
        digests = [ev.get("blob"), *(ev.get("buffers") or [])]
        error = ev.get("error")  # a cell ended by an interrupt: its results and its error
        if isinstance(error, dict):
            digests.append(error.get("exception"))
    elif ev.get("type") == "error":
        digests = [ev.get("exception")]
    else:
        return []
    return [d.replace(":", "-") for d in digests if isinstance(d, str) and d]


def _blob_frames(path: Path) -> Iterator[bytes]:
    try:
        f = open(path, "rb")
    except OSError:
        return  # the gateway reports the blob as missing
    with f:
        size = os.fstat(f.fileno()).st_size
        sent = 0
        while True:
            chunk = f.read(CHUNK)
            sent += len(chunk)
            last = sent >= size
            head = json.dumps({"name": path.name, "last": last}).encode()
            yield b"B" + head + b"\n" + chunk
            if last:
                return


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-TAIL_CHARS:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the runner's process group (through its launcher), SIGKILL it after ``grace`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()  # the leader hears of it and kills the group
    proc.wait()
