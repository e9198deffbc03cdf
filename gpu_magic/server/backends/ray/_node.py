"""What runs on a Ray node: the runner of one job, spawned by a streaming Ray task.

The task writes the job's input blobs (handed over by Ray's object store) into a private scratch
folder, starts ``python -m gpu_magic.runner`` there as the leader of its own process group, and
streams back what the runner says while it runs. Every item it yields is ``bytes`` in one of three
frames, so the gateway, a Ray driver, only ever receives bytes and JSON:

    b"E" + runner event lines (JSON, one per line)
    b"B" + {"name": file, "last": bool} + b"\\n" + a chunk of a result blob from JOB_DIR/out
    b"X" + {"rc": exit code, "tail": the end of the runner's log}

A result blob is sent before the event that names it, so the gateway holds it when the event comes.
Cancelling the task (Ray raises KeyboardInterrupt in it) stops the runner's whole process group;
if the task's worker dies outright, the kernel kills the runner (parent-death signal).
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

# Variables of the node that a cell must never see.
SECRET_ENV = ("GPU_MAGIC_TOKEN", "RAY_AUTH_TOKEN")
CHUNK = 8 << 20
TAIL_CHARS = 4000

# Started instead of the runner itself: asks the kernel to kill it when the Ray worker that started
# it dies (Linux), then becomes the runner. The pid check closes the race with a parent that died
# before the request was made.
_LAUNCH = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)
os.execv(sys.executable, [sys.executable, "-m", "gpu_magic.runner", *sys.argv[2:]])
"""


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
    from ...._version import __version__

    if meta.get("version") != __version__:
        yield b"E" + json.dumps({
            "type": "runner_error", "ename": "EnvironmentMismatch",
            "evalue": f"this Ray node has gpu_magic {__version__} but the gateway has "
                      f"{meta.get('version')}; install the same version on every node",
            "traceback": "",
        }).encode()
        yield b"X" + json.dumps({"rc": 3, "tail": ""}).encode()
        return
    base = meta.get("workdir") or None
    if base:
        os.makedirs(base, mode=0o700, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"gpu-magic-{meta['job_id']}-{meta['attempt']}-",
                                    dir=base))
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
        del blobs
        manifest = dict(meta["manifest"], inputs={"pickle": paths[0], "buffers": paths[1:]})
        (workdir / "manifest.json").write_text(json.dumps(manifest))
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.update(meta["env"])
        # Ray chose the devices: say which in the grant the cell reads
        grant = json.loads(env.get("GPU_MAGIC_GRANT") or "{}")
        grant["devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        env["GPU_MAGIC_GRANT"] = json.dumps(grant)
        r, w = os.pipe()
        with open(workdir / "runner.log", "wb") as log:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCH, str(os.getpid()), str(workdir), str(w)],
                    cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(w,), start_new_session=True,
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
            _stop_group(proc, grace)
        shutil.rmtree(workdir, ignore_errors=True)


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
    except ValueError:
        return []
    if not isinstance(ev, dict):
        return []
    if ev.get("type") == "result":
        digests = [ev.get("blob"), *(ev.get("buffers") or [])]
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


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the runner's process group, SIGKILL what is left after ``grace`` seconds."""
    pgid = proc.pid
    if proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)  # the cell's own children, even when the runner is gone
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
