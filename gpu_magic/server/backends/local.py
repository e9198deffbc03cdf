"""The embedded default backend: each job in its own runner subprocess on this host.

The runner gets exactly the granted GPUs: ``CUDA_VISIBLE_DEVICES`` by GPU UUID for real GPUs, and
empty for a simulated grant, so a real GPU on the same machine is never touched by a simulation.
Each runner leads its own process group, so a cancel reaches everything the cell started; an
interrupt reaches the runner alone, as Jupyter's reaches the kernel and not its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inventory import Gpu, parse_simulated, read_nvml
from .sandbox import IsolationUnavailable, bwrap_command, python_paths, sandboxed_pid
from .warm import WarmPool, Worker, ZygoteError

# A manifest goes to a warm worker with the job while the request (manifest and environment)
# stays under this; the worker reads its requests 64 KiB at a time.
MANIFEST_INLINE_MAX = 48 << 10
# one event line from a runner: its outputs come in pieces of 1 MiB, its results up to 1 MiB
# inline, a figure a few MiB; past this it is not a runner of ours writing
EVENT_LINE_MAX = 64 << 20
# Variables of the gateway that a cell must never see: its token, and the URL a shell profile
# exports for notebooks (a cell given it took it for its own gateway: `%gpu pool` in a cell
# asked for a token instead of saying that it runs inside a job).
_SECRET_ENV = ("GPU_MAGIC_TOKEN", "GPU_MAGIC_URL")

# What a shared gateway's cells get of its environment: what finds programs, libraries, the
# GPU stack and the network, and the locale. Nothing else: the account that runs a class's
# gateway keeps its own secrets there (a red team's cell read AWS and webhook keys, and a
# JupyterHub terminal's JUPYTERHUB_API_TOKEN would go the same way). --pass-env adds names.
SHARED_ENV = frozenset({
    "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME", "SHELL",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONHASHSEED", "PYTHONIOENCODING",
    "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "ALL_PROXY", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "MPLBACKEND", "TORCH_HOME", "XDG_CACHE_HOME", "CC", "CXX", "PKG_CONFIG_PATH",
    "PROJ_DATA", "PROJ_LIB", "GDAL_DATA",
    # Hugging Face's places and offline switches (never an HF_ prefix: HF_TOKEN)
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_ENDPOINT",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"})
SHARED_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "CUDNN_", "TORCH_CUDA_", "PYTORCH_",
                       "TRITON_", "XLA_")


def shared_env(environ: Mapping[str, str], passed: Iterable[str] = ()) -> dict[str, str]:
    """The part of ``environ`` a shared gateway's cells get (see ``SHARED_ENV``)."""
    extra = set(passed)
    return {k: v for k, v in environ.items()
            if k in SHARED_ENV or k in extra or k.startswith(SHARED_ENV_PREFIXES)}


@dataclass
class RunSpec:
    """Everything a backend needs to start one attempt of a job."""

    job_id: str
    attempt: int
    job_dir: Path
    manifest: dict[str, Any]
    gpus: list[Gpu]
    grant_env: dict[str, str]
    python: str | None = None
    cwd: str | None = None
    user: str = ""
    session: str | None = None  # the submitting process (a kernel): its runners are its own


@dataclass
class Handle:
    """One running attempt: a fresh process (``proc``) or a warm worker from the pool."""

    pid: int
    spec: RunSpec
    proc: subprocess.Popen[bytes] | None = None
    worker: Worker | None = None
    cancelled: bool = False
    # the runner's log, as the gateway opened it: its tail is read from this descriptor, never
    # by name (the runner may put a link or a FIFO there)
    log_fd: int | None = None
    # the runner said it takes interrupts (its pid as it sees itself: inside a sandbox, the
    # pid namespace's); until then one asked for waits (interrupt_due)
    runner_pid: int | None = None
    interrupt_due: bool = False

    def wait(self, timeout: float = 10.0) -> int | None:
        """The exit code once the process is gone (negative: killed by that signal)."""
        if self.proc is not None:
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        assert self.worker is not None
        return self.worker.exit_code if self.worker.exited.wait(timeout) else None


def end_orphans(job_id: str) -> int:
    """Kill what a job's cell started and left running after its runner died without ending
    it (killed outright: the OOM killer, a cancel's SIGKILL): a process in a session of its
    own is in no process group of the runner's, and would hold the job's GPUs while the next
    job is granted them. Known by the job id in its environment, as the cell's own
    processes inherit it. Returns how many there were."""
    mark = b"GPU_MAGIC_JOB_ID=" + job_id.encode()
    ended = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            os.kill(int(name), signal.SIGKILL)
            ended += 1
        except OSError:
            continue  # (gone, or another user's: not the cell's)
    return ended


EventCallback = Callable[[str, int, dict[str, Any]], None]
ExitCallback = Callable[[str, int, int | None, str], None]


class _RunnerOutput:
    """Turns the lines a runner writes on its events pipe into events."""

    def __init__(self, run: RunSpec, on_event: EventCallback,
                 on_ready: Callable[[int], None] | None = None) -> None:
        self.run, self.on_event, self.on_ready = run, on_event, on_ready
        self.finished = self.clean = False
        self.reusable = True  # the runner's word in its "finished" event

    def line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # (a cell may write anything: "[" * 100000)
            return  # a runner never writes anything else here; ignore noise
        if not (isinstance(event, dict) and isinstance(event.get("type"), str)):
            return
        if event["type"] == "finished":
            self.finished = True
            self.reusable = event.get("reusable") is not False
            return
        if event["type"] == "interruptible":  # the backend's business, not the job's
            pid = event.get("pid")
            if self.on_ready is not None and isinstance(pid, int):
                self.on_ready(pid)
                self.on_ready = None  # once: a cell may write lines of its own here
            return
        self.clean = self.clean or event["type"] in ("result", "error")
        self.on_event(self.run.job_id, self.run.attempt, event)


class _PipeReader:
    """Reads a runner's events pipe from the event loop."""

    def __init__(self, backend: LocalBackend, handle: Handle, fd: int, on_event: EventCallback,
                 on_exit: ExitCallback, loop: asyncio.AbstractEventLoop) -> None:
        self.backend, self.handle, self.fd, self.on_exit, self.loop = (
            backend, handle, fd, on_exit, loop)
        self.state = _RunnerOutput(handle.spec, on_event,
                                   lambda pid: backend._interruptible(handle, pid))
        self.parts: list[bytes] = []  # the line being read, in the pieces read so far
        self.size = 0
        self.overlong = False  # skipping the rest of a line that was too long
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._take(chunk)
            return
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        try:
            if self.parts and not self.overlong:
                self.state.line(b"".join(self.parts))
        finally:  # whatever the last line was, the job must end (and free its GPUs)
            h = self.handle
            if h.worker is not None and self.state.finished and not h.cancelled:
                self.backend._ended(h, self.state, self.on_exit)  # nothing to wait for
            else:  # the process is exiting: wait for it off the loop
                threading.Thread(target=self.backend._ended, args=(h, self.state, self.on_exit),
                                 daemon=True, name=f"gpu-magic-exit-{h.spec.job_id}").start()


    def _take(self, chunk: bytes) -> None:
        """Split what was read into lines, each joined once: a line arriving in many reads
        must not be copied again at each (a cell can write anything on this pipe)."""
        lines = chunk.split(b"\n")
        for i, piece in enumerate(lines):
            last = i == len(lines) - 1
            if not self.overlong:
                self.parts.append(piece)
                self.size += len(piece)
                if self.size > EVENT_LINE_MAX:
                    self._too_long()
            if last:
                return
            line, overlong = b"".join(self.parts), self.overlong
            self.parts, self.size, self.overlong = [], 0, False
            if not overlong:
                self.state.line(line)

    def _too_long(self) -> None:
        self.parts, self.size, self.overlong = [], 0, True
        if not self.state.clean:
            self.state.on_event(self.state.run.job_id, self.state.run.attempt, {
                "type": "runner_error", "ename": "RunnerError",
                "evalue": f"the runner wrote an event of more than {EVENT_LINE_MAX >> 20} MiB, "
                          "which no runner of gpu_magic writes; it was stopped"})
            self.state.clean = True
        self.backend.cancel(self.handle)


class LocalBackend:
    """Runner subprocesses on this host; GPUs from NVML or a simulated inventory."""

    name = "local"
    # (a kernel that made CUDA tensors itself holds its GPU too: often the user's own)
    outside = ("in use by a process gpu_magic did not start (nvidia-smi lists it: a "
               "notebook kernel that used CUDA itself counts too)")

    def __init__(
        self,
        simulate: str | None = None,
        *,
        client_python: bool = True,
        isolation: str = "none",
        state_dir: Path | None = None,
        hidden_files: tuple[Path, ...] = (),
        keep_warm: float | None = 300.0,
        pass_env: Iterable[str] | None = None,
    ) -> None:
        self._env: dict[str, str] | None = None
        # None: cells get the gateway's whole environment (its one user's own); names: a
        # shared gateway's, which passes only shared_env and these
        self.pass_env = None if pass_env is None else tuple(pass_env)
        self.simulated = bool(simulate)
        self._gpus = parse_simulated(simulate) if simulate else read_nvml(own_pids=set())
        # The embedded gateway runs each cell with the submitting kernel's own Python and working
        # directory; a shared gateway uses its own.
        self.client_python = client_python
        self.isolation = isolation
        self.state_dir = state_dir
        self.hidden_files = hidden_files
        self.hidden_folders: tuple[str, ...] = ()  # (serve's secret_folders)
        self._handles: dict[tuple[str, int], Handle] = {}
        # Warm runners (zygote + keep-warm) only without a sandbox: a fork of a zygote outside
        # the sandbox would not be inside it. keep_warm None turns them off entirely.
        self.warm: WarmPool | None = None
        if keep_warm is not None and isolation == "none":
            self.warm = WarmPool(keep_warm)
            self.warm.prewarm(sys.executable, self._base_env())
        if isolation == "bwrap":  # asked now, not on the event loop as the first cell starts
            with contextlib.suppress(IsolationUnavailable):  # (asked again then, and said)
                python_paths(sys.executable, self._base_env())

    def runner_env(self) -> dict[str, str]:
        """The environment a runner starts with, before its grant's variables."""
        return self._base_env()

    def _base_env(self) -> dict[str, str]:
        # the gateway's own environment, read once (a copy of os.environ per job costs more
        # than a trivial cell's scheduling)
        if self._env is None:
            env = os.environ if self.pass_env is None else shared_env(os.environ, self.pass_env)
            self._env = {k: v for k, v in env.items() if k not in _SECRET_ENV}
        return dict(self._env)

    def inventory(self) -> list[Gpu]:
        if self.simulated or not self._gpus:
            return list(self._gpus)
        own = {h.pid for h in self._handles.values()}
        here = {g.node for g in self._gpus}
        held = {g.index for h in self._handles.values() for g in h.spec.gpus if g.node in here}
        if self.warm is not None:
            held |= {i for node, i in self.warm.held() if node in here}
        fresh = read_nvml(node=next(iter(here), None), own_pids=own, held=held)
        return fresh or list(self._gpus)

    def start(self, run: RunSpec, on_event: EventCallback, on_exit: ExitCallback) -> Handle:
        env = self._base_env()
        env.update(run.grant_env)
        python = run.python if (self.client_python and run.python) else sys.executable
        cwd = run.cwd if (self.client_python and run.cwd and os.path.isdir(run.cwd)) else None
        if self.warm is not None and os.path.isfile(python):
            handle = self._start_warm(run, env, python, cwd, on_event, on_exit)
            if handle is not None:
                return handle
        run.job_dir.mkdir(parents=True, exist_ok=True)
        (run.job_dir / "manifest.json").write_text(json.dumps(run.manifest))
        shown: list[str] = []
        if self.isolation == "bwrap":
            try:
                shown = python_paths(python, env)
            except IsolationUnavailable as exc:
                raise OSError(str(exc)) from None  # (the job fails, saying so)
        r, w = os.pipe()
        argv = [python, "-m", "gpu_magic.runner", str(run.job_dir), str(w)]
        if self.isolation == "bwrap":
            assert self.state_dir is not None
            m = run.manifest["inputs"]
            argv = bwrap_command(argv, job_dir=run.job_dir, state_dir=self.state_dir,
                                 readable=[m["pickle"], *m["buffers"]],
                                 hidden_files=self.hidden_files, python=shown,
                                 hidden_folders=self.hidden_folders,
                                 # a simulated pool's cells must not reach a real GPU here
                                 devices=[] if self.simulated else None)
            env = {k: v for k, v in env.items() if not k.startswith("GPU_MAGIC_") or k in
                   run.grant_env}
        log = os.open(run.job_dir / "runner.log",
                      os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd or str(run.job_dir),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(w,),
                start_new_session=True,
            )
        except BaseException:  # (a ValueError too: a client's python path with a NUL in it)
            os.close(r)
            os.close(log)
            raise
        finally:
            os.close(w)
        handle = Handle(proc.pid, run, proc=proc, log_fd=log)
        return self._watch(handle, r, on_event, on_exit)

    def _start_warm(self, run: RunSpec, env: dict[str, str], python: str, cwd: str | None,
                    on_event: EventCallback, on_exit: ExitCallback) -> Handle | None:
        assert self.warm is not None
        gpus = frozenset((g.node, g.index) for g in run.gpus)
        # (a kernel's own: two notebooks in one folder shared a runner, and one's warnings
        # filter, loggers and module settings reached the other's cells, where two local
        # kernels are two processes)
        key = (run.user, run.session, python, cwd, env.get("CUDA_VISIBLE_DEVICES"), gpus)
        # Each folder or file made here costs ~0.3 ms on a slow disk, as much as the rest of a
        # trivial cell: a small manifest travels with the job, and the job's folder is made
        # only when something needs it (the runner makes it for a result too large to travel
        # inline). A worker has no log of its own: it captures its output from its start.
        text = json.dumps(run.manifest)
        small = len(text) + sum(len(k) + len(v) + 8 for k, v in env.items()) < MANIFEST_INLINE_MAX
        manifest = run.manifest if small else None
        if manifest is None or cwd is None:
            run.job_dir.mkdir(parents=True, exist_ok=True)
        if manifest is None:
            (run.job_dir / "manifest.json").write_text(text)
        r, w = os.pipe()
        try:
            worker = self.warm.start(key, gpus, python, env, run.job_dir,
                                     cwd or str(run.job_dir), w, manifest)
        except (ZygoteError, OSError):
            os.close(r)
            return None  # a fresh process will do
        finally:
            os.close(w)
        return self._watch(Handle(worker.pid, run, worker=worker), r, on_event, on_exit)

    def _watch(self, handle: Handle, r: int, on_event: EventCallback,
               on_exit: ExitCallback) -> Handle:
        # read the runner's events on the gateway's event loop (start() is called there): no
        # thread to start per job, and no hand-over between threads for each event
        run = handle.spec
        self._handles[(run.job_id, run.attempt)] = handle
        _PipeReader(self, handle, r, on_event, on_exit, asyncio.get_running_loop())
        return handle

    def _ended(self, handle: Handle, state: _RunnerOutput, on_exit: ExitCallback) -> None:
        """The runner's pipe closed: keep its worker warm or wait for its exit (blocking)."""
        run = handle.spec
        stopped = False
        if handle.worker is not None and state.finished and not handle.cancelled:
            # the job ended and the worker lives on: keep it warm if it ended cleanly
            assert self.warm is not None
            self.warm.finished(handle.worker, reusable=state.clean and state.reusable)
            rc: int | None = 0
        else:
            rc = handle.wait(timeout=10.0)
            stopped = rc is None
            if stopped:
                # its pipe closed, but it lives: a cell that closed the pipe's descriptor. Its
                # GPUs go to the next job once the job ends, so it must not outlive it (a red
                # team's cell ran on past its --timeout, an admin's cancel and its user's limit)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(handle.pid, signal.SIGKILL)
                rc = handle.wait(timeout=30.0)
            if rc is not None and self.isolation == "bwrap" and 128 < rc <= 128 + 64:
                rc = 128 - rc  # bubblewrap exits 128+N for a runner killed by signal N
            if handle.worker is not None and self.warm is not None:
                self.warm.finished(handle.worker, reusable=False)
            if rc != 0 and self.isolation != "bwrap":  # (a sandbox's processes end with it)
                end_orphans(run.job_id)
        self._handles.pop((run.job_id, run.attempt), None)
        tail = ""
        if handle.log_fd is not None:  # a fresh process logs what it says outside its cells
            try:
                size = os.fstat(handle.log_fd).st_size
                tail = os.pread(handle.log_fd, 16000, max(0, size - 16000)).decode(
                    errors="replace")[-4000:]
            except OSError:
                pass
            finally:
                os.close(handle.log_fd)
                handle.log_fd = None
        if stopped:  # (said as the reason: a SIGKILL out of nowhere read as a crash)
            tail = ("[gpu_magic] the cell closed the runner's event pipe and went on; it was "
                    "stopped 10 s later")
        on_exit(run.job_id, run.attempt, rc, tail)

    def interrupt(self, handle: Handle) -> None:
        """SIGINT to the runner process alone, not its group: the cell gets a KeyboardInterrupt
        (see gpu_magic._interrupts), the processes it started (a DataLoader's workers) go on
        as under a local kernel's interrupt. A runner still starting gets it once ready."""
        handle.interrupt_due = True
        if handle.runner_pid is not None:
            self._deliver(handle)

    def _interruptible(self, handle: Handle, pid: int) -> None:
        handle.runner_pid = pid
        if handle.interrupt_due:
            self._deliver(handle)

    def _deliver(self, handle: Handle) -> None:
        handle.interrupt_due = False
        if handle.cancelled:
            return
        pid: int | None = handle.pid  # the runner itself, or its worker (never the pid it
        # reported: a cell may write lines of its own on the pipe)
        if self.isolation == "bwrap":
            # handle.pid is bubblewrap's; the runner is inside, numbered apart
            assert handle.runner_pid is not None
            pid = sandboxed_pid(handle.pid, handle.runner_pid)
        if pid is None:
            return  # (the sandbox is gone: the job is ending)
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def cancel(self, handle: Handle, grace: float = 3.0) -> None:
        """SIGTERM the runner's whole process group, then SIGKILL after ``grace`` seconds."""
        handle.cancelled = True
        pgid = handle.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def kill_later() -> None:
            handle.wait(timeout=grace)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        threading.Thread(target=kill_later, daemon=True).start()

    def shutdown(self) -> None:
        for handle in list(self._handles.values()):
            self.cancel(handle, grace=1.0)
        if self.warm is not None:
            self.warm.shutdown()

